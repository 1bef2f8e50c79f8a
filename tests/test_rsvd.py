import pytest
import torch

from subspace_ext import ops

import reference as ref
from conftest import CUDA_SKIP_REASON, HAS_CUDA


DTYPES = [torch.float32, torch.float64]
ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# backward-error scale of the dtype (relative to ||A||)
EPS = {torch.float32: 1e-5, torch.float64: 1e-12}


def _dense(U, S, V):
    return (U.detach().cpu().double() * S.detach().cpu().double().unsqueeze(-2)) @ V.detach().cpu().double().mT


def _check_factors(A, U, S, V, k):
    m, n = A.shape[-2:]
    lead = A.shape[:-2]
    assert U.shape == (*lead, m, k) and S.shape == (*lead, k) and V.shape == (*lead, n, k)
    assert U.dtype == A.dtype and S.dtype == A.dtype and V.dtype == A.dtype
    assert U.device == A.device
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all()
    Uf = U.reshape(-1, m, k)
    Vf = V.reshape(-1, n, k)
    for b in range(Uf.shape[0]):
        assert ref.orthonormality_error(Uf[b]) <= ORTHO_TOL[A.dtype]
        assert ref.orthonormality_error(Vf[b]) <= ORTHO_TOL[A.dtype]
    Sd = S.cpu().double()
    assert (Sd >= 0).all()
    assert (Sd[..., :-1] >= Sd[..., 1:] - EPS[A.dtype] * Sd[..., :1]).all()  # descending


def _check_canonical_signs(U):
    Ud = U.detach().cpu().double()
    idx = Ud.abs().argmax(dim=-2, keepdim=True)
    assert (Ud.gather(-2, idx) > 0).all()


SHAPES_RANKS = [
    (60, 40, 5), (40, 60, 10), (50, 50, 20),  # m > n, m < n, square
    (45, 30, 1),  # rank 1
    (20, 12, 12), (12, 20, 12),  # rank = min(m, n)
    (257, 3, 2), (3, 257, 3), (1, 7, 1), (7, 1, 1), (257, 257, 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES_RANKS)
def test_rsvd_near_optimal_on_decaying_spectrum(m, n, k, dtype, device):
    A, s = ref.decaying_matrix(m, n, dtype=dtype)
    A = A.to(device)
    U, S, V = ops.rsvd(A, k)
    _check_factors(A, U, S, V, k)
    _check_canonical_signs(U)
    err = torch.linalg.norm(A.cpu().double() - _dense(U, S, V)).item()
    opt = ref.optimal_error(s, k)
    normA = torch.linalg.norm(s).item()
    assert err <= 1.01 * opt + EPS[dtype] * normA, (err, opt)
    # top singular values
    torch.testing.assert_close(S.cpu().double(), s[:k], rtol=0, atol=EPS[dtype] * s[0].item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,oversample,niter,seed",
                         [(60, 40, 5, 8, 2, 0), (40, 70, 6, 0, 0, 3), (80, 50, 4, 3, 1, 2**63 + 9),
                          (33, 33, 10, 8, 4, 17),
                          (30, 20, 3, 2**63 - 1, 1, 5)])  # rank + oversample would overflow int64
def test_rsvd_matches_float64_reference_algorithm(m, n, k, oversample, niter, seed, dtype, device):
    """Same Omega, same HMT recipe in float64: the low-rank approximations agree to dtype precision,
    also when the approximation is poor (niter=0, oversample=0 on a slow decay)."""
    A, _ = ref.decaying_matrix(m, n, decay=0.9, dtype=dtype)
    A = A.to(device)
    U, S, V = ops.rsvd(A, k, oversample=oversample, niter=niter, seed=seed)
    Ur, Sr, Vr = ref.rsvd_ref(A.cpu(), k, oversample=oversample, niter=niter, seed=seed)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(_dense(U, S, V), _dense(Ur, Sr, Vr), rtol=0, atol=tol)
    torch.testing.assert_close(S.cpu().double(), Sr, rtol=0, atol=tol)
    # well-separated leading singular vectors agree individually (same canonical signs)
    torch.testing.assert_close(U.cpu().double()[:, :3], Ur[:, :3], rtol=0, atol=50 * tol)
    torch.testing.assert_close(V.cpu().double()[:, :3], Vr[:, :3], rtol=0, atol=50 * tol)


def test_rsvd_reference_differs_with_other_omega():
    """Sanity check that the reference comparison is sensitive to the test matrix: with niter=0 and
    no oversampling on a slow decay, a different seed gives a visibly different approximation."""
    A, _ = ref.decaying_matrix(40, 70, decay=0.95, dtype=torch.float64)
    U, S, V = ops.rsvd(A, 6, oversample=0, niter=0, seed=3)
    Ur, Sr, Vr = ref.rsvd_ref(A, 6, oversample=0, niter=0, seed=4)
    assert (_dense(U, S, V) - _dense(Ur, Sr, Vr)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_non_contiguous_inputs(dtype, device):
    base, _ = ref.decaying_matrix(50, 80, dtype=dtype)
    base = base.to(device)
    for A in (base.t(), base[:, ::2], base.t()[::3, 1:]):
        assert not A.is_contiguous()
        U, S, V = ops.rsvd(A, 6, seed=5)
        Uc, Sc, Vc = ops.rsvd(A.contiguous(), 6, seed=5)
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(S, Sc, rtol=0, atol=atol * Sc[0].item())
        torch.testing.assert_close(_dense(U, S, V), _dense(Uc, Sc, Vc), rtol=0, atol=atol)
        torch.testing.assert_close(U[:, :3], Uc[:, :3], rtol=0, atol=100 * atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_batched_equals_per_matrix(dtype, device):
    A = torch.randn(2, 3, 30, 20, dtype=dtype, device=device)
    A[0, 1] *= 100  # matrices of very different scale in one batch
    U, S, V = ops.rsvd(A, 4, seed=11)
    _check_factors(A, U, S, V, 4)
    for i in range(2):
        for j in range(3):
            Ui, Si, Vi = ops.rsvd(A[i, j], 4, seed=11)
            torch.testing.assert_close(U[i, j], Ui)
            torch.testing.assert_close(S[i, j], Si)
            torch.testing.assert_close(V[i, j], Vi)
    # batched non-contiguous input (transposed trailing dims)
    At = A.transpose(-1, -2)
    Ut, St, Vt = ops.rsvd(At, 4, seed=11)
    assert Ut.shape == (2, 3, 20, 4) and Vt.shape == (2, 3, 30, 4)
    torch.testing.assert_close(St, ops.rsvd(At.contiguous(), 4, seed=11)[1])
    Ut2, St2, Vt2 = ops.rsvd(At[1, 2], 4, seed=11)
    torch.testing.assert_close(Ut[1, 2], Ut2)


def test_rsvd_batched_single_leading_dim(device):
    A = torch.randn(5, 12, 9, device=device)
    U, S, V = ops.rsvd(A, 3)
    assert U.shape == (5, 12, 3) and S.shape == (5, 3) and V.shape == (5, 9, 3)
    for b in range(5):
        torch.testing.assert_close(S[b], ops.rsvd(A[b], 3)[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_many_equals_rsvd_exactly(dtype, device):
    shapes = [(200, 120), (5, 7), (64, 64), (100, 10), (10, 100), (257, 4), (4, 257), (31, 17)]
    mats = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    mats[2] = mats[2].t()  # a non-contiguous one
    out = ops.rsvd_many(mats, 4, oversample=5, niter=1, seed=123)
    assert isinstance(out, list) and len(out) == len(mats)
    for A, (U, S, V) in zip(mats, out):
        Ue, Se, Ve = ops.rsvd(A, 4, oversample=5, niter=1, seed=123)
        assert torch.equal(U, Ue) and torch.equal(S, Se) and torch.equal(V, Ve)
        _check_factors(A, U, S, V, 4)


def test_rsvd_many_empty_list():
    # an empty model (no matrices) is a valid input: nothing to do
    assert ops.rsvd_many([], 3) == []


def test_rsvd_many_tuple():
    mats = (torch.randn(8, 6), torch.randn(6, 8))
    out = ops.rsvd_many(mats, 2)
    assert len(out) == 2 and out[1][0].shape == (6, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_many_thread_counts(dtype):
    mats = [torch.randn(s, dtype=dtype) for s in [(90, 60), (20, 33), (60, 90), (7, 7)]]
    torch.set_num_threads(1)
    a = ops.rsvd_many(mats, 3, seed=1)
    torch.set_num_threads(2)
    b = ops.rsvd_many(mats, 3, seed=1)
    for (Ua, Sa, Va), (Ub, Sb, Vb) in zip(a, b):
        torch.testing.assert_close(Sa, Sb, rtol=1e-6, atol=0)
        torch.testing.assert_close(_dense(Ua, Sa, Va), _dense(Ub, Sb, Vb), rtol=0,
                                   atol=1e-6 * Sa[0].item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_thread_count_invariant(dtype):
    A, _ = ref.decaying_matrix(300, 200, dtype=dtype)
    torch.set_num_threads(1)
    U1, S1, V1 = ops.rsvd(A, 8, seed=2)
    torch.set_num_threads(2)
    U2, S2, V2 = ops.rsvd(A, 8, seed=2)
    torch.testing.assert_close(S1, S2, rtol=1e-6, atol=0)
    torch.testing.assert_close(U1, U2, rtol=0, atol=1e-6)
    torch.testing.assert_close(V1, V2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_deterministic_and_seeded(dtype, device):
    A, s = ref.decaying_matrix(70, 50, decay=0.8, dtype=dtype)
    A = A.to(device)
    r1 = ops.rsvd(A, 6, seed=42)
    r2 = ops.rsvd(A, 6, seed=42)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    # a different seed: different test matrix, still accurate
    r3 = ops.rsvd(A, 6, seed=43, niter=0, oversample=2)
    r4 = ops.rsvd(A, 6, seed=42, niter=0, oversample=2)
    assert not torch.equal(r3[1], r4[1])
    for U, S, V in (ops.rsvd(A, 6, seed=43), ops.rsvd(A, 6, seed=2**64 - 1)):
        err = torch.linalg.norm(A.cpu().double() - _dense(U, S, V)).item()
        assert err <= 1.1 * ref.optimal_error(s, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_exactly_low_rank_input(dtype, device):
    m, n = 40, 30
    Q1 = torch.linalg.qr(torch.randn(m, 3, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64)).Q
    s = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    A = ((Q1 * s) @ Q2.T).to(dtype).to(device)
    U, S, V = ops.rsvd(A, 8)
    _check_factors(A, U, S, V, 8)
    torch.testing.assert_close(S.cpu().double()[:3], s, rtol=0, atol=EPS[dtype] * 3)
    assert (S.cpu().double()[3:].abs() <= EPS[dtype] * 3).all()
    torch.testing.assert_close(_dense(U, S, V), A.cpu().double(), rtol=0, atol=EPS[dtype] * 3)


def test_rsvd_rank_one_outer_product(device):
    u, v = torch.randn(25, 1, dtype=torch.float64), torch.randn(1, 18, dtype=torch.float64)
    A = (u @ v).to(device)
    U, S, V = ops.rsvd(A, 1, oversample=0, niter=0)
    torch.testing.assert_close(_dense(U, S, V), A.cpu(), rtol=0, atol=1e-12 * A.abs().max().item())
    torch.testing.assert_close(S[0].item(), (u.norm() * v.norm()).item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_zero_matrix(dtype, device):
    A = torch.zeros(12, 9, dtype=dtype, device=device)
    U, S, V = ops.rsvd(A, 4)
    _check_factors(A, U, S, V, 4)
    assert (S == 0).all()


def test_rsvd_scale_equivariance():
    A, _ = ref.decaying_matrix(40, 30, dtype=torch.float64)
    U, S, V = ops.rsvd(A, 5)
    U2, S2, V2 = ops.rsvd(-3.0 * A, 5)
    torch.testing.assert_close(S2, 3.0 * S)
    torch.testing.assert_close(U2, U)  # canonical signs: U fixed, V absorbs the minus sign
    torch.testing.assert_close(V2, -V)


# Scales by powers of two at which the computation leaves its dtype's comfortable range: tiny values
# (float32: subnormal, where R^-1 of the orthonormalisation overflowed and LAPACK reported
# "non-finite values"), and huge ones whose sketch A @ Omega overflows (refused as NaN/Inf before).
RANGE_SCALES = {torch.float32: [-138, -70, 70, 125], torch.float64: [-1060, -600, 600, 1021]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["rsvd", "rsvd_many", "batched", "factored"])
def test_rsvd_far_out_of_range_matrices(dtype, which, device):
    """Decomposed as 2^e A (exact), S scaled back: every factor finite and orthonormal, and S equal, to
    rounding, to 2^s times the S of the same matrix scaled back to ordinary values (exact) first; for
    all four entry points. NaN is still refused."""
    def p2(x, e):   # x * 2^e, exact where the result is a normal number (two steps: 2^e may not fit)
        return x * 2.0 ** (e // 2) * 2.0 ** (e - e // 2)

    def run(X, C):
        X = X.to(device)
        if which == "factored":   # a tiny or huge factor beside an ordinary one
            return ops.factored_svd(X, C.to(device), k)
        if which == "rsvd":
            return ops.rsvd(X, k)
        if which == "rsvd_many":
            return ops.rsvd_many([X, X[:20]], k)[0]
        return [t[0] for t in torch.ops.subspace_ext._rsvd_batched(torch.stack([X, X.flip(0)]), k, 8, 2, 0)]

    gen = torch.Generator().manual_seed(11)
    A0, _ = ref.decaying_matrix(45, 31, decay=0.8, generator=gen)
    A0 = A0.to(dtype)
    C = torch.randn(31, 20, dtype=dtype, generator=gen)
    k = 4
    for s in RANGE_SCALES[dtype]:
        A = p2(A0, s)
        assert torch.isfinite(A).all() and (A != 0).any()
        U, S, V = run(A, C)
        want = p2(run(p2(A, -s), C)[1].cpu().double(), s)
        if not torch.isfinite(want).all() or want[0] > torch.finfo(dtype).max:
            continue   # S itself does not fit the dtype
        assert torch.isfinite(U).all() and torch.isfinite(V).all(), (s, which)
        assert ref.orthonormality_error(U) <= ORTHO_TOL[dtype] and ref.orthonormality_error(V) <= ORTHO_TOL[dtype]
        err = float(((S.cpu().double() - want) / want[0]).abs().max())
        quantum = torch.finfo(dtype).tiny * torch.finfo(dtype).eps   # a subnormal S is stored to this
        assert err <= EPS[dtype] + quantum / float(want[0]), (s, which, err)
    bad = A0.to(device).clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.factored_svd(bad, C.to(device), 2) if which == "factored" else ops.rsvd(bad, 2)


# ---------------------------------------------------------------------------------------------
# _rsvd_batched: the CUDA path of rsvd / rsvd_many (batched over equal shapes), checked on every
# device present: the same algorithm as rsvd, with Gram-based orthonormalisation (the batched
# small SVD) for every basis (Householder QR for the two final ones only where a direction was
# lost: rank-deficient inputs), and the Jacobi small SVD for the cores.

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("b,m,n,k", [(3, 40, 25, 5), (1, 17, 60, 1), (4, 33, 33, 33), (2, 257, 3, 2)])
def test_rsvd_batched_matches_rsvd(dtype, tol, b, m, n, k, device):
    A = torch.stack([ref.decaying_matrix(m, n, dtype=dtype)[0] for _ in range(b)]).to(device)
    U, S, V = torch.ops.subspace_ext._rsvd_batched(A, k, 8, 2, 7)
    Ur, Sr, Vr = ops.rsvd(A, k, oversample=8, niter=2, seed=7)
    assert U.shape == (b, m, k) and S.shape == (b, k) and V.shape == (b, n, k) and U.dtype == dtype
    torch.testing.assert_close(S, Sr, rtol=tol * 10, atol=tol * 10)
    # same subspace and canonical signs: the rank-k products agree, column by column where separated
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, (Ur * Sr.unsqueeze(-2)) @ Vr.mT,
                               rtol=tol * 100, atol=tol * 100 * float(S.max()))
    for Q in (U, V):
        eye = torch.eye(k, dtype=torch.float64, device=device)
        assert float((Q.double().mT @ Q.double() - eye).abs().max()) < (1e-5 if dtype == torch.float32 else 1e-12)
    flat = U.abs().argmax(-2, keepdim=True)
    assert bool((U.gather(-2, flat) > 0).all())  # canonical signs


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsvd_batched_and_many_match_float64_reference(dtype, device):
    """A batch (b > 1) and rsvd_many's groups (two of one shape, a transposed view, a wide one), on
    every device, against the float64 recipe matrix by matrix."""
    A = torch.stack([ref.decaying_matrix(40, 25, decay=0.9, dtype=dtype)[0] for _ in range(3)]).to(device)
    wide = ref.decaying_matrix(17, 60, decay=0.9, dtype=dtype)[0].to(device)
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    batched = [(A[i], (U[i], S[i], V[i])) for U, S, V in [ops.rsvd(A, 5, seed=7)] for i in range(3)]
    mats = [A[0], A[1], A[2].T, wide]
    for M, (U, S, V) in batched + list(zip(mats, ops.rsvd_many(mats, 5, seed=7))):
        Ur, Sr, Vr = ref.rsvd_ref(M.cpu(), 5, seed=7)
        torch.testing.assert_close(_dense(U, S, V), _dense(Ur, Sr, Vr), rtol=0, atol=tol)
        torch.testing.assert_close(S.cpu().double(), Sr, rtol=0, atol=tol)
        torch.testing.assert_close(U.cpu().double()[:, :3], Ur[:, :3], rtol=0, atol=50 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("niter", [0, 1, 3])
def test_rsvd_batched_rank_deficient_and_zero_inputs(dtype, niter, device):
    # numerically absent directions become zero columns inside the iteration: the factors that
    # come out must still be orthonormal and reproduce A
    low = torch.randn(2, 60, 3, dtype=dtype) @ torch.randn(2, 3, 40, dtype=dtype)
    zero = torch.zeros(2, 60, 40, dtype=dtype)
    for A in (low, zero, torch.cat([low[:1], zero[:1]])):
        U, S, V = torch.ops.subspace_ext._rsvd_batched(A.to(device), 6, 8, niter, 3)
        _check_factors(A.to(device), U, S, V, 6)
        err = float((_dense(U, S, V) - A.double()).abs().max())
        assert err <= 50 * EPS[dtype] * max(float(A.abs().max()), 1.0), err


def test_rsvd_batched_rejects_nan(device):
    A = torch.randn(2, 10, 8, device=device)
    A[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.subspace_ext._rsvd_batched(A, 2, 2, 1, 0)


# ---------------------------------------------------------------------------------------------
# model weights in bfloat16 / float16: computed in float32 (one copy per matrix), float32 factors


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_rsvd_low_precision_weights_compute_in_float32(low, device):
    A = ref.decaying_matrix(60, 45, dtype=torch.float32)[0].to(low).to(device)
    U, S, V = ops.rsvd(A, 6, seed=3)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    for got, want in zip((U, S, V), ops.rsvd(A.float(), 6, seed=3)):
        assert torch.equal(got, want)
    # batched, and the CUDA path's private op on its own
    Ab = torch.randn(2, 3, 20, 14, device=device).to(low)
    for got, want in zip(ops.rsvd(Ab, 4, seed=1), ops.rsvd(Ab.float(), 4, seed=1)):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    for got, want in zip(torch.ops.subspace_ext._rsvd_batched(Ab[0], 4, 8, 2, 1),
                         torch.ops.subspace_ext._rsvd_batched(Ab[0].float(), 4, 8, 2, 1)):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_rsvd_many_mixed_weight_dtypes(device):
    """Each matrix keeps its own compute dtype: float64 stays float64, the rest compute in float32;
    entry i equals rsvd(mats[i]) (on CUDA: one group per (shape, compute dtype))."""
    dts = [torch.bfloat16, torch.float32, torch.float64, torch.float16, torch.bfloat16]
    shapes = [(30, 20), (30, 20), (30, 20), (17, 40), (17, 40)]
    mats = [torch.randn(s, device=device).to(dt) for s, dt in zip(shapes, dts)]
    out = ops.rsvd_many(mats, 5, seed=2)
    for A, (U, S, V) in zip(mats, out):
        want = torch.float64 if A.dtype == torch.float64 else torch.float32
        assert U.dtype == S.dtype == V.dtype == want
        for got, exp in zip((U, S, V), ops.rsvd(A, 5, seed=2)):
            if device == "cpu":
                assert torch.equal(got, exp)
            else:  # one batched pipeline per group on CUDA: equal to rounding, canonical signs too
                torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4 if want == torch.float32 else 1e-10)


def test_solar_basis_low_precision_base(device):
    W = torch.randn(12, 9, device=device).to(torch.bfloat16)
    for got, want in zip(ops.solar_basis(W, 4, 1, 0.1), ops.solar_basis(W.double(), 4, 1, 0.1)):
        assert got.dtype == torch.float64 and torch.equal(got, want)


def _qr_calls(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::linalg_qr")


@pytest.mark.parametrize("niter", [0, 2])
def test_rsvd_batched_takes_householder_only_for_lost_directions(niter, device):
    """Full-rank groups orthonormalise every basis through the Gram passes (batched GEMMs and the
    Gram-Cholesky kernel): no linalg_qr, which ATen's CUDA path runs as one cuSOLVER call per matrix.
    A group with a rank-deficient matrix takes Householder QR for its two final bases."""
    full = torch.randn(3, 70, 50, device=device)
    assert _qr_calls(lambda: torch.ops.subspace_ext._rsvd_batched(full, 6, 8, niter, 1)) == 0
    low = full.clone()
    low[1] = (torch.randn(70, 2) @ torch.randn(2, 50)).to(device)
    U, S, V = torch.ops.subspace_ext._rsvd_batched(low, 6, 8, niter, 1)
    assert _qr_calls(lambda: torch.ops.subspace_ext._rsvd_batched(low, 6, 8, niter, 1)) == 2
    _check_factors(low, U, S, V, 6)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("niter, passes", [(0, 4), (2, 8)])
def test_rsvd_batched_cuda_kernel_launches(niter, passes):
    """On CUDA a group's orthonormalisations are one Gram-Cholesky launch per pass (niter 2: one
    pass for each of the 4 bases inside the iteration, two for each of the 2 final bases) and the
    only Jacobi SVD launch is the cores': 9 Jacobi launches per group before."""
    from torch.profiler import ProfilerActivity, profile
    A = torch.randn(3, 70, 50, device="cuda")
    torch.ops.subspace_ext._rsvd_batched(A, 6, 8, niter, 1)  # warm-up
    # CPU activity too: with CUDA alone some torch builds record no kernel events at all
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.ops.subspace_ext._rsvd_batched(A, 6, 8, niter, 1)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("gram_orth_kernel" in n for n in names) == passes, names
    assert sum("small_svd_kernel" in n for n in names) == 1, names
