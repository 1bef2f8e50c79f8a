"""rsvd's orthonormalising transform of Gram matrices (_gram_orth: Cholesky with dropped pivots,
T = R^-1, used by every orthonormalisation of the batched rsvd path) against the float64 reference,
an op-by-op emulation of the kernel's arithmetic, and itself across devices."""
import pytest
import torch

import reference as ref
from conftest import CUDA_SKIP_REASON, HAS_CUDA

_gram_orth = torch.ops.subspace_ext._gram_orth

SHAPES = [(1, 1), (3, 1), (7, 3), (40, 17), (100, 72), (2, 3, 30, 24), (5, 80, 33)]  # Y: (..., m, q)


def _gram(Y):
    return Y.mT @ Y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gram_orth_matches_reference(shape, dtype, device):
    Y = torch.randn(*shape, dtype=torch.float64)
    G = _gram(Y)
    T, complete = _gram_orth(G.to(dtype=dtype, device=device))
    q = shape[-1]
    assert T.shape == G.shape and T.dtype == dtype and T.device.type == device
    assert complete.shape == shape[:-2] and complete.dtype == torch.bool and complete.all()
    T = T.cpu().double()
    assert torch.equal(T.tril(-1), torch.zeros_like(T))  # exactly upper triangular
    want = ref.gram_orth_ref(G.to(dtype).double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-11}[dtype]
    assert (T - want).abs().max().item() <= tol * want.abs().max().item()
    eye = torch.eye(q, dtype=torch.float64)
    assert (_gram(Y @ T) - eye).abs().max().item() <= tol * 10


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("q", [72, 73, 76, 77, 167, 168])
def test_gram_orth_cuda_bit_identical_to_cpu_at_the_staging_limits(q):
    """The kernel works in shared memory up to q = 167 (227 KiB of an H100/H200), in global memory beyond, and
    opts in above the 48 KiB default (near q = 77): the CPU's bits on each side of both, a dropped pivot included."""
    Y = torch.randn(3, q + 5, q, dtype=torch.float64)
    Y[1, :, q // 2] = Y[1, :, 0] * 3.0
    G = _gram(Y)
    T, complete = _gram_orth(G)
    T_gpu, complete_gpu = _gram_orth(G.cuda())
    assert torch.equal(T_gpu.cpu(), T) and torch.equal(complete_gpu.cpu(), complete)


@pytest.mark.parametrize("q", [1, 2, 5, 16, 33])
def test_gram_orth_bit_exact_against_op_by_op_emulation(q, device):
    Y = torch.randn(q + 4, q, dtype=torch.float64)
    Y[:, q // 2] = Y[:, 0] * 0.5  # one dependent column where q > 1 (column 0 itself where q == 1)
    G = _gram(Y)
    T, complete = _gram_orth(G.to(device))
    T_e, complete_e = ref.gram_orth_emulation(G)
    assert torch.equal(T.cpu(), T_e)
    assert bool(complete) == complete_e == (q == 1)


def test_gram_orth_reads_only_the_upper_triangle(device):
    G = _gram(torch.randn(9, 6, dtype=torch.float64))
    lower_garbage = G.triu() + torch.randn(6, 6, dtype=torch.float64).tril(-1)
    assert torch.equal(_gram_orth(lower_garbage.to(device))[0], _gram_orth(G.to(device))[0])


def test_gram_orth_drops_dependent_and_zero_columns(device):
    """A column in the span of the ones before it (or zero) gets a zero row and column in T; the
    kept columns of Y T are orthonormal and span Y's column space; the flag says incomplete."""
    Y = torch.randn(20, 7, dtype=torch.float64)
    Y[:, 0] = 0.0
    Y[:, 4] = 2.0 * Y[:, 1] - 3.0 * Y[:, 2]
    T, complete = _gram_orth(_gram(Y).to(device))
    T = T.cpu()
    assert not complete
    dropped = torch.tensor([0, 4])
    assert torch.equal(T[dropped], torch.zeros(2, 7, dtype=torch.float64))
    assert torch.equal(T[:, dropped], torch.zeros(7, 2, dtype=torch.float64))
    kept = torch.tensor([1, 2, 3, 5, 6])
    Q = (Y @ T)[:, kept]
    assert (Q.mT @ Q - torch.eye(5, dtype=torch.float64)).abs().max().item() < 1e-12
    residual = Y - Q @ (Q.mT @ Y)  # every column of Y lies in span(Q)
    assert residual.abs().max().item() < 1e-12 * Y.abs().max().item()


def test_gram_orth_pivot_tolerance_is_q_eps_max_diagonal(device):
    """A pivot is dropped at or below q * eps * max_i G[i][i] (the Gram small SVD's test), kept above."""
    eps = torch.finfo(torch.float64).eps
    for factor, kept in ((1.01, True), (0.99, False)):
        G = torch.diag(torch.tensor([1.0, 3.0, 1.0, factor * 4 * eps * 3.0], dtype=torch.float64))
        T, complete = _gram_orth(G.to(device))
        assert bool(complete) == kept and bool(T[3, 3] != 0) == kept


def test_gram_orth_zero_and_scaled_inputs(device):
    """G = 0: every column dropped. Scaling G by 4^s scales T by 2^-s exactly (every operation
    commutes with powers of two away from overflow and underflow)."""
    T, complete = _gram_orth(torch.zeros(2, 4, 4, dtype=torch.float64, device=device))
    assert torch.equal(T.cpu(), torch.zeros(2, 4, 4, dtype=torch.float64)) and not complete.any()
    G = _gram(torch.randn(12, 5, dtype=torch.float64))
    T0 = _gram_orth(G.to(device))[0].cpu()
    for s in (-250, 300):
        assert torch.equal(_gram_orth((G * 4.0 ** s).to(device))[0].cpu(), T0 * 2.0 ** -s)


def test_gram_orth_non_contiguous_input_untouched(device):
    base = _gram(torch.randn(3, 40, 16, dtype=torch.float64))
    base = (0.5 * (base + base.mT)).to(device)  # exactly symmetric (a GEMM's Gram need not be)
    keep = base.clone()
    G = base[:, ::2, ::2]  # the Gram matrices of every other column: strided views
    assert not G.is_contiguous()
    assert torch.equal(_gram_orth(G)[0], _gram_orth(G.contiguous())[0])
    assert torch.equal(_gram_orth(base.mT)[0], _gram_orth(base)[0])  # transposed views
    assert torch.equal(base, keep)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(3, 4), "Gram matrices"),
    (torch.randn(4), "Gram matrices"),
    (torch.full((3, 3), float("nan")), "NaN or Inf"),
    (torch.ones(3, 3, dtype=torch.int32), "float"),
])
def test_gram_orth_rejects_bad_input(bad, match, device):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _gram_orth(bad.to(device))
