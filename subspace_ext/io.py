"""Reading and writing peft adapter folders, base-model weights and fingerprints (safetensors + JSON only).

Nothing here unpickles: a peft folder must hold ``adapter_model.safetensors`` (a ``.bin`` adapter is
refused with a message saying how to convert it), and base weights are read from ``*.safetensors``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from . import _warn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# SRLoRA.save's file beside an adapter: the base weights the run changed (srlora.py)
SRLORA_STATE = "srlora_state.safetensors"
_PEFT_PREFIX = "base_model.model."


class FormatError(ValueError):
    """A file or folder that is not what it should be (names the file and the problem)."""


def check_finite(tensors: Dict[str, torch.Tensor], where: str) -> None:
    """FormatError naming the first floating-point tensor of ``tensors`` that holds NaN or Inf."""
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    by_dtype: Dict[torch.dtype, list] = {}
    for v in floats.values():
        by_dtype.setdefault(v.dtype, []).append(v.detach().reshape(-1))
    if all(bool(torch.isfinite(torch.cat(vs)).all()) for vs in by_dtype.values()):
        return  # one check per dtype (a task switch reads ~26 small tensors); the loop below names the culprit
    bad = next(k for k, v in floats.items() if not bool(torch.isfinite(v).all()))
    raise FormatError(f"{where}: tensor {bad} holds NaN or Inf")


@dataclass
class LowRankUpdate:
    """One adapted Linear: its update is ``scaling * B @ A`` (B m x r, A r x n)."""
    module: str          # module path inside the peft model, e.g. "bert.encoder.layer.0.attention.self.query"
    B: torch.Tensor
    A: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False  # the base weight is stored n x m (transformers' Conv1D, GPT-2)
    as_stored: bool = False       # a LoRA on the weight as a parameter (peft's target_parameters): peft adds
    #                               scaling * B @ A to the weight as stored, whatever the module's type
    params: Tuple[str, ...] = ()  # updates(experts=True): the 3-D expert parameter(s) of a MoE block this LoRA
    #                               may adapt (peft's target_parameters): B @ A is not its update, expert_pairs is
    #                               (not as_stored: or it is a module LoRA, read as such, which the base tells)
    expert: int = -1              # expert_pairs: the expert whose slice of ``params[0]`` this pair adapts
    experts: int = 0              # expert_pairs: how many experts that parameter holds

    @property
    def shape(self):
        """(m, n) of the update: out_features x in_features, whatever the base weight's layout."""
        return (self.B.shape[0], self.A.shape[1])


def expert_pairs(B: torch.Tensor, A: torch.Tensor, experts: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The rank-r pairs (B_e m x r, A_e r x n) of a LoRA on a MoE block's 3-D expert parameter (peft's
    ParamWrapper): lora_A (r·E x n) stacks the experts' A_e, lora_B (m x r·E) interleaves their columns
    (column k·E + e is B_e's k-th); expert e's update is scaling · B_e @ A_e (transposed where the parameter
    is stored experts x in x out). ``stack_experts`` is the inverse."""
    r = A.shape[0] // experts
    return [(B[:, e::experts], A[e * r:(e + 1) * r]) for e in range(experts)]


def stack_experts(pairs: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_B, lora_A) of a MoE expert parameter's LoRA from its experts' pairs, in order (``expert_pairs``)."""
    B = torch.stack([b for b, _ in pairs], dim=2)    # m x r x E: column k·E + e once flattened
    return B.reshape(B.shape[0], -1), torch.cat([a for _, a in pairs])


def unnested(module: str) -> str:
    """The module a peft wrapper's path names: peft nests the wrappers of several target parameters of one module
    (``experts.base_layer`` inside ``experts``)."""
    return re.sub(r"(\.base_layer)+$", "", module)


def nesting_depth(wrapper: str) -> int:
    """How many ".base_layer" end a peft wrapper's name: the wrappers of its module's other targeted parameters
    that lie outside it."""
    return (len(wrapper) - len(unnested(wrapper))) // len(".base_layer")


def nested_parameter(module: torch.nn.Module, params, wrapper: str) -> Optional[str]:
    """The parameter of ``params`` that peft's wrapper named ``wrapper`` adapts in ``module``: peft wraps a module's
    targeted parameters in the module's order, each wrapper around the last, so the first is the innermost
    (``<module>.base_layer...``: one ".base_layer" per wrapper outside it) and the last is ``<module>``; None where
    the nesting is deeper than the parameters."""
    order = [p for p, _ in module.named_parameters(recurse=False) if p in params]
    depth = nesting_depth(wrapper)
    return order[len(order) - 1 - depth] if depth < len(order) else None


def as_update_layout(W0: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The m x n (out x in) view of a base weight as stored: a Linear's weight itself, a Conv1D's
    (stored in x out, peft's ``fan_in_fan_out``) transposed. No copy."""
    return W0.T if fan_in_fan_out else W0


def parameter_names(model: torch.nn.Module) -> Dict[int, List[str]]:
    """{id(parameter): every name it has in ``model``} (a tied weight has several), for ``tied_elsewhere``."""
    names: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def progress_bar(items, desc: str, enabled: bool, *, unit: str = "layer", total: Optional[int] = None,
                 leave: bool = False):
    """``items`` with a progress bar on stderr when ``enabled``; it draws only on a terminal (a log file or a pipe
    would get every frame, carriage returns and all). ``items`` None: a bar advanced by ``update`` (of ``total``)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm  # a dependency of transformers / huggingface_hub
    bar = tqdm(items, desc=desc, unit=unit, total=total, leave=leave, disable=None, file=sys.stderr)
    OPEN_BARS.add(bar)
    return bar


OPEN_BARS: "weakref.WeakSet" = weakref.WeakSet()   # our bars not yet collected: the CLI closes them on an error


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's OptimizedModule (``_orig_mod``) and DataParallel /
    DistributedDataParallel (``module``) wrappers: the module names that files record are the plain
    model's, whichever wrapper the training loop used."""
    for model in _wrappers(model):
        pass
    return model


def _wrappers(model):
    """``model``, then each model its torch.compile / DataParallel / DistributedDataParallel wrappers hold, in."""
    yield model
    while True:
        if isinstance(model, torch.nn.Module) and type(model).__name__ == "OptimizedModule" and \
                hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return
        yield model


def refuse_distributed(model: torch.nn.Module, what: str, ddp: bool) -> None:
    """ValueError for a model FSDP shards (FSDP's wrapper, or fully_shard): each rank holds a shard of every weight,
    and ``what`` edits whole weights. With ``ddp``, also for one already wrapped in DistributedDataParallel, which
    registers the parameters it averages when it is built: parameters added after it stayed on each rank."""
    if ddp and any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in _wrappers(model)):
        raise ValueError(f"{what}: the model is already wrapped in DistributedDataParallel, which averages the "
                         "gradients only of the parameters it saw when it was built (the new loadings' would stay on "
                         "each rank): apply to the plain model, then wrap it (the transformers Trainer wraps after)")
    try:
        from torch.distributed import fsdp
    except ImportError:   # a torch without distributed support
        return
    # FSDP1's wrapper, FSDP2's fully_shard (which makes a module an FSDPModule too)
    sharded = tuple(getattr(fsdp, n) for n in ("FullyShardedDataParallel", "FSDPModule") if hasattr(fsdp, n))
    if sharded and any(isinstance(m, sharded) for m in model.modules()):
        raise ValueError(f"{what}: the model is sharded with FSDP, so each rank holds a shard of every weight, not "
                         f"the whole weights {what} edits: train it with DistributedDataParallel")


def _suffix_index(named) -> Dict[str, List[str]]:
    """{dotted suffix: the first two entries of ``named`` that are it or end in "." + it}: ``_suffix_match``'s
    lookups, built once (a scan of ``named`` per name took 14 s for 12,000 MoE expert layers under a prefix)."""
    index: Dict[str, List[str]] = {}
    for n in named:
        parts = n.split(".")
        for start in range(len(parts)):
            hits = index.setdefault(".".join(parts[start:]), [])
            if len(hits) < 2:   # a name listed twice is two entries, as a scan counted it
                hits.append(n)
    return index


def _suffix_match(named, name: str, index: Optional[Dict[str, List[str]]] = None) -> tuple:
    """(entry of ``named``, shared dotted suffix) for the longest dotted suffix of ``name`` naming exactly one
    entry of ``named``; (None, None) if none does or the longest one found names several. ``index``:
    ``_suffix_index(named)``, for many lookups."""
    if name in named:
        return name, name
    index = _suffix_index(named) if index is None else index
    parts = name.split(".")
    for start in range(len(parts)):   # the whole name first: an entry may be it under a prefix (model.<name>)
        cand = ".".join(parts[start:])
        hits = index.get(cand, ())
        if len(hits) == 1:
            return hits[0], cand
        if hits:  # shorter suffixes only match more
            break
    return None, None


def prefix_rewrite(names: Iterable[str], named) -> Optional[Tuple[str, str]]:
    """The one prefix rewrite ``P + rest -> Q + rest`` from ``names`` into ``named`` (module or tensor names
    of two checkpoints or models, e.g. ``bert.`` -> ``""``) that the most names' longest unique dotted suffix
    match agrees on (ties: the shortest prefixes); None if no name matches at all."""
    votes: Dict[Tuple[str, str], int] = {}
    if isinstance(named, (list, tuple)) and len(set(named)) == len(named):
        named = dict.fromkeys(named)   # O(1) membership
    index = _suffix_index(named)
    for m in names:
        hit, suffix = _suffix_match(named, m, index)
        if hit is not None:
            key = (m[: len(m) - len(suffix)], hit[: len(hit) - len(suffix)])
            votes[key] = votes.get(key, 0) + 1
    return max(votes, key=lambda k: (votes[k], -len(k[0]) - len(k[1]))) if votes else None


def tied_elsewhere(names: Dict[int, List[str]], module: str, weight: torch.nn.Parameter) -> Optional[str]:
    """The first name of ``module``'s parameter ``weight`` outside ``module`` (``names``: the model's
    ``parameter_names``), or None: a tied weight (GPT-2's lm_head is the input embedding), which an edit
    would change in that module too."""
    return next((n for n in names.get(id(weight), []) if not n.startswith(module + ".")), None)


def linear_layout(module: torch.nn.Module) -> Optional[bool]:
    """Whether a Linear-like module stores its weight in x out (``fan_in_fan_out``): False for a
    torch.nn.Linear, True for transformers' Conv1D (GPT-2); None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return False
    from transformers.pytorch_utils import Conv1D
    return True if isinstance(module, Conv1D) else None


def quantized(module: torch.nn.Module, weight: Optional[torch.Tensor] = None) -> Optional[str]:
    """What a layer's weight (or its parameter ``weight``) is when it does not hold the weight's numbers in
    floating point: a quantized base (bitsandbytes' 4-/8-bit Linear under QLoRA: packed integers, shape
    (n_bytes, 1); float8 numbers; a torchao or other quantized tensor subclass). None for a plain weight (a torch
    tensor or Parameter, DTensor included)."""
    w = getattr(module, "weight", None) if weight is None else weight
    if not isinstance(w, torch.Tensor):
        return None
    kind = type(w)
    plain = kind.__module__ == "torch" or kind.__module__.startswith("torch.")
    if plain and w.is_floating_point() and w.dtype.itemsize > 1 and getattr(w, "quant_state", None) is None:
        return None
    return (f"{type(module).__module__}.{type(module).__name__}, its weight a {kind.__module__}.{kind.__name__} of "
            f"dtype {str(w.dtype).replace('torch.', '')} and shape {tuple(w.shape)}")


def embedding_lora_modules(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Modules with LoRA on an embedding (peft's lora_embedding_A/B) among an adapter's tensors: not
    low-rank updates of a Linear here; SOLAR carries their tensors unchanged, EigenLoRAx ignores them."""
    return sorted({m.group(1) for k in tensors if (m := re.fullmatch(r"(.*)\.lora_embedding_A(\..*)?", k))})


def base_modifying_init(init) -> Optional[str]:
    """A peft ``init_lora_weights`` that moves a part of each base weight into the factors when peft creates
    the adapter (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: W0 -= s B A): the value, else None. An adapter saved
    without peft's conversion (``path_initial_model_for_weight_conversion``) keeps it in its config, so its
    factors hold that init plus the training, and peft redoes the init on the original base when it loads."""
    if isinstance(init, str) and (init.lower().startswith("pissa") or init.lower() in ("olora", "corda", "loftq",
                                                                                       "lora_ga")):
        return init
    return None


def refuse_srlora_state_alone(folder: str) -> None:
    """An adapter written into a folder that holds an SRLoRA run's state and no adapter would be loaded with
    that run's base weights (``srlora.load_base_weights``): refused. (Over the run's adapter it replaces
    both: ``PeftAdapter.save_adapter`` removes the state.)"""
    if os.path.isfile(os.path.join(folder, SRLORA_STATE)) and not any(
            os.path.exists(os.path.join(folder, f)) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
        raise ValueError(f"{folder} holds an SRLoRA run's state ({SRLORA_STATE}) and no adapter: an adapter written "
                         "here would be loaded with that run's base weights; write it to another folder")


# adapter_config.json is written with its keys sorted (json.dumps(sort_keys=True)), except inside these dicts, whose
# order decides which pattern wins where several match a module (peft's get_pattern_key: the first); peft >= 0.22
# writes them so (its CONFIG_KEYS_WITH_PRESERVED_ORDER), and sorting them changed such an adapter's scalings
ORDERED_CONFIG_KEYS = frozenset({"rank_pattern", "alpha_pattern", "paca_indices_pattern"})


def config_json(config: dict) -> str:
    """The text of an adapter_config.json as peft writes it: indent 2, keys sorted at every level but inside
    ``ORDERED_CONFIG_KEYS`` (kept as given). ValueError for NaN / Inf (not JSON)."""
    def order(obj):
        if isinstance(obj, dict):
            return {k: v if k in ORDERED_CONFIG_KEYS else order(v) for k, v in sorted(obj.items())}
        return [order(x) for x in obj] if isinstance(obj, (list, tuple)) else obj
    return json.dumps(order(config), indent=2, allow_nan=False)


@dataclass
class PeftAdapter:
    """A peft adapter in memory: its config (adapter_config.json) and tensors (adapter_model.safetensors)."""
    config: dict
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    source: Optional[str] = field(default=None, compare=False)  # the folder it was loaded from (for errors)

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "PeftAdapter":
        if not os.path.isdir(path):
            raise FormatError(f"{path}: not a folder (expected a peft adapter folder with {ADAPTER_CONFIG})")
        cfg_path = os.path.join(path, ADAPTER_CONFIG)
        if not os.path.isfile(cfg_path):
            subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, ADAPTER_CONFIG)))
            hint = (f"; it holds the adapter folder(s) {', '.join(d + '/' for d in subs)} (peft saves an adapter "
                    f"not named 'default' in a subfolder): pass {os.path.join(path, subs[0])}") if subs else ""
            raise FormatError(f"{path}: no {ADAPTER_CONFIG} (not a peft adapter folder){hint}")
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise FormatError(f"{cfg_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{cfg_path}: not a JSON object (a peft adapter config is one)")
        weights = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.isfile(weights):
            if os.path.isfile(os.path.join(path, "adapter_model.bin")):
                raise FormatError(f"{path}: only adapter_model.bin (pickle) is present; subspace_ext reads "
                                  "safetensors only: re-save it with save_pretrained(..., safe_serialization=True)")
            raise FormatError(f"{path}: no {ADAPTER_WEIGHTS}")
        # the state lies beside the adapter, or in the folder above one peft saved under its name
        if any(os.path.isfile(os.path.join(d, SRLORA_STATE)) for d in (path, os.path.dirname(os.path.abspath(path)))):
            raise FormatError(
                f"{path}: an SRLoRA run's adapter ({SRLORA_STATE} beside it): the run fused pairs into the base "
                "weights, so the adapter alone is not the trained update over the base model. Merge it "
                "(PeftModel.from_pretrained, srlora.load_base_weights, merge_and_unload, save_pretrained) and "
                "use the merged model (SOLAR: its difference to the base, solar compress --dense)")
        return cls(config, read_safetensors(weights), source=path)

    def save_adapter(self, path: str) -> None:
        """Write a standard peft folder: adapter_config.json + adapter_model.safetensors.

        Both files are written beside their final names and renamed into place once both are complete;
        if writing fails (a full disk), a folder this call created is removed and existing files stay as
        they were.
        """
        try:
            config = config_json(self.config)
        except ValueError:
            raise ValueError(f"{path}: the adapter config holds NaN or Inf (not valid JSON): {self.config}") from None
        refuse_srlora_state_alone(path)
        stale = os.path.join(path, SRLORA_STATE)
        created = not os.path.isdir(path)
        make_folder(path, "a peft adapter")
        try:
            tensors = {k: v.contiguous() for k, v in self.tensors.items()}
            _write_files_atomically({
                os.path.join(path, ADAPTER_WEIGHTS): lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                os.path.join(path, ADAPTER_CONFIG): lambda tmp: _write_text(tmp, config)})
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        if os.path.isfile(stale):  # the replaced adapter's: srlora.load_base_weights would apply it to this one
            os.remove(stale)
            _warn.warn(f"{path}: removed {SRLORA_STATE}, the SRLoRA state of the adapter this one replaced")

    # -- contents ------------------------------------------------------------------------------
    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA")).upper()

    def updates(self, experts: bool = False) -> List[LowRankUpdate]:
        """The low-rank updates of every adapted Linear (LoRA and AdaLoRA), in file order; factors and
        scalings checked finite (an error names the layer, and the folder the adapter came from). LoRA on a MoE
        block's expert parameters is refused by name, or with ``experts`` returned with ``params`` set: its B @ A is
        not the update (the scaling is a placeholder), ``expert_pairs`` with the base's expert count splits it."""
        try:
            return self._updates(experts)
        except FormatError as e:
            if self.source and not str(e).startswith(self.source):
                raise FormatError(f"{self.source}: {e}") from None
            raise

    def _number(self, key: str, value) -> float:
        """A number of the config (lora_alpha, init_r, an alpha_pattern value) as a float."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormatError(f"{ADAPTER_CONFIG}: {key} must be a number, got {value!r}")
        return float(value)

    def _updates(self, experts: bool) -> List[LowRankUpdate]:
        kind = self.peft_type
        if kind not in ("LORA", "ADALORA"):
            raise FormatError(f"peft_type {kind} is not supported (LORA and ADALORA are)")
        for key, (variant, why) in _UNSUPPORTED_VARIANTS.items():
            if self.config.get(key):
                raise FormatError(f"{variant} adapters ({ADAPTER_CONFIG}: {key}) are not supported: {why}")
        for key in self.tensors:
            if ".lora_" in key and not _LORA_TENSOR.fullmatch(key):
                raise FormatError(f"tensor {key} is not a LoRA factor this reader knows (lora_A, lora_B, AdaLoRA's "
                                  "lora_E, lora_embedding_A/B, lora_B.bias): an adapter of a LoRA variant whose "
                                  "update is not scaling * B @ A? Its meaning would be lost, so it is refused")
        for key in ("r", "lora_alpha", "init_r"):  # what peft (and a SOLAR package's reader) reads as numbers
            if key in self.config:
                self._number(key, self.config[key])
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))  # peft's Conv1D layers (GPT-2): same B, A
        for key in self.tensors:   # the lora_A side is matched below; a lone lora_B was silently dropped
            m = re.fullmatch(r"(.*)\.lora_B(\.weight)?", key)
            if m and f"{m.group(1)}.lora_A{m.group(2) or ''}" not in self.tensors:
                raise FormatError(f"{key} has no matching {m.group(1)}.lora_A{m.group(2) or ''}")
        out = []
        for key in self.tensors:
            m = re.fullmatch(r"(.*)\.lora_A(\.weight)?", key)
            if not m:
                continue
            module, suffix = m.group(1), m.group(2) or ""
            b_key = f"{module}.lora_B{suffix}"
            if b_key not in self.tensors:
                raise FormatError(f"{key} has no matching {b_key}")
            A, B = self.tensors[key], self.tensors[b_key]
            if not (A.is_floating_point() and B.is_floating_point()):
                raise FormatError(f"{module}: lora_A / lora_B must be floating point, got {A.dtype} / {B.dtype}")
            if A.dim() > 2 or B.dim() > 2:
                raise FormatError(f"{module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are "
                                  f"{max(A.dim(), B.dim())}-D: LoRA on a convolution (peft's Conv1d / Conv2d / Conv3d "
                                  "layers) is not supported; Linear and transformers' Conv1D layers are")
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise FormatError(f"{module}: lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} do not chain")
            name = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
            param = self._target_parameter(name, experts)
            # a module LoRA: no target parameter, or expert parameters that bare names only may have matched
            plain = param is None or isinstance(param, tuple) and self._maybe_module_lora(name)
            r = A.shape[0]
            if kind == "ADALORA":
                E = self.tensors.get(f"{module}.lora_E{suffix}")
                if E is None:
                    raise FormatError(f"{module}: AdaLoRA adapter without lora_E")
                A = A * E.reshape(-1, 1).to(A.dtype)
                # peft's AdaLoRA forward: lora_alpha / (ranknum + 1e-5), where ranknum stays init_r when
                # rank allocation prunes a layer (peft restores a pruned adapter with the old ranknum);
                # a lora_alpha <= 0 stands for init_r there (a scaling of about 1)
                alpha = self._number("lora_alpha", self.config.get("lora_alpha", 8))
                init_r = self._number("init_r", self.config.get("init_r", r))
                scaling = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)
            elif r == 0:  # AdaLoRA prunes layers to rank 0 (callers skip them); a LoRA has no such layer
                raise FormatError(f"{module}: lora_A / lora_B of rank 0 ({tuple(A.shape)} / {tuple(B.shape)}): "
                                  "a LoRA layer without an update")
            elif isinstance(param, tuple):   # MoE experts: scaling uses r of one expert (expert_pairs' callers),
                scaling = self.lora_scaling(name, r) if plain else 1.0   # else its module LoRA's
            else:   # peft matches a target parameter's patterns on "<module>.<parameter>"
                scaling = self.lora_scaling(name if param is None else f"{name}.{param}", r)
            for side, M in (("lora_A", A), ("lora_B", B)):
                if not bool(torch.isfinite(M).all()):
                    raise FormatError(f"layer {name}: {side} holds NaN or Inf")
            if not (math.isfinite(scaling) and scaling > 0):
                raise FormatError(f"layer {name}: scaling (from lora_alpha) is {scaling}; it must be a finite "
                                  "number > 0 (a lora_alpha of 0 makes an adapter that changes nothing)")
            out.append(LowRankUpdate(name, B, A, scaling, fan_in_fan_out and plain, not plain,
                                     param if isinstance(param, tuple) else ()))
        if not out:
            emb = embedding_lora_modules(self.tensors)
            raise FormatError("the adapter holds no lora_A / lora_B tensors" + (
                f"; LoRA on embeddings (lora_embedding_A/B of {', '.join(emb[:3])}) is not supported" if emb else ""))
        return out

    def _target_parameter(self, module: str, experts: bool = False) -> Union[None, str, Tuple[str, ...]]:
        """The parameter a module's LoRA adapts when peft's ``target_parameters`` names it (peft wraps the
        module and matches "<module>.<parameter>" on the entry's dotted suffix), else None. A ``weight`` is read
        as a Linear's update; LoRA on another parameter (the 3-D expert tensors of a MoE block, where lora_A /
        lora_B hold one rank-r pair per expert) is refused, or with ``experts`` the parameters it may adapt are
        returned (several wrappers of one module nest; the base's shapes tell them apart)."""
        targets = self.config.get("target_parameters") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FormatError(f"{ADAPTER_CONFIG}: target_parameters must be a list of parameter names, got {targets!r}")
        params = {p for p, _ in self._targets_of(module)}
        if params - {"weight"} and experts:
            return tuple(sorted(params - {"weight"}))
        if params - {"weight"}:
            raise FormatError(f"{module}: LoRA on the parameter(s) {', '.join(sorted(params))} of this module (peft's "
                              "target_parameters) is not supported: its update is not scaling * B @ A of a 2-D "
                              "weight (a MoE block's expert tensors hold one LoRA pair per expert); only a module's "
                              "2-D weight is (solar compress, SRLoRA, and with a base EigenLoRAx's build_subspace "
                              "(eigen build --base) and relative_errors take MoE expert parameters)")
        return "weight" if params else None

    def _targets_of(self, module: str) -> set:
        """{(parameter, named with a module part)} of the target_parameters entries that match ``module`` (peft
        nests the wrappers of several parameters of one module: ``<module>.base_layer``)."""
        core = unnested(module)
        return {(p, bool(mod)) for mod, _, p in (t.rpartition(".") for t in self.config.get("target_parameters") or [])
                if not mod or core == mod or core.endswith("." + mod)}

    def _maybe_module_lora(self, module: str) -> bool:
        """Whether a module whose LoRA an expert parameter may be (``updates(experts=True)``) may instead be a LoRA
        of its module (target_modules): unnested, and matched only by bare parameter names (peft's own conversion
        of a transformers-4 MoE config writes ``["gate_up_proj", "down_proj"]``), which peft wraps only where the
        module has such a parameter; the base tells (solar._expert_updates)."""
        return ".base_layer" not in module and not any(named for _, named in self._targets_of(module))

    def expert_updates(self, u: LowRankUpdate, param: str, experts: int) -> List[LowRankUpdate]:
        """``u``, this adapter's LoRA on the MoE expert parameter ``param`` of ``experts`` experts, as one update
        per expert (``expert_pairs``), each with the scaling of its rank (rows / experts) for ``param``."""
        scaling = self.lora_scaling(f"{unnested(u.module)}.{param}", u.A.shape[0] // experts)
        return [replace(u, B=B, A=A, scaling=scaling, params=(param,), expert=e, experts=experts)
                for e, (B, A) in enumerate(expert_pairs(u.B, u.A, experts))]

    def lora_scaling(self, module: str, r: int) -> float:
        """peft's LoRA scaling for a module: alpha / r (alpha / sqrt(r) with use_rslora), with the
        config's alpha_pattern override (the first matching key in the file's order, as peft's
        get_pattern_key; r is the factors' own rank, so rank_pattern needs no lookup)."""
        alpha = self._number("lora_alpha", self.config.get("lora_alpha", 8))
        patterns = self.config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise FormatError(f"{ADAPTER_CONFIG}: alpha_pattern must be an object (module pattern -> alpha), "
                              f"got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                hit = re.match(rf"(.*\.)?({pattern})$", module)
            except re.error as e:
                raise FormatError(f"{ADAPTER_CONFIG}: alpha_pattern key {pattern!r} is not a regular expression "
                                  f"({e})") from None
            if hit:
                alpha = self._number(f"alpha_pattern[{pattern!r}]", value)
                break
        return alpha / (r ** 0.5) if self.config.get("use_rslora") else alpha / r

    def extra_tensors(self) -> Dict[str, torch.Tensor]:
        """Everything that is not a low-rank factor (modules_to_save heads, trained biases, ...), checked
        finite like the factors (a FormatError names the tensor)."""
        lowrank = re.compile(r".*\.lora_[ABE](\.weight)?$")
        out = {k: v for k, v in self.tensors.items() if not lowrank.fullmatch(k)}
        check_finite(out, self.source or "adapter")
        return out


# peft's LoRA variants (the LoraConfig fields marked is_lora_variant in peft 0.21) whose adapters do not
# compute scaling * B @ A from the stored factors: refused by name. Those that do are read: VeLoRA
# changes only the backward pass, MiCA (init_lora_weights="mica") only the initialisation.
_UNSUPPORTED_VARIANTS = {
    "use_dora": ("DoRA", "the update is rescaled by a learned magnitude vector, not scaling * B @ A"),
    "kasa_config": ("KaSA", "the update is scaling * B @ diag(lora_diag) @ A, and the base weight is truncated"),
    "use_bdlora": ("BD-LoRA", "the factors are block-diagonal and stored in blocks"),
    "monteclora_config": ("MonteCLoRA", "the factors are sampled (variational Monte Carlo), not fixed"),
    "arrow_config": ("Arrow", "several LoRA experts are routed per token"),
    "alora_invocation_tokens": ("aLoRA", "the update applies only to tokens after the invocation sequence, "
                                "which a weight update (fused, recycled or rebuilt) cannot express"),
}


def refuse_layer_replication(config: dict, where: str) -> None:
    """FormatError for an adapter of peft's ``layer_replication`` that changes which base layer a model layer
    is: peft renumbers the stacked copies (``[[0, 2], [1, 2]]``: model.layers.2 is base layer 1; ``[[1, 3]]``:
    model.layers.0 is base layer 1), so the base checkpoint holds no weight of their own under their names
    (SOLAR, and EigenLoRAx's bases and exports, go by the names). Ranges that keep layers 0..k-1 in order pass."""
    ranges = config.get("layer_replication") or []
    try:
        layers = [i for start, end in ranges for i in range(start, end)]
        renumbered = layers != list(range(len(layers)))
    except (TypeError, ValueError):
        renumbered = True
    if renumbered:
        raise FormatError(f"{where}: layer_replication adapters ({ADAPTER_CONFIG}: layer_replication "
                          f"{ranges!r:.60}) are not supported: peft stacks and renumbers copies of base layers, so "
                          "an adapted layer has no weight of its own under its name in the base checkpoint")


# The tensors with ".lora_" in their names that this reader knows (lora_B.bias: peft's lora_bias, carried
# as an extra tensor); any other is refused.
_LORA_TENSOR = re.compile(r".*\.(lora_[ABE](\.weight)?|lora_B\.bias|lora_embedding_[AB](\..*)?)")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def make_folder(path: str, what: str) -> None:
    """Create the folder ``path`` (and its parents) for ``what`` to write into; a file there is named, not raised
    as a bare FileExistsError."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: is a file, and {what} writes a folder: give a folder's path")
    os.makedirs(path, exist_ok=True)


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: readers never
    see a partial file, and a failed write leaves an existing ``path`` unchanged. Any failure is
    raised as OSError naming ``path`` (safetensors reports a full disk with its own error type)."""
    _write_files_atomically({path: write})


def _write_files_atomically(files: Dict[str, Callable[[str], None]]) -> None:
    """``_write_atomically`` for several files that belong together (an adapter's weights and config):
    every file is written to its temporary name first and only then are all renamed into place, so a
    failed write leaves none of the old files replaced (the renames are not one step: a process killed between
    two of them leaves the first file new)."""
    tmps: Dict[str, str] = {}
    path = next(iter(files), "")
    for target in files:   # (the rename failed with the temporary file's name in the message)
        if os.path.isdir(target):
            raise IsADirectoryError(f"{target}: is a folder, and a file is written here: give a file's path (e.g. "
                                    f"{os.path.join(target, 'task.safetensors')})")
    try:
        for path, write in files.items():
            folder, name = os.path.split(os.path.abspath(path))
            # random, not the pid alone: writers on two hosts (containers) sharing a folder have the same pids
            tmps[path] = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
            write(tmps[path])
        for path, tmp in list(tmps.items()):
            os.replace(tmp, path)
            del tmps[path]
    except BaseException as e:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, OSError):
            raise OSError(f"{path}: could not write ({e})") from None
        raise


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file``, written atomically (see ``_write_atomically``), with the metadata's keys in
    sorted order: the same tensors and metadata give the same bytes in every process."""
    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        _sort_metadata(tmp)
    _write_atomically(path, write)


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted. safetensors writes them in its
    hash map's order, which changes on every save: the same package was other bytes each time (the
    tensors' entries and data are in a fixed order already). The header is compact JSON padded with spaces to a
    multiple of 8 bytes, as safetensors writes it; of the same length (the usual case) it is rewritten in place."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    if len(header.get("__metadata__") or {}) < 2:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    if len(text) == size:
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(text)
        return
    try:
        with open(path, "rb") as src, open(path + ".sorted", "wb") as dst:   # another JSON escaping: the data moves
            src.seek(8 + size)
            dst.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(path + ".sorted", path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path + ".sorted")


def save_with_digest(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    """``save_safetensors`` with a ``digest`` entry over the tensors and the metadata (``check_digest``)."""
    digest = content_digest(tensors, json.dumps(metadata, sort_keys=True))
    save_safetensors(tensors, path, metadata={**metadata, "digest": digest})


def check_digest(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Dict[str, str]:
    """``metadata`` without its ``digest`` entry, which must match ``tensors`` and the rest of it (files
    written before digests were added have none): FormatError naming ``path`` otherwise."""
    meta = dict(metadata)
    digest = meta.pop("digest", None)
    if digest is not None and content_digest(tensors, json.dumps(meta, sort_keys=True)) != digest:
        raise FormatError(f"{path}: corrupt file: its contents do not match the digest recorded when it was saved")
    return meta


def _not_a_folder(path: str) -> None:
    if os.path.isdir(path):
        raise FormatError(f"{path} is a folder; expected a .safetensors file")


_READ_WHOLE_BYTES = 64 << 20  # files up to this size are read in one go (read_safetensors)


def read_safetensors(path: str, keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file (all, or ``keys``); a damaged file raises FormatError naming it."""
    _not_a_folder(path)
    try:
        if keys is None and os.path.getsize(path) <= _READ_WHOLE_BYTES:
            # one read + one parse: ~4x faster than safe_open's per-tensor get_tensor for the ~26 small
            # tensors of a task switch; big files stay memory-mapped and are read tensor by tensor
            with open(path, "rb") as f:
                t = safetensors_load(f.read())
            return {k: t[k] for k in sorted(t)}  # in safe_open's (sorted) key order, as below
        with safe_open(path, framework="pt") as f:
            names = list(f.keys()) if keys is None else list(keys)
            return {k: f.get_tensor(k) for k in names}
    except FormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None


def safetensors_metadata(path: str) -> Dict[str, str]:
    _not_a_folder(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None


def _model_files(folder: str, files: List[str]) -> List[str]:
    """Of a model folder's .safetensors ``files`` (sorted), those transformers loads: model.safetensors, else the
    shards model.safetensors.index.json maps the weights to, else (a folder of other names) all of them. Other
    files beside the model (a variant, model.fp16.safetensors; a copy) are not read."""
    if "model.safetensors" in files:
        return ["model.safetensors"]
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return files
    try:
        with open(index, encoding="utf-8") as f:
            shards = json.load(f)["weight_map"].values()
        shards = sorted(set(shards)) if all(isinstance(s, str) for s in shards) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{index}: not a readable shard index ({type(e).__name__}: {e})") from None
    if not shards:
        raise FormatError(f"{index}: not a readable shard index (weight_map must map names to file names)")
    missing = [s for s in shards if s not in files]
    if missing:
        raise FormatError(f"{index}: maps weights to {missing[0]}, which is not in the folder")
    return shards


class BaseWeights:
    """Lazy access to a base model's weights: a transformers folder (model.safetensors or sharded
    model-0000x-of-0000y.safetensors: the files transformers reads, ``_model_files``) or one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                if any(f.endswith(".bin") for f in os.listdir(path)):
                    raise FormatError(f"{path}: only pickle (.bin) weights; subspace_ext reads safetensors only")
                raise FormatError(f"{path}: no .safetensors weights in this folder")
            self.files = [os.path.join(path, f) for f in _model_files(path, files)]
        elif os.path.isfile(path):
            self.files = [path]
        else:
            raise FormatError(f"{path}: no such file or folder (expected a transformers model folder or a .safetensors file)")
        self._where: Dict[str, str] = {}
        self.loaded_modules: set = set()   # modules key_for_module found by their loaded name (loaded_names)
        self._header: Dict[str, Tuple[str, List[int]]] = {}   # key -> (stored dtype, shape): headers read once
        for f in self.files:
            try:
                header = {}
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        t = h.get_slice(k)
                        header[k] = (t.get_dtype(), list(t.get_shape()))
            except Exception as e:
                raise FormatError(f"{f}: not a readable safetensors file ({e})") from None
            for k in header:
                if k in self._where:   # the last file won: a stray copy beside the model was read in its place
                    raise FormatError(f"{path}: {k} is in two files, {os.path.basename(self._where[k])} and "
                                      f"{os.path.basename(f)}: keep one copy of the model in the folder")
                self._where[k] = f
            self._header.update(header)

    def keys(self) -> List[str]:
        return list(self._where)

    def has(self, key: str) -> bool:
        return key in self._where

    @functools.cached_property
    def may_tie_embeddings(self) -> bool:
        """A model folder whose config.json is a JSON object that does not set tie_word_embeddings to false
        (the edge decoder's test; read once)."""
        def refuse(constant):   # NaN / Infinity: not JSON (the edge decoder's parser refuses them)
            raise ValueError(constant)

        try:
            with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
                config = json.loads(f.read(), parse_constant=refuse)
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and config.get("tie_word_embeddings", True) is not False

    @functools.cached_property
    def may_hold_conv1d(self) -> bool:
        """Whether the folder's model may hold transformers' Conv1D layers (GPT-2's, stored in x out), told
        without building it (importing a model's code takes seconds): a model_type of config.json (sub-models'
        included) whose transformers modeling file mentions Conv1D (the module named as transformers names
        it). False for a bare file, a folder without a readable config.json, and types whose modeling file
        is not found (remote code: the layout then comes from the shape and the adapter's flag)."""
        try:
            with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return False
        types, todo = set(), [config]
        while todo:
            v = todo.pop()
            if isinstance(v, dict):
                if isinstance(v.get("model_type"), str):
                    types.add(v["model_type"])
                todo += v.values()
            elif isinstance(v, list):
                todo += v
        import importlib.util
        spec = importlib.util.find_spec("transformers")   # its folder, without importing it
        if spec is None or not spec.submodule_search_locations:
            return False
        models = os.path.join(spec.submodule_search_locations[0], "models")

        def source(name):
            path = os.path.join(models, name, f"modeling_{name}.py")
            return path if os.path.isfile(path) else None

        for t in types:
            path = source(t.replace("-", "_"))   # transformers' module name of most types
            if path is None:   # a few are named apart (openai-gpt: openai); transformers knows (an import, ~1 s)
                try:
                    from transformers.models.auto.configuration_auto import model_type_to_module_name
                    path = source(model_type_to_module_name(t))
                except Exception:   # noqa: BLE001  (an older or broken transformers: unknown)
                    path = None
            if path is None:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    if "Conv1D" in f.read():
                        return True
            except OSError:
                continue
        return False

    def get(self, key: str) -> torch.Tensor:
        return read_safetensors(self._where[key], [key])[key]

    def get_expert(self, key: str, parts: List[str], expert: int) -> torch.Tensor:
        """One expert's 2-D slice of a MoE block's 3-D parameter as the loaded model holds it (``expert_sources``):
        the concatenation of ``parts`` along dim 0 where transformers merges stored 2-D weights into it, else
        ``key[expert]`` (read alone, not the whole tensor)."""
        if parts:
            for k in parts[1:]:
                if self._header[k][0] != self._header[parts[0]][0]:
                    raise FormatError(f"{self.path}: {parts[0]} and {k} (merged into one expert's slice of {key}) are "
                                      "stored in different dtypes")
                first, other = self.shape(parts[0]), self.shape(k)
                if len(first) != 2 or len(other) != 2 or first[1] != other[1]:
                    raise FormatError(f"base weights {parts[0]} {tuple(first)} and {k} {tuple(other)} do not stack as "
                                      "rows: wrong base model?")
            return torch.cat([self.get(k) for k in parts])
        try:
            with safe_open(self._where[key], framework="pt") as f:
                return f.get_slice(key)[expert]
        except Exception as e:   # noqa: BLE001  (safetensors' own error types)
            raise FormatError(f"{self._where[key]}: not a readable safetensors file ({e})") from None

    def expert_sources(self, module: str, param: str) -> Tuple[str, List[List[str]]]:
        """Where the checkpoint holds the experts of a MoE block's 3-D parameter ``param`` of ``module`` (as the
        loaded model names them, matched like a module's weight): (its key, []) where the 3-D tensor is stored as
        such (GPT-OSS; expert e is key[e]), or (the loaded name, the stored keys of each expert) where transformers
        merges per-expert 2-D weights into it as it loads the model (Mixtral's ``experts.<e>.w1`` and ``w3``: expert
        e's slice is their concatenation along dim 0). FormatError where neither is found or the merge is another
        one; quantized weights are refused."""
        key = self._match(module, self._where, param)
        if key is None:
            key = self._renamed_key(module, param)
        if key is not None:
            self.refuse_quantized(key)
            if len(self._header[key][1]) != 3:
                raise FormatError(f"{self.path}: {key} has shape {tuple(self._header[key][1])}, not the 3-D experts x "
                                  "rows x columns of a MoE block's expert parameter")
            return key, []
        merges = self._merges
        name = self._match(module, merges, param) if merges else None
        packed = self._match(module, self._where, param + "_blocks")
        if name is None and packed is not None:   # GPT-OSS as released: MXFP4 blocks + scales
            raise FormatError(f"{self.path}: the experts' {param} is stored quantized ({packed}, MXFP4 blocks and "
                              "scales): subspace_ext needs the weights themselves: use a dequantized (bfloat16) copy "
                              "of the model (transformers: Mxfp4Config(dequantize=True), then save_pretrained)")
        if name is None:
            raise FormatError(f"{self.path}: no weight for the expert parameter {param} of {module} (is this the "
                              "adapter's base model? From a bare .safetensors file, experts that transformers merges "
                              "as it loads the model are not found: pass the model's folder)")
        if isinstance(merges[name], str):
            raise FormatError(f"{self.path}: transformers builds {name} from the stored weights with {merges[name]}; "
                              "only a stack of per-expert weights (each expert's the concatenation of its parts) is "
                              "supported")
        for part in merges[name]:
            for k in part:
                self.refuse_quantized(k)
        return name, merges[name]

    @functools.cached_property
    def _merges(self) -> Dict[str, Union[str, List[List[str]]]]:
        """{loaded name: the stored keys of each expert, in order} of the 3-D parameters transformers stacks from
        per-expert 2-D weights as it loads the model (``loaded_names``' None keys); a description of the
        conversion instead where it is not such a stack."""
        return self._conversions[1]

    def shape(self, key: str) -> List[int]:
        """A tensor's shape, from the file's header (no data read)."""
        return list(self._header[key][1])

    def key_for_module(self, module: str) -> str:
        """The weight key of a module path, matched on the longest common dotted suffix
        (peft's 'bert.encoder.layer.0...query' finds 'encoder.layer.0...query.weight'); else the one key
        that ends with the module's path (an adapter of a bare encoder, 'encoder.layer.0...query', on a
        task model's checkpoint, 'bert.encoder.layer.0...query.weight'). An output embedding tied to the
        input embedding (``tie_word_embeddings``: the checkpoint stores only the latter, e.g. a LLaMA's
        lm_head) gives the input embedding's key. The edge decoder (tools/solar_decode.cpp) has the same
        rules. Last, the names transformers gives the stored weights when it loads the model
        (``loaded_names``: peft names modules after the loaded model), by the same rules; the edge decoder
        has no transformers to ask, and takes the key the encoder recorded (its fingerprint checked)."""
        key = self._match(module, self._where)
        if key is None:
            tied = self._tied_input_embedding(module)
            key = self._find(tied, self._where) if tied else None
        if key is None:
            key = self._renamed_key(module)
            if key is not None:
                self.loaded_modules.add(module)
        if key is None:
            hint = ("; from a bare .safetensors file a module without a weight of its own (an output embedding tied "
                    "to the input one, such as a lm_head) is not found: pass the model's folder, whose config.json "
                    "tells" if os.path.isfile(self.path) else "")
            raise FormatError(f"{self.path}: no weight for adapted module {module} (is this the adapter's base "
                              f"model?{hint})")
        self.refuse_quantized(key)
        return key

    def _match(self, module: str, names, param: str = "weight") -> Optional[str]:
        """The name in ``names`` of ``module``'s weight (``param``): the longest common dotted suffix, else the
        one name that ends with the module's path (several: FormatError), else None."""
        key = self._find(f"{module}.{param}", names)
        if key is None:
            longer = [k for k in names if k.endswith(f".{module}.{param}")]
            if len(longer) > 1:
                raise FormatError(f"{self.path}: adapted module {module} matches several weights ({longer[0]}, "
                                  f"{longer[1]}{' ...' if len(longer) > 2 else ''}): is this the adapter's base model?")
            key = longer[0] if longer else None
        return key

    def _renamed_key(self, module: str, param: str = "weight") -> Optional[str]:
        """The stored key of ``module``'s ``param`` found by the name transformers loads it under (``_renamed``;
        a folder only), else None."""
        if os.path.isfile(self.path) or not self._renamed:
            return None
        name = self._match(module, self._renamed, param)
        return self._renamed[name] if name else None

    @functools.cached_property
    def _renamed(self) -> Dict[str, str]:
        """{loaded name: stored key} of the weights transformers loads under another name (``loaded_names``)."""
        return {name: k for k, name in self.loaded_names.items() if name is not None and name != k}

    @property
    def renames(self) -> bool:
        """Whether transformers loads any stored weight of this folder under another name (``loaded_names``)."""
        return bool(self._renamed)

    @functools.cached_property
    def loaded_names(self) -> Dict[str, Optional[str]]:
        """{stored key: the parameter's name in the model transformers loads from this folder}. transformers
        (5 and later) converts some architectures' checkpoints as it loads them: ViT's stored
        ``vit.encoder.layer.0.attention.attention.query`` is the loaded model's ``vit.layers.0.attention.q_proj``,
        Mixtral's ``block_sparse_moe.gate`` its ``mlp.gate`` (and it saves them back under the stored names),
        while peft names modules after the loaded model. None for a key a converter merges with others (Mixtral's
        per-expert ``w1`` / ``w3`` into one 3-D parameter): no module of its own. Every key maps to itself for a
        bare file, a model transformers cannot build (``skeleton``), or a transformers without conversions.
        Worked out the first time it is asked for, from the model built on the meta device."""
        return self._conversions[0]

    @functools.cached_property
    def _conversions(self) -> Tuple[Dict[str, Optional[str]], Dict[str, Union[str, List[List[str]]]]]:
        """(``loaded_names``, ``_merges``), from transformers' conversion mapping of the meta-built model."""
        same = {k: k for k in self._where}
        model = self.skeleton
        if model is None:
            return same, {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:   # transformers 4: no conversions on load
            return same, {}
        try:
            transforms = get_model_conversion_mapping(model)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if isinstance(t, WeightConverter)]
            meta = model.state_dict()
            names: Dict[str, Optional[str]] = {}
            sources: Dict[str, Dict[str, Dict[int, str]]] = {}   # loaded name -> source pattern -> expert -> key
            for k in sorted(self._where):   # in sorted order, as transformers renames (a group rename's guard first)
                name, merged = rename_source_key(k, renamings, converters, model.base_model_prefix, meta)
                names[k] = None if merged is not None else name
                hit = re.search(re.escape(merged).replace(r"\*", r"(\d+)") + "$", k) if merged else None
                if hit and hit.groups():   # a pattern of one wildcard is the expert's index; else not a stack
                    by = sources.setdefault(name, {}).setdefault(merged, {})
                    by[int(hit.group(1)) if len(hit.groups()) == 1 else -1 - len(by)] = k
            return names, {name: _stacked_experts(by, converters) for name, by in sources.items()}
        except Exception as e:   # noqa: BLE001  (another transformers' internals: the stored names only)
            _warn.warn(f"{self.path}: transformers' load-time renaming of this model's weights could not be worked "
                       f"out ({type(e).__name__}: {e}); the stored names are used")
            return same, {}

    def refuse_quantized(self, key: str) -> None:
        """FormatError for a weight not stored as floating-point numbers of 16 bits or more (read off the header)."""
        dtype = self._header[key][0]
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise FormatError(f"{self.path}: {key} is stored as {dtype}, not as the weight's floating-point numbers: a "
                              "quantized checkpoint (bitsandbytes / QLoRA, GPTQ, AWQ, FP8)? subspace_ext needs the "
                              "weights themselves: use the unquantized model's folder")

    @staticmethod
    def _find(name: str, names) -> Optional[str]:
        parts = name.split(".")
        return next((k for k in (".".join(parts[s:]) for s in range(len(parts) - 1)) if k in names), None)

    @functools.cached_property
    def skeleton(self) -> Optional[torch.nn.Module]:
        """The model of the folder's config.json, built on the meta device (no weights read or
        allocated) the first time it is asked for, for its module types and tied weights; None for a
        bare .safetensors file, and None with a warning where transformers cannot build it (e.g. a
        remote-code architecture)."""
        if not (os.path.isdir(self.path) and os.path.isfile(os.path.join(self.path, "config.json"))):
            return None
        import transformers
        try:
            config = transformers.AutoConfig.from_pretrained(self.path)
            arch = getattr(transformers, (config.architectures or [""])[0], None)
            with torch.device("meta"):
                return arch(config) if arch is not None else transformers.AutoModel.from_config(config)
        except Exception as e:
            _warn.warn(f"{self.path}/config.json: transformers cannot build this model ({e}); "
                       "its module types and tied weights are unknown")
            return None

    def _tied_input_embedding(self, module: str) -> Optional[str]:
        """For the model's output embedding when tied to its input embedding: the latter's weight name."""
        model = self.skeleton
        if model is None or not getattr(model.config, "tie_word_embeddings", False):
            return None
        names = {id(m): n for n, m in model.named_modules()}
        out_name = names.get(id(model.get_output_embeddings())) if hasattr(model, "get_output_embeddings") else None
        in_name = names.get(id(model.get_input_embeddings())) if hasattr(model, "get_input_embeddings") else None
        if not out_name or not in_name or not (module == out_name or module.endswith("." + out_name)
                                               or out_name.endswith("." + module)):
            return None
        return in_name + ".weight"

    def weight_kinds(self) -> Optional[Dict[str, str]]:
        """{parameter name: "linear" | "conv1d" | "other"} by the type of its module in ``skeleton``
        (a torch.nn.Linear's or transformers Conv1D's weight; biases and everything else "other")."""
        model = self.skeleton
        if model is None:
            return None
        kinds = {}
        for name, mod in model.named_modules():
            kind = {False: "linear", True: "conv1d", None: "other"}[linear_layout(mod)]
            if kind == "linear" and not _returns_a_tensor(mod):
                kind = "other"   # a Linear whose forward gives more (Llama4's router: scores and indices)
            for pname, _ in mod.named_parameters(recurse=False):
                kinds[f"{name}.{pname}" if name else pname] = kind if pname == "weight" else "other"
        return kinds


def _stacked_experts(by_pattern: Dict[str, Dict[int, str]], converters) -> Union[str, List[List[str]]]:
    """Each expert's stored keys, in the converter's source order, where transformers' converter stacks the experts'
    weights (MergeModulelist along dim 0), concatenating several per expert along their rows (Concatenate along dim
    1 of the stack); else the converter's operations, as text."""
    conv = next(c for c in converters if set(by_pattern) <= set(c.source_patterns))
    ops = [(type(o).__name__, getattr(o, "dim", None)) for o in conv.operations]
    patterns = [p for p in conv.source_patterns if p in by_pattern]
    experts = sorted(by_pattern[patterns[0]])
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or \
            len(patterns) != len(conv.source_patterns) or experts != list(range(len(experts))) or \
            any(sorted(by_pattern[p]) != experts for p in patterns):
        return " then ".join(f"{n}(dim={d})" for n, d in ops) + f" of {', '.join(conv.source_patterns)}"
    return [[by_pattern[p][e] for p in patterns] for e in experts]


def _returns_a_tensor(mod: torch.nn.Module) -> bool:
    """Whether a torch.nn.Linear (of a model built on the meta device) gives a tensor, as peft's LoRA on it needs
    (it adds its update to the output): a subclass that overrides forward (a MoE router that returns scores and
    indices: Llama4's, PhiMoE's) is run once on a meta input; one that cannot be run so counts as a Linear."""
    if type(mod).forward is torch.nn.Linear.forward:
        return True
    try:
        with torch.no_grad():
            out = mod(torch.empty(1, mod.in_features, device=mod.weight.device, dtype=mod.weight.dtype))
    except Exception:   # noqa: BLE001  (a forward that needs more than an input)
        return True
    return isinstance(out, torch.Tensor)


def fingerprint(t: torch.Tensor) -> str:
    """A short content hash of a tensor: dtype, shape and bytes (sha256, 16 hex digits)."""
    h = hashlib.sha256()
    h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():  # (an empty tensor has no bytes, and may have strides a byte view refuses)
        # the bytes as a buffer, not a copy (.tobytes() copied each weight: 2x the time of the hash)
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))  # 0-dim too
    return h.hexdigest()[:16]


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over a dict of tensors (names, dtypes, shapes, bytes), order-independent."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + b"\0" + fingerprint(tensors[k]).encode())
    return h.hexdigest()


def content_digest(tensors: Dict[str, torch.Tensor], meta: str) -> str:
    """sha256 over the tensors (``tensors_digest``) and a metadata string: any edit of either is caught
    (SOLAR packages, EigenLoRAx subspace and task files)."""
    return hashlib.sha256((tensors_digest(tensors) + "\n" + meta).encode()).hexdigest()
