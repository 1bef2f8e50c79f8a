"""The SOLAR ops (solar_basis, solar_checksum, solar_decode) against their float64 references in
reference.py, on every device present: odd and degenerate shapes, signed and large seeds, half
precision inputs, int32 indices, empty coefficient sets. The methods' own tests (test_solar*.py)
cover packages, files and the CLI."""
import pytest
import torch

from subspace_ext import ops

import reference as ref

SEED = 2**40 + 5  # both halves of the Philox key in use


def _orthonormal(rows, cols, device, generator):
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator)).Q.to(device)


@pytest.mark.parametrize("m,n", [(40, 64), (64, 40), (33, 33), (1, 7), (9, 1)])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_solar_basis_matches_float64_reference(m, n, eps, dtype, device):
    g = torch.Generator().manual_seed(m * 100 + n)
    W0 = torch.randn(m, n, dtype=torch.float64, generator=g).to(dtype)
    U, V = ops.solar_basis(W0.to(device), SEED, 3, eps)
    U_ref, V_ref = ref.solar_basis_ref(W0, SEED, 3, eps)
    assert U.dtype == V.dtype == torch.float64 and U.device.type == V.device.type == device
    assert U.shape == (m, m) and V.shape == (n, n)
    torch.testing.assert_close(U.cpu(), U_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(V.cpu(), V_ref, rtol=0, atol=1e-9)


def test_solar_basis_stream_and_seed_pick_the_completion_and_noise():
    """Another stream or seed changes the random part (the completion, the perturbation) and only it."""
    W0 = torch.randn(12, 20, dtype=torch.float64)
    U, V = ops.solar_basis(W0, 7, 0, 0.0)
    for seed, stream in ((7, 1), (8, 0)):
        U2, V2 = ops.solar_basis(W0, seed, stream, 0.0)
        assert torch.equal(U2, U) and torch.equal(V2[:, :12], V[:, :12])  # square U: no completion
        assert (V2[:, 12:] - V[:, 12:]).abs().max() > 0.1
        torch.testing.assert_close(V2, ref.solar_basis_ref(W0, seed, stream)[1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("rows,cols", [(30, 4), (7, 1), (5, 5), (11, 0)])
@pytest.mark.parametrize("seed,stream", [(SEED, 2), (-1, 0), (0, 5)])
def test_solar_checksum_matches_float64_reference(rows, cols, seed, stream, device):
    g = torch.Generator().manual_seed(rows + cols)
    UI = torch.randn(rows, cols, dtype=torch.float64, generator=g).to(device)
    VJ = torch.randn(rows + 3, cols + 1, dtype=torch.float64, generator=g).to(device)
    c = ops.solar_checksum(UI, VJ, seed, stream)
    assert c.shape == (2,) and c.dtype == torch.float64 and c.device.type == device
    torch.testing.assert_close(c.cpu(), ref.solar_checksum_ref(UI, VJ, seed, stream), rtol=1e-12, atol=1e-12)
    if cols:  # a flipped used vector changes the left number
        flipped = UI.clone()
        flipped[:, -1] *= -1
        assert ops.solar_checksum(flipped, VJ, seed, stream)[0] != c[0]


@pytest.mark.parametrize("m,n,k1,k2,nnz,rank", [
    (30, 20, 12, 9, 25, 4),    # the usual: sparse coefficients, a rank below |I| and |J|
    (17, 40, 17, 40, 60, 3),   # complete bases
    (9, 31, 5, 7, 6, 8),       # rank above min(|I|, |J|): zero-padded factors
    (13, 1, 6, 1, 4, 1),       # one column: rank 1 at most
    (25, 25, 10, 10, 1, 2),    # a single coefficient
])
@pytest.mark.parametrize("vdtype,idtype", [(torch.float32, torch.int64), (torch.float16, torch.int32)])
def test_solar_decode_matches_float64_reference(m, n, k1, k2, nnz, rank, vdtype, idtype, device):
    g = torch.Generator().manual_seed(m * n + nnz)
    U, V = _orthonormal(m, k1, device, g), _orthonormal(n, k2, device, g)
    indices = torch.randperm(k1 * k2, generator=g)[:nnz].to(idtype)
    values = torch.randn(nnz, generator=g).to(vdtype)
    B, A, ck = ops.solar_decode(U, V, values, indices, rank, 0.25, SEED, 6)
    B_ref, A_ref, ck_ref = ref.solar_decode_ref(U, V, values, indices, rank, 0.25, SEED, 6)
    assert B.shape == (m, rank) and A.shape == (rank, n) and B.device.type == device
    torch.testing.assert_close(B.cpu(), B_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(A.cpu(), A_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(ck.cpu(), ck_ref, rtol=1e-12, atol=1e-12)


def test_solar_decode_empty_coefficients(device):
    U, V = torch.eye(6, 4, dtype=torch.float64, device=device), torch.eye(5, 3, dtype=torch.float64, device=device)
    B, A, ck = ops.solar_decode(U, V, torch.empty(0), torch.empty(0, dtype=torch.long), 2, 1.0, 3, 0)
    assert B.shape == (6, 2) and A.shape == (2, 5) and not B.any() and not A.any()
    torch.testing.assert_close(ck.cpu(), ref.solar_checksum_ref(U[:, :0], V[:, :0], 3, 0))


def test_solar_decode_bases_wider_than_tall(device):
    """More basis vectors than rows (not a SOLAR basis, but the op takes any matrices): the update
    has rank <= min(m, n), so the factors carry that many and are zero-padded, as the reference
    says; before, factored_svd refused the rank with a message naming itself."""
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(4, 6, dtype=torch.float64, generator=g), torch.randn(9, 7, dtype=torch.float64, generator=g)
    indices, values = torch.randperm(42, generator=g)[:30], torch.randn(30, dtype=torch.float64, generator=g)
    B, A, _ = ops.solar_decode(U.to(device), V.to(device), values, indices, 6, 0.5, SEED, 1)
    B_ref, A_ref, _ = ref.solar_decode_ref(U, V, values, indices, 6, 0.5, SEED, 1)
    assert B.shape == (4, 6) and not B[:, 4:].any()
    torch.testing.assert_close(B.cpu(), B_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(A.cpu(), A_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("stream", [-1, 2**61, 2**62])
def test_solar_ops_refuse_streams_out_of_range(stream):
    """Each layer takes Philox streams 4 * stream + 0..3: beyond 2^61 they wrap (2^62 gave stream
    0's checksum) and 4 * stream overflows int64, so all three ops refuse such a stream."""
    U = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"solar_basis: stream must be in \[0, 2\^61\)"):
        ops.solar_basis(torch.randn(5, 5), 1, stream)
    with pytest.raises(ValueError, match=r"solar_checksum: stream must be in \[0, 2\^61\)"):
        ops.solar_checksum(U, U, 1, stream)
    with pytest.raises(ValueError, match=r"solar_decode: stream must be in \[0, 2\^61\)"):
        ops.solar_decode(U, U, torch.ones(1), torch.zeros(1, dtype=torch.long), 1, 1.0, 1, stream)
