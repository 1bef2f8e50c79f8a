"""Does a trained LoRA update lie in its base weight's leading singular directions (SOLAR's premise)?

    .venv/bin/python bench/solar_alignment.py ADAPTER_DIR [ADAPTER_DIR ...] [--base MODEL] [--k 32]

For every adapted layer (ΔW = s B A, m x n, base W0 = U Σ Vᵀ) prints, and summarises over layers:

* ``left``: the share of ‖ΔW‖² in the top-k left singular directions of W0, ‖U_kᵀ ΔW‖² / ‖ΔW‖²;
  a ΔW with no relation to W0 gets k / m on average ("random" column);
* ``both``: the share in the k x k block U_kᵀ ΔW V_k that SOLAR's leading coefficients cover; random:
  (k / m)(k / n);
* ``top1``: the share of ΔW's own top singular pair, σ₁² / Σσ² (what one rank-1 truncated-SVD
  component keeps);
* ``topc`` and ``block``: with ``--ratio`` of the layer's LoRA numbers (m + n) r to store, the share of
  the coefficients C = Uᵀ ΔW V (complete bases) that SOLAR keeps, its largest |c| (a value and an index
  each), against the best leading k1 x k2 block of C (DESIGN.md's alternative: a value each, plus k1
  and k2).

All from the factors (no m x n product); float64. The base defaults to the bundled MiniLM.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from subspace_ext import models  # noqa: E402
from subspace_ext.io import BaseWeights, PeftAdapter, as_update_layout  # noqa: E402


def block_or_top(C: torch.Tensor, numbers: int) -> tuple:
    """Shares of ‖C‖² that ``numbers`` stored numbers keep: C's largest |c| (2 numbers each) and C's
    best leading k1 x k2 block (1 number each, 2 for k1 and k2)."""
    total, c2 = float((C * C).sum()), C * C
    keep = numbers // 2
    top = float(c2.flatten().topk(min(keep, c2.numel())).values.sum()) if keep > 0 else 0.0
    cum = c2.cumsum(0).cumsum(1)   # cum[i, j]: the energy of the leading (i + 1) x (j + 1) block
    k1 = torch.arange(1, C.shape[0] + 1)
    k2 = ((numbers - 2) // k1).clamp(max=C.shape[1])
    ok = k2 >= 1
    block = float(cum[k1[ok] - 1, k2[ok] - 1].max()) if bool(ok.any()) else 0.0
    return top / total, block / total


def layer_alignment(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, k: int, ratio: float = 0.1) -> dict:
    W0, B, A = W0.double(), B.double(), A.double()
    U, _, Vh = torch.linalg.svd(W0, full_matrices=True)
    m, n = W0.shape
    topc, block = block_or_top((U.T @ B) @ (A @ Vh.T), int(ratio * (m + n) * A.shape[0]))
    Uk, Vk = U[:, :k], Vh[:k].T
    gram = lambda X, Y: float(((X.T @ X) * (Y @ Y.T)).sum())  # noqa: E731  ‖X Y‖_F² from factors
    total = gram(B, A)
    left = gram(Uk.T @ B, A) / total
    both = gram(Uk.T @ B, A @ Vk) / total
    s = torch.linalg.svdvals(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T)  # singular values of B A
    return {"left": left, "both": both, "top1": float(s[0] ** 2 / (s ** 2).sum()),
            "random_left": k / m, "random_both": (k / m) * (k / n), "topc": topc, "block": block}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+", help="peft LoRA adapter folders")
    p.add_argument("--base", default=None, help="base model folder or .safetensors (default: the bundled MiniLM)")
    p.add_argument("--k", type=int, default=32, help="leading singular directions of W0 (default 32)")
    p.add_argument("--ratio", type=float, default=0.1,
                   help="numbers to store / the layer's LoRA numbers, for topc and block (default 0.1)")
    args = p.parse_args(argv)
    bw = BaseWeights(args.base or models.minilm_dir())
    rows = []
    for folder in args.adapters:
        for u in PeftAdapter.load(folder).updates():
            key = bw.key_for_module(u.module)
            W0 = as_update_layout(bw.get(key), u.fan_in_fan_out)
            r = layer_alignment(W0, u.B, u.A, min(args.k, *W0.shape), args.ratio)
            rows.append(r)
            print(f"{os.path.basename(os.path.normpath(folder))} {u.module}: left {100 * r['left']:.1f}% "
                  f"(random {100 * r['random_left']:.1f}%), both {100 * r['both']:.2f}% "
                  f"(random {100 * r['random_both']:.2f}%), top1 {100 * r['top1']:.1f}%, "
                  f"topc {100 * r['topc']:.1f}%, block {100 * r['block']:.1f}%")
    mean = lambda key: 100 * statistics.mean(r[key] for r in rows)  # noqa: E731
    print(f"\n{len(rows)} layers, k = {args.k}: mean share of ||dW||^2 in W0's top-k left directions "
          f"{mean('left'):.1f}% (random {mean('random_left'):.1f}%), in the k x k block {mean('both'):.2f}% "
          f"(random {mean('random_both'):.2f}%); dW's own top singular pair "
          f"{min(100 * r['top1'] for r in rows):.0f}-{max(100 * r['top1'] for r in rows):.0f}% "
          f"(mean {mean('top1'):.0f}%); at {args.ratio:g} of a layer's LoRA numbers, its largest coefficients "
          f"{mean('topc'):.1f}%, its best leading block {mean('block'):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
