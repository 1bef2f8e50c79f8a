"""rsvd_many vs a loop of torch.svd_lowrank vs a loop of torch.linalg.svd on the MiniLM weights."""
from __future__ import annotations

import pytest

from subspace_ext import bench

IMPLS = {"rsvd_many": bench.rsvd_ours, "svd_lowrank loop": bench.svd_lowrank_loop,
         "linalg.svd loop": bench.svd_truncated_loop}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rank", [8, 32])
def test_rsvd(benchmark, minilm, rank: int, impl: str) -> None:
    benchmark.group = f"rsvd: MiniLM-L6 {len(minilm)} weights, rank {rank}"
    factors = benchmark(IMPLS[impl], minilm, rank)
    benchmark.extra_info["frob_error_sum"] = bench.frob_error(minilm, factors)
