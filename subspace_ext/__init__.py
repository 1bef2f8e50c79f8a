"""subspace_ext: native kernels for subspace-based adapter methods (SOLAR, EigenLoRAx, SRLoRA).

    import subspace_ext as se
    U, S, V = se.ops.rsvd(W, 8)
    pkg = se.solar.compress("adapter_dir", "base_model_dir", ratio=0.1)

The kernels are registered as torch.ops.subspace_ext.*; `subspace_ext.ops` is the typed,
checked Python entry point to them. The methods live in se.solar, se.eigenlorax and se.srlora
(imported on first use), file formats in se.io. Every warning they give is a se.SubspaceExtWarning.
"""
import importlib

from . import ops
from ._warn import SubspaceExtWarning
from .ops import cuda_enabled

__version__ = "0.1.0"
_SUBMODULES = ("solar", "eigenlorax", "srlora", "io")
__all__ = ["ops", "cuda_enabled", "SubspaceExtWarning", "__version__", *_SUBMODULES]


def __getattr__(name):
    # se.solar, se.eigenlorax, se.srlora, se.io: imported on first use (they pull in peft/transformers)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
