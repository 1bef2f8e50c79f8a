"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU under a host emulation of the CUDA execution
model (tests/cuda_emu: one real thread per CUDA thread, a barrier per __syncthreads, launch limits
checked), against the CPU ops.

This runs on every machine, GPU or not: it checks what the kernels compute from their indices,
barriers, tiling and launch plans. It does not replace tests/ on a GPU: the device's arithmetic
(intrinsics, -fmad=false), memory model, the torch glue in csrc/cuda/cuda_ops.cpp and speed are only
checked there. Where a kernel claims the CPU's bits (Philox, the small SVD, project_perturbed's
partial products, the recomposition's W pass) the emulated result must equal the CPU op's exactly.
"""
import ctypes
import shutil
import sys
from pathlib import Path

import pytest
import torch

from subspace_ext import ops

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import build as emu_build  # noqa: E402

import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CUDA emulation")

DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
i64, u64, vp = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p


class ImportanceLayer(ctypes.Structure):
    _fields_ = [(n, vp) for n in ("A", "B", "gA", "gB", "iA", "iB", "uA", "uB", "scores")] + \
               [(n, i64) for n in ("r", "n", "m")]


class RecomposeLayer(ctypes.Structure):
    _fields_ = [("W", vp), ("ws0", i64), ("ws1", i64), ("m", i64), ("n", i64),
                ("B", vp), ("bs0", i64), ("bs1", i64), ("A", vp), ("as0", i64), ("as1", i64),
                ("Bn", vp), ("bns0", i64), ("bns1", i64), ("An", vp), ("ans0", i64), ("ans1", i64),
                ("q", i64), ("s", ctypes.c_double)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = ctypes.CDLL(str(emu_build.build(tmp_path_factory.mktemp("cuda_emu"))))
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_launches.restype = ctypes.c_long
    lib.emu_last_smem.restype = ctypes.c_size_t
    return lib


def _call(emu, fn, *args):
    emu.emu_reset()
    rc = getattr(emu, fn)(*args)
    assert rc == 0, emu.emu_last_error().decode()
    return emu.emu_launches()


def _p(t):
    return vp(t.data_ptr())


# ---------------------------------------------------------------------------------------------
# philox


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 1031, 4099])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("sms", [1, 3])
def test_philox_kernels_equal_cpu(emu, n, dtype, offset, sms):
    """offset 0: a 16-byte aligned output (whole Philox blocks as one vector store); 1: unaligned
    (element stores). sms: the grid is at most that many blocks of 256 threads, so at n = 1031 and
    4099 threads step over several Philox blocks (in pairs, then one, then the partial last block).
    Poisoned buffers: every element written, nothing outside."""
    buf = torch.full((n + offset + 1,), float("nan"), dtype=dtype)
    out = buf[offset:offset + n]
    _call(emu, "emu_philox_normal", _p(out), DT[dtype], i64(n), u64(5), u64(3), ctypes.c_double(0.0), 0, sms)
    assert torch.equal(out, ops.philox_normal((n,), 5, 3, dtype=dtype))
    assert buf[:offset].isnan().all() and buf[offset + n:].isnan().all()
    base = torch.randn(n + offset, dtype=dtype)
    added = base.clone()
    _call(emu, "emu_philox_normal", _p(added[offset:]), DT[dtype], i64(n), u64(5), u64(3), ctypes.c_double(0.25), 1,
          sms)
    assert torch.equal(added[offset:], ops.perturbed_basis(base[None, offset:], 0.25, 5, 3)[0])
    assert torch.equal(added[:offset], base[:offset])
    if dtype == torch.float32:  # the icdf transform (float32 only): shared-memory table, same checks
        buf.fill_(float("nan"))
        _call(emu, "emu_philox_normal_icdf", _p(out), i64(n), u64(5), u64(3), sms)
        assert torch.equal(out, ops.philox_normal((n,), 5, 3, method="icdf"))
        assert buf[:offset].isnan().all() and buf[offset + n:].isnan().all()
    bits = torch.zeros(n + offset + 1, dtype=torch.int32)
    _call(emu, "emu_philox_uint32", _p(bits[offset:]), i64(n), u64(9), u64(1), sms)
    assert torch.equal(bits[offset:offset + n], ops.philox_uint32((n,), 9, 1).view(torch.int32))
    assert not bits[:offset].any() and not bits[offset + n:].any()


# ---------------------------------------------------------------------------------------------
# project_perturbed / reconstruct_perturbed


def _perturbed_tn(emu, U, Y, eps, seed, stream):
    m, k, r = U.shape[0], U.shape[1], Y.shape[1]
    chunks = max((m + 127) // 128, 1)
    partial = torch.zeros(chunks, k, r, dtype=U.dtype)
    _call(emu, "emu_perturbed_tn", _p(U), i64(U.stride(0)), i64(U.stride(1)), i64(m), i64(k), _p(Y),
          i64(Y.stride(0)), i64(Y.stride(1)), i64(r), DT[U.dtype], ctypes.c_double(eps), u64(seed), u64(stream),
          i64(128), _p(partial))
    return partial.sum(0)


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,r,k1,k2", [(1, 1, 1, 1, 1), (129, 40, 3, 5, 2), (300, 257, 8, 17, 33),
                                         (70, 45, 19, 41, 23),  # tile rows cut mid Philox block
                                         (5, 7, 1000, 3, 2)], ids=str)  # r = 1000: opt-in shared memory
def test_project_perturbed_kernel_equals_cpu_bits(emu, m, n, r, k1, k2, dtype, eps):
    U, V = torch.randn(k1, m, dtype=dtype).T, torch.randn(n, k2, dtype=dtype)  # U a transposed view
    B, A = torch.randn(m, r, dtype=dtype), torch.randn(r, n, dtype=dtype)
    left = _perturbed_tn(emu, U, B, eps, 11, 4)
    right = _perturbed_tn(emu, V, A.t(), eps, 11, 5)
    C = (left @ right.t()) * 0.7
    assert torch.equal(C, ops.project_perturbed(U, V, B, A, 0.7, eps=eps, seed=11, stream_u=4, stream_v=5))


def _perturbed_nt(emu, X, U, eps, seed, stream, out, sms):
    tq, splits = ctypes.c_int(0), i64(0)
    launches = _call(emu, "emu_perturbed_nt", _p(X), i64(X.stride(0)), i64(X.stride(1)), i64(X.shape[0]),
                     i64(U.shape[1]), _p(U), i64(U.stride(0)), i64(U.stride(1)), i64(U.shape[0]), DT[U.dtype],
                     ctypes.c_double(eps), u64(seed), u64(stream), _p(out), i64(out.stride(0)), i64(out.stride(1)),
                     sms, ctypes.byref(tq), ctypes.byref(splits))
    return tq.value, splits.value, launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,k1,k2,sms", [(1, 1, 1, 1, 132), (65, 300, 1, 1, 132), (300, 70, 17, 33, 1),
                                           (300, 70, 17, 33, 132), (130, 3, 2, 6200, 132), (5, 200, 3, 1500, 4)],
                         ids=str)
def test_reconstruct_perturbed_kernel(emu, m, n, k1, k2, sms, dtype):
    """The two passes of reconstruct_perturbed's CUDA path (T^T = C^T U~^T, then T V~^T) with the
    launch plans an H100 (132 SMs) or a small GPU would get: strips of 1 to 64 rows, split rows,
    the shared-memory opt-in for long basis rows; the result matches the CPU op to rounding."""
    U, V = torch.randn(m, k1, dtype=dtype), torch.randn(k2, n, dtype=dtype).T
    C = torch.randn(k1, k2, dtype=dtype)
    T = torch.empty(m, k2, dtype=dtype)
    plans = [_perturbed_nt(emu, C.t(), U, 0.3, 11, 4, T.t(), sms)]
    D = torch.empty(m, n, dtype=dtype)
    plans.append(_perturbed_nt(emu, T, V, 0.3, 11, 5, D, sms))
    assert all(launches == 1 for _, _, launches in plans)
    # the strip's rows at an odd stride (k2, or k2 + 1 when even): a warp's lanes read one column of 32 rows
    # without bank conflicts (k2 + 1 always was an even stride for odd k2: 32-way at k2 = 31 in float32)
    assert emu.emu_last_smem() == plans[1][0] * (k2 | 1) * U.element_size()
    expected = ops.reconstruct_perturbed(U, C, V, eps=0.3, seed=11, stream_u=4, stream_v=5)
    unit = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -53
    Ua = U.double().abs() + 0.3 * ops.philox_normal(U.shape, 11, 4, dtype=dtype).double().abs()
    Va = V.double().abs() + 0.3 * ops.philox_normal(V.shape, 11, 5, dtype=dtype).double().abs()
    bound = 4 * (k1 + k2 + 8) * unit * (Ua @ C.double().abs() @ Va.T)
    assert ((D.double() - expected.double()).abs() <= bound).all()
    if k2 >= 1500:
        assert plans[1][0] < 64  # long basis rows: a narrower strip
    if sms == 132 and m >= 300:
        assert plans[1][1] > 1   # rows split across blocks to fill the GPU


# ---------------------------------------------------------------------------------------------
# small SVD: the launcher's thread count gives many lanes per matrix; the CPU runs one


OPTIN_SMEM = 227 * 1024  # H100 / H200 (the emulator's limit too)


_SVD_SHAPES = [(1, 1, 1), (3, 7, 3), (2, 33, 33), (4, 24, 24), (2, 72, 72)]


@pytest.mark.parametrize("batch,p,q,smem", [(*b, OPTIN_SMEM) for b in _SVD_SHAPES + [(2, 300, 24), (1, 2000, 24), (1, 79, 48)]] +
                         [(*b, 0) for b in _SVD_SHAPES + [(1, 130, 129)]])
def test_small_svd_kernel_equals_cpu_bits(emu, batch, p, q, smem):
    # smem: the opt-in shared memory per block the launcher plans with. Where the matrix, V and the
    # norms fit (with 1 KiB kept for the kernel's static shared memory) the blocks work on them in
    # shared memory (72 x 72: 83,520 bytes, above the 48 KiB default), else in global memory
    # (smem 0; 2000 x 24 does not fit 227 KiB): the same bits either way. 79 x 48 needs exactly
    # 48 KiB, which a kernel with static shared memory only gets through the opt-in attribute.
    A = torch.randn(batch, p, q, dtype=torch.float64)
    if q > 2:
        A[0, :, 1] = 0.0  # a zero column: completion path
    a = A.mT.contiguous().clone()  # column-major copies, as small_svd_batched prepares them (the kernel
    # scales them in place: for 1 x 1 matrices .contiguous() alone would return A itself)
    v, norms = torch.empty(batch, q, q, dtype=torch.float64), torch.empty(batch, q, dtype=torch.float64)
    u, s, vout = torch.empty(batch, q, p, dtype=torch.float64), torch.empty(batch, q, dtype=torch.float64), \
        torch.empty(batch, q, q, dtype=torch.float64)
    _call(emu, "emu_small_svd", _p(a), _p(v), _p(norms), _p(u), _p(s), _p(vout), i64(batch), p, q, i64(smem))
    need = 8 * (p * q + q * q + q)
    assert emu.emu_last_smem() == (need if need + 1024 <= smem else 0)
    U, S, V = ops.small_svd(A)
    assert torch.equal(u.mT, U) and torch.equal(s, S) and torch.equal(vout.mT, V)


@pytest.mark.parametrize("q, smem", [(1, OPTIN_SMEM), (5, 0), (33, OPTIN_SMEM), (72, OPTIN_SMEM), (72, 0),
                                     (90, OPTIN_SMEM)])
def test_gram_orth_kernel_equals_cpu_bits(emu, q, smem):
    """The Gram-Cholesky transform: one block per matrix, staged in shared memory where g and d fit
    (72: 42,048 bytes, under the 48 KiB default; 90: 65,520, opt-in) or in global memory (smem 0).
    The same bits as the CPU op, a dropped pivot included; a NaN (unchecked inside rsvd) reaches the
    same outputs as on the CPU, and every output is written."""
    batch = 3
    Y = torch.randn(batch, q + 3, q, dtype=torch.float64)
    Y[1, :, q // 2] = Y[1, :, 0] * 3.0  # matrix 1: a dependent column (q == 1: the column itself)
    G = Y.mT @ Y
    G[2, 0, q - 1] = float("nan")  # matrix 2: NaN (its upper triangle, which the kernel reads)
    g = G.mT.contiguous().clone()  # column-major copies, as gram_orth_batched prepares them
    d = torch.empty(batch, q, dtype=torch.float64)
    t = torch.full((batch, q, q), 7.0, dtype=torch.float64)
    complete = torch.zeros(batch, dtype=torch.bool)
    _call(emu, "emu_gram_orth", _p(g), _p(d), _p(t), _p(complete), i64(batch), q, i64(smem))
    need = 8 * (q * q + q)
    assert emu.emu_last_smem() == (need if need + 1024 <= smem else 0)
    T, complete_cpu = torch.ops.subspace_ext._gram_orth(G[:2])
    assert torch.equal(t.mT[:2], T) and torch.equal(complete[:2], complete_cpu)
    assert complete.tolist()[:2] == [True, q == 1]
    assert not (t[2] == 7.0).any() and not complete[2]
    want = ref.gram_orth_emulation(G[2])[0]
    assert torch.equal(t.mT[2].view(torch.int64), want.view(torch.int64))


@pytest.mark.parametrize("smem", [OPTIN_SMEM, 0], ids=["staged", "global"])
def test_small_svd_kernel_scale_exponents(emu, smem):
    """The matrix's scale 2^e is found by all the block's lanes (each takes a share of the entries, then a
    binary search over __syncthreads_or): the CPU's e, so its bits, for matrices whose largest entry sits in
    one lane's share only, at the ends of the float64 range, all zero, or subnormal only."""
    batch, p, q = 6, 21, 19
    A = torch.randn(batch, p, q, dtype=torch.float64) * 1e-3
    A[0, 20, 18] = 7.0                     # the last entry alone sets e
    A[1] *= 1e300
    A[2] *= 1e-300
    A[3] = 0.0
    A[4] = 0.0
    A[4, 5, 5], A[4, 17, 2] = 5e-324, -3e-320   # subnormal only: e clamped to -1000
    A[5, 0, 0] = -1e308                   # the first entry, near float64's largest
    a = A.mT.contiguous().clone()
    v, norms = torch.empty(batch, q, q, dtype=torch.float64), torch.empty(batch, q, dtype=torch.float64)
    u, s, vout = torch.empty(batch, q, p, dtype=torch.float64), torch.empty(batch, q, dtype=torch.float64), \
        torch.empty(batch, q, q, dtype=torch.float64)
    _call(emu, "emu_small_svd", _p(a), _p(v), _p(norms), _p(u), _p(s), _p(vout), i64(batch), p, q, i64(smem))
    U, S, V = ops.small_svd(A)
    assert torch.equal(u.mT, U) and torch.equal(s, S) and torch.equal(vout.mT, V)
    assert S[3].eq(0).all() and S[4, 0] > 0 and S[5, 0] == 1e308


@pytest.mark.parametrize("smem", [OPTIN_SMEM, 0], ids=["staged", "global"])
def test_small_svd_kernel_nan_in_nan_out(emu, smem):
    """The op rejects NaN, but rsvd's Gram orthonormalisation feeds the kernel unchecked: a NaN
    column must give NaN results, and every output entry must be written (no stale memory)."""
    batch, p, q = 2, 9, 4
    A = torch.randn(batch, p, q, dtype=torch.float64)
    A[0, 3, 2] = float("nan")
    a = A.mT.contiguous().clone()
    v, norms = torch.empty(batch, q, q, dtype=torch.float64), torch.empty(batch, q, dtype=torch.float64)
    u, s, vout = (torch.full(shape, 7.0, dtype=torch.float64) for shape in ((batch, q, p), (batch, q), (batch, q, q)))
    _call(emu, "emu_small_svd", _p(a), _p(v), _p(norms), _p(u), _p(s), _p(vout), i64(batch), p, q, i64(smem))
    assert not (s == 7.0).any() and not (u == 7.0).any() and not (vout == 7.0).any()
    assert s[0].isnan().any() and u[0].isnan().any()
    assert torch.equal(s[1], ops.small_svd(A[1])[1])  # the other matrix is unaffected


# ---------------------------------------------------------------------------------------------
# pair_importance (all layers in one launch) and fuse / reinit (two launches for all layers)


def _table(rows, struct):
    return (struct * len(rows))(*rows)


@pytest.mark.parametrize("param,state", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float32), (torch.float64, torch.float64)])
def test_pair_importance_kernel(emu, param, state):
    shapes = [(3, 17, 29), (1, 300, 5), (8, 64, 513)]  # (r, n, m) per layer: mixed, odd, rank 1
    A = [torch.randn(r, n).to(param) for r, n, _ in shapes]
    B = [torch.randn(m, r).to(param) for r, _, m in shapes]
    gA, gB = [torch.randn_like(a) for a in A], [torch.randn_like(b) for b in B]
    states = [[torch.rand(t.shape, dtype=state) for t in ts] for ts in (A, B, A, B)]
    cpu_states = [[t.clone() for t in ts] for ts in states]
    scores = [torch.empty(a.shape[0], dtype=state) for a in A]
    rows = [ImportanceLayer(_p(A[l]), _p(B[l]), _p(gA[l]), _p(gB[l]), *(_p(st[l]) for st in states), _p(scores[l]),
                            *shapes[l]) for l in range(len(A))]
    offsets = torch.tensor([0, 3, 4, 12], dtype=torch.int64)
    launches = _call(emu, "emu_pair_importance", _table(rows, ImportanceLayer), _p(offsets), len(A), i64(12),
                     DT[param], DT[state], ctypes.c_double(0.85), ctypes.c_double(0.9))
    assert launches == 1
    expected = ops.pair_importance(A, B, gA, gB, *cpu_states, beta1=0.85, beta2=0.9)
    for got_states, want_states in zip(states, cpu_states):
        for g, w in zip(got_states, want_states):
            assert torch.equal(g, w)  # element-wise updates: the same arithmetic
    tol = 1e-5 if state == torch.float32 else 1e-12
    for g, w in zip(scores, expected):  # a tree sum on CUDA, a running sum on the CPU
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * float(w.abs().max()))


@pytest.mark.parametrize("shapes,idxs", [([(13, 9, 4), (1, 300, 1), (70, 33, 6)], [[2, 0], [0], [5, 1, 3]]),
                                         ([(0, 9, 4), (0, 5, 2)], [[1], [0, 1]])],  # m == 0: no W tiles
                         ids=["mixed", "empty-rows"])
@pytest.mark.parametrize("wdt,fdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("reinit", [False, True])
def test_recompose_kernels_equal_cpu_bits(emu, shapes, idxs, wdt, fdt, reinit):
    """(m, n, r) per layer; every layer in one W pass and one factor pass (no W pass when no layer
    has rows)."""
    W = [torch.randn(n, m).to(wdt).T for m, n, _ in shapes]  # transposed views: strided W
    B = [torch.randn(m, r).to(fdt) for m, _, r in shapes]
    A = [torch.randn(r, n).to(fdt) for _, n, r in shapes]
    Bn = [torch.randn(m, len(i)).to(fdt) for (m, _, _), i in zip(shapes, idxs)] if reinit else None
    An = [torch.randn(len(i), n).to(fdt) for (_, n, _), i in zip(shapes, idxs)] if reinit else None
    scaling = [0.5, 2.0, 1.25][:len(shapes)]
    cpu = [[t.clone() for t in ts] for ts in (W, B, A)]
    idx_t = [torch.tensor(i, dtype=torch.int64) for i in idxs]
    idx_all = torch.cat(idx_t)
    rows, tiles, pairs = [], [0], [0]
    for l, (m, n, _) in enumerate(shapes):
        bn = (_p(Bn[l]), Bn[l].stride(0), Bn[l].stride(1)) if reinit else (None, 0, 0)
        an = (_p(An[l]), An[l].stride(0), An[l].stride(1)) if reinit else (None, 0, 0)
        rows.append(RecomposeLayer(_p(W[l]), W[l].stride(0), W[l].stride(1), m, n, _p(B[l]), B[l].stride(0),
                                   B[l].stride(1), _p(A[l]), A[l].stride(0), A[l].stride(1), *bn, *an,
                                   len(idxs[l]), scaling[l]))
        tiles.append(tiles[-1] + (m + 3) // 4)
        pairs.append(pairs[-1] + len(idxs[l]))
    tiles_t, pairs_t = torch.tensor(tiles), torch.tensor(pairs)
    launches = _call(emu, "emu_recompose", _table(rows, RecomposeLayer), _p(tiles_t), _p(pairs_t), _p(idx_all),
                     len(shapes),
                     i64(tiles[-1]), i64(pairs[-1]), 4, DT[wdt], DT[fdt])
    assert launches == (2 if tiles[-1] > 0 else 1)
    if reinit:
        ops.reinit_pairs_(*cpu, idx_t, Bn, An, scaling)
    else:
        ops.fuse_pairs_(*cpu, idx_t, scaling)
    for got, want in zip((W, B, A), cpu):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_emulator_rejects_what_cuda_rejects(emu):
    """The emulation is only useful if it fails where CUDA fails: empty grids, blocks over 1024
    threads, grid.y over 65535, dynamic shared memory over 48 KiB without the opt-in, and an opt-in
    over the device's 227 KiB are refused; a valid launch runs every block."""
    out = torch.zeros(6, dtype=torch.int32)
    assert emu.emu_selftest_launch(_p(out), 3, 2, 64, 1024) == 0 and (out == 64).all()
    for grid_x, grid_y, threads, smem in [(0, 1, 32, 0), (1, 1, 1025, 0), (1, 65536, 32, 0), (1, 1, 32, 48 * 1024 + 1)]:
        emu.emu_reset()
        assert emu.emu_selftest_launch(_p(out), grid_x, grid_y, threads, smem) == 1
        assert b"invalid launch" in emu.emu_last_error()
    U, Y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2000, dtype=torch.float64)
    partial = torch.zeros(1, 2, 2000, dtype=torch.float64)
    emu.emu_reset()  # r = 2000 float64 needs 256 KiB: the glue refuses it, the attribute call fails
    rc = emu.emu_perturbed_tn(_p(U), i64(2), i64(1), i64(4), i64(2), _p(Y), i64(2000), i64(1), i64(2000), 1,
                              ctypes.c_double(0.1), u64(0), u64(0), i64(128), _p(partial))
    assert rc == 1 and b"cudaFuncSetAttribute" in emu.emu_last_error()
