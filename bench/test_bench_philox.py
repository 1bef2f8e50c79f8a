"""philox_normal (Box-Muller and icdf methods) vs torch.randn: 2^24 float32 standard normals."""
from __future__ import annotations

import pytest
import torch

from subspace_ext import ops

NUMEL = 2 ** 24
IMPLS = {"philox_normal": lambda: ops.philox_normal((NUMEL,), seed=0),
         "philox_normal icdf": lambda: ops.philox_normal((NUMEL,), seed=0, method="icdf"),
         "torch.randn": lambda: torch.randn(NUMEL)}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_philox_normal(benchmark, impl: str) -> None:
    benchmark.group = "philox_normal: 2^24 float32"
    benchmark(IMPLS[impl])
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["GB/s (median)"] = NUMEL * 4 / benchmark.stats.stats.median / 1e9
