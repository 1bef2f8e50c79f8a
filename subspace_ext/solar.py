"""SOLAR: post-training compression of a peft adapter into sparse coefficients over the base weight's bases.

For every adapted Linear with base weight W0 (m x n) and update ΔW = s·B·A:

1. Basis (``ops.solar_basis``): W0's singular vectors U, V (canonical signs), completed to bases of
   R^m and R^n with seeded random directions, optionally perturbed by ``eps`` and re-orthonormalised.
   The receiver regenerates the same bases from its copy of W0 and the seed: nothing about the
   basis travels except a 2-number checksum per layer.
2. Coefficients (``ops.project``): C = Uᵀ ΔW V = s (Uᵀ B)(A V), from the factors. The bases are
   orthonormal, so C is the least-squares fit and ‖C‖_F = ‖ΔW‖_F.
3. Budget: the globally largest |c| over all layers are kept (each kept coefficient stores a value
   and a flat index = 2 numbers); keeping the largest captures the most energy for the budget, so
   layers get budget in proportion to what they can capture.
4. Package: one safetensors file: the kept values (float32, float16, bfloat16, or int8 with
   per-layer scales) and their flat indices (int32), all layers' in three tensors (format version 4,
   the default; ``layout="layers"`` writes 2 to 4 tensors a layer, versions 1 to 3), the non-LoRA
   tensors of the adapter unchanged, and JSON metadata (format, seed, eps, peft config, per-layer
   shapes, base-weight fingerprints and basis checksums, errors).
5. Decoding (``ops.solar_decode``): U_I C_IJ V_Jᵀ refactored into a rank-r LoRA (r = the adapter's
   rank, via a factored SVD; ΔW is never formed), written as a standard peft folder.

``method`` picks each layer's encoding: ``"solar"`` (the above, the default), ``"lowrank"`` (ΔW's own
leading singular pairs, (m + n) numbers each: truncated SVD, no basis needed) or ``"auto"``: per layer
whichever keeps more of ΔW's energy for the numbers it gets, the budget split across layers and
encodings by one Lagrangian allocation. On the adapters we measured, ΔW is not aligned with W0's
singular directions and ``"auto"`` picks the low-rank encoding for most layers it stores at ratios of
0.05 and above, SOLAR coefficients below (README).

The paper (arXiv 2604.08368) describes the same ingredients (base singular vectors, controlled random
perturbation, sparse coefficients); its exact method section was not available to us, so the
defaults here (complete bases, eps = 0, global top-|c|) are the ones our measurements support.

Cost of the SOLAR encoding (not of "lowrank"): per layer a full SVD of W0 in float64 (on each side of
the link: the receiver regenerates it), bases of m² + n² float64 numbers and an m x n coefficient
matrix, one layer at a time. DESIGN.md's top-k bases with a k x k coefficient matrix would cost less;
complete bases are what lets any coefficient be kept. Measured on 2 CPU cores (a quiet machine): an r=8
adapter on 18 of MiniLM's Linears (its 12 FFN weights, 384 x 1536 and 1536 x 384, and 6 of 384 x 384),
ratio 0.1, compresses in 5.2 s with "solar" and 0.09 s with "lowrank", and decodes in 5.0 s and
0.08 s; nearly all of "solar"'s time is the bases (0.32 s for a 1536 x 384 weight, 0.61 s with
eps > 0); a 4096 x 11008 layer needs about 1.5 GB for its bases and coefficients.

Where W0's singular values are tied (gaps of at most 1e-8 x the largest), LAPACK's vectors are any
rotation of the tied ones, different on another library, thread count or device; ``solar_basis``
therefore resolves ties with the seed (a tied subspace's basis is the orthonormalised projection of
seeded probes; a numerical null space is left to the seeded completion), so a rank-deficient or
orthogonal base weight gives the receiver the sender's basis too (DESIGN.md's step 6 only asked for
the mismatch to be detected). Packages record this as basis rule 2 (BASIS_RULE); a package without
the field predates it, and its checksum failure says so.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import _warn, ops
from .io import (ADAPTER_CONFIG, BaseWeights, FormatError, LowRankUpdate, PeftAdapter, as_update_layout,
                 base_modifying_init, check_finite, embedding_lora_modules, fingerprint, nested_parameter,
                 prefix_rewrite, read_safetensors, refuse_layer_replication, safetensors_metadata, save_safetensors,
                 stack_experts, unnested)
from .io import content_digest as package_digest  # the package digest: tensors + the solar metadata
from .io import progress_bar as _progress

FORMAT = "subspace_ext.solar"
FORMAT_VERSION = 1           # packages whose layers are all SOLAR-encoded (readable by older builds)
FORMAT_VERSION_LOWRANK = 2   # packages with low-rank (truncated-SVD) layers
FORMAT_VERSION_INT8 = 3      # packages with int8-quantised values or factors (and their float32 scales)
FORMAT_VERSION_PACKED = 4    # layout "packed": every layer's stored numbers in three tensors (PACKED)
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_LOWRANK, FORMAT_VERSION_INT8, FORMAT_VERSION_PACKED)
# Layout "packed": all layers' values / factors (B then A, row-major), in layer order; all SOLAR layers'
# int32 indices; all int8 scales (a SOLAR layer's one, then B's t and A's t). A layer's extent follows
# from its kind, nnz and shape, so the header lists at most 3 tensors instead of 2 to 4 a layer.
PACKED = ("packed.values", "packed.indices", "packed.scales")
LAYOUTS = ("packed", "layers")
NUMBERS_PER_COEFFICIENT = 2  # value + index
METHODS = ("solar", "lowrank", "auto")
# dtype of the stored values; int8: symmetric absmax codes with a float32 scale per factor column / row
# (per SOLAR layer for coefficients), stored as "<tensor>_scale" and counted as stored numbers
STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
SCALE = "_scale"  # suffix of an int8 tensor's scales
_CHECKSUM_TOL = 1e-6
# How solar_basis builds a base weight's bases, saved as the package's "basis" field: 1 (a package
# without the field) = the singular vectors as LAPACK returned them, so the vectors of (nearly) tied
# singular values depended on the sender's library, thread count and device; 2 = ties and null spaces
# resolved with the seed (the same bases everywhere). Untied weights get the same bases under both
# rules, so this build decodes rule-1 packages of generic weights; a rule it does not know is refused
# before any other field is checked (a newer build's package may have other new fields). (The commits
# that resolved ties before this field existed never landed: a released build without it used rule 1.)
BASIS_RULE = 2
BASIS_RULES = (1, 2)
# The encoder keeps the columns of the layers' SOLAR bases that their candidate coefficients use (float64,
# at most m² + n² numbers a layer) while they fit in this many bytes; the others are regenerated (the
# same op on the same weight: the same bits) when the package is assembled. So compressing a 7B-shaped
# model holds one layer's bases at a time, not all.
BASIS_CACHE_BYTES = 1 << 30


class BaseMismatchError(ValueError):
    """The base model given to the decoder is not the one the package was made from."""


class _NewerBuildNeeded(FormatError):
    """A well-formed package that only a newer build decodes (SolarPackage.load adds the path)."""


# dtype names a package may give its decoded adapter (those the C++ decoder maps too)
_PACKAGE_DTYPES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16")


@dataclass
class LayerInfo:
    module: str            # peft module path, e.g. "bert.encoder.layer.0.attention.self.query"
    base_key: str          # weight key in the base checkpoint
    shape: List[int]       # [m, n]
    rank: int              # LoRA rank of the decoded layer
    scaling: float         # LoRA scaling of the decoded layer
    stream: int            # Philox stream of this layer's basis
    fingerprint: str       # of the base weight used
    checksum: List[float]  # of the used basis vectors
    nnz: int = 0
    energy: float = 0.0    # captured fraction of ‖ΔW‖²
    rel_error: float = 0.0  # ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of the decoded (rank-r) update
    lora_numbers: int = 0  # (m + n) * r of the original adapter
    fan_in_fan_out: bool = False  # the base weight is stored n x m (transformers' Conv1D): basis of its transpose
    kind: str = "solar"    # "solar": sparse coefficients over the bases; "lowrank": nnz factor pairs of ΔW
    renamed: bool = False  # module is the loaded model's name for base_key (transformers renames the stored
    #                        weights as it loads them: io.BaseWeights.loaded_names); a decoder takes base_key
    expert: int = -1       # >= 0: the layer is this expert's pair of a LoRA on a MoE block's 3-D expert parameter
    #                        (peft's target_parameters; io.expert_pairs); its base weight is base_key[expert], or
    experts: int = 0       # the concatenation of base_parts (per-expert weights transformers merges as it loads
    base_parts: List[str] = field(default_factory=list)  # the model); experts: how many the parameter holds


@dataclass
class SolarPackage:
    """A compressed adapter: per-layer sparse coefficients (or low-rank factors) + metadata (+ untouched
    extra tensors).

    Layer i of kind "solar" has ``values[i]`` / ``indices[i]``; of kind "lowrank" ``factors[i]`` =
    (B m x t, A t x n) with ``scaling * B @ A`` its update (and empty values/indices). Tensors stored as
    int8 have their float32 scales in ``scales``, under the tensor's package name ("layer.3.lora_B");
    ``stored_values`` / ``stored_factors`` give the numbers they stand for."""
    seed: int
    eps: float
    peft_config: dict
    layers: List[LayerInfo]
    values: List[torch.Tensor]
    indices: List[torch.Tensor]
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: str = "float32"  # dtype of the decoded adapter's tensors
    skipped: List[str] = field(default_factory=list)  # dense input: changed or new tensors not carried
    factors: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    scales: Dict[str, torch.Tensor] = field(default_factory=dict)
    basis: int = BASIS_RULE  # how the sender built the bases (BASIS_RULE); 1 for packages that predate it

    def __post_init__(self):
        if not self.factors:
            self.factors = [None] * len(self.layers)

    def _dequantized(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return _dequantize(t, self.scales[name]) if name in self.scales else t

    def stored_values(self, i: int) -> torch.Tensor:
        """Layer i's coefficient values as the numbers they stand for (int8 codes times their scale)."""
        return self._dequantized(f"layer.{i}.values", self.values[i])

    def stored_factors(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer i's low-rank factors (B, A) as the numbers they stand for."""
        B, A = self.factors[i]
        return self._dequantized(f"layer.{i}.lora_B", B), self._dequantized(f"layer.{i}.lora_A", A)

    def _value_names(self, i: int) -> Tuple[str, ...]:
        """The package names of layer i's stored values: its factors B, A, or its coefficient values."""
        return (f"layer.{i}.lora_B", f"layer.{i}.lora_A") if self.factors[i] is not None else (f"layer.{i}.values",)

    # -- sizes ---------------------------------------------------------------------------------
    def layer_numbers(self, i: int) -> int:
        """Numbers stored for layer i: 2 per coefficient, or the low-rank factors' elements (+ int8 scales)."""
        f = self.factors[i]
        names = self._value_names(i)
        scales = sum(self.scales[k].numel() for k in names if k in self.scales)
        return scales + (f[0].numel() + f[1].numel() if f is not None
                         else NUMBERS_PER_COEFFICIENT * self.values[i].numel())

    def numbers(self) -> int:
        """Stored numbers: coefficient values + indices (or low-rank factors) + extra tensors' elements."""
        return sum(self.layer_numbers(i) for i in range(len(self.layers))) + self.extra_numbers()

    def extra_numbers(self) -> int:
        return sum(t.numel() for t in self.extra.values())

    def notes(self) -> List[str]:
        """What the package does not compress, and an older build's basis rule, one line each (none for a
        plain LoRA of Linear layers made by this build)."""
        out = []
        if self.skipped:
            out.append(f"not carried (changed but not a Linear layer's weight, nor a MoE expert parameter, in the "
                       f"model transformers loads: biases, norms, embeddings, routers; or not in the base): "
                       f"{', '.join(self.skipped)}")
        embedded = embedding_lora_modules(self.extra)  # LoRA on embeddings travels in ``extra``
        if embedded:
            out.append(f"carried unchanged (LoRA on embeddings is not compressed): {', '.join(embedded)}")
        init = base_modifying_init(self.peft_config.get("init_lora_weights"))
        if init:
            out.append(f"init_lora_weights={init!r} (saved without peft's conversion): the factors hold that init, a "
                       "part of the base weight, plus the training, so the errors are of s B A, not of the fine-tune "
                       "alone; decode onto the original base, which peft initialises again when it loads the adapter")
        if self.basis == 1 and any(l.kind == "solar" and l.nnz > 0 for l in self.layers):
            out.append("made by an older build (basis rule 1): a base weight with tied singular values may not "
                       "give the sender's basis here; its layer then fails its checksum")
        return out

    def lora_numbers(self) -> int:
        """Numbers in the original adapter: (m + n) * r per layer + extra tensors."""
        return sum(l.lora_numbers for l in self.layers) + self.extra_numbers()

    def ratio(self) -> float:
        return self.numbers() / max(self.lora_numbers(), 1)

    def size_change(self) -> str:
        """The ratio in words: "10.0x fewer" (or "2.5x more" for a budget above the adapter's size)."""
        r = self.ratio()
        return "nothing stored" if r == 0 else f"{1 / r:.1f}x fewer" if r <= 1 else f"{r:.1f}x more"

    # -- files ---------------------------------------------------------------------------------
    def _tensors(self) -> Dict[str, torch.Tensor]:
        t = {}
        for i, (v, ix, f) in enumerate(zip(self.values, self.indices, self.factors)):
            if f is not None:
                t[f"layer.{i}.lora_B"], t[f"layer.{i}.lora_A"] = f[0].contiguous(), f[1].contiguous()
            else:
                t[f"layer.{i}.values"] = v.contiguous()
                t[f"layer.{i}.indices"] = ix.contiguous()
        for k, s in self.scales.items():
            t[k + SCALE] = s.contiguous()
        for k, v in self.extra.items():
            t[f"extra.{k}"] = v.contiguous()
        return t

    def _packed_tensors(self) -> Dict[str, torch.Tensor]:
        per = self._tensors()
        values, indices, scales = [], [], []
        for i, f in enumerate(self.factors):
            names = self._value_names(i)
            values += [per.pop(k).flatten() for k in names]
            scales += [per.pop(k + SCALE).flatten() for k in names if k + SCALE in per]
            if f is None:
                ix = per.pop(f"layer.{i}.indices")
                if ix.numel() and int(ix.max()) > torch.iinfo(torch.int32).max:
                    raise ValueError(f"layer {self.layers[i].module}: coefficient positions beyond int32 (a layer of "
                                     f"{math.prod(self.layers[i].shape)} entries): save it with layout='layers'")
                indices.append(ix.to(torch.int32))
        dtypes = {v.dtype for v in values}
        if len(dtypes) > 1:
            raise ValueError(f"the packed layout stores one dtype for all values, this package has "
                             f"{sorted(str(d) for d in dtypes)}: save it with layout='layers'")
        empty = torch.zeros(0, dtype=dtypes.pop() if dtypes else torch.float32)
        packed = {PACKED[0]: torch.cat([empty, *values]), PACKED[1]: torch.cat([torch.zeros(0, dtype=torch.int32),
                                                                               *indices])}
        if scales:
            packed[PACKED[2]] = torch.cat(scales)
        return {**packed, **per}  # per: the extra tensors

    def save(self, path: str, layout: str = "packed") -> int:
        """Write the package (one .safetensors file); returns its size in bytes. ``layout``: "packed"
        (format version 4: all layers' numbers in at most 3 tensors, the smallest header) or "layers" (2 to 4
        tensors a layer, format versions 1 to 3, for receivers with builds that predate version 4)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        tensors = self._tensors() if layout == "layers" else self._packed_tensors()
        # fan_in_fan_out, kind, renamed and the expert fields are written only where they differ from the default,
        # so packages without Conv1D, low-rank, renamed or MoE expert layers stay readable by builds that predate them
        defaults = {"fan_in_fan_out": False, "kind": "solar", "renamed": False, "expert": -1, "experts": 0,
                    "base_parts": []}
        layers = [{k: v for k, v in vars(l).items() if k not in defaults or v != defaults[k]} for l in self.layers]
        meta = {"seed": self.seed, "eps": self.eps, "dtype": self.dtype, "peft_config": self.peft_config,
                "layers": layers, "skipped": self.skipped}
        if self.basis != 1:  # rule 1 is the field's absence (builds that predate it ignore it)
            meta["basis"] = self.basis
        solar_meta = json.dumps(meta)
        version = (FORMAT_VERSION_PACKED if layout == "packed" else FORMAT_VERSION_INT8 if self.scales else
                   FORMAT_VERSION_LOWRANK if any(l.kind == "lowrank" for l in self.layers) else FORMAT_VERSION)
        save_safetensors(tensors, path, metadata={"format": FORMAT, "format_version": str(version),
                                                  "solar": solar_meta, "digest": package_digest(tensors, solar_meta)})
        return os.path.getsize(path)

    @classmethod
    def load(cls, path: str) -> "SolarPackage":
        """Read and verify a package; a truncated, damaged, malformed or foreign file raises FormatError."""
        if os.path.isdir(path):
            raise FormatError(f"{path} is a folder; expected a SOLAR package file (written by 'solar compress')")
        if not os.path.isfile(path):
            raise FormatError(f"{path}: no such file")
        meta = safetensors_metadata(path)
        if meta.get("format") != FORMAT:
            raise FormatError(f"{path}: not a SOLAR package (format {meta.get('format')!r})")
        if meta.get("format_version") not in map(str, FORMAT_VERSIONS):
            raise FormatError(f"{path}: package format version {meta.get('format_version')} is not "
                              f"supported (this build reads versions {', '.join(map(str, FORMAT_VERSIONS))})")
        tensors = read_safetensors(path)
        if package_digest(tensors, meta.get("solar", "")) != meta.get("digest"):
            raise FormatError(f"{path}: contents do not match the package digest (damaged)")
        try:
            info = json.loads(meta["solar"])
            _basis_rule(info)  # first: a package from a newer build is named as such
            if meta["format_version"] == str(FORMAT_VERSION_PACKED) and isinstance(info, dict) and isinstance(
                    info.get("layers"), list):  # (else _parse names the problem)
                tensors = _unpack(tensors, info)
            pkg = cls._parse(info, tensors)
        except _NewerBuildNeeded as e:
            raise FormatError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise FormatError(f"{path}: malformed package metadata ({e})") from None
        return pkg

    @classmethod
    def _parse(cls, info, tensors: Dict[str, torch.Tensor]) -> "SolarPackage":
        """The package from its metadata and tensors, every field's type checked as the C++ decoder checks
        it (the digest detects damage, not a deliberate edit with a recomputed digest)."""
        def need(obj, key, types, what=None):
            if key not in obj:
                raise KeyError(key)
            v = obj[key]
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                raise TypeError(f"{what or key} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
            return v

        if not isinstance(info, dict):
            raise TypeError("the solar metadata is not an object")
        raw_layers = need(info, "layers", (list,))
        config_rank = _config_rank(info.get("peft_config"))
        layers, values, indices, factors, scales = [], [], [], [], {}
        known = {f.name for f in dataclasses.fields(LayerInfo)}
        for i, l in enumerate(raw_layers):
            where = f"layer {i}: "
            if not isinstance(l, dict):
                raise TypeError(where + "not an object")
            unknown = set(l) - known
            if unknown:
                raise ValueError(where + f"unexpected field {sorted(unknown)[0]!r}")
            for key in ("module", "base_key", "fingerprint"):
                need(l, key, (str,), where + key)
            if not _module_path(l["module"]):
                raise ValueError(where + "module must be a dotted module path (no empty part, no control character)")
            shape = need(l, "shape", (list,), where + "shape")
            if not _is_shape(shape):
                raise ValueError(where + f"invalid shape {shape!r}")
            top = max(min(shape), config_rank)  # peft allows a LoRA rank above min(m, n)
            if not 1 <= need(l, "rank", (int,), where + "rank") <= top:
                raise ValueError(where + f"rank must be an integer in [1, {top}] for a {shape[0]} x {shape[1]} "
                                 "layer (the larger of min(m, n) and the peft config's largest rank)")
            if not 0 < need(l, "scaling", (int, float), where + "scaling") <= sys.float_info.max:
                raise ValueError(where + f"scaling must be a finite number > 0, got {l['scaling']!r}")
            ops._seed(need(l, "stream", (int,), where + "stream"), where + "stream")  # 64 bits, as the ops take
            if not all(isinstance(c, (int, float)) for c in need(l, "checksum", (list,), where + "checksum")):
                raise TypeError(where + "checksum must be a list of numbers")
            for flag in ("fan_in_fan_out", "renamed"):
                if flag in l:
                    need(l, flag, (bool,), where + flag)
            _parse_expert(l, where, need)
            kind = need(l, "kind", (str,), where + "kind") if "kind" in l else "solar"
            if kind == "lowrank":
                f = _parse_factors(tensors, i, shape, l["rank"], where, scales)
                v, ix, stored = torch.zeros(0), torch.zeros(0, dtype=torch.int32), f[0].shape[1]
            elif kind == "solar":
                f = None
                if len(l["checksum"]) != 2 or not all(math.isfinite(c) for c in l["checksum"]):
                    raise ValueError(where + f"checksum must be 2 finite numbers, got {l['checksum']!r}")
                v, ix = tensors[f"layer.{i}.values"], tensors[f"layer.{i}.indices"]
                if not (v.is_floating_point() or v.dtype == torch.int8) or v.dim() != 1:
                    raise TypeError(where + f"values must be a 1-D floating-point or int8 tensor, got {v.dtype} "
                                    f"{tuple(v.shape)}")
                _parse_scale(tensors, f"layer.{i}.values", v, (1,), where, scales)
                if ix.dtype not in (torch.int32, torch.int64) or ix.shape != v.shape:
                    raise TypeError(where + f"indices must be int32/int64 of the values' length, got {ix.dtype} "
                                    f"{tuple(ix.shape)}")
                stored = v.numel()
            else:
                raise ValueError(where + f"kind must be 'solar' or 'lowrank', got {kind!r}")
            if "nnz" in l and need(l, "nnz", (int,), where + "nnz") != stored:
                raise ValueError(where + f"nnz {l['nnz']} != the {stored} stored "
                                 + ("factor pairs" if kind == "lowrank" else "coefficients"))
            layers.append(LayerInfo(**l))
            values.append(v)
            indices.append(ix)
            factors.append(f)
        _check_experts(layers)
        seed = need(info, "seed", (int,))
        ops._seed(seed)  # 64 bits, as the ops take it (the C++ decoder reads the same range)
        eps = need(info, "eps", (int, float))
        peft_config = need(info, "peft_config", (dict,))
        for key in ("r", "lora_alpha", "init_r"):
            if key in peft_config:
                need(peft_config, key, (int, float), f"peft_config {key}")
        if not _strict_json(peft_config):  # it becomes adapter_config.json, where NaN / Infinity are not JSON
            raise ValueError("peft_config holds NaN or Inf (not valid JSON in an adapter config)")
        dtype = need(info, "dtype", (str,)) if "dtype" in info else "float32"
        if dtype not in _PACKAGE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_PACKAGE_DTYPES)}")
        skipped = need(info, "skipped", (list,)) if "skipped" in info else []
        basis = _basis_rule(info)
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        check_finite(extra, "extra")
        decoded = {_factor_key(l.module, side) for l in layers for side in "AB"}
        clash = sorted(decoded.intersection(extra))
        if clash:   # it would replace the decoded factor in the adapter
            raise ValueError(f"extra: tensor {clash[0]} is a LoRA factor the package decodes")
        return cls(seed, eps, peft_config, layers, values, indices, extra, dtype, skipped, factors, scales, basis)

    # -- report --------------------------------------------------------------------------------
    def encodings(self) -> str:
        """How many layers use each encoding, in words: "12 SOLAR layers", "3 SOLAR + 9 low-rank layers",
        "1 SOLAR + 11 empty layers" (a layer the budget gave nothing: its update decodes to zero)."""
        empty = sum(l.nnz == 0 for l in self.layers)
        low = sum(l.kind == "lowrank" and l.nnz > 0 for l in self.layers)
        counts = ((len(self.layers) - low - empty, "SOLAR"), (low, "low-rank"), (empty, "empty"))
        return " + ".join(f"{n} {name}" for n, name in counts if n) + " layers"

    def storage(self) -> str:
        """The dtype(s) the coefficients / factors are stored in ("float32", "float16", ...)."""
        dts = {t.dtype for i, f in enumerate(self.factors)
               for t in (f if f is not None else (self.values[i],))}
        return "/".join(sorted(str(d).replace("torch.", "") for d in dts)) or "float32"

    def summary(self) -> str:
        """Per-layer table (sizes, captured energy, relative error) and totals, as markdown."""
        # "original": the LoRA's r (m + n) numbers, or m·n for a dense fine-tune's delta (compress_dense)
        rows = ["| layer | shape | rank | encoding | numbers | original numbers | energy | rel. error |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i, l in enumerate(self.layers):
            enc = f"rank-{l.nnz} factors" if l.kind == "lowrank" else f"{l.nnz} coefficients"
            name = l.module + (f" (expert {l.expert})" if l.expert >= 0 else "")
            rows.append(f"| {name} | {l.shape[0]}×{l.shape[1]} | {l.rank} | {enc} | "
                        f"{self.layer_numbers(i)} | {l.lora_numbers} | {100 * l.energy:.2f}% | "
                        f"{l.rel_error:.4f} |")
        errs = [l.rel_error for l in self.layers]
        rows.append("")
        rows.append(f"layers: {len(self.layers)}; extra tensors: {len(self.extra)} ({self.extra_numbers()} numbers); "
                    f"stored numbers {self.numbers()} vs original {self.lora_numbers()} "
                    f"(ratio {self.ratio():.4f}, {self.size_change()}); "
                    f"mean rel. error {sum(errs) / max(len(errs), 1):.4f}; seed {self.seed}, eps {self.eps}; "
                    f"{self.encodings()}, stored as {self.storage()}")
        rows += self.notes()
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# helpers

def _as_adapter(adapter: Union[str, PeftAdapter]) -> PeftAdapter:
    return adapter if isinstance(adapter, PeftAdapter) else PeftAdapter.load(adapter)


def _as_base(base: Union[str, BaseWeights]) -> BaseWeights:
    return base if isinstance(base, BaseWeights) else BaseWeights(base)


def _lowrank_rel_error(B1, A1, s1, B2, A2, s2) -> float:
    """‖s1 B1 A1 − s2 B2 A2‖_F / ‖s1 B1 A1‖_F from the factors (float64)."""
    B1, A1, B2, A2 = (t.double() for t in (B1, A1, B2, A2))
    inner = lambda Bx, Ax, By, Ay: float(((Bx.T @ By) * (Ax @ Ay.T)).sum())  # noqa: E731  <BxAx, ByAy>
    n11 = s1 * s1 * inner(B1, A1, B1, A1)
    n22 = s2 * s2 * inner(B2, A2, B2, A2)
    n12 = s1 * s2 * inner(B1, A1, B2, A2)
    return math.sqrt(max(n11 - 2 * n12 + n22, 0.0)) / math.sqrt(n11) if n11 > 0 else 0.0


def relative_errors(original: Union[str, PeftAdapter], restored: Union[str, PeftAdapter],
                    base: Optional[Union[str, BaseWeights]] = None) -> List[float]:
    """Per layer ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F between two LoRA adapters of the same layers (from the factors;
    ΔW is never formed), e.g. an adapter and its decompressed or truncated-SVD version, in the original's order.
    LoRA on a MoE block's expert parameters (peft's target_parameters) counts one layer per expert, its update
    s·B_e·A_e, which takes ``base`` (the base model's folder or file): how many experts the parameter holds, and
    which parameter each of several nested wrappers adapts. Without it, LoRA on a parameter other than ``weight``
    is refused by name, and a MoE block's 3-D ``weight`` (JetMoe's) is not told from a 2-D one: pass the base.
    Layers of rank 0 (AdaLoRA's pruned ones, which SOLAR does not carry) are left out on both sides."""
    ads = (_as_adapter(original), _as_adapter(restored))
    if base is None:
        a, b = ([u for u in ad.updates() if u.A.shape[0] > 0] for ad in ads)
    else:
        bw = _as_base(base)
        a, b = ([u for u, _ in _layer_updates(ad, bw, [u for u in ad.updates(experts=True) if u.A.shape[0] > 0])]
                for ad in ads)
    name = lambda u: u.module + (f" (expert {u.expert})" if u.expert >= 0 else "")  # noqa: E731
    ours = {name(v): v for v in b}
    theirs = [name(u) for u in a]
    if len(ours) != len(b) or len(set(theirs)) != len(a) or set(ours) != set(theirs):
        odd = [n for n in theirs if n not in ours][:1] or [n for n in ours if n not in set(theirs)][:1]
        raise ValueError("the two adapters do not adapt the same layers"
                         + (f" ({odd[0]} is in only one of them)" if odd else " (a layer is in one of them twice)"))
    return [_lowrank_rel_error(u.B, u.A, u.scaling, v.B, v.A, v.scaling) for u, v in ((u, ours[name(u)]) for u in a)]


def _base_weight(bw: BaseWeights, module: str, shape, what: str, fan_in_fan_out: bool,
                 either: bool = False, kinds: Optional[Dict[str, str]] = None) -> (str, torch.Tensor, bool):
    """The base weight's key, the weight as stored (fingerprints are taken as stored) and whether it
    is stored transposed (n x m, transformers' Conv1D); its m x n view is ``as_update_layout``.

    ``either`` (the encoder): peft decides the layout per module type, so one adapter of a GPT-2 can
    hold Conv1D and Linear layers (e.g. lm_head) under one config flag, which holds peft's last choice.
    The module's type in ``kinds`` (``BaseWeights.weight_kinds``) decides; without it (a bare file, or a
    model that holds no Conv1D) or where it does not know the key, a non-square weight stored the other
    way round than ``fan_in_fan_out`` says is accepted as such, and a square one takes the flag. The
    decoder is strict: it uses the layout recorded per layer."""
    key = bw.key_for_module(module)
    W0 = bw.get(key)
    m, n = shape
    stored = (n, m) if fan_in_fan_out else (m, n)
    kind = _kind_in(module + ".weight" if module in bw.loaded_modules else key, kinds) if either else None
    if kind in ("linear", "conv1d"):
        fan_in_fan_out = kind == "conv1d"
    elif either and m != n and tuple(W0.shape) == (stored[1], stored[0]):
        fan_in_fan_out = not fan_in_fan_out
    return key, _base_weight_at(bw, key, shape, what, fan_in_fan_out, W0), fan_in_fan_out


def _base_weight_at(bw: BaseWeights, key: str, shape, what: str, fan_in_fan_out: bool,
                    W0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The base weight ``key`` (``W0`` when already read), its stored shape and values checked."""
    W0 = bw.get(key) if W0 is None else W0
    m, n = shape
    stored = (n, m) if fan_in_fan_out else (m, n)
    if tuple(W0.shape) != stored:
        layout = " (stored in x out, as transformers' Conv1D)" if fan_in_fan_out else ""
        raise BaseMismatchError(f"{what}: base weight {key} has shape {tuple(W0.shape)} but the update "
                                f"({m} out x {n} in) needs {stored}{layout}: wrong base model?")
    _check_finite_base(W0, key)
    return W0


def _check_finite_base(W0: torch.Tensor, key: str) -> None:
    if W0.is_floating_point() and not torch.isfinite(W0).all():
        raise ValueError(f"base weight {key} contains NaN or Inf")


def _check_request(budget, ratio, seed, eps, method="solar", storage=None) -> None:
    """Refuse bad arguments before any basis is computed (seconds per layer on a large model)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if storage is not None and storage not in STORAGE:
        raise ValueError(f"storage must be one of {', '.join(map(repr, STORAGE))}, got {storage!r}")
    if ratio is not None:
        if budget is not None:
            raise ValueError("give either budget or ratio, not both")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < math.inf:
            raise ValueError(f"ratio must be a finite number > 0, got {ratio!r}")
    else:
        _resolve_budget(budget, 0)
    ops._seed(seed)
    ops._check_eps(eps)


def _resolve_budget(budget, candidates: int) -> Optional[int]:
    """Number of coefficients to keep (None = all) for a budget in numbers or 'full'."""
    if budget == "full":
        return None
    if budget is None:
        raise ValueError("give a budget (numbers to store, or 'full') or a ratio")
    if (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget)
            or budget < NUMBERS_PER_COEFFICIENT):
        raise ValueError(f"budget must be 'full' or a finite number >= {NUMBERS_PER_COEFFICIENT}, got {budget!r}")
    return min(int(budget) // NUMBERS_PER_COEFFICIENT, candidates)


def _is_shape(shape) -> bool:
    """A layer's metadata shape: a list of two ints >= 1 (m out, n in)."""
    return (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape))


# A layer's rank may exceed min(m, n) (peft allows it; the update's rank is min(m, n) at most) up to
# the config's largest rank, counted to at most this: a package of a few KB must not make the decoder
# allocate gigabytes of zero padding (rank 2^21 on 384 x 384 layers: 1.6 GB).
MAX_RANK_ABOVE_SHAPE = 4096


def _config_rank(config) -> int:
    """The largest LoRA rank a peft config names (r, AdaLoRA's init_r, rank_pattern values), at most
    MAX_RANK_ABOVE_SHAPE; 0 if none."""
    if not isinstance(config, dict):
        return 0
    pattern = config.get("rank_pattern")
    ranks = [config.get("r"), config.get("init_r"), *(pattern.values() if isinstance(pattern, dict) else ())]
    return min(MAX_RANK_ABOVE_SHAPE, max([r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0],
                                         default=0))


def _basis_rule(info) -> int:
    """The package's BASIS_RULE (1 where the field is absent); one this build does not know raises
    _NewerBuildNeeded, a non-integer TypeError (malformed), as the C++ decoder does."""
    if not isinstance(info, dict) or "basis" not in info:
        return 1  # (a non-object is _parse's to name)
    basis = info["basis"]
    if isinstance(basis, bool) or not isinstance(basis, int):
        raise TypeError(f"basis must be int, got {basis!r}")
    if basis not in BASIS_RULES:
        known = ", ".join(map(str, BASIS_RULES))
        raise _NewerBuildNeeded(f"basis rule {basis} is unknown to this build (it knows {known}): a package from a "
                                "newer subspace_ext (update this one to decode it), or an edited one")
    return basis


def _parse_expert(l: dict, where: str, need: Callable) -> None:
    """A package layer's MoE expert fields (``LayerInfo.expert``, ``experts``, ``base_parts``), checked."""
    expert = need(l, "expert", (int,), where + "expert") if "expert" in l else -1
    experts = need(l, "experts", (int,), where + "experts") if "experts" in l else 0
    for key, v in (("expert", expert), ("experts", experts)):
        if not -1 <= v <= 2 ** 62:   # the C++ decoder's range
            raise ValueError(where + f"{key} must be int, got a number out of range")
    if not (expert == -1 and experts == 0 or 0 <= expert < experts):
        raise ValueError(where + f"expert {expert} of {experts} experts: an expert layer needs 0 <= expert < experts, "
                         "any other layer neither field")
    parts = need(l, "base_parts", (list,), where + "base_parts") if "base_parts" in l else []
    if parts and (expert < 0 or not all(isinstance(p, str) and p for p in parts)):
        raise ValueError(where + "base_parts must be base weight names, and only on an expert layer")


def _check_experts(layers: List[LayerInfo]) -> None:
    """Each module's layers are one plain layer, or its experts 0 .. E-1 once each with the same E, shape, rank,
    scaling and layout (their pairs are stacked into one LoRA: io.stack_experts)."""
    groups: Dict[str, List[LayerInfo]] = {}
    for l in layers:
        groups.setdefault(l.module, []).append(l)
    for module, ls in groups.items():
        if len(ls) == 1 and ls[0].expert < 0:
            continue
        first = ls[0]
        if len(ls) != first.experts or sorted(l.expert for l in ls) != list(range(len(ls))) or any(
                (l.experts, l.shape, l.rank, l.scaling, l.fan_in_fan_out) !=
                (first.experts, first.shape, first.rank, first.scaling, first.fan_in_fan_out) for l in ls):
            raise ValueError(f"module {module}: {len(ls)} layers, not one, nor experts 0 .. E-1 once each of one "
                             "shape, rank, scaling and layout")


def _unpack(tensors: Dict[str, torch.Tensor], info) -> Dict[str, torch.Tensor]:
    """A packed package's tensors under the per-layer names ("layer.3.lora_B", ...), each layer's share
    cut by its kind, nnz and shape (``_parse`` then checks them as for the per-layer layout)."""
    unexpected = sorted(k for k in tensors if k not in PACKED and not k.startswith("extra."))
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]!r} in a packed package")
    for name in PACKED[:2]:
        if name not in tensors:
            raise KeyError(name)
    values, indices, scales = tensors[PACKED[0]], tensors[PACKED[1]], tensors.get(PACKED[2])
    if values.dim() != 1 or not (values.is_floating_point() or values.dtype == torch.int8):
        raise TypeError(f"{PACKED[0]} must be a 1-D floating-point or int8 tensor, got {values.dtype} "
                        f"{tuple(values.shape)}")
    if indices.dim() != 1 or indices.dtype != torch.int32:
        raise TypeError(f"{PACKED[1]} must be a 1-D int32 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if (scales is not None) != (values.dtype == torch.int8):
        raise ValueError(f"{PACKED[2]} must be present exactly when {PACKED[0]} is int8 (it is {values.dtype}, "
                         f"scales {'present' if scales is not None else 'absent'})")
    if scales is not None and (scales.dim() != 1 or scales.dtype != torch.float32):
        raise TypeError(f"{PACKED[2]} must be a 1-D float32 tensor, got {scales.dtype} {tuple(scales.shape)}")
    out = {k: v for k, v in tensors.items() if k.startswith("extra.")}
    at = {name: 0 for name in PACKED}

    def take(name: str, shape, where: str):
        t, count = tensors[name], math.prod(shape)
        if at[name] + count > t.numel():
            raise ValueError(f"{where}{name} ends before this layer's {count} numbers (it holds {t.numel()}): "
                             "nnz or shape edited, or a damaged package")
        at[name] += count
        return t[at[name] - count: at[name]].reshape(shape)

    for i, l in enumerate(info["layers"]):
        where = f"layer {i}: "
        if not isinstance(l, dict):
            raise TypeError(where + "not an object")
        kind, nnz, shape = l.get("kind", "solar"), l.get("nnz"), l.get("shape")
        if kind not in ("solar", "lowrank"):
            raise ValueError(where + f"kind must be 'solar' or 'lowrank', got {kind!r}")
        if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
            raise ValueError(where + f"nnz must be an integer >= 0 in a packed package, got {nnz!r}")
        if not _is_shape(shape):
            raise ValueError(where + f"invalid shape {shape!r}")
        m, n = shape
        parts = ({"lora_B": ((m, nnz), (1, nnz)), "lora_A": ((nnz, n), (nnz, 1))} if kind == "lowrank"
                 else {"values": ((nnz,), (1,))})
        for part, (shape_v, shape_s) in parts.items():
            out[f"layer.{i}.{part}"] = take(PACKED[0], shape_v, where)
            if scales is not None:
                out[f"layer.{i}.{part}{SCALE}"] = take(PACKED[2], shape_s, where)
        if kind != "lowrank":
            out[f"layer.{i}.indices"] = take(PACKED[1], (nnz,), where)
    for name in PACKED:
        if name in tensors and at[name] != tensors[name].numel():
            raise ValueError(f"{name} holds {tensors[name].numel()} numbers, the layers use {at[name]}: nnz or "
                             "shape edited, or a damaged package")
    return out


def _parse_factors(tensors: Dict[str, torch.Tensor], i: int, shape, rank: int, where: str,
                   scales: Dict[str, torch.Tensor]):
    """A low-rank layer's stored factors (B m x t, A t x n, 0 <= t <= rank), checked; the scales of int8
    factors go to ``scales``."""
    B, A = tensors[f"layer.{i}.lora_B"], tensors[f"layer.{i}.lora_A"]
    m, n = shape
    if not all(x.is_floating_point() or x.dtype == torch.int8 for x in (B, A)) or B.dim() != 2 or A.dim() != 2:
        raise TypeError(where + f"lora_B and lora_A must be 2-D floating-point or int8 tensors, got {B.dtype} "
                        f"{tuple(B.shape)} and {A.dtype} {tuple(A.shape)}")
    t = B.shape[1]
    if B.shape[0] != m or tuple(A.shape) != (t, n) or t > rank:
        raise ValueError(where + f"low-rank factors {tuple(B.shape)} and {tuple(A.shape)} do not fit a {m} x {n} "
                         f"layer of rank {rank} (need {m} x t and t x {n}, t <= {rank})")
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise ValueError(where + "low-rank factors contain NaN or Inf")
    _parse_scale(tensors, f"layer.{i}.lora_B", B, (1, t), where, scales)
    _parse_scale(tensors, f"layer.{i}.lora_A", A, (t, 1), where, scales)
    return B, A


def _parse_scale(tensors: Dict[str, torch.Tensor], name: str, t: torch.Tensor, shape, where: str,
                 scales: Dict[str, torch.Tensor]) -> None:
    """An int8 tensor's scales (float32 of ``shape``, finite, >= 0), checked, into ``scales``."""
    if t.dtype != torch.int8:
        return
    key = name + SCALE
    if key not in tensors:
        raise ValueError(where + f"int8 tensor {name} has no scales ({key})")
    s = tensors[key]
    if s.dtype != torch.float32 or tuple(s.shape) != tuple(shape):
        raise ValueError(where + f"{key} must be float32 of shape {tuple(shape)}, got {s.dtype} {tuple(s.shape)}")
    if not (torch.isfinite(s).all() and (s >= 0).all()):
        raise ValueError(where + f"{key} must be finite and >= 0")
    scales[name] = s


def _quantize(x: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` and their float32 scales (absmax / 127 over ``dim``, kept as a size-1
    dimension so that codes * scales broadcasts): x ≈ codes * scales, each code within ±127."""
    amax = (x.abs().amax(dim=dim, keepdim=True) if x.shape[dim]
            else x.new_zeros(x.shape[:dim] + (1,) + x.shape[dim + 1:]))
    scale = (amax.double() / 127).float()
    codes = torch.round(x.double() / torch.where(scale > 0, scale, 1).double()).clamp_(-127, 127)
    return codes.to(torch.int8), scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What int8 codes stand for: codes * scales, in float32 (the C++ decoder computes the same)."""
    return codes.to(torch.float32) * scale


def _pad_factors(B: torch.Tensor, A: torch.Tensor, rank: int):
    """Low-rank factors (m x t, t x n) as a rank-``rank`` LoRA pair in float32 (zero pairs after t)."""
    Bp = torch.zeros(B.shape[0], rank, dtype=torch.float32)
    Ap = torch.zeros(rank, A.shape[1], dtype=torch.float32)
    Bp[:, : B.shape[1]] = B
    Ap[: A.shape[0]] = A
    return Bp, Ap


@dataclass
class _Layer:
    """One layer being compressed: what its encodings need, computed by the compressors."""
    info: LayerInfo
    err: Callable                        # (B2, A2, s2) -> ‖ΔW − s2 B2 A2‖ / ‖ΔW‖
    energy: float                        # ‖ΔW‖²
    top: Optional[tuple] = None          # solar: C = Uᵀ ΔW V's largest coefficients (|c| descending) and
    #                                      their flat positions: as many as the budget could keep, not C
    basis: Optional[Callable] = None     # solar: positions -> (U, V, positions) to decode them (_Bases.keep)
    svd: Optional[tuple] = None          # lowrank: (U, S, V) of ΔW's leading singular pairs, float64
    pair_scales: int = 0                 # lowrank: scale numbers a pair stores besides its m + n (int8: 2)
    dominated_at: Optional[int] = None   # auto, a LoRA layer: SOLAR counts from here cost at least its r pairs,
    #                                      which keep all of ΔW: its candidates stop here (_undominated)

    def gains(self, kind: str) -> torch.Tensor:
        """Energy of each item of an encoding, descending (a coefficient's c², a pair's σ²)."""
        if kind == "solar":
            return self.top[0] ** 2
        return self.svd[1].double() ** 2

    def set_solar(self, U: torch.Tensor, V: torch.Tensor, C: torch.Tensor, cap: Optional[int], bases: "_Bases",
                  regenerate: Callable, floor: float = 0.0) -> None:
        """Keep what the SOLAR encoding needs of C = Uᵀ ΔW V: its energy and its ``cap`` largest
        coefficients (None: all) of magnitude at least ``floor`` (method "solar": the threshold the earlier
        layers' candidates set, which only rises, so those below it would be dropped anyway), before the
        cache sizes their basis columns; C itself and (past the cache) the bases are let go."""
        self.energy = float((C * C).sum())  # ‖C‖ = ‖ΔW‖ (orthonormal bases)
        self.top = _top_coefficients(C, cap)
        if floor > 0:
            self.cut(floor)
        self.basis = bases.keep(U, V, self.top[1], regenerate)

    def cut(self, threshold: float) -> bool:
        """Drop the candidates below ``threshold`` (a suffix: they are sorted by |c|); whether any went."""
        n = int((self.top[0].abs() >= threshold).sum())
        if n == self.top[0].numel():
            return False
        self.top = (self.top[0][:n].clone(), self.top[1][:n].clone())
        return True

    def cost(self, kind: str) -> int:
        """Numbers one item of an encoding stores."""
        return NUMBERS_PER_COEFFICIENT if kind == "solar" else sum(self.info.shape) + self.pair_scales


def _top_coefficients(C: torch.Tensor, cap: Optional[int]) -> (torch.Tensor, torch.Tensor):
    """The ``cap`` (None: all) largest-magnitude entries of C, descending, and their flat positions.
    A layer never keeps more coefficients than the budget holds, so the allocation over these is the
    allocation over all of C: a layer keeps a prefix by |c| whatever the other layers do."""
    flat = C.flatten()
    k = flat.numel() if cap is None else min(max(cap, 0), flat.numel())
    positions = torch.topk(flat.abs(), k, sorted=True).indices
    return flat[positions], positions


class _Bases:
    """Which layers' SOLAR bases stay in memory until the package is assembled: of the first ones that
    fit in ``limit`` bytes, the columns the layer's candidate coefficients use (the decode reads only
    the kept coefficients' columns, which are among them); a layer past it gets ``regenerate`` instead."""

    def __init__(self, limit: int):
        self.left = limit

    def keep(self, U: torch.Tensor, V: torch.Tensor, candidates: torch.Tensor, regenerate: Callable):
        """positions -> (U, V, positions) for ``solar_decode`` of kept positions (flat in C = Uᵀ ΔW V),
        with ``trim(candidates)`` for fewer candidates."""
        I, J = _columns_of(candidates, V.shape[1])
        size = (U.shape[0] * I.numel() + V.shape[0] * J.numel()) * U.element_size()
        if size > self.left:   # sized before anything is copied
            return _Regenerated(regenerate)
        self.left -= size
        return _Columns(U, V, I, J, self)


def _columns_of(positions: torch.Tensor, k2: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The columns of U and of V (sorted, distinct) that flat positions in a k1 x k2 C = Uᵀ ΔW V use."""
    return torch.unique(positions // k2), torch.unique(positions % k2)


class _Columns:
    """A layer's cached basis columns: those of U and V that its candidate coefficients use."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, I: torch.Tensor, J: torch.Tensor, pool: _Bases):
        self.k2, self.I, self.J, self.pool = V.shape[1], I, J, pool
        self.U = U if I.numel() == U.shape[1] else U[:, I].contiguous()   # every column: no copy
        self.V = V if J.numel() == V.shape[1] else V[:, J].contiguous()

    def nbytes(self) -> int:
        return (self.U.numel() + self.V.numel()) * self.U.element_size()

    def trim(self, candidates: torch.Tensor) -> None:
        """Keep the columns of fewer candidates (a subset), and give the bytes back to the pool."""
        I, J = _columns_of(candidates, self.k2)
        before = self.nbytes()
        self.U = self.U[:, torch.searchsorted(self.I, I)].contiguous()
        self.V = self.V[:, torch.searchsorted(self.J, J)].contiguous()
        self.I, self.J = I, J
        self.pool.left += before - self.nbytes()

    def __call__(self, positions: torch.Tensor):
        # the same columns in the same order: the decode's bits are the same
        i, j = torch.searchsorted(self.I, positions // self.k2), torch.searchsorted(self.J, positions % self.k2)
        return self.U, self.V, i * self.J.numel() + j


class _Regenerated:
    """A layer's bases past the cache (or the decoder's): built from the weight when its coefficients are
    decoded."""

    def __init__(self, regenerate: Callable):
        self.regenerate = regenerate

    def trim(self, candidates: torch.Tensor) -> None:
        pass

    def __call__(self, positions: torch.Tensor):
        return (*self.regenerate(), positions)


def _prune_candidates(layers: List[_Layer], keep: Optional[int], floor: float = 0.0) -> float:
    """Method "solar" keeps the ``keep`` largest |c| of all layers: drop every candidate below the
    ``keep``-th largest so far (that threshold only rises), so the candidates of all layers together
    stay within about 2 x ``keep`` (ties at the threshold are kept). Returns the threshold (else ``floor``)."""
    if keep is None or sum(l.top[0].numel() for l in layers) <= 2 * keep:  # prune once they have doubled:
        return floor                                                         # O(total) work a time
    threshold = torch.topk(torch.cat([l.top[0].abs() for l in layers]), max(keep, 1), sorted=False).values.min()
    for l in layers:
        if l.cut(threshold):
            l.basis.trim(l.top[1])
    return float(threshold)


def _coefficient_cap(budget, ratio, numbers: int) -> Optional[int]:
    """The most coefficients a budget can keep (None: all) when the adapter stores at most ``numbers``."""
    if ratio is not None:
        return int(ratio * numbers) // NUMBERS_PER_COEFFICIENT
    return None if budget == "full" else int(budget) // NUMBERS_PER_COEFFICIENT


def _encodings(method: str):
    # auto: on a tie (a layer that gets nothing) the low-rank encoding, whose decoder needs no basis
    return ("lowrank", "solar") if method == "auto" else (method,)


def _allocate(layers: List[_Layer], keep_numbers: Optional[float], method: str,
              solar_fixed: int = 0) -> List[Tuple[str, int]]:
    """(kind, items kept) per layer under ``keep_numbers`` (None = lossless), maximising the captured energy.

    Items within a layer's encoding have equal cost and falling gain, so a layer keeps a prefix. One
    Lagrange multiplier λ prices a stored number: each layer takes the encoding and count maximising
    energy − λ·numbers; λ is bisected to the smallest price that fits the budget, and what the budget
    has left is filled greedily with the next items of the chosen encodings (by gain per number).
    With both encodings the per-layer curve is not concave, so "auto" also allocates each encoding
    alone and keeps whichever of the three captures the most (of plans equal to rounding, the one with the
    fewest numbers): never less than either method. Exact
    optimality is a multiple-choice knapsack; measured against it (tests), this keeps ≥ 98% of the
    optimum's energy when the budget holds a few low-rank pairs, less when it holds only one or two.

    ``solar_fixed``: numbers a layer stores once when it takes SOLAR (its int8 scale) under "auto": a plan
    with SOLAR is allocated with one per layer reserved, then again with one per layer it made SOLAR (the
    low-rank-alone plan reserves none), so auto never keeps less than low-rank alone."""
    kinds = _encodings(method)
    if keep_numbers is None:  # lossless: every item of the cheapest lossless encoding
        kind = "lowrank" if "lowrank" in kinds else "solar"
        return [(kind, int(l.gains(kind).numel())) for l in layers]
    gains = [{k: l.gains(k) for k in kinds} for l in layers]
    alone = [(k,) for k in kinds] if len(kinds) > 1 else []
    fixed = lambda plan: solar_fixed * sum(k == "solar" for k, _ in plan)  # noqa: E731

    def plan_for(ks):
        if not solar_fixed or "solar" not in ks:
            return _lagrangian(layers, keep_numbers, ks, gains)
        reserved = solar_fixed * len(layers)
        if keep_numbers - reserved < NUMBERS_PER_COEFFICIENT:
            return None   # no room for a coefficient beside the scales: this plan cannot keep anything
        plan = _lagrangian(layers, keep_numbers - reserved, ks, gains)
        if fixed(plan) < reserved:   # give the scales of the layers that took low-rank back to the budget
            again = _lagrangian(layers, keep_numbers - fixed(plan), ks, gains)
            if fixed(again) <= fixed(plan):
                plan = again
        return plan

    plans = [_undominated(layers, p) for p in (plan_for(ks) for ks in [kinds, *alone]) if p is not None]
    captured = [sum(float(g[k][:c].sum()) for g, (k, c) in zip(gains, plan)) for plan in plans]
    numbers = [sum(l.cost(k) * c for l, (k, c) in zip(layers, plan)) + fixed(plan) for plan in plans]
    # equal energies (to rounding: a budget that holds every plan losslessly): the fewest numbers, then
    # the first (the joint allocation); rounding alone picked a SOLAR plan 7.6x the size of a low-rank one
    best = max(captured)
    tied = [i for i, c in enumerate(captured) if c >= best - 1e-10 * abs(best)]
    return plans[min(tied, key=lambda i: numbers[i])]


def _undominated(layers: List[_Layer], plan: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """``plan`` with every SOLAR layer that reached its ``dominated_at`` count stored as all its low-rank pairs:
    all of ΔW's energy for no more numbers. Its candidates stopped there, so SOLAR alone over them keeps the
    global top |c| of every other layer and this layer's energy whole: at least what SOLAR alone over all of C
    would (the plan auto compares it with)."""
    return [("lowrank", int((l.gains("lowrank") > 0).sum()))   # the pairs holding ΔW (AdaLoRA's may be zero)
            if kind == "solar" and l.dominated_at is not None and count >= l.dominated_at else (kind, count)
            for l, (kind, count) in zip(layers, plan)]


def _lagrangian(layers: List[_Layer], keep_numbers: float, kinds, gains) -> List[Tuple[str, int]]:
    """``_allocate`` over the encodings ``kinds`` (``gains``: each layer's per-encoding item gains)."""
    gains = [{k: gl[k] for k in kinds} for gl in gains]
    cums = [{k: torch.cat([g.new_zeros(1), g.cumsum(0)]) for k, g in gl.items()} for gl in gains]
    ascending = [{k: g.flip(0).contiguous() for k, g in gl.items()} for gl in gains]

    def choose(lam: float):
        picks, total = [], 0
        for l, cum, asc in zip(layers, cums, ascending):
            best = None
            for k in kinds:
                cost = l.cost(k)
                count = asc[k].numel() - int(torch.searchsorted(asc[k], lam * cost, right=True))
                value = float(cum[k][count]) - lam * cost * count
                # equal values (to rounding: both encodings capture everything at λ = 0): the cheaper
                if best is None or value > best[0] + 1e-12 * abs(best[0]) or (
                        value >= best[0] - 1e-12 * abs(best[0]) and cost * count < best[3]):
                    best = (value, k, count, cost * count)
            picks.append((best[1], best[2]))
            total += best[3]
        return picks, total

    hi = max((float(g[0]) / l.cost(k) for l, gl in zip(layers, gains) for k, g in gl.items() if g.numel()),
             default=0.0)
    # keeping nothing always fits; choose(hi) need not keep nothing: (g / cost) * cost can round below g
    picks, total = [(kinds[0], 0)] * len(layers), 0
    if choose(0.0)[1] <= keep_numbers:
        picks, total = choose(0.0)
    else:
        lo = 0.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            p, t = choose(mid)
            if t <= keep_numbers:
                hi, picks, total = mid, p, t
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
    # fill what is left with the next items of each layer's chosen encoding, best gain per number first
    left = keep_numbers - total
    nexts = []
    for li, ((k, count), gl) in enumerate(zip(picks, gains)):
        cost = layers[li].cost(k)
        extra = gl[k][count: count + max(int(left // cost), 0)]
        nexts += [(float(g) / cost, li, cost) for g in extra]
    nexts.sort(key=lambda x: -x[0])
    plan = [list(p) for p in picks]
    assert left >= 0, "allocation above the budget"
    for _, li, cost in nexts:
        if cost <= left:
            plan[li][1] += 1
            left -= cost
    # then coordinate ascent: a layer re-chooses its encoding and size within what is left plus its own
    # numbers whenever that captures more (the budget's granularity, m + n a pair, can strand numbers)
    improved = True
    while improved:
        improved = False
        for li, (l, cum) in enumerate(zip(layers, cums)):
            k0, c0 = plan[li]
            room = left + l.cost(k0) * c0
            now = float(cum[k0][c0])
            for k in kinds:
                c = min(int(room // l.cost(k)), cum[k].numel() - 1)
                if float(cum[k][c]) > now * (1 + 1e-12) + 1e-300:
                    now, plan[li] = float(cum[k][c]), [k, c]
            if plan[li] != [k0, c0]:
                left = room - l.cost(plan[li][0]) * plan[li][1]
                improved = True
    return [tuple(p) for p in plan]


# ---------------------------------------------------------------------------------------------
# compress / decompress

def compress(adapter: Union[str, PeftAdapter], base: Union[str, BaseWeights], *,
             budget: Union[None, int, str] = None, ratio: Optional[float] = None, seed: int = 0,
             eps: float = 0.0, method: str = "solar", storage: Optional[str] = None,
             progress: bool = False) -> SolarPackage:
    """Compress a peft LoRA/AdaLoRA adapter (folder or PeftAdapter) against its base model.

    ``ratio``: stored numbers ÷ the adapter's numbers (``0.1`` = 10× fewer, extra tensors included);
    ``budget``: stored LoRA-coefficient numbers (each coefficient counts 2: value and index; a low-rank
    pair m + n), or ``"full"`` to keep everything (lossless up to rounding). Extra tensors (classifier
    heads, biases) are always kept unchanged and count towards ``ratio``. ``method``: each layer's
    encoding, ``"solar"`` (coefficients over W0's bases), ``"lowrank"`` (ΔW's leading singular pairs)
    or ``"auto"`` (per layer whichever captures more energy for its numbers). ``storage``: the dtype of
    the stored coefficients / factors (``"float16"`` or ``"bfloat16"`` halve each stored value's bytes,
    ``"int8"`` quarters them, while SOLAR's int32 indices, extra tensors and the header keep their size;
    int8: symmetric absmax codes with one float32 scale per factor column / row, or
    per layer for SOLAR coefficients, the scales counted as stored numbers; the reported errors are
    those of the stored, rounded numbers). Default: ``"bfloat16"`` for a bfloat16 adapter (it decodes to
    bfloat16 anyway: float32 doubled the bytes), else ``"float32"``.

    Memory: one layer's bases and coefficient matrix at a time, plus the basis columns of the candidate
    coefficients that fit in ``BASIS_CACHE_BYTES`` (the others are regenerated for the decode check) and the largest
    coefficients: for "solar" at most about twice what the budget keeps over all layers, for "auto" as many a
    layer as the budget could keep, but no more than its r low-rank pairs' numbers hold (past that, they keep all
    of ΔW for fewer numbers): about half the adapter's numbers over all layers.
    """
    _check_request(budget, ratio, seed, eps, method, storage)
    ad, bw = _as_adapter(adapter), _as_base(base)
    if not _strict_json(ad.config):  # the package carries it; receivers write it as adapter_config.json
        raise ValueError(f"{ad.source or 'the adapter'}: its config holds NaN or Inf (not valid JSON; a package "
                         "carrying it would be refused by both decoders)")
    refuse_layer_replication(ad.config, ad.source or "the adapter")
    updates = [u for u in ad.updates(experts=True) if u.A.shape[0] > 0]  # AdaLoRA prunes layers to rank 0
    if not updates:
        raise ValueError("every adapted layer has rank 0 (AdaLoRA rank allocation pruned them all): "
                         "the adapter's update is zero, there is nothing to compress")
    layer_updates = _layer_updates(ad, bw, updates)
    updates = [u for u, _ in layer_updates]
    kinds = _encodings(method)
    extra = ad.extra_tensors()
    cap = _coefficient_cap(budget, ratio, sum(sum(u.shape) * int(u.A.shape[0]) for u in updates)
                           + sum(t.numel() for t in extra.values()))
    if cap is None and "lowrank" in kinds:  # lossless: every layer low-rank, no basis needed
        kinds = ("lowrank",)
    bases = _Bases(BASIS_CACHE_BYTES)
    layers, floor = [], 0.0
    # a square layer's layout is its module's type (Conv1D or Linear); a non-square one's shape tells. Only
    # a model that may hold Conv1D layers is built for it (importing its code takes seconds)
    square = any(m == n for m, n in (u.shape for u in updates))
    types = bw.weight_kinds() if square and bw.may_hold_conv1d else None
    for i, (u, source) in enumerate(_progress(layer_updates, "solar: bases" if "solar" in kinds else "solar: layers",
                                              progress)):
        m, n = u.shape
        r = int(u.A.shape[0])
        info = LayerInfo(u.module, "", [m, n], r, float(u.scaling), i, "", [0.0, 0.0], lora_numbers=(m + n) * r)
        if source is not None:   # a MoE expert: its slice of the parameter
            info.base_key, info.base_parts, info.fan_in_fan_out = source
            info.expert, info.experts = u.expert, u.experts
            W0 = _package_base_weight(bw, info)[1]
        else:   # a LoRA on the weight as a parameter (target_parameters) is added to it as stored
            key, W0, info.fan_in_fan_out = _base_weight(bw, u.module, (m, n), f"layer {u.module}", u.fan_in_fan_out,
                                                        either=not u.as_stored, kinds=types)
            info.base_key, info.renamed = key, u.module in bw.loaded_modules
        info.fingerprint = fingerprint(W0)
        B64, A64 = u.B.double(), u.A.double()
        layer = _Layer(info, lambda B2, A2, s2, u=u: _lowrank_rel_error(u.B, u.A, u.scaling, B2, A2, s2), 0.0)
        if "lowrank" in kinds:
            layer.svd = ops.factored_svd(B64 * u.scaling, A64)
            layer.energy = float((layer.svd[1] ** 2).sum())  # every singular value of the rank-r ΔW
        if "solar" in kinds:
            limit = cap
            if "lowrank" in kinds and cap is not None:   # auto: (m + n + 2) r numbers store all r pairs (int8 too)
                layer.dominated_at = ((m + n + 2) * r + 1) // 2
                limit = min(cap, layer.dominated_at)   # the budget's worth: candidates grew as layers² in all
            U, V = ops.solar_basis(as_update_layout(W0, info.fan_in_fan_out), seed, i, eps)
            layer.set_solar(U, V, ops.project(U, V, B64, A64, u.scaling), limit, bases,
                            _basis_of(bw, info, seed, eps), floor)
            del U, V
        layers.append(layer)
        if method == "solar":
            floor = _prune_candidates(layers, cap, floor)
    # one dtype for the decoded factors: the widest of the adapter's (a float32 layer beside bfloat16 ones
    # decoded in bfloat16 lost its precision; the others' upcast is exact)
    widest = updates[0].B.dtype
    for u in updates:
        for t in (u.B, u.A):
            widest = torch.promote_types(widest, t.dtype)
    dtype = str(widest).replace("torch.", "")
    if storage is None:
        storage = "bfloat16" if dtype == "bfloat16" else "float32"
    return _package(layers, extra, dict(ad.config), budget, ratio, seed, eps, dtype, method, storage,
                    progress)


def _basis_of(bw: BaseWeights, info: LayerInfo, seed: int, eps: float) -> Callable:
    """() -> the SOLAR bases of a layer's base weight, regenerated from the weight (read again) when called."""
    def read():
        return bw.get_expert(info.base_key, info.base_parts, info.expert) if info.expert >= 0 else bw.get(info.base_key)
    return lambda: ops.solar_basis(as_update_layout(read(), info.fan_in_fan_out), seed, info.stream, eps)


def _nested_parameter(bw: BaseWeights, core: str, u: LowRankUpdate) -> Optional[str]:
    """The parameter of ``u.params`` that peft's wrapper ``u.module`` adapts (``io.nested_parameter``); None where the
    model (``bw.skeleton``) is unknown."""
    try:
        module = bw.skeleton.get_submodule(core)
    except AttributeError:
        return None
    return nested_parameter(module, u.params, u.module)


def _layer_updates(ad: PeftAdapter, bw: BaseWeights, updates: List[LowRankUpdate]) -> List[Tuple[LowRankUpdate, tuple]]:
    """``updates`` (of ``ad.updates(experts=True)``) as the layers SOLAR encodes: (update, None), or for LoRA on MoE
    expert parameters (a 3-D ``weight`` too) one (update, (key, parts, stored in x out) of its base weight) per
    expert."""
    return [e for u in updates for e in _expert_updates(ad, bw, _with_3d_weight(bw, u))]


def _with_3d_weight(bw: BaseWeights, u: LowRankUpdate) -> LowRankUpdate:
    """``u``, as a LoRA on expert parameters where it targets a module's ``weight`` as a parameter and the base's is
    3-D (JetMoe's experts x out x in ``weight``: one pair per expert)."""
    if u.params or not u.as_stored:
        return u
    try:
        three_d = len(bw.shape(bw.key_for_module(unnested(u.module)))) == 3
    except FormatError:
        return u
    return dataclasses.replace(u, params=("weight",)) if three_d else u


def _expert_updates(ad: PeftAdapter, bw: BaseWeights, u: LowRankUpdate) -> List[Tuple[LowRankUpdate, tuple]]:
    """A LoRA on a MoE block's 3-D expert parameter (``u.params``: the parameters of its module it may adapt) as
    one update per expert (``io.expert_pairs``), each with its base weight's (key, parts, stored in x out); any
    other update as [(u, None)], and so one that bare parameter names only may match (``u.as_stored`` false)
    where its module has none of them in the base (peft wraps only parameters a module has). The parameter is
    the one whose experts' slices fit the factors' shapes (several: ``_nested_parameter``); its layout is the
    module's (``is_transposed``: experts x in x out, as GPT-OSS) where the model tells, else the shape's (square:
    experts x out x in, peft's default)."""
    if not u.params:
        return [(u, None)]
    core = unnested(u.module)
    m, n = u.B.shape[0], u.A.shape[1]
    fits, problems, found = [], [], 0
    for param in u.params:
        try:
            key, parts = bw.expert_sources(core, param)
        except FormatError as e:
            problems.append(str(e))
            continue
        found += 1
        if parts:
            count, rows, cols = len(parts), sum(bw.shape(k)[0] for k in parts[0]), bw.shape(parts[0][0])[1]
        else:
            count, rows, cols = bw.shape(key)
        if u.A.shape[0] % count == 0 and u.A.shape[0] > 0 and (rows, cols) in ((m, n), (n, m)):
            fits.append((param, key, parts, count, (rows, cols)))
        else:
            problems.append(f"{param} ({count} experts of {rows} x {cols}) does not fit lora_B {tuple(u.B.shape)} / "
                            f"lora_A {tuple(u.A.shape)}")
    if len(fits) > 1:   # of one shape: peft wraps the module's targeted parameters in their order, the first inside
        nested = _nested_parameter(bw, core, u)
        if nested not in [f[0] for f in fits]:
            raise BaseMismatchError(f"layer {u.module}: the LoRA fits the expert parameters "
                                    f"{', '.join(f[0] for f in fits)} alike, and the model does not tell which one this "
                                    "wrapper adapts (pass the model's folder)")
        fits = [f for f in fits if f[0] == nested]
    if not fits and not found and not u.as_stored:   # a module LoRA that bare parameter names may have matched
        return [(dataclasses.replace(u, params=()), None)]
    if not fits:
        text = "; ".join(problems)
        raise BaseMismatchError(f"layer {u.module}: no expert parameter of the base fits its factors: {text}"
                                + ("" if "quantized" in text or "base model?" in text else
                                   " (is this the adapter's base model?)"))
    param, key, parts, count, stored = fits[0]
    transposed = stored != (m, n)
    if m == n:   # the module's layout, where the model tells (peft's rule); else peft's default
        model = bw.skeleton
        try:
            transposed = bool(getattr(model.get_submodule(core), "is_transposed", False))
        except AttributeError:
            transposed = False
            _warn.warn(f"layer {u.module}: the experts of {param} are square and {bw.path} does not tell their "
                       "layout (a bare .safetensors file, or a model transformers cannot build): taken as experts x "
                       "out x in, peft's default; SOLAR's bases fit them less well if they are stored in x out "
                       "(the decoded adapter is right either way)")
    return [(v, (key, parts[v.expert] if parts else [], transposed)) for v in ad.expert_updates(u, param, count)]


def _kind_in(key: str, kinds: Optional[Dict[str, str]]) -> Optional[str]:
    """A checkpoint key's kind in ``kinds`` (None where unknown); checkpoints may drop or add the
    base-model prefix, so the longest matching dotted suffix decides."""
    parts = key.split(".") if kinds is not None else []
    for start in range(len(parts)):
        suffix = ".".join(parts[start:])
        hits = {v for k, v in kinds.items() if k == suffix or k.endswith("." + suffix)}
        if len(hits) == 1:
            return hits.pop()
        if hits:
            break
    return None


def _kind_of(key: str, kinds: Optional[Dict[str, str]], shape) -> str:
    """A checkpoint key's kind (``_kind_in``). Without a model config (or a key it lacks): a 2-D
    ``*.weight`` whose name does not contain "embed" counts as a Linear weight."""
    kind = _kind_in(key, kinds)
    if kind is not None:
        return kind
    return "linear" if len(shape) == 2 and key.endswith(".weight") and "embed" not in key else "other"


def compress_dense(finetuned: Union[str, BaseWeights], base: Union[str, BaseWeights], *,
                   budget: Union[None, int, str] = None, ratio: Optional[float] = None, rank: int = 16,
                   seed: int = 0, eps: float = 0.0, method: str = "solar", storage: Optional[str] = None,
                   progress: bool = False) -> SolarPackage:
    """Compress a dense fine-tune (``finetuned`` − ``base``, both transformers folders or safetensors
    files) of the 2-D Linear weights and MoE expert parameters; decoding gives a peft LoRA adapter of rank
    ``rank`` on the changed modules and parameters. ``ratio`` is relative to the dense deltas' size (m·n per
    layer or expert).

    Which weights are Linear: from a folder with config.json (the base's, else the fine-tune's), the
    module types of that model (torch.nn.Linear, and transformers' Conv1D of GPT-2, whose in x out
    weight is read transposed); from bare .safetensors files, every 2-D ``*.weight`` whose name does
    not contain "embed". A MoE block's changed 3-D expert parameters (stored so, or stacked by transformers from
    per-expert weights as it loads them: ``BaseWeights.expert_sources``, which needs the base's folder) are
    carried as peft's LoRA on them (``target_parameters``: one rank-``rank`` pair per expert, in the layout peft
    adds them). Other changed tensors (biases, norms, embeddings, routers) and tensors the base does not have (a
    new classification head) cannot be carried and are listed in the package's ``skipped``. Where transformers
    loads the stored weights under other names (``BaseWeights.loaded_names``: ViT, the MoE families), the
    adapter names the modules as the loaded model does.
    ``method`` and ``storage`` as for ``compress`` (the low-rank encoding keeps the delta's leading
    ``rank`` singular pairs, from an ``ops.rsvd`` with 4 power iterations)."""
    _check_request(budget, ratio, seed, eps, method, storage)
    encodings = _encodings(method)
    if isinstance(finetuned, (str, os.PathLike)) and os.path.isfile(os.path.join(finetuned, ADAPTER_CONFIG)):
        raise ValueError(f"{os.fspath(finetuned)} is a peft adapter folder ({ADAPTER_CONFIG}), not a fine-tuned model: "
                         "compress it as an adapter (solar.compress; the CLI without --dense)")
    fw, bw = _as_base(finetuned), _as_base(base)
    kinds = bw.weight_kinds() or fw.weight_kinds()
    if kinds is None:
        files = [w.path for w in (bw, fw) if os.path.isfile(w.path)
                 and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(w.path)), "config.json"))]
        why = (f"{files[0]} is a file: pass its folder, whose config.json tells them" if files else
               "no config.json in the folders given, or one transformers cannot build")
        _warn.warn(f"the module types are unknown ({why}): every 2-D *.weight without 'embed' in its name is read "
                   "as a Linear weight (out x in); transformers' Conv1D weights (GPT-2's c_attn, c_proj, c_fc) are "
                   "stored in x out and would decode transposed")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    base_of = _dense_pairs(fw, bw)   # fine-tuned key -> the base's key
    keys = list(base_of)
    layers, skipped, floor = [], [k for k in fw.keys() if k not in base_of], 0.0
    if not keys:
        raise BaseMismatchError(f"{getattr(fw, 'path', finetuned)} and {getattr(bw, 'path', base)} share no tensor "
                                "name, even under a prefix rewrite (bert.encoder... -> encoder...): wrong base model "
                                "(or not a checkpoint of the same architecture)?")
    groups = _dense_expert_groups(fw, bw, base_of) if kinds is not None else []   # MoE expert parameters
    covered = {k for g in groups for k in g["fine"]}
    # the deltas' size is known once they are read: bound it by every shared 2-D tensor's (and expert parameter's)
    cap = _coefficient_cap(budget, ratio, sum(math.prod(fw.shape(k)) for k in keys
                                              if len(fw.shape(k)) == 2 or k in covered))
    if cap is None and "lowrank" in encodings:
        encodings = ("lowrank",)
    bases = _Bases(BASIS_CACHE_BYTES)
    for k in _progress([k for k in keys if k not in covered], "solar: deltas", progress):
        bk = base_of[k]
        if k.endswith(".weight") and len(fw.shape(k)) == 2:   # a quantized checkpoint's weights: refused by name
            fw.refuse_quantized(k)
            bw.refuse_quantized(bk)
        Wf, W0 = fw.get(k), bw.get(bk)
        if Wf.shape != W0.shape:
            raise BaseMismatchError(f"{k}: fine-tuned shape {tuple(Wf.shape)} != base shape {tuple(W0.shape)}"
                                    f"{f' ({bk})' if bk != k else ''}: wrong base model?")
        if not Wf.is_floating_point() or torch.equal(Wf, W0):
            continue
        # transformers' name for it (the fine-tune's model tells where the base is a bare file)
        loaded = bk if kinds is None else bw.loaded_names.get(bk, bk) if bw.skeleton is not None else \
            fw.loaded_names.get(k, k)
        kind = "other" if loaded is None else _kind_of(loaded, kinds, Wf.shape)   # None: merged with others
        if kind == "other" or Wf.dim() != 2:
            skipped.append(k)
            continue
        _check_finite_base(W0, bk)
        transposed = kind == "conv1d"
        delta = _delta_of(fw, bw, k, bk, transposed)
        D = _delta(Wf, W0, transposed)
        del Wf
        if not torch.isfinite(D).all():
            raise ValueError(f"{k}: the fine-tuned weight contains NaN or Inf")
        m, n = D.shape
        module = _dense_module(fw, bw, k, bk)
        info = LayerInfo(module, bk, [m, n], min(rank, m, n), 1.0, len(layers), fingerprint(W0), [0.0, 0.0],
                         lora_numbers=m * n, fan_in_fan_out=transposed, renamed=module in bw.loaded_modules)
        layers.append(_dense_layer(info, W0, D, delta, bw, cap, bases, encodings, seed, eps, floor))
        del D, W0
        if method == "solar":
            floor = _prune_candidates(layers, cap, floor)
    for g in _progress(groups, "solar: expert deltas", progress):
        for e in range(g["experts"]):
            W0 = bw.get_expert(g["key"], g["parts"][e], e)
            _check_finite_base(W0, g["key"])
            delta = (lambda g=g, e=e: _delta(fw.get_expert(g["fine_key"], g["fine_parts"][e], e),
                                              bw.get_expert(g["key"], g["parts"][e], e), g["transposed"]))
            D = _delta(fw.get_expert(g["fine_key"], g["fine_parts"][e], e), W0, g["transposed"])   # W0 read once
            if not torch.isfinite(D).all():
                raise ValueError(f"{g['fine_key']} (expert {e}): the fine-tuned weight contains NaN or Inf")
            m, n = D.shape
            info = LayerInfo(g["module"], g["key"], [m, n], min(rank, m, n), 1.0, len(layers), fingerprint(W0),
                             [0.0, 0.0], lora_numbers=m * n, fan_in_fan_out=g["transposed"], expert=e,
                             experts=g["experts"], base_parts=g["parts"][e])
            layers.append(_dense_layer(info, W0, D, delta, bw, cap, bases, encodings, seed, eps, floor))
            del D, W0
            if method == "solar":
                floor = _prune_candidates(layers, cap, floor)
    if not layers:
        raise ValueError(f"{getattr(fw, 'path', finetuned)}: no 2-D Linear weight differs from the base (nor a MoE "
                         "expert parameter)")
    infos = [l.info for l in layers]
    params = {f"{g['core']}.{g['param']}": l.rank for g in groups for l in infos if l.module == g["module"]}
    # peft rewrites a MoE model's target_modules named like its experts' old Linears (down_proj, w2, gate, ...) into
    # expert parameters as it loads the adapter (its transformers-4 compatibility): such Linears (DeepSeek's dense
    # MLPs, shared experts) are targeted as their weight parameter instead, which peft adds as a module LoRA would
    moe = _holds_experts(bw.skeleton or fw.skeleton)
    as_param = [l for l in infos if l.expert < 0 and moe and l.module.rpartition(".")[2] in _PEFT_MOE_NAMES]
    params.update({f"{l.module}.weight": l.rank for l in as_param})
    plain = [l for l in infos if l.expert < 0 and l not in as_param]
    r = max(l.rank for l in infos)
    # a parameter's pattern only where its rank is not r (peft warns that keys naming a parameter match no module,
    # though it applies them)
    patterns = {**{l.module: l.rank for l in plain}, **{k: v for k, v in params.items() if v != r}}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": [l.module for l in plain],
              "rank_pattern": patterns, "alpha_pattern": dict(patterns), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": any(l.fan_in_fan_out for l in plain), "use_rslora": False,
              "init_lora_weights": True, "task_type": None,
              "base_model_name_or_path": None, "modules_to_save": None}
    if params:   # peft's LoRA on parameters (its ParamWrapper)
        config["target_parameters"] = sorted(params)
    pkg = _package(layers, {}, config, budget, ratio, seed, eps, "float32", method, storage or "float32", progress)
    pkg.skipped = skipped
    return pkg


# the module names peft's transformers-4 MoE config conversion maps to expert parameters (Mixtral's, Qwen2-MoE's)
_PEFT_MOE_NAMES = frozenset({"gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"})


def _holds_experts(model: Optional[torch.nn.Module]) -> bool:
    """Whether a model (built on the meta device) holds a MoE block's 3-D expert parameters."""
    return model is not None and any(
        p.dim() == 3 and p.is_floating_point() for m in model.modules()
        if not isinstance(m, torch.nn.modules.conv._ConvNd) for p in m.parameters(recurse=False))


def _dense_layer(info: LayerInfo, W0: torch.Tensor, D: torch.Tensor, delta: Callable, bw: BaseWeights, cap, bases,
                 encodings, seed: int, eps: float, floor: float) -> _Layer:
    """A dense delta ``D`` (out x in, float64) as a layer being compressed; ``delta()`` reads it again to measure
    the decoded error (no layer's m x n delta is kept)."""
    norm = float(torch.linalg.norm(D))
    layer = _Layer(info, lambda B2, A2, s2: float(torch.linalg.norm(delta() - s2 * B2.double() @ A2.double())) / norm
                   if norm > 0 else 0.0, norm * norm)
    if "solar" in encodings:
        U, V = ops.solar_basis(as_update_layout(W0, info.fan_in_fan_out), seed, info.stream, eps)
        layer.set_solar(U, V, ops.project_dense(U, V, D), cap, bases, _basis_of(bw, info, seed, eps), floor)
        del U, V
    if "lowrank" in encodings:
        layer.svd = ops.rsvd(D, info.rank, niter=4, seed=seed)
    return layer


def _dense_expert_groups(fw: BaseWeights, bw: BaseWeights, base_of: Dict[str, str]) -> List[dict]:
    """The MoE expert parameters (3-D, of a module that is not a convolution) a dense fine-tune changed, each
    carried as one LoRA pair per expert (peft's target_parameters): its module ``core`` and ``param``, the base's
    ``key`` and per-expert ``parts`` (``BaseWeights.expert_sources``), the fine-tune's (``fine_key``,
    ``fine_parts``, ``fine``: all its keys), ``experts``, the layout (``transposed``: stored experts x in x out,
    the module's ``is_transposed``) and the ``module`` name of its peft wrapper (several of one module nest in the
    module's order, the first innermost)."""
    model, P, Q = bw.skeleton, *(prefix_rewrite(fw.keys(), bw.keys()) or ("", ""))  # P, Q: to the fine-tune's names
    if model is None:   # a bare base file: the fine-tune's model (named as the adapter is), its 3-D tensors found
        model, P, Q = fw.skeleton, "", ""   # in the base by name; transformers' merges cannot be worked out
        if model is not None and fw._merges:
            _warn.warn(f"{bw.path} is a bare .safetensors file: the MoE experts that transformers stacks from "
                       "per-expert weights as it loads the model cannot be found in it, and are not carried; pass "
                       "the base model's folder")
    if model is None:
        return []
    fine_of = {b: k for k, b in base_of.items()}
    found = []
    for core, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.conv._ConvNd):
            continue
        for param, p in mod.named_parameters(recurse=False):
            if p.dim() != 3 or not p.is_floating_point():
                continue
            try:
                key, parts = bw.expert_sources(core, param)
            except FormatError:
                continue
            base_keys = [k for ks in parts for k in ks] if parts else [key]
            missing = [k for k in base_keys if k not in fine_of]
            if len(missing) == len(base_keys):
                continue
            if missing:
                raise BaseMismatchError(f"{getattr(fw, 'path', 'the fine-tune')}: no {P + missing[0][len(Q):]} (the "
                                        f"base's {missing[0]}), while it holds other experts of {core}.{param}: wrong "
                                        "base model, or a damaged checkpoint?")
            fine = [fine_of[k] for k in base_keys]
            for f, b in zip(fine, base_keys):
                fw.refuse_quantized(f)
                if fw.shape(f) != bw.shape(b):
                    raise BaseMismatchError(f"{f}: fine-tuned shape {tuple(fw.shape(f))} != base shape "
                                            f"{tuple(bw.shape(b))}{f' ({b})' if b != f else ''}: wrong base model?")
            experts = len(parts) if parts else bw.shape(key)[0]
            parts = parts or [[] for _ in range(experts)]
            fine_key, fine_parts = fine_of.get(key, key), [[fine_of[k] for k in ks] for ks in parts]
            if all(torch.equal(fw.get_expert(fine_key, fine_parts[e], e), bw.get_expert(key, parts[e], e))
                   for e in range(experts)):   # expert by expert: one slice of each side in memory
                continue
            named = P + core[len(Q):] if core.startswith(Q) else core
            found.append(dict(core=named, param=param, key=key, parts=parts, fine=fine, fine_key=fine_key,
                              fine_parts=fine_parts, experts=experts,
                              transposed=bool(getattr(mod, "is_transposed", False))))
    for g in found:
        order = [x["param"] for x in found if x["core"] == g["core"]]
        g["module"] = g["core"] + ".base_layer" * (len(order) - 1 - order.index(g["param"]))
    return found


def _delta(Wf: torch.Tensor, W0: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The fine-tune's float64 delta, out x in."""
    return as_update_layout(Wf.double() - W0.double(), transposed)


def _delta_of(fw: BaseWeights, bw: BaseWeights, key: str, base_key: str, transposed: bool) -> Callable:
    """() -> the delta of ``key`` (``base_key`` in the base), read again from both checkpoints."""
    return lambda: _delta(fw.get(key), bw.get(base_key), transposed)


def _dense_pairs(fw: BaseWeights, bw: BaseWeights) -> Dict[str, str]:
    """{fine-tuned key: base key} under the one prefix rewrite the checkpoints' names agree on: a fine-tune
    saved from a task model (``bert.encoder...``) against its base saved as the bare encoder
    (``encoder...``), or the reverse; keys without a counterpart (a new head) are left out."""
    base_keys = set(bw.keys())
    P, Q = prefix_rewrite(fw.keys(), base_keys) or ("", "")
    pairs = {k: Q + k[len(P):] for k in fw.keys() if k.startswith(P)}
    return {k: b for k, b in pairs.items() if b in base_keys}


def _dense_module(fw: BaseWeights, bw: BaseWeights, key: str, base_key: str) -> str:
    """The module name a dense layer's adapter targets: the fine-tuned model's (the adapter goes onto its
    architecture), where the decoders' suffix lookup finds the base weight from it; else the base's. Each
    as transformers names it in the model it loads (``BaseWeights.loaded_names``: peft finds modules by
    those names) where it renames the stored weights, else as stored."""
    names = [fw.loaded_names.get(key), key] if bw.renames else [key]   # (one architecture: the base's tells)
    for name in names:
        if name is None or not name.endswith(".weight"):
            continue
        try:
            if bw.key_for_module(name[: -len(".weight")]) == base_key:
                return name[: -len(".weight")]
        except FormatError:
            pass
    name = bw.loaded_names.get(base_key) if bw.renames else None
    return (name or base_key)[: -len(".weight")]


def _package(layers: List[_Layer], extra, config, budget, ratio, seed, eps, dtype, method: str = "solar",
             storage: str = "float32", progress: bool = False) -> SolarPackage:
    """Budget, selection, per-layer decode check and the package (shared by both inputs)."""

    def stored(scales: Dict[str, torch.Tensor], t: torch.Tensor, name: str, dim: int, what: str,
               module: str) -> (torch.Tensor, torch.Tensor):
        """The tensor as stored under ``name`` and the numbers it stands for (int8: scales over ``dim``, into
        ``scales``)."""
        if storage == "int8":
            codes, scales[name] = _quantize(t, dim)
            return codes, _dequantize(codes, scales[name])
        out = t.to(STORAGE[storage])
        if not torch.isfinite(out).all():
            raise ValueError(f"layer {module}: {what} exceed {storage}'s range (largest magnitude "
                             f"{float(t.abs().max()):.4g}): store them as bfloat16 or float32")
        return out, out

    extra_numbers = sum(t.numel() for t in extra.values())
    lora_total = sum(l.info.lora_numbers for l in layers) + extra_numbers
    candidates = sum(math.prod(l.info.shape) for l in layers) if method == "solar" else None
    if ratio is not None:  # extra tensors are stored too: the ratio covers them (checked in _check_request)
        keep_numbers = ratio * lora_total - extra_numbers
        if keep_numbers < NUMBERS_PER_COEFFICIENT:
            if not extra:
                raise ValueError(f"ratio {ratio} leaves no room for one coefficient ({NUMBERS_PER_COEFFICIENT} "
                                 f"numbers of the adapter's {lora_total}): ask for a larger ratio")
            largest = sorted(extra, key=lambda k: -extra[k].numel())[:3]
            raise ValueError(f"ratio {ratio} leaves no room for coefficients: the extra tensors, carried "
                             f"unchanged, alone take {extra_numbers / lora_total:.4f} of the adapter (largest: "
                             + ", ".join(f"{k} ({extra[k].numel()} numbers)" for k in largest) + ")")
    else:
        keep_numbers = None if budget == "full" else budget
    # int8: a pair's codes carry 2 scales; a SOLAR layer's coefficients 1, reserved up front for method
    # "solar" (every layer), counted by _allocate for "auto" (only the layers that take SOLAR)
    solar_scale = 1 if storage == "int8" else 0
    if storage == "int8":
        for l in layers:
            l.pair_scales = 2
        if keep_numbers is not None and method == "solar":
            keep_numbers -= len(layers)
            if keep_numbers < NUMBERS_PER_COEFFICIENT:
                raise ValueError(f"the budget leaves no room for a coefficient and the {len(layers)} int8 scales "
                                 "of the layers: ask for a larger budget or ratio")
    if method == "solar":
        # Global top-|c|: the kept set with the most captured energy for the budget (each layer's
        # candidates hold at least min(its m·n, keep) coefficients, so the top `keep` are among them).
        keep = _resolve_budget("full" if keep_numbers is None else keep_numbers, candidates)
        flat = torch.cat([l.top[0].abs() for l in layers])
        assert keep is None or keep <= flat.numel(), "fewer candidate coefficients than the budget keeps"
        chosen = (torch.arange(flat.numel()) if keep is None
                  else torch.topk(flat, keep, sorted=False).indices.sort().values)
        bounds = torch.tensor([0] + [l.top[0].numel() for l in layers]).cumsum(0)
        plan = [("solar", chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i])
                for i in range(len(layers))]
    else:  # a coefficient set is the prefix of the layer's candidates (C's entries by |c|)
        plan = [(kind, torch.arange(count) if kind == "solar" else count)
                for kind, count in _allocate(layers, keep_numbers, method, solar_scale)]
    plan = _holding(layers, plan)
    if keep_numbers is not None and any(l.energy > 0 for l in layers) and \
            not any(sel.numel() if kind == "solar" else sel for kind, sel in plan):
        # (method solar keeps a coefficient; auto in int8 none where the layers' scales leave no room for one)
        small = min(layers, key=lambda l: l.cost("lowrank"))
        asked = f"ratio {ratio}" if ratio is not None else f"budget {budget}"
        raise ValueError(f"{asked} leaves {keep_numbers:.0f} numbers for the layers, too few for one low-rank pair "
                         f"({small.cost('lowrank')} in {small.info.module})"
                         + (" or for a coefficient beside the layers' int8 scales" if method == "auto" else "")
                         + ": the package would hold nothing; ask for a larger ratio or budget"
                         + (", or --method solar or auto (single coefficients)" if method == "lowrank" else ""))
    infos, values, indices, factors, scales = _encode(layers, plan, stored, seed, dtype, progress)
    if method == "auto" and keep_numbers is not None and any(kind == "solar" for kind, _ in plan):
        # the allocation weighs what each plan stores; a SOLAR layer then decodes to rank r, which can drop a
        # little of it: where low rank alone would leave less of ΔW out (its pairs' σ², before rounding), it is
        # encoded too (no basis needed) and the one that decodes to less error is kept
        residual = sum(l.energy * info.rel_error ** 2 for l, info in zip(layers, infos))
        alone = _holding(layers, _allocate(layers, keep_numbers, "lowrank"))
        if sum(l.energy - float(l.gains("lowrank")[:c].sum()) for l, (_, c) in zip(layers, alone)) < residual:
            other = _encode(layers, alone, stored, seed, dtype, False)
            if sum(l.energy * info.rel_error ** 2 for l, info in zip(layers, other[0])) < residual:
                infos, values, indices, factors, scales = other
    return SolarPackage(seed, float(eps), config, infos, values, indices, extra, dtype, factors=factors,
                        scales=scales)


def _holding(layers: List[_Layer], plan) -> list:
    """``plan`` without what holds nothing, which is not stored whatever room the budget leaves: zero coefficients,
    zero pairs (an all-zero update, AdaLoRA's pruned ranks, a dense delta of lower rank)."""
    return [(kind, sel[l.top[0][sel] != 0] if kind == "solar" else min(sel, int((l.gains(kind) > 0).sum())))
            for l, (kind, sel) in zip(layers, plan)]


def _encode(layers: List[_Layer], plan, stored: Callable, seed: int, dtype: str, progress: bool):
    """Each layer's numbers as stored under ``plan`` ((kind, which / how many) per layer) and its decode check:
    (infos, values, indices, factors, scales), the LayerInfos copies of the layers' with the plan's kind,
    counts, checksum, energy and error."""
    infos, values, indices, factors, scales = [], [], [], [], {}
    for i, (l, (kind, sel)) in enumerate(zip(_progress(layers, "solar: coefficients", progress), plan)):
        info = dataclasses.replace(l.info, kind=kind)
        infos.append(info)
        if kind == "solar":  # sel: which candidates; stored in the order of their positions in C
            positions, order = l.top[1][sel].sort()
            vals, vals_f = stored(scales, l.top[0][sel][order], f"layer.{i}.values", 0, "coefficients", info.module)
            values.append(vals)
            indices.append(positions.to(torch.int32 if math.prod(info.shape) <= 2 ** 31 else torch.int64))
            factors.append(None)
            B2, A2, ck = _decode_solar(l.basis, vals_f, positions, info, seed)
            l.basis = None  # let a cached basis go once its layer is decoded
            info.nnz = int(positions.numel())
            kept = float((vals_f.double() ** 2).sum())
            info.checksum = [float(c) for c in ck]
        else:
            U, S, V = l.svd
            root = (S[:sel] / info.scaling).sqrt()
            Bt, Bf = stored(scales, U[:, :sel] * root, f"layer.{i}.lora_B", 0, "factors", info.module)
            At, Af = stored(scales, (V[:, :sel] * root).T.contiguous(), f"layer.{i}.lora_A", 1, "factors", info.module)
            values.append(torch.zeros(0))
            indices.append(torch.zeros(0, dtype=torch.int32))
            factors.append((Bt, At))
            B2, A2 = _pad_factors(Bf, Af, info.rank)
            info.nnz = int(sel)
            kept = float((S[:sel].double() ** 2).sum())
            info.checksum = []
        info.energy = min(kept / l.energy, 1.0) if l.energy > 0 else 1.0
        # measured on the factors as decompress writes them (the adapter's dtype: bfloat16 rounding counts)
        info.rel_error = l.err(B2.to(getattr(torch, dtype)), A2.to(getattr(torch, dtype)), info.scaling)
    return infos, values, indices, factors, scales


def decompress(package: Union[str, SolarPackage], base: Union[str, BaseWeights], *,
               progress: bool = False) -> PeftAdapter:
    """Rebuild a standard peft LoRA adapter from a package and the base model it was made from.

    Fails with BaseMismatchError naming the first layer whose base weight differs (fingerprint; every
    layer's is checked before any is decoded) or whose regenerated basis does not match the sender's
    (checksum).
    """
    pkg = package if isinstance(package, SolarPackage) else SolarPackage.load(package)
    bw = _as_base(base)
    dtype = getattr(torch, pkg.dtype)
    tensors: Dict[str, torch.Tensor] = {}
    config = dict(pkg.peft_config)
    # a wrong base fails in seconds, not after the layers before it are decoded (7B: ~14 GB of weights hashed)
    for info in _progress(pkg.layers, "solar: base check", progress):
        _package_base_weight(bw, info, check=True)
    experts: Dict[str, dict] = {}   # module -> {expert: (B, A)}
    for i, info in enumerate(_progress(pkg.layers, "solar: decode", progress)):
        if pkg.factors[i] is not None:  # low-rank layer: the factors themselves, no basis (W0 not read again)
            B, A = _pad_factors(*pkg.stored_factors(i), info.rank)
        else:
            B, A = _decoded_solar(pkg, i, bw)
        if info.expert >= 0:   # stacked into the module's LoRA once all its experts are decoded
            experts.setdefault(info.module, {})[info.expert] = (B.to(dtype), A.to(dtype))
            if len(experts[info.module]) < info.experts:
                continue
            pairs = experts.pop(info.module)
            B, A = stack_experts([pairs[e] for e in sorted(pairs)])
        tensors[_factor_key(info.module, "A")] = A.to(dtype)
        tensors[_factor_key(info.module, "B")] = B.to(dtype)
    tensors.update(pkg.extra)
    if str(config.get("peft_type", "LORA")).upper() == "ADALORA":
        config = _adalora_as_lora(config, pkg.layers)
    return PeftAdapter(config, tensors)


def _factor_key(module: str, side: str) -> str:
    """The name of a decoded layer's LoRA factor ``side`` ("A" / "B") in the adapter the decoders write."""
    return f"base_model.model.{module}.lora_{side}.weight"


def _decoded_solar(pkg: SolarPackage, i: int, bw: BaseWeights) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of package layer ``i`` (kind "solar"), decoded over the bases of its base weight, whose checksum is
    checked against the sender's."""
    info = pkg.layers[i]
    what = _layer_name(info)
    key, W0 = _package_base_weight(bw, info)
    basis = _Regenerated(lambda: ops.solar_basis(as_update_layout(W0, info.fan_in_fan_out), pkg.seed, info.stream,
                                                 pkg.eps))
    try:
        B, A, ck = _decode_solar(basis, pkg.stored_values(i), pkg.indices[i], info, pkg.seed)
    except ValueError as e:   # the ops' checks of an edited package's numbers (eps, an index past C), as C++ says
        raise FormatError(f"{what}: {e}") from None
    tol = _CHECKSUM_TOL * max(1.0, math.sqrt(info.nnz))  # each checksum sums ~nnz unit-variance terms
    if any(abs(float(a) - b) > tol for a, b in zip(ck, info.checksum)):
        raise BaseMismatchError(f"{what}: the regenerated basis does not match the sender's (checksum "
                                f"{[float(c) for c in ck]} != {info.checksum}): " + _mismatch_cause(pkg.basis, key))
    return B, A


def _decode_solar(basis: Callable, values: torch.Tensor, positions: torch.Tensor, info: LayerInfo, seed: int):
    """``ops.solar_decode`` of a layer, whose bases ``basis(positions)`` (-> U, V, the positions in them)
    gives only when it keeps a coefficient: a layer that keeps none decodes to zero factors and a zero
    checksum whatever its bases (a layer of a large base weight took seconds for it; the edge decoder
    skips it too)."""
    if positions.numel() == 0 and values.numel() == 0:
        m, n = info.shape
        f64 = dict(dtype=torch.float64)
        return torch.zeros(m, info.rank, **f64), torch.zeros(info.rank, n, **f64), torch.zeros(2, **f64)
    U, V, positions = basis(positions)
    return ops.solar_decode(U, V, values, positions, info.rank, info.scaling, seed, info.stream)


def _mismatch_cause(basis: int, key: str) -> str:
    """Why a layer's checksum can fail once its base weight's fingerprint matched (the C++ decoder says
    the same)."""
    if basis == 1:
        return (f"the package predates basis rule 2 (made by an older build): if singular values of {key} are "
                "(nearly) tied (a rank-deficient, pruned or orthogonal weight), its basis depended on the sender's "
                "LAPACK, so compress the adapter again with this build; otherwise the seed or eps was edited")
    return ("the seed, eps or the layer's stream differs from the sender's (an edited package), or this machine's "
            f"LAPACK resolves {key}'s singular vectors differently from the sender's (a singular-value gap at the tie "
            "tolerance, 1e-8 of the largest, or a sign-symmetric weight packed by a build before the sign rule's "
            "ties): compress the adapter again on a machine like this one")


def _strict_json(value) -> bool:
    """Whether ``value`` is JSON without NaN / Infinity (which Python's json writes and reads, and JSON lacks)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def _layer_name(info: LayerInfo) -> str:
    """A layer as messages name it: "layer <module>", and " (expert <e>)" for a MoE expert's (the C++ decoder's)."""
    return f"layer {info.module}" + (f" (expert {info.expert})" if info.expert >= 0 else "")


def _module_path(module: str) -> bool:
    """Non-empty dotted parts, no control character (the name goes into tensor names and one-line messages)."""
    return all(module.split(".")) and not any(ord(c) < 0x20 for c in module)


def _package_base_weight(bw: BaseWeights, info: LayerInfo, check: bool = False) -> Tuple[str, torch.Tensor]:
    """(key, W0) of a package layer's base weight; with ``check``, also its fingerprint against the
    package's. A missing or misshapen weight, or another one, raises BaseMismatchError naming the layer."""
    what = _layer_name(info)
    if info.expert >= 0:   # a MoE expert's slice: the recorded key or parts (the module's name has no weight)
        key = info.base_key
        missing = [k for k in info.base_parts or [key] if not bw.has(k)]
        if missing:
            raise BaseMismatchError(f"{what}: the base has no weight {missing[0]}: wrong base model?")
        if not info.base_parts and not (len(bw.shape(key)) == 3 and bw.shape(key)[0] == info.experts):
            raise BaseMismatchError(f"{what}: base weight {key} has shape {tuple(bw.shape(key))}, not "
                                    f"{info.experts} experts: wrong base model?")
        try:
            for k in info.base_parts or [key]:
                bw.refuse_quantized(k)
            W0 = bw.get_expert(key, info.base_parts, info.expert)
        except FormatError as e:
            raise BaseMismatchError(f"{what}: {e}") from None
        W0 = _base_weight_at(bw, key, info.shape, what, info.fan_in_fan_out, W0)
    else:
        key, W0 = _package_module_weight(bw, info, what)
    if check and fingerprint(W0) != info.fingerprint:
        raise BaseMismatchError(f"{what}: base weight {key} ({str(W0.dtype).replace('torch.', '')}) differs "
                                f"from the one the package was made from (fingerprint {fingerprint(W0)} != "
                                f"{info.fingerprint}): wrong base model, or the same one changed or saved in "
                                "another dtype (the base must be exactly the sender's)")
    return key, W0


def _package_module_weight(bw: BaseWeights, info: LayerInfo, what: str) -> Tuple[str, torch.Tensor]:
    """(key, W0) of a package layer's module's weight (``_package_base_weight``)."""
    try:
        key, W0, _ = _base_weight(bw, info.module, info.shape, what, info.fan_in_fan_out)
    except FormatError as e:
        # A module without a weight of its own (a tied lm_head): the key the encoder resolved is taken, and
        # the fingerprint check shows it is that weight; from a bare .safetensors file (no config to ask) or
        # a folder whose config.json may tie embeddings. So is a module the encoder found by its loaded name
        # (``renamed``) where this transformers does not rename it. The edge decoder has the same rule.
        if not ((os.path.isfile(bw.path) or bw.may_tie_embeddings or info.renamed) and bw.has(info.base_key)):
            raise BaseMismatchError(f"{what}: {e}") from None
        key = info.base_key
        W0 = _base_weight_at(bw, key, info.shape, what, info.fan_in_fan_out)
    return key, W0


def _adalora_as_lora(config: dict, layers: List[LayerInfo]) -> dict:
    """An AdaLoRA package decodes to a plain LoRA adapter with the same update: per-layer rank and
    alpha patterns reproduce each layer's scaling; target_modules lists the decoded layers exactly
    (layers that rank allocation pruned to rank 0 have no update and are not among them)."""
    out = {k: v for k, v in config.items() if k not in
           ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")}
    out["peft_type"] = "LORA"
    r = max(l.rank for l in layers)
    out["r"] = r
    out["lora_alpha"] = r  # scaling 1 unless a pattern says otherwise
    out["rank_pattern"] = {l.module: l.rank for l in layers}
    out["alpha_pattern"] = {l.module: l.scaling * l.rank for l in layers}
    out["use_rslora"] = False
    out["target_modules"] = [l.module for l in layers]
    return out


def truncated_svd_baseline(adapter: Union[str, PeftAdapter], *, budget: Optional[int] = None,
                           ratio: Optional[float] = None) -> (PeftAdapter, int):
    """The naive baseline at the same storage: keep, across all layers, the rank-1 SVD components of
    each ΔW with the most energy per stored number ((m + n + 1) each), until the budget is spent.
    Returns the adapter (same config and shapes; dropped components are zero) and the numbers used."""
    ad = _as_adapter(adapter)
    updates = ad.updates()
    extra = sum(t.numel() for t in ad.extra_tensors().values())
    lora_total = sum((u.shape[0] + u.shape[1]) * u.A.shape[0] for u in updates) + extra
    if budget is None:
        if ratio is None:
            raise ValueError("give a budget or a ratio")
        budget = ratio * lora_total - extra
    factors = [ops.factored_svd(u.B.double() * u.scaling, u.A.double()) for u in updates]
    cands = []
    for i, (u, (U, S, V)) in enumerate(zip(updates, factors)):
        cost = u.shape[0] + u.shape[1] + 1
        cands += [(float(S[j]) ** 2 / cost, i, j, cost) for j in range(S.numel())]
    cands.sort(reverse=True)
    keep, used = {}, 0
    for _, i, j, cost in cands:
        if used + cost <= budget:
            keep.setdefault(i, []).append(j)
            used += cost
    tensors = dict(ad.tensors)
    for i, (u, (U, S, V)) in enumerate(zip(updates, factors)):
        r = u.A.shape[0]
        B = torch.zeros(u.shape[0], r, dtype=torch.float64)
        A = torch.zeros(r, u.shape[1], dtype=torch.float64)
        js = sorted(keep.get(i, []))
        for t, j in enumerate(js):
            root = math.sqrt(float(S[j]) / u.scaling)
            B[:, t] = U[:, j] * root
            A[t] = V[:, j] * root
        prefix = f"base_model.model.{u.module}"
        a_key = next(k for k in (f"{prefix}.lora_A.weight", f"{prefix}.lora_A") if k in tensors)
        b_key = a_key.replace("lora_A", "lora_B")
        tensors[a_key] = A.to(ad.tensors[a_key].dtype)
        tensors[b_key] = B.to(ad.tensors[b_key].dtype)
        e_key = a_key.replace("lora_A", "lora_E")
        if e_key in tensors:
            tensors[e_key] = torch.ones_like(tensors[e_key])
    return PeftAdapter(dict(ad.config), tensors), used + extra
