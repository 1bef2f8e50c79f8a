"""solar_basis (the bases SOLAR's encoder and both decoders regenerate for every layer) against the
same bases built in plain torch (Householder QR, torch.randn: not reproducible on another machine)."""
from __future__ import annotations

import pytest
import torch

from subspace_ext import bench, ops


@pytest.mark.parametrize("impl", ["solar_basis", "torch: linalg.svd + randn + linalg.qr"])
@pytest.mark.parametrize("eps", [0.0, bench.PERTURB_EPS])
@pytest.mark.parametrize("shape", bench.FULL.project_shapes[1:], ids=lambda s: f"{s[0]}x{s[1]}")
def test_solar_basis(benchmark, shape: tuple[int, int], eps: float, impl: str) -> None:
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    benchmark.group = f"solar_basis: {shape[0]}x{shape[1]}, eps={eps:g}"
    fn = (lambda: ops.solar_basis(W, 0, 0, eps)) if impl == "solar_basis" else (lambda: bench.solar_basis_torch(W, eps))
    benchmark.extra_info["orthonormality_error"] = bench.orthonormality_error(benchmark(fn))
