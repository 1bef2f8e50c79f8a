"""Shared workloads for the pytest-benchmark suite (built once per session).

The workloads and the plain-PyTorch baselines come from ``subspace_ext.bench`` so that this suite
and ``subspace-ext bench`` measure the same thing.
"""
from __future__ import annotations

import pytest
import torch

from subspace_ext import bench

NUM_LAYERS = 200  # LoRA layers for pair_importance / fuse_pairs_ / reinit_pairs_


@pytest.fixture(scope="session")
def minilm() -> list[torch.Tensor]:
    """The 37 Linear weights of the bundled MiniLM-L6 (float32); skips if the package is missing."""
    try:
        return bench.minilm_matrices()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def layers() -> bench.LoraLayers:
    """``NUM_LAYERS`` random LoRA layers with MiniLM shapes; tests clone before mutating."""
    return bench.lora_layers(NUM_LAYERS)


def pytest_report_header(config: pytest.Config) -> str:
    return f"subspace_ext bench: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {bench.cpu_model()}"
