"""Does a trained LoRA update lie in its base weight's leading singular directions (SOLAR's premise)?

    .venv/bin/python bench/solar_alignment.py ADAPTER_DIR [ADAPTER_DIR ...] [--base MODEL] [--k 32]

For every adapted layer (ΔW = s B A, m x n, base W0 = U Σ Vᵀ) prints, and summarises over layers:

* ``left``: the share of ‖ΔW‖² in the top-k left singular directions of W0, ‖U_kᵀ ΔW‖² / ‖ΔW‖²;
  a ΔW with no relation to W0 gets k / m on average ("random" column);
* ``both``: the share in the k x k block U_kᵀ ΔW V_k that SOLAR's leading coefficients cover; random:
  (k / m)(k / n);
* ``top1``: the share of ΔW's own top singular pair, σ₁² / Σσ² (what one rank-1 truncated-SVD
  component keeps).

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


def layer_alignment(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, k: int) -> dict:
    W0, B, A = W0.double(), B.double(), A.double()
    U, _, Vh = torch.linalg.svd(W0, full_matrices=False)
    Uk, Vk = U[:, :k], Vh[:k].T
    gram = lambda X, Y: float(((X.T @ X) * (Y @ Y.T)).sum())  # noqa: E731  ‖X Y‖_F² from factors
    total = gram(B, A)
    left = gram(Uk.T @ B, A) / total
    both = gram(Uk.T @ B, A @ Vk) / total
    s = torch.linalg.svdvals(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T)  # singular values of B A
    m, n = W0.shape
    return {"left": left, "both": both, "top1": float(s[0] ** 2 / (s ** 2).sum()),
            "random_left": k / m, "random_both": (k / m) * (k / n)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="+", help="peft LoRA adapter folders")
    p.add_argument("--base", default=None, help="base model folder or .safetensors (default: the bundled MiniLM)")
    p.add_argument("--k", type=int, default=32, help="leading singular directions of W0 (default 32)")
    args = p.parse_args(argv)
    bw = BaseWeights(args.base or models.minilm_dir())
    rows = []
    for folder in args.adapters:
        for u in PeftAdapter.load(folder).updates():
            key = bw.key_for_module(u.module)
            W0 = as_update_layout(bw.get(key), u.fan_in_fan_out)
            r = layer_alignment(W0, u.B, u.A, min(args.k, *W0.shape))
            rows.append(r)
            print(f"{os.path.basename(os.path.normpath(folder))} {u.module}: left {100 * r['left']:.1f}% "
                  f"(random {100 * r['random_left']:.1f}%), both {100 * r['both']:.2f}% "
                  f"(random {100 * r['random_both']:.2f}%), top1 {100 * r['top1']:.1f}%")
    mean = lambda key: 100 * statistics.mean(r[key] for r in rows)  # noqa: E731
    print(f"\n{len(rows)} layers, k = {args.k}: mean share of ||dW||^2 in W0's top-k left directions "
          f"{mean('left'):.1f}% (random {mean('random_left'):.1f}%), in the k x k block {mean('both'):.2f}% "
          f"(random {mean('random_both'):.2f}%); dW's own top singular pair "
          f"{min(100 * r['top1'] for r in rows):.0f}-{max(100 * r['top1'] for r in rows):.0f}% "
          f"(mean {mean('top1'):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
