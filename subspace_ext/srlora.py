"""SRLoRA: importance-based fusion and re-initialisation of LoRA pairs during training.

(Yang, Wang, Hossain 2025, arXiv 2505.12433.) On a peft LoRA model of rank r, with each target
weight W0 = U Σ Vᵀ (one rsvd per weight, computed once and cached):

* init (``pissa_init=True``): PiSSA — A = diag(√(σ/s)) V_rᵀ, B = U_r diag(√(σ/s)), W0 −= s B A, so the
  model's function is unchanged and the pairs start on the top r principal directions;
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
pairs: save both (``SRLoRA.base_state_dict()``), or merge (``model.merge_and_unload()``) and save the
merged model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import ops


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
    directions: Optional[int] = None   # principal directions cached per layer beyond r (default 4 r)
    grace: Optional[int] = None  # steps a re-initialised pair cannot be fused (default: interval)
    reset_optimizer: bool = True  # zero the optimizer moments of re-initialised pairs
    seed: int = 0                # rsvd seed
    verbose: bool = False        # print one line per recomposition

    def validate(self) -> None:
        if self.interval < 1 or self.warmup < 0:
            raise ValueError(f"interval must be >= 1 and warmup >= 0, got {self.interval}, {self.warmup}")
        if not 0.0 <= self.fuse_fraction <= 1.0:
            raise ValueError(f"fuse_fraction must be in [0, 1], got {self.fuse_fraction}")
        if not 0.0 < self.stop <= 1.0:
            raise ValueError(f"stop must be in (0, 1], got {self.stop}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class _Layer:
    name: str
    weight: torch.nn.Parameter  # the base layer's weight parameter
    W: torch.Tensor          # its m x n view (a transpose for fan_in_fan_out layers)
    A: torch.nn.Parameter    # r x n
    B: torch.nn.Parameter    # m x r
    scaling: float
    U: torch.Tensor = None   # cached principal directions of the original W0 (m x K), S (K), V (n x K)
    S: torch.Tensor = None
    V: torch.Tensor = None
    next_dir: int = 0        # next unused direction
    protected_until: torch.Tensor = None  # per pair: first step it may be fused again


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


def lora_layers(model) -> List[_Layer]:
    """The active LoRA Linear layers of a peft model (lora_A/lora_B weights, scaling, base weight)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in mod.active_adapters:
            if adapter not in mod.lora_A:
                continue
            if getattr(mod, "use_dora", {}).get(adapter, False):
                raise ValueError(f"{name}: DoRA layers are not supported by SRLoRA")
            A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            if A.dim() != 2:
                raise ValueError(f"{name}: only Linear LoRA layers are supported")
            weight = mod.get_base_layer().weight
            W = weight.data.T if getattr(mod, "fan_in_fan_out", False) else weight.data
            out.append(_Layer(name, weight, W, A, B, float(mod.scaling[adapter])))
    if not out:
        raise ValueError("the model has no active LoRA layers (expected a peft LoRA model)")
    return out


class SRLoRA:
    """Importance-based recomposition of a peft LoRA model's pairs; call ``step()`` after each
    ``optimizer.step()`` (while the gradients are still there)."""

    def __init__(self, model, optimizer: Optional[torch.optim.Optimizer], config: Optional[SRLoRAConfig] = None):
        self.config = config or SRLoRAConfig()
        self.config.validate()
        self.model = model
        self.optimizer = optimizer
        self.layers = lora_layers(model)
        self.step_count = 0
        self.log: List[Event] = []
        c = self.config
        r_max = max(l.A.shape[0] for l in self.layers)
        extra = c.directions if c.directions is not None else 4 * r_max
        with torch.no_grad():  # one batched rsvd over every target weight, cached for the run
            # bf16/fp16 weights go in as they are (rsvd_many computes each in float32, one at a time)
            mats = [l.W.detach() if l.W.dtype != torch.float64 else l.W.detach().float() for l in self.layers]
            k = min([r_max + extra] + [min(w.shape) for w in mats])
            factors = ops.rsvd_many(mats, k, oversample=16, niter=4, seed=c.seed)
        for l, (U, S, V) in zip(self.layers, factors):
            l.U, l.S, l.V = U, S, V
            r = l.A.shape[0]
            l.next_dir = r if c.pissa_init else 0
            l.protected_until = torch.zeros(r, dtype=torch.long)
        if c.pissa_init:
            self._pissa_init()
        self.state = ops.importance_state([l.A for l in self.layers], [l.B for l in self.layers])

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def _pissa_init(self) -> None:
        """A, B on the top r principal directions (scaled by √(σ/s)); W0 −= s B A (one pass per W0)."""
        idx, B_new, A_new = [], [], []
        for l in self.layers:
            r = l.A.shape[0]
            k = min(r, l.S.numel())
            root = (l.S[:k] / l.scaling).sqrt()
            # existing pairs are fused (B A is zero for a fresh LoRA, so this is exact either way)
            idx.append(torch.arange(k))  # on the host: the kernel validates it without a copy back
            B_new.append((l.U[:, :k] * root).to(l.B.dtype))
            A_new.append((l.V[:, :k] * root).T.to(l.A.dtype))
        ops.reinit_pairs_([l.W for l in self.layers], [l.B.data for l in self.layers],
                          [l.A.data for l in self.layers], idx, B_new, A_new, [l.scaling for l in self.layers])

    # -- per step ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> List[torch.Tensor]:
        """One batched AdaLoRA importance update from the current gradients; returns the scores."""
        grads_A, grads_B = [], []
        for l in self.layers:
            if l.A.grad is None or l.B.grad is None:
                raise RuntimeError(f"{l.name}: no gradient; call SRLoRA.step() after optimizer.step() and "
                                   "before the gradients are cleared")
            grads_A.append(l.A.grad)
            grads_B.append(l.B.grad)
        return ops.pair_importance([l.A.data for l in self.layers], [l.B.data for l in self.layers],
                                   grads_A, grads_B, *self.state, beta1=self.config.beta1, beta2=self.config.beta2)

    def step(self) -> Optional[Event]:
        """Update importance; recompose when due. Returns the recomposition event, if any."""
        self.step_count += 1
        c = self.config
        if c.fuse_fraction == 0.0:
            return None
        scores = self.update_importance()
        t = self.step_count
        if t < c.warmup or (t - c.warmup) % c.interval != 0:
            return None
        if c.total_steps is not None and t > c.stop * c.total_steps:
            return None
        return self.recompose(scores)

    @torch.no_grad()
    def recompose(self, scores: List[torch.Tensor]) -> Event:
        c = self.config
        t = self.step_count
        grace = c.grace if c.grace is not None else c.interval
        W, Bs, As, idx, B_new, A_new, scal, names = [], [], [], [], [], [], [], []
        chosen_scores, exhausted = [], 0
        for l, s in zip(self.layers, scores):
            r = l.A.shape[0]
            n = max(1, int(round(c.fuse_fraction * r)))
            eligible = torch.nonzero(l.protected_until <= t).flatten()
            n = min(n, eligible.numel(), l.S.numel() - l.next_dir)
            if n <= 0:
                exhausted += int(l.S.numel() - l.next_dir <= 0)
                continue
            s_host = s.float().cpu()  # the choice is made on the host (small; a recomposition is rare)
            order = torch.argsort(s_host[eligible], stable=True)[:n]
            pick = eligible[order].sort().values
            pick_dev = pick.to(l.W.device)
            dirs = torch.arange(l.next_dir, l.next_dir + n, device=l.S.device)
            l.next_dir += n
            root = (l.S[dirs] / l.scaling).sqrt()
            W.append(l.W)
            Bs.append(l.B.data)
            As.append(l.A.data)
            idx.append(pick)  # host indices: no device-to-host copy inside the op
            B_new.append((l.U[:, dirs] * root).to(l.B.dtype))
            A_new.append((l.V[:, dirs] * root).T.to(l.A.dtype))
            scal.append(l.scaling)
            names.append(l.name)
            chosen_scores.append(s_host[pick])
            l.protected_until[pick] = t + grace
            self._reset_pairs(l, pick_dev)
        if W:
            ops.reinit_pairs_(W, Bs, As, idx, B_new, A_new, scal)
        allc = torch.cat(chosen_scores) if chosen_scores else torch.zeros(1)
        ev = Event(t, len(W), sum(i.numel() for i in idx), exhausted, float(allc.mean()), float(allc.min()),
                   float(allc.max()), {n: i.tolist() for n, i in zip(names, idx)})
        self.log.append(ev)
        if c.verbose:
            print(f"[srlora] step {t}: fused+reinit {ev.pairs} pairs in {ev.layers} layers "
                  f"(score mean {ev.score_mean:.3g}, min {ev.score_min:.3g}, max {ev.score_max:.3g}); "
                  f"{exhausted} layers out of directions")
        return ev

    def _reset_pairs(self, l: _Layer, pick: torch.Tensor) -> None:
        """Zero the importance states and optimizer moments of pairs ``pick`` of layer ``l``."""
        k = self.layers.index(l)
        ipt_A, ipt_B, unc_A, unc_B = (s[k] for s in self.state)
        for st in (ipt_A, unc_A):
            st[pick] = 0
        for st in (ipt_B, unc_B):
            st[:, pick] = 0
        if not (self.config.reset_optimizer and self.optimizer is not None):
            return
        for p, rows in ((l.A, True), (l.B, False)):
            for v in self.optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    if rows:
                        v[pick] = 0
                    else:
                        v[:, pick] = 0

    # -- results -------------------------------------------------------------------------------
    def base_state_dict(self) -> Dict[str, torch.Tensor]:
        """The modified base weights (name -> tensor), to save next to the peft adapter."""
        return {l.name + ".base_layer.weight": l.weight.detach().clone() for l in self.layers}

    def summary(self) -> str:
        pairs = sum(e.pairs for e in self.log)
        return (f"SRLoRA: {len(self.layers)} layers, {self.step_count} steps, {len(self.log)} recompositions, "
                f"{pairs} pairs fused and re-initialised")


try:
    from transformers import TrainerCallback as _TrainerCallback
except Exception:  # transformers is optional for the library itself
    _TrainerCallback = object


class SRLoRACallback(_TrainerCallback):
    """transformers ``Trainer`` callback: builds SRLoRA at train begin and steps it right after
    each optimizer step (``on_optimizer_step``, before the Trainer clears the gradients)."""

    def __init__(self, config: Optional[SRLoRAConfig] = None):
        self.config = config or SRLoRAConfig()
        self.srlora: Optional[SRLoRA] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.config.total_steps is None and state.max_steps:
            self.config.total_steps = state.max_steps
        self.srlora = SRLoRA(model, optimizer, self.config)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.srlora is not None:
            self.srlora.step()
