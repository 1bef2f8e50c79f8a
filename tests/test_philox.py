import math

import numpy as np
import pytest
import torch

from subspace_ext import ops

import reference as ref

# ---------------------------------------------------------------------------------------------
# the pure-Python reference against the Random123 known-answer vectors

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_reference_philox_known_answers(ctr, key, expected):
    assert ref.philox4x32_10(ctr, key) == expected


def _u32(words):
    return [int(w) & 0xFFFFFFFF for w in words]


def test_kernel_philox_known_answer(device):
    # counter = (block 0, stream 0), key = (seed 0): the first Random123 vector, straight from the kernel
    out = ops.philox_uint32((4,), 0, 0, device=device)
    assert _u32(out.cpu().tolist()) == list(KAT[0][2])


SEEDS = [0, 1, 123456789, 2**32 + 7, 2**63 + 5, 2**64 - 1, -1, -(2**63)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stream", [0, 5, 2**33 + 1, 2**64 - 1])
def test_philox_uint32_matches_reference(seed, stream, device):
    for n in (1, 3, 257):
        got = ops.philox_uint32((n,), seed, stream, device=device).cpu()
        assert torch.equal(got, ref.philox_uint32_ref((n,), seed, stream)), (seed, stream, n)


def test_negative_seed_is_twos_complement():
    # the 64 bits are read as unsigned: -1 and 2**64 - 1 are the same key
    assert torch.equal(ops.philox_uint32((16,), -1, -2), ops.philox_uint32((16,), 2**64 - 1, 2**64 - 2))


@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7), (0,), ()])
def test_philox_uint32_shapes(shape, device):
    out = ops.philox_uint32(shape, 11, 2, device=device)
    assert out.shape == torch.Size(shape) and out.dtype == torch.int32
    assert torch.equal(out.cpu(), ref.philox_uint32_ref(shape, 11, 2))


# ---------------------------------------------------------------------------------------------
# normals vs the float64 Box-Muller reference


def _check_normals(got, expected, dtype):
    got = got.cpu().double().flatten()
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    err = (got - expected).abs() / (1 + expected.abs())
    assert err.max().item() <= tol, (err.max().item(), int(err.argmax()))


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32), (torch.float64, 64)])
@pytest.mark.parametrize("seed,stream", [(0, 0), (42, 7), (2**63 + 5, 1), (2**64 - 1, 2**64 - 1)])
def test_philox_normal_matches_box_muller(dtype, bits, seed, stream, device):
    for n in (1, 3, 257, 2000):
        got = ops.philox_normal((n,), seed, stream, dtype=dtype, device=device)
        assert got.dtype == dtype and got.shape == (n,)
        _check_normals(got, ref.philox_normals_ref(n, seed, stream, bits), dtype)


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32), (torch.float64, 64)])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7)])
def test_philox_normal_shapes_row_major(dtype, bits, shape, device):
    got = ops.philox_normal(shape, 9, 4, dtype=dtype, device=device)
    assert got.shape == torch.Size(shape) and got.is_contiguous()
    _check_normals(got, ref.philox_normals_ref(math.prod(shape), 9, 4, bits), dtype)
    flat = ops.philox_normal((math.prod(shape),), 9, 4, dtype=dtype, device=device)
    assert torch.equal(got.flatten(), flat)


def test_philox_normal_extreme_uniforms():
    """Find blocks whose uniforms are at the edges (u1 tiny -> large |z|, u2 near 0/quadrant
    boundaries) and check the polynomial log/sincos there."""
    n = 40000
    z32 = ops.philox_normal((n,), 3, 0, dtype=torch.float32).double()
    ref32 = ref.philox_normals_ref(n, 3, 0, 32)
    err = (z32 - ref32).abs() / (1 + ref32.abs())
    assert err.max().item() <= 2e-6
    assert ref32.abs().max() > 3.5  # the sample actually reaches the tails
    z64 = ops.philox_normal((n // 2,), 3, 0, dtype=torch.float64)
    ref64 = ref.philox_normals_ref(n // 2, 3, 0, 64)
    err64 = (z64 - ref64).abs() / (1 + ref64.abs())
    assert err64.max().item() <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_normal_thread_count_invariant(dtype):
    n = 100_003  # many grains of the parallel loop, odd tail
    torch.set_num_threads(1)
    a = ops.philox_normal((n,), 77, 3, dtype=dtype)
    u_a = ops.philox_uint32((n,), 77, 3)
    torch.set_num_threads(2)
    b = ops.philox_normal((n,), 77, 3, dtype=dtype)
    u_b = ops.philox_uint32((n,), 77, 3)
    assert torch.equal(a, b)
    assert torch.equal(u_a, u_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_normal_repeatable_and_prefix(dtype, device):
    n = 20_001
    a = ops.philox_normal((n,), 5, 2, dtype=dtype, device=device)
    b = ops.philox_normal((n,), 5, 2, dtype=dtype, device=device)
    assert torch.equal(a, b)
    for k in (1, 2, 3, 5, 4097, 8193, 20_000):
        assert torch.equal(ops.philox_normal((k,), 5, 2, dtype=dtype, device=device), a[:k]), k
    u = ops.philox_uint32((n,), 5, 2, device=device)
    for k in (1, 3, 5, 1001):
        assert torch.equal(ops.philox_uint32((k,), 5, 2, device=device), u[:k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_normal_streams_and_seeds_differ(dtype, device):
    n = 1000
    base = ops.philox_normal((n,), 1, 0, dtype=dtype, device=device)
    others = [ops.philox_normal((n,), 1, 1, dtype=dtype, device=device),
              ops.philox_normal((n,), 2, 0, dtype=dtype, device=device),
              ops.philox_normal((n,), 1, 2**32, dtype=dtype, device=device),
              ops.philox_normal((n,), 2**32 + 1, 0, dtype=dtype, device=device)]
    for o in others:
        assert (o != base).float().mean() > 0.99
        # and they are not trivially related (e.g. shifted copies)
        assert abs(torch.corrcoef(torch.stack([o.double(), base.double()]).cpu())[0, 1]) < 0.15


def test_philox_normal_moments():
    z = ops.philox_normal((1_000_000,), 2024, 1, dtype=torch.float32).double()
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.std().item() - 1) < 5e-3
    # a little more shape: symmetric, normal tails
    assert abs((z ** 3).mean().item()) < 2e-2
    assert abs((z ** 4).mean().item() - 3) < 3e-2
    assert abs((z.abs() < 1).double().mean().item() - 0.6826894921) < 2e-3


def test_philox_normal_moments_float64():
    z = ops.philox_normal((200_000,), 99, 0, dtype=torch.float64)
    assert abs(z.mean().item()) < 1e-2
    assert abs(z.std().item() - 1) < 1e-2
    assert abs((z.abs() < 1).double().mean().item() - 0.6826894921) < 5e-3


# ---------------------------------------------------------------------------------------------
# perturbed_basis


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3), (1, 1), (3, 5), (2, 9, 4), (2, 3, 7)])
def test_perturbed_basis_equals_u_plus_noise(dtype, shape, device):
    U = torch.randn(shape, dtype=dtype, device=device)
    U_before = U.clone()
    out = ops.perturbed_basis(U, 0.05, 31, 2)
    assert torch.equal(U, U_before)  # input untouched
    expected = U + 0.05 * ops.philox_normal(shape, 31, 2, dtype=dtype, device=device)
    assert out.shape == U.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, U)
    # a different stream gives different noise
    assert not torch.allclose(ops.perturbed_basis(U, 0.05, 31, 3), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturbed_basis_non_contiguous_input(dtype, device):
    base = torch.randn(6, 10, dtype=dtype, device=device)
    U = base.t()  # (10, 6) view
    out = ops.perturbed_basis(U, 0.1, 4, 0)
    torch.testing.assert_close(out, ops.perturbed_basis(U.contiguous(), 0.1, 4, 0), rtol=0, atol=0)
    torch.testing.assert_close(out, U + 0.1 * ops.philox_normal((10, 6), 4, 0, dtype=dtype, device=device))


def test_perturbed_basis_zero_eps_is_identity(device):
    U = torch.randn(5, 3, device=device)
    assert torch.equal(ops.perturbed_basis(U, 0.0, 1, 0), U)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(9, 4), (16, 16), (2, 30, 5),
                                   (150, 65), (2, 301, 200),   # l > 64: LAPACK's Householder QR on the
                                   (800, 700)])                # CPU, cuSOLVER's Cholesky on CUDA
def test_perturbed_basis_orthonormalize(dtype, tol, shape, device):
    U = torch.linalg.qr(torch.randn(shape, dtype=torch.float64)).Q.to(dtype).to(device)
    eps = 0.3
    Q = ops.perturbed_basis(U, eps, 8, 1, orthonormalize=True)
    assert Q.shape == U.shape and Q.dtype == dtype
    X = (U.double() + eps * ops.philox_normal(shape, 8, 1, dtype=dtype, device=device).double()).cpu()
    Qd = Q.cpu().double()
    for b in range(Qd.reshape(-1, *shape[-2:]).shape[0]):
        q = Qd.reshape(-1, *shape[-2:])[b]
        x = X.reshape(-1, *shape[-2:])[b]
        assert ref.orthonormality_error(q) <= tol
        # same column space as U + eps N: the projectors agree
        qx = torch.linalg.qr(x).Q
        assert (q @ q.T - qx @ qx.T).abs().max().item() <= 10 * tol
        # column by column: the Q of x = Q R with R's diagonal positive (order and orientation kept)
        assert (q - ref.orthonormal_columns_ref(x)).abs().max().item() <= 100 * tol
        # and it's not just U's space (a square basis spans everything either way)
        assert shape[-2] == shape[-1] or (q @ q.T - U.cpu().double().reshape(-1, *shape[-2:])[b]
                @ U.cpu().double().reshape(-1, *shape[-2:])[b].T).abs().max().item() > 1e-2


@pytest.mark.parametrize("l", [40, 80])  # the host Cholesky and the library one
def test_perturbed_basis_orthonormalize_rank_deficient(l, device):
    """Dependent columns fail the Cholesky-QR pivot test: Householder QR still gives an orthonormal
    basis whose span holds every column, with the orientation the docstring promises (R's diagonal
    positive: q_j . u_j > 0), which LAPACK's and cuSOLVER's reflectors do not give by themselves."""
    U = torch.randn(200, l, dtype=torch.float64)
    U[:, 7] = U[:, 5]
    Q = ops.perturbed_basis(U.to(device), 0.0, 1, 0, orthonormalize=True).cpu()
    assert ref.orthonormality_error(Q) <= 1e-12
    assert (U - Q @ (Q.T @ U)).abs().max().item() <= 1e-10
    d = torch.diagonal(Q.T @ U)
    assert (d[torch.arange(l) != 7] > 1e-3).all()   # column 7 has no direction of its own (d ~ 1e-15)


# ---------------------------------------------------------------------------------------------
# CUDA against CPU, bit for bit (the receiver of a SOLAR package may decode on either)

from conftest import CUDA_SKIP_REASON, HAS_CUDA  # noqa: E402


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 257, 4099, 1 << 20])
def test_philox_normal_cuda_bit_identical_to_cpu(dtype, n):
    for seed, stream in [(0, 0), (2**63 + 5, 3), (-1, 2**40)]:
        cpu = ops.philox_normal((n,), seed, stream, dtype=dtype)
        gpu = ops.philox_normal((n,), seed, stream, dtype=dtype, device="cuda")
        assert torch.equal(gpu.cpu(), cpu), (dtype, n, seed, stream)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturbed_basis_cuda_bit_identical_to_cpu(dtype):
    U = torch.randn(3, 257, 17, dtype=dtype)
    assert torch.equal(ops.perturbed_basis(U.cuda(), 0.3, 9, 2).cpu(), ops.perturbed_basis(U, 0.3, 9, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,seed,stream", [(63, 1, 0), (64 * 5 + 3, 77, 3), (100_003, 2**63 + 5, 2**40)])
def test_philox_normal_bit_exact_against_op_by_op_emulation(dtype, n, seed, stream, device):
    """Every element, whichever path made it (scalar blocks at the edges of a thread's range,
    16-block vectorised lanes inside, the CUDA kernel), equals philox.h's arithmetic exactly."""
    per = 4 if dtype == torch.float32 else 2
    blocks = -(-n // per)
    words = ops.philox_uint32((4 * blocks,), seed, stream)
    want = ref.philox_normals_exact(words, dtype)[:n]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = ops.philox_normal((n,), seed, stream, dtype=dtype, device=device).cpu()
        mismatch = (got != want).nonzero()
        assert mismatch.numel() == 0, (threads, mismatch[:5].flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 7, 1029])
def test_philox_normal_into_offset_views(dtype, offset, n, device):
    """The raw op fills contiguous views at any element offset: the CUDA kernel's 16-byte vector
    stores apply only where the view is aligned, and the unaligned and partial-block paths give
    the same bits. perturbed_basis (the adding path) gets a view of U but adds into its own
    (aligned) copy; the unaligned adding kernel runs in tests/test_cuda_emulation.py."""
    want = ops.philox_normal((n,), 5, 2, dtype=dtype)
    buf = torch.full((n + offset + 1,), float("nan"), dtype=dtype, device=device)
    view = buf[offset:offset + n]
    torch.ops.subspace_ext.philox_normal_(view, 5, 2)
    assert torch.equal(view.cpu(), want)
    assert buf[:offset].isnan().all() and buf[offset + n:].isnan().all()  # nothing written outside
    U = torch.randn(n + offset, dtype=dtype)
    got = ops.perturbed_basis(U.to(device)[offset:].reshape(n, 1), 0.25, 5, 2)  # 0.25: exact
    assert torch.equal(got.cpu().flatten(), U[offset:] + 0.25 * want)


# ---------------------------------------------------------------------------------------------
# method="icdf": one float32 normal per Philox word, by the piecewise-polynomial inverse CDF

@pytest.fixture(scope="module")
def icdf_table():
    return torch.from_numpy(ref.icdf_tool().read_header())


def _ulps(got, want):
    """|got - want| in float32 ulps of the float64 value want."""
    spacing = torch.from_numpy(np.spacing(want.abs().float().numpy())).double()
    return ((got.double() - want).abs() / spacing)


@pytest.mark.parametrize("seed,stream", [(0, 0), (42, 7), (2**63 + 5, 1), (2**64 - 1, 2**64 - 1)])
def test_philox_normal_icdf_within_2_ulp_of_the_quantile(seed, stream, device):
    """Element i is the quantile of word i's cell (float64 ndtri), to 2 float32 ulps."""
    for n in (1, 3, 257, 100_003):
        got = ops.philox_normal((n,), seed, stream, device=device, method="icdf").cpu()
        assert got.dtype == torch.float32 and got.shape == (n,)
        want = ref.philox_normals_icdf_ref(ref.philox_uint32_ref((n,), seed, stream) if n < 300
                                           else ops.philox_uint32((n,), seed, stream))
        err = _ulps(got, want)
        assert err.max().item() <= 2.0, (n, err.max().item(), int(err.argmax()))


@pytest.mark.parametrize("n,seed,stream", [(1, 3, 0), (63, 1, 0), (64 * 5 + 3, 77, 3), (100_003, 2**63 + 5, 2**40)])
def test_philox_normal_icdf_bit_exact_against_op_by_op_emulation(n, seed, stream, icdf_table, device):
    """Every element, whichever path made it (the vectorised lanes, the scalar blocks at the edges
    of a thread's range and the tensor's end, the CUDA kernel), has philox.h's float32 bits."""
    want = ref.philox_normals_icdf_exact(ops.philox_uint32((n,), seed, stream), icdf_table)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = ops.philox_normal((n,), seed, stream, device=device, method="icdf").cpu()
        mismatch = (got != want).nonzero()
        assert mismatch.numel() == 0, (threads, mismatch[:5].flatten().tolist())


def test_icdf_table_accuracy_in_every_segment():
    """The committed table against float64 ndtri in all 128 segments, the far tails included
    (|z| up to 6.3, which random words reach too rarely to test through the op)."""
    tool = ref.icdf_tool()
    worst, smallest = tool.ulp_errors(tool.read_header(), samples=512)
    assert worst.max() <= 2.0, (worst.max(), int(worst.argmax()))
    assert smallest > 0
    seg, v = tool.seg_and_v(np.array([1], np.uint64))  # the last cell (a = 1, p = 2^-33)
    top = tool.horner32(tool.read_header()[seg[0]], v)[0]
    assert top == pytest.approx(-float(torch.special.ndtri(torch.tensor(2.0**-33, dtype=torch.float64))), rel=3e-7)


def _fma_exact(a, b, c):
    """float32 a * b + c by exact rational arithmetic, rounded to nearest, ties to even."""
    from fractions import Fraction

    x = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    f = np.float32(float(x))
    near = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    return min(near, key=lambda y: (abs(Fraction(float(y)) - x), int(np.array(y).view(np.uint32)) & 1))


def test_icdf_fma32_is_exactly_rounded():
    """The tool's float32 fma (which defines the Horner steps) against rational arithmetic, on
    random operands over wide exponent ranges and on the halfway cases where rounding the float64
    sum again would be wrong: 2^-24 (1 + 2^-15) (1 - 2^-15) + (1 + 2^-23) is just below the
    midpoint of 1 + 2^-23 and 1 + 2^-22."""
    g = torch.Generator().manual_seed(11)
    a, b, c = (torch.randn(3000, generator=g) for _ in range(3))
    c = c * torch.tensor([1e-6, 1.0, 1e6])[torch.randint(0, 3, (3000,), generator=g)]
    q, r = 2.0**-24 * (1 + 2.0**-15), 1 - 2.0**-15
    a = torch.cat([a, torch.tensor([q, -q, q])]).numpy()
    b = torch.cat([b, torch.tensor([r, r, r])]).numpy()
    c = torch.cat([c, torch.tensor([1 + 2.0**-23, -(1 + 2.0**-23), 1.0])]).numpy()
    got = ref.icdf_tool().fma32(a, b, c)
    want = np.array([_fma_exact(*t) for t in zip(a, b, c)], np.float32)
    assert (got.view(np.uint32) == want.view(np.uint32)).all(), np.flatnonzero(got != want)[:5]
    assert got[-3] == np.float32(1 + 2.0**-23) and got[-2] == -np.float32(1 + 2.0**-23)


def test_philox_normal_icdf_emulation_is_the_tool_definition(icdf_table):
    """reference.py's emulation and the fitting tool's (numpy) steps agree on random words."""
    tool = ref.icdf_tool()
    words = ops.philox_uint32((50_000,), 8, 1)
    a = ((words.to(torch.int64) & 0x7FFFFFFF) << 1 | 1).numpy().astype(np.uint64)
    seg, v = tool.seg_and_v(a)
    table = tool.read_header()
    z = np.empty(a.size, np.float32)
    for s in np.unique(seg):
        z[seg == s] = tool.horner32(table[s], v[seg == s])
    want = ref.philox_normals_icdf_exact(words, icdf_table)
    assert torch.equal(want.abs(), torch.from_numpy(z))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (2, 3, 7)])
def test_philox_normal_icdf_shapes_row_major(shape, device):
    got = ops.philox_normal(shape, 9, 4, device=device, method="icdf")
    assert got.shape == torch.Size(shape) and got.is_contiguous() and got.dtype == torch.float32
    flat = ops.philox_normal((math.prod(shape),), 9, 4, device=device, method="icdf")
    assert torch.equal(got.flatten(), flat)


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 7, 1029])
def test_philox_normal_icdf_into_offset_views(offset, n, device):
    """The raw op fills a contiguous view at any element offset with the same bits, and writes
    nothing outside it (the CUDA kernel's vector stores apply only where aligned)."""
    want = ops.philox_normal((n,), 5, 2, method="icdf")
    buf = torch.full((n + offset + 1,), float("nan"), device=device)
    view = buf[offset:offset + n]
    torch.ops.subspace_ext.philox_normal_icdf_(view, 5, 2)
    assert torch.equal(view.cpu(), want)
    assert buf[:offset].isnan().all() and buf[offset + n:].isnan().all()


def test_philox_normal_icdf_prefix_and_differs_from_box_muller(device):
    n = 20_001
    a = ops.philox_normal((n,), 5, 2, device=device, method="icdf")
    for k in (1, 2, 3, 5, 4097, 20_000):
        assert torch.equal(ops.philox_normal((k,), 5, 2, device=device, method="icdf"), a[:k]), k
    bm = ops.philox_normal((n,), 5, 2, device=device)
    assert (a != bm).float().mean() > 0.99
    assert (a != ops.philox_normal((n,), 5, 3, device=device, method="icdf")).float().mean() > 0.99


def test_philox_normal_icdf_distribution():
    z = ops.philox_normal((1 << 21,), 2024, 1, method="icdf").double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n ** 0.5
    assert abs(z.var().item() - 1) < 6 * (2 / n) ** 0.5
    assert abs((z ** 3).mean().item()) < 2e-2
    assert abs((z ** 4).mean().item() - 3) < 3e-2
    # Kolmogorov-Smirnov distance to the normal CDF: 1.95 / sqrt(n) is its 0.1% level
    zs = z.sort().values
    cdf = 0.5 * torch.erfc(-zs / math.sqrt(2))
    k = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert torch.maximum((k - cdf).abs(), (k - 1 / n - cdf).abs()).max().item() < 1.95 / n ** 0.5
    assert (z > 0).double().mean().item() == pytest.approx(0.5, abs=2e-3)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("n", [1, 3, 257, 4099, 1 << 20])
def test_philox_normal_icdf_cuda_bit_identical_to_cpu(n):
    for seed, stream in [(0, 0), (2**63 + 5, 3), (-1, 2**40)]:
        cpu = ops.philox_normal((n,), seed, stream, method="icdf")
        gpu = ops.philox_normal((n,), seed, stream, device="cuda", method="icdf")
        assert torch.equal(gpu.cpu(), cpu), (n, seed, stream)
