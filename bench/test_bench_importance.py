"""pair_importance, fuse_pairs_ and reinit_pairs_ over 200 layers vs per-layer Python loops."""
from __future__ import annotations

import pytest
import torch

from subspace_ext import bench, ops

IMPORTANCE = {"pair_importance": ops.pair_importance, "Python loop": bench.importance_loop}


@pytest.mark.parametrize("impl", list(IMPORTANCE))
def test_pair_importance(benchmark, layers: bench.LoraLayers, impl: str) -> None:
    fn = IMPORTANCE[impl]
    benchmark.group = f"pair_importance: {len(layers.A)} layers, r={bench.LORA_RANK}"
    states = ops.importance_state(layers.A, layers.B)
    benchmark(fn, layers.A, layers.B, layers.grad_A, layers.grad_B, *states)
    ref = bench.importance_scores(bench.importance_loop, layers.clone(torch.float64))
    benchmark.extra_info["rel_error_vs_float64"] = bench.rel_error(bench.importance_scores(fn, layers), ref)


@pytest.mark.parametrize("impl", ["ours", "Python loop"])
@pytest.mark.parametrize("op", list(bench.PAIR_OPS))
def test_pairs(benchmark, layers: bench.LoraLayers, op: str, impl: str) -> None:
    ours, loop, takes_new = bench.PAIR_OPS[op]
    fn = ours if impl == "ours" else loop
    idx = bench.pair_indices(layers)
    new = bench.new_pairs(layers, idx) if takes_new else ()
    benchmark.group = f"{op}: {len(layers.W)} layers, {len(idx[0])} pairs each"
    benchmark(bench.apply_pairs, fn, layers.clone(), idx, new)  # in place; every call does the same work
    ref = bench.apply_pairs(loop, layers.clone(torch.float64), idx, [[t.double() for t in ts] for ts in new])
    benchmark.extra_info["rel_error_vs_float64"] = bench.rel_error(
        bench.apply_pairs(fn, layers.clone(), idx, new), ref)
