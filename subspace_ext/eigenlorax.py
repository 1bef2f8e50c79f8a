"""EigenLoRAx: recycle N LoRA adapters of one base into per-layer principal subspaces; a new task trains
only small "loadings" over the shared, frozen components.

Formulation (as in the authors' public code, see DESIGN.md section 3): per adapted layer and
separately for lora_A and lora_B, orient each adapter's matrix with the larger dimension as rows
(B: m x r; A: r x n -> n x r), concatenate the N adapters' columns into M (d x N r), centre M's rows,
and take its top-K left singular vectors P (d x K) — from a thin SVD of the centred stack (an rsvd of 2 K + 8
directions where the stack is wider than 3 such sketches with their oversampling), never the d x d
covariance. Optionally add ``augment`` directions: seeded Philox normals orthogonalised against P (a QR per
layer and side). A task then trains loadings α_A, α_B (K x r): A = (P_A α_A)ᵀ, B = P_B α_B, and the layer
computes ``base(x) + scaling · B (A x)`` as ``((x P_A) α_A) α_Bᵀ P_Bᵀ`` — O((m + n) K) per token, no
r x n x K tensor. Trainable per layer: 2 K r (LoRA: (m + n) r).

Where this departs from the authors' code and DESIGN.md:
- ``augment`` defaults to 0 (theirs: 32). Measured on SST-2, 16 augmented directions gave no accuracy
  (README, "EigenLoRAx"); they stay available.
- K is capped at the centred stack's rank (N r - 1 at most) and the gap is not filled by augmentation:
  directions without data behind them are what ``augment`` adds, on request.
- Each adapter's scaling is folded into its B before the PCA, so adapters trained with different
  alpha / r contribute their actual updates (theirs: the raw lora_B).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _warn, ops
from .io import (BaseWeights, FormatError, LowRankUpdate, PeftAdapter, base_modifying_init, check_digest, check_finite,
                 embedding_lora_modules, fingerprint, linear_layout, nested_parameter, nesting_depth,
                 parameter_names, prefix_rewrite, progress_bar, quantized, read_safetensors, refuse_distributed,
                 refuse_layer_replication, safetensors_metadata, save_with_digest, stack_experts, tensors_digest,
                 tied_elsewhere, unnested, unwrap_model)

FORMAT = "subspace_ext.eigenlorax"
FORMAT_VERSION = 1
# a subspace with modules whose LoRA is on the weight as a parameter (meta "as_stored"): a reader that does
# not know the key would export them as module LoRA (transposed on a Conv1D), so it must refuse the file
FORMAT_VERSION_AS_STORED = 2
# a subspace with MoE expert layers (meta "experts"): an older reader would take "<module>.<param>[e]" for modules
FORMAT_VERSION_EXPERTS = 3
_EXPERT_LAYER = re.compile(r"(.+)\.([^.\[\]]+)\[(\d+)\]")   # <module>.<param>[e]
DEFAULT_COMPONENTS = 32   # K per layer and side when neither components nor variance is given
TASK_FORMAT = FORMAT + ".task"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # peft's
_PEFT_PREFIX = "base_model.model."
# peft task types whose model adds its head modules (by name) to modules_to_save, so loading fails without
# their weights
_TASKS_WITH_HEAD = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}
_HEADS = ("classifier", "score", "qa_outputs")
_WHOLE_MODULES = "whole modules"  # a task file's "extra" record: its extra tensors are whole modules


def _adapted_near(module: str, layers) -> Optional[str]:
    """The adapted layer (of ``layers``) that ``module`` is, lies in or holds, or None: peft cannot save
    such a module in modules_to_save."""
    return next((t for t in layers if module == t or module.startswith(t + ".") or t.startswith(module + ".")),
                None) if module else None


def _modules_to_save(names: Sequence[str], heads: Sequence[str] = _HEADS) -> Dict[str, str]:
    """{tensor name: the module peft restores it with}. peft's modules_to_save wraps a listed module whole
    and loads every tensor of its state dict, so a tensor belongs to its parent module, or to the outermost
    enclosing module named like one of ``heads`` (peft's task models wrap a ``classifier`` / ``score`` /
    ``qa_outputs`` head whole: RoBERTa's classifier.dense and classifier.out_proj), or to an enclosing module
    listed for another tensor."""
    owner = {}
    for k in names:
        parts = k.split(".")[:-1]
        cut = next((i + 1 for i, part in enumerate(parts) if part in heads), len(parts))
        owner[k] = ".".join(parts[:cut])
    listed = set(owner.values())

    def outermost(module: str) -> str:
        parts = module.split(".")
        return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in listed), module)

    return {k: outermost(m) for k, m in owner.items()}


def _check_scaling(value, where: str) -> float:
    """``value`` (a number, or the string recorded in a task file) as a finite float > 0 (the
    alpha of the peft adapter it is exported as; peft readers, ours too, take no other)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(value, bool) or not (math.isfinite(f) and f > 0):
        raise ValueError(f"{where}: scaling must be a finite number > 0, got {value!r}")
    return f


def _read(path: str, fmt: str, what: str, versions: Sequence[int] = ()) -> tuple:
    """(tensors, metadata) of an EigenLoRAx file of format ``fmt`` (and one of ``versions``), its digest
    verified (files written before digests were added have none) and every tensor finite."""
    meta = safetensors_metadata(path)
    if meta.get("format") != fmt:
        raise FormatError(f"{path}: not an EigenLoRAx {what} (format {meta.get('format')!r})")
    if versions and meta.get("format_version") not in {str(v) for v in versions}:
        raise FormatError(f"{path}: {what} format version {meta.get('format_version')} is not supported")
    t = read_safetensors(path)
    meta = check_digest(path, t, meta)
    check_finite(t, path)
    return t, meta


def _read_task(source: Union[str, Dict[str, torch.Tensor]]) -> tuple:
    """(tensors, metadata) of a task: a ``save_coefficients`` file (str or path) or a dict of its tensors."""
    if isinstance(source, (str, os.PathLike)):
        return _read(os.fspath(source), TASK_FORMAT, "task coefficients file")
    check_finite(source, "task coefficients")
    return source, {}


@dataclass
class SideBasis:
    P: torch.Tensor          # d x K orthonormal components (+ augmentation)
    explained: torch.Tensor  # explained-variance ratio of each principal component (K_pc)
    n_pc: int                # how many columns are principal components (the rest: augmentation)


@dataclass
class EigenSubspace:
    """Per-layer principal subspaces of lora_A (P_A: n x K) and lora_B (P_B: m x K)."""
    A: Dict[str, SideBasis]
    B: Dict[str, SideBasis]
    meta: dict = field(default_factory=dict)
    _digest: Optional[str] = field(default=None, init=False, repr=False, compare=False)  # digest()'s cache

    @property
    def modules(self) -> List[str]:
        return list(self.A)

    @property
    def experts(self) -> Dict[str, Tuple[int, int]]:
        """{"<module>.<param>": (E, depth)} of the MoE expert parameters the subspace adapts (peft's
        target_parameters): expert e is the layer "<module>.<param>[e]"; ``depth`` is how many peft wrappers of
        the module's other targeted parameters lie outside this one's (its LoRA's name ends in depth ×
        ".base_layer")."""
        return {g: (int(v[0]), int(v[1])) for g, v in self.meta.get("experts", {}).items()}

    def expert_layer(self, layer: str) -> Optional[Tuple[str, str, int]]:
        """(module, parameter, expert) of a layer that is one expert of a MoE expert parameter, else None."""
        m = _EXPERT_LAYER.fullmatch(layer)
        return (m[1], m[2], int(m[3])) if m and f"{m[1]}.{m[2]}" in self.meta.get("experts", {}) else None

    def digest(self) -> str:
        """sha256 of the components (module names and P of both sides): a task file records the one it
        was trained on, and loading or exporting it with another subspace is refused."""
        if self._digest is None:
            self._digest = tensors_digest({f"{side}:{m}": b.P for side, bases in (("A", self.A), ("B", self.B))
                                           for m, b in bases.items()})
        return self._digest

    def check_task(self, meta: dict, source) -> None:
        """Refuse a task file trained on another subspace (files without the record are accepted)."""
        if meta.get("subspace") not in (None, self.digest()):
            raise FormatError(f"{source}: this task was trained on another subspace (digest {meta['subspace'][:12]} "
                              f"!= {self.digest()[:12]}): use the subspace file it was trained with")

    def size(self, module: str, side: str = "A") -> int:
        """K of a layer's ``side`` ("A" or "B"): principal plus augmentation directions (the sides may
        differ: the rank cap and ``variance`` act on each alone)."""
        if side not in ("A", "B"):
            raise ValueError(f"side must be 'A' or 'B', got {side!r}")
        return (self.A if side == "A" else self.B)[module].P.shape[1]

    def save(self, path: str) -> None:
        tensors = {}
        for side, bases in (("A", self.A), ("B", self.B)):
            for i, (mod, b) in enumerate(bases.items()):
                tensors[f"{side}.{i}.P"] = b.P.contiguous()
                tensors[f"{side}.{i}.explained"] = b.explained.contiguous()
        meta = dict(self.meta)
        meta["modules"] = self.modules
        meta["n_pc"] = {"A": [self.A[m].n_pc for m in self.modules], "B": [self.B[m].n_pc for m in self.modules]}
        version = (FORMAT_VERSION_EXPERTS if self.meta.get("experts") else
                   FORMAT_VERSION_AS_STORED if self.meta.get("as_stored") else FORMAT_VERSION)
        save_with_digest(tensors, path, {"format": FORMAT, "format_version": str(version),
                                         "eigenlorax": json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> "EigenSubspace":
        """Read a ``save``d subspace, checked whole: digest, module names, and every basis a float32 matrix
        with orthonormal columns and its explained-variance record; a FormatError names the problem."""
        t, meta_raw = _read(path, FORMAT, "subspace",
                            (FORMAT_VERSION, FORMAT_VERSION_AS_STORED, FORMAT_VERSION_EXPERTS))
        try:
            meta = json.loads(meta_raw["eigenlorax"])
            if not isinstance(meta, dict):
                raise TypeError(f"its eigenlorax record is {type(meta).__name__}, not a JSON object")
            mods, n_pc = meta.pop("modules"), meta.pop("n_pc")
            if not (isinstance(mods, list) and mods and all(isinstance(m, str) and m for m in mods)
                    and len(set(mods)) == len(mods)):
                raise ValueError(f"modules must be a non-empty list of distinct module names, got {mods!r:.80}")
            fps = meta.get("fingerprints")
            if fps is not None and not (isinstance(fps, dict) and all(isinstance(v, str) for v in fps.values())):
                raise ValueError("fingerprints must map module names to strings")
            stored = meta.get("as_stored", [])
            if not (isinstance(stored, list) and set(stored) <= set(mods)):
                raise ValueError(f"as_stored must be a list of the subspace's modules, got {stored!r:.80}")
            A = {m: _side_basis(t, "A", i, n_pc) for i, m in enumerate(mods)}
            B = {m: _side_basis(t, "B", i, n_pc) for i, m in enumerate(mods)}
            _check_experts(meta.get("experts", {}), A, B)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError: ValueError
            raise FormatError(f"{path}: malformed subspace file ({type(e).__name__}: {e})") from None
        return cls(A, B, meta)


def _check_experts(experts, A: Dict[str, SideBasis], B: Dict[str, SideBasis]) -> None:
    """A subspace file's record of MoE expert parameters ({"<module>.<param>": [E, depth]}) against its layers
    (bases ``A``, ``B``): each one's experts 0 .. E-1 are layers of one shape, every "<module>.<param>[e]" layer is one
    of them, and the depths of a module's parameters are 0 .. k-1, once each (peft's nesting) (ValueError)."""
    mods = list(A)
    if not isinstance(experts, dict):
        raise ValueError(f"experts must map expert parameters to [count, depth], got {experts!r:.80}")
    for group, v in experts.items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                and v[0] >= 1 and v[1] >= 0):
            raise ValueError(f"experts: {group}: [count >= 1, depth >= 0] expected, got {v!r:.80}")
        missing = [f"{group}[{e}]" for e in range(v[0]) if f"{group}[{e}]" not in mods]
        if missing:
            raise ValueError(f"experts: {group} has {v[0]} experts but no layer {missing[0]}")
        rows = {(A[f"{group}[{e}]"].P.shape[0], B[f"{group}[{e}]"].P.shape[0]) for e in range(v[0])}
        if len(rows) > 1:
            raise ValueError(f"experts: the experts of {group} have bases of different shapes {sorted(rows)}")
    depths: Dict[str, list] = {}
    for group, v in experts.items():
        depths.setdefault(group.rpartition(".")[0], []).append(v[1])
    bad = next((m for m, d in depths.items() if sorted(d) != list(range(len(d)))), None)
    if bad is not None:
        raise ValueError(f"experts: the nesting depths of {bad}'s parameters are {sorted(depths[bad])}, not 0 .. "
                         f"{len(depths[bad]) - 1} once each")
    stray = [m for m in mods if (x := _EXPERT_LAYER.fullmatch(m)) and f"{x[1]}.{x[2]}" in experts
             and int(x[3]) >= experts[f"{x[1]}.{x[2]}"][0]]
    if stray:
        raise ValueError(f"layer {stray[0]}: beyond its parameter's expert count")


def _side_basis(t: Dict[str, torch.Tensor], side: str, i: int, n_pc) -> SideBasis:
    """Layer ``i``'s basis of ``side`` from a subspace file's tensors, checked (ValueError names the problem)."""
    P, explained, k = t[f"{side}.{i}.P"], t[f"{side}.{i}.explained"], n_pc[side][i]
    if P.dtype != torch.float32 or P.dim() != 2 or P.shape[0] < 1 or P.shape[1] < 1:
        raise ValueError(f"{side}.{i}.P must be a float32 d x K matrix with K >= 1, got {P.dtype} {tuple(P.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P.shape[1]:
        raise ValueError(f"n_pc of {side}.{i} must be an int in [1, {P.shape[1]}] (its P's columns), got {k!r}")
    if explained.dtype != torch.float32 or tuple(explained.shape) != (k,):
        raise ValueError(f"{side}.{i}.explained must be float32 of shape ({k},), got {explained.dtype} "
                         f"{tuple(explained.shape)}")
    gram = P.double().T @ P.double()
    if float((gram - torch.eye(P.shape[1], dtype=torch.float64)).abs().max()) > 1e-4:
        raise ValueError(f"{side}.{i}.P does not have orthonormal columns")
    return SideBasis(P, explained, k)


def _refuse_duplicates(names: List[str], keys: list, what: str) -> None:
    """ValueError if two adapters share a key (None: no key): the same adapter must not count twice."""
    seen = {}
    for name, key in zip(names, keys):
        if key is not None and key in seen:
            raise ValueError(f"{name} and {seen[key]} are the same adapter (same {what}): give each adapter once")
        seen.setdefault(key, name)


# Directions of the centred stack with a singular value below this fraction of the largest are its
# null space, not principal components (an SVD returns arbitrary vectors there). The stack is centred
# in float64, so a rank-deficient one (adapters sharing lora_A) shows ~1e-16 there; a real difference
# between float32 factors is far above 1e-9 (measured: 1e-16 at d = 384..11008, N r up to 512).
_RANK_RTOL = 1e-9

# A stack at most this many sketches (width + 8 oversampling) wide takes an exact thin SVD: measured with 1-2 threads
# on 4096 and 11008 rows, 64-240 columns, 1.3-8x faster than the rsvd (4 power iterations); even at ~4 sketches.
_EXACT_SKETCHES = 3


def _principal(M: torch.Tensor, components: Optional[int], variance: Optional[float], augment: int,
               seed: int, stream: int, where: str) -> SideBasis:
    """Top principal directions of the columns of M (d x c), row-centred, plus augmentation; K is capped
    at the centred stack's numerical rank (``where`` names the layer and side in the error when it is 0)."""
    d, c = M.shape
    M = M.double()  # centred in float64: float32 rounding would fake directions of size ~1e-7
    Mc = M - M.mean(dim=1, keepdim=True)
    full = max(1, min(d, c - 1 if c > 1 else 1))  # a centred stack of c columns has rank <= c - 1
    total = float(Mc.square().sum())   # the stack's variance, exact: the explained ratios' denominator
    # a sketch of 2 K + 8 directions, not the stack's full width (N·r columns: a 4096 x 1600 side took 49 s, the
    # sketch 0.8 s); for ``variance``, 64 and doubled until the directions found explain it
    width = min(full, 64 if variance is not None else 2 * (components or DEFAULT_COMPONENTS) + 8)
    exact = c <= _EXACT_SKETCHES * (width + 8)   # a few sketches wide: a thin SVD is exact and faster
    width = full if exact else width
    while True:
        U, S, _ = torch.linalg.svd(Mc, full_matrices=False) if exact else ops.rsvd(Mc, width, oversample=8,
                                                                                   niter=4, seed=seed)
        rank = int((S > _RANK_RTOL * S[0]).sum()) if float(S[0]) > 0 else 0
        if width == full or rank < width or variance is None or float((S[:rank] ** 2).sum()) >= variance * total:
            break   # every direction found (the rank lies within), K within the sketch, or enough explained
        width = min(full, 2 * width)
    if rank == 0:
        raise ValueError(f"{where}: the factors are the same in every adapter (nothing is left after centring), "
                         "so there is no principal direction to take: an untrained layer (all-zero lora_B in "
                         "every adapter)? Leave the layer out of the adapters")
    energy = S[:rank] * S[:rank]
    explained = energy / (total if width < full else float(energy.sum()))
    if variance is not None:
        k = int(torch.searchsorted(explained.cumsum(0), torch.tensor(variance, dtype=explained.dtype)).item()) + 1
    else:
        k = components if components is not None else DEFAULT_COMPONENTS
    k = max(1, min(k, rank))
    P = U[:, :k]
    if augment > 0:
        extra = min(augment, d - k)
        if extra > 0:
            N = ops.philox_normal((d, extra), seed, stream, dtype=torch.float64)
            N = N - P @ (P.T @ N)
            N = N - P @ (P.T @ N)
            Q, _ = torch.linalg.qr(N)
            P = torch.cat([P, Q], dim=1)
    return SideBasis(P.float().contiguous(), explained[:k].float(), k)


def build_subspace(adapters: Sequence[Union[str, PeftAdapter]], *, components: Optional[int] = None,
                   variance: Optional[float] = None, augment: int = 0, seed: int = 0,
                   base: Optional[Union[str, BaseWeights]] = None, progress: bool = False) -> EigenSubspace:
    """Principal subspaces from N peft LoRA adapters of one base model (folders or PeftAdapter).

    ``components``: K principal directions per layer and side (default 32, capped at the centred
    stack's numerical rank, at most N·r − 1); or ``variance``: the smallest K explaining that fraction
    of the centred stack's variance. ``augment``: extra seeded directions orthogonal to the components.
    With ``base``, the subspace records a fingerprint of every base weight (checked by ``apply``). ``progress``:
    progress bars on stderr (adapters read, then layers).

    LoRA on a MoE block's 3-D expert parameters (peft's ``target_parameters``, e.g. ``experts.gate_up_proj``: one
    rank-r pair per expert) needs ``base``, which tells the expert count, the parameter and its layout: each
    expert is a layer of its own, "<module>.<param>[e]", with its own components.
    """
    if components is not None and variance is not None:
        raise ValueError("give components or variance, not both")
    if variance is not None and not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if components is not None and (isinstance(components, bool) or not isinstance(components, int)
                                   or components < 1):
        raise ValueError(f"components must be a positive int, got {components!r}")
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise ValueError(f"augment must be an int >= 0, got {augment!r}")
    # folders as str (a pathlib.Path too), loaded adapters as they are; a generator is read once
    adapters = [a if isinstance(a, PeftAdapter) else os.fspath(a) for a in adapters]
    names = [a if isinstance(a, str) else f"adapter[{i}]" for i, a in enumerate(adapters)]
    if len(adapters) < 2:
        raise ValueError(f"need at least 2 adapters, got {len(adapters)}")
    _refuse_duplicates(names, [os.path.realpath(a) if isinstance(a, str) else None for a in adapters], "folder")
    loaded, per, digests, sources = [], [], [], {}
    bw = base if isinstance(base, BaseWeights) or base is None else BaseWeights(base)
    for name, a in zip(names, progress_bar(adapters, "eigen: adapters", progress, unit="adapter")):
        a = a if isinstance(a, PeftAdapter) else PeftAdapter.load(a)
        refuse_layer_replication(a.config, name)   # its layers are not the base's under their names
        p = _updates_by_module(a, name, bw, None if per else sources)   # the first's names are the subspace's
        loaded.append(a)
        per.append(p)
        # the same factors under another lora_alpha are another update: the scalings count as well
        digests.append(tensors_digest(a.tensors) + repr(sorted((m, u.scaling) for m, u in p.items())))
    bases = {_base_name(a.config.get("base_model_name_or_path")) for a in loaded} - {None}
    if len(bases) > 1:
        raise ValueError(f"adapters come from different base models: {sorted(map(str, bases))} (if these name one "
                         "model, make base_model_name_or_path in their adapter_config.json agree)")
    _refuse_duplicates(names, digests, "weights and scalings")
    for name, a in zip(names, loaded):
        init = base_modifying_init(a.config.get("init_lora_weights"))
        if init:
            _warn.warn(f"{name}: saved with init_lora_weights={init!r} without peft's conversion: its factors hold "
                       "that init (a principal part of the base weight) plus the training, and the subspace "
                       "learns both; convert it first (save_pretrained(..., "
                       "path_initial_model_for_weight_conversion=...))", stacklevel=2)
        left = embedding_lora_modules(a.tensors) + sorted(k for k in a.tensors if k.endswith(".lora_B.bias"))
        if left:
            _warn.warn(f"{name}: LoRA on embeddings (lora_embedding_A/B) and LoRA biases (lora_B.bias) are not "
                       f"part of an EigenLoRAx subspace and are left out: {', '.join(left[:3])}"
                       f"{' ...' if len(left) > 3 else ''}", stacklevel=2)
    modules = list(per[0])
    for i, (name, p) in enumerate(zip(names[1:], per[1:]), 1):
        if set(p) != set(modules):  # saved from another wrapper of the base (bert.encoder... vs encoder...)?
            try:
                rename = _map_modules(list(p), dict.fromkeys(modules), f"{names[0]}'s layers", name)
                per[i] = p = {rename[m]: u for m, u in p.items()}
            except ValueError:
                pass  # not one prefix rewrite: the check below names the layers
        missing, extra = set(modules) - set(p), set(p) - set(modules)
        if missing or extra:
            other = sorted(m for m in set(p) & set(modules) if p[m].shape != per[0][m].shape)
            why = (f" (and {other[0]} is {p[other[0]].shape[0]} x {p[other[0]].shape[1]} there, "
                   f"{per[0][other[0]].shape[0]} x {per[0][other[0]].shape[1]} in {names[0]}: another base model?)"
                   if other else "")
            raise ValueError(f"{name} adapts different layers than {names[0]}: "
                             f"missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}{why}")
    as_stored = sorted({m for p in per for m, u in p.items() if u.as_stored})
    for m in as_stored:
        mixed = [n for n, p in zip(names, per) if not p[m].as_stored]
        if mixed:
            raise ValueError(f"layer {m}: {mixed[0]} has LoRA on the module, other adapters on its weight as a "
                             "parameter (peft's target_parameters): on a Conv1D the two updates are transposed to "
                             "each other; build from adapters of one kind")
    subA, subB, fps = {}, {}, {}
    for li, mod in enumerate(progress_bar(modules, "eigen: layers", progress)):
        ups = [p[mod] for p in per]
        shapes = {u.shape for u in ups}
        if len(shapes) > 1:
            raise ValueError(f"layer {mod}: adapters disagree on its shape {sorted(shapes)}: different base models?")
        if all(u.A.shape[0] == 0 for u in ups):
            raise ValueError(f"layer {mod}: every adapter has rank 0 there (AdaLoRA's rank allocation pruned it): "
                             "there is no update to build a subspace from; leave the layer out of the adapters "
                             "(target_modules) or use adapters that adapt it")
        MA = torch.cat([u.A.float().T for u in ups], dim=1)   # n x N r
        MB = torch.cat([u.B.float() * u.scaling for u in ups], dim=1)  # m x N r (scaling folded into B)
        subA[mod] = _principal(MA, components, variance, augment, seed, 2 * li, f"layer {mod}, lora_A")
        subB[mod] = _principal(MB, components, variance, augment, seed, 2 * li + 1, f"layer {mod}, lora_B")
        if bw is not None and ups[0].expert >= 0:   # the expert's slice as the loaded model holds it
            key, parts, _ = sources[mod]
            fps[mod] = fingerprint(bw.get_expert(key, parts, ups[0].expert))
        elif bw is not None:
            key = bw.key_for_module(mod)
            W = bw.get(key)
            m, n = ups[0].shape   # out x in; a Conv1D stores its weight in x out (peft's flag is per module)
            if tuple(W.shape) not in ((m, n), (n, m)):
                raise ValueError(f"layer {mod}: the base's {key} is {tuple(W.shape)} but the adapters' update is "
                                 f"{m} out x {n} in: is this the adapters' base model?")
            fps[mod] = fingerprint(W)
    if variance is None:   # with variance, K is whatever explains it
        _warn_capped(subA, subB, components or DEFAULT_COMPONENTS, augment, len(loaded))
    meta = {"adapters": len(loaded), "components": components, "variance": variance, "augment": augment,
            "seed": seed, "fingerprints": fps,
            "base_model_name_or_path": next((a.config["base_model_name_or_path"] for a in loaded
                                             if a.config.get("base_model_name_or_path")), None),
            # peft decides the layout per module type (Conv1D or Linear) and saves its last choice as the
            # flag: adapters of one GPT-2 with and without a Linear lm_head disagree on it, harmlessly
            "fan_in_fan_out": any(bool(a.config.get("fan_in_fan_out")) for a in loaded)}
    if as_stored:   # LoRA on the weight as a parameter (target_parameters): exported as one, as stored
        meta["as_stored"] = as_stored
    experts = {_expert_group(u): [u.experts, nesting_depth(u.module)] for u in per[0].values() if u.expert >= 0}
    if experts:
        meta["experts"] = experts
    return EigenSubspace(subA, subB, meta)


def _expert_group(u: LowRankUpdate) -> str:
    """The "<module>.<param>" of one expert's update (``solar._expert_updates``); its layer is that + "[e]"."""
    return f"{unnested(u.module)}.{u.params[0]}"


def _updates_by_module(adapter: PeftAdapter, name: str, bw: Optional[BaseWeights] = None,
                       sources: Optional[Dict[str, tuple]] = None) -> Dict[str, LowRankUpdate]:
    """{layer: update} of an adapter. With its base ``bw``, LoRA on a MoE block's expert parameters is one layer
    per expert, "<module>.<param>[e]" (the base tells the parameter, the expert count and the layout), and
    ``sources`` (if given) gets each such layer's base slice (key, parts, transposed) (``solar._layer_updates``);
    without a base it is refused by name. A FormatError names the layer and the adapter (``name``)."""
    try:
        if bw is None:
            return {u.module: u for u in adapter.updates()}
        from .solar import _layer_updates   # solar's split of expert LoRA (solar does not import this module)
        out = {}
        for u, src in _layer_updates(adapter, bw, adapter.updates(experts=True)):
            layer = f"{_expert_group(u)}[{u.expert}]" if u.expert >= 0 else u.module
            out[layer] = u
            if sources is not None and src is not None:
                sources[layer] = src
        return out
    except FormatError as e:  # names the layer (and the folder, for a loaded adapter)
        raise FormatError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None


def _warn_capped(subA: dict, subB: dict, components: Optional[int], augment: int, adapters: int) -> None:
    """Warn when a layer side has fewer directions than ``components`` asked for, augmentation included (the
    centred stack of N adapters of rank r has rank at most N·r − 1): the model trains fewer loadings than chosen."""
    sides = [sb for sub in (subA, subB) for sb in sub.values() if sb.P.shape[1] < min(components, sb.P.shape[0])]
    if sides:
        low = min(sb.n_pc for sb in sides)
        plus = f" + {augment} augmented" if augment else ""
        _warn.warn(f"EigenLoRAx: {len(sides)} of {2 * len(subA)} layer sides have fewer than components="
                   f"{components} directions (down to {low} principal ones{plus}): the centred stack of "
                   f"{adapters} adapters has no more (rank at most N·r − 1); "
                   f"augment={components - low} fills them up with seeded orthogonal directions", stacklevel=3)


def _base_name(name: Optional[str]) -> Optional[str]:
    """A base_model_name_or_path compared as one model: an existing folder by its real path (so that
    ``base/``, ``./base`` and ``/abs/base`` agree), anything else (a hub id) as written, minus a trailing /."""
    if not name:
        return None
    return os.path.realpath(name) if os.path.isdir(name) else name.rstrip("/")


def _linear_layout(module: torch.nn.Module) -> Optional[tuple]:
    """(in_features, out_features, fan_in_fan_out) of a torch.nn.Linear or a transformers Conv1D (GPT-2's
    Linear with its weight stored in x out); None for anything else."""
    fan_in_fan_out = linear_layout(module)
    if fan_in_fan_out is None:
        return None
    out_in = module.weight.shape[::-1] if fan_in_fan_out else module.weight.shape
    return out_in[1], out_in[0], fan_in_fan_out


def _initial_loadings(K_A: int, K_B: int, rank: int, init: str, generator: torch.Generator,
                      start: Optional[tuple] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(α_A K_A x rank, α_B K_B x rank) at the start, drawn on the CPU (the same numbers on every device): α_A
    uniform(−0.5, 0.5); α_B zero ("lora", "project") or uniform; "project" writes the source's projection
    (``start``: its first columns), the other columns as "lora"."""
    aA = torch.rand(K_A, rank, generator=generator) - 0.5
    aB = torch.zeros(K_B, rank) if init in ("lora", "project") else torch.rand(K_B, rank, generator=generator) - 0.5
    if start is not None:
        sA, sB = start
        aA[:, :sA.shape[1]] = sA
        aB[:, :sB.shape[1]] = sB
    return aA, aB


class _Merging:
    """merge() / unmerge() of an EigenLoRAx update ``_delta()`` (in the layout of the weight ``_weight()``)."""

    def _merged(self, W: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """W ± scaling · B A (W's layout), summed in float32 (float64 for a float64 W), rounded once to W's dtype
        (a bfloat16 W += ΔW rounded ΔW first, then the sum)."""
        wide = torch.promote_types(W.dtype, torch.float32)
        # out of place: W.to(wide) is W itself for a float32 / float64 W (unmerge's check would merge the kept copy)
        return torch.add(W.to(wide), self._delta().to(wide), alpha=sign).to(W.dtype)

    @torch.no_grad()
    def merge(self, keep: bool = True):
        """Fold the update into the weight, which is kept (``keep``) for ``unmerge``: subtracting the update again
        rounds, and task switches while merged drifted the base (bfloat16 MiniLM: 6% of its entries changed by one
        merge + unmerge, 2% of a task's update off after 100 switches; float32: linearly in the switches, 4.5% of
        the update's largest entry after 8,000)."""
        if not self.merged:
            W = self._weight()
            self._unmerged = W.detach().clone() if keep else None
            self._keep = keep
            W.copy_(self._merged(W))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update out: the weight merge() kept, where the current weight is still what merge() made of
        it (bit for bit), else W − scaling · B A, rounded once."""
        if self.merged:
            W, kept, self._unmerged = self._weight(), self._unmerged, None
            restore = (kept is not None and kept.shape == W.shape and kept.dtype == W.dtype
                       and torch.equal(self._merged(kept := kept.to(W.device)), W))
            W.copy_(kept if restore else self._merged(W, -1.0))
            self.merged = False

    def _refuse_merged_training(self) -> None:
        if self.training and torch.is_grad_enabled() and self.alpha_A.requires_grad:
            raise RuntimeError("EigenLoRAx layer is merged: its loadings would get no gradient; call unmerge() "
                               "before training (merge() is for inference)")


class EigenLinear(_Merging, torch.nn.Module):
    """A Linear (or transformers Conv1D) with a frozen base and an EigenLoRAx update over shared
    components (P_A, P_B are buffers shared, not copied, between tasks)."""

    def __init__(self, base: torch.nn.Module, PA: torch.Tensor, PB: torch.Tensor, rank: int, scaling: float,
                 init: str, generator: torch.Generator, start: Optional[tuple] = None, as_stored: bool = False):
        super().__init__()
        self.base = base
        layout = _linear_layout(base)
        if layout is None:
            raise TypeError(f"EigenLinear wraps a torch.nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        self.fan_in_fan_out = layout[2]  # merge adds ΔWᵀ to a Conv1D's in x out weight
        self.as_stored = as_stored       # the adapters' LoRA was on the weight as a parameter: exported as one
        self.register_buffer("PA", PA, persistent=False)  # n x K
        self.register_buffer("PB", PB, persistent=False)  # m x K
        aA, aB = _initial_loadings(PA.shape[1], PB.shape[1], rank, init, generator, start)
        self.alpha_A = torch.nn.Parameter(aA.to(PA.device))
        self.alpha_B = torch.nn.Parameter(aB.to(PA.device))
        self.scaling = scaling
        self.merged = False
        self._unmerged: Optional[torch.Tensor] = None   # the weight before merge(), kept for unmerge()
        self._keep = True   # merge()'s choice, which a task switch's re-merge repeats

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (as peft's LoRA layers expose it)."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def get_extra_state(self) -> torch.Tensor:
        # whether base.weight holds the update: a state dict taken while merged, loaded into an unmerged
        # model (or the reverse), must not count the update twice (or drop it)
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        self.merged = bool(state)
        self._unmerged = None   # the loaded weight is not the one merge() kept

    def lora_factors(self):
        """(B m x r, A r x n) of the current loadings."""
        return self.PB @ self.alpha_B, (self.PA @ self.alpha_A).T

    def slots(self, name: str) -> Dict[str, tuple]:
        """{name: (α_A, α_B)}: the loadings a task file holds for this layer, ``name`` being its module."""
        return {name: (self.alpha_A, self.alpha_B)}

    def peft_factors(self, name: str) -> Dict[str, tuple]:
        """{peft module name: (lora_B, lora_A)} of the layer's update as a peft LoRA writes it."""
        return {name: self.lora_factors()}

    def _weight(self) -> torch.Tensor:
        return self.base.weight

    def _delta(self) -> torch.Tensor:
        B, A = self.lora_factors()
        delta = self.scaling * B @ A
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            self._refuse_merged_training()
            return out
        h = (x.to(self.PA.dtype) @ self.PA) @ self.alpha_A        # ... x r
        return out + (self.scaling * (h @ self.alpha_B.T) @ self.PB.T).to(out.dtype)


def _padded(mats: List[torch.Tensor], dim: int) -> torch.Tensor:
    """2-D matrices stacked into one E x ... tensor, zero-padded along ``dim`` (0: rows, 1: columns) to the longest."""
    size = max(m.shape[dim] for m in mats)
    pad = (lambda m: (0, size - m.shape[1])) if dim == 1 else (lambda m: (0, 0, 0, size - m.shape[0]))
    return torch.stack([torch.nn.functional.pad(m, pad(m)) for m in mats])


class EigenParam(_Merging, torch.nn.Module):
    """The EigenLoRAx update of one 3-D MoE expert parameter (stored experts x out x in, or experts x in x out:
    ``transposed``): expert e's is scaling · (P_B,e α_B,e)(P_A,e α_A,e)ᵀ over its own components, all experts in
    one batched product. The bases are stacked E x d x K at the largest expert's K: zero columns pad the others,
    and the loadings' padding rows, which no gradient reaches, stay 0."""

    def __init__(self, module: torch.nn.Module, param: str, PAs: List[torch.Tensor], PBs: List[torch.Tensor],
                 rank: int, scaling: float, init: str, generator: torch.Generator, starts: List[Optional[tuple]],
                 transposed: bool, depth: int):
        super().__init__()
        object.__setattr__(self, "_module", module)   # the experts module (its wrapper registers it, as ``base``)
        self.param, self.transposed, self.depth = param, transposed, depth
        self.KA, self.KB = [P.shape[1] for P in PAs], [P.shape[1] for P in PBs]
        self.register_buffer("PA", _padded(PAs, 1), persistent=False)  # E x n x K_A
        self.register_buffer("PB", _padded(PBs, 1), persistent=False)  # E x m x K_B
        loads = [_initial_loadings(a, b, rank, init, generator, s) for a, b, s in zip(self.KA, self.KB, starts)]
        self.alpha_A = torch.nn.Parameter(_padded([a for a, _ in loads], 0).to(self.PA.device))
        self.alpha_B = torch.nn.Parameter(_padded([b for _, b in loads], 0).to(self.PA.device))
        self.scaling = scaling
        self.merged = False
        self._unmerged: Optional[torch.Tensor] = None
        self._keep = True

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B E x m x r, A E x r x n) of the current loadings."""
        return torch.bmm(self.PB, self.alpha_B), torch.bmm(self.PA, self.alpha_A).transpose(1, 2)

    def _weight(self) -> torch.Tensor:
        return getattr(self._module, self.param)

    def _delta(self) -> torch.Tensor:
        B, A = self.factors()
        delta = self.scaling * torch.bmm(B, A)
        return delta.transpose(1, 2) if self.transposed else delta

    def updated(self) -> torch.Tensor:
        """The parameter plus its update, one batched multiply-add in the parameter's dtype (what the experts
        compute with while unmerged; gradients reach the loadings)."""
        W = self._weight()
        B, A = (f.to(W.dtype) for f in self.factors())
        return torch.baddbmm(W, A.mT, B.mT, alpha=self.scaling) if self.transposed else \
            torch.baddbmm(W, B, A, alpha=self.scaling)

    def slots(self, name: str) -> Dict[str, tuple]:
        return {f"{name}.{self.param}[{e}]": (self.alpha_A[e, :ka], self.alpha_B[e, :kb])
                for e, (ka, kb) in enumerate(zip(self.KA, self.KB))}

    def peft_factors(self, name: str) -> Dict[str, tuple]:
        """{peft wrapper name: (lora_B m x r·E, lora_A r·E x n)}: peft's LoRA on the parameter (its ParamWrapper,
        nested as in the source adapters)."""
        B, A = self.factors()
        return {name + ".base_layer" * self.depth: stack_experts(list(zip(B, A)))}


class EigenExperts(torch.nn.Module):
    """A MoE block's experts module (``base``) whose 3-D expert parameters carry EigenLoRAx updates (one
    ``EigenParam`` each, in ``eigen``): its forward runs the module on W + ΔW (``torch.func.functional_call``, as
    peft's ParamWrapper adds its update to the parameter). Other attributes are the experts module's."""

    fan_in_fan_out = False

    def __init__(self, base: torch.nn.Module, params: Dict[str, EigenParam]):
        super().__init__()
        self.base = base
        self.eigen = torch.nn.ModuleDict(params)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "eigen"):
                raise
            return getattr(self.base, name)   # num_experts, is_transposed, ... as the MoE block reads them

    @property
    def merged(self) -> bool:
        return any(p.merged for p in self.eigen.values())

    @property
    def _keep(self) -> bool:
        return all(p._keep for p in self.eigen.values())

    @property
    def scaling(self) -> float:
        return next(iter(self.eigen.values())).scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        for p in self.eigen.values():
            p.scaling = value

    def merge(self, keep: bool = True) -> None:
        for p in self.eigen.values():
            p.merge(keep)

    def unmerge(self) -> None:
        for p in self.eigen.values():
            p.unmerge()

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([p.merged for p in self.eigen.values()])

    def set_extra_state(self, state) -> None:
        for p, merged in zip(self.eigen.values(), state.tolist()):
            p.merged, p._unmerged = bool(merged), None

    def slots(self, name: str) -> Dict[str, tuple]:
        return {k: v for p in self.eigen.values() for k, v in p.slots(name).items()}

    def peft_factors(self, name: str) -> Dict[str, tuple]:
        return {k: v for p in self.eigen.values() for k, v in p.peft_factors(name).items()}

    def forward(self, *args, **kwargs):
        live = {name: p for name, p in self.eigen.items() if not p.merged}
        if len(live) < len(self.eigen):
            next(p for p in self.eigen.values() if p.merged)._refuse_merged_training()
        if not live:
            return self.base(*args, **kwargs)
        return torch.func.functional_call(self.base, {name: p.updated() for name, p in live.items()}, args, kwargs)


def _live(method):
    """Refuse ``method`` on an EigenModel that ``unload`` emptied (its layers gone, each call misbehaved)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self._unloaded:
            raise RuntimeError(f"this EigenModel was unloaded (unload() returned the plain model), so it has no "
                               f"{method.__name__}(): apply the subspace again")
        return method(self, *args, **kwargs)
    return run


class EigenModel:
    """Handle returned by ``apply``: the wrapped layers, task coefficients, merge and export (refused once
    ``unload`` returned the plain model)."""

    def __init__(self, model, subspace: EigenSubspace, layers: Dict[str, Union[EigenLinear, EigenExperts]],
                 rank: int, extra_names: Sequence[str] = ()):
        self.model, self.subspace, self.layers, self.rank = model, subspace, layers, rank
        self.extra_names = list(extra_names)  # parameters apply(trainable=...) unfroze: the task's head
        self._grad_before: Dict[str, bool] = {}  # requires_grad of the model's parameters before apply
        self._unloaded = False

    @_live
    def extra(self, task_type: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """The task's own tensors besides the loadings, keyed by the model's names: the parameters
        ``apply(trainable=...)`` unfroze (e.g. the head), completed as ``_whole_modules`` does for
        ``task_type``. Saved with the task by default."""
        return self._whole_modules({n: self.model.get_parameter(n) for n in self.extra_names}, task_type)

    def _whole_modules(self, extra: Dict[str, torch.Tensor],
                       task_type: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """``extra`` plus every tensor a peft adapter holding it must carry, from the model. peft wraps
        each module whose name *ends with* a ``modules_to_save`` entry (a plain string match: ``classifier``
        also wraps ``pre_classifier``), adds its task model's heads (``classifier`` / ``score`` under
        SEQ_CLS) to those entries, and loads every tensor of a wrapped module's state dict: so a
        LayerNorm's frozen weight goes beside its trained bias, a whole head beside its trained part,
        DistilBERT's pre_classifier beside its classifier. A tensor of the model itself (no module) or of
        a module the model lacks stays as given (``write_peft`` refuses the first); the given tensors win
        over the model's. Refused, since peft could not load the adapter: a wrapped module that is or
        holds an adapted layer, and one inside another (nested wrappers)."""
        out = {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v for k, v in extra.items()}
        if not out:
            return out
        heads = _TASKS_WITH_HEAD.get(task_type, ())
        parents = lambda n: (".".join(n.split(".")[:i]) for i in range(1, n.count(".") + 1))  # noqa: E731
        names = [n for n, _ in self.model.named_modules() if n and not any(
            p in self.layers for p in parents(n))]  # not inside an adapted layer (peft's names differ there)
        while True:  # a completed module is an entry too, which may match more names
            owners = _modules_to_save(list(out), heads)
            entries = tuple((set(owners.values()) | set(heads)) - {""})
            wrapped = [n for n in names if n.endswith(entries)]
            clash = next(((n, t) for n in wrapped if (t := _adapted_near(n, self.layers))), None)
            if clash:
                src = next((k for k, m in owners.items() if m and clash[0].endswith(m)), None)
                why = f"for the extra tensor {src}" if src else f"as the head of task_type {task_type}"
                raise ValueError(f"peft would wrap {clash[0]} {why} (modules_to_save end-matches names), which is or "
                                 f"holds the adapted layer {clash[1]}: peft cannot save a module with LoRA "
                                 "in it; train (or pass) other modules, or give another task type")
            nested = [(a, b) for a in wrapped for b in wrapped if b.startswith(a + ".")]
            if nested:
                raise ValueError(f"peft would wrap {nested[0][1]} inside {nested[0][0]} (modules_to_save entries "
                                 f"{sorted(entries)} end-match both) and could not load the adapter: rename the inner "
                                 "module or train a module that holds no such one")
            missing = {f"{n}.{k}": v for n in wrapped
                       for k, v in self.model.get_submodule(n).state_dict(keep_vars=True).items()
                       if f"{n}.{k}" not in out}
            if not missing:
                return out
            out.update(missing)

    def _warn_unsaved(self, path: str) -> None:
        """Warn about parameters that require grad but are saved neither as loadings nor as ``extra()``:
        unfrozen after ``apply`` (e.g. ``model.head.requires_grad_(True)``), they would be trained and lost."""
        loadings = {id(p) for l in self.layers.values() for n, p in l.named_parameters()
                    if n.rpartition(".")[2] in ("alpha_A", "alpha_B")}
        left = [n for n, p in self.model.named_parameters()
                if p.requires_grad and id(p) not in loadings and n not in self.extra_names]
        if left:
            _warn.warn(f"{path}: {len(left)} parameter(s) require grad but are not saved with the task "
                       f"({', '.join(left[:3])}{' ...' if len(left) > 3 else ''}): unfrozen after apply(), "
                       "they are not the task's extra tensors; pass apply(trainable=[...]) to train and save "
                       "them, or extra=... here", stacklevel=3)

    @_live
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _slots(self) -> Dict[str, tuple]:
        """{layer: (α_A, α_B, wrapper)}: a MoE expert parameter's experts are layers "<module>.<param>[e]" (their
        loadings views of its stacked ones)."""
        return {k: (*v, l) for name, l in self.layers.items() for k, v in l.slots(name).items()}

    @_live
    def coefficient_count(self) -> int:
        """The loadings a task holds (``trainable_parameters`` also counts the zero rows that pad the experts of a
        MoE parameter to its largest K)."""
        return sum(a.numel() + b.numel() for a, b, _ in self._slots().values())

    @_live
    def coefficients(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name, (a, b, _) in self._slots().items():
            out[f"{name}.alpha_A"] = a.detach().clone()
            out[f"{name}.alpha_B"] = b.detach().clone()
        return out

    @_live
    def save_coefficients(self, path: str, extra: Optional[Dict[str, torch.Tensor]] = None, *,
                          task_type: Optional[str] = None) -> None:
        """One task: its loadings and its other trained tensors as a small safetensors file. ``extra``
        (keyed by the model's parameter names, e.g. ``classifier.weight``) defaults to ``self.extra()``,
        the modules ``apply(trainable=...)`` unfroze, whole; pass ``{}`` to save the loadings only.
        ``task_type`` (peft's, e.g. "SEQ_CLS") is recorded for ``export_task``."""
        t = self.coefficients()
        if extra is None:
            self._warn_unsaved(path)
        extra = self.extra(task_type) if extra is None else self._whole_modules(extra, task_type)
        for k, v in extra.items():
            t[f"extra.{k}"] = v.detach().contiguous()
        check_finite(t, f"{path}: refusing to save")
        scaling = next(iter(self.layers.values())).scaling
        meta = {"format": TASK_FORMAT, "rank": str(self.rank), "scaling": repr(scaling),
                "subspace": self.subspace.digest()}
        if extra:
            meta["extra"] = _WHOLE_MODULES  # older files may hold part of a module (export_task warns)
        if task_type is not None:
            meta["task_type"] = _check_task_type(task_type, bool(extra), f"{path}: refusing to save")
        save_with_digest(t, path, meta)

    @torch.no_grad()
    @_live
    def load_coefficients(self, source: Union[str, Dict[str, torch.Tensor]], *,
                          restore_extra: bool = True) -> Dict[str, torch.Tensor]:
        """Switch task: copy its saved loadings into the layers (the basis stays loaded), adopt the scaling
        it was trained with (recorded in the file), and copy the other tensors saved with it (e.g. its
        head) into the model's parameters of the same names (``restore_extra=False``: leave them to the
        caller). Everything is checked before anything changes. Returns the extra tensors."""
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "task coefficients"
        t, meta = _read_task(source)
        self.subspace.check_task(meta, where)
        names = sorted({k[: -len(".alpha_A")] for k in t if k.endswith(".alpha_A")})
        slots = self._slots()
        mapping = _map_modules(names, slots, "the model's EigenLoRAx layers", where) if names else {}
        missing = sorted(set(slots) - set(mapping.values()))
        if missing:
            raise FormatError(f"{where}: no loadings for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        for name, target in mapping.items():  # check everything before changing anything
            for side, dst in zip(("alpha_A", "alpha_B"), slots[target]):
                key = f"{name}.{side}"
                if key not in t:
                    raise FormatError(f"{where}: lacks {key}")
                if not t[key].is_floating_point():
                    raise FormatError(f"{where}: {key} has dtype {t[key].dtype}, not a floating type")
                if t[key].shape != dst.shape:
                    raise FormatError(f"{where}: {key}: shape {tuple(t[key].shape)} != {tuple(dst.shape)} "
                                      "(other subspace or rank?)")
        scaling = _check_scaling(meta["scaling"], where) if "scaling" in meta else None
        extra = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
        dests = self._extra_destinations(extra, where) if restore_extra else {}
        merged = [x for l in self.layers.values() for x in (l.eigen.values() if isinstance(l, EigenExperts) else [l])
                  if x.merged]   # each expert parameter on its own: one may be merged without the others
        keep = [l._keep for l in merged]
        for l in merged:
            l.unmerge()
        for name, target in mapping.items():
            aA, aB, _ = slots[target]
            aA.copy_(t[f"{name}.alpha_A"])
            aB.copy_(t[f"{name}.alpha_B"])
        if scaling is not None:
            for l in self.layers.values():
                l.scaling = scaling
        for l, k in zip(merged, keep):
            l.merge(k)
        for k, dst in dests.items():
            dst.copy_(extra[k])
        return extra

    def _extra_destinations(self, extra: Dict[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
        """The model's tensor (parameter or buffer) for each extra tensor of a task, shapes checked."""
        dests = {}
        for k, v in extra.items():
            name = k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) and self._model_tensor(k) is None else k
            near = _adapted_near(name.rpartition(".")[0], self.layers)
            if near:   # the layer's frozen base weight or the shared basis: never a task's own tensor
                raise FormatError(f"{where}: the task's tensor {k} lies in the adapted layer {near}, whose weights "
                                  "and basis the task may not change (save_coefficients never writes such a tensor)")
            dst = self._model_tensor(name)
            if dst is None:
                raise FormatError(f"{where}: the task's tensor {k} has no parameter of that name in the model "
                                  "(pass restore_extra=False to load it yourself)")
            if v.is_complex() or v.is_floating_point() != dst.is_floating_point() or (v.dtype == torch.bool) != \
                    (dst.dtype == torch.bool):
                raise FormatError(f"{where}: the task's tensor {k} has dtype {v.dtype}, the model's {dst.dtype}")
            if dst.shape != v.shape:
                raise FormatError(f"{where}: the task's tensor {k} is {tuple(v.shape)} but the model's is "
                                  f"{tuple(dst.shape)} (another head size?)")
            dests[k] = dst
        return dests

    def _model_tensor(self, name: str) -> Optional[torch.Tensor]:
        """The model's parameter or buffer ``name`` (None if it has none): an attribute walk, not a scan
        of every parameter (a task switch is ~1 ms)."""
        for get in (self.model.get_parameter, self.model.get_buffer):
            try:
                return get(name)
            except AttributeError:
                pass
        return None

    @_live
    def merge(self, keep: bool = True) -> None:
        """Fold the task's update into the wrapped layers' weights (for inference; ``unmerge`` takes it out).
        Each weight is kept (one copy: the adapted weights' memory once more) so that ``unmerge`` and task switches
        restore it bit for bit; ``keep=False`` saves that memory (task switches keep to it), and ``unmerge`` then
        subtracts the update, which rounds: the base drifts with every switch.
        A weight tied to another module (GPT-2's lm_head is the input embedding) is refused before any
        layer is merged: the update would change that module too."""
        self._refuse_tied("merge")
        for l in self.layers.values():
            l.merge(keep)

    def _refuse_tied(self, what: str) -> None:
        names = parameter_names(self.model)
        for target, l in self.layers.items():
            if l.merged or isinstance(l, EigenExperts):   # expert parameters are not tied
                continue
            tied = tied_elsewhere(names, target, l.base.weight)
            if tied:
                raise ValueError(f"{target}: its weight is tied to {tied} (one shared parameter): {what} would add "
                                 f"the update to that module too; use the unmerged model, or export_peft")

    @_live
    def unmerge(self) -> None:
        for l in self.layers.values():
            l.unmerge()

    @_live
    def unload(self, merge: bool = True) -> torch.nn.Module:
        """Put the original Linear / Conv1D layers back into the model, with the task's update folded into
        their weights (``merge=False``: without it), every parameter's ``requires_grad`` as it was before
        ``apply``, and return the model: a plain transformers model again, which ``save_pretrained`` saves
        and ``from_pretrained`` loads. The handle is unusable after."""
        if merge:
            self._refuse_tied("unload(merge=True)")
        for target, l in self.layers.items():
            l.merge(keep=False) if merge else l.unmerge()
            self.model.set_submodule(target, l.base)
        _ddp_ignore(self.model, self.layers, False)
        self.layers, self._unloaded = {}, True
        for name, p in self.model.named_parameters():
            if name in self._grad_before:
                p.requires_grad_(self._grad_before[name])
        return self.model

    @_live
    def export_peft(self, path: str, *, extra: Optional[Dict[str, torch.Tensor]] = None,
                    task_type: Optional[str] = None, config: Optional[dict] = None) -> PeftAdapter:
        """Write the task as a standard peft LoRA folder (B = P_B α_B, A = (P_A α_A)ᵀ, lora_alpha chosen so
        peft's scaling equals ours). ``extra`` (default ``self.extra()``, the modules
        ``apply(trainable=...)`` unfroze, whole, e.g. the head; keyed by the model's names) is written
        as peft's ``modules_to_save``. ``config``: overrides of adapter_config.json."""
        factors = {k: v for name, l in self.layers.items() for k, v in l.peft_factors(name).items()}
        scaling = next(iter(self.layers.values())).scaling
        plain = {name: l for name, l in self.layers.items() if isinstance(l, EigenLinear)}
        params = [f"{name}.{p}" for name, l in self.layers.items() if isinstance(l, EigenExperts) for p in l.eigen]
        config = {**_as_parameters(plain, {n for n, l in plain.items() if l.as_stored}, params), **(config or {})}
        fan_in_fan_out = any(l.fan_in_fan_out for l in self.layers.values())
        if extra is None:
            self._warn_unsaved(path)
        extra = self.extra(task_type) if extra is None else self._whole_modules(extra, task_type)
        return write_peft(path, factors, self.rank, scaling, self.subspace.meta.get("base_model_name_or_path"),
                          extra, config, task_type, fan_in_fan_out=fan_in_fan_out)


def task_switch_seconds(em: EigenModel, coefficients_file: str, lora_model, lora_weights_file: str, *,
                        n: int = 50, warmup: int = 3) -> tuple:
    """Median seconds of a task switch from files: (EigenLoRAx ``load_coefficients`` on the loaded
    basis, peft's ``load_file`` + ``set_peft_model_state_dict`` of a LoRA adapter), for comparison."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .plots import median_seconds

    eigen_s = median_seconds(lambda: em.load_coefficients(coefficients_file), n=n, warmup=warmup)
    lora_s = median_seconds(lambda: set_peft_model_state_dict(lora_model, load_file(lora_weights_file)),
                            n=n, warmup=warmup)
    return eigen_s, lora_s


def _check_task_type(task_type: Optional[str], has_head: bool = True, where: str = "") -> Optional[str]:
    """A peft task type (or None); one whose peft model restores a trained head needs the head saved
    (with the model at hand, ``EigenModel._whole_modules`` saves every module peft will wrap)."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of peft's {', '.join(TASK_TYPES)} (or None), got {task_type!r}")
    if task_type in _TASKS_WITH_HEAD and not has_head:
        raise ValueError(f"{where}: task_type {task_type} makes peft load a trained head "
                         f"({' / '.join(_TASKS_WITH_HEAD[task_type])}) from the adapter, but none is saved with "
                         "the task: pass the head's tensors as extra= (e.g. {n: p for n, p in "
                         "model.named_parameters() if 'classifier' in n}), or give no task type")
    return task_type


def write_peft(path: str, factors: Dict[str, tuple], rank: int, scaling: float, base_name: Optional[str],
               extra: Optional[Dict[str, torch.Tensor]] = None, config: Optional[dict] = None,
               task_type: Optional[str] = None, *, fan_in_fan_out: bool = False) -> PeftAdapter:
    """A peft LoRA folder from per-module factors {module: (B m x r, A r x n)}; update = scaling·B·A.
    ``fan_in_fan_out``: the modules are transformers Conv1D layers (GPT-2); the factors are the same.

    ``extra`` tensors (keyed by the model's parameter names, e.g. ``classifier.weight``; a leading
    ``base_model.model.`` is accepted) are saved as peft saves ``modules_to_save`` — under
    ``base_model.model.<name>``, with their modules listed in ``modules_to_save`` — so that
    ``PeftModel.from_pretrained`` loads them instead of keeping the base model's (e.g. a random head)."""
    scaling = _check_scaling(scaling, path)
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().float().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().float().contiguous()
    extra = {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v.detach() for k, v in (extra or {}).items()}
    task_type = _check_task_type(task_type, bool(extra), f"{path}: refusing to export")
    modules = _modules_to_save(extra, _TASKS_WITH_HEAD.get(task_type, ()))  # classifier.weight -> classifier
    for k, module in modules.items():
        lora = _adapted_near(module, factors)
        if not module or lora:
            raise ValueError(f"extra tensor {k}: peft can only restore parameters of a module outside the LoRA "
                             "layers (modules_to_save), such as classifier.weight"
                             + (f"; its module {module} holds or lies in the LoRA layer {lora}" if lora else ""))
    tensors.update({_PEFT_PREFIX + k: v for k, v in extra.items()})
    check_finite(tensors, f"{path}: refusing to export")
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": scaling * rank, "target_modules": sorted(factors),
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": bool(fan_in_fan_out), "use_rslora": False,
           "init_lora_weights": True, "base_model_name_or_path": base_name,
           "modules_to_save": sorted(set(modules.values())) or None,
           "task_type": task_type}
    cfg.update(config or {})
    ad = PeftAdapter(cfg, tensors)
    ad.save_adapter(path)
    return ad


def export_task(subspace: EigenSubspace, coefficients: Union[str, Dict[str, torch.Tensor]], path: str, *,
                scaling: Optional[float] = None, task_type: Optional[str] = None,
                config: Optional[dict] = None) -> PeftAdapter:
    """A saved task (``save_coefficients`` file) + its subspace -> a peft LoRA folder, without a model.
    Extra tensors saved with the task (e.g. a head) become peft ``modules_to_save`` (see ``write_peft``).
    ``scaling`` and ``task_type`` default to the ones recorded in the task file (1.0 and None for a dict
    or a file without them)."""
    t, meta = _read_task(coefficients)
    from_file = isinstance(coefficients, (str, os.PathLike))
    where = os.fspath(coefficients) if from_file else "task coefficients"
    subspace.check_task(meta, where)
    if scaling is None:
        scaling = _check_scaling(meta.get("scaling", 1.0), where)  # only a file records one
    recorded = meta.get("task_type")
    if recorded is not None:
        try:
            _check_task_type(recorded, True, where)
        except ValueError as e:
            raise FormatError(f"{where}: records {e}") from None
    task_type = task_type if task_type is not None else recorded
    factors, rank, experts = {}, None, {}
    names = sorted({k[: -len(".alpha_A")] for k in t if k.endswith(".alpha_A")})
    if not names:
        raise FormatError(f"{where}: no task coefficients (*.alpha_A) found")
    mapping = _map_modules(names, dict.fromkeys(subspace.modules), "the subspace", where)
    missing = sorted(set(subspace.modules) - set(mapping.values()))
    if missing:
        raise FormatError(f"{where}: no loadings for the subspace's {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for name, mod in mapping.items():
        aA, aB = t[f"{name}.alpha_A"], t.get(f"{name}.alpha_B")
        if aB is None:
            raise FormatError(f"{where}: lacks {name}.alpha_B")
        if not (aA.is_floating_point() and aB.is_floating_point()):
            raise FormatError(f"{where}: {name}: loadings of dtype {aA.dtype} / {aB.dtype}, not floating types")
        PA, PB = subspace.A[mod].P, subspace.B[mod].P
        if aA.dim() != 2 or aB.dim() != 2 or aA.shape[1] != aB.shape[1] or aA.shape[1] < 1:
            raise FormatError(f"{where}: {name}: loadings must be K x r matrices of one rank r >= 1, got alpha_A "
                              f"{tuple(aA.shape)}, alpha_B {tuple(aB.shape)}")
        for side, a, P in (("alpha_A", aA, PA), ("alpha_B", aB, PB)):
            if a.shape[0] != P.shape[1]:
                raise FormatError(f"{where}: {name}.{side} does not fit the subspace ({a.shape[0]} rows, its basis "
                                  f"has K = {P.shape[1]}): another subspace?")
        aA = aA.float()
        if rank is not None and aA.shape[1] != rank:
            raise FormatError(f"{where}: {name}: loadings of rank {aA.shape[1]} beside rank {rank} in the other "
                              "layers: a task has one rank (peft's adapter config holds one r)")
        ex = subspace.expert_layer(mod)
        if ex is None:
            factors[name] = (PB @ aB.float(), (PA @ aA).T)
        else:   # stacked into its parameter's LoRA below; the task's name of the module is name less ".<param>[e]"
            group = experts.setdefault((name[: -len(f".{ex[1]}[{ex[2]}]")], ex[1], f"{ex[0]}.{ex[1]}"), {})
            group[ex[2]] = (PB @ aB.float(), (PA @ aA).T)
        rank = aA.shape[1]
    plain = list(factors)
    for (core, param, group), pairs in experts.items():
        factors[core + ".base_layer" * subspace.experts[group][1]] = stack_experts([pairs[e] for e in sorted(pairs)])
    extra = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
    heads = _TASKS_WITH_HEAD.get(task_type, ())
    if extra and task_type != recorded and heads and \
            not any(part in heads for k in extra for part in k.split(".")[:-1]):
        _warn.warn(f"{where}: saved for task_type {recorded}, exported as {task_type}, whose peft model also "
                   f"loads any {' / '.join(heads)} module of the model from the adapter, and the task holds none: "
                   "if PeftModel.from_pretrained fails on the export (KeyError), save the task with "
                   f"task_type={task_type!r}", stacklevel=2)
    if extra and from_file and meta.get("extra") != _WHOLE_MODULES:
        _warn.warn(f"{where}: written by an older subspace_ext, which saved only the trained tensors of a "
                   "module, while peft loads a modules_to_save module whole: if PeftModel.from_pretrained fails "
                   "on the export (KeyError), save the task again: apply(..., trainable=<the whole module>), "
                   "load_coefficients(this file), save_coefficients(...)", stacklevel=2)
    stored = {name for name in plain if mapping[name] in subspace.meta.get("as_stored", [])}
    config = {**_as_parameters(plain, stored, [f"{core}.{param}" for core, param, _ in experts]), **(config or {})}
    return write_peft(path, factors, rank, scaling, subspace.meta.get("base_model_name_or_path"), extra, config,
                      task_type, fan_in_fan_out=bool(subspace.meta.get("fan_in_fan_out", False)))


def _as_parameters(modules: Sequence[str], stored: set, params: Sequence[str]) -> dict:
    """The config that targets the ``stored`` ones of ``modules`` (whose source adapters had LoRA on the weight as a
    parameter: peft adds scaling * B @ A to it as stored) and the MoE expert parameters ``params``
    ("<module>.<param>") as peft's target_parameters, the other modules as target_modules."""
    if not stored and not params:
        return {}
    # peft refuses fan_in_fan_out with target_parameters; its module LoRA takes each module's layout anyway
    return {"target_modules": sorted(set(modules) - set(stored)),
            "target_parameters": sorted([f"{m}.weight" for m in stored] + list(params)), "fan_in_fan_out": False}


def apply(model: torch.nn.Module, subspace: EigenSubspace, task_rank: int, *, scaling: float = 1.0,
          init: str = "uniform", source: Optional[Union[str, PeftAdapter]] = None, trainable: Sequence[str] = (),
          seed: int = 0, check_base: bool = True, progress: bool = False) -> EigenModel:
    """Wrap the subspace's modules of ``model`` (a transformers model) with EigenLinear layers (a MoE block's
    experts module, whose expert parameters the subspace adapts one layer per expert, with an EigenExperts) and
    freeze everything but the loadings (and parameters whose name contains one of ``trainable``,
    e.g. ``("classifier",)`` for a task head; ``save_coefficients`` / ``export_peft`` save their modules
    with the task). The patterns must match a parameter and none may reach the adapted layers' own
    weights (checked before anything changes).

    ``init``: "uniform" (the authors' default: both loadings uniform(−0.5, 0.5), so ΔW ≠ 0 at step 0)
    or "lora" (B loadings zero: the model starts as the base model) or "project" (DESIGN's other start: the
    update of ``source``, a peft LoRA adapter of the same base (folder or PeftAdapter; e.g. a related task's),
    projected onto the subspace, P_B P_Bᵀ ΔW P_A P_Aᵀ, best rank ``task_rank``; a column beyond that
    projection's rank starts as with "lora"; the source must adapt every layer of the subspace, and its other
    layers are ignored). ``scaling`` multiplies the update
    (1.0 = the authors' no-scaling forward). Module names are matched by one prefix mapping for the whole
    subspace (a subspace built from ``bert.encoder...`` adapters applies to a ``BertModel``'s
    ``encoder...``); a layer the model lacks is an error. ``check_base``: compare each weight with the
    subspace's base fingerprint (when it has one); False accepts e.g. the base loaded in another dtype.
    ``progress``: a progress bar on stderr over the modules checked (a MoE model's experts: ~2 s per layer of
    128 experts of a Qwen3-30B-A3B shape, mostly their fingerprints).
    """
    if init not in ("uniform", "lora", "project"):
        raise ValueError(f"init must be 'uniform', 'lora' or 'project', got {init!r}")
    if (init == "project") != (source is not None):
        raise ValueError("init='project' takes the adapter to project as source=..., and source only goes with it")
    scaling = _check_scaling(scaling, "apply")
    if isinstance(task_rank, bool) or not isinstance(task_rank, int) or task_rank < 1:
        raise ValueError(f"task_rank must be a positive int, got {task_rank!r}")
    refuse_distributed(model, "EigenLoRAx apply", ddp=True)
    model = unwrap_model(model)   # torch.compile / DataParallel wrappers: the plain model's names
    named = dict(model.named_modules())
    targets, mods, conv1d, experts = {}, {}, set(), {}
    plain = [m for m in subspace.modules if subspace.expert_layer(m) is None]
    cores = list(dict.fromkeys(g.rpartition(".")[0] for g in subspace.experts))   # modules with expert parameters
    mapped = _map_modules(plain + cores, named, "the model")
    for mod, target in progress_bar(mapped.items(), "eigen: apply", progress, total=len(mapped)):  # check, then change
        lin = named[target]
        if isinstance(lin, (EigenLinear, EigenExperts)):
            raise ValueError(f"{target} is already an EigenLoRAx layer: apply once per model "
                             "(load_coefficients switches tasks)")
        if hasattr(lin, "base_layer"):
            raise ValueError(f"{target} is a peft adapter layer ({type(lin).__module__}.{type(lin).__name__}): "
                             "apply EigenLoRAx to the base model, not to a PeftModel")
        if mod in cores:
            experts[target] = _expert_targets(lin, mod, target, subspace, check_base)
            continue
        layout = _linear_layout(lin)
        if layout is None:
            raise ValueError(f"{target}: expected a torch.nn.Linear or a transformers Conv1D, got "
                             f"{type(lin).__module__}.{type(lin).__name__}")
        quant = quantized(lin)
        if quant:
            raise ValueError(f"{target} is quantized ({quant}): EigenLoRAx reads and merges the weight's numbers "
                             "(its shape, the base fingerprint, merge()); load the model unquantized")
        if layout[2] and mod in subspace.meta.get("as_stored", []):
            raise ValueError(f"layer {mod}: the adapters' LoRA is on this Conv1D's weight as a parameter (peft's "
                             "target_parameters: added to the in x out weight as stored), which apply() does not "
                             "wrap; export_task writes it as a peft adapter")
        PA, PB = subspace.A[mod].P, subspace.B[mod].P
        if (PA.shape[0], PB.shape[0]) != layout[:2]:
            raise ValueError(f"layer {mod}: subspace is for {PB.shape[0]} out x {PA.shape[0]} in but {target} is "
                             f"{layout[1]} out x {layout[0]} in: different base model?")
        fp = subspace.meta.get("fingerprints", {}).get(mod) if check_base else None
        if fp is not None and fingerprint(lin.weight.detach()) != fp:
            raise ValueError(f"layer {mod}: the model's weight ({str(lin.weight.dtype).replace('torch.', '')}) "
                             "differs from the subspace's base (fingerprint): another base model, or the same one "
                             "loaded in another dtype than its checkpoint (load it with dtype='auto', or "
                             "pass check_base=False)")
        targets[target] = (lin, PA, PB)
        mods[target] = mod
        if layout[2]:
            conv1d.add(mod)
    extra_names = _trainable_names(model, trainable, {**targets, **experts})
    starts = {} if source is None else _projected_loadings(source, subspace, task_rank, scaling, conv1d, named)
    grad_before = {name: p.requires_grad for name, p in model.named_parameters()}  # unload() restores them
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    layers: Dict[str, Union[EigenLinear, EigenExperts]] = {}
    names = parameter_names(model)
    for target, (lin, PA, PB) in targets.items():
        dev = lin.weight.device
        wrapped = EigenLinear(lin, PA.to(dev), PB.to(dev), task_rank, scaling, init, g, starts.get(mods[target]),
                              mods[target] in subspace.meta.get("as_stored", []))
        wrapped.train(lin.training)   # a model in eval mode stays in eval mode (merge() is for inference)
        tied = tied_elsewhere(names, target, lin.weight)
        if tied:   # GPT-2's lm_head: transformers' save_pretrained (a Trainer's checkpoints) saves the shared
            #        weight once where the module declares it tied; the wrapped name target.base.weight is not
            #        the one the model declares, and save_pretrained refused the shared tensor
            wrapped._tied_weights_keys = {"base.weight": tied}
        model.set_submodule(target, wrapped)
        layers[target] = wrapped
    for target, params in experts.items():
        module = named[target]
        eigen = {}
        for param, (group, transposed) in params.items():
            count, depth = subspace.experts[group]
            each = [f"{group}[{e}]" for e in range(count)]
            dev = getattr(module, param).device
            eigen[param] = EigenParam(module, param, [subspace.A[l].P.to(dev) for l in each],
                                      [subspace.B[l].P.to(dev) for l in each], task_rank, scaling, init, g,
                                      [starts.get(l) for l in each], transposed, depth)
        wrapped = EigenExperts(module, eigen)
        wrapped.train(module.training)
        model.set_submodule(target, wrapped)
        layers[target] = wrapped
    for name in extra_names:
        model.get_parameter(name).requires_grad_(True)
    _ddp_ignore(model, layers, True)
    em = EigenModel(model, subspace, layers, task_rank, extra_names)
    em._grad_before = grad_before
    return em


def _expert_targets(module: torch.nn.Module, core: str, target: str, subspace: EigenSubspace,
                    check_base: bool) -> Dict[str, Tuple[str, bool]]:
    """{param: (the subspace's "<core>.<param>", stored experts x in x out)} of the subspace's expert parameters of
    ``core``, the model's module ``target``, checked: a 3-D floating-point parameter of the subspace's expert count
    and shapes, not quantized, each expert's slice the subspace's base (fingerprint) unless not ``check_base``. The
    layout is the shape's, or for square experts the module's (``is_transposed``, as peft's rule)."""
    out = {}
    for group, (count, _) in subspace.experts.items():
        if group.rpartition(".")[0] != core:
            continue
        param = group.rpartition(".")[2]
        W = module._parameters.get(param)
        if not (isinstance(W, torch.Tensor) and W.dim() == 3 and W.is_floating_point()):
            raise ValueError(f"layer {group}: {target} ({type(module).__module__}.{type(module).__name__}) has no "
                             f"3-D floating-point parameter {param}: a different architecture, or a transformers "
                             "release that keeps these experts as Linear layers?")
        quant = quantized(module, W)
        if quant:
            raise ValueError(f"{target}.{param} is quantized ({quant}): EigenLoRAx adds to and merges the experts' "
                             "numbers; load the model unquantized")
        m, n = subspace.B[f"{group}[0]"].P.shape[0], subspace.A[f"{group}[0]"].P.shape[0]
        if W.shape[0] != count or tuple(W.shape[1:]) not in ((m, n), (n, m)):
            raise ValueError(f"layer {group}: the subspace is for {count} experts of {m} out x {n} in but "
                             f"{target}.{param} is {tuple(W.shape)}: different base model?")
        fps = subspace.meta.get("fingerprints", {}) if check_base else {}
        for e in range(count):
            fp = fps.get(f"{group}[{e}]")
            if fp is not None and fingerprint(W[e].detach()) != fp:
                raise ValueError(f"layer {group}[{e}]: the model's expert {e} of {target}.{param} "
                                 f"({str(W.dtype).replace('torch.', '')}) differs from the subspace's base "
                                 "(fingerprint): another base model, or the same one loaded in another dtype than "
                                 "its checkpoint (load it with dtype='auto', or pass check_base=False)")
        square = m == n
        out[param] = (group, bool(getattr(module, "is_transposed", False)) if square else tuple(W.shape[1:]) != (m, n))
    return out


DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # the names DistributedDataParallel skips, read off its module


def _ddp_ignore(model: torch.nn.Module, layers: Dict[str, torch.nn.Module], add: bool) -> None:
    """Add (or take back) the layers' bases to the names DistributedDataParallel(model) neither broadcasts nor
    reduces: DDP broadcast every buffer from rank 0 before each forward (by default), and the bases are constants,
    the same on every rank (read from one subspace file): (m + n) K numbers a layer, ~0.3 GB a forward for a
    7B model's Linears at K = 32."""
    names = [f"{target}.{b}" for target, l in layers.items() for b, _ in l.named_buffers()
             if b.rpartition(".")[2] in ("PA", "PB")]
    kept = [n for n in getattr(model, DDP_IGNORE, ()) if n not in names]
    setattr(model, DDP_IGNORE, kept + names if add else kept)


def _projected_loadings(source, subspace: EigenSubspace, rank: int, scaling: float,
                        conv1d: set, named: Dict[str, torch.nn.Module]) -> Dict[str, tuple]:
    """{module: (α_A K_A x k, α_B K_B x k)} with scaling · P_B α_B α_Aᵀ P_Aᵀ the best rank-k (k <= ``rank``)
    approximation of the source's update projected onto the subspace, P_B P_Bᵀ ΔW P_A P_Aᵀ (a K_B x K_A core
    from the factors: ΔW is not formed); k stops at the core's numerical rank. ``named``: the model's modules
    (which expert parameter each of the source's wrappers adapts)."""
    adapter = source if isinstance(source, PeftAdapter) else PeftAdapter.load(os.fspath(source))
    name = "source" if isinstance(source, PeftAdapter) else os.fspath(source)
    refuse_layer_replication(adapter.config, name)
    ups = _source_updates(adapter, name, subspace, named)
    found = _map_modules(subspace.modules, dict.fromkeys(ups), f"the source adapter {name}")
    out = {}
    for mod, key in found.items():
        u, PA, PB = ups[key], subspace.A[mod].P.double(), subspace.B[mod].P.double()
        if u.as_stored and mod in conv1d:
            raise ValueError(f"{name}: layer {key}: LoRA on this Conv1D's weight as a parameter (peft's "
                             "target_parameters: in x out, as stored), the subspace's directions are out x in")
        if u.shape != (PB.shape[0], PA.shape[0]):
            raise ValueError(f"{name}: layer {key} is a {u.shape[0]} out x {u.shape[1]} in update, the subspace's "
                             f"{mod} is {PB.shape[0]} out x {PA.shape[0]} in: an adapter of another base model?")
        core = (PB.T @ (u.B.double() * (u.scaling / scaling))) @ (u.A.double() @ PA)   # K_B x K_A
        U, S, Vh = torch.linalg.svd(core, full_matrices=False)
        k = min(rank, int((S > 1e-6 * S[0]).sum()) if float(S[0]) > 0 else 0)
        root = S[:k].sqrt()
        out[mod] = ((Vh[:k].T * root).float(), (U[:, :k] * root).float())
    return out


def _source_updates(adapter: PeftAdapter, name: str, subspace: EigenSubspace,
                   named: Dict[str, torch.nn.Module]) -> Dict[str, LowRankUpdate]:
    """{layer: update} of the source adapter of init="project", in the subspace's terms: LoRA on a MoE expert
    parameter is split per expert ("<module>.<param>[e]") by the subspace's expert count. Which parameter a wrapper
    adapts is peft's rule on the model (``named``, its modules): the module's 3-D parameters the source targets, in
    the module's order, the first innermost; a 3-D ``weight`` (JetMoe), which an adapter alone reads as 2-D, too.
    A wrapper of a parameter the subspace does not adapt is ignored, as the source's other layers are."""
    if not subspace.experts:
        return _updates_by_module(adapter, name)
    try:
        updates = adapter.updates(experts=True)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    cores = [unnested(u.module) for u in updates if u.params or u.as_stored]
    P, Q = (prefix_rewrite(cores, named) if cores else None) or ("", "")   # the source's names -> the model's
    out = {}
    for u in updates:
        params, core = u.params or (("weight",) if u.as_stored else ()), unnested(u.module)
        module = named.get(Q + core[len(P):]) if core.startswith(P) else None
        param = None if module is None else nested_parameter(
            module, {p for p, t in module.named_parameters(recurse=False) if p in params and t.dim() == 3}, u.module)
        if param is None:   # a module LoRA (bare parameter names may match it), a 2-D weight, or a module the
            if not (u.params and u.as_stored):   # model lacks (ignored; a layer the subspace needs is named)
                out[u.module] = replace(u, params=())
            continue
        m, n = u.B.shape[0], u.A.shape[1]
        groups = [(g, c) for g, (c, _) in subspace.experts.items() if g.rpartition(".")[2] == param]
        fits = sorted({c for g, c in groups if u.A.shape[0] % c == 0
                       and (subspace.B[f"{g}[0]"].P.shape[0], subspace.A[f"{g}[0]"].P.shape[0]) == (m, n)})
        if groups and len(fits) != 1:
            raise ValueError(f"{name}: layer {u.module}: its LoRA on {param} (lora_B {tuple(u.B.shape)}, lora_A "
                             f"{tuple(u.A.shape)}) does not fit the subspace's experts of {param} "
                             f"({', '.join(sorted({g for g, _ in groups}))[:200]}): an adapter of another model?")
        if not groups:
            continue
        out.update((f"{core}.{param}[{v.expert}]", v) for v in adapter.expert_updates(u, param, fits[0]))
    return out


def _trainable_names(model: torch.nn.Module, trainable: Sequence[str], targets) -> List[str]:
    """The parameters of ``model`` whose names contain one of the ``trainable`` patterns (a str is one
    pattern), checked before ``apply`` changes anything: the patterns must select a parameter (one of
    them may miss), and none may lie in a layer the subspace adapts (``targets``), directly or through
    the module peft would save whole for it (see ``_modules_to_save``): peft's adapter could not
    restore such a weight on export."""
    patterns = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    names = [n for n, _ in model.named_parameters()]
    hits: Dict[str, None] = {}
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"trainable: each pattern must be a non-empty str (part of a parameter name), got "
                             f"{pattern!r}")
        hits.update(dict.fromkeys(n for n in names if pattern in n))
    if patterns and not hits:  # one pattern may miss (("classifier", "score") serves several architectures)
        raise ValueError(f"trainable patterns {list(patterns)} match no parameter of the model (parts of names "
                         f"such as {names[-1]!r})" if names else "trainable: the model has no parameters")
    for name, module in _modules_to_save(list(hits)).items():
        inside = _adapted_near(module, targets)
        if inside:
            raise ValueError(f"trainable: {name} lies in or beside the adapted layer {inside} (its module "
                             f"{module} would be saved whole): the weights of the layers the subspace adapts stay "
                             "frozen, since peft's adapter could not restore them; narrow the pattern (e.g. "
                             "'classifier')")
    return list(hits)


def _map_modules(mods: Sequence[str], named, where: str, source: str = "") -> Dict[str, str]:
    """{mod: name in ``named``} under one prefix rewrite for all of ``mods`` (``P + rest`` -> ``Q + rest``,
    e.g. ``bert.`` -> ``""``): the rewrite the most modules' longest unique dotted suffix agrees on (ties:
    the shortest prefixes, ``io.prefix_rewrite``). Every module must map; a module matched only by a shorter
    suffix (layer 1 of a 2-layer subspace onto a 1-layer model's layer 0) is an error, not a silent match."""
    rewrite = prefix_rewrite(mods, named)
    src = f"{source}: " if source else ""
    if rewrite is None:
        raise ValueError(f"{src}layer {mods[0]}: no matching module in {where} (different architecture?)")
    P, Q = rewrite
    out = {}
    for m in mods:
        target = Q + m[len(P):] if m.startswith(P) else None
        if target not in named:
            rule = f" (the other layers map '{P}...' to '{Q}...')" if P or Q else ""
            raise ValueError(f"{src}layer {m}: no module {target or m} in {where}{rule}: a different "
                             "architecture, or a model with fewer layers?")
        out[m] = target
    return out
