"""The SOLAR ops (solar_basis, solar_checksum, solar_decode) against their float64 references in
reference.py, on every device present: odd and degenerate shapes, signed and large seeds, half
precision inputs, int32 indices, empty coefficient sets; and base weights with tied singular values
or a null space, whose bases must depend on W0's subspaces and the seed only. The methods' own tests (test_solar*.py)
cover packages, files and the CLI."""
import pytest
import torch

from subspace_ext import ops

import reference as ref

SEED = 2**40 + 5  # both halves of the Philox key in use


def _orthonormal(rows, cols, device, generator):
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator)).Q.to(device)


@pytest.mark.parametrize("m,n,eps,dtype", [
    *((m, n, eps, dtype) for m, n in [(40, 64), (64, 40), (33, 33), (1, 7), (9, 1)] for eps in (0.0, 0.3)
      for dtype in (torch.float32, torch.float64, torch.bfloat16)),
    (620, 90, 0.3, torch.float32),  # a 530-column completion and a 620 x 620 perturbation
])
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


# ---------------------------------------------------------------------------------------------
# tied singular values: LAPACK returns any rotation of their vectors (and any basis of a null
# space), so the op resolves them with the seed; the bases depend on W0's subspaces only

def _orth(d, g):
    return torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g)).Q


def _product(m, r, n, g):
    """A random m x n matrix of rank r, in float64."""
    return torch.randn(m, r, dtype=torch.float64, generator=g) @ torch.randn(r, n, dtype=torch.float64, generator=g)


def _with_spectrum(m, n, s, g, right=None):
    """P[:, :k] diag(s) R^T (k = len(s)) with random orthogonal P, R (R given: right)."""
    k = len(s)
    R = _orth(n, g) if right is None else right
    return _orth(m, g)[:, :k] @ torch.diag(torch.as_tensor(s, dtype=torch.float64)) @ R[:, :k].T


def _degenerate(name, g):
    if name == "rank 3 of 40 x 25":
        return _product(40, 3, 25, g)
    if name == "rank 2 of 17 x 30, float32":
        return (torch.randn(17, 2, generator=g) @ torch.randn(2, 30, generator=g)).double()
    if name == "orthogonal 24 x 24":
        return _orth(24, g)
    if name == "tied block 30 x 20":
        s = torch.linspace(9, 1, 20, dtype=torch.float64)
        s[4:9] = 5.0                        # 5 tied values in the middle
        s[12:14] = s[11] * (1 - 2e-9)       # a near-tie (gap 2e-9 of the largest) chained to it
        return _with_spectrum(30, 20, s, g)
    if name == "zero 6 x 4":
        return torch.zeros(6, 4, dtype=torch.float64)
    if name == "eye 9 x 12":
        return torch.eye(9, 12, dtype=torch.float64)
    raise KeyError(name)


DEGENERATE = ["rank 3 of 40 x 25", "rank 2 of 17 x 30, float32", "orthogonal 24 x 24", "tied block 30 x 20",
              "zero 6 x 4", "eye 9 x 12"]


@pytest.mark.parametrize("name", DEGENERATE)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_solar_basis_with_ties_matches_float64_reference(name, eps, device):
    W0 = _degenerate(name, torch.Generator().manual_seed(len(name)))
    U, V = ops.solar_basis(W0.to(device), SEED, 2, eps)
    U_ref, V_ref = ref.solar_basis_ref(W0, SEED, 2, eps)
    m, n = W0.shape
    assert U.shape == (m, m) and V.shape == (n, n)
    eye = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(U.cpu().T @ U.cpu(), eye[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(V.cpu().T @ V.cpu(), eye[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(U.cpu(), U_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(V.cpu(), V_ref, rtol=0, atol=1e-9)


def _same_basis(a, b, cols=None):
    for x, y in zip(a, b):
        x, y = (x, y) if cols is None else (x[:, cols], y[:, cols])
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=1e-10)


def test_solar_basis_of_tied_values_depends_on_the_subspaces_only(device):
    """Different matrices with the same tied subspaces give the same bases there. Before the op
    resolved ties, each of these differed by O(1): LAPACK's vectors for a tie depend on the matrix
    (and on the library, the thread count, the device)."""
    g = torch.Generator().manual_seed(11)
    basis = lambda W: ops.solar_basis(W.to(device), SEED, 1, 0.0)
    # two orthogonal matrices: every value tied, the whole spaces are the subspaces
    _same_basis(basis(_orth(20, g)), basis(_orth(20, g)))
    # rank 4: the null spaces are the same for X Y and X (M Y), though the kept vectors are not
    X, Y, M = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((33, 4), (4, 26), (4, 4)))
    (U1, V1), (U2, V2) = basis(X @ Y), basis(X @ (M @ Y))
    _same_basis((U1, V1), (U2, V2), cols=slice(4, None))
    assert (U1[:, :4] - U2[:, :4]).abs().max() > 0.01
    # a tied block rotated on one side: another matrix, the same subspaces on both sides
    s = torch.linspace(6, 1, 12, dtype=torch.float64)
    s[3:7] = 4.0
    R = _orth(12, g)
    rot = torch.eye(12, dtype=torch.float64)
    rot[3:7, 3:7] = _orth(4, g)
    W1 = _with_spectrum(15, 12, s, torch.Generator().manual_seed(5), right=R)
    W2 = _with_spectrum(15, 12, s, torch.Generator().manual_seed(5), right=R @ rot)
    assert (W1 - W2).abs().max() > 0.1
    _same_basis(basis(W1), basis(W2))


@pytest.mark.parametrize("shape,rank", [((300, 200), 8), ((150, 260), 5), ((200, 200), 200)])
def test_solar_basis_with_ties_is_independent_of_thread_count(shape, rank):
    """Large enough for LAPACK to split its work over threads: rank 8 of 300 x 200 gave bases 1.07
    apart with 1 and 2 threads before ties were resolved."""
    g = torch.Generator().manual_seed(rank)
    W0 = _orth(shape[0], g) if rank == shape[0] == shape[1] else _product(shape[0], rank, shape[1], g)
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(ops.solar_basis(W0, SEED, 0, 0.1))
    _same_basis(*out)


@pytest.mark.parametrize("structure", ["mirror", "hadamard"])
def test_solar_basis_signs_of_sign_symmetric_weights_are_independent_of_thread_count(structure):
    """The sign rule (largest |entry| of U[:, j] positive) was decided by rounding where structure makes the two
    largest entries equal and opposite in every singular vector ([W; -W], a Hadamard-like W0): 1 and 2 threads
    (or another CPU's LAPACK) flipped columns, and a receiver with the sender's exact base was refused."""
    g = torch.Generator().manual_seed(0)
    if structure == "mirror":
        W = torch.randn(64, 96, generator=g, dtype=torch.float64)
        W0 = torch.cat([W, -W])
    else:
        H = torch.ones(1, 1, dtype=torch.float64)
        for _ in range(7):
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
        W0 = H[:, :64] * torch.linspace(1, 2, 64, dtype=torch.float64)
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(ops.solar_basis(W0, SEED, 0, 0.0))
    (U1, V1), (U2, V2) = out
    assert int(((U1 * U2).sum(0) < 0).sum()) == 0 and int(((V1 * V2).sum(0) < 0).sum()) == 0
    torch.testing.assert_close(U1, U2, rtol=0, atol=1e-10)
    torch.testing.assert_close(V1, V2, rtol=0, atol=1e-10)


def test_solar_basis_keeps_singular_vectors_apart_from_ties():
    """Untied values keep their singular vectors (W0 v_j = s_j u_j), ties inside their subspace."""
    s = torch.tensor([5.0, 4.0, 4.0, 4.0 * (1 - 1e-6), 1.0, 1e-12, 0.0], dtype=torch.float64)  # 1e-6: no tie
    W0 = _with_spectrum(10, 8, s, torch.Generator().manual_seed(2))
    U, V = ops.solar_basis(W0, SEED, 0, 0.0)
    for j in (0, 3, 4):
        torch.testing.assert_close(W0 @ V[:, j], s[j] * U[:, j], rtol=0, atol=1e-12)
    tied = U[:, 1:3]  # the tied pair spans the same plane as W0's vectors for 4.0
    torch.testing.assert_close(tied @ tied.T @ W0 @ V[:, 1:3], W0 @ V[:, 1:3], rtol=0, atol=1e-12)
    # 1e-12 and 0 are a null space: their directions are the seed's completion, orthogonal to the rest
    U_ref, V_ref = ref.solar_basis_ref(W0, SEED, 0)
    torch.testing.assert_close(U[:, 5:], U_ref[:, 5:], rtol=0, atol=1e-10)


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


@pytest.mark.parametrize("stream", [-1, 2**61, 2**62, 2**63, 2**64 - 1])
def test_solar_ops_refuse_streams_out_of_range(stream):
    """Each layer takes Philox streams 4 * stream + 0..3: beyond 2^61 they wrap (2^62 gave stream
    0's checksum) and 4 * stream overflows int64, so all three ops refuse such a stream, naming the value given
    (the kernel's check showed it read as signed: -1 for 2^64 - 1) and why."""
    U = torch.eye(5, dtype=torch.float64)
    tail = rf"stream must be in \[0, 2\^61\) \(a layer takes the Philox streams 4·stream \+ 0..3\), got {stream}$"
    with pytest.raises(ValueError, match=f"solar_basis: {tail}"):
        ops.solar_basis(torch.randn(5, 5), 1, stream)
    with pytest.raises(ValueError, match=f"solar_checksum: {tail}"):
        ops.solar_checksum(U, U, 1, stream)
    with pytest.raises(ValueError, match=f"solar_decode: {tail}"):
        ops.solar_decode(U, U, torch.ones(1), torch.zeros(1, dtype=torch.long), 1, 1.0, 1, stream)
    with pytest.raises(ValueError, match=r"solar_basis: stream must be in \[0, 2\^61\)"):   # the kernel's own check
        torch.ops.subspace_ext.solar_basis(torch.randn(5, 5), 1, stream - 2**64 if stream >= 2**63 else stream, 0.0)


def test_solar_ops_refuse_a_meta_argument_beside_real_ones():
    """One argument on meta sent the call to the fake kernel, which returned uninitialised memory on the
    CPU as the checksum or the factors; the package's numbers may stay on the CPU beside CUDA bases."""
    U, meta = torch.eye(6, 4, dtype=torch.float64), torch.empty(5, 3, dtype=torch.float64, device="meta")
    values, indices = torch.ones(2), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="arguments must be on one device, got UI on cpu, VJ on meta"):
        ops.solar_checksum(U, meta, 1, 0)
    with pytest.raises(ValueError, match="arguments must be on one device, got U on cpu, V on meta"):
        ops.solar_decode(U, meta, values, indices, 2, 1.0, 1, 0)
    for name, args in (("values", (values.to("meta"), indices)), ("indices", (values, indices.to("meta")))):
        with pytest.raises(ValueError, match=f"solar_decode: {name} is on meta, U and V on cpu"):
            ops.solar_decode(U, torch.eye(5, 3, dtype=torch.float64), *args, 2, 1.0, 1, 0)
    B, A, ck = ops.solar_decode(U.to("meta"), meta, values, indices, 2, 1.0, 1, 0)   # all-meta bases: shapes only
    assert B.is_meta and B.shape == (6, 2) and A.shape == (2, 5)
