"""The batched small SVD (ops.small_svd / _small_svd; rsvd's l x l cores on CUDA) against the
float64 reference (torch.linalg.svd), an op-by-op emulation of the kernel's arithmetic, and
itself across thread counts and devices."""
import pytest
import torch

from subspace_ext import ops
from conftest import CUDA_SKIP_REASON, HAS_CUDA

import reference as ref

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}  # relative to ||A||_2

# (79, 48): the CUDA kernel stages exactly 48 KiB, which needs the opt-in attribute (its static shared
# memory comes on top)
SHAPES = [(1, 1), (3, 1), (1, 3), (2, 2), (5, 5), (7, 3), (3, 7), (17, 16), (16, 17), (33, 33),
          (72, 72), (64, 40), (79, 48), (2, 3, 9, 7), (4, 24, 24)]


def _check(A, U, S, V, tol):
    p, q = A.shape[-2:]
    k = min(p, q)
    assert U.shape == (*A.shape[:-2], p, k) and S.shape == (*A.shape[:-2], k)
    assert V.shape == (*A.shape[:-2], q, k)
    assert U.dtype == S.dtype == V.dtype == A.dtype and U.device == A.device
    Ad, Ud, Sd, Vd = (t.detach().cpu().double() for t in (A, U, S, V))
    _, S_ref, _ = ref.svd_ref(Ad)
    scale = max(S_ref.max().item() if S_ref.numel() else 0.0, 1e-300)
    assert (Sd - S_ref).abs().max().item() <= tol * scale * 4
    assert (Sd[..., :-1] >= Sd[..., 1:]).all()  # exactly descending
    eye = torch.eye(k, dtype=torch.float64)
    assert (Ud.mT @ Ud - eye).abs().max().item() <= tol * 20
    assert (Vd.mT @ Vd - eye).abs().max().item() <= tol * 20
    assert ((Ud * Sd.unsqueeze(-2)) @ Vd.mT - Ad).abs().max().item() <= tol * scale * 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_small_svd_matches_reference(shape, dtype, device):
    A = torch.randn(shape, dtype=dtype, device=device)
    U, S, V = ops.small_svd(A)
    _check(A, U, S, V, TOL[dtype])


def test_small_svd_singular_vectors_match_reference(device):
    # well separated singular values: the vectors are unique up to sign
    p, q = 30, 12
    Q1 = torch.linalg.qr(torch.randn(p, q, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(q, q, dtype=torch.float64))[0]
    S0 = torch.logspace(2, -3, q, dtype=torch.float64)
    A = (Q1 * S0) @ Q2.T
    U, S, V = ops.small_svd(A.to(device))
    U_ref, S_ref, V_ref = ref.svd_ref(A)
    sign = torch.sign((U.cpu() * U_ref).sum(0))
    assert torch.allclose(S.cpu(), S_ref, rtol=1e-12, atol=1e-14 * S_ref[0])
    assert torch.allclose(U.cpu() * sign, U_ref, atol=1e-10)
    assert torch.allclose(V.cpu() * sign, V_ref, atol=1e-10)


# Rows: fewer than small_svd::kParts (16) partials, whole blocks of 16 plus an even (40) or odd (37)
# last block: the CPU's vector partials against the emulation's plain 16-partial order.
@pytest.mark.parametrize("shape", [(6, 5), (5, 6), (4, 4), (9, 2), (37, 5), (40, 17), (7, 32)], ids=str)
def test_small_svd_bit_exact_against_op_by_op_emulation(shape, device):
    A = torch.randn(shape, dtype=torch.float64)
    A[..., 0] *= 1e3  # unequal column scales: more sweeps, both branches of the rotation
    U, S, V = ops.small_svd(A.to(device))
    if shape[0] >= shape[1]:
        U_e, S_e, V_e = ref.small_svd_jacobi_emulation(A)
    else:  # the kernel works on A^T = V S U^T
        V_e, S_e, U_e = ref.small_svd_jacobi_emulation(A.T)
    assert torch.equal(S.cpu(), S_e) and torch.equal(U.cpu(), U_e) and torch.equal(V.cpu(), V_e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_svd_rank_deficient_gets_orthonormal_factors(dtype, device):
    A = torch.zeros(3, 8, 6, dtype=dtype)
    A[1] = torch.outer(torch.randn(8), torch.randn(6)).to(dtype)  # rank 1
    A[2, :, 1] = torch.randn(8).to(dtype)  # five exactly zero columns
    U, S, V = ops.small_svd(A.to(device))
    _check(A.to(device), U, S, V, TOL[dtype])
    assert torch.equal(S[0].cpu(), torch.zeros(6, dtype=dtype))
    assert (S[2, 1:] == 0).all()


def test_small_svd_repeated_and_extreme_scales(device):
    Q = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    for scale in (1e-200, 3.0, 1e200):
        A = (Q * scale).to(device)  # all singular values equal
        U, S, V = ops.small_svd(A)
        assert torch.allclose(S.cpu(), torch.full((10,), scale, dtype=torch.float64), rtol=1e-13)
        _check(A, U, S, V, TOL[torch.float64])


def test_small_svd_near_float64_max(device):
    """Entries near DBL_MAX: S is finite wherever the true singular value is (the scale-back by 2^e
    must not overflow on its own)."""
    A = torch.tensor([[1.5e308]], dtype=torch.float64, device=device)
    U, S, V = ops.small_svd(A)
    assert S.item() == 1.5e308 and U.abs().item() == 1.0 and V.abs().item() == 1.0
    B = torch.diag(torch.tensor([1.7e308, 1e308, 1e300], dtype=torch.float64)).to(device)
    assert torch.equal(ops.small_svd(B)[1].cpu(), torch.tensor([1.7e308, 1e308, 1e300], dtype=torch.float64))


def test_small_svd_non_contiguous_input_untouched(device):
    base = torch.randn(3, 20, 14, dtype=torch.float64, device=device)
    A = base.mT[:, ::2, :]  # 3 x 7 x 20 view with odd strides
    before = base.clone()
    U, S, V = ops.small_svd(A)
    assert torch.equal(base, before)
    _check(A, U, S, V, TOL[torch.float64])
    U2, S2, V2 = ops.small_svd(A.contiguous())
    assert torch.equal(S, S2) and torch.equal(U, U2) and torch.equal(V, V2)


def test_small_svd_thread_count_invariant():
    A = torch.randn(13, 40, 40, dtype=torch.float64)
    torch.set_num_threads(1)
    one = ops.small_svd(A)
    torch.set_num_threads(2)
    two = ops.small_svd(A)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_small_svd_empty_batch_and_matrix(device):
    U, S, V = ops.small_svd(torch.randn(0, 5, 4, device=device))
    assert U.shape == (0, 5, 4) and S.shape == (0, 4) and V.shape == (0, 4, 4)
    U, S, V = ops.small_svd(torch.randn(2, 5, 0, device=device))
    assert U.shape == (2, 5, 0) and S.shape == (2, 0) and V.shape == (2, 0, 0)


def test_small_svd_errors():
    """The kernel's messages name the public op, small_svd (they said _small_svd, the registered name)."""
    with pytest.raises(ValueError, match="A must have at least 2 dimensions"):
        ops.small_svd(torch.randn(5))
    with pytest.raises(TypeError, match="A must have dtype"):
        ops.small_svd(torch.ones(3, 3, dtype=torch.int64))
    bad = torch.randn(2, 4, 4)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="^small_svd: A contains NaN or Inf"):
        ops.small_svd(bad)
    with pytest.raises(ValueError, match="^small_svd: matrices of at most 4096"):
        ops.small_svd(torch.empty(4097, 1))
    with pytest.raises(TypeError, match="^small_svd: A"):
        torch.ops.subspace_ext._small_svd(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (96, 72, 72), (5, 130, 129),
                                   (2, 120, 120), (2, 121, 121)], ids=str)   # 120: the last staged square
def test_small_svd_cuda_bit_identical_to_cpu(shape):
    A = torch.randn(shape, dtype=torch.float64)
    A[..., :1, :] *= 1e4
    cpu = ops.small_svd(A)
    gpu = ops.small_svd(A.cuda())
    assert all(torch.equal(g.cpu(), c) for g, c in zip(gpu, cpu))
