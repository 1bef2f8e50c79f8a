"""Peak memory and time of ``solar.compress`` on a synthetic many-layer model.

    .venv/bin/python bench/solar_memory.py --layers 48 --shape 1024 2048 [--method solar] [--ratio 0.1]
                                           [--cache-mib 1024] [--rank 8]

Writes a base of ``--layers`` random m x n weights and a random rank ``--rank`` LoRA adapter on all of
them (into a temporary folder, or ``--work DIR`` to reuse the base between runs), compresses once in
this process and prints the peak resident memory (ru_maxrss), the time, the float64 size of one
layer's U, V and C, and a digest of the package's stored tensors (equal digests: equal packages, e.g.
with and without the basis cache). Run each setting in its own process: the peak is per process.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from subspace_ext import io, solar  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48, help="number of adapted m x n layers (48)")
    ap.add_argument("--shape", type=int, nargs=2, default=[1024, 2048], metavar=("M", "N"),
                    help="each layer's out x in shape (1024 2048)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the synthetic adapter (8)")
    ap.add_argument("--method", choices=solar.METHODS, default="solar", help="solar.compress method (solar)")
    ap.add_argument("--ratio", type=float, default=0.1, help="stored numbers / adapter numbers (0.1)")
    ap.add_argument("--cache-mib", type=float, default=None,
                    help="solar.BASIS_CACHE_BYTES in MiB (default: the library's, 1024)")
    ap.add_argument("--work", default=None, help="folder for the synthetic base (default: a temporary one)")
    return ap


def synthetic(work: str, layers: int, m: int, n: int, rank: int):
    base = os.path.join(work, f"base_{layers}x{m}x{n}.safetensors")
    if not os.path.exists(base):
        g = torch.Generator().manual_seed(0)
        save_file({f"model.layers.{i}.proj.weight": torch.randn(m, n, generator=g) / n ** 0.5
                   for i in range(layers)}, base)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        prefix = f"base_model.model.model.layers.{i}.proj"
        tensors[prefix + ".lora_A.weight"] = 0.01 * torch.randn(rank, n, generator=g)
        tensors[prefix + ".lora_B.weight"] = 0.01 * torch.randn(m, rank, generator=g)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj"],
              "fan_in_fan_out": False, "use_rslora": False}
    return base, io.PeftAdapter(config, tensors)


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    m, n = a.shape
    if a.cache_mib is not None:
        solar.BASIS_CACHE_BYTES = int(a.cache_mib * 2 ** 20)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = synthetic(a.work or tmp, a.layers, m, n, a.rank)
        start = time.perf_counter()
        pkg = solar.compress(adapter, base, ratio=a.ratio, method=a.method)
        seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    digest = hashlib.sha256()
    for t in [*pkg.values, *pkg.indices, *(x for f in pkg.factors if f for x in f)]:
        digest.update(t.contiguous().numpy().tobytes())
    out = {"layers": a.layers, "shape": f"{m}x{n}", "method": a.method, "ratio": a.ratio,
           "cache_mib": (solar.BASIS_CACHE_BYTES / 2 ** 20 if hasattr(solar, "BASIS_CACHE_BYTES")
                         else None),  # None: a build before the basis cache (it kept every layer's)
           "seconds": round(seconds, 2),
           "peak_rss_mib": round(peak_mib), "layer_u_v_c_mib": round((m * m + n * n + m * n) * 8 / 2 ** 20, 1),
           "digest": digest.hexdigest()[:16]}
    print(" ".join(f"{k}={v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
