import pytest
import torch

from subspace_ext import ops

import reference as ref

UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -8,
        torch.float16: 2.0 ** -11}


def d(t):
    """A float64 CPU *copy* (never an alias of a float64 tensor that a kernel updates in place)."""
    return t.detach().cpu().double().clone()


def _layers(shapes, dtype, device):
    """shapes: list of (m, r, n). Returns A, B, grad_A, grad_B lists."""
    A = [torch.randn(r, n, device=device).to(dtype) for m, r, n in shapes]
    B = [torch.randn(m, r, device=device).to(dtype) for m, r, n in shapes]
    gA = [torch.randn(r, n, device=device).to(dtype) for m, r, n in shapes]
    gB = [torch.randn(m, r, device=device).to(dtype) for m, r, n in shapes]
    return A, B, gA, gB


MIXED = [(3, 1, 257), (17, 4, 3), (64, 8, 17), (257, 4, 64), (3, 8, 3), (64, 1, 64), (17, 8, 257)]


# ---------------------------------------------------------------------------------------------
# pair_importance


@pytest.mark.parametrize("pdtype,sdtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                           (torch.float32, torch.float64)])
@pytest.mark.parametrize("betas", [(0.85, 0.85), (0.6, 0.95), (0.0, 0.0), (0.999999, 0.9999)])
def test_pair_importance_several_steps(pdtype, sdtype, betas, device):
    """Against the float64 reference. Betas near 1: the kernels computed 1 - beta in the state dtype after
    rounding beta (1.3% off at 0.999999 in float32); 1 - beta is now rounded from double."""
    b1, b2 = betas
    A, B, _, _ = _layers(MIXED, pdtype, device)
    iA, iB, uA, uB = ops.importance_state(A, B, dtype=sdtype)
    assert all(t.dtype == sdtype and (t == 0).all() for t in iA + iB + uA + uB)
    state_ids = [id(t) for t in iA + iB + uA + uB]
    ptrs = [t.data_ptr() for t in iA + iB + uA + uB]
    r_iA, r_iB, r_uA, r_uB = [d(t) for t in iA], [d(t) for t in iB], [d(t) for t in uA], [d(t) for t in uB]
    rtol = 1e-12 if sdtype == torch.float64 else 3e-5
    for step in range(4):
        # new gradients each step; params also drift
        _, _, gA, gB = _layers(MIXED, pdtype, device)
        if step == 2:
            A = [a + 0.1 * torch.randn_like(a.float()).to(pdtype) for a in A]
        scores = ops.pair_importance(A, B, gA, gB, iA, iB, uA, uB, beta1=b1, beta2=b2)
        exp, r_iA, r_iB, r_uA, r_uB = ref.pair_importance_ref(A, B, gA, gB, r_iA, r_iB, r_uA, r_uB, b1, b2)
        assert len(scores) == len(MIXED)
        for l, (m, r, n) in enumerate(MIXED):
            assert scores[l].shape == (r,) and scores[l].dtype == sdtype
            assert scores[l].device.type == device
            torch.testing.assert_close(d(scores[l]), exp[l], rtol=rtol, atol=1e-30)
            torch.testing.assert_close(d(iA[l]), r_iA[l], rtol=rtol, atol=1e-30)
            torch.testing.assert_close(d(iB[l]), r_iB[l], rtol=rtol, atol=1e-30)
            torch.testing.assert_close(d(uA[l]), r_uA[l], rtol=rtol, atol=1e-30)
            torch.testing.assert_close(d(uB[l]), r_uB[l], rtol=rtol, atol=1e-30)
    # updated in place: same tensor objects, same storage
    assert [id(t) for t in iA + iB + uA + uB] == state_ids
    assert [t.data_ptr() for t in iA + iB + uA + uB] == ptrs
    if b2 > 0:
        assert all((t > 0).any() for t in uA)


def test_pair_importance_params_not_modified(device):
    A, B, gA, gB = _layers(MIXED[:3], torch.float32, device)
    copies = [t.clone() for t in A + B + gA + gB]
    ops.pair_importance(A, B, gA, gB, *ops.importance_state(A, B))
    for t, c in zip(A + B + gA + gB, copies):
        assert torch.equal(t, c)


def test_pair_importance_single_tensor_form(device):
    A, B, gA, gB = _layers([(20, 4, 30)], torch.float32, device)
    st = ops.importance_state(A[0], B[0])
    scores = ops.pair_importance(A[0], B[0], gA[0], gB[0], st[0][0], st[1][0], st[2][0], st[3][0],
                                 beta1=0.5, beta2=0.7)
    exp = ref.pair_importance_ref(A, B, gA, gB, [torch.zeros(4, 30)], [torch.zeros(20, 4)],
                                  [torch.zeros(4, 30)], [torch.zeros(20, 4)], 0.5, 0.7)[0]
    assert isinstance(scores, list) and len(scores) == 1
    torch.testing.assert_close(d(scores[0]), exp[0], rtol=3e-5, atol=0)


def test_pair_importance_non_contiguous_params(device):
    """Parameters given as views (e.g. transposed storage) are read by value."""
    At = torch.randn(30, 4, device=device)
    Bt = torch.randn(4, 20, device=device)
    A, B = [At.t()], [Bt.t()]
    gA, gB = [torch.randn(30, 4, device=device).t()], [torch.randn(20, 8, device=device)[:, ::2]]
    st = ops.importance_state(A, B)
    st_c = ops.importance_state(A, B)
    s1 = ops.pair_importance(A, B, gA, gB, *st)
    s2 = ops.pair_importance([a.contiguous() for a in A], [b.contiguous() for b in B],
                             [g.contiguous() for g in gA], [g.contiguous() for g in gB], *st_c)
    assert torch.equal(s1[0], s2[0])
    for x, y in zip(st, st_c):
        assert torch.equal(x[0], y[0])


def test_pair_importance_score_depends_on_right_pair(device):
    """Scores must attribute row j of A and column j of B to pair j (not e.g. row j of B)."""
    m, r, n = 9, 3, 11
    A = torch.zeros(r, n, device=device)
    B = torch.zeros(m, r, device=device)
    A[1] = 1.0  # only pair 1 has non-zero A
    B[:, 2] = 1.0  # only pair 2 has non-zero B
    gA = torch.ones(r, n, device=device)
    gB = torch.ones(m, r, device=device)
    st = ops.importance_state(A, B)
    s = ops.pair_importance(A, B, gA, gB, *st, beta1=0.5, beta2=0.5)[0].cpu()
    # I = 1 where p != 0: ipt = 0.5, unc = 0.5 * |1 - 0.5| = 0.25 -> score 0.125 per element,
    # averaged over the row / column (all of it non-zero)
    assert s[0].item() == 0.0
    torch.testing.assert_close(s[1].item(), 0.125)
    torch.testing.assert_close(s[2].item(), 0.125)


def test_pair_importance_thread_invariant():
    shapes = MIXED + [(100, 8, 100)] * 3
    A, B, gA, gB = _layers(shapes, torch.float32, "cpu")
    st1, st2 = ops.importance_state(A, B), ops.importance_state(A, B)
    torch.set_num_threads(1)
    s1 = ops.pair_importance(A, B, gA, gB, *st1)
    torch.set_num_threads(2)
    s2 = ops.pair_importance(A, B, gA, gB, *st2)
    for x, y in zip(s1, s2):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# fuse_pairs_ / reinit_pairs_


def _bound(W, B, A, idx, scaling, Bn=None, An=None):
    """Elementwise |W| + |s| (|B[:, idx]| |A[idx]| + |Bn| |An|) for error bounds."""
    idx = torch.as_tensor(idx, dtype=torch.long).cpu()
    out = d(W).abs() + abs(scaling) * (d(B)[:, idx].abs() @ d(A)[idx].abs())
    if Bn is not None:
        out = out + abs(scaling) * (d(Bn).abs() @ d(An).abs())
    return out


def _w_tol(W, bound, q):
    """Tolerance for W updated by accumulating 2q products in float (double for fp64 W) and rounding
    once into W's dtype."""
    acc = UNIT[torch.float64] if W.dtype == torch.float64 else UNIT[torch.float32]
    return (UNIT[W.dtype] + 4 * (q + 1) * acc) * bound + 1e-30


def _function(W, B, A, x, s):
    return d(W) @ x + s * (d(B) @ (d(A) @ x))


WB_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64)]


@pytest.mark.parametrize("wdtype,fdtype", WB_DTYPES)
@pytest.mark.parametrize("m,r,n,idx", [(40, 8, 30, [1, 5, 6]), (3, 4, 257, [3]), (257, 4, 3, [0, 1, 2, 3]),
                                       (17, 1, 17, [0]), (64, 8, 64, [7, 0])])
def test_fuse_pairs_single_layer(wdtype, fdtype, m, r, n, idx, device):
    W = torch.randn(m, n, device=device).to(wdtype)
    B = torch.randn(m, r, device=device).to(fdtype)
    A = torch.randn(r, n, device=device).to(fdtype)
    s = 0.75
    W0, B0, A0 = W.clone(), B.clone(), A.clone()
    ptr = W.data_ptr()
    x = torch.randn(n, 5, dtype=torch.float64)
    y0 = _function(W0, B0, A0, x, s)
    ops.fuse_pairs_(W, B, A, torch.tensor(idx, device=device), s)
    assert W.data_ptr() == ptr and W.dtype == wdtype
    W_ref, B_ref = ref.fuse_pairs_ref(W0, B0, A0, idx, s)
    bound = _bound(W0, B0, A0, idx, s)
    assert ((d(W) - W_ref).abs() <= _w_tol(W, bound, len(idx))).all()
    assert torch.equal(d(B), B_ref)  # exact: columns idx zeroed, the rest untouched
    assert torch.equal(A, A0)
    assert not torch.equal(W, W0)
    # the layer's function is preserved up to W's rounding
    y1 = _function(W, B, A, x, s)
    tol = 4 * _w_tol(W, bound, len(idx)) @ x.abs()
    assert ((y1 - y0).abs() <= tol).all()


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fuse_pairs_transposed_and_strided_w(wdtype, device):
    m, r, n = 33, 6, 20
    Wc = torch.randn(n, m, device=device).to(wdtype)  # contiguous storage
    W = Wc.t()  # (m, n) view with strides (1, m)
    Wbig = torch.randn(m, 2 * n, device=device).to(wdtype)
    W2 = Wbig[:, ::2]  # (m, n), column stride 2
    B = torch.randn(m, r, device=device).to(wdtype)
    A = torch.randn(r, n, device=device).to(wdtype)
    B2, A2 = B.clone(), A.clone()
    idx = [4, 0, 2]
    W0, W20, Wbig0 = W.clone(), W2.clone(), Wbig.clone()
    W_ref, B_ref = ref.fuse_pairs_ref(W0, B, A, idx, 2.0)
    W2_ref, _ = ref.fuse_pairs_ref(W20, B, A, idx, 2.0)
    tol = _w_tol(W, _bound(W0, B, A, idx, 2.0), 3)
    tol2 = _w_tol(W2, _bound(W20, B, A, idx, 2.0), 3)
    ops.fuse_pairs_([W, W2], [B, B2], [A, A2], [idx, idx], 2.0)
    assert W.data_ptr() == Wc.data_ptr()
    assert ((d(Wc.t()) - W_ref).abs() <= tol).all()  # the storage behind the view was updated
    assert ((d(Wbig[:, ::2]) - W2_ref).abs() <= tol2).all()
    assert torch.equal(Wbig[:, 1::2], Wbig0[:, 1::2])  # untouched columns between the strides
    assert torch.equal(d(B), B_ref) and torch.equal(d(B2), B_ref)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64])
def test_fuse_pairs_non_contiguous_factors(wdtype, device):
    m, r, n = 25, 5, 18
    W = torch.randn(m, n, dtype=wdtype, device=device)
    Bt = torch.randn(r, m, dtype=wdtype, device=device)
    At = torch.randn(n, r, dtype=wdtype, device=device)
    B, A = Bt.t(), At.t()  # views; B is updated in place through the view
    W0, B0, A0 = W.clone(), B.clone(), A.clone()
    ops.fuse_pairs_(W, B, A, torch.tensor([1, 3], device=device), 0.5)
    W_ref, B_ref = ref.fuse_pairs_ref(W0, B0, A0, [1, 3], 0.5)
    assert ((d(W) - W_ref).abs() <= _w_tol(W, _bound(W0, B0, A0, [1, 3], 0.5), 2)).all()
    assert torch.equal(d(Bt.t()), B_ref)


@pytest.mark.parametrize("wdtype,fdtype", WB_DTYPES[:4])
def test_fuse_pairs_many_layers(wdtype, fdtype, device):
    shapes = [(3, 1, 257), (17, 4, 3), (64, 8, 17), (257, 4, 64), (3, 8, 3), (64, 1, 64), (17, 8, 257)]
    idxs = [[0], [], [7, 2, 3], [1, 2], [], [0], list(range(8))]
    scal = [1.0, 2.0, 0.5, -1.0, 3.0, 0.25, 1.5]
    W = [torch.randn(m, n, device=device).to(wdtype) for m, r, n in shapes]
    B = [torch.randn(m, r, device=device).to(fdtype) for m, r, n in shapes]
    A = [torch.randn(r, n, device=device).to(fdtype) for m, r, n in shapes]
    W0, B0, A0 = [w.clone() for w in W], [b.clone() for b in B], [a.clone() for a in A]
    idx_t = [torch.tensor(i, dtype=torch.int32 if l % 2 else torch.int64, device=device) for l, i in enumerate(idxs)]
    ops.fuse_pairs_(W, B, A, idx_t, scal)
    for l in range(len(shapes)):
        if not idxs[l]:
            assert torch.equal(W[l], W0[l]) and torch.equal(B[l], B0[l])
            continue
        W_ref, B_ref = ref.fuse_pairs_ref(W0[l], B0[l], A0[l], idxs[l], scal[l])
        tol = _w_tol(W[l], _bound(W0[l], B0[l], A0[l], idxs[l], scal[l]), len(idxs[l]))
        assert ((d(W[l]) - W_ref).abs() <= tol).all(), l
        assert torch.equal(d(B[l]), B_ref), l
        assert torch.equal(A[l], A0[l])


def test_fuse_pairs_thread_invariant():
    shapes = [(300, 8, 200), (50, 4, 70), (129, 8, 65)]
    W = [torch.randn(m, n) for m, r, n in shapes]
    B = [torch.randn(m, r) for m, r, n in shapes]
    A = [torch.randn(r, n) for m, r, n in shapes]
    idx = [[0, 3], [1], [2, 5, 7]]
    W1, B1 = [w.clone() for w in W], [b.clone() for b in B]
    torch.set_num_threads(1)
    ops.fuse_pairs_(W1, B1, A, idx, 1.3)
    torch.set_num_threads(2)
    ops.fuse_pairs_(W, B, A, idx, 1.3)
    for x, y in zip(W + B, W1 + B1):
        assert torch.equal(x, y)


def _shared_memory_case(case, device):
    """Layers whose written tensors overlap: (W, B, A, new pairs or None, the layers named)."""
    P = torch.randn(12, 6, device=device)
    W = [torch.randn(8, 6, device=device) for _ in range(2)]
    B = [torch.randn(8, 3, device=device) for _ in range(2)]
    A = [torch.randn(3, 6, device=device) for _ in range(2)]
    new = None
    if case == "same W":
        W[1] = W[0]
        named = "layer 0's W and layer 1's W"
    elif case == "same B":
        B[1] = B[0]
        named = "layer 0's B and layer 1's B"
    elif case == "overlapping row slices of W":
        W = [P[:8], P[4:]]
        named = "layer 0's W and layer 1's W"
    elif case == "W and its transpose":
        S = torch.randn(8, 8, device=device)
        W, A = [S, S.T], [torch.randn(3, 8, device=device) for _ in range(2)]
        named = "layer 0's W and layer 1's W"
    elif case == "B a column slice of W":  # strided views of one buffer that share columns 4 and 5
        X = torch.randn(8, 10, device=device)
        W[0], B[0] = X[:, :6], X[:, 4:7]
        named = "layer 0's W and layer 0's B"
    elif case == "B is W":
        W[0] = torch.randn(8, 3, device=device)
        A[0] = torch.randn(3, 3, device=device)
        B[0] = W[0]
        named = "layer 0's W and layer 0's B"
    else:  # reinit writes A too
        A[1] = A[0]
        new = ([torch.randn(8, 1, device=device)] * 2, [torch.randn(1, 6, device=device)] * 2)
        named = "layer 0's A and layer 1's A"
    return W, B, A, new, named


@pytest.mark.parametrize("case", ["same W", "same B", "overlapping row slices of W", "W and its transpose",
                                  "B a column slice of W", "B is W", "same A (reinit)"])
def test_recompose_refuses_tensors_written_twice(case, device):
    # Layers are updated concurrently: a weight written for two layers would lose one update.
    W, B, A, new, named = _shared_memory_case(case, device)
    before = [t.clone() for t in W + B + A]
    idx = [torch.tensor([0]), torch.tensor([1])]
    op = "reinit_pairs_" if new else "fuse_pairs_"
    with pytest.raises(ValueError, match=f"{op}: {named} share memory"):
        if new:
            ops.reinit_pairs_(W, B, A, idx, *new)
        else:
            ops.fuse_pairs_(W, B, A, idx)
    assert all(torch.equal(x, y) for x, y in zip(W + B + A, before))


def test_recompose_accepts_disjoint_views_and_shared_read_only_factors(device):
    # Row slices and column slices of one weight (halves, and even / odd columns), A read by two layers of a fusion,
    # and a weight shared with a layer that moves no pair: nothing written twice.
    P, Q, R = torch.randn(16, 6, device=device), torch.randn(8, 12, device=device), torch.randn(8, 12, device=device)
    W = [P[:8], P[8:], Q[:, :6], Q[:, 6:], P[:8], R[:, ::2], R[:, 1::2]]
    A_shared = torch.randn(3, 6, device=device)
    B = [torch.randn(8, 3, device=device) for _ in W]
    A = [A_shared, A_shared, torch.randn(3, 6, device=device), torch.randn(3, 6, device=device), A_shared,
         torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)]
    idxs = [[0], [1, 2], [2], [0, 1], [], [1], [2, 0]]
    W0, B0 = [d(w) for w in W], [d(b) for b in B]
    ops.fuse_pairs_(W, B, A, [torch.tensor(i, dtype=torch.long) for i in idxs], 0.5)
    for l in [0, 1, 2, 3, 5, 6]:
        W_ref, B_ref = ref.fuse_pairs_ref(W0[l], B0[l], d(A[l]), idxs[l], 0.5)
        assert torch.allclose(d(W[l]), W_ref, atol=1e-5), l
        assert torch.equal(d(B[l]), B_ref), l


def _offsets(t):
    """The storage offsets (in elements) of every element of a view."""
    i = torch.arange(t.shape[0]).reshape(-1, 1) * t.stride(0)
    j = torch.arange(t.shape[1]).reshape(1, -1) * t.stride(1)
    return set((t.storage_offset() + i + j).flatten().tolist())


@pytest.mark.parametrize("trial", range(4))
def test_recompose_overlap_check_is_exact_for_views_of_one_weight(trial, device):
    """W and B as random slices of one buffer (row and column ranges, a column step of 1 or 2 shared
    by both, either one transposed): the op refuses exactly the pairs that share an element, as a
    brute-force comparison of their storage offsets says, and computes the others."""
    g = torch.Generator().manual_seed(trial)
    P = torch.randn(8, 11, device=device)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    refused = computed = 0
    for _ in range(60):
        step, m = pick(1, 2), pick(1, 6)
        views = []
        for cols in (pick(1, 4), pick(1, 3)):
            if pick(0, 1):  # rows r0.. of P, columns c0, c0 + step, ...
                r0, c0 = pick(0, 8 - m), pick(0, 11 - step * (cols - 1) - 1)
                views.append(P[r0:r0 + m, c0:c0 + step * (cols - 1) + 1:step])
            else:  # the transpose of a (cols x m) slice: columns of P as rows of the view
                r0, c0 = pick(0, 8 - cols), pick(0, 11 - step * (m - 1) - 1)
                views.append(P[r0:r0 + cols, c0:c0 + step * (m - 1) + 1:step].T)
        W, B = views
        A = torch.randn(B.shape[1], W.shape[1], device=device)
        shares = bool(_offsets(W) & _offsets(B))
        W0, B0 = d(W), d(B)
        try:
            ops.fuse_pairs_([W], [B], [A], [torch.tensor([0])], 0.5)
        except ValueError as e:
            assert shares and "share memory" in str(e), (W.shape, W.stride(), W.storage_offset(), B.shape,
                                                          B.stride(), B.storage_offset())
            refused += 1
            continue
        assert not shares, (W.shape, W.stride(), W.storage_offset(), B.shape, B.stride(), B.storage_offset())
        W_ref, B_ref = ref.fuse_pairs_ref(W0, B0, d(A), [0], 0.5)
        assert torch.allclose(d(W), W_ref, atol=1e-5) and torch.equal(d(B), B_ref)
        computed += 1
    assert refused >= 10 and computed >= 10, (refused, computed)  # both sides of the check were met


@pytest.mark.parametrize("wdtype,fdtype", WB_DTYPES)
def test_reinit_pairs_single_layer(wdtype, fdtype, device):
    m, r, n = 40, 8, 30
    idx = [6, 1, 2]
    q = len(idx)
    W = torch.randn(m, n, device=device).to(wdtype)
    B = torch.randn(m, r, device=device).to(fdtype)
    A = torch.randn(r, n, device=device).to(fdtype)
    Bn = torch.randn(m, q, device=device).to(fdtype)
    An = torch.randn(q, n, device=device).to(fdtype)
    s = 0.5
    W0, B0, A0, Bn0, An0 = W.clone(), B.clone(), A.clone(), Bn.clone(), An.clone()
    x = torch.randn(n, 4, dtype=torch.float64)
    y0 = _function(W0, B0, A0, x, s)
    ops.reinit_pairs_(W, B, A, torch.tensor(idx, device=device), Bn, An, s)
    W_ref, B_ref, A_ref = ref.reinit_pairs_ref(W0, B0, A0, idx, Bn0, An0, s)
    bound = _bound(W0, B0, A0, idx, s, Bn0, An0)
    assert ((d(W) - W_ref).abs() <= _w_tol(W, bound, 2 * q)).all()
    assert torch.equal(d(B), B_ref) and torch.equal(d(A), A_ref)
    y1 = _function(W, B, A, x, s)
    assert ((y1 - y0).abs() <= 4 * _w_tol(W, bound, 2 * q) @ x.abs()).all()
    # B_new / A_new are not modified
    assert torch.equal(Bn, Bn0) and torch.equal(An, An0)


def test_reinit_pairs_many_layers_transposed_w(device):
    shapes = [(17, 4, 64), (64, 8, 3), (257, 1, 17), (3, 4, 3)]
    idxs = [[3, 0], [5], [], [0, 1, 2, 3]]
    Wc = [torch.randn(n, m, device=device) for m, r, n in shapes]
    W = [w.t() for w in Wc]
    B = [torch.randn(m, r, device=device) for m, r, n in shapes]
    A = [torch.randn(r, n, device=device) for m, r, n in shapes]
    Bn = [torch.randn(m, len(i), device=device) for (m, r, n), i in zip(shapes, idxs)]
    An = [torch.randn(len(i), n, device=device) for (m, r, n), i in zip(shapes, idxs)]
    W0, B0, A0 = [w.clone() for w in W], [b.clone() for b in B], [a.clone() for a in A]
    ops.reinit_pairs_(W, B, A, idxs, Bn, An, [1.0, 0.5, 2.0, -1.0])
    for l, s in enumerate([1.0, 0.5, 2.0, -1.0]):
        if not idxs[l]:
            assert torch.equal(W[l], W0[l]) and torch.equal(B[l], B0[l]) and torch.equal(A[l], A0[l])
            continue
        W_ref, B_ref, A_ref = ref.reinit_pairs_ref(W0[l], B0[l], A0[l], idxs[l], Bn[l], An[l], s)
        tol = _w_tol(W[l], _bound(W0[l], B0[l], A0[l], idxs[l], s, Bn[l], An[l]), 2 * len(idxs[l]))
        assert ((d(Wc[l].t()) - W_ref).abs() <= tol).all(), l
        assert torch.equal(d(B[l]), B_ref) and torch.equal(d(A[l]), A_ref), l


@pytest.mark.parametrize("where,bad", [(0, float("nan")), (3, float("inf")), (7, -float("inf")), (10, float("nan"))],
                         ids=["B_new0-nan", "A_new1-inf", "A_new3--inf", "B_new5-nan"])
def test_reinit_names_the_first_non_finite_new_pair_of_many(device, where, bad):
    """The new pairs' NaN/Inf flags of all layers come back together (on CUDA: one batched check
    of every B_new, A_new): the message names the right layer and factor, and nothing changes.
    Flag order: B_new of layer 0, A_new of layer 0, B_new of layer 1, ..., over mixed dtypes and a
    layer with no pairs."""
    dts = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32, torch.float32]
    idxs = [[1], [0, 2], [], [3], [0], [2, 1]]
    W = [torch.randn(6, 5, device=device, dtype=torch.float32) for _ in dts]
    B = [torch.randn(6, 4, device=device, dtype=t) for t in dts]
    A = [torch.randn(4, 5, device=device, dtype=t) for t in dts]
    Bn = [torch.randn(6, len(i), device=device, dtype=t) for i, t in zip(idxs, dts)]
    An = [torch.randn(len(i), 5, device=device, dtype=t) for i, t in zip(idxs, dts)]
    layer, factor = where // 2, ("B_new", "A_new")[where % 2]  # flag `where` of the list above
    (Bn if factor == "B_new" else An)[layer].view(-1)[0] = bad
    before = [t.clone() for t in W + B + A]
    with pytest.raises(ValueError, match=f"reinit_pairs_: layer {layer}: {factor} contains NaN or Inf"):
        ops.reinit_pairs_(W, B, A, idxs, Bn, An, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(W + B + A, before))


def test_reinit_with_own_pairs_is_identity_on_w():
    """Re-initialising pairs with themselves leaves W unchanged (to rounding)."""
    W = torch.randn(20, 15, dtype=torch.float64)
    B, A = torch.randn(20, 5, dtype=torch.float64), torch.randn(5, 15, dtype=torch.float64)
    W0 = W.clone()
    idx = [0, 4]
    ops.reinit_pairs_(W, B, A, torch.tensor(idx), B[:, idx].clone(), A[idx].clone(), 1.0)
    torch.testing.assert_close(W, W0, rtol=0, atol=1e-13)


def test_fuse_then_state_consistent_with_dense_sum():
    """fuse all pairs: W' = W + s B A and B' = 0."""
    W = torch.randn(30, 25, dtype=torch.float64)
    B, A = torch.randn(30, 6, dtype=torch.float64), torch.randn(6, 25, dtype=torch.float64)
    W_exp = W + 1.5 * B @ A
    ops.fuse_pairs_(W, B, A, torch.arange(6), 1.5)
    torch.testing.assert_close(W, W_exp, rtol=1e-14, atol=1e-13)
    assert (B == 0).all()


# ---------------------------------------------------------------------------------------------
# CUDA against CPU: the W pass does the CPU kernel's arithmetic in its order, so the bits match

from conftest import CUDA_SKIP_REASON, HAS_CUDA  # noqa: E402


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("wdtype,fdtype", WB_DTYPES)
@pytest.mark.parametrize("new", [False, True], ids=["fuse", "reinit"])
@pytest.mark.parametrize("idx_on", ["cuda", "cpu"], ids=["idx_cuda", "idx_cpu"])
def test_recompose_cuda_bit_identical_to_cpu(wdtype, fdtype, new, idx_on):
    shapes = [(40, 8, 30), (3, 4, 257), (257, 4, 3), (64, 8, 64)]
    idx = [[1, 5, 6], [3], [0, 1, 2, 3], [7, 0]]
    W = [torch.randn(m, n).to(wdtype) for m, r, n in shapes]
    W[3] = W[3].T.contiguous().T  # a transposed (column-major) base weight
    B = [torch.randn(m, r).to(fdtype) for m, r, n in shapes]
    A = [torch.randn(r, n).to(fdtype) for m, r, n in shapes]
    Bn = [torch.randn(m, len(ix)).to(fdtype) for (m, r, n), ix in zip(shapes, idx)]
    An = [torch.randn(len(ix), n).to(fdtype) for (m, r, n), ix in zip(shapes, idx)]
    s = [0.75, 2.0, 1.0, 0.125]
    on = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    Wc, Bc, Ac = on(W), on(B), on(A)
    ix_cpu = [torch.tensor(i) for i in idx]
    ix_c = on(ix_cpu) if idx_on == "cuda" else ix_cpu  # CUDA W with host indices: no copy back
    if new:
        ops.reinit_pairs_(W, B, A, ix_cpu, Bn, An, s)
        ops.reinit_pairs_(Wc, Bc, Ac, ix_c, on(Bn), on(An), s)
    else:
        ops.fuse_pairs_(W, B, A, ix_cpu, s)
        ops.fuse_pairs_(Wc, Bc, Ac, ix_c, s)
    for got, exp in zip(Wc + Bc + Ac, W + B + A):
        assert torch.equal(got.cpu(), exp)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
def test_pair_importance_and_fuse_of_200_layers_take_three_launches():
    """The issue's target, on the device: pair_importance (1 kernel) + fuse_pairs_ (2 kernels) over
    200 layers; host indices, so the validation needs no kernel (copies are not launches)."""
    from torch.profiler import ProfilerActivity, profile

    shapes = (MIXED * 29)[:200]
    A, B, gA, gB = _layers(shapes, torch.float32, "cuda")
    W = [torch.randn(m, n, device="cuda") for m, r, n in shapes]
    idx = [[l % r] for l, (m, r, n) in enumerate(shapes)]
    st = ops.importance_state(A, B)
    ops.pair_importance(A, B, gA, gB, *st)  # warm-up (allocator, kernel attributes)
    ops.fuse_pairs_(W, B, A, idx, 0.5)
    torch.cuda.synchronize()
    # CPU activity too: with CUDA alone some torch builds record no kernel events at all
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ops.pair_importance(A, B, gA, gB, *st)
        ops.fuse_pairs_(W, B, A, idx, 0.5)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not any(w in e.name.lower() for w in ("memcpy", "memset"))]
    assert 1 <= len(kernels) <= 3, kernels


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("pdtype,sdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float64, torch.float64)])
def test_pair_importance_cuda_matches_cpu(pdtype, sdtype):
    shapes = [(40, 8, 30), (3, 1, 257), (257, 4, 3)] * 3
    A, B, gA, gB = _layers(shapes, pdtype, "cpu")
    st = ops.importance_state(A, B, dtype=sdtype)
    on = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    st_c = tuple(on(x) for x in st)
    for _ in range(3):
        exp = ops.pair_importance(A, B, gA, gB, *st)
        got = ops.pair_importance(on(A), on(B), on(gA), on(gB), *st_c)
    tol = 1e-12 if sdtype == torch.float64 else 1e-5
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.cpu(), e, rtol=tol, atol=0)
    for sc, sp in zip(st_c, st):  # the element-wise states are the same arithmetic: the same bits
        for g, e in zip(sc, sp):
            assert torch.equal(g.cpu(), e)


# ---------------------------------------------------------------------------------------------
# Layers on several devices (a model split over GPUs, or partly offloaded): one call per device.
# The second device is CUDA where present (values checked against the CPU), else "meta" (the
# registered fakes: devices, shapes and dtypes of the results).

OTHER = [pytest.param("meta", id="meta"),
         pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or ""))]


def _spread(ts, other):
    """Odd layers moved to `other`, even layers kept (CPU): the CPU copies stay the reference."""
    return [t.to(other) if l % 2 else t.clone() for l, t in enumerate(ts)]


def _check_spread(got, exp, other, exact_cpu=True, atol=1e-6):
    for l, (g, e) in enumerate(zip(got, exp)):
        if l % 2 == 0:
            assert g.device.type == "cpu" and (torch.equal(g, e) if exact_cpu else torch.allclose(g, e)), l
            continue
        assert g.device.type == other and g.shape == e.shape and g.dtype == e.dtype, l
        if other == "cuda":
            torch.testing.assert_close(g.cpu(), e, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("other", OTHER)
def test_pair_importance_layers_on_several_devices(other):
    shapes = MIXED[:5]
    A, B, gA, gB = _layers(shapes, torch.float32, "cpu")
    st = ops.importance_state(A, B)
    st_x = tuple(_spread(s, other) for s in st)
    for _ in range(2):
        exp = ops.pair_importance(A, B, gA, gB, *st)
        got = ops.pair_importance(*(_spread(x, other) for x in (A, B, gA, gB)), *st_x)
    _check_spread(got, exp, other)
    for sx, s in zip(st_x, st):
        _check_spread(sx, s, other)


@pytest.mark.parametrize("new", [False, True], ids=["fuse", "reinit"])
@pytest.mark.parametrize("other", OTHER)
def test_recompose_layers_on_several_devices(other, new):
    shapes = MIXED[:5]
    idx = [[0], [3, 1], [7, 2], [0, 3], [4]]
    W = [torch.randn(m, n) for m, r, n in shapes]
    B = [torch.randn(m, r) for m, r, n in shapes]
    A = [torch.randn(r, n) for m, r, n in shapes]
    ix = [torch.tensor(i) for i in idx]
    Bn = [torch.randn(m, len(i)) for (m, r, n), i in zip(shapes, idx)]
    An = [torch.randn(len(i), n) for (m, r, n), i in zip(shapes, idx)]
    Wx, Bx, Ax, ixx, Bnx, Anx = (_spread(x, other) for x in (W, B, A, ix, Bn, An))
    if new:
        ops.reinit_pairs_(W, B, A, ix, Bn, An, 0.5)
        ops.reinit_pairs_(Wx, Bx, Ax, ixx, Bnx, Anx, 0.5)
    else:
        ops.fuse_pairs_(W, B, A, ix, 0.5)
        ops.fuse_pairs_(Wx, Bx, Ax, ixx, 0.5)
    for got, exp in ((Wx, W), (Bx, B), (Ax, A)):
        _check_spread(got, exp, other)


def test_recompose_new_pair_on_another_device_named():
    W, B, A = torch.randn(5, 6), torch.randn(5, 2), torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"one device.*B_new\[0\] on meta"):
        ops.reinit_pairs_([W], [B], [A], [torch.tensor([1])], [torch.randn(5, 1, device="meta")], [torch.randn(1, 6)])


@pytest.mark.parametrize("other", OTHER)
def test_rsvd_many_matrices_on_several_devices(other):
    mats = [torch.randn(m, n) for m, n in [(40, 30), (17, 64), (40, 30), (9, 9), (64, 17)]]
    got = ops.rsvd_many(_spread(mats, other), 4, niter=1, seed=3)
    exp = ops.rsvd_many(mats, 4, niter=1, seed=3)
    for j in range(3):  # U, S, V
        # CPU entries: rsvd_many's entries are independent, so the split changes no bit; CUDA
        # orthonormalises differently (Gram + Cholesky-QR on the device): float32 rounding, amplified
        # by the singular gaps of these random matrices
        _check_spread([g[j] for g in got], [e[j] for e in exp], other, atol=2e-5)


@pytest.mark.parametrize("bad,match", [("range", r"fuse_pairs_: layer {at}: idx entry 9 out of range \[0, 8\)"),
                                       ("repeat", r"fuse_pairs_: layer {at}: idx has repeated entry 1"),
                                       ("nan", r"reinit_pairs_: layer {at}: A_new contains NaN or Inf"),
                                       ("overflow", r"reinit_pairs_: layer {at}: B_new contains NaN or Inf in B's "
                                                    r"dtype (float16|Half)"),
                                       ("dtype", r"reinit_pairs_: layer 1: B and A must share a dtype")],
                         ids=["range", "repeat", "nan", "overflow", "dtype"])
@pytest.mark.parametrize("other", OTHER)
def test_recompose_on_several_devices_validates_every_layer_first(other, bad, match):
    """A bad idx (fuse), a non-finite new pair (reinit; also one finite in float32 that overflows B's
    float16) or B and A of two dtypes on one device leave the layers of every device untouched, and the
    message counts the caller's layers (not the position within a device's group). On CUDA the bad layer is
    the CUDA one (its group runs after the CPU group); meta layers hold no values, so there a bad value is in
    the last CPU layer. The last two were checked by each device's kernel only: the CPU layers were changed."""
    shapes = [(6, 8, 5), (6, 8, 5), (7, 8, 4)]
    W = [torch.randn(m, n) for m, r, n in shapes]
    B = [torch.randn(m, r) for m, r, n in shapes]
    A = [torch.randn(r, n) for m, r, n in shapes]
    idx = [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3])]
    Bn = [torch.randn(m, len(i)) for (m, r, n), i in zip(shapes, idx)]
    An = [torch.randn(len(i), n) for (m, r, n), i in zip(shapes, idx)]
    at = 1 if other == "cuda" or bad == "dtype" else 2
    if bad == "nan":
        An[at][0, 1] = float("inf")
    elif bad == "overflow":
        W[at], B[at], A[at] = W[at].half(), B[at].half(), A[at].half()
        Bn[at][2, 0] = 1e5   # float32: finite
    elif bad == "dtype":
        A[at] = A[at].double()
    else:
        idx[at] = torch.tensor([0, 9] if bad == "range" else [1, 1])
    W[1], B[1], A[1], idx[1], Bn[1], An[1] = (t.to(other) for t in (W[1], B[1], A[1], idx[1], Bn[1], An[1]))
    before = [t.clone() for t in W + B + A]
    with pytest.raises(TypeError if bad == "dtype" else ValueError, match=match.format(at=at)):
        if bad in ("nan", "overflow", "dtype"):
            ops.reinit_pairs_(W, B, A, idx, Bn, An, 1.0)
        else:
            ops.fuse_pairs_(W, B, A, idx, 1.0)
    for t, s in zip(W + B + A, before):
        assert t.device.type == "meta" or torch.equal(t, s)


def test_rsvd_many_on_several_devices_names_the_callers_matrix():
    bad = torch.randn(9, 7)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"mats\[2\] contains NaN"):
        ops.rsvd_many([torch.randn(9, 7, device="meta"), torch.randn(9, 7), bad], 2)


# ---------------------------------------------------------------------------------------------
# autograd and memory-safety of the in-place ops (as torch's own in-place ops behave)


def test_ops_under_autograd_raise_instead_of_wrong_gradients():
    """Ops without a derivative raise on backward (rsvd used to record its internal ATen calls and return
    a wrong gradient); project and reconstruct have one (tests/test_project.py)."""
    W = torch.randn(12, 9, dtype=torch.float64, requires_grad=True)
    U, S, V = ops.rsvd(W, 3)
    with pytest.raises(RuntimeError, match="derivative for subspace_ext::rsvd is not implemented"):
        U.sum().backward()
    D = torch.randn(12, 9, dtype=torch.float64, requires_grad=True)
    C = ops.project_dense(torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))[0],
                          torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64))[0], D)
    with pytest.raises(RuntimeError, match="derivative for subspace_ext::project_dense is not implemented"):
        C.sum().backward()
    with torch.no_grad():   # what callers do: no graph, no error
        ops.rsvd(W, 3)


def test_in_place_ops_refuse_leaves_that_require_grad_and_bump_versions():
    W = torch.randn(10, 8)
    B = torch.nn.Parameter(torch.randn(10, 4))
    A = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.fuse_pairs_(W, B, A, torch.tensor([1]), 1.0)
    loss = (B * B).sum()   # saves B for backward
    with torch.no_grad():
        v = (W._version, B._version)
        ops.fuse_pairs_(W, B, A, [1, 2], 1.0)   # one layer's idx as a plain list
        assert W._version > v[0] and B._version > v[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()   # instead of a gradient computed from the zeroed B
    out = torch.empty(5)
    v = out._version
    ops._ops.philox_normal_(out, 1, 0)
    assert out._version > v


def test_in_place_ops_refuse_read_arguments_that_require_grad():
    """torch's in-place ops record the history of what they read (W.addmm_(B, A) with A requiring grad gives
    W a grad_fn); these have no derivative and dropped it without a word: W held values that depend on A,
    with no history. Refused under grad mode, naming the argument; pair_importance, an optimizer-like
    statistic, runs under no_grad itself."""
    W, B = torch.randn(6, 5), torch.randn(6, 3)
    A = torch.randn(3, 5, requires_grad=True)
    before = W.clone()
    with pytest.raises(RuntimeError, match=r"fuse_pairs_: its argument A requires grad.*torch.no_grad\(\)"):
        ops.fuse_pairs_(W, B, A, torch.tensor([0]), 1.0)
    assert torch.equal(W, before)
    W2, B2, A2 = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="reinit_pairs_: its argument B_new requires grad"):
        ops.reinit_pairs_(W2, B2, A2, torch.tensor([0]), torch.randn(6, 1, requires_grad=True), torch.randn(1, 5), 1.0)
    want = before + B[:, :1] @ A.detach()[:1]
    with torch.no_grad():
        ops.fuse_pairs_(W, B, A, torch.tensor([0]), 1.0)
    torch.testing.assert_close(W, want)
    P = torch.nn.Parameter(torch.randn(3, 5))
    scores = ops.pair_importance(P, B, torch.randn(3, 5), torch.randn(6, 3), *ops.importance_state([P], [B]))
    assert not scores[0].requires_grad
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level(), torch.no_grad():   # a tangent is dropped in grad mode or not
        with pytest.raises(RuntimeError, match="fuse_pairs_: its argument A carries a forward-mode tangent"):
            ops.fuse_pairs_(W, B, fwad.make_dual(torch.randn(3, 5), torch.ones(3, 5)), torch.tensor([1]), 1.0)
    with pytest.raises(RuntimeError, match="pair_importance_: its argument A requires grad"):
        ops._ops.pair_importance_([P], [B], [torch.randn(3, 5)], [torch.randn(6, 3)], [torch.zeros(3, 5)],
                                  [torch.zeros(6, 3)], [torch.zeros(3, 5)], [torch.zeros(6, 3)], [torch.empty(3)],
                                  0.85, 0.85)


@pytest.mark.parametrize("op", ["fuse", "reinit", "importance"])
def test_in_place_ops_bump_versions_in_inference_mode(op):
    """torch.inference_mode skips the Autograd kernels; an in-place op must still bump the version of a
    normal tensor it writes (as torch's own do), or a backward that saved it runs on the new values."""
    W, B, A = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
    saved = {"fuse": W, "reinit": A, "importance": torch.zeros(3, 5)}[op]
    x = torch.randn(2, saved.numel(), requires_grad=True)
    y = (x @ saved.reshape(-1, 1)).sum()   # saves the tensor the op writes
    with torch.inference_mode():
        if op == "fuse":
            ops.fuse_pairs_(W, B, A, torch.tensor([0]), 1.0)
        elif op == "reinit":
            ops.reinit_pairs_(W, B, A, torch.tensor([1]), torch.ones(6, 1), torch.ones(1, 5), 1.0)
        else:
            ops.pair_importance(A, B, torch.randn(3, 5), torch.randn(6, 3), saved, torch.zeros(6, 3),
                                torch.zeros(3, 5), torch.zeros(6, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():   # inference tensors have no version counter: written, nothing to bump
        Wi, Bi, Ai = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
        want = Wi + Bi[:, :1] @ Ai[:1]
        ops.fuse_pairs_(Wi, Bi, Ai, torch.tensor([0]), 1.0)
        torch.testing.assert_close(Wi, want)


@pytest.mark.parametrize("op", ["fuse", "reinit", "importance", "philox"])
def test_in_place_ops_refuse_inference_tensors_outside_inference_mode(op):
    """torch refuses an in-place update of an inference tensor outside inference_mode; so do these, and
    before the kernel runs (torch's own write first, then raise): nothing is written."""
    with torch.inference_mode():
        W, B, A = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
        state = [torch.rand(3, 5), torch.rand(6, 3), torch.rand(3, 5), torch.rand(6, 3)]
    before = [t.clone() for t in (W, B, A, *state)]
    with pytest.raises(RuntimeError, match="inference tensor outside torch.inference_mode"):
        if op == "fuse":
            ops.fuse_pairs_(W, B, A, torch.tensor([0]), 1.0)
        elif op == "reinit":
            ops.reinit_pairs_(W, B, A, torch.tensor([1]), torch.ones(6, 1), torch.ones(1, 5), 1.0)
        elif op == "importance":
            ops.pair_importance(A, B, torch.randn(3, 5), torch.randn(6, 3), *state)
        else:
            ops._ops.philox_normal_(W, 1, 0)
    for t, b in zip((W, B, A, *state), before):
        assert torch.equal(t, b)
    with torch.inference_mode():   # where torch allows it, so do these
        ops.fuse_pairs_(W, B, A, torch.tensor([0]), 1.0)
    torch.testing.assert_close(W, before[0] + before[1][:, :1] @ before[2][:1])


@pytest.mark.parametrize("case", ["expanded-W", "expanded-B", "B_new-view-of-B", "A_new-view-of-A"])
def test_recompose_refuses_self_overlapping_and_aliased_arguments(case):
    W, B, A = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
    Bn, An = torch.randn(6, 2), torch.randn(2, 5)
    if case == "expanded-W":
        W = torch.randn(1, 5).expand(6, 5)
    elif case == "expanded-B":
        B = torch.randn(6, 1).expand(6, 3)
    elif case == "B_new-view-of-B":
        Bn = B[:, 0:2]
    else:
        An = A[0:2]
    before = [t.clone() for t in (W, B, A)]
    match = {"B_new-view-of-B": "B_new shares memory with B,", "A_new-view-of-A": "A_new shares memory with A,"}
    with pytest.raises(ValueError, match=match.get(case, "sharing memory")):
        ops.reinit_pairs_(W, B, A, torch.tensor([1, 0]), Bn, An, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, (W, B, A)))


@pytest.mark.parametrize("aliased", ["A_new is layer 1's A", "B_new is a slice of layer 0's W"])
def test_reinit_refuses_new_pairs_aliasing_another_layer(device, aliased):
    """Layers are recomposed in parallel, so one layer's new pair must not be (part of) a tensor
    another layer writes: that was a race (layer 0 read A_new while layer 1 rewrote it)."""
    m, n = 6, 5
    rnd = lambda *s: torch.randn(*s, device=device)
    W, B, A = [rnd(m, n), rnd(m, n)], [rnd(m, 3), rnd(m, 1)], [rnd(3, n), rnd(1, n)]
    Bn, An = [rnd(m, 1), rnd(m, 1)], [rnd(1, n), rnd(1, n)]
    if aliased == "A_new is layer 1's A":
        An[0] = A[1]
        first, second = "layer 0's A_new", "layer 1's A"
    else:
        Bn[1] = W[0][:, 1:2]
        first, second = "layer 0's W", "layer 1's B_new"
    before = [t.clone() for t in W + B + A]
    with pytest.raises(ValueError, match=f"{first} and {second} share memory"):
        ops.reinit_pairs_(W, B, A, [torch.tensor([2]), torch.tensor([0])], Bn, An, [1.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(before, W + B + A))


@pytest.mark.parametrize("case", ["strided B_new of its own", "column slice W", "B_new beside B in one buffer"])
def test_reinit_accepts_strided_arguments_that_share_nothing(case):
    """Strided views are compared element by element: new pairs that are slices of their own buffer,
    a column slice of a weight, or a B_new in the same buffer as B but in other columns are taken
    (and computed as the reference says), not refused as aliases."""
    m, n, r, q = 9, 7, 4, 2
    W, B, A = torch.randn(m, n, dtype=torch.float64), torch.randn(m, r, dtype=torch.float64), \
        torch.randn(r, n, dtype=torch.float64)
    Bn, An = torch.randn(m, 5, dtype=torch.float64)[:, :q], torch.randn(q, n, dtype=torch.float64)
    if case == "column slice W":
        W, Bn = torch.randn(m, n + 3, dtype=torch.float64)[:, :n], Bn.contiguous()
    elif case == "B_new beside B in one buffer":
        X = torch.randn(m, r + q, dtype=torch.float64)
        B, Bn = X[:, :r], X[:, r:]
    idx = [3, 0]
    W_ref, B_ref, A_ref = ref.reinit_pairs_ref(W.clone(), B.clone(), A.clone(), idx, Bn.clone(), An.clone(), 0.5)
    ops.reinit_pairs_(W, B, A, torch.tensor(idx), Bn, An, 0.5)
    torch.testing.assert_close(W, W_ref, rtol=0, atol=1e-12)
    assert torch.equal(B, B_ref) and torch.equal(A, A_ref)


def test_pair_importance_refuses_aliased_states_and_empty_layers():
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    ipt_A, ipt_B, unc_A, unc_B = ops.importance_state([A], [B])
    with pytest.raises(ValueError, match="unc_A and layer 0's ipt_A share memory"):
        ops.pair_importance([A], [B], [gA], [gB], ipt_A, ipt_B, ipt_A, unc_B)
    with pytest.raises(ValueError, match="share memory"):   # one state for two layers
        ops.pair_importance([A, A.clone()], [B, B.clone()], [gA, gA], [gB, gB], ipt_A * 2, ipt_B * 2,
                            [unc_A[0], unc_A[0]], unc_B * 2)
    E = torch.randn(3, 0)
    with pytest.raises(ValueError, match="must not be empty"):
        ops.pair_importance([E], [B], [E], [gB], *ops.importance_state([E], [B]))


def test_recompose_argument_forms():
    import numpy as np

    W, B, A = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), \
        torch.randn(3, 5, dtype=torch.float64)
    W2, B2 = W.clone(), B.clone()
    ops.fuse_pairs_(W, B, A, [0], torch.tensor(2.0))   # 0-d tensor scaling
    ops.fuse_pairs_(W2, B2, A, [0], np.float32(2.0))
    assert torch.equal(W, W2)
    with pytest.raises(ValueError, match="scaling must be finite"):
        ops.fuse_pairs_(W, B, A, [1], float("nan"))
    assert torch.equal(ops.philox_normal(4, np.int64(3)), ops.philox_normal((4,), 3))
    with pytest.raises(ValueError, match="eps"):
        ops.perturbed_basis(torch.randn(4, 2), -0.1, 0)
