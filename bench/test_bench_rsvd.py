"""rsvd_many vs a loop of torch.svd_lowrank vs a loop of torch.linalg.svd on the MiniLM weights; the
batched small problems inside it (the cores' SVD, the bases' Gram transform) vs torch's batched ops."""
from __future__ import annotations

import pytest
import torch

from subspace_ext import bench, ops

IMPLS = {"rsvd_many": bench.rsvd_ours, "svd_lowrank loop": bench.svd_lowrank_loop,
         "linalg.svd loop": bench.svd_truncated_loop}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rank", [8, 32])
def test_rsvd(benchmark, minilm, rank: int, impl: str) -> None:
    benchmark.group = f"rsvd: MiniLM-L6 {len(minilm)} weights, rank {rank}"
    factors = benchmark(IMPLS[impl], minilm, rank)
    benchmark.extra_info["frob_error_sum"] = bench.frob_error(minilm, factors)


@pytest.mark.parametrize("impl", ["small_svd", "linalg.svd batched"])
@pytest.mark.parametrize("batch,l", bench.SMALL_SVD_CASES)
def test_small_svd(benchmark, batch: int, l: int, impl: str) -> None:
    benchmark.group = f"small SVD: {batch} x ({l}x{l}) float64 (rsvd's cores)"
    A = bench.small_svd_inputs(batch, l)
    fn = ops.small_svd if impl == "small_svd" else bench.linalg_svd_batched
    benchmark(fn, A)


@pytest.mark.parametrize("impl", ["gram_orth", "cholesky + solve_triangular", "small_svd of G"])
@pytest.mark.parametrize("batch,l", bench.SMALL_SVD_CASES)
def test_gram_orth(benchmark, batch: int, l: int, impl: str) -> None:
    benchmark.group = f"Gram orthonormalising transform: {batch} x ({l}x{l}) float64 (rsvd's bases)"
    G = bench.gram_inputs(batch, l)
    fn = {"gram_orth": torch.ops.subspace_ext._gram_orth, "cholesky + solve_triangular": bench.cholesky_inverse_batched,
          "small_svd of G": ops.small_svd}[impl]
    benchmark(fn, G)
