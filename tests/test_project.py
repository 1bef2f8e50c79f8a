import pytest
import torch

from subspace_ext import ops

import reference as ref
from conftest import CUDA_SKIP_REASON, HAS_CUDA


DTYPES = [torch.float32, torch.float64]
UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def d(t):
    return t.detach().cpu().double()


def _assert_rounding_close(got, expected, bound, dtype, depth):
    """|got - expected| <= depth * unit_roundoff * bound elementwise (the standard GEMM error bound,
    bound = the same product computed on absolute values), with a small safety factor."""
    got = d(got)
    assert got.shape == expected.shape
    tol = 4 * depth * UNIT[dtype] * bound + 1e-300
    bad = (got - expected).abs() > tol
    assert not bad.any(), ((got - expected).abs().max().item(), tol.max().item())


def _orth(*shape, dtype, device):
    return torch.linalg.qr(torch.randn(shape, dtype=torch.float64)).Q.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# project


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,m,n,r,k1,k2", [
    ((), 40, 30, 8, 5, 6), ((), 3, 257, 1, 2, 3), ((), 257, 3, 4, 1, 1), ((), 17, 17, 17, 17, 17),
    ((3,), 20, 12, 4, 3, 5), ((2, 2), 9, 11, 1, 4, 2),
])
@pytest.mark.parametrize("scaling", [1.0, 0.25, -2.0])
def test_project_matches_dense(lead, m, n, r, k1, k2, scaling, dtype, device):
    U = torch.randn(*lead, m, k1, dtype=dtype, device=device)
    V = torch.randn(*lead, n, k2, dtype=dtype, device=device)
    B = torch.randn(*lead, m, r, dtype=dtype, device=device)
    A = torch.randn(*lead, r, n, dtype=dtype, device=device)
    C = ops.project(U, V, B, A, scaling)
    assert C.shape == (*lead, k1, k2) and C.dtype == dtype and C.device.type == device
    expected = ref.project_ref(U, V, B, A, scaling)
    bound = abs(scaling) * ref.project_ref(U.abs(), V.abs(), B.abs(), A.abs())
    _assert_rounding_close(C, expected, bound, dtype, m + n + r)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_half_precision_factors(half, dtype, device):
    """A bf16/fp16 adapter's factors (non-contiguous, odd sizes) are computed in the bases' dtype:
    the result is the float64 reference's projection of the same (exactly widened) numbers, to the
    bases' rounding, in the bases' dtype; project_perturbed, project_dense and factored_svd take them
    too, and the gradients come back in the factors' dtype."""
    m, n, r, k1, k2 = 37, 23, 5, 4, 3
    U, V = torch.randn(m, k1, dtype=dtype, device=device), torch.randn(n, k2, dtype=dtype, device=device)
    B = torch.randn(r, m, device=device).to(half).t().requires_grad_()  # m x r, transposed strides
    A = torch.randn(r, 2 * n, device=device).to(half)[:, ::2].requires_grad_()  # r x n, column stride 2
    C = ops.project(U, V, B, A, 0.5)
    assert C.dtype == dtype and C.shape == (k1, k2)
    Bw, Aw = B.detach().to(dtype), A.detach().to(dtype)
    expected = ref.project_ref(U, V, Bw, Aw, 0.5)
    _assert_rounding_close(C, expected, 0.5 * ref.project_ref(U.abs(), V.abs(), Bw.abs(), Aw.abs()), dtype, m + n + r)
    C.sum().backward()
    assert B.grad.dtype == half and A.grad.dtype == half and B.grad.shape == B.shape and A.grad.shape == A.shape
    Bg, Ag = Bw.clone().requires_grad_(), Aw.clone().requires_grad_()
    ops.project(U, V, Bg, Ag, 0.5).sum().backward()
    assert torch.equal(B.grad, Bg.grad.to(half)) and torch.equal(A.grad, Ag.grad.to(half))
    P = ops.project_perturbed(U, V, B.detach(), A.detach(), 0.5, eps=0.2, seed=5)
    assert P.dtype == dtype and torch.equal(P, ops.project_perturbed(U, V, Bw, Aw, 0.5, eps=0.2, seed=5))
    D = (Bw @ Aw).to(half)
    Cd = ops.project_dense(U, V, D)
    assert Cd.dtype == dtype
    Dw = D.to(dtype)
    _assert_rounding_close(Cd, ref.project_dense_ref(U, V, Dw), ref.project_dense_ref(U.abs(), V.abs(), Dw.abs()),
                           dtype, m + n)
    Uf, Sf, Vf = ops.factored_svd(B.detach(), A.detach())
    assert Sf.dtype == torch.float32 and Uf.dtype == torch.float32 and Vf.dtype == torch.float32
    _check_factored(B.detach().float(), A.detach().float(), None, Uf, Sf, Vf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_non_contiguous(dtype, device):
    Ub = torch.randn(6, 40, dtype=dtype, device=device)
    Vb = torch.randn(30, 14, dtype=dtype, device=device)
    Bb = torch.randn(5, 40, dtype=dtype, device=device)
    Ab = torch.randn(30, 10, dtype=dtype, device=device)
    U, V, B, A = Ub.t(), Vb[:, ::2], Bb.t(), Ab.t()[::2]  # (40,6) (30,7) (40,5) (5,30)
    assert not any(t.is_contiguous() for t in (U, V, B, A))
    C = ops.project(U, V, B, A, 0.5)
    expected = ref.project_ref(U, V, B, A, 0.5)
    bound = 0.5 * ref.project_ref(U.abs(), V.abs(), B.abs(), A.abs())
    _assert_rounding_close(C, expected, bound, dtype, 100)
    torch.testing.assert_close(C, ops.project(U.contiguous(), V.contiguous(), B.contiguous(),
                                              A.contiguous(), 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_inputs_unchanged(dtype):
    U, V = torch.randn(10, 3, dtype=dtype), torch.randn(8, 2, dtype=dtype)
    B, A = torch.randn(10, 4, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    copies = [t.clone() for t in (U, V, B, A)]
    ops.project(U, V, B, A, 3.0)
    for t, c in zip((U, V, B, A), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,m,n,k1,k2", [((), 50, 30, 4, 9), ((), 30, 50, 9, 4), ((4,), 7, 257, 3, 3),
                                            ((), 1, 1, 1, 1)])
def test_project_dense(lead, m, n, k1, k2, dtype, device):
    U = torch.randn(*lead, m, k1, dtype=dtype, device=device)
    V = torch.randn(*lead, n, k2, dtype=dtype, device=device)
    D = torch.randn(*lead, m, n, dtype=dtype, device=device)
    C = ops.project_dense(U, V, D)
    assert C.shape == (*lead, k1, k2) and C.dtype == dtype
    _assert_rounding_close(C, ref.project_dense_ref(U, V, D),
                           ref.project_dense_ref(U.abs(), V.abs(), D.abs()), dtype, m + n)
    # non-contiguous D
    Dt = D.mT.contiguous().mT
    torch.testing.assert_close(ops.project_dense(U, V, Dt), C)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_dense_agrees_with_project(dtype, device):
    U, V = torch.randn(30, 5, dtype=dtype, device=device), torch.randn(20, 4, dtype=dtype, device=device)
    B, A = torch.randn(30, 3, dtype=dtype, device=device), torch.randn(3, 20, dtype=dtype, device=device)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(ops.project(U, V, B, A, 1.5), ops.project_dense(U, V, 1.5 * B @ A),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,m,n,k1,k2", [((), 40, 25, 5, 3), ((2, 3), 6, 9, 2, 4), ((), 257, 1, 1, 1)])
def test_reconstruct(lead, m, n, k1, k2, dtype, device):
    U = torch.randn(*lead, m, k1, dtype=dtype, device=device)
    C = torch.randn(*lead, k1, k2, dtype=dtype, device=device)
    V = torch.randn(*lead, n, k2, dtype=dtype, device=device)
    D = ops.reconstruct(U, C, V)
    assert D.shape == (*lead, m, n) and D.dtype == dtype
    _assert_rounding_close(D, ref.reconstruct_ref(U, C, V),
                           ref.reconstruct_ref(U.abs(), C.abs(), V.abs()), dtype, k1 + k2)
    # non-contiguous operands
    torch.testing.assert_close(ops.reconstruct(U.mT.contiguous().mT, C.mT.contiguous().mT, V), D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_reconstruct_roundtrip(dtype, device):
    """An update that lies in span(U) x span(V) is recovered exactly (to rounding)."""
    m, n, k1, k2, r = 50, 40, 6, 5, 3
    U, V = _orth(m, k1, dtype=dtype, device=device), _orth(n, k2, dtype=dtype, device=device)
    B = U @ torch.randn(k1, r, dtype=dtype, device=device)
    A = torch.randn(r, k2, dtype=dtype, device=device) @ V.mT
    C = ops.project(U, V, B, A, 0.7)
    D = ops.reconstruct(U, C, V)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(d(D), 0.7 * d(B) @ d(A), rtol=0, atol=tol * (d(B) @ d(A)).abs().max().item())
    # and an update orthogonal to the basis projects to ~0
    P = torch.eye(m, dtype=dtype, device=device) - U @ U.mT
    C0 = ops.project(U, V, P @ B + P @ torch.randn(m, r, dtype=dtype, device=device), A, 1.0)
    assert d(C0).abs().max().item() <= 100 * tol


# ---------------------------------------------------------------------------------------------
# project_perturbed: project on perturbed_basis(U) / perturbed_basis(V) without storing the noise


def _perturbed_ref(X, eps, seed, stream, absolute=False):
    """X + eps * N(seed, stream) in float64 math (the noise from the pure-Python Philox); with
    ``absolute``, |X| + eps * |N| (the magnitude the rounding of X + eps * N scales with)."""
    bits = 32 if X.dtype == torch.float32 else 64
    N = ref.philox_normals_ref(X.numel(), seed, stream, bits).reshape(X.shape)
    return d(X).abs() + eps * N.abs() if absolute else d(X) + eps * N


PERTURBED_SHAPES = [(40, 30, 8, 5, 6), (1, 1, 1, 1, 1), (129, 3, 1, 5, 2), (3, 257, 3, 2, 257),
                    (300, 257, 8, 17, 33), (257, 130, 4, 257, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("m,n,r,k1,k2", PERTURBED_SHAPES, ids=str)
def test_project_perturbed_matches_float64_reference(m, n, r, k1, k2, eps, dtype, device):
    U, V = _orth(m, k1, dtype=dtype, device=device), _orth(n, k2, dtype=dtype, device=device)
    B = torch.randn(m, r, dtype=dtype, device=device)
    A = torch.randn(r, n, dtype=dtype, device=device)
    C = ops.project_perturbed(U, V, B, A, 0.7, eps=eps, seed=11, stream_u=4, stream_v=5)
    assert C.shape == (k1, k2) and C.dtype == dtype and C.device == U.device
    Ut, Vt = _perturbed_ref(U, eps, 11, 4), _perturbed_ref(V, eps, 11, 5)
    expected = 0.7 * Ut.T @ d(B) @ d(A) @ Vt
    bound = 0.7 * Ut.abs().T @ d(B).abs() @ d(A).abs() @ Vt.abs()
    _assert_rounding_close(C, expected, bound, dtype, depth=m + n + r + 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_perturbed_uses_perturbed_basis_noise(dtype, device):
    m, n, r, k1, k2 = 200, 150, 6, 12, 9
    U, V = _orth(m, k1, dtype=dtype, device=device), _orth(n, k2, dtype=dtype, device=device)
    B, A = torch.randn(m, r, dtype=dtype, device=device), torch.randn(r, n, dtype=dtype, device=device)
    C = ops.project_perturbed(U, V, B, A, eps=0.2, seed=3, stream_u=7, stream_v=2)
    Ut, Vt = ops.perturbed_basis(U, 0.2, 3, 7), ops.perturbed_basis(V, 0.2, 3, 2)
    expected = ops.project(Ut, Vt, B, A)
    assert torch.allclose(C, expected, rtol=0, atol=50 * UNIT[dtype] * float(expected.abs().max()) * (m + n))
    # and not the unperturbed (or the other stream's) coefficients
    assert (C - ops.project(U, V, B, A)).abs().max() > 1e-3
    other = ops.project_perturbed(U, V, B, A, eps=0.2, seed=3, stream_u=2, stream_v=7)
    assert (C - other).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_perturbed_non_contiguous_and_thread_invariant(dtype):
    m, n, r, k1, k2 = 300, 140, 5, 11, 7
    U = torch.randn(k1, m, dtype=dtype).T  # transposed views
    V = torch.randn(k2, n, dtype=dtype).T
    B = torch.randn(r, m, dtype=dtype).T
    A = torch.randn(n, r, dtype=dtype).T
    torch.set_num_threads(1)
    one = ops.project_perturbed(U, V, B, A, eps=0.1, seed=5)
    torch.set_num_threads(2)
    two = ops.project_perturbed(U, V, B, A, eps=0.1, seed=5)
    assert torch.equal(one, two)
    dense = ops.project_perturbed(U.contiguous(), V.contiguous(), B.contiguous(), A.contiguous(), eps=0.1, seed=5)
    assert torch.equal(one, dense)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_perturbed_non_contiguous_matches_reference(dtype, device):
    """Transposed and strided views (the CUDA kernel reads them through their strides) against the
    float64 reference, and equal to the same call on contiguous copies."""
    m, n, r, k1, k2 = 300, 140, 5, 11, 7
    U = torch.randn(k1, m, dtype=dtype, device=device).T
    V = torch.randn(2 * k2, n, dtype=dtype, device=device)[::2].T
    B = torch.randn(r, m, dtype=dtype, device=device).T
    A = torch.randn(n, 3 * r, dtype=dtype, device=device)[:, ::3].T
    C = ops.project_perturbed(U, V, B, A, 0.7, eps=0.1, seed=5, stream_u=2, stream_v=9)
    Ut, Vt = _perturbed_ref(U, 0.1, 5, 2), _perturbed_ref(V, 0.1, 5, 9)
    bound = 0.7 * Ut.abs().T @ d(B).abs() @ d(A).abs() @ Vt.abs()
    _assert_rounding_close(C, 0.7 * Ut.T @ d(B) @ d(A) @ Vt, bound, dtype, depth=m + n + r + 40)
    dense = ops.project_perturbed(U.contiguous(), V.contiguous(), B.contiguous(), A.contiguous(), 0.7, eps=0.1,
                                  seed=5, stream_u=2, stream_v=9)
    if device == "cpu":  # the CPU path copies rows to tiles: the same bits whatever the strides
        assert torch.equal(C, dense)
    else:
        _assert_rounding_close(C, d(dense), bound, dtype, depth=2 * (m + n + r + 40))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
def test_project_perturbed_rank_beyond_shared_memory_is_a_clear_error_on_cuda():
    """On CUDA the fused product's block needs shared memory in proportion to r: a rank past what the
    GPU holds (r > 1814 for float64 with an H100/H200's 227 KiB) is refused naming r, not a launch failure."""
    U, V = torch.randn(40, 16, dtype=torch.float64, device="cuda"), torch.randn(30, 4, dtype=torch.float64, device="cuda")
    B, A = torch.randn(40, 4000, dtype=torch.float64, device="cuda"), torch.randn(4000, 30, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="the rank r = 4000 .* shared memory"):
        ops.project_perturbed(U, V, B, A, eps=0.1, seed=1)


def test_project_perturbed_errors():
    U, V, B, A = torch.randn(10, 3), torch.randn(8, 2), torch.randn(10, 4), torch.randn(4, 8)
    with pytest.raises(ValueError, match="do not chain"):
        ops.project_perturbed(U, V, B, A.T.contiguous(), eps=0.1, seed=0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            ops.project_perturbed(U, V, B, A, eps=bad, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        ops.project_perturbed(U[None], V, B, A, eps=0.1, seed=0)
    with pytest.raises(TypeError, match="dtype"):
        ops.project_perturbed(U.double(), V, B, A, eps=0.1, seed=0)
    nan_B = B.clone()
    nan_B[3, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        ops.project_perturbed(U, V, nan_B, A, eps=0.1, seed=0)


# ---------------------------------------------------------------------------------------------
# reconstruct_perturbed: the way back, U~ C V~^T, U~ and V~ formed one chunk of rows at a time

# (m, n, k1, k2): a 1 x 1, chunk/strip edges (129 rows, 65 rows: two CUDA strips of 64), k = 1 with
# many rows, full bases, and a basis row too long for 48 KiB of shared memory (CUDA opt-in path).
RECON_SHAPES = [(40, 30, 5, 6), (1, 1, 1, 1), (129, 3, 5, 2), (65, 300, 1, 1), (3, 257, 2, 257),
                (300, 257, 17, 33), (257, 130, 257, 130), (5, 3, 2, 6200)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("m,n,k1,k2", RECON_SHAPES, ids=str)
def test_reconstruct_perturbed_matches_float64_reference(m, n, k1, k2, eps, dtype, device):
    U, V = torch.randn(m, k1, dtype=dtype, device=device), torch.randn(n, k2, dtype=dtype, device=device)
    C = torch.randn(k1, k2, dtype=dtype, device=device)
    D = ops.reconstruct_perturbed(U, C, V, eps=eps, seed=11, stream_u=4, stream_v=5)
    assert D.shape == (m, n) and D.dtype == dtype and D.device == U.device and D.is_contiguous()
    Ut, Vt = _perturbed_ref(U, eps, 11, 4), _perturbed_ref(V, eps, 11, 5)
    expected = Ut @ d(C) @ Vt.T
    bound = _perturbed_ref(U, eps, 11, 4, True) @ d(C).abs() @ _perturbed_ref(V, eps, 11, 5, True).T
    _assert_rounding_close(D, expected, bound, dtype, depth=k1 + k2 + 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruct_perturbed_uses_perturbed_basis_noise(dtype, device):
    m, n, k1, k2 = 200, 150, 12, 9
    U, V = _orth(m, k1, dtype=dtype, device=device), _orth(n, k2, dtype=dtype, device=device)
    C = torch.randn(k1, k2, dtype=dtype, device=device)
    D = ops.reconstruct_perturbed(U, C, V, eps=0.2, seed=3, stream_u=7, stream_v=2)
    Ut, Vt = ops.perturbed_basis(U, 0.2, 3, 7), ops.perturbed_basis(V, 0.2, 3, 2)
    expected = ops.reconstruct(Ut, C, Vt)
    assert torch.allclose(D, expected, rtol=0, atol=50 * UNIT[dtype] * float(expected.abs().max()) * (k1 + k2))
    assert (D - ops.reconstruct(U, C, V)).abs().max() > 1e-3
    other = ops.reconstruct_perturbed(U, C, V, eps=0.2, seed=3, stream_u=2, stream_v=7)
    assert (D - other).abs().max() > 1e-3
    # eps = 0 is reconstruct; the default streams are project_perturbed's
    tol = 50 * UNIT[dtype] * float(expected.abs().max()) * (k1 + k2)
    assert torch.allclose(ops.reconstruct_perturbed(U, C, V, eps=0.0, seed=3), ops.reconstruct(U, C, V), rtol=0, atol=tol)
    B, A = U @ torch.randn(k1, 3, dtype=dtype, device=device), torch.randn(3, k2, dtype=dtype, device=device) @ V.mT
    Cp = ops.project_perturbed(U, V, B, A, eps=0.05, seed=9)
    Dp = ops.reconstruct_perturbed(U, Cp, V, eps=0.05, seed=9)
    Ut, Vt = ops.perturbed_basis(U, 0.05, 9, 0), ops.perturbed_basis(V, 0.05, 9, 1)
    expected = Ut @ (Ut.mT @ B @ A @ Vt) @ Vt.mT
    assert torch.allclose(Dp, expected, rtol=0, atol=100 * UNIT[dtype] * float(expected.abs().max()) * (m + n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k1,k2", [(1030, 3, 257, 2), (3, 1100, 2, 257), (8200, 3, 32, 2), (3, 9000, 2, 32)],
                         ids=str)
def test_reconstruct_perturbed_many_chunks(m, n, k1, k2, dtype, device):
    """A basis of more than one CPU chunk (1 MiB of it or 1024 rows, whichever is more: 1024 rows at
    k = 257, 8192 / 4096 rows at k = 32 in float32 / float64), U in the first pass, V in the second:
    each chunk's noise belongs to its own rows (against the materialised perturbed bases, which have the
    same rounding)."""
    U, V = torch.randn(m, k1, dtype=dtype, device=device), torch.randn(n, k2, dtype=dtype, device=device)
    C = torch.randn(k1, k2, dtype=dtype, device=device)
    D = ops.reconstruct_perturbed(U, C, V, eps=0.3, seed=2, stream_u=1, stream_v=6)
    Ut, Vt = d(ops.perturbed_basis(U, 0.3, 2, 1)), d(ops.perturbed_basis(V, 0.3, 2, 6))
    _assert_rounding_close(D, Ut @ d(C) @ Vt.T, Ut.abs() @ d(C).abs() @ Vt.abs().T, dtype, depth=k1 + k2 + 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruct_perturbed_non_contiguous(dtype, device):
    m, n, k1, k2 = 150, 70, 9, 5
    U = torch.randn(k1, m, dtype=dtype, device=device).T  # transposed views
    C = torch.randn(k2, k1, dtype=dtype, device=device).T
    V = torch.randn(k2, 2 * n, dtype=dtype, device=device).T[::2]
    D = ops.reconstruct_perturbed(U, C, V, eps=0.1, seed=5)
    dense = ops.reconstruct_perturbed(U.contiguous(), C.contiguous(), V.contiguous(), eps=0.1, seed=5)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(D, dense, rtol=tol, atol=tol)


def test_reconstruct_perturbed_errors():
    U, C, V = torch.randn(10, 3), torch.randn(3, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match="do not chain"):
        ops.reconstruct_perturbed(U, C.T.contiguous(), V, eps=0.1, seed=0)
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps"):
            ops.reconstruct_perturbed(U, C, V, eps=bad, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        ops.reconstruct_perturbed(U, C[None], V, eps=0.1, seed=0)
    with pytest.raises(TypeError, match="dtype"):
        ops.reconstruct_perturbed(U.double(), C, V, eps=0.1, seed=0)
    with pytest.raises(TypeError, match="float32, float64"):
        ops.reconstruct_perturbed(U.half(), C.half(), V.half(), eps=0.1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ops.reconstruct_perturbed(U, C, V, eps=0.1, seed=2**64)
    with pytest.raises(TypeError, match="stream_v"):
        ops.reconstruct_perturbed(U, C, V, eps=0.1, seed=0, stream_v=1.0)
    # zero-size operands: an empty or all-zero result, no error
    assert ops.reconstruct_perturbed(U[:, :0], C[:0], V, eps=0.1, seed=0).abs().max() == 0
    assert ops.reconstruct_perturbed(U[:0], C, V, eps=0.1, seed=0).shape == (0, 8)


# ---------------------------------------------------------------------------------------------
# factored_svd


def _check_factored(B, A, rank, U, S, V):
    dtype = torch.promote_types(B.dtype, A.dtype)
    m, r, n = B.shape[0], B.shape[1], A.shape[1]
    full = min(m, n, r)
    k = full if rank is None else rank
    assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    assert U.dtype == dtype and S.dtype == dtype and V.dtype == dtype
    assert ref.orthonormality_error(U) <= ORTHO_TOL[dtype]
    assert ref.orthonormality_error(V) <= ORTHO_TOL[dtype]
    P = d(B) @ d(A)
    s_exact = torch.linalg.svdvals(P)
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    scale = (torch.linalg.norm(d(B), 2) * torch.linalg.norm(d(A), 2)).item()
    torch.testing.assert_close(d(S), s_exact[:k], rtol=0, atol=eps * scale)
    # the rank-k approximation is optimal
    err = torch.linalg.norm(P - (d(U) * d(S)) @ d(V).T).item()
    opt = float(torch.sqrt((s_exact[k:] ** 2).sum()))
    assert err <= opt + 10 * eps * scale, (err, opt)
    # canonical signs
    idx = d(U).abs().argmax(dim=0, keepdim=True)
    assert (d(U).gather(0, idx) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r,n", [(40, 8, 30), (30, 8, 40), (3, 5, 9), (9, 5, 3), (1, 4, 7), (7, 1, 1),
                                   (257, 16, 3), (12, 12, 12)])
def test_factored_svd_full(m, r, n, dtype, device):
    B = torch.randn(m, r, dtype=dtype, device=device)
    A = torch.randn(r, n, dtype=dtype, device=device)
    U, S, V = ops.factored_svd(B, A)
    _check_factored(B, A, None, U, S, V)
    # reconstruction of B @ A (full rank of the product)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = (torch.linalg.norm(d(B), 2) * torch.linalg.norm(d(A), 2)).item()
    torch.testing.assert_close((d(U) * d(S)) @ d(V).T, d(B) @ d(A), rtol=0, atol=10 * tol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r,n,rank", [(40, 8, 30, 3), (30, 10, 50, 1), (3, 5, 9, 2), (20, 6, 20, 6)])
def test_factored_svd_truncated_matches_dense_svd(m, r, n, rank, dtype, device):
    # factors with a well-separated spectrum, so individual singular vectors are determined
    Qm, Qn = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64)).Q, torch.linalg.qr(
        torch.randn(n, r, dtype=torch.float64)).Q
    k0 = min(m, n, r)
    s = 0.5 ** torch.arange(k0, dtype=torch.float64)
    G = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64)).Q
    B = (Qm[:, :k0] * s) @ G[:k0] * 2.0
    A = (G[:k0].T @ Qn[:, :k0].T) * 0.5  # B @ A = Qm diag(s) Qn^T
    if r > k0:  # keep the factors r wide
        B = B @ G.T @ G
    B, A = B.to(dtype).to(device), A.to(dtype).to(device)
    U, S, V = ops.factored_svd(B, A, rank)
    _check_factored(B, A, rank, U, S, V)
    Ue, Se, Ve = ref.factored_svd_ref(B, A, rank)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(d(U), Ue, rtol=0, atol=tol)
    torch.testing.assert_close(d(V), Ve, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_svd_rank_deficient_factors(dtype, device):
    m, r, n, true_rank = 30, 8, 25, 3
    B = (torch.randn(m, true_rank, dtype=torch.float64) @ torch.randn(true_rank, r, dtype=torch.float64))
    A = torch.randn(r, n, dtype=torch.float64)
    A[5:] = A[:3] * 2  # A rank-deficient as well
    B, A = B.to(dtype).to(device), A.to(dtype).to(device)
    U, S, V = ops.factored_svd(B, A)
    assert U.shape == (m, r) and torch.isfinite(U).all() and torch.isfinite(V).all()
    _check_factored(B, A, None, U, S, V)
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    assert (d(S)[true_rank:] <= 10 * eps * d(S)[0]).all()
    U3, S3, V3 = ops.factored_svd(B, A, true_rank)
    _check_factored(B, A, true_rank, U3, S3, V3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_svd_zero_factor(dtype, device):
    B = torch.zeros(10, 4, dtype=dtype, device=device)
    A = torch.randn(4, 6, dtype=dtype, device=device)
    U, S, V = ops.factored_svd(B, A, 2)
    assert (S == 0).all()
    assert ref.orthonormality_error(U) <= ORTHO_TOL[dtype]
    assert ref.orthonormality_error(V) <= ORTHO_TOL[dtype]


def test_factored_svd_mixed_dtypes_promote(device):
    B = torch.randn(12, 4, dtype=torch.float32, device=device)
    A = torch.randn(4, 9, dtype=torch.float64, device=device)
    U, S, V = ops.factored_svd(B, A)
    assert U.dtype == S.dtype == V.dtype == torch.float64
    _check_factored(B, A, None, U, S, V)


@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_svd_non_contiguous(dtype, device):
    Bb = torch.randn(6, 30, dtype=dtype, device=device)
    Ab = torch.randn(40, 6, dtype=dtype, device=device)
    B, A = Bb.t(), Ab.t()[:, ::2]  # (30, 6), (6, 20)
    U, S, V = ops.factored_svd(B, A)
    _check_factored(B, A, None, U, S, V)
    Uc, Sc, Vc = ops.factored_svd(B.contiguous(), A.contiguous())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(S, Sc, rtol=tol, atol=tol)
    torch.testing.assert_close((d(U) * d(S)) @ d(V).T, (d(Uc) * d(Sc)) @ d(Vc).T, rtol=0,
                               atol=tol * d(Sc)[0].item())


def test_factored_svd_agrees_with_rsvd_on_product():
    B, A = torch.randn(60, 5, dtype=torch.float64), torch.randn(5, 45, dtype=torch.float64)
    U, S, V = ops.factored_svd(B, A, 4)
    Ur, Sr, Vr = ops.rsvd(B @ A, 4)
    torch.testing.assert_close(S, Sr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U, Ur, rtol=0, atol=1e-8)
    torch.testing.assert_close(V, Vr, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# autograd: project and reconstruct are linear, their derivatives come from the factors


@pytest.mark.parametrize("lead", [(), (2,)])
def test_project_and_reconstruct_gradients(lead, device):
    """gradcheck (float64) against finite differences, for every argument, batched or not; the same
    gradient under torch.compile (it used to vanish there)."""
    d = dict(dtype=torch.float64, device=device)
    U, V = torch.randn(*lead, 7, 3, **d), torch.randn(*lead, 5, 4, **d)
    B, A, C = torch.randn(*lead, 7, 2, **d), torch.randn(*lead, 2, 5, **d), torch.randn(*lead, 3, 4, **d)
    args = [t.requires_grad_() for t in (U, V, B, A)]
    assert torch.autograd.gradcheck(lambda U, V, B, A: ops.project(U, V, B, A, 1.7), args)
    assert torch.autograd.gradcheck(lambda U, C, V: ops.reconstruct(U, C, V), (U, C.requires_grad_(), V))
    Bc = B.detach().clone().requires_grad_()
    f = torch.compile(lambda B: ops.project(U.detach(), V.detach(), B, A.detach(), 1.7).sum(), backend="aot_eager")
    f(Bc).backward()
    Be = B.detach().clone().requires_grad_()
    ops.project(U.detach(), V.detach(), Be, A.detach(), 1.7).sum().backward()
    torch.testing.assert_close(Bc.grad, Be.grad)


def test_project_and_reconstruct_second_derivatives_broadcasting_and_gradient_dtypes(device):
    """The derivatives (C++ autograd functions since they left torch.library's Python layer, which cost
    ~10 us a call): second derivatives, batch dimensions broadcast between the arguments (a gradient is
    summed back to its argument's shape), half-precision factors getting gradients in their own dtype."""
    d = dict(dtype=torch.float64, device=device)
    U, V, B, A = torch.randn(2, 7, 3, **d), torch.randn(5, 4, **d), torch.randn(7, 2, **d), torch.randn(1, 2, 5, **d)
    args = [t.requires_grad_() for t in (U, V, B, A)]
    assert torch.autograd.gradgradcheck(lambda U, V, B, A: ops.project(U, V, B, A, -0.6), args)
    C = torch.randn(2, 3, 4, **d).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda U, C, V: ops.reconstruct(U, C, V), (U, C, V))
    gU, gV, gB, gA = torch.autograd.grad(ops.project(U, V, B, A, -0.6).square().sum(), args)
    wU, wV, wB, wA = torch.autograd.grad((-0.6 * U.mT @ B @ A @ V).square().sum(), args)
    for got, want, t in ((gU, wU, U), (gV, wV, V), (gB, wB, B), (gA, wA, A)):
        assert got.shape == t.shape
        torch.testing.assert_close(got, want)
    f32 = dict(device=device)
    Uf, Vf = torch.randn(7, 3, **f32, requires_grad=True), torch.randn(5, 4, **f32, requires_grad=True)
    Bh = torch.randn(7, 2, **f32).to(torch.bfloat16).requires_grad_()
    Ah = torch.randn(2, 5, **f32).to(torch.float16).requires_grad_()
    ops.project(Uf, Vf, Bh, Ah, 2.0).sum().backward()
    assert Bh.grad.dtype == torch.bfloat16 and Ah.grad.dtype == torch.float16 and Uf.grad.dtype == torch.float32
    G = torch.full((3, 4), 2.0, dtype=torch.float64, device=device)
    torch.testing.assert_close(Bh.grad.double(), Uf.detach().double() @ G @ (Ah.detach().double()
                                                                           @ Vf.detach().double()).mT,
                               atol=0.05, rtol=1e-2)


@pytest.mark.parametrize("lead", [(), (2,)])
def test_project_and_reconstruct_under_forward_ad_and_torch_func(lead, device):
    """torch.library registers a backward only: forward AD through project / reconstruct gave zero tangents
    (torch.func.jvp) or None (forward_ad) without a word, and torch.func.grad raised. Both ops are linear
    in every argument, so a tangent (or a gradient) is the op applied to it: checked against the float64
    reference of the same formula."""
    from torch.func import grad, jacfwd, jacrev, jvp, vmap
    import torch.autograd.forward_ad as fwad
    d = dict(dtype=torch.float64, device=device)
    U, V = torch.randn(*lead, 7, 3, **d), torch.randn(*lead, 5, 4, **d)
    B, A, C = torch.randn(*lead, 7, 2, **d), torch.randn(*lead, 2, 5, **d), torch.randn(*lead, 3, 4, **d)
    tB, tA, tC = torch.randn_like(B), torch.randn_like(A), torch.randn_like(C)
    _, tangent = jvp(lambda b, a: ops.project(U, V, b, a, 1.7), (B, A), (tB, tA))
    want = ref.project_ref(U, V, tB, A, 1.7) + ref.project_ref(U, V, B, tA, 1.7)
    torch.testing.assert_close(tangent.cpu(), want)
    _, tangent = jvp(lambda c: ops.reconstruct(U, c, V), (C,), (tC,))
    torch.testing.assert_close(tangent.cpu(), ref.reconstruct_ref(U, tC, V))
    with fwad.dual_level():
        out = ops.reconstruct(U, fwad.make_dual(C, tC), V)
        torch.testing.assert_close(fwad.unpack_dual(out).tangent.cpu(), ref.reconstruct_ref(U, tC, V))
        torch.testing.assert_close(fwad.unpack_dual(out).primal, ops.reconstruct(U, C, V))
    g = grad(lambda b: ops.project(U, V, b, A, 1.7).square().sum())(B)
    Bg = B.clone().requires_grad_()
    ops.project(U, V, Bg, A, 1.7).square().sum().backward()
    torch.testing.assert_close(g, Bg.grad)
    if not lead:
        torch.testing.assert_close(jacfwd(lambda c: ops.reconstruct(U, c, V))(C),
                                   jacrev(lambda c: ops.reconstruct(U, c, V))(C))
    batched = vmap(lambda u, b: ops.project(u, V[0] if lead else V, b, A[0] if lead else A, 0.5))(
        U.reshape(-1, *U.shape[-2:]), B.reshape(-1, *B.shape[-2:]))
    torch.testing.assert_close(batched[0], ops.project(U.reshape(-1, 7, 3)[0], V[0] if lead else V,
                                                       B.reshape(-1, 7, 2)[0], A[0] if lead else A, 0.5))
    # under autocast the stand-in computes in the bases' dtype as the op does (it ran in bfloat16: 4e-3 off)
    f32 = dict(dtype=torch.float32, device=device)
    U32, V32, B32, A32, C32 = (t.to(**f32) for t in (U, V, B, A, C))
    with torch.autocast(device.type if isinstance(device, torch.device) else torch.device(device).type,
                        dtype=torch.bfloat16):
        out, tangent = jvp(lambda b: ops.project(U32, V32, b, A32, 1.7), (B32,), (tB.to(**f32),))
        rec, _ = jvp(lambda c: ops.reconstruct(U32, c, V32), (C32,), (C32,))
    assert out.dtype == tangent.dtype == rec.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref.project_ref(U, V, B, A, 1.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tangent.double().cpu(), ref.project_ref(U, V, tB, A, 1.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.double().cpu(), ref.reconstruct_ref(U, C, V), atol=1e-5, rtol=1e-5)
    meta = [torch.empty_like(t, device="meta") for t in (U32, V32, B32, A32)]   # no autocast there: not asked
    assert jvp(lambda b: ops.project(meta[0], meta[1], b, meta[3], 1.7), (meta[2],), (meta[2],))[1].is_meta
    with pytest.raises(TypeError, match="scaling is a constant of the op"):
        ops.project(U, V, B, A, torch.tensor(2.0, requires_grad=True))
    with fwad.dual_level(), pytest.raises(TypeError, match="scaling is a constant of the op"):
        ops.project(U, V, B, A, fwad.make_dual(torch.tensor(2.0, **d), torch.tensor(1.0, **d)))

