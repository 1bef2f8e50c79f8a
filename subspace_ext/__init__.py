"""subspace_ext: native kernels for subspace-based adapter methods (SOLAR, EigenLoRAx, SRLoRA).

    import subspace_ext as se
    U, S, V = se.ops.rsvd(W, 8)

The kernels are registered as torch.ops.subspace_ext.*; `subspace_ext.ops` is the typed,
checked Python entry point to them.
"""
from . import ops
from .ops import cuda_enabled

__version__ = "0.1.0"
__all__ = ["ops", "cuda_enabled", "__version__"]
