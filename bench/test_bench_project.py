"""project (U^T B)(A V) vs the dense U^T (s B A) V, with the two skinny GEMMs as the floor."""
from __future__ import annotations

import pytest
import torch

from subspace_ext import bench, ops

IMPLS = {"project": ops.project, "dense U.T@(B@A)@V": bench.project_dense,
         "floor U.T@B, A@V": bench.project_floor}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", bench.FULL.project_shapes, ids=lambda s: f"{s[0]}x{s[1]}")
def test_project(benchmark, shape: tuple[int, int], impl: str) -> None:
    inputs = bench.project_inputs(*shape)
    benchmark.group = f"project: {shape[0]}x{shape[1]}, r={bench.LORA_RANK}, k={inputs[0].shape[1]}"
    out = benchmark(IMPLS[impl], *inputs)
    if isinstance(out, torch.Tensor):
        ref = bench.project_dense(*(t.double() for t in inputs))
        benchmark.extra_info["rel_error_vs_float64"] = bench.rel_error([out], [ref])


@pytest.mark.parametrize("impl", ["project_perturbed (fused)", "perturbed_basis + project"])
@pytest.mark.parametrize("shape", bench.FULL.project_shapes, ids=lambda s: f"{s[0]}x{s[1]}")
def test_project_perturbed(benchmark, shape: tuple[int, int], impl: str) -> None:
    U, V, B, A = bench.project_inputs(*shape)
    benchmark.group = f"project_perturbed: {shape[0]}x{shape[1]}, eps={bench.PERTURB_EPS}"
    if impl.startswith("project_perturbed"):
        benchmark(lambda: ops.project_perturbed(U, V, B, A, eps=bench.PERTURB_EPS, seed=0))
    else:
        benchmark(bench.project_unfused, U, V, B, A)


@pytest.mark.parametrize("impl", ["reconstruct_perturbed (fused)", "perturbed_basis + reconstruct", "reconstruct (floor)"])
@pytest.mark.parametrize("shape", bench.FULL.project_shapes, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reconstruct_perturbed(benchmark, shape: tuple[int, int], impl: str) -> None:
    U, V, _, _ = bench.project_inputs(*shape)
    C = torch.randn(U.shape[1], V.shape[1])
    benchmark.group = f"reconstruct_perturbed: {shape[0]}x{shape[1]}, eps={bench.PERTURB_EPS}"
    if impl.startswith("reconstruct_perturbed"):
        benchmark(lambda: ops.reconstruct_perturbed(U, C, V, eps=bench.PERTURB_EPS, seed=0))
    elif impl.startswith("perturbed_basis"):
        benchmark(bench.reconstruct_unfused, U, C, V)
    else:
        benchmark(ops.reconstruct, U, C, V)
