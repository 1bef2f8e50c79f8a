"""Plain-PyTorch / pure-Python float64 reference implementations of every subspace_ext op.

Nothing here calls the native kernels except where a reference needs the *same random test
matrix* as the kernel (rsvd's Omega), which is taken from ``subspace_ext.ops.philox_normal`` --
its correctness is checked separately in test_philox.py against the pure-Python Philox below.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85


# ---------------------------------------------------------------------------------------------
# Philox4x32-10 (Random123), pure Python ints

def philox4x32_10(ctr, key, rounds=10):
    """Random123 Philox4x32 with ``rounds`` rounds. ctr: 4 uint32, key: 2 uint32 -> 4 uint32."""
    c0, c1, c2, c3 = (int(x) & MASK32 for x in ctr)
    k0, k1 = (int(x) & MASK32 for x in key)
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        p0 = M0 * c0
        p1 = M1 * c2
        hi0, lo0 = p0 >> 32, p0 & MASK32
        hi1, lo1 = p1 >> 32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return (c0, c1, c2, c3)


def block_bits(seed, stream, block):
    """The 4 words of Philox block ``block`` of (seed, stream), as philox.h's block_bits."""
    seed &= (1 << 64) - 1
    stream &= (1 << 64) - 1
    ctr = (block & MASK32, (block >> 32) & MASK32, stream & MASK32, (stream >> 32) & MASK32)
    return philox4x32_10(ctr, (seed & MASK32, (seed >> 32) & MASK32))


def philox_words(n, seed, stream=0):
    """The first n uint32 words of (seed, stream): word i = block i // 4, lane i % 4."""
    out = []
    for b in range((n + 3) // 4):
        out.extend(block_bits(seed, stream, b))
    return out[:n]


def philox_uint32_ref(shape, seed, stream=0):
    """int32 tensor with the same bit pattern as the kernel's philox_uint32."""
    n = math.prod(shape)
    words = philox_words(n, seed, stream)
    signed = [w - (1 << 32) if w >= (1 << 31) else w for w in words]
    return torch.tensor(signed, dtype=torch.int32).reshape(tuple(shape))


def _box_muller(u1, u2):
    r = math.sqrt(-2.0 * math.log(u1))
    t = 2.0 * math.pi * u2
    return r * math.cos(t), r * math.sin(t)


def philox_normals_ref(n, seed, stream=0, bits=32):
    """First n standard normals of (seed, stream) in float64 math from the Philox bits.

    bits=32: the float32 recipe (4 normals per block, 24-bit uniforms);
    bits=64: the float64 recipe (2 normals per block, 53-bit uniforms from two words each).
    """
    out = []
    if bits == 32:
        for b in range((n + 3) // 4):
            x = block_bits(seed, stream, b)
            for pair in range(2):
                a, c = x[2 * pair], x[2 * pair + 1]
                u1 = ((a >> 8) + 1) * 2.0 ** -24
                u2 = (c >> 8) * 2.0 ** -24
                out.extend(_box_muller(u1, u2))
    elif bits == 64:
        for b in range((n + 1) // 2):
            x = block_bits(seed, stream, b)
            a = (x[0] << 21) | (x[1] >> 11)
            c = (x[2] << 21) | (x[3] >> 11)
            u1 = (a + 1) * 2.0 ** -53
            u2 = c * 2.0 ** -53
            out.extend(_box_muller(u1, u2))
    else:
        raise ValueError(bits)
    return torch.tensor(out[:n], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# linear algebra helpers

def canonical_signs(U, V):
    """Flip column pairs so the largest-|.| entry of each U column is positive (ties: first)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(U.gather(-2, idx) < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, V * sign


def rsvd_ref(A, rank, oversample=8, niter=2, seed=0):
    """HMT randomized SVD of a 2-D A in float64 with the kernel's test matrix.

    Omega is drawn in A's dtype (as the kernel does) and then promoted to float64.
    """
    m, n = A.shape
    l = min(rank + oversample, m, n)
    dt = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
    from subspace_ext import ops  # local import: only the test matrix comes from the extension

    omega = ops.philox_normal((n, l), seed, 0, dtype=dt).double()
    Ad = A.detach().cpu().double()
    Q = torch.linalg.qr(Ad @ omega).Q
    for _ in range(niter):
        Z = torch.linalg.qr(Ad.T @ Q).Q
        Q = torch.linalg.qr(Ad @ Z).Q
    Bm = Q.T @ Ad
    Ub, S, Vh = torch.linalg.svd(Bm, full_matrices=False)
    U = Q @ Ub[:, :rank]
    V = Vh[:rank].T
    U, V = canonical_signs(U, V)
    return U, S[:rank], V


def svd_ref(A, rank=None):
    """Exact truncated SVD in float64 with canonical signs."""
    U, S, Vh = torch.linalg.svd(A.detach().cpu().double(), full_matrices=False)
    k = S.shape[-1] if rank is None else rank
    U, V = canonical_signs(U[..., :k], Vh[..., :k, :].mT)
    return U, S[..., :k], V


def project_ref(U, V, B, A, scaling=1.0):
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    return d(U).mT @ (scaling * (d(B) @ d(A))) @ d(V)


def project_dense_ref(U, V, D):
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    return d(U).mT @ d(D) @ d(V)


def reconstruct_ref(U, C, V):
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    return d(U) @ d(C) @ d(V).mT


def factored_svd_ref(B, A, rank=None):
    return svd_ref(B.detach().cpu().double() @ A.detach().cpu().double(), rank)


# ---------------------------------------------------------------------------------------------
# importance / fusion

def pair_importance_ref(A, B, gA, gB, iA, iB, uA, uB, beta1=0.85, beta2=0.85):
    """One AdaLoRA step for every layer in float64. Returns (scores, iA, iB, uA, uB) (new lists)."""
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    scores, niA, niB, nuA, nuB = [], [], [], [], []

    def upd(p, g, ipt, unc):
        I = (d(p) * d(g)).abs()
        ipt = beta1 * d(ipt) + (1 - beta1) * I
        unc = beta2 * d(unc) + (1 - beta2) * (I - ipt).abs()
        return ipt, unc

    for l in range(len(A)):
        ia, ua = upd(A[l], gA[l], iA[l], uA[l])
        ib, ub = upd(B[l], gB[l], iB[l], uB[l])
        scores.append((ia * ua).mean(dim=1) + (ib * ub).mean(dim=0))
        niA.append(ia)
        niB.append(ib)
        nuA.append(ua)
        nuB.append(ub)
    return scores, niA, niB, nuA, nuB


def fuse_pairs_ref(W, B, A, idx, scaling=1.0):
    """(W', B') in float64: W' = W + s B[:, idx] A[idx, :]; B'[:, idx] = 0."""
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    idx = torch.as_tensor(idx, dtype=torch.long).cpu()
    W2 = d(W) + scaling * (d(B)[:, idx] @ d(A)[idx, :])
    B2 = d(B).clone()
    B2[:, idx] = 0
    return W2, B2


def reinit_pairs_ref(W, B, A, idx, B_new, A_new, scaling=1.0):
    """(W', B', A') in float64 for reinit_pairs_."""
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    idx = torch.as_tensor(idx, dtype=torch.long).cpu()
    W2 = d(W) + scaling * (d(B)[:, idx] @ d(A)[idx, :] - d(B_new) @ d(A_new))
    B2 = d(B).clone()
    A2 = d(A).clone()
    B2[:, idx] = d(B_new)
    A2[idx, :] = d(A_new)
    return W2, B2, A2


# ---------------------------------------------------------------------------------------------
# test-data helpers

def orthonormality_error(Q):
    Qd = Q.detach().cpu().double()
    k = Qd.shape[-1]
    return (Qd.mT @ Qd - torch.eye(k, dtype=torch.float64)).abs().max().item()


def decaying_matrix(m, n, decay=0.7, dtype=torch.float64, generator=None):
    """A = U diag(s) V^T with random orthogonal U, V and s = decay ** arange; returns (A, s)."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator)).Q
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype), s


def optimal_error(s, k):
    return float(torch.sqrt((s[k:] ** 2).sum()))
