"""Plain-PyTorch / pure-Python float64 reference implementations of every subspace_ext op.

Nothing here calls the native kernels except where a reference needs the *same random test
matrix* as the kernel (rsvd's Omega), which is taken from ``subspace_ext.ops.philox_normal`` --
its correctness is checked separately in test_philox.py against the pure-Python Philox below.
"""
from __future__ import annotations

import math

import numpy as np

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


# ---------------------------------------------------------------------------------------------
# Bit-exact emulation of philox.h's Box-Muller (the kernels' arithmetic, op for op, with torch
# elementwise ops in the target dtype: IEEE-rounded +, -, *, / and numpy's sqrt, no contraction). Used to
# check that every code path (scalar, lane-vectorised CPU, CUDA) produces exactly these bits.

def _signed_inv_factorial(n, k):
    f = 1.0
    for j in range(2, n + 1):
        f *= j
    return (-1.0 if k & 1 else 1.0) / f


def _horner(x2, coeffs, dtype):
    """h = c[N-1]; h = h * x2 + c[k] for k = N-2 .. 0 (coefficients rounded to dtype)."""
    h = torch.full_like(x2, float(torch.tensor(coeffs[-1], dtype=dtype)))
    for c in reversed(coeffs[:-1]):
        h = h * x2 + torch.tensor(c, dtype=dtype)
    return h


def _det_log(x, dtype):
    bits = {torch.float32: (torch.int32, 23, 0xFF, 127, 0x007FFFFF, 0x3F800000, 1.41421356, 7),
            torch.float64: (torch.int64, 52, 0x7FF, 1023, 0x000FFFFFFFFFFFFF, 0x3FF0000000000000,
                            1.4142135623730951, 13)}[dtype]
    itype, shift, emask, bias, mmask, one, sqrt2, terms = bits
    b = x.view(itype)
    e = ((b >> shift) & emask) - bias
    m = ((b & mmask) | one).view(dtype)
    high = m > torch.tensor(sqrt2, dtype=dtype)
    e = e + high.to(itype)
    m = torch.where(high, m * torch.tensor(0.5, dtype=dtype), m)
    s = (m - 1) / (m + 1)
    atanh = _horner(s * s, [1.0 / (2 * k + 1) for k in range(terms)] + [0.0], dtype)
    # Atanh<K..N> ends in 0 at K = N: h = 0 * s2 + c_{N-1} = c_{N-1} (exact), as above
    log_m = (2 * s) * atanh
    return e.to(dtype) * torch.tensor(0.69314718055994530942, dtype=dtype) + log_m


def _sincos_2pi(u, dtype):
    trig = 6 if dtype == torch.float32 else 10
    t = u * 4
    q = t.to(torch.int64)
    f = t - q.to(dtype)
    swap = f > 0.5
    f = torch.where(swap, 1 - f, f)
    x = f * torch.tensor(1.57079632679489661923, dtype=dtype)
    x2 = x * x
    sx = _horner(x2, [_signed_inv_factorial(2 * k + 1, k) for k in range(trig + 1)], dtype) * x
    cx = _horner(x2, [_signed_inv_factorial(2 * k, k) for k in range(trig + 1)], dtype)
    cp, sp = torch.where(swap, sx, cx), torch.where(swap, cx, sx)
    qq = q & 3
    odd = (qq & 1) == 1
    a, b = torch.where(odd, sp, cp), torch.where(odd, cp, sp)
    return torch.where((qq == 1) | (qq == 2), -a, a), torch.where(qq >= 2, -b, b)


def philox_normals_exact(words, dtype):
    """The normals philox.h makes from Philox words (int32 tensor, 4 per block), bit for bit."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(-1, 4)
    if dtype == torch.float32:
        a, b = w[:, 0::2].reshape(-1), w[:, 1::2].reshape(-1)  # pairs (0, 1), (2, 3)
        scale = torch.tensor(5.9604644775390625e-8, dtype=dtype)
        u1 = ((a >> 8) + 1).to(dtype) * scale
        u2 = (b >> 8).to(dtype) * scale
    else:
        a = (w[:, 0] << 21) | (w[:, 1] >> 11)
        b = (w[:, 2] << 21) | (w[:, 3] >> 11)
        scale = torch.tensor(1.1102230246251565404e-16, dtype=dtype)
        u1 = (a + 1).to(dtype) * scale
        u2 = b.to(dtype) * scale
    # numpy's sqrt is the IEEE (correctly rounded) one; torch's CPU float kernels may be off by an ulp
    r = torch.from_numpy(np.sqrt((torch.tensor(-2.0, dtype=dtype) * _det_log(u1, dtype)).numpy()))
    c, s = _sincos_2pi(u2, dtype)
    return torch.stack([r * c, r * s], dim=-1).reshape(-1)


def small_svd_jacobi_emulation(A):
    """Op-by-op emulation, in Python floats (IEEE double, one rounding per op, no FMA), of the
    one-sided Jacobi SVD of csrc/include/subspace_ext/small_svd.h for one p x q matrix, p >= q.
    The CPU and CUDA kernels must reproduce these bits exactly. Returns (U, S, V) as float64."""
    p, q = A.shape
    a = [[float(A[r, j]) for r in range(p)] for j in range(q)]  # columns
    biggest = max((abs(x) for col in a for x in col), default=0.0)
    e = max(math.frexp(biggest)[1], -1000) if biggest > 0 else 0
    a = [[x * math.ldexp(1.0, -e) for x in col] for col in a]  # exact: a power of two
    v = [[1.0 if r == j else 0.0 for r in range(q)] for j in range(q)]
    eps = 2.0 ** -52

    def dot(x, y):
        s = 0.0
        for xi, yi in zip(x, y):
            s = s + xi * yi
        return s

    def parted_dot(x, y, parts=16):
        """small_svd::kParts: row r into partial r % parts, then the halving tree."""
        s = [0.0] * parts
        for r, (xi, yi) in enumerate(zip(x, y)):
            s[r % parts] = s[r % parts] + xi * yi
        h = parts // 2
        while h >= 1:
            for j in range(h):
                s[j] = s[j] + s[j + h]
            h //= 2
        return s[0]

    qe = q + (q & 1)
    for _ in range(40):
        rotated = False
        for t in range(qe - 1):
            for i in range(qe // 2):
                x, y = (t, qe - 1) if i == 0 else ((t + i) % (qe - 1), (t - i + qe - 1) % (qe - 1))
                ca, cb = min(x, y), max(x, y)
                if cb >= q:
                    continue
                X, Y = a[ca], a[cb]
                alpha, beta, gamma = parted_dot(X, X), parted_dot(Y, Y), parted_dot(X, Y)
                if gamma == 0.0 or abs(gamma) <= (p * eps) * (math.sqrt(alpha) * math.sqrt(beta)):
                    continue
                zeta = (beta - alpha) / (2.0 * gamma)
                tt = 0.5 / zeta if abs(zeta) > 1e150 else \
                    math.copysign(1.0, zeta) / (abs(zeta) + math.sqrt(1.0 + zeta * zeta))
                c = 1.0 / math.sqrt(1.0 + tt * tt)
                s = c * tt
                for col in (a, v):
                    P, Q = col[ca], col[cb]
                    for r in range(len(P)):
                        xr, yr = P[r], Q[r]
                        P[r] = c * xr - s * yr
                        Q[r] = s * xr + c * yr
                rotated = True
        if not rotated:
            break
    norms = [math.sqrt(dot(col, col)) for col in a]
    order = sorted(range(q), key=lambda j: (-norms[j], j))
    S = torch.tensor([math.ldexp(norms[j], e) if norms[j] >= 2.2250738585072014e-308 else 0.0
                      for j in order],
                     dtype=torch.float64)
    U = torch.tensor([[a[j][r] / norms[j] if norms[j] >= 2.2250738585072014e-308 else 0.0 for j in order]
                      for r in range(p)], dtype=torch.float64)
    V = torch.tensor([[v[j][r] for j in order] for r in range(q)], dtype=torch.float64)
    return U, S, V


def gram_orth_ref(G):
    """float64 reference of _gram_orth for full-rank Gram matrices G = Y^T Y (..., q, q): the upper
    triangular T = R^-1 of the Cholesky factor G = R^T R (so Y T has orthonormal columns)."""
    R = torch.linalg.cholesky(G.double()).mT
    return torch.linalg.solve_triangular(R, torch.eye(G.shape[-1], dtype=torch.float64).expand_as(R), upper=True)


def gram_orth_emulation(G):
    """Op-by-op emulation, in Python floats (IEEE double, one rounding per op, no FMA), of
    csrc/include/subspace_ext/gram_orth.h for one q x q matrix (its upper triangle is read).
    The CPU and CUDA kernels must reproduce these bits exactly. Returns (T, complete)."""
    q = G.shape[0]
    g = [[float(G[i, k]) for k in range(q)] for i in range(q)]  # g[i][k], upper triangle i <= k
    tol = float(q) * 2.0 ** -52 * max([0.0] + [g[i][i] for i in range(q)])  # the kernel's maximum starts at 0
    r = [0.0] * q  # R's diagonal
    complete = True
    for j in range(q):
        dj = g[j][j]
        kept = dj > tol
        complete = complete and kept
        r[j] = math.sqrt(dj) if kept else 0.0
        for i in range(j + 1, q):
            g[j][i] = g[j][i] / r[j] if kept else 0.0
        for k in range(j + 1, q):
            for i in range(j + 1, k + 1):
                g[i][k] = g[i][k] - g[j][i] * g[j][k]
    T = [[0.0] * q for _ in range(q)]
    for j in range(q):
        tjj = 1.0 / r[j] if r[j] > 0.0 else 0.0
        T[j][j] = tjj
        for i in range(j - 1, -1, -1):
            s = 0.0
            for m in range(i + 1, j + 1):
                s = s + g[i][m] * T[m][j]
            T[i][j] = -s / r[i] if r[i] > 0.0 and tjj != 0.0 else 0.0
    return torch.tensor(T, dtype=torch.float64).reshape(q, q), complete


# ---------------------------------------------------------------------------------------------
# philox_normal(method="icdf"): one float32 normal per Philox word

def icdf_cell_mid(words):
    """The middle of word w's cell, as the p in (0, 1/2) whose quantile |z| is (int64 tensor).

    w's low 31 bits r give a = 2 r + 1, p = a / 2^33. For a >= 2^26 (p >= 2^-7, |z| < 2.42) the
    transform keeps the top 26 significant bits of a only: the 2^d neighbouring cells that share
    them (d = bits of a - 26) stand for the middle of their common range."""
    a = ((words.to(torch.int64) & 0x7FFFFFFF) << 1) | 1
    bits = torch.floor(torch.log2(a.double())).to(torch.int64) + 1  # a < 2^bits, exactly
    d = (bits - 26).clamp(min=0)
    base = (a >> d) << d
    return torch.where(d == 0, a, base + (1 << (d - 1).clamp(min=0))).double() / 2.0**33


def philox_normals_icdf_ref(words):
    """float64 standard normals of the icdf method: the exact quantile of each word's cell,
    negative where the word's top bit is set."""
    z = -torch.special.ndtri(icdf_cell_mid(words))
    return torch.where(words.to(torch.int64) & 0x80000000 != 0, -z, z)


def icdf_tool():
    """tools/fit_normal_icdf.py as a module: the table's definition (and its exact float32 fma)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "fit_normal_icdf.py"
    spec = importlib.util.spec_from_file_location("fit_normal_icdf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def philox_normals_icdf_exact(words, table):
    """philox.h's icdf_normal, op by op in float32 (each Horner step one exactly rounded fma), for
    int32 words and the (128, 8) float32 coefficient table: the bits every kernel must produce."""
    fma32 = icdf_tool().fma32
    w = words.to(torch.int64) & 0xFFFFFFFF
    a = ((w << 1) | 1) & 0xFFFFFFFF
    e = 31 - torch.floor(torch.log2(a.double())).to(torch.int64)
    n = (a << e) & 0xFFFFFFFF
    seg = 4 * e + ((n >> 29) & 3)
    m = ((~n) >> 6) & 0x7FFFFF
    v = ((0x3F800000 | m).to(torch.int32).view(torch.float32) - 1.0)
    c = table[seg]
    z = c[:, 5].clone()
    for k in range(4, -1, -1):
        z = torch.from_numpy(fma32(z.numpy(), v.numpy(), c[:, k].contiguous().numpy()))
    return torch.where(w & 0x80000000 != 0, -z, z)


# ---------------------------------------------------------------------------------------------
# SOLAR: the bases a base weight defines, the checksum of the used part, decoding one layer

def _normals64(rows, cols, seed, stream):
    """A rows x cols matrix of the float64 Philox normals of (seed, stream), row-major."""
    return philox_normals_ref(rows * cols, seed, stream, bits=64).reshape(rows, cols)


def orthonormal_columns_ref(P):
    """Q of P = Q R with R's diagonal positive: the columns' order and orientation kept."""
    Q, R = torch.linalg.qr(P)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(P.dtype)


TIE_TOL = 1e-8                 # singular values closer than this times the largest are tied
TIE_KEY = 0x7469657374696573   # XORed into the seed for the probes of tied subspaces


def untie_ref(U, S, V, seed, stream):
    """W0's singular vectors with every tie resolved by the seed: a trailing run of values within
    TIE_TOL * S[0] of zero (chained by gaps <= TIE_TOL * S[0]) is dropped (the completion spans it);
    in every other run of values chained by such gaps, U's columns Q_c become Q_c Q with
    Q_c^T G = Q R (G: normals of the key seed ^ TIE_KEY, stream 4 stream + 0; R's diagonal positive),
    V's likewise with stream 4 stream + 1."""
    s = S.tolist()
    k = len(s)
    if k == 0:
        return U, V
    tol = TIE_TOL * s[0]
    r = k
    while r > 0 and s[r - 1] <= tol:
        r -= 1
    if r < k:
        while r > 0 and s[r - 1] - s[r] <= tol:
            r -= 1
    U, V = U.clone(), V.clone()
    a = 0
    while a < r:
        b = a + 1
        while b < r and s[b - 1] - s[b] <= tol:
            b += 1
        if b - a > 1:
            for Q, side in ((U, 0), (V, 1)):
                Qc = Q[:, a:b]
                G = _normals64(Q.shape[0], b - a, seed ^ TIE_KEY, 4 * stream + side)
                Q[:, a:b] = Qc @ orthonormal_columns_ref(Qc.T @ G)
        a = b
    return U[:, :r], V[:, :r]


def solar_basis_ref(W0, seed, stream=0, eps=0.0):
    """(U (m x m), V (n x n)) in float64: W0's singular vectors (descending, canonical signs, ties
    resolved by untie_ref), completed with the float64 normals of streams 4 stream + 0 / 1 made
    orthogonal to them (two passes), then, for eps > 0, Q + eps / sqrt(d) N (streams 4 stream + 2 / 3)
    orthonormalised."""
    U, S, Vh = torch.linalg.svd(W0.detach().cpu().double(), full_matrices=False)
    U, V = canonical_signs(U, Vh.mT)
    U, V = untie_ref(U, S, V, seed, stream)

    def complete(Q, s):
        d, k = Q.shape
        if k == d:
            return Q
        N = _normals64(d, d - k, seed, 4 * stream + s)
        for _ in range(2):
            N = N - Q @ (Q.T @ N)
        return torch.cat([Q, orthonormal_columns_ref(N)], dim=1)

    def perturb(Q, s):
        if eps == 0:
            return Q
        d = Q.shape[0]
        return orthonormal_columns_ref(Q + _normals64(d, Q.shape[1], seed, 4 * stream + s) * (eps / math.sqrt(d)))

    return perturb(complete(U, 0), 2), perturb(complete(V, 1), 3)


def solar_checksum_ref(UI, VJ, seed, stream=0):
    """(g_u^T UI^T p_u, g_v^T VJ^T p_v) with probes of the complemented seed: p from streams
    4 stream + 0 / 1, g from 4 stream + 2 / 3."""
    key = ~seed

    def probe(Q, s):
        Q = Q.detach().cpu().double()
        p = _normals64(Q.shape[0], 1, key, 4 * stream + s)
        g = _normals64(1, Q.shape[1], key, 4 * stream + 2 + s)
        return (g @ (Q.T @ p)).reshape(1)

    return torch.cat([probe(UI, 0), probe(VJ, 1)])


def solar_decode_ref(U, V, values, indices, rank, scaling, seed, stream=0):
    """(B, A, checksum) of one layer, from the dense update: D = U_I C V_J^T with C holding values at
    the flat positions i * k2 + j; B = U_f sqrt(S / s), A = sqrt(S / s) V_f^T from D's exact truncated
    SVD (canonical signs), zero-padded to `rank` columns / rows."""
    U, V = U.detach().cpu().double(), V.detach().cpu().double()
    idx = indices.detach().cpu().long()
    k1, k2 = U.shape[1], V.shape[1]
    C = torch.zeros(k1 * k2, dtype=torch.float64)
    C[idx] = values.detach().cpu().double()
    C = C.reshape(k1, k2)
    I, J = torch.unique(idx // k2), torch.unique(idx % k2)
    B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, V.shape[0], dtype=torch.float64)
    k = min(rank, I.numel(), J.numel(), U.shape[0], V.shape[0])
    if k > 0:
        Uf, S, Vf = svd_ref(U[:, I] @ C[I][:, J] @ V[:, J].T, k)
        root = (S / scaling).sqrt()
        B[:, :k], A[:k] = Uf * root, (Vf * root).T
    return B, A, solar_checksum_ref(U[:, I], V[:, J], seed, stream)
