"""Does TF32 change the randomized SVD's error? An emulation on the CPU (no GPU needed).

    .venv/bin/python bench/tf32_error.py            # MiniLM's 37 weights + two larger synthetic ones
    .venv/bin/python bench/tf32_error.py --quick    # small synthetic matrices only (seconds)

TF32 tensor cores multiply float32 inputs rounded to 10 explicit mantissa bits and accumulate in
float32. `tf32()` rounds a float32 tensor that way: round-to-nearest-even, or truncation as the
worst case. The rsvd below is Halko–Martinsson–Tropp with rsvd_one's structure: sketch Y = A Ω,
`niter` power passes, projection B = Qᵀ A, SVD of B. The bases are orthonormalised in float64.
Each row compares Σ over matrices of ‖A − U S Vᵀ‖_F (the bench's error column) when
- every GEMM is float32;
- the power passes run in TF32 and the sketch and the projection in float32;
- every GEMM runs in TF32 (what torch.backends.cuda.matmul.allow_tf32 does to rsvd_many and to
  torch.svd_lowrank alike).
A difference of a few parts per million is what a different seed moves it; the 10x target is
"at equal error". Same Ω per matrix for all variants, so only the GEMM precision differs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

VARIANTS = ("float32", "TF32 power passes", "TF32 everywhere")


def tf32(x: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """float32 x rounded to TF32 (10 explicit mantissa bits), as a float32 tensor. Finite x only."""
    b = x.float().contiguous().view(torch.int32)
    if not truncate:  # round to nearest, ties to even, at bit 13
        b = b + 0xFFF + ((b >> 13) & 1)
    return (b & ~0x1FFF).view(torch.float32)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y.double())[0].float()


def rsvd(A: torch.Tensor, k: int, variant: str, oversample: int = 8, niter: int = 2, seed: int = 0,
         truncate: bool = False):
    """(U, S, V) in float64; `variant` one of VARIANTS."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    g = torch.Generator().manual_seed(seed)
    m, n = A.shape
    l = min(k + oversample, m, n)
    omega = torch.randn(n, l, generator=g)
    exact = lambda a, b: a @ b  # noqa: E731
    fast = lambda a, b: tf32(a, truncate) @ tf32(b, truncate)  # noqa: E731
    outer = fast if variant == "TF32 everywhere" else exact
    inner = exact if variant == "float32" else fast
    Q = _orth(outer(A, omega))
    for _ in range(niter):
        Q = _orth(inner(A, _orth(inner(A.T, Q))))
    B = outer(Q.T, A)
    U, S, Vh = torch.linalg.svd(B.double(), full_matrices=False)
    return Q.double() @ U[:, :k], S[:k], Vh[:k].T


def frob_error(mats, k: int, variant: str, truncate: bool = False) -> float:
    total = 0.0
    for i, A in enumerate(mats):
        U, S, V = rsvd(A, k, variant, seed=i, truncate=truncate)
        total += torch.linalg.matrix_norm(A.double() - (U * S) @ V.T).item()
    return total


def synthetic(quick: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    m, n = (256, 640) if quick else (2048, 5504)
    flat = torch.randn(m, n, generator=g) / n ** 0.5
    low = torch.randn(m, 64, generator=g) @ torch.randn(64, m, generator=g) / m + torch.randn(m, m, generator=g) / m
    return [flat, low]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small synthetic matrices only")
    ap.add_argument("--ranks", default="8,32,64", help="comma-separated ranks (default 8,32,64)")
    args = ap.parse_args(argv)
    sets = [("synthetic", synthetic(args.quick))]
    if not args.quick:
        from subspace_ext.bench import minilm_matrices
        sets.insert(0, ("MiniLM-L6 (37 weights)", minilm_matrices(None)))
    print("| matrices | rank | float32 | TF32 power passes (ppm) | TF32 everywhere (ppm) | TF32 everywhere, truncated (ppm) |")
    print("|---|---|---|---|---|---|")
    for name, mats in sets:
        for k in (int(r) for r in args.ranks.split(",")):
            base = frob_error(mats, k, "float32")
            ppm = lambda e: f"{e:.6f} ({(e / base - 1) * 1e6:+.1f})"  # noqa: E731
            print(f"| {name} | {k} | {base:.6f} | {ppm(frob_error(mats, k, 'TF32 power passes'))} | "
                  f"{ppm(frob_error(mats, k, 'TF32 everywhere'))} | "
                  f"{ppm(frob_error(mats, k, 'TF32 everywhere', truncate=True))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
