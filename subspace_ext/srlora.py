"""SRLoRA: importance-based fusion and re-initialisation of LoRA pairs during training.

(Yang, Wang, Hossain 2025, arXiv 2505.12433.) On a peft LoRA model of rank r, with each target
weight W0 = U Σ Vᵀ (one rsvd per weight, computed once and cached):

* init (``pissa_init=True``): PiSSA — A = diag(√(σ/s)) V_rᵀ, B = U_r diag(√(σ/s)), W0 −= s B A, so the
  model's function is unchanged and the pairs start on the top r principal directions (an adapter peft
  already initialised from W0, e.g. ``init_lora_weights="pissa"``, keeps its init);
* every step: AdaLoRA's importance of every pair (sensitivity |θ·∇θ| smoothed by EMA, times its
  uncertainty), for all layers in one ``ops.pair_importance`` call;
* every ``interval`` steps after ``warmup`` (until ``stop`` × total steps): in each layer the
  ``fuse_fraction`` lowest-scoring pairs (outside their grace period) are fused into W0 and
  re-initialised along the next unused principal directions j of the original W0
  (b = √(σ_j/s) u_j, a = √(σ_j/s) v_jᵀ) with W0 −= s b a, all layers in one ``ops.reinit_pairs_``
  call, so the function does not jump; their optimizer moments and importance states are zeroed.

Use it with any torch optimizer (call ``.step()`` after ``optimizer.step()``, before the gradients are
cleared) or with transformers' Trainer through ``SRLoRACallback``. After training, the peft adapter
(``model.save_pretrained``) holds the LoRA factors and the *modified* base weights hold the fused
pairs: save both (``model.save_pretrained(d)`` and ``sr.save(d)``; to use them, load the adapter with
``PeftModel.from_pretrained(base, d)`` and then ``load_base_weights(peft_model, d)``), or merge
(``model.merge_and_unload()``) and save the merged model. ``sr.save`` also holds what a resumed run
needs (``SRLoRA(..., resume_from=d)``; the Trainer callback saves it into every checkpoint).

LoRA on a MoE block's 3-D expert parameters (peft's ``target_parameters``, its ParamWrapper) is recomposed
expert by expert: each expert's rank-r pairs (lora_A's rows e·r + k, lora_B's columns k·E + e) are a layer of
their own, with the principal directions of that expert's slice of the parameter, into which they are fused.

The base weights are shared by every adapter of the model: after PiSSA and each fusion, other adapters
and ``disable_adapter()`` no longer see the original base (SRLoRA warns when the model holds several).
PiSSA moves the top principal part of W0 behind the LoRA branch, so with ``lora_dropout > 0`` the
function is unchanged only in eval mode.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import _warn, ops
from .io import SRLORA_STATE as STATE_FILE
from .io import (FormatError, base_modifying_init, check_digest, fingerprint, linear_layout, make_folder,
                 parameter_names, quantized, read_safetensors, refuse_distributed, safetensors_metadata,
                 save_with_digest, tied_elsewhere, unwrap_model)

STATE_FORMAT = "subspace_ext.srlora.state"
_CACHE_CHUNK = 8   # weights per rsvd_many call when the cache of directions is computed on an accelerator
_DEFAULT_DIRECTIONS_CAP = 32   # the schedule-sized default cache holds at most this many r directions a layer
_RECORD_CAP = 0.5   # a layer's record is kept while it holds at most this fraction of its weight's bytes


_FLAGS = ("pissa_init", "reset_optimizer", "verbose")   # SRLoRAConfig's bool fields


@dataclass
class SRLoRAConfig:
    interval: int = 100          # steps between recompositions
    warmup: int = 100            # steps before the first recomposition
    fuse_fraction: float = 0.25  # fraction of each layer's r pairs fused per recomposition (0 disables)
    beta1: float = 0.85          # EMA of the sensitivity (AdaLoRA)
    beta2: float = 0.85          # EMA of the uncertainty (AdaLoRA)
    stop: float = 0.9            # no recomposition after this fraction of total_steps
    total_steps: Optional[int] = None  # needed for `stop` (the callback fills it from the Trainer)
    pissa_init: bool = True      # start from PiSSA (the paper's setting)
    directions: Optional[int] = None   # principal directions cached per layer beyond its r (default: as many
    #                                    as the schedule's recompositions use, 4 r to 32 r; 4 r without total_steps)
    grace: Optional[int] = None  # steps after its re-initialisation during which a pair cannot be fused
    #                              (default: interval, i.e. it sits out the next recomposition)
    reset_optimizer: bool = True  # zero the optimizer moments of re-initialised pairs
    seed: int = 0                # rsvd seed
    verbose: bool = False        # print one line per recomposition

    def validate(self) -> None:
        def whole(name, low, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 2**62:
                raise ValueError(f"{name} must be an int >= {low} (and < 2^62){' or None' if optional else ''}, "
                                 f"got {v!r}")
        whole("interval", 1)
        whole("warmup", 0)
        whole("total_steps", 1, optional=True)
        whole("directions", 0, optional=True)
        whole("grace", 0, optional=True)
        whole("seed", 0)
        for name, ok, what in (("fuse_fraction", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
                               ("stop", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
                               ("beta1", lambda v: 0.0 < v < 1.0, "in (0, 1) (0 makes every score 0: the "
                                "uncertainty |I - EMA(I)| vanishes)"),
                               ("beta2", lambda v: 0.0 <= v < 1.0, "in [0, 1)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ValueError(f"{name} must be a number {what}, got {v!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class _Layer:
    """One LoRA layer SRLoRA recomposes: a Linear / Conv1D LoRA, or one expert of a LoRA on a MoE block's 3-D
    expert parameter (peft's ParamWrapper: lora_A (r·E x n) stacks the experts' A_e, lora_B (m x r·E) interleaves
    their columns, so expert e's pair k is lora_A's row e·r + k and lora_B's column k·E + e; its update s B_e A_e
    adds to the parameter's slice e, transposed where the slice is stored in x out)."""
    name: str
    module: torch.nn.Module  # the peft LoRA layer; its tensors are looked up on use, so model.to() and
    adapter: str             # .half() after SRLoRA was built are followed, not written to a stale copy
    scaling: float
    expert: int = -1         # MoE: which expert of the module's 3-D parameter (-1: a Linear / Conv1D LoRA)
    experts: int = 0         # MoE: how many experts the parameter holds
    U: torch.Tensor = None   # cached principal directions of the original W0 (m x K), S (K), V (n x K)
    S: torch.Tensor = None
    V: torch.Tensor = None
    next_dir: int = 0        # next unused direction
    protected_until: torch.Tensor = None  # per pair: the last step it may not be fused
    record: Optional["_Record"] = None    # what the run wrote into the weight (None: it is saved whole)

    @property
    def param(self) -> torch.nn.Parameter:
        """The base parameter the LoRA adds to: the base layer's weight, or the MoE block's expert tensor."""
        return getattr(self.module.get_base_layer(), _parameter_name(self.module))

    @property
    def weight(self) -> torch.Tensor:
        """The base tensor this layer's fusions write: the parameter, or its expert's slice (a view)."""
        return self.param if self.expert < 0 else self.param.data[self.expert]

    @property
    def W(self) -> torch.Tensor:
        """Its m x n view (a transpose for fan_in_fan_out layers and experts stored in x out)."""
        return _update_view(self.module, self.weight, self.expert >= 0)

    @property
    def A_param(self) -> torch.nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def B_param(self) -> torch.nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    @property
    def A(self) -> torch.Tensor:  # r x n: the layer's rows of lora_A (its data, written in place)
        return self.rows(self.A_param.data)

    @property
    def B(self) -> torch.Tensor:  # m x r: the layer's columns of lora_B
        return self.cols(self.B_param.data)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The layer's rows of a tensor shaped like lora_A (a view)."""
        if self.expert < 0:
            return t
        r = t.shape[0] // self.experts
        return t[self.expert * r:(self.expert + 1) * r]

    def cols(self, t: torch.Tensor) -> torch.Tensor:
        """The layer's columns of a tensor shaped like lora_B (a view)."""
        return t if self.expert < 0 else t[:, self.expert::self.experts]

    def directions(self, dirs: torch.Tensor) -> tuple:
        """(b m x k, a k x n) = (√(σ_j/s) u_j, √(σ_j/s) v_jᵀ) for directions ``dirs``, on B's and A's device."""
        root = (self.S[dirs] / self.scaling).sqrt()
        B, A = self.B, self.A
        return ((self.U[:, dirs] * root).to(device=B.device, dtype=B.dtype),
                (self.V[:, dirs] * root).T.to(device=A.device, dtype=A.dtype))


# The roundings of a layer's pair a state prints besides its values: a model cast to them after the save (.half()
# for inference) holds the saved pair, rounded.
_PRINTED_ROUNDINGS = (torch.bfloat16, torch.float16)


def _pair_print(l: _Layer, rounding: Optional[torch.dtype] = None) -> str:
    """A print of the layer's LoRA pair by value (taken in float64: an adapter saved in bfloat16 and upcast by peft
    on load keeps it), rounded to ``rounding`` first, which a state records so that it is only used with the
    adapter saved beside it."""
    pair = torch.cat([l.A.detach().reshape(-1), l.B.detach().reshape(-1)])
    return fingerprint((pair if rounding is None else pair.to(rounding)).double())


def _pair_prints(l: _Layer) -> List[str]:
    """What a state records of a layer's pair: its print, then those of its ``_PRINTED_ROUNDINGS``."""
    return [_pair_print(l)] + [_pair_print(l, d) for d in _PRINTED_ROUNDINGS]


def _check_pairs(path: str, meta: Dict[str, str], layers: List[_Layer], remedy: str) -> None:
    """Refuse (ValueError) a model whose LoRA pairs are not the ones the state was saved with (``_pair_prints``;
    in a model cast to bfloat16 or float16 since, the saved ones so rounded): the base weights it holds are the
    run's at that save, and another adapter on them (an earlier or later checkpoint's, a fresh one) is another
    model. States written before the prints were saved are not checked."""
    if "pairs" not in meta:
        return
    try:
        prints = json.loads(meta["pairs"])
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: malformed SRLoRA state (pairs: {e})") from None
    width = 1 + len(_PRINTED_ROUNDINGS)
    if not (isinstance(prints, list) and len(prints) == len(layers) and all(
            isinstance(p, list) and len(p) == width and all(isinstance(x, str) for x in p) for p in prints)):
        raise FormatError(f"{path}: malformed SRLoRA state (pairs must hold {width} prints per layer)")

    def saved(l: _Layer, p: List[str]) -> bool:
        got = _pair_print(l)
        return got == p[0] or l.A.dtype in _PRINTED_ROUNDINGS and got == p[1 + _PRINTED_ROUNDINGS.index(l.A.dtype)]
    bad = [l.name for l, p in zip(layers, prints) if not saved(l, p)]
    if bad:
        more = f" and {len(bad) - 1} more layer(s)" if len(bad) > 1 else ""
        raise ValueError(f"{path}: the model's LoRA weights in {bad[0]}{more} are not the ones this state was saved "
                         "with: the state holds the base weights of the run at that save, which go with the adapter "
                         f"saved at the same time (save_pretrained(d) and sr.save(d)); {remedy}")


def _parameter_name(module) -> str:
    """The base layer's parameter a LoRA layer adapts: the one peft's ParamWrapper names (target_parameters), else
    the weight."""
    return getattr(module, "parameter_name", "weight")


def _update_view(module, weight: torch.Tensor, expert: bool = False) -> torch.Tensor:
    """The m x n view of a LoRA layer's base weight (or of an ``expert``'s slice of a MoE parameter) that its
    update B A adds to: a transpose for fan_in_fan_out layers, and for experts stored in x out (GPT-OSS's; peft
    swaps its in and out features where the experts are out x in)."""
    flip = not module._did_swap_in_out_features if expert else getattr(module, "fan_in_fan_out", False)
    return weight.data.T if flip else weight.data


@dataclass
class _Record:
    """What a run wrote into a layer's base weight since the original one (``w0``: its fingerprint, dtype and
    shape included): the ``reinit_pairs_`` calls that wrote it, each as the q pairs it fused (B_old m x q,
    A_old q x n), the pairs it put in their place (B_new, A_new) and its scaling, in host memory.

    ``_replay`` makes the same calls on the original weight, which gives the run's weight bit for bit: the op's
    arithmetic per entry is fixed (its pairs in order, no FMA contraction), the same on CPU and CUDA, and does
    not depend on the pairs' positions in B and A. A checkpoint then holds 2 q (m + n) numbers a call instead
    of the m n of the weight."""
    w0: str
    dtype: torch.dtype
    q: List[int] = field(default_factory=list)
    s: List[float] = field(default_factory=list)
    parts: List[tuple] = field(default_factory=list)   # (B_old, A_old, B_new, A_new), concatenated on save

    def add(self, scaling: float, B_old, A_old, B_new, A_new) -> None:
        self.q.append(B_old.shape[1])
        self.s.append(scaling)
        self.parts.append((B_old, A_old, B_new, A_new))

    def pop(self) -> None:
        """Take back the last ``add`` (its call did not run)."""
        self.q.pop()
        self.s.pop()
        self.parts.pop()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts for t in p)

    def tensors(self, k: int) -> Dict[str, torch.Tensor]:
        if not self.parts:
            return {}
        return {f"{name}.{k}": torch.cat([p[i] for p in self.parts], dim=1 if name[0] == "B" else 0).contiguous()
                for i, name in enumerate(_RECORD_TENSORS)}

    def meta(self) -> dict:
        return {"w0": self.w0, "q": self.q, "s": self.s}


_RECORD_TENSORS = ("B_old", "A_old", "B_new", "A_new")


def _replay(W: torch.Tensor, q: List[int], s: List[float], B_old, A_old, B_new, A_new) -> None:
    """Make a record's ``reinit_pairs_`` calls (``_Record``) on W, the layer's original base weight (m x n view)."""
    put = lambda t: t.to(W.device, copy=True)   # noqa: E731  (the op writes B_new, A_new into B, A)
    at = 0
    for qe, se in zip(q, s):
        cols = slice(at, at + qe)
        ops.reinit_pairs_(W, put(B_old[:, cols]), put(A_old[cols]), torch.arange(qe), B_new[:, cols].to(W.device),
                          A_new[cols].to(W.device), se)
        at += qe


@dataclass
class Event:
    step: int
    layers: int
    pairs: int
    exhausted: int
    score_mean: float
    score_min: float
    score_max: float
    detail: Dict[str, List[int]] = field(default_factory=dict)


def _base_modifying_init(model, layers: List[_Layer]) -> Optional[str]:
    """The adapter's peft ``init_lora_weights`` when it is one that rewrites the base weight when peft
    creates the adapter (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: W0 -= s B A), else None."""
    configs = getattr(model, "peft_config", {}) or {}
    inits = (base_modifying_init(getattr(configs.get(a), "init_lora_weights", True))
             for a in dict.fromkeys(l.adapter for l in layers))
    return next((i for i in inits if i), None)


def _optimizer_state(optimizer) -> dict:
    """The per-parameter state of ``optimizer``. ZeroRedundancyOptimizer keeps each rank's shard in its inner
    optimizer (its own ``state`` stays empty, so moments were never reset): every rank picks the same pairs and
    resets those of the parameters it holds. accelerate's wrapper is looked through (its ``state`` is its
    optimizer's)."""
    inner = getattr(optimizer, "optimizer", None)   # accelerate's AcceleratedOptimizer
    optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:   # a torch without distributed support
        return optimizer.state
    return optimizer.optim.state if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer.state


def lora_layers(model) -> List[_Layer]:
    """The trainable, active LoRA Linear layers of a peft model, and one layer per expert of each LoRA on a MoE
    block's 3-D expert parameter (peft's ``target_parameters``). Warns about LoRA layers SRLoRA leaves
    alone (frozen, embedding LoRA) and about a model holding several adapters (they share the base weights
    SRLoRA edits); refuses layers whose update is not W + s B A on a Linear / Conv1D weight (or an expert's
    slice) of its own (variants, a weight tied to another module, a merged adapter)."""
    from peft.tuners.lora import LoraLayer

    refuse_distributed(model, "SRLoRA", ddp=False)   # DDP is fine: SRLoRA adds no parameter
    model = unwrap_model(model)   # names as the plain peft model has them (torch.compile, DDP wrappers)
    names = parameter_names(model)
    out, frozen, embedding, several = [], [], [], False
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        several |= len(set(mod.lora_A) | set(getattr(mod, "lora_embedding_A", {}))) > 1
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        embedding += [name for a in mod.active_adapters if a in getattr(mod, "lora_embedding_A", {})]
        if len(active) > 1:
            raise ValueError(f"{name}: {len(active)} active adapters ({', '.join(active)}): SRLoRA trains one adapter "
                             "at a time (model.set_adapter(name))")
        for adapter in active:
            if getattr(mod, "use_dora", {}).get(adapter, False):
                raise ValueError(f"{name}: DoRA layers are not supported by SRLoRA")
            variant = getattr(mod, "lora_variant", {}).get(adapter)
            if variant is not None:  # KaSA, MiCA, aLoRA, ...: not the plain W + s B A that SRLoRA fuses into W
                raise ValueError(f"{name}: LoRA variant layers ({type(variant).__name__}) are not supported by "
                                 "SRLoRA, which fuses and re-initialises plain LoRA pairs")
            if not isinstance(mod.lora_A[adapter], torch.nn.Module):  # AdaLoRA's factors are bare Parameters
                raise ValueError(f"{name}: AdaLoRA layers ({type(mod).__name__}) are not supported by SRLoRA: it "
                                 "needs a LoRA model (AdaLoRA allocates ranks itself)")
            if not (mod.lora_A[adapter].weight.requires_grad and mod.lora_B[adapter].weight.requires_grad):
                frozen.append(name)
                continue
            base = mod.get_base_layer()
            pname = _parameter_name(mod)
            param = getattr(base, pname, None)
            experts = _experts(name, mod, adapter, param)
            if not experts and (mod.lora_A[adapter].weight.dim() != 2 or linear_layout(base) is None):
                raise ValueError(f"{name}: LoRA on a {type(base).__module__}.{type(base).__name__} is not supported by "
                                 "SRLoRA: only Linear (and transformers Conv1D) LoRA layers, whose weight it edits, "
                                 "and LoRA on a MoE block's 3-D expert parameters (peft's target_parameters)")
            quant = quantized(base, param)
            if quant:
                raise ValueError(f"{name}: the base layer is quantized ({quant}): SRLoRA's PiSSA init and fusions "
                                 "write the base weight in floating point, which a quantized (QLoRA) base cannot "
                                 "take; load the base model unquantized (bfloat16 or float32)")
            tied = tied_elsewhere(names, name, param)
            if tied:
                raise ValueError(f"{name}: its base weight is tied to {tied} (one shared parameter): SRLoRA's "
                                 "PiSSA init and fusions edit the base weight, which would change that module too; "
                                 "leave this layer out of target_modules (or untie the weights)")
            if adapter in mod.merged_adapters:
                raise ValueError(f"{name}: the adapter is merged into the base weight (merge_adapter()): SRLoRA "
                                 "edits the base weight and the factors, so it needs them apart; call "
                                 "model.unmerge_adapter() first")
            scaling = float(mod.scaling[adapter])
            out += [_Layer(f"{name}.{pname}[{e}]", mod, adapter, scaling, e, experts) for e in range(experts)] \
                if experts else [_Layer(name, mod, adapter, scaling)]
    if embedding:
        _warn.warn(f"SRLoRA leaves embedding LoRA layers as they are: {', '.join(embedding[:3])}"
                   f"{' ...' if len(embedding) > 3 else ''}", stacklevel=3)
    if frozen:
        _warn.warn(f"SRLoRA leaves frozen LoRA layers as they are: {', '.join(frozen[:3])}"
                   f"{' ...' if len(frozen) > 3 else ''}", stacklevel=3)
    if several:
        _warn.warn("the model holds several adapters: SRLoRA's PiSSA init and fusions change the base weights "
                   "they share, so the other adapters and disable_adapter() no longer see the original base",
                   stacklevel=3)
    if not out:
        what = " (only embedding LoRA layers, which SRLoRA does not handle)" if embedding and not frozen else \
            " (all frozen)" if frozen else ""
        raise ValueError(f"the model has no trainable active LoRA Linear layers{what} (expected a peft LoRA model)")
    return out


def _experts(name: str, mod, adapter: str, param) -> int:
    """How many experts a LoRA on a MoE block's 3-D expert parameter (peft's ParamWrapper) holds; 0 for any other
    LoRA layer. Its factors must be the ParamWrapper's: lora_A (r·E x n), lora_B (m x r·E)."""
    if not (isinstance(param, torch.Tensor) and param.dim() == 3 and hasattr(mod, "_did_swap_in_out_features")):
        return 0
    E = param.shape[0]
    A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    swapped = mod._did_swap_in_out_features
    m, n = (param.shape[1], param.shape[2]) if swapped else (param.shape[2], param.shape[1])
    if getattr(mod, "num_experts", E) != E or A.shape[0] % E or B.shape != (m, A.shape[0]) or A.shape[1] != n:
        raise ValueError(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not one rank-r pair per "
                         f"expert of the {tuple(param.shape)} expert parameter (peft's layout: r·E x n and m x r·E)")
    return E


def _groups(layers: List[_Layer]) -> List[List[int]]:
    """The layers' indices by LoRA parameter, in order: the experts of one MoE parameter together (``lora_layers``
    lists them in a run, 0 .. E-1), every other layer alone."""
    out: List[List[int]] = []
    for k, l in enumerate(layers):
        if l.expert > 0 and layers[k - 1].module is l.module:
            out[-1].append(k)
        else:
            out.append([k])
    return out


def _group_pairs(l: _Layer, grad_A: torch.Tensor, grad_B: torch.Tensor) -> tuple:
    """(A, B, grad of A, grad of B) of the LoRA parameter of layer ``l`` (a group's first) for ``pair_importance``:
    the layer's own, or for a MoE parameter its lora_A and lora_B whole, B's columns expert-major (expert e's pair k
    at e·r + k: peft interleaves them at k·E + e)."""
    if l.expert < 0:
        return l.A, l.B, grad_A, grad_B

    def expert_major(t):   # m x r·E, column k·E + e -> e·r + k (a copy: B is the size of the LoRA factors)
        return t.unflatten(1, (-1, l.experts)).transpose(1, 2).flatten(1)
    return l.A_param.data, expert_major(l.B_param.data), grad_A, expert_major(grad_B)


class SRLoRA:
    """Importance-based recomposition of a peft LoRA model's pairs; call ``step()`` after each
    ``optimizer.step()`` (while the gradients are still there).

    ``resume_from``: a folder written by ``save`` (the Trainer callback writes one into each checkpoint):
    continue that run instead of starting one. The model must hold the *original* base weights (a model
    loaded afresh, with the run's adapter weights and optimizer state restored, as the Trainer does on
    resume): the principal directions are recomputed from them (checked against the saved singular
    values), then the run's modified base weights, importance states, used directions and step count are
    restored. No PiSSA init on resume. ``config=None`` on resume continues with the run's saved config; a
    given one may change the schedule (interval, total_steps, ...) but must keep ``directions`` and ``seed``,
    which define the cache of directions. The state records the adapter it trained and its weights at the save:
    resume on that one, loaded before this call (``check_adapter=False``: the weights are not compared).
    The model may be wrapped (torch.compile, DataParallel/DDP): layers are named as in the plain model."""

    def __init__(self, model, optimizer: Optional[torch.optim.Optimizer], config: Optional[SRLoRAConfig] = None,
                 *, resume_from: Optional[str] = None, check_adapter: bool = True):
        if optimizer is not None and not (hasattr(optimizer, "state") and hasattr(optimizer, "param_groups")):
            raise TypeError(f"optimizer must be a torch optimizer (or None), got {type(optimizer).__name__}"
                            + (": pass the config as the third argument (config=...)"
                               if isinstance(optimizer, SRLoRAConfig) else ""))
        if config is not None and not isinstance(config, SRLoRAConfig):
            raise TypeError(f"config must be an SRLoRAConfig (or None), got {type(config).__name__}"
                            + (": SRLoRAConfig(**d)" if isinstance(config, dict) else ""))
        if config is not None:
            config.validate()
        self.model = model
        self.optimizer = optimizer
        self.layers = lora_layers(model)
        self.step_count = 0
        self.log: List[Event] = []
        self._warned = set()
        self._spent = False   # every layer out of directions, and a recomposition logged it: nothing left to do
        saved = _read_state(resume_from, self.layers, check_adapter) if resume_from is not None else None
        self.config = _resume_config(config, saved[1]["config"], resume_from) if saved is not None else \
            config or SRLoRAConfig()
        c = self.config
        self._pissa = c.pissa_init and saved is None
        peft_init = _base_modifying_init(unwrap_model(model), self.layers)
        if self._pissa and peft_init:
            self._pissa = False
            _warn.warn(f"peft initialised the adapter with init_lora_weights={peft_init!r}, which moves a part of "
                       "each base weight into the pairs as peft creates it: SRLoRA keeps that init rather than "
                       "apply PiSSA on top (pass pissa_init=False to silence this) and re-initialises pairs along "
                       "the principal directions of the remaining base weight", stacklevel=2)
        if saved is None and (self._pissa or c.fuse_fraction > 0):
            for l in self.layers:
                drops = getattr(l.module, "lora_dropout", {})
                drop = drops[l.adapter] if l.adapter in drops else None
                if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                    what = "PiSSA init" if self._pissa else "re-initialisation"
                    _warn.warn(f"{l.name}: lora_dropout {drop.p} with {what}: principal parts of the base weight "
                               "move behind the LoRA branch, hence through dropout, so in train mode the function "
                               "changes (eval mode: unchanged); use lora_dropout=0", stacklevel=2)
                    break
        if c.total_steps is None and c.stop < 1.0 and c.fuse_fraction > 0:
            _warn.warn(f"SRLoRAConfig.total_steps is not set, so stop={c.stop} cannot apply: recompositions go on "
                       "to the last step (set total_steps, or stop=1.0 to silence this; the Trainer callback "
                       "sets it)", stacklevel=2)
        if saved is None:
            self.config = c = _size_directions(c, self.layers, self._pissa)
        half = [l for l in self.layers if l.W.dtype in (torch.bfloat16, torch.float16)]
        if half and (self._pissa or c.fuse_fraction > 0):
            dt = str(half[0].W.dtype).replace("torch.", "")
            what = "PiSSA and every recomposition write" if self._pissa else "every recomposition writes"
            _warn.warn(f"SRLoRA: {len(half)} base weights are {dt} ({half[0].name} ...): {what} "
                       f"the whole weight back in {dt}, which moves the function by its "
                       "rounding (~1e-3 of W, logits ~1% in a bfloat16 MiniLM) and loses much of a small fused "
                       "pair (|ΔW| 1e-4 among weights ~0.06: 16% lost in bfloat16); for exact fusions load the "
                       "model in float32 and train under torch.autocast", stacklevel=2)
        if saved is None:   # peft's base-modifying inits changed the weights already: those are saved whole
            for l in self.layers:
                l.record = None if peft_init else _Record(fingerprint(l.weight), l.weight.dtype)
        self._directions()
        if saved is not None:
            self._restore(saved, resume_from)
        elif self._pissa:
            self._pissa_init()
        if saved is None:
            self._set_state(ops.importance_state([l.A for l in self.layers], [l.B for l in self.layers]))

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def _directions(self) -> None:
        """Cache each layer's principal directions of W0: r + ``directions`` of them (capped by the weight's
        shape, per layer: one narrow layer must not limit the others), one rsvd_many per distinct count."""
        c = self.config
        want = {}
        for i, l in enumerate(self.layers):
            r = l.A.shape[0]
            extra = c.directions if c.directions is not None else 4 * r
            want.setdefault(min(r + extra, *l.W.shape), []).append(i)
        short = [l.name for l in self.layers if min(l.W.shape) <= l.A.shape[0]]
        if short:
            _warn.warn(f"SRLoRA: no principal directions beyond the LoRA rank in {', '.join(short[:3])}"
                       f"{' ...' if len(short) > 3 else ''} (a weight dimension <= r): these layers are never "
                       "recomposed", stacklevel=3)
        # The cache lives in host memory: (m + n) k float32 numbers a layer (a 7B model's schedule-sized cache
        # is GiBs), of which a recomposition moves the few it uses to the weight's device; computed a few
        # layers at a time so that the device holds little of it at once.
        size = {k: _CACHE_CHUNK if any(self.layers[i].W.device.type != "cpu" for i in members) else len(members)
                for k, members in want.items()}   # the CPU: one call, every thread busy
        chunks = [(k, members[j:j + size[k]]) for k, members in want.items() for j in range(0, len(members), size[k])]
        for k, members in chunks:
            # bf16/fp16 weights go in as they are (rsvd_many computes each in float32, one at a time)
            mats = [self.layers[i].W.detach() for i in members]
            mats = [w.float() if w.dtype == torch.float64 else w for w in mats]
            for i, (U, S, V) in zip(members, ops.rsvd_many(mats, k, oversample=16, niter=4, seed=c.seed)):
                l = self.layers[i]
                l.U, l.S, l.V = U.cpu(), S.cpu(), V.cpu()
                r = l.A.shape[0]
                l.next_dir = min(r, k) if self._pissa else 0
                l.protected_until = torch.full((r,), -1, dtype=torch.long)

    @torch.no_grad()
    def _pissa_init(self) -> None:
        """A, B on the top r principal directions (scaled by √(σ/s)); W0 −= s B A (one pass per W0)."""
        idx, B_new, A_new = [], [], []
        for l in self.layers:
            k = min(l.A.shape[0], l.S.numel())
            # existing pairs are fused (B A is zero for a fresh LoRA, so this is exact either way)
            idx.append(torch.arange(k))  # on the host: the kernel validates it without a copy back
            b, a = l.directions(torch.arange(k, device=l.S.device))
            B_new.append(b)
            A_new.append(a)
            self._remember(l, idx[-1], b, a)
        ops.reinit_pairs_([l.W for l in self.layers], [l.B for l in self.layers],
                          [l.A for l in self.layers], idx, B_new, A_new, [l.scaling for l in self.layers])
        self._cap_records()

    def _remember(self, l: _Layer, pick: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
        """Add the coming ``reinit_pairs_`` call on layer ``l`` (its pairs ``pick`` replaced by b, a) to the layer's
        record, before the call (Ctrl-C lands when the op returns)."""
        if l.record is not None:
            l.record.add(l.scaling, l.B[:, pick].cpu(), l.A[pick].cpu(), b.cpu(), a.cpu())

    def _cap_records(self) -> None:
        """Stop recording a layer whose record outgrew ``_RECORD_CAP`` of its weight's bytes (it is saved whole)."""
        for l in self.layers:
            if l.record is not None and l.record.nbytes > _RECORD_CAP * l.weight.numel() * l.weight.element_size():
                l.record = None

    # -- per step ------------------------------------------------------------------------------
    def _set_state(self, state: tuple) -> None:
        """Hold the importance states ``(ipt_A, ipt_B, unc_A, unc_B)``, lists of the layers' tensors, as one tensor
        each per LoRA parameter (``_groups``), the layers' states views of it (``self.state``): the experts of a
        MoE parameter are one layer of the per-step ``pair_importance`` call (its A-side rows and B-side columns
        expert-major: expert e's pair k at e·r + k), so that its cost does not grow with the expert count."""
        self._groups = _groups(self.layers)
        self._group_state = []
        views = tuple([None] * len(self.layers) for _ in state)
        for g in self._groups:
            tensors = []
            for i, (lists, out) in enumerate(zip(state, views)):
                cols = i % 2   # ipt_B, unc_B: m x r, their pairs in columns
                t = torch.cat([lists[k] for k in g], dim=cols) if len(g) > 1 else lists[g[0]]
                tensors.append(t)
                at = 0
                for k in g:
                    r = lists[k].shape[cols]
                    out[k] = t if len(g) == 1 else t[:, at:at + r] if cols else t[at:at + r]
                    at += r
            self._group_state.append(tensors)
        self.state = views

    def _state_on_device(self) -> None:
        """Follow a model moved after SRLoRA was built (the states live with the layers' tensors)."""
        if any(st[0].device != self.layers[g[0]].A_param.device for g, st in zip(self._groups, self._group_state)):
            devices = [l.A_param.device for l in self.layers]
            self._set_state(tuple([st[k].to(dev) for k, dev in enumerate(devices)] for st in self.state))

    @torch.no_grad()
    def update_importance(self) -> List[Optional[torch.Tensor]]:
        """One batched AdaLoRA importance update from the current gradients; returns the scores (None for a
        layer without a gradient this step, e.g. one the loss does not reach: its state is kept)."""
        grads = [(self.layers[g[0]].A_param.grad, self.layers[g[0]].B_param.grad) for g in self._groups]
        have = [a is not None and b is not None for a, b in grads]
        if not any(have):
            raise RuntimeError("no LoRA layer has a gradient; call SRLoRA.step() after optimizer.step() and "
                               "before the gradients are cleared")
        missing = [self.layers[k].name for g, h in zip(self._groups, have) if not h for k in g]
        if missing:
            self._warn_once("nograd", f"SRLoRA: no gradient reached {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} (not used by the loss?): their importance is not "
                            "updated", stacklevel=4)
        self._state_on_device()
        groups = [(g, st, gr) for g, st, gr, h in zip(self._groups, self._group_state, grads, have) if h]
        args = [_group_pairs(self.layers[g[0]], *gr) for g, _, gr in groups]
        got = ops.pair_importance(*([a[i] for a in args] for i in range(4)),
                                  *([st[i] for _, st, _ in groups] for i in range(4)),
                                  beta1=self.config.beta1, beta2=self.config.beta2)
        scores: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        for (g, _, _), sc in zip(groups, got):
            for k, part in zip(g, sc.chunk(len(g))):
                scores[k] = part
        return scores

    def step(self, optimizer_stepped: bool = True) -> Optional[Event]:
        """Update importance; recompose when due. Returns the recomposition event, if any.

        ``optimizer_stepped=False``: the optimizer skipped this step (a GradScaler found Inf/NaN gradients;
        the Trainer callback passes it on): the step counts, its gradients are not scored. With a GradScaler
        call this after ``scaler.step(optimizer)``, which unscales the gradients. Call it once per optimizer step:
        a micro-step of accelerate's gradient accumulation (its optimizer did not step; under DDP its gradients
        are this rank's own, and scoring them made the ranks fuse different pairs) is no step and returns None."""
        c = self.config
        state = getattr(self.optimizer, "gradient_state", None)   # accelerate's AcceleratedOptimizer
        if state is not None and not getattr(state, "sync_gradients", True):
            return None
        if c.fuse_fraction == 0.0 or self._spent:   # spent: no scores (the log grew by an empty event a step)
            self.step_count += 1
            return None
        scores = self.update_importance() if optimizer_stepped else None
        self.step_count += 1
        t = self.step_count
        if scores is None or t < c.warmup or (t - c.warmup) % c.interval != 0:
            return None
        if c.total_steps is not None and t > c.stop * c.total_steps:
            return None
        return self.recompose(scores)

    def _refuse_merged(self, doing: str) -> None:
        merged = [l.name for l in self.layers if l.adapter in l.module.merged_adapters]
        if merged:
            raise RuntimeError(f"{merged[0]}: the adapter is merged into the base weight (merge_adapter()), so "
                               f"{doing} would count its update twice; call model.unmerge_adapter() first")

    @torch.no_grad()
    def recompose(self, scores: List[Optional[torch.Tensor]]) -> Event:
        c = self.config
        t = self.step_count
        grace = c.grace if c.grace is not None else c.interval
        self._refuse_merged("a recomposition")
        hosts: List[Optional[torch.Tensor]] = []   # small; one copy per LoRA parameter (its experts' are parts of it)
        for g in self._groups:
            part = [scores[k] for k in g]
            hosts += [p.float().cpu() if p is not None else None for p in part] if any(p is None for p in part) \
                else torch.cat(part).float().cpu().split([p.numel() for p in part])
        if all(h is None or not bool(h.any()) for h in hosts):
            self._warn_once("zeroscores", f"SRLoRA step {t}: every importance score is 0, so the gradients it saw "
                            "were all zero (gradients zeroed before SRLoRA.step()? call it after optimizer.step() and "
                            "before zero_grad()): no pair fused, the choice would be arbitrary", stacklevel=4)
            ev = Event(t, 0, 0, 0, 0.0, 0.0, 0.0)
            self.log.append(ev)
            return ev
        W, Bs, As, idx, B_new, A_new, scal, names = [], [], [], [], [], [], [], []
        chosen_scores, exhausted, ran_out, poisoned, idle, moved = [], 0, 0, [], [], []
        for k, (l, s_host) in enumerate(zip(self.layers, hosts)):
            if s_host is None:
                continue
            if not bool(torch.isfinite(s_host).all()):
                poisoned.append(l.name)  # e.g. an fp16 overflow step scored: restart its non-finite states
                for st in self.state:
                    st[k].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                continue
            if not bool(s_host.any()):   # no gradient has reached its pairs yet (an expert no token was routed to):
                idle.append(l.name)      # which pairs to fuse would be an arbitrary choice
                continue
            r = l.A.shape[0]
            n = max(1, int(round(c.fuse_fraction * r)))
            eligible = torch.nonzero(l.protected_until < t).flatten()
            n = min(n, eligible.numel(), l.S.numel() - l.next_dir)
            if n <= 0:
                out = l.S.numel() - l.next_dir <= 0
                exhausted += int(out)
                ran_out += int(out and min(l.W.shape) > r)   # not a narrow layer (warned about at the start)
                continue
            order = torch.argsort(s_host[eligible], stable=True)[:n]
            pick = eligible[order].sort().values
            b, a = l.directions(torch.arange(l.next_dir, l.next_dir + n, device=l.S.device))
            W.append(l.W)
            Bs.append(l.B)
            As.append(l.A)
            idx.append(pick)  # host indices: no device-to-host copy inside the op
            B_new.append(b)
            A_new.append(a)
            scal.append(l.scaling)
            names.append(l.name)
            chosen_scores.append(s_host[pick])
            moved.append((l, l.next_dir, l.protected_until.clone()))
            l.next_dir += n
            l.protected_until[pick] = t + grace
            self._remember(l, pick, b, a)
            self._reset_pairs(k, pick.to(l.A.device))
        if ran_out:
            self._warn_once("exhausted", f"SRLoRA step {t}: {ran_out} layer(s) used every cached principal direction "
                            "and are no longer recomposed (as designed); for more recompositions cache more with "
                            "SRLoRAConfig(directions=...) (default: what total_steps' schedule uses, 4 r to "
                            "32 r; 4 r without it)", stacklevel=4)
        if idle:
            self._warn_once("idle", f"SRLoRA step {t}: {len(idle)} layer(s) have importance 0 ({idle[0]} ...): no "
                            "gradient has reached their pairs (MoE experts no token was routed to?), so they are not "
                            "recomposed until one does (warned once)", stacklevel=4)
        if poisoned:   # once: a run scoring Inf every time warned every time
            self._warn_once("poisoned", f"SRLoRA step {t}: non-finite importance in {len(poisoned)} layers "
                            f"({poisoned[0]} ...), from Inf/NaN gradients (an fp16 overflow step? pass "
                            "step(optimizer_stepped=False) when the optimizer skipped): their states were restarted, "
                            "no pair fused there this time (warned once; later such steps restart them too)",
                            stacklevel=4)
        try:   # the bookkeeping comes first: Ctrl-C lands when the op returns, and must find it done
            if W:
                ops.reinit_pairs_(W, Bs, As, idx, B_new, A_new, scal)
        except BaseException:   # refused (a float16 B_new overflowing), or interrupted between two devices' calls:
            # a layer the op did not reach (it writes B_new into B[:, idx]) keeps its directions and record
            for (l, next_dir, protected), i, b in zip(moved, idx, B_new):
                if not torch.equal(l.B[:, i.to(l.B.device)], b):
                    l.next_dir, l.protected_until = next_dir, protected
                    if l.record is not None:
                        l.record.pop()
            raise
        self._cap_records()
        allc = torch.cat(chosen_scores) if chosen_scores else torch.zeros(1)
        ev = Event(t, len(W), sum(i.numel() for i in idx), exhausted, float(allc.mean()), float(allc.min()),
                   float(allc.max()), {n: i.tolist() for n, i in zip(names, idx)})
        self.log.append(ev)
        self._spent = not W and all(l.next_dir >= l.S.numel() for l in self.layers)   # this event says so
        if c.verbose:
            print(f"[srlora] step {t}: fused+reinit {ev.pairs} pairs in {ev.layers} layers "
                  f"(score mean {ev.score_mean:.3g}, min {ev.score_min:.3g}, max {ev.score_max:.3g}); "
                  f"{exhausted} layers out of directions")
        return ev

    def _reset_pairs(self, k: int, pick: torch.Tensor) -> None:
        """Zero the importance states and optimizer moments of pairs ``pick`` of layer ``k``."""
        l = self.layers[k]
        ipt_A, ipt_B, unc_A, unc_B = (s[k] for s in self.state)
        for st in (ipt_A, unc_A):
            st[pick] = 0
        for st in (ipt_B, unc_B):
            st[:, pick] = 0
        if not (self.config.reset_optimizer and self.optimizer is not None):
            return
        for p, rows in ((l.A_param, True), (l.B_param, False)):
            for name, v in _optimizer_state(self.optimizer).get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point():
                    if rows:   # the layer's rows / columns of the moment (a view: an expert's, written through)
                        l.rows(v)[pick] = 0
                    else:
                        l.cols(v)[:, pick] = 0
                elif isinstance(v, torch.Tensor) and v.numel() > 1:
                    why = (f"is {str(v.dtype).replace('torch.', '')} (a quantized optimizer? its code 0 need not be "
                           "the value 0)" if v.shape == p.shape else f"has shape {tuple(v.shape)}, not the "
                           f"parameter's {tuple(p.shape)} (a factored optimizer?)")
                    self._warn_once(("optstate", name), f"SRLoRA: optimizer state {name!r} {why}: not reset for "
                                    "re-initialised pairs", stacklevel=5)

    def _warn_once(self, key, message: str, stacklevel: int) -> None:
        """``_warn.warn(message)`` the first time ``key`` comes up in this run (a long run repeats the causes
        every step); ``stacklevel`` counted from the caller."""
        if key not in self._warned:
            self._warned.add(key)
            _warn.warn(message, stacklevel=stacklevel + 1)

    # -- results, saving and resuming -----------------------------------------------------------
    def base_state_dict(self) -> Dict[str, torch.Tensor]:
        """The modified base weights (name -> tensor; a MoE block's expert parameter whole), keyed as in the peft
        model's state dict (load them into a PeftModel, not into the bare base model; ``load_base_weights``
        checks every name)."""
        self._refuse_merged("saving the base weights")
        names = {id(p): n for n, p in unwrap_model(self.model).named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in {id(l.param): l.param for l in self.layers}.values()}

    def save(self, folder: str, base: str = "record") -> str:
        """Write ``folder/srlora_state.safetensors``: what the peft adapter alone lacks, the run's changes to the
        base weights, and the run's state (importance EMAs, used directions, grace, step count, log) for
        ``SRLoRA(..., resume_from=folder)`` and ``load_base_weights``. Safetensors + JSON; returns the file's path.

        ``base="record"`` (default): a layer's changes as the record of the pairs the run fused and put in their
        place (PiSSA's and each recomposition's, 2 q (m + n) numbers a call), which resume and
        ``load_base_weights`` replay on the *original* base weight, bit for bit, after checking its fingerprint;
        a layer whose record outgrew half its weight's bytes, or whose base peft had changed before the run
        (PiSSA-style inits), is saved whole. ``base="whole"``: every modified weight whole (m n numbers a layer),
        which loads onto any weights of those shapes (the Trainer callback saves so with
        ``load_best_model_at_end``, whose best checkpoint is loaded onto the trained model)."""
        if base not in ("record", "whole"):
            raise ValueError(f"base must be 'record' or 'whole', got {base!r}")
        self._refuse_merged("saving the base weights")
        t, journal = {}, []
        for k, l in enumerate(self.layers):
            if l.record is not None and l.weight.dtype != l.record.dtype:   # the model converted (.half()) since
                l.record = None
            rec = l.record if base == "record" else None
            # an expert's slice and its states are views of one tensor each: saved as tensors of their own
            own = (lambda x: x.detach().clone()) if l.expert >= 0 else (lambda x: x.detach().contiguous())  # noqa: E731
            t.update(rec.tensors(k) if rec is not None else {f"base.{k}": own(l.weight)})
            journal.append(rec.meta() if rec is not None else None)
            t[f"S.{k}"] = l.S.detach().float().contiguous()
            t[f"protected.{k}"] = l.protected_until.contiguous()
            for name, st in zip(("ipt_A", "ipt_B", "unc_A", "unc_B"), self.state):
                t[f"{name}.{k}"] = own(st[k])
        meta = {"format": STATE_FORMAT, "format_version": "2", "step_count": str(self.step_count),
                "journal": json.dumps(journal),
                "layers": json.dumps([l.name for l in self.layers]),
                "adapters": json.dumps([l.adapter for l in self.layers]),
                "pairs": json.dumps([_pair_prints(l) for l in self.layers]),
                "next_dir": json.dumps([l.next_dir for l in self.layers]),
                "config": json.dumps(dataclasses.asdict(self.config)),
                "log": json.dumps([dataclasses.asdict(e) for e in self.log])}
        make_folder(folder, "SRLoRA.save")
        path = os.path.join(folder, STATE_FILE)
        save_with_digest(t, path, meta)   # verified by _state_file
        return path

    @torch.no_grad()
    def _restore(self, saved: tuple, folder: str) -> None:
        """Apply a state _read_state checked whole: only the base-weight test below can still refuse it,
        and it runs before anything is written."""
        t, meta = saved
        journal = meta["journal"]
        for k, l in enumerate(self.layers):
            if meta["next_dir"][k] > l.S.numel():
                raise FormatError(f"{folder}: layer {l.name}: the run used {meta['next_dir'][k]} principal "
                                  f"directions, but the model's weight has {l.S.numel()}")
            S0 = t[f"S.{k}"]
            n = min(S0.numel(), l.S.numel())
            S = l.S[:n].detach().float().cpu()
            if n == 0 or not torch.allclose(S, S0[:n], rtol=1e-3, atol=1e-6 * float(S0.max())):
                raise FormatError(f"{folder}: layer {l.name}: the model's base weight is not the run's original one "
                                  "(its singular values differ): resume on the base model loaded afresh, with the "
                                  "run's adapter weights")
            if journal[k] is not None:
                _check_original(folder, l.name, l.weight, journal[k]["w0"], FormatError)
        for k, l in enumerate(self.layers):
            if journal[k] is None:
                l.weight.data.copy_(t[f"base.{k}"])
                l.record = None   # a layer saved whole goes on whole
            else:
                parts = [t[f"{name}.{k}"] for name in _RECORD_TENSORS] if sum(journal[k]["q"]) else []
                _replay(l.W, journal[k]["q"], journal[k]["s"], *parts)
                l.record = _Record(journal[k]["w0"], l.weight.dtype, list(journal[k]["q"]), list(journal[k]["s"]),
                                   [tuple(parts)] if parts else [])
            l.next_dir = meta["next_dir"][k]
            l.protected_until = t[f"protected.{k}"].clone()
        dev = lambda k: self.layers[k].A_param.device  # noqa: E731
        self._set_state(tuple([t[f"{name}.{k}"].to(dev(k)) for k in range(len(self.layers))]
                              for name in ("ipt_A", "ipt_B", "unc_A", "unc_B")))
        self.step_count = meta["step_count"]
        self.log = meta["log"]

    def summary(self) -> str:
        pairs = sum(e.pairs for e in self.log)
        return (f"SRLoRA: {len(self.layers)} layers, {self.step_count} steps, {len(self.log)} recompositions, "
                f"{pairs} pairs fused and re-initialised")


def _state_file(folder: str) -> tuple:
    """(path, metadata, layer names, tensors) of the SRLoRA state in ``folder`` (or the file itself): its
    digest verified (states written before digests were saved have none), the layer names a list of module
    paths with each layer's base weight a finite floating-point tensor."""
    path = os.path.join(folder, STATE_FILE) if os.path.isdir(folder) else folder
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no SRLoRA state (written by SRLoRA.save, or by SRLoRACallback into each "
                                "checkpoint)")
    meta = safetensors_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise FormatError(f"{path}: not an SRLoRA state file (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in ("1", "2"):
        raise FormatError(f"{path}: SRLoRA state format_version {version!r}, which this subspace_ext does not read "
                          "(it reads 1 and 2): written by a newer one?")
    t = read_safetensors(path)
    meta = check_digest(path, t, meta)
    try:
        names = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: malformed SRLoRA state ({e})") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == len(names)):
        raise FormatError(f"{path}: malformed SRLoRA state (layers must be a list of distinct module names)")
    journal = _journal(path, meta, names, t) if version == "2" else [None] * len(names)
    for k, name in enumerate(names):
        if journal[k] is not None:
            continue
        base = t.get(f"base.{k}")
        if base is None or base.dim() != 2 or not base.is_floating_point():
            raise FormatError(f"{path}: layer {name}: base.{k} is "
                              f"{'missing' if base is None else f'{base.dtype} {tuple(base.shape)}'}, not a weight")
        if not bool(torch.isfinite(base).all()):
            raise FormatError(f"{path}: layer {name}: the saved base weight holds NaN or Inf")
    return path, meta, names, t, journal


def _journal(path: str, meta: Dict[str, str], names: List[str], t: Dict[str, torch.Tensor]) -> list:
    """The state's per-layer records (``SRLoRA.save(base="record")``; None where the weight is saved whole), each
    checked whole: its calls' pair counts and scalings, and its four tensors of one floating dtype, finite, with
    B_old, B_new m x Q and A_old, A_new Q x n for the Q pairs of its calls."""
    try:
        journal = json.loads(meta["journal"])
    except (KeyError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: malformed SRLoRA state (journal: {type(e).__name__}: {e})") from None
    if not (isinstance(journal, list) and len(journal) == len(names)):
        raise FormatError(f"{path}: malformed SRLoRA state (journal must hold one entry per layer)")
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool)   # noqa: E731
    for k, (name, e) in enumerate(zip(names, journal)):
        if e is None:
            continue
        if not (isinstance(e, dict) and set(e) == {"w0", "q", "s"} and isinstance(e["w0"], str)
                and isinstance(e["q"], list) and isinstance(e["s"], list) and len(e["q"]) == len(e["s"])
                and all(whole(q) and q >= 1 for q in e["q"])
                and all((whole(x) or isinstance(x, float)) and math.isfinite(x) for x in e["s"])):
            raise FormatError(f"{path}: layer {name}: malformed record {json.dumps(e)[:80]}")
        Q = sum(e["q"])
        got = [t.get(f"{n}.{k}") for n in _RECORD_TENSORS]
        if Q == 0:
            if any(g is not None for g in got):
                raise FormatError(f"{path}: layer {name}: its record holds no call but has pair tensors")
            continue
        if any(g is None or g.dim() != 2 or not g.is_floating_point() or g.dtype != got[0].dtype for g in got):
            raise FormatError(f"{path}: layer {name}: record tensors "
                              + ", ".join(f"{n}.{k} {'missing' if g is None else f'{g.dtype} {tuple(g.shape)}'}"
                                          for n, g in zip(_RECORD_TENSORS, got))
                              + ": not four 2-D tensors of one floating-point dtype")
        B_old, A_old, B_new, A_new = got
        m, n = B_old.shape[0], A_old.shape[1]
        if not (B_old.shape == B_new.shape == (m, Q) and A_old.shape == A_new.shape == (Q, n)):
            raise FormatError(f"{path}: layer {name}: record tensors of shapes {[tuple(g.shape) for g in got]} for "
                              f"{Q} pairs (B_old, B_new m x {Q}; A_old, A_new {Q} x n)")
        if not all(bool(torch.isfinite(g).all()) for g in got):
            raise FormatError(f"{path}: layer {name}: its record holds NaN or Inf")
    return journal


def _check_original(path: str, name: str, weight: torch.Tensor, w0: str, error: type) -> None:
    """Refuse (``error``) a base weight that is not the original one a record is replayed on."""
    got = fingerprint(weight)
    if got != w0:
        raise error(f"{path}: layer {name}: the model's base weight is not the run's original one (fingerprint {got} "
                    f"!= {w0}; dtype {str(weight.dtype).replace('torch.', '')}): the state records the run's changes "
                    "to it, replayed on the base model loaded afresh in the run's dtype (a state saved with "
                    "base='whole' holds the weights themselves)")


def _read_state(folder: str, layers: List[_Layer], check_adapter: bool = True) -> tuple:
    """(tensors, parsed metadata: step_count, next_dir, log) of ``folder/srlora_state.safetensors``,
    checked whole against the model's layers before a resume changes anything: every tensor there with
    its shape and kind, the metadata well-formed, the model's LoRA pairs the saved ones (``check_adapter``).
    A damaged file raises FormatError naming it."""
    path, meta, names, t, journal = _state_file(folder)
    if names != [l.name for l in layers]:
        raise FormatError(f"{path}: saved for the LoRA layers {names[:2]}... ({len(names)}), but the model has "
                          f"{[l.name for l in layers][:2]}... ({len(layers)}): another model or adapter")
    for l, a in zip(layers, _saved_adapters(path, meta, len(layers)) or []):
        if a != l.adapter:
            raise ValueError(f"{path}: saved for adapter {a!r}, but the model trains adapter {l.adapter!r} in "
                             f"{l.name}: resume on the run's adapter (model.set_adapter({a!r}), or load it "
                             f"with adapter_name={a!r})")
    for k, l in enumerate(layers):
        r = l.A.shape[0]
        want = {"base": l.weight.shape, "ipt_A": l.A.shape, "unc_A": l.A.shape, "ipt_B": l.B.shape,
                "unc_B": l.B.shape, "protected": (r,), "S": None}
        if journal[k] is not None:
            del want["base"]
            _record_fits(path, l.name, t, k, l.W.shape)
        for name, shape in want.items():
            key = f"{name}.{k}"
            got = t.get(key)
            if got is None or (shape is not None and got.shape != shape) or (shape is None and got.dim() != 1):
                raise FormatError(f"{path}: layer {l.name}: {key} is {tuple(got.shape) if got is not None else 'missing'}"
                                  f", the model's is {tuple(shape) if shape is not None else '1-D'}")
            dtype = torch.int64 if name == "protected" else None if name == "base" else torch.float32
            if dtype is not None and got.dtype != dtype:   # as save() writes them (base: checked by _state_file)
                raise FormatError(f"{path}: layer {l.name}: {key} has dtype {got.dtype}, not {dtype}")
            if dtype == torch.float32 and not bool(torch.isfinite(got).all()):
                raise FormatError(f"{path}: layer {l.name}: {key} holds NaN or Inf")
    try:
        step_count, next_dir = int(meta["step_count"]), json.loads(meta["next_dir"])
        log = [_event(e) for e in json.loads(meta.get("log", "[]"))]
        config = json.loads(meta["config"]) if "config" in meta else None
        if config is not None:
            # earlier builds accepted (and saved) 0 / 1 for the flags, which validate() now refuses
            config = SRLoRAConfig(**{k: bool(v) if k in _FLAGS and v in (0, 1) else v for k, v in config.items()})
            config.validate()
        if step_count < 0 or not (isinstance(next_dir, list) and len(next_dir) == len(layers) and
                                  all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in next_dir)):
            raise ValueError("step_count or next_dir out of range")
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # json.JSONDecodeError: a ValueError
        raise FormatError(f"{path}: malformed SRLoRA state ({type(e).__name__}: {e})") from None
    if check_adapter:
        _check_pairs(path, meta, layers, "resume on that adapter (PeftModel.from_pretrained(base, folder, "
                     "is_trainable=True)), loaded before SRLoRA(..., resume_from=folder)")
    return t, {"step_count": step_count, "next_dir": next_dir, "log": log, "config": config, "journal": journal}


def _saved_adapters(path: str, meta: Dict[str, str], count: int) -> Optional[List[str]]:
    """The adapter name a state records for each of its ``count`` layers (None: a state written before they were
    saved); FormatError where the list is malformed."""
    try:
        adapters = json.loads(meta.get("adapters", "null"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: malformed SRLoRA state ({e})") from None
    if adapters is not None and not (isinstance(adapters, list) and len(adapters) == count):
        raise FormatError(f"{path}: malformed SRLoRA state (adapters: {adapters!r})")
    return adapters


def _record_fits(path: str, name: str, t: Dict[str, torch.Tensor], k: int, shape) -> None:
    """Refuse a record (checked by ``_journal``) whose pairs are not of the model's m x n weight."""
    B_old, A_old = t.get(f"B_old.{k}"), t.get(f"A_old.{k}")
    if B_old is not None and (B_old.shape[0], A_old.shape[1]) != tuple(shape):
        raise FormatError(f"{path}: layer {name}: its record's pairs are for a {B_old.shape[0]} x {A_old.shape[1]} "
                          f"weight, the model's is {shape[0]} x {shape[1]}")


def _event(e) -> Event:
    """A saved log entry as an Event, its fields checked (TypeError/ValueError otherwise)."""
    ev = Event(**e)
    ints, floats = (ev.step, ev.layers, ev.pairs, ev.exhausted), (ev.score_mean, ev.score_min, ev.score_max)
    if not (all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in floats)
            and isinstance(ev.detail, dict)):
        raise ValueError(f"log entry {e!r:.80} has fields of the wrong type")
    return ev


def recompositions(config: SRLoRAConfig) -> Optional[int]:
    """How many recompositions the schedule holds (steps t = warmup + j·interval, t >= 1, t <= stop·total_steps);
    None without total_steps (or with fuse_fraction 0: none happen)."""
    if config.total_steps is None or config.fuse_fraction == 0:
        return None
    first = config.warmup if config.warmup >= 1 else config.interval
    last = math.floor(config.stop * config.total_steps)
    return (last - first) // config.interval + 1 if last >= first else 0


def _size_directions(config: SRLoRAConfig, layers, pissa: bool) -> SRLoRAConfig:
    """The run's ``directions``: where left at None and the schedule is known, enough for every recomposition
    (each takes round(fuse_fraction·r) per layer; without PiSSA the top r are free for them too), at least the
    4 r of an unknown schedule and at most ``_DEFAULT_DIRECTIONS_CAP`` r (the cache is (m + n) floats a
    direction: a long run's would be a whole SVD of every weight); one number for all layers, recorded in the
    config so that a resumed run (perhaps with another total_steps) keeps the cache. A number that runs out
    before ``stop`` (explicit, or the capped default) is warned about."""
    events = recompositions(config)
    if events is None or not layers:
        return config
    ranks = sorted({l.A.shape[0] for l in layers})
    per = {r: max(1, int(round(config.fuse_fraction * r))) for r in ranks}
    need = {r: max(0, events * per[r] - (0 if pissa else r)) for r in ranks}   # beyond r
    if config.directions is None:   # 4 r per layer (None) where that lasts
        if all(need[r] <= 4 * r for r in ranks):
            return config
        config = dataclasses.replace(config, directions=max(min(need[r], _DEFAULT_DIRECTIONS_CAP * r) for r in ranks))
        how = (f"the default directions={config.directions} (sized from the schedule, at most "
               f"{_DEFAULT_DIRECTIONS_CAP} r)")
    else:
        how = f"directions={config.directions}"
    d = config.directions   # short where the cache, not the weight's shape, ends the recompositions
    short = [l for l in layers if d < need[l.A.shape[0]] and d < min(l.W.shape) - l.A.shape[0]]
    if short:
        r = short[0].A.shape[0]
        lasts = (d + (0 if pissa else r)) // per[r]
        _warn.warn(f"SRLoRA: {how} lasts {lasts} of the schedule's {events} recompositions in {len(short)} "
                   f"layer(s) ({short[0].name} ...): they stop being recomposed before stop={config.stop}; "
                   f"directions={need[r]} would hold them all ((m + n)·{need[r] + r} float32 numbers a layer, in "
                   "host memory)", stacklevel=3)
    return config


# The settings that define a run's cache of principal directions (which the saved positions index).
_CACHE_FIELDS = ("directions", "seed")


def _resume_config(given: Optional[SRLoRAConfig], saved: Optional[SRLoRAConfig], folder: str) -> SRLoRAConfig:
    """The config a resumed run goes on with: the saved one when none is given; a given one must keep the
    settings that define the cache of directions (the others, e.g. interval or total_steps, may change)."""
    if given is None:
        return saved or SRLoRAConfig()
    if saved is not None and given.directions is None:   # the default: the number the run was sized with
        given = dataclasses.replace(given, directions=saved.directions)
    for name in _CACHE_FIELDS if saved is not None else ():
        if getattr(given, name) != getattr(saved, name):
            raise ValueError(f"{folder}: the run was saved with {name}={getattr(saved, name)!r}, the config given "
                             f"has {name}={getattr(given, name)!r}: it defines the cache of principal directions that "
                             "the saved state indexes; resume with the saved value (or config=None to take the "
                             "saved config whole)")
    return given


@torch.no_grad()
def load_base_weights(model, folder: str, *, check_adapter: bool = True) -> int:
    """Put the modified base weights saved by ``SRLoRA.save`` into a peft model of the same adapter (e.g.
    ``PeftModel.from_pretrained(base, folder)``), so that it computes what the trained model did: a layer
    saved whole is copied, a recorded one (the default) replayed on the model's weight, which must be the
    original one (fingerprint: the base model loaded afresh, in the run's dtype). Every saved layer must exist
    with the same shape, and every recorded one be original; the model's LoRA weights must be the ones saved
    with the state (``check_adapter=False``: any adapter, e.g. one trained on with no recomposition since the
    state was saved). Nothing is written otherwise. Returns the layer count."""
    path, meta, names, t, journal = _state_file(folder)
    model = unwrap_model(model)
    adapters = _saved_adapters(path, meta, len(names)) or [None] * len(names)
    dests = []
    for k, name in enumerate(names):
        layer = _saved_layer(model, name, path, adapters[k], check_adapter and "pairs" in meta)
        w = layer.weight
        if journal[k] is None and w.shape != t[f"base.{k}"].shape:
            raise ValueError(f"{path}: layer {name}: saved weight {tuple(t[f'base.{k}'].shape)}, model's "
                             f"{tuple(w.shape)}")
        if journal[k] is not None:
            _record_fits(path, name, t, k, layer.W.shape)
            _check_original(path, name, w, journal[k]["w0"], ValueError)
        dests.append(layer)
    if check_adapter:
        _check_pairs(path, meta, dests, "load that adapter (PeftModel.from_pretrained(base, folder)), or pass "
                     "check_adapter=False where the adapter was trained on with no recomposition since")
    for k, layer in enumerate(dests):
        if journal[k] is None:
            layer.weight.data.copy_(t[f"base.{k}"])
        elif sum(journal[k]["q"]):
            _replay(layer.W, journal[k]["q"], journal[k]["s"], *(t[f"{n}.{k}"] for n in _RECORD_TENSORS))
    return len(dests)


def _saved_layer(model, name: str, path: str, adapter: Optional[str] = None, pairs: bool = False) -> _Layer:
    """The model's layer ``name`` of a saved state (``lora_layers``' names: a module, or ``module.param[e]`` for
    an expert of a MoE parameter), for its base weight; ValueError where the model has none such. Its pair is
    that of the state's ``adapter``, else of the layer's one active adapter (a run's adapter loaded under another
    name), which ``pairs`` requires."""
    expert = re.fullmatch(r"(.+)\.([^.]+)\[(\d+)\]", name)
    mod_name, pname, e = (expert[1], expert[2], int(expert[3])) if expert else (name, "weight", -1)
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        raise ValueError(f"{path}: the model has no layer {mod_name} (load the adapter with "
                         "PeftModel.from_pretrained first: the names are the peft model's)") from None
    if not hasattr(mod, "get_base_layer"):
        raise ValueError(f"{path}: the model's {mod_name} is a {type(mod).__name__}, not a LoRA layer: load the run's "
                         "adapter first (PeftModel.from_pretrained(base, folder)), or is this another model?")
    base = mod.get_base_layer()
    param = getattr(base, _parameter_name(mod), None)
    if not isinstance(param, torch.Tensor) or _parameter_name(mod) != pname or \
            (param.dim() == 3) != (e >= 0):
        what = f"a LoRA on its {pname}'s experts" if e >= 0 else "a LoRA layer"
        raise ValueError(f"{path}: the model's {mod_name} is a {type(base).__name__}, not {what}: another model?")
    if e >= 0 and e >= param.shape[0]:
        raise ValueError(f"{path}: layer {name}: the model's {pname} holds {param.shape[0]} experts: another model?")
    own = list(getattr(mod, "lora_A", {}))
    active = [a for a in getattr(mod, "active_adapters", []) if a in own]
    which = adapter if adapter in own else active[0] if len(active) == 1 else None
    if pairs and which is None:
        raise ValueError(f"{path}: layer {name}: the state was saved with adapter {adapter!r}, and the model's "
                         f"{mod_name} has {own} with {active or 'none'} active: activate the run's adapter "
                         "(model.set_adapter(...))")
    return _Layer(name, mod, which or "", 0.0, e, param.shape[0] if e >= 0 else 0)


try:
    from transformers import TrainerCallback as _TrainerCallback
except Exception:  # transformers is optional for the library itself
    _TrainerCallback = object


class SRLoRACallback(_TrainerCallback):
    """transformers ``Trainer`` callback: builds SRLoRA at train begin and steps it right after each
    optimizer step (``on_optimizer_step``, before the Trainer clears the gradients; a step the optimizer
    skipped, e.g. an fp16 overflow, is not scored).

    Checkpoints: ``on_save`` writes the SRLoRA state (with the modified base weights, which the adapter in
    the checkpoint lacks) into each ``checkpoint-N`` folder; ``trainer.train(resume_from_checkpoint=...)``
    restores it (from ``resume_from``, or ``output_dir/checkpoint-<global step>``), and with
    ``load_best_model_at_end`` the best checkpoint's base weights come back with its adapter. After
    training, save the result with ``trainer.save_model(d)`` *and* ``callback.srlora.save(d)``. A
    second ``trainer.train()`` (no checkpoint) continues the same SRLoRA run on the trained model."""

    def __init__(self, config: Optional[SRLoRAConfig] = None, *, resume_from: Optional[str] = None):
        self.config = config or SRLoRAConfig()
        self._explicit = config is not None   # on resume without a config, the run's saved one is taken
        self.resume_from = resume_from
        self.srlora: Optional[SRLoRA] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = self.config
        if config.total_steps is None and state.max_steps:
            config = dataclasses.replace(config, total_steps=state.max_steps)  # the caller's config is untouched
        if self.srlora is not None and self.srlora.model is model and state.global_step == 0:
            # trainer.train() again on the trained model: this run goes on (a new SRLoRA would apply PiSSA
            # to the trained pairs and issue the used directions again, and resume_from, which the first train()
            # resumed, cannot resume on the weights the run changed since); `stop` counts the new steps too.
            # Resumed without a config, the run goes on with its own (the callback's default is none of it)
            config = config if self._explicit else self.srlora.config
            if (self.config.total_steps is None or not self._explicit) and state.max_steps:
                config = dataclasses.replace(config, total_steps=self.srlora.step_count + state.max_steps)
            # the run's cache of directions stays (its size was set when the run began)
            config = dataclasses.replace(config, directions=self.srlora.config.directions)
            self.srlora.config, self.srlora.optimizer = config, optimizer
            return
        resume = self.resume_from
        if resume is None and state.global_step > 0:  # the Trainer resumed from a checkpoint
            resume = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not os.path.isfile(os.path.join(resume, STATE_FILE)):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {resume} holds no {STATE_FILE}: pass "
                    "SRLoRACallback(resume_from=the checkpoint folder) (the adapter alone lacks the fused base weights)")
        if resume is None:
            self.srlora = SRLoRA(model, optimizer, config)
            return
        # where the Trainer resumed, it loads the checkpoint's adapter itself (under DeepSpeed only after this
        # call): the pairs are checked where it did not (resume_from given to a fresh run)
        self.srlora = SRLoRA(model, optimizer, config if self._explicit else None, resume_from=resume,
                             check_adapter=state.global_step == 0)
        if self.srlora.config.total_steps is None and state.max_steps:
            self.srlora.config = dataclasses.replace(self.srlora.config, total_steps=state.max_steps)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.srlora is not None:
            self.srlora.step(optimizer_stepped=not getattr(optimizer, "step_was_skipped", False))

    def on_save(self, args, state, control, **kwargs):
        if self.srlora is not None and args.should_save:  # the process that writes the checkpoint
            # the best checkpoint is loaded onto the trained model at the end, which a record cannot replay on
            self.srlora.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                             base="whole" if args.load_best_model_at_end else "record")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and os.path.isfile(os.path.join(best, STATE_FILE)):
            load_base_weights(model, best)  # the Trainer restored the best adapter; its base weights go with it
