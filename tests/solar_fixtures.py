"""Fixtures and helpers for test_solar.py: one real LoRA adapter trained on the bundled MiniLM per
session, sub-adapters of it, and a memo of SOLAR bases (``ops.solar_basis`` on a 384 x 384 weight
costs seconds on 2 cores; the tests that are about the basis itself call the real op)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from subspace_ext import data, io, models, ops, train

# The real op, captured before any test patches it.
REAL_SOLAR_BASIS = ops.solar_basis

PEFT_PREFIX = "base_model.model."
# The two LoRA modules of encoder layer 0 (the one-layer and AdaLoRA tests use them).
SMALL_MODULES = ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value")


class BasisMemo:
    """Memo of ``ops.solar_basis`` keyed by (W0's content hash, seed, stream, eps, thread count)."""

    def __init__(self):
        self.store = {}
        self.real_calls = 0

    def __call__(self, W0, seed, stream=0, eps=0.0):
        key = (io.fingerprint(W0), seed, stream, float(eps), torch.get_num_threads())
        if key not in self.store:
            self.real_calls += 1
            self.store[key] = REAL_SOLAR_BASIS(W0, seed, stream, eps)
        U, V = self.store[key]
        return U.clone(), V.clone()


# ---------------------------------------------------------------------------------------------
# helpers

def dense_updates(adapter: io.PeftAdapter):
    """{module: s * B @ A in float64} of every adapted layer."""
    return {u.module: u.scaling * (u.B.double() @ u.A.double()) for u in adapter.updates()}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float(torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref))


def sub_adapter(adapter: io.PeftAdapter, modules, *, extra: bool = True) -> io.PeftAdapter:
    """The adapter restricted to ``modules`` (peft module paths), with or without its extra tensors.
    When the modules are all of encoder layer 0, the config says so (peft's layers_to_transform)."""
    keep = {}
    for k, v in adapter.tensors.items():
        is_lowrank = any(k.startswith(f"{PEFT_PREFIX}{m}.lora_") for m in modules)
        if is_lowrank or (extra and k in adapter.extra_tensors()):
            keep[k] = v.clone()
    cfg = copy.deepcopy(adapter.config)
    if all(".layer.0." in m for m in modules):
        cfg["layers_to_transform"] = [0]
    if not extra:
        cfg["modules_to_save"] = None
    return io.PeftAdapter(cfg, keep)


def safetensors_data_start(path: str) -> int:
    """Offset of the first tensor byte of a safetensors file (8-byte header length + header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n


def write_base_copy(src_dir, dst: str, *, modify=None, drop=(), replace=None) -> str:
    """Copy the base model's tensors into one .safetensors file, optionally nudging some weights
    (``modify``: {key: fn(tensor) -> tensor}), dropping keys or replacing tensors."""
    tensors = io.read_safetensors(os.path.join(str(src_dir), "model.safetensors"))
    for k in drop:
        del tensors[k]
    for k, fn in (modify or {}).items():
        tensors[k] = fn(tensors[k].clone()).contiguous()
    for k, v in (replace or {}).items():
        tensors[k] = v.contiguous()
    save_file(tensors, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module", autouse=True)
def basis_memo():
    """``ops.solar_basis`` memoised for the whole module that imports this fixture (autouse there)."""
    memo = BasisMemo()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "solar_basis", memo)
        yield memo


@pytest.fixture(scope="session")
def minilm_base() -> str:
    return str(models.minilm_dir())


@pytest.fixture(scope="session")
def base_weights(minilm_base) -> io.BaseWeights:
    return io.BaseWeights(minilm_base)


@pytest.fixture(scope="session")
def trained_adapter_dir(tmp_path_factory) -> str:
    """A real peft LoRA folder (r=8 on query/value, classifier head saved) trained once per session."""
    out = str(tmp_path_factory.mktemp("solar_trained") / "adapter")
    task = data.word_task("vader-polarity", limit=1200)
    train.train_lora_adapter(task, out, steps=40, lr=2e-3, r=8)
    return out


@pytest.fixture(scope="session")
def trained_adapter(trained_adapter_dir) -> io.PeftAdapter:
    return io.PeftAdapter.load(trained_adapter_dir)


@pytest.fixture(scope="session")
def lora_only_adapter(trained_adapter) -> io.PeftAdapter:
    """The trained adapter's 12 LoRA layers without its extra tensors (the classifier head)."""
    return sub_adapter(trained_adapter, [u.module for u in trained_adapter.updates()], extra=False)


@pytest.fixture(scope="session")
def one_layer_adapter(trained_adapter) -> io.PeftAdapter:
    """Only the layer-0 query LoRA of the trained adapter."""
    return sub_adapter(trained_adapter, SMALL_MODULES[:1], extra=False)


def read_json(path):
    with open(path) as f:
        return json.load(f)
