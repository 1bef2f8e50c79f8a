"""Typed, checked entry points to the native kernels (torch.ops.subspace_ext.*).

This is the only module that calls ``torch.ops.subspace_ext``. Every function validates its
arguments and raises ``TypeError`` / ``ValueError`` naming the offending argument; the C++ kernels
check again (as ``ValueError``/``TypeError`` too) for callers that use ``torch.ops`` directly.

Conventions (peft): a LoRA update is ``scaling * B @ A`` with ``B`` = ``lora_B.weight`` (m x r) and
``A`` = ``lora_A.weight`` (r x n); a base weight ``W`` is (m x n) = (out_features x in_features).
Singular factors are returned as ``U`` (m x k), ``S`` (k), ``V`` (n x k) with ``A ~ U diag(S) V^T``,
``S`` descending, and each column pair's sign fixed so the largest-magnitude entry of ``U[:, j]`` is
positive (so the same matrix gives the same factors on every machine, up to floating-point rounding:
GEMM libraries sum in a thread-count-dependent order). ``small_svd`` keeps Jacobi's signs.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import re
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as _fwad

from . import _warn


def _load_failure(error: ImportError, folder: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """Why the native library did not load, and what to do: not built in this folder (a source checkout),
    or built against another torch (the torch it names is read from the file's bytes)."""
    from importlib.machinery import EXTENSION_SUFFIXES   # this interpreter's file, where several are built
    libs = [p for p in (os.path.join(folder, "_C" + s) for s in EXTENSION_SUFFIXES) if os.path.isfile(p)]
    if not libs:
        return (f"subspace_ext's native library (_C) is not built in {folder}: in a source checkout run `pip install "
                "--no-build-isolation -e .` (or `make build`) there; to use an installed subspace_ext, run from "
                f"outside the checkout ({error})")
    with open(libs[0], "rb") as f:
        built = re.search(rb"subspace_ext: built against torch ([^\0]{1,64})\0", f.read())
    against = f"torch {built.group(1).decode(errors='replace')}" if built else "another torch"
    if against == f"torch {torch.__version__}":
        return f"{libs[0]} does not load ({error}); it was built against this torch, {torch.__version__}"
    return (f"{libs[0]} does not load with torch {torch.__version__} ({error}). It was built against {against}, and "
            "a native torch extension loads only with the torch it was built against: rebuild it with this one "
            "(`pip install --no-build-isolation --force-reinstall --no-deps <subspace_ext source>`, or `make build` in "
            "a checkout)")


try:
    from . import _C  # loads the library, which registers the ops
except ImportError as _e:
    raise ImportError(_load_failure(_e)) from _e


def _release(version: str) -> str:
    """major.minor: torch keeps its C++ ABI within a release series."""
    return ".".join(version.split("+")[0].split(".")[:2])


_BUILT_AGAINST = getattr(_C, "torch_version", lambda: "unknown")()   # "unknown": a build before it was recorded
if _BUILT_AGAINST != "unknown" and _release(_BUILT_AGAINST) != _release(torch.__version__):
    _warn.warn(f"subspace_ext was built against torch {_BUILT_AGAINST} and runs with torch {torch.__version__}: "
               "a native torch extension is only guaranteed to work with the torch it was built against; rebuild "
               "it (`pip install --no-build-isolation --force-reinstall --no-deps <subspace_ext source>`)",
               stacklevel=2)

_ops = torch.ops.subspace_ext
_FLOAT = (torch.float32, torch.float64)
_WEIGHT = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# The project family's arguments that are model weights (an adapter's factors, a dense update): these
# may be half precision, computed in the bases' dtype; the bases and coefficients are _FLOAT.
_PROJECT_WEIGHTS = ("B", "A", "D")


# The ops that accept CUDA tensors in a CUDA build: hand-written kernels (csrc/cuda: Philox,
# perturbed_basis, pair_importance_, fuse/reinit) or, for the rsvd, project and solar families,
# the CPU path's ATen composition on the device (cuBLAS/cuSOLVER + our Philox kernel). An op
# missing here raises a clear error for CUDA tensors instead of a dispatcher error.
CUDA_OPS = frozenset({"philox_uint32_", "philox_normal_", "philox_normal_icdf_", "perturbed_basis",
                      "pair_importance_", "fuse_pairs_", "reinit_pairs_", "rsvd", "rsvd_many", "factored_svd", "project",
                      "project_dense", "reconstruct", "solar_basis", "solar_checksum", "solar_decode",
                      "_rsvd_batched", "_small_svd", "_gram_orth", "project_perturbed",
                      "reconstruct_perturbed"})


_CUDA_ENABLED = bool(_C.cuda_enabled())  # read once: torch.compile cannot trace the pybind call (a graph break)


def cuda_enabled() -> bool:
    """True if this build of the extension contains the CUDA kernels."""
    return _CUDA_ENABLED


# ---------------------------------------------------------------------------------------------
# argument checks

def _tensor(x, name, dtypes=_FLOAT, min_dim=2, op=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout} (.to_dense())")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    if x.is_cuda and not _CUDA_ENABLED:
        raise ValueError(
            f"{name} is a CUDA tensor but this build of subspace_ext has no CUDA kernels "
            "(rebuild with nvcc and a CUDA torch, or SUBSPACE_EXT_CUDA=1); move it to the CPU")
    if x.is_cuda and op is not None and op not in CUDA_OPS:
        raise ValueError(
            f"{name} is a CUDA tensor, but {op} has no CUDA implementation yet (CUDA: "
            f"{', '.join(sorted(CUDA_OPS))}); move it to the CPU")
    if x.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} is on device {x.device}; subspace_ext supports cpu and cuda")
    return x


def _plain_layers(lists, dtypes_of) -> bool:
    """The common case in one cheap pass (no names formatted, no per-tensor calls): every entry a
    tensor of its list's dtypes (``dtypes_of(list name)``), at least 2-D, on CPU, meta or (in a
    CUDA build) CUDA, and each layer's tensors on one device. False sends the caller through its
    per-tensor checks, which name what is wrong. A per-step op over hundreds of layers (SRLoRA calls
    pair_importance every step) otherwise spends milliseconds here."""
    cuda_ok = _CUDA_ENABLED
    first = None
    for n, v in lists.items():
        dtypes = dtypes_of(n)
        if first is None:
            first = v
        # t0: the same layer's tensor of the first list; is_cuda/get_device compare devices without
        # building a torch.device per tensor
        for t, t0 in zip(v, first):
            if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or t.dim() < 2:
                return False
            if t.is_cuda:
                if not (cuda_ok and t0.is_cuda and t.get_device() == t0.get_device()):
                    return False
            elif not ((t.is_cpu and t0.is_cpu) or (t.is_meta and t0.is_meta)):
                return False
    return True


def _refuse_layouts(lists) -> None:
    """A TypeError naming the first tensor of ``lists`` ({name: [one per layer]}) that is not dense (strided): the
    per-step ops' fast path does not look (a cost per tensor and step), so their callers come here when a kernel
    fails (a sparse tensor fails at the dispatcher, or in .contiguous()) to say which argument it was."""
    for n, v in lists.items():
        for l, t in enumerate(v):
            if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                raise TypeError(f"{n}[{l}] must be a dense (strided) tensor, got layout {t.layout} (.to_dense())")


def _same_device(named):
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        desc = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"arguments must be on one device, got {desc}")


def _batch_broadcasts(named, op):
    """The batch dimensions (all but the last two) of the named tensors broadcast together."""
    if all(t.dim() <= 2 for _, t in named):
        return   # one layer: nothing to broadcast (torch.broadcast_shapes' first call imports sympy: 0.4 s)
    try:
        torch.broadcast_shapes(*(t.shape[:-2] for _, t in named))
    except RuntimeError:
        desc = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)
        raise ValueError(f"{op}: batch dimensions (all but the last two) do not broadcast: {desc}") from None


def _device_groups(tensors) -> list:
    """Indices of ``tensors`` grouped by device, in order of first appearance: the multi-layer ops
    make one native call per device (a model split over GPUs, or partly offloaded to the CPU)."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return list(groups.values())


def _pick(items, idx):
    return [items[i] for i in idx]


def _per_device(groups, run, numbered: str) -> None:
    """``run(g)`` for each device group; with several groups an error names the caller's layer
    numbers (``numbered``: the regex of a number in the kernels' messages, e.g. ``layer (\\d+)``)."""
    for g in groups:
        try:
            run(g)
        except (ValueError, TypeError) as e:
            if len(groups) == 1:
                raise
            msg = re.sub(numbered, lambda m: m.group(0).replace(m.group(1), str(g[int(m.group(1))])), str(e))
            raise type(e)(msg) from None


def _int(x, name, lo=None) -> int:
    if isinstance(x, torch.SymInt):   # a symbolic size (torch.export, make_fx): kept symbolic, not specialised
        if lo is not None:
            torch._check(x >= lo, lambda: f"{name} must be >= {lo}, got {x}")
        return x
    if not isinstance(x, (int, bool, torch.Tensor)) and hasattr(x, "__index__"):
        x = operator.index(x)  # numpy integers (a tensor is refused: a size is a Python number)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


def _seed(x, name="seed"):
    if isinstance(x, torch.Tensor):   # a one-element integer tensor (numpy integers: _int)
        if x.numel() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a {str(x.dtype).replace('torch.', '')} tensor of shape "
                            f"{tuple(x.shape)}")
        x = operator.index(x)
    x = _int(x, name)
    if not -(2**63) <= x < 2**64:
        raise ValueError(f"{name} must fit in 64 bits, got {x}")
    return x - 2**64 if x >= 2**63 else x  # the kernels read the 64 bits as unsigned


def _shape(shape) -> tuple:
    """A shape given as an int or a sequence of ints (>= 0)."""
    dims = (shape,) if not isinstance(shape, (tuple, list, torch.Size)) else tuple(shape)
    dims = tuple(operator.index(d) if isinstance(d, torch.Tensor) else d for d in dims)   # 0-dim integer tensors
    return tuple(_int(d, f"shape {dims}: a size", 0) for d in dims)


def _numpy(x) -> bool:
    """Whether x is a numpy array or scalar, told without importing numpy (the ops do not need it)."""
    return type(x).__module__ == "numpy"


def _real(x, name: str) -> float:
    """A finite number given as a Python/numpy number or a one-element real tensor / numpy array (not a str, not a
    bool). Symbolic numbers (torch.compile) pass: the finiteness test is a comparison, which traces."""
    if type(x) is float and -math.inf < x < math.inf:
        return x   # the common case first: project's scaling, on every call
    if isinstance(x, torch.Tensor):
        if x.numel() == 1 and x.dtype != torch.bool and not x.is_complex():
            x = x.item()
    elif _numpy(x) and getattr(x, "size", 0) == 1 and x.dtype.kind in "iuf":
        x = x.item()   # a numpy scalar or one-element array
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    if not -math.inf < x < math.inf:   # not math.isfinite: it does not trace for a SymFloat
        raise ValueError(f"{name} must be finite, got {x!r}")
    return float(x)


# ---------------------------------------------------------------------------------------------
# philox

def philox_normal(shape, seed: int, stream: int = 0, *, dtype=torch.float32, device="cpu",
                  method: str = "box_muller") -> torch.Tensor:
    """Standard normal numbers from Philox4x32-10 keyed by (seed, stream).

    Element i (row-major) depends only on (seed, stream, i): the result is bit-identical for any
    thread count and on CPU and CUDA.

    method="box_muller" (the default, and what perturbed_basis, rsvd and SOLAR packages use): an
    exactly rounded Box-Muller transform; float32 uses 4 normals per Philox block, float64 2.
    method="icdf" (float32 only): one normal per Philox word (element i from word i of
    philox_uint32), by a piecewise-polynomial inverse normal CDF of the word's cell, within 2 ulp of
    the exact quantile and reaching |z| = 6.3; about half of Box-Muller's instructions on a GPU
    (on a CPU it is slower: the table reads do not vectorise).
    The two methods give different numbers.
    """
    if dtype not in _FLOAT:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if method not in ("box_muller", "icdf"):
        raise ValueError(f"method must be 'box_muller' or 'icdf', got {method!r}")
    if method == "icdf" and dtype != torch.float32:
        raise TypeError(f"method='icdf' makes float32 numbers only, got dtype {dtype}")
    out = torch.empty(_shape(shape), dtype=dtype, device=device)
    _tensor(out, "out", min_dim=0)
    fill = _ops.philox_normal_ if method == "box_muller" else _ops.philox_normal_icdf_
    fill(out, _seed(seed), _seed(stream, "stream"))
    return out


def philox_uint32(shape, seed: int, stream: int = 0, *, device="cpu") -> torch.Tensor:
    """The raw Philox4x32-10 words of (seed, stream) as int32 (word i = block i//4, lane i%4)."""
    out = torch.empty(_shape(shape), dtype=torch.int32, device=device)
    _tensor(out, "out", dtypes=(torch.int32,), min_dim=0)
    _ops.philox_uint32_(out, _seed(seed), _seed(stream, "stream"))
    return out


def perturbed_basis(U: torch.Tensor, eps: float, seed: int, stream: int = 0, *,
                    orthonormalize: bool = False) -> torch.Tensor:
    """``U + eps * philox_normal(U.shape, seed, stream)``, optionally re-orthonormalised (the Q of
    Q R with R's diagonal positive: the columns keep their order and orientation).

    The noise is generated inside the kernel and never stored.
    """
    _tensor(U, "U")
    _check_eps(eps)
    return _ops.perturbed_basis(U, float(eps), _seed(seed), _seed(stream, "stream"), bool(orthonormalize))


# ---------------------------------------------------------------------------------------------
# rsvd

def _check_rank(rank, m, n, name="rank", bound="min(m, n)") -> int:
    rank = _int(rank, name)
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"{name} must be in [1, {bound} = {min(m, n)}], got {rank}")
    return rank


def rsvd(A: torch.Tensor, rank: int, *, oversample: int = 8, niter: int = 2, seed: int = 0):
    """Randomized truncated SVD of ``A`` (..., m, n): ``(U (..., m, k), S (..., k), V (..., n, k))``.

    Halko-Martinsson-Tropp with ``rank + oversample`` Philox test vectors and ``niter`` power
    iterations (re-orthonormalised after every product). Deterministic for a given ``seed``.
    float32/float64 in, the same dtype out; bfloat16/float16 weights are computed in float32 (one
    float32 copy of the matrix at a time) and give float32 factors.
    """
    _tensor(A, "A", dtypes=_WEIGHT, op="rsvd")
    rank = _check_rank(rank, A.shape[-2], A.shape[-1])
    return _ops.rsvd(A, rank, _int(oversample, "oversample", 0), _int(niter, "niter", 0), _seed(seed))


def rsvd_many(mats: Sequence[torch.Tensor], rank: int, *, oversample: int = 8, niter: int = 2,
              seed: int = 0):
    """``rsvd`` of every 2-D matrix in ``mats`` (mixed shapes) in one call, spread over threads.

    Returns a list of ``(U, S, V)``; entry i equals ``rsvd(mats[i], ...)`` (dtypes as in ``rsvd``:
    bfloat16/float16 weights need no float32 copy of the whole list first): bit-for-bit with one
    thread; with several, each matrix's GEMMs here may run on fewer threads than ``rsvd``'s, and GEMM
    libraries sum in a thread-count-dependent order, so the two agree to rounding (~1e-6 in float32).
    On CUDA the matrices of one shape run as one batch, likewise equal to rounding.
    The matrices may live on different devices (one call per device; results stay on each).
    """
    if isinstance(mats, torch.Tensor) or not isinstance(mats, (list, tuple)):
        raise TypeError("mats must be a list or tuple of 2-D tensors")
    rank = _int(rank, "rank")
    for i, A in enumerate(mats):
        _tensor(A, f"mats[{i}]", dtypes=_WEIGHT, op="rsvd_many")
        if A.dim() != 2:
            raise ValueError(f"mats[{i}] must be 2-D, got shape {tuple(A.shape)}")
        _check_rank(rank, A.shape[0], A.shape[1], f"rank (for mats[{i}] of shape {tuple(A.shape)})")
    oversample, niter = _int(oversample, "oversample", 0), _int(niter, "niter", 0)
    if not mats:
        return []
    out = [None] * len(mats)

    def run(g):
        U, S, V = _ops.rsvd_many(_pick(mats, g), rank, oversample, niter, _seed(seed))
        for i, u, s_, v in zip(g, U, S, V):
            out[i] = (u, s_, v)
    _per_device(_device_groups(mats), run, r"mats\[(\d+)\]")
    return out


def factored_svd(B: torch.Tensor, A: torch.Tensor, rank: Optional[int] = None):
    """SVD of ``B @ A`` (B m x r, A r x n) from its factors, never forming the m x n product.

    Cost O((m + n) r^2). Returns ``(U (m x k), S (k), V (n x k))``, k = rank or min(m, n, r).
    bfloat16/float16 factors are computed in float32 (float32 results). An update on a basis,
    ``Ũ C Ṽᵀ``, is ``factored_svd(Ũ @ C, Ṽ.mT)`` (what ``solar_decode`` does).
    """
    _tensor(B, "B", dtypes=_WEIGHT, op="factored_svd")
    _tensor(A, "A", dtypes=_WEIGHT, op="factored_svd")
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(f"B and A must be 2-D, got {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B (m x r) and A (r x n) do not chain: {tuple(B.shape)} and {tuple(A.shape)}")
    _same_device([("B", B), ("A", A)])
    full = min(B.shape[0], A.shape[1], B.shape[1])
    rank = _check_rank(full if rank is None else rank, full, full, bound="min(m, n, r)")
    return _ops.factored_svd(B, A, rank)


def small_svd(A: torch.Tensor):
    """SVD of every small matrix of ``A`` (..., p, q): ``(U (..., p, k), S (..., k), V (..., q, k))``.

    k = min(p, q), S descending, ``A = U diag(S) V^T``; rank-deficient inputs still get orthonormal
    U and V. One-sided Jacobi in float64 (results in A's dtype), all matrices of the batch at once:
    one thread block per matrix on CUDA (one launch), the same bits on CPU and CUDA. Meant for the
    many small problems of randomized SVDs (rsvd's l x l cores); p, q <= 4096. Column signs are
    Jacobi's, not the canonical ones of ``rsvd`` (callers that need them fix them).
    """
    _tensor(A, "A", op="_small_svd")
    return _ops._small_svd(A)


# ---------------------------------------------------------------------------------------------
# project

def _dtypes(name: str) -> tuple:
    """The dtypes a project-family argument takes, by its name: the model weights (_PROJECT_WEIGHTS) may be
    half precision; the bases and coefficients are _FLOAT."""
    return _WEIGHT if name in _PROJECT_WEIGHTS else _FLOAT


def _check_tensors(named, op) -> bool:
    """Each (name, tensor) of ``named`` a tensor of its ``_dtypes``, all on one device. True when all are dense
    2-D CPU tensors (one layer: no batch dimensions to broadcast), told in one cheap pass; otherwise the
    per-tensor checks, which name what is wrong and cost ~5 µs for project's four tensors, half its kernel at
    SOLAR's sizes."""
    for n, t in named:
        if not (isinstance(t, torch.Tensor) and t.is_cpu and t.layout == torch.strided and t.dim() == 2
                and t.dtype in _dtypes(n)):
            break
    else:
        return True
    for n, t in named:
        _tensor(t, n, dtypes=_dtypes(n), op=op)
    _same_device(named)
    return False


def _check_project_args(U, V, B, A, op):
    named = [("U", U), ("V", V), ("B", B), ("A", A)]
    plain = _check_tensors(named, op)
    if not (U.shape[-2] == B.shape[-2] and B.shape[-1] == A.shape[-2] and A.shape[-1] == V.shape[-2]):
        raise ValueError(
            f"{op}: shapes do not chain (need U m x k1, B m x r, A r x n, V n x k2): U {tuple(U.shape)}, "
            f"B {tuple(B.shape)}, A {tuple(A.shape)}, V {tuple(V.shape)}")
    if not plain:
        _batch_broadcasts(named, op)


def project(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
            scaling: float = 1.0) -> torch.Tensor:
    """Coefficients ``U^T (scaling * B @ A) V`` computed as ``scaling * (U^T B)(A V)``.

    U (..., m, k1), V (..., n, k2), B (..., m, r), A (..., r, n) -> C (..., k1, k2); the m x n
    update is never formed. U and V are float32 or float64 (C has their dtype); B and A have theirs,
    or are bfloat16/float16 (a half-precision adapter's factors), computed in it.
    """
    _check_project_args(U, V, B, A, "project")
    _constant_scaling(scaling, "project")
    scaling = _real(scaling, "project: scaling")
    if _transformed(U, V, B, A):
        with _no_autocast(U):   # the op itself keeps autocast out (U's dtype): so does its stand-in
            return scaling * ((U.mT @ B.to(U.dtype)) @ (A.to(U.dtype) @ V))
    return _ops.project(U, V, B, A, scaling)


def _no_autocast(t: torch.Tensor):
    kind = t.device.type   # meta tensors (shape inference) have no autocast to turn off
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def _transformed(*tensors: torch.Tensor) -> bool:
    """Whether forward-mode AD or a torch.func transform (jvp, grad, jacfwd, jacrev, vmap) sees one of the
    tensors. The ops register only a backward formula (csrc/register.cpp), and forward AD through it gave
    zero tangents without a word, so ``project`` and ``reconstruct``, linear in every argument, then compute their
    product with torch's own matmuls (the same factor order; rounding may differ in the last bits)."""
    if torch.compiler.is_compiling():
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    return _fwad._current_level >= 0 and any(_fwad.unpack_dual(t).tangent is not None for t in tensors)


def _constant_scaling(scaling, op: str) -> None:
    if isinstance(scaling, torch.Tensor) and (scaling.requires_grad and torch.is_grad_enabled()
                                              or _transformed(scaling)):
        raise TypeError(f"{op}: scaling is a constant of the op (it has no derivative for it), but this tensor "
                        "requires grad or carries a tangent: pass a float or scaling.detach()")


def _check_one_layer(named, op):
    for n, t in named:
        _tensor(t, n, dtypes=_dtypes(n), op=op)
        if t.dim() != 2:
            raise ValueError(f"{op}: {n} must be 2-D (one layer), got shape {tuple(t.shape)}")


def _check_eps(eps):
    if isinstance(eps, torch.Tensor) and eps.dim() == 0 and not eps.is_complex() and eps.dtype != torch.bool:
        eps = eps.item()   # a 0-dim tensor, as for scaling and the seeds
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a finite number >= 0, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def project_perturbed(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                      scaling: float = 1.0, *, eps: float, seed: int, stream_u: int = 0,
                      stream_v: int = 1) -> torch.Tensor:
    """``project`` on the perturbed bases ``Ũ = perturbed_basis(U, eps, seed, stream_u)`` and
    ``Ṽ = perturbed_basis(V, eps, seed, stream_v)`` (not re-orthonormalised), without forming them.

    The noise is generated inside the product, one tile of 128 rows at a time (a thread block's tile
    on CUDA), so the perturbed bases are never stored: besides U, V, the factors and the k1 x k2 result, each
    tile's partial product (k1 x r, k2 x r) is kept to be summed in a fixed order (the same sum on any thread
    count), ceil(m / 128) k1 r + ceil(n / 128) k2 r numbers, less than U and V hold where r < 128 (LoRA ranks).
    One layer: U (m x k1),
    V (n x k2), B (m x r), A (r x n). On CUDA r is bounded by the GPU's shared memory per block
    (r <= 1814 float64 / 3630 float32 with the 227 KiB of an H100/H200); beyond, a clear error.
    """
    _check_one_layer([("U", U), ("V", V), ("B", B), ("A", A)], "project_perturbed")
    _check_project_args(U, V, B, A, "project_perturbed")
    _check_eps(eps)
    scaling = _real(scaling, "project_perturbed: scaling")
    return _ops.project_perturbed(U, V, B, A, scaling, float(eps), _seed(seed), _seed(stream_u, "stream_u"),
                                  _seed(stream_v, "stream_v"))


def project_dense(U: torch.Tensor, V: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Coefficients ``U^T D V`` of a dense update D (..., m, n); D may also be bfloat16/float16
    (computed in the bases' dtype, as ``project``'s factors)."""
    named = [("U", U), ("V", V), ("D", D)]
    plain = _check_tensors(named, "project_dense")
    if not (U.shape[-2] == D.shape[-2] and D.shape[-1] == V.shape[-2]):
        raise ValueError(f"project_dense: shapes do not chain: U {tuple(U.shape)}, D {tuple(D.shape)}, V {tuple(V.shape)}")
    if not plain:
        _batch_broadcasts(named, "project_dense")
    return _ops.project_dense(U, V, D)


def reconstruct(U: torch.Tensor, C: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``U @ C @ V^T``: the update rebuilt from coefficients C (..., k1, k2) on a basis. Its low-rank
    factors are ``(U @ C, V)``; ``factored_svd(U @ C, V.mT, rank)`` re-factors them to a peft rank."""
    _check_reconstruct_args(U, C, V, "reconstruct")
    if _transformed(U, C, V):
        with _no_autocast(U):
            return (U @ C) @ V.mT
    return _ops.reconstruct(U, C, V)


def _check_reconstruct_args(U, C, V, op):
    named = [("U", U), ("C", C), ("V", V)]
    plain = _check_tensors(named, op)
    if not (U.shape[-1] == C.shape[-2] and C.shape[-1] == V.shape[-1]):
        raise ValueError(f"{op}: shapes do not chain (need U m x k1, C k1 x k2, V n x k2): U {tuple(U.shape)}, "
                         f"C {tuple(C.shape)}, V {tuple(V.shape)}")
    if not plain:
        _batch_broadcasts(named, op)


def reconstruct_perturbed(U: torch.Tensor, C: torch.Tensor, V: torch.Tensor, *, eps: float, seed: int,
                          stream_u: int = 0, stream_v: int = 1) -> torch.Tensor:
    """``reconstruct`` on the perturbed bases ``Ũ = perturbed_basis(U, eps, seed, stream_u)`` and
    ``Ṽ = perturbed_basis(V, eps, seed, stream_v)``: ``Ũ C Ṽ^T``, the way back of
    ``project_perturbed`` (same defaults), without forming Ũ or Ṽ beyond one chunk of rows.

    Two passes, ``T = Ũ C`` (m x k2) then ``T Ṽ^T``; the noise is generated one chunk of rows at a
    time: on the CPU 1 MiB of the basis or 1024 rows, whichever is more (the whole basis at SOLAR's
    usual sizes), on CUDA a thread block's shared-memory strip. One layer: U (m x k1), C (k1 x k2),
    V (n x k2) -> (m x n).
    """
    _check_one_layer([("U", U), ("C", C), ("V", V)], "reconstruct_perturbed")
    _check_reconstruct_args(U, C, V, "reconstruct_perturbed")
    _check_eps(eps)
    return _ops.reconstruct_perturbed(U, C, V, float(eps), _seed(seed), _seed(stream_u, "stream_u"),
                                      _seed(stream_v, "stream_v"))


# ---------------------------------------------------------------------------------------------
# importance / fusion

def _layers(x, name):
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")
    return list(x)


def importance_state(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], dtype=torch.float32):
    """Zero-initialised EMA states ``(ipt_A, ipt_B, unc_A, unc_B)`` for ``pair_importance``."""
    A, B = _layers(A, "A"), _layers(B, "B")
    z = lambda ts: [torch.zeros(t.shape, dtype=dtype, device=t.device) for t in ts]  # noqa: E731
    return z(A), z(B), z(A), z(B)


def pair_importance(A, B, grad_A, grad_B, ipt_A, ipt_B, unc_A, unc_B, *, beta1: float = 0.85,
                    beta2: float = 0.85):
    """AdaLoRA's importance of every LoRA pair, for all layers in one call.

    Per element of every A (r x n) and B (m x r): ``I = |p * grad|``,
    ``ipt <- beta1 ipt + (1 - beta1) I``, ``unc <- beta2 unc + (1 - beta2) |I - ipt|`` (states
    updated in place), element score ``ipt * unc``; the score of pair j is the mean over row j of A
    plus the mean over column j of B. Returns one (r,) tensor per layer (dtype of the states).
    Runs under ``torch.no_grad()``, as an optimizer step does. An empty list of layers returns ``[]``.
    Layers may live on different devices (each layer's tensors on one): one launch per device.
    """
    lists = {n: _layers(v, n) for n, v in
             [("A", A), ("B", B), ("grad_A", grad_A), ("grad_B", grad_B), ("ipt_A", ipt_A),
              ("ipt_B", ipt_B), ("unc_A", unc_A), ("unc_B", unc_B)]}
    L = len(lists["A"])
    for n, v in lists.items():
        if len(v) != L:
            raise ValueError(f"{n} has {len(v)} layers but A has {L}")
    plain = _plain_layers(lists, lambda n: _FLOAT if n.startswith(("ipt", "unc")) else _WEIGHT)
    for l in range(L):
        a, b = lists["A"][l], lists["B"][l]
        if plain and a.dim() == 2 and b.dim() == 2 and b.shape[1] == a.shape[0] and all(
                lists[n][l].is_contiguous() for n in ("ipt_A", "ipt_B", "unc_A", "unc_B")):
            continue  # what the checks below would find (the kernel checks the rest, naming the layer)
        named = [(f"{n}[{l}]", v[l]) for n, v in lists.items()]
        for n, t in named:
            if t is None:
                raise ValueError(f"{n} is None (a LoRA layer without a gradient: run backward first)")
            _tensor(t, n, dtypes=_WEIGHT if not n.startswith(("ipt", "unc")) else _FLOAT)
        _same_device(named)
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"layer {l}: expected A (r x n) and B (m x r), got {tuple(a.shape)} and {tuple(b.shape)}")
        for n in ("ipt_A", "ipt_B", "unc_A", "unc_B"):
            if not lists[n][l].is_contiguous():
                raise ValueError(f"{n}[{l}] must be contiguous (it is updated in place)")
    beta1, beta2 = _real(beta1, "beta1"), _real(beta2, "beta2")
    for b_name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{b_name} must be in [0, 1), got {b}")
    if L == 0:
        return []
    c = lambda ts: [t.contiguous() for t in ts]  # noqa: E731
    scores = [torch.empty(a.shape[0], dtype=s.dtype, device=s.device)
              for a, s in zip(lists["A"], lists["ipt_A"])]

    def run(g):
        p = {n: _pick(v, g) for n, v in lists.items()}
        _ops.pair_importance_(c(p["A"]), c(p["B"]), c(p["grad_A"]), c(p["grad_B"]), p["ipt_A"], p["ipt_B"],
                              p["unc_A"], p["unc_B"], _pick(scores, g), beta1, beta2)
    with torch.no_grad():   # statistics, as an optimizer's: the parameters it reads may require grad
        try:
            _per_device(_device_groups(lists["A"]), run, r"layer (\d+)")
        except RuntimeError:
            _refuse_layouts(lists)
            raise
    return scores


def _index_list(i, name: str) -> torch.Tensor:
    """One layer's pair indices given as a list / numpy array: integers only (a mask of bools, or floats, was
    cast to integers: [False, True] fused pairs 0 and 1)."""
    if isinstance(i, (list, tuple)) and not i:
        return torch.empty(0, dtype=torch.long)
    if _numpy(i) and getattr(i, "ndim", 0) > 0:
        i = i.copy()   # torch.as_tensor refuses negative strides (np.argsort(s)[::-1][:2]) and warns on read-only
    t = torch.as_tensor(i)
    if t.dtype in _INDEX_DTYPES:   # the common case first: this runs per layer and step
        return t
    if t.numel() == 0:
        return t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        mask = " (a boolean mask: pass its indices, mask.nonzero().flatten())" if t.dtype == torch.bool else ""
        raise TypeError(f"{name} must hold integers (pair numbers), got {str(t.dtype).replace('torch.', '')}{mask}")
    return t.long()   # uint8, int16, ... from numpy


def _recompose_args(W, B, A, idx, scaling, op):
    if isinstance(W, torch.Tensor) and (_numpy(idx) or isinstance(idx, (list, tuple)) and all(
            isinstance(i, numbers.Number) or getattr(i, "ndim", None) == 0 for i in idx)):
        idx = [idx]  # one layer's indices as a numpy array or a plain list (of ints, numpy ints or 0-dim tensors)
    W, B, A, idx = (_layers(v, n) for v, n in ((W, "W"), (B, "B"), (A, "A"), (idx, "idx")))
    L = len(W)
    if isinstance(scaling, (numbers.Number, str)) or getattr(scaling, "ndim", None) == 0:
        scaling = [_real(scaling, f"{op}: scaling")] * L   # one number for every layer
    else:
        scaling = [_real(s, f"{op}: scaling") for s in scaling]   # one per layer (a list, tensor, array)
    for n, v in (("B", B), ("A", A), ("idx", idx), ("scaling", scaling)):
        if len(v) != L:
            raise ValueError(f"{op}: {n} has {len(v)} layers but W has {L}")
    plain = _plain_layers({"W": W, "B": B, "A": A}, lambda n: _WEIGHT)
    for l in range(L):
        i = idx[l]
        if not isinstance(i, torch.Tensor):
            idx[l] = i = _index_list(i, f"idx[{l}]")
        w, b, a = W[l], B[l], A[l]
        if (plain and i.dtype in (torch.int32, torch.int64) and w.dim() == 2 and b.shape[0] == w.shape[0]
                and a.shape[1] == w.shape[1] and b.shape[1] == a.shape[0]
                and (i.is_cpu or (i.is_cuda == w.is_cuda and i.is_meta == w.is_meta and i.get_device() == w.get_device()))):
            continue  # what the checks below would find
        named = [(f"W[{l}]", w), (f"B[{l}]", b), (f"A[{l}]", a)]
        for n, t in named:
            _tensor(t, n, dtypes=_WEIGHT)
        if i.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"idx[{l}] must be an integer tensor, got {i.dtype}")
        _same_device(named + ([(f"idx[{l}]", i)] if i.device.type != "cpu" else []))
        m, n = w.shape[-2:]
        if w.dim() != 2 or b.shape[0] != m or a.shape[1] != n or b.shape[1] != a.shape[0]:
            raise ValueError(f"{op}: layer {l}: expected W (m x n), B (m x r), A (r x n), got "
                             f"{tuple(w.shape)}, {tuple(b.shape)}, {tuple(a.shape)}")
        # range and repeats of idx are checked by the kernel (ValueError naming the layer)
    return W, B, A, [i if i.dtype == torch.long else i.long() for i in idx], scaling


def _recompose_per_device(op, W, B, A, idx, args, new_pairs=()) -> None:
    """``op`` once per device. The kernel validates its layers before changing any; across devices the
    checks that depend on values (idx in range and not repeated, the new pairs finite in B's dtype) and B and
    A's dtypes are done here first, so that such a bad layer on one device leaves every layer as it was.
    Written tensors that share memory are refused by their device's kernel, after the devices before it."""
    groups = _device_groups(W)
    if len(groups) > 1:
        for l, i in enumerate(idx):
            if B[l].dtype != A[l].dtype:
                raise TypeError(f"{op.__name__}: layer {l}: B and A must share a dtype")
            for name, t in new_pairs:
                if t[l].device.type != "meta" and not bool(torch.isfinite(t[l].to(B[l].dtype)).all()):
                    raise ValueError(f"{op.__name__}: layer {l}: {name} contains NaN or Inf in B's dtype "
                                     f"{str(B[l].dtype).replace('torch.', '')} (where values beyond its range "
                                     "become Inf)")
            if i.device.type == "meta":
                continue
            v, r = i.tolist(), A[l].shape[0]
            bad = [x for x in v if not 0 <= x < r]
            if bad:
                raise ValueError(f"{op.__name__}: layer {l}: idx entry {bad[0]} out of range [0, {r})")
            seen = set()
            for x in v:
                if x in seen:
                    raise ValueError(f"{op.__name__}: layer {l}: idx has repeated entry {x}")
                seen.add(x)
    try:
        _per_device(groups, lambda g: op(*(_pick(v, g) for v in args)), r"layer (\d+)")
    except RuntimeError:
        _refuse_layouts({"W": W, "B": B, "A": A, **dict(new_pairs)})
        raise


def fuse_pairs_(W, B, A, idx, scaling=1.0) -> None:
    """In place: ``W += scaling * B[:, idx] @ A[idx, :]`` and ``B[:, idx] = 0``.

    The layer's function ``W x + scaling * B A x`` is unchanged (up to W's rounding). Accepts one
    layer (tensors; ``idx`` an integer tensor, numpy array or list) or many (lists, ``idx`` one such entry
    per layer; one pass over each W, all layers of a device in one call). An empty list of layers does
    nothing. Entries of ``idx`` must be distinct and in [0, r). ``idx`` may be on
    W's device or on the CPU; CPU indices (or lists) spare a CUDA call its one device-to-host copy.
    """
    W, B, A, idx, scaling = _recompose_args(W, B, A, idx, scaling, "fuse_pairs_")
    _recompose_per_device(_ops.fuse_pairs_, W, B, A, idx, (W, B, A, idx, scaling))


def reinit_pairs_(W, B, A, idx, B_new, A_new, scaling=1.0) -> None:
    """In place: fuse pairs ``idx`` into W and replace them by ``(B_new, A_new)``, function-preserving.

    ``W += scaling * (B[:, idx] @ A[idx, :] - B_new @ A_new)``; ``B[:, idx] = B_new``;
    ``A[idx, :] = A_new``. B_new is (m x len(idx)), A_new (len(idx) x n). One pass over W.
    """
    W, B, A, idx, scaling = _recompose_args(W, B, A, idx, scaling, "reinit_pairs_")
    B_new, A_new = _layers(B_new, "B_new"), _layers(A_new, "A_new")
    if len(B_new) != len(W) or len(A_new) != len(W):
        raise ValueError("reinit_pairs_: B_new and A_new need one entry per layer")
    for l in range(len(W)):
        _tensor(B_new[l], f"B_new[{l}]", dtypes=_WEIGHT)
        _tensor(A_new[l], f"A_new[{l}]", dtypes=_WEIGHT)
        q = idx[l].numel()
        if tuple(B_new[l].shape) != (W[l].shape[0], q) or tuple(A_new[l].shape) != (q, W[l].shape[1]):
            raise ValueError(f"reinit_pairs_: layer {l}: B_new must be {(W[l].shape[0], q)} and A_new "
                             f"{(q, W[l].shape[1])}, got {tuple(B_new[l].shape)} and {tuple(A_new[l].shape)}")
        _same_device([(f"W[{l}]", W[l]), (f"B_new[{l}]", B_new[l]), (f"A_new[{l}]", A_new[l])])
    # NaN/Inf in the new pairs: checked by the kernel, with idx, in one transfer for all layers
    _recompose_per_device(_ops.reinit_pairs_, W, B, A, idx, (W, B, A, idx, B_new, A_new, scaling),
                          (("B_new", B_new), ("A_new", A_new)))


# ---------------------------------------------------------------------------------------------
# SOLAR

def _solar_stream(stream, op: str) -> int:
    """A SOLAR layer's stream: in [0, 2^61), since each takes the four Philox streams 4·stream + 0..3."""
    value = _seed(stream, "stream")   # (values from 2^63 on as two's complement)
    if not 0 <= value < 2**61:
        raise ValueError(f"{op}: stream must be in [0, 2^61) (a layer takes the Philox streams 4·stream + 0..3), "
                         f"got {int(stream.item() if isinstance(stream, torch.Tensor) else stream)}")
    return value


def solar_basis(W0: torch.Tensor, seed: int, stream: int = 0, eps: float = 0.0):
    """The complete orthonormal bases SOLAR derives from a base weight W0 (m x n), in float64.

    ``U`` (m x m): W0's left singular vectors (descending, canonical signs), completed to a basis
    of R^m with seeded random directions; ``V`` (n x n) likewise. With ``eps > 0`` each basis is
    perturbed by ``eps / sqrt(dim) * N(seed, stream)`` and re-orthonormalised. A receiver with the
    same W0 and (seed, stream, eps) regenerates the same bases, also where W0's singular vectors are
    not unique: singular values whose gaps are at most 1e-8 x the largest (chained) count as tied, and
    each tied run's vectors (on each side) are replaced by the orthonormalised projection of seeded
    probes onto their span; a run reaching down to 1e-8 x the largest is a null space, left to the
    seeded completion. ``stream`` in [0, 2^61) (each layer's takes four Philox streams), as for ``solar_checksum``
    and ``solar_decode``.
    """
    _tensor(W0, "W0", dtypes=_WEIGHT, op="solar_basis")
    if W0.dim() != 2:
        raise ValueError(f"W0 must be 2-D, got shape {tuple(W0.shape)}")
    _check_eps(eps)
    return _ops.solar_basis(W0, _seed(seed), _solar_stream(stream, "solar_basis"), float(eps))


def solar_checksum(UI: torch.Tensor, VJ: torch.Tensor, seed: int, stream: int = 0) -> torch.Tensor:
    """Two numbers that change if any used basis vector (columns of UI, VJ) rotates or flips."""
    _tensor(UI, "UI", op="solar_checksum")
    _tensor(VJ, "VJ", op="solar_checksum")
    _same_device([("UI", UI), ("VJ", VJ)])
    return _ops.solar_checksum(UI, VJ, _seed(seed), _solar_stream(stream, "solar_checksum"))


def solar_decode(U, V, values, indices, rank: int, scaling: float, seed: int, stream: int = 0):
    """LoRA factors ``(B (m x rank), A (rank x n), checksum)`` of ``U_I C V_J^T`` where the sparse
    coefficient matrix C has ``values`` at flat positions ``indices`` (``i * V.shape[1] + j``):
    ``scaling * B @ A`` is its best rank-``rank`` approximation, computed from factors."""
    _tensor(U, "U", op="solar_decode")
    _tensor(V, "V", op="solar_decode")
    _tensor(values, "values", dtypes=_WEIGHT, min_dim=1, op="solar_decode")  # a package may store float16
    _tensor(indices, "indices", dtypes=(torch.int32, torch.int64), min_dim=1, op="solar_decode")
    rank = _int(rank, "rank", 1)
    _same_device([("U", U), ("V", V)])
    for n, t in (("values", values), ("indices", indices)):  # a package's numbers may stay on the CPU
        if t.device not in (U.device, torch.device("cpu")):
            raise ValueError(f"solar_decode: {n} is on {t.device}, U and V on {U.device} (it must be on theirs, "
                             "or on the cpu)")
    return _ops.solar_decode(U, V, values, indices, rank, _real(scaling, "solar_decode: scaling"), _seed(seed),
                             _solar_stream(stream, "solar_decode"))


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels, so the ops trace under torch.compile / FakeTensor

def _register_fakes():
    lib = "subspace_ext::"
    reg = torch.library.register_fake

    @reg(lib + "philox_uint32_")
    def _(out, seed, stream):
        return None

    @reg(lib + "philox_normal_")
    def _(out, seed, stream):
        return None

    @reg(lib + "philox_normal_icdf_")
    def _(out, seed, stream):
        return None

    @reg(lib + "perturbed_basis")
    def _(U, eps, seed, stream, orthonormalize):
        return torch.empty_like(U, memory_format=torch.contiguous_format)

    def _svd_shapes(A, k):
        lead, dt = A.shape[:-2], (torch.float64 if A.dtype == torch.float64 else torch.float32)
        return (A.new_empty((*lead, A.shape[-2], k), dtype=dt), A.new_empty((*lead, k), dtype=dt),
                A.new_empty((*lead, A.shape[-1], k), dtype=dt))

    @reg(lib + "rsvd")
    def _(A, rank, oversample, niter, seed):
        return _svd_shapes(A, rank)

    @reg(lib + "_rsvd_batched")
    def _(A, rank, oversample, niter, seed):
        return _svd_shapes(A, rank)

    @reg(lib + "_small_svd")
    def _(A):
        return _svd_shapes(A, min(A.shape[-2], A.shape[-1]))

    @reg(lib + "_gram_orth")
    def _(G):
        return G.new_empty(G.shape), G.new_empty(G.shape[:-2], dtype=torch.bool)

    @reg(lib + "rsvd_many")
    def _(mats, rank, oversample, niter, seed):
        outs = [_svd_shapes(A, rank) for A in mats]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]

    def compute(t):  # csrc/cpu/utils.h compute_dtype: half precision is computed in float32
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def in_basis(t, U):  # project_cpu.cpp in_basis_dtype
        return t.to(U.dtype) if t.dtype in (torch.bfloat16, torch.float16) else t

    @reg(lib + "factored_svd")
    def _(B, A, rank):
        dt = torch.promote_types(compute(B), compute(A))
        return (B.new_empty((B.shape[0], rank), dtype=dt), B.new_empty((rank,), dtype=dt),
                A.new_empty((A.shape[1], rank), dtype=dt))

    @reg(lib + "project_perturbed")
    def _(U, V, B, A, scaling, eps, seed, stream_u, stream_v):
        return U.new_empty((U.shape[-1], V.shape[-1]))

    @reg(lib + "project")
    def _(U, V, B, A, scaling):
        return torch.matmul(torch.matmul(U.mT, in_basis(B, U)), torch.matmul(in_basis(A, U), V))

    @reg(lib + "project_dense")
    def _(U, V, D):
        return torch.matmul(torch.matmul(U.mT, in_basis(D, U)), V)

    @reg(lib + "reconstruct")
    def _(U, C, V):
        return torch.matmul(torch.matmul(U, C), V.mT)

    @reg(lib + "reconstruct_perturbed")
    def _(U, C, V, eps, seed, stream_u, stream_v):
        return U.new_empty((U.shape[0], V.shape[0]))

    @reg(lib + "pair_importance_")
    def _(A, B, grad_A, grad_B, ipt_A, ipt_B, unc_A, unc_B, scores, beta1, beta2):
        return None

    @reg(lib + "solar_basis")
    def _(W0, seed, stream, eps):
        m, n = W0.shape
        return W0.new_empty((m, m), dtype=torch.float64), W0.new_empty((n, n), dtype=torch.float64)

    @reg(lib + "solar_checksum")
    def _(UI, VJ, seed, stream):
        return UI.new_empty((2,), dtype=torch.float64)

    @reg(lib + "solar_decode")
    def _(U, V, values, indices, rank, scaling, seed, stream):
        return (U.new_empty((U.shape[0], rank), dtype=torch.float64),
                V.new_empty((rank, V.shape[0]), dtype=torch.float64), U.new_empty((2,), dtype=torch.float64))

    @reg(lib + "fuse_pairs_")
    def _(W, B, A, idx, scaling):
        return None

    @reg(lib + "reinit_pairs_")
    def _(W, B, A, idx, B_new, A_new, scaling):
        return None


_register_fakes()
