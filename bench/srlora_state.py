"""Size and time of an SRLoRA state saved with the run's record against one with the weights whole.

    .venv/bin/python bench/srlora_state.py [--blocks 1] [--rank 16] [--recompositions 9] [--dtype bfloat16]

Builds ``--blocks`` blocks of a 7B-shaped model's Linears (q, k, v, o 4096 x 4096; gate, up 4096 ->
11008; down 11008 -> 4096) in ``--dtype``, LoRA of rank ``--rank`` on all of them with float32 factors,
and trains it for 10 steps per recomposition (warmup and interval 10; the default schedule of 1,000 steps,
interval 100, has 9 recompositions) on random inputs. Then saves the SRLoRA state both ways
(``base="record"`` and ``base="whole"``), loads each into a fresh model with ``load_base_weights``, and
prints the file sizes, the times and whether the loaded base weights equal the run's bit for bit.
Writes into a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from subspace_ext.srlora import SRLoRA, SRLoRAConfig, load_base_weights  # noqa: E402

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (4096, 11008), "up": (4096, 11008), "down": (11008, 4096)}   # (in, out)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, (i, o) in SHAPES.items():
            setattr(self, name, torch.nn.Linear(i, o, bias=False))

    def forward(self, x):
        h = self.o(self.q(x) + self.k(x) + self.v(x))
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def build(blocks: int, rank: int, dtype: torch.dtype):
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(*(Block() for _ in range(blocks)))
    for p in base.parameters():
        p.data = (p.data * 0.5).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(SHAPES)))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--recompositions", type=int, default=9)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    steps = 10 * (a.recompositions + 1)
    model = build(a.blocks, a.rank, dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.perf_counter()
    sr = SRLoRA(model, opt, SRLoRAConfig(interval=10, warmup=10, total_steps=steps))
    print(f"SRLoRA start: {time.perf_counter() - t0:.1f} s", flush=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(2, 4096, generator=g).to(dtype)).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sr.step()
    weights = sum(l.weight.numel() * l.weight.element_size() for l in sr.layers)
    print(f"{len(sr.log)} recompositions; base weights {weights / 1e6:.1f} MB ({a.dtype}); pairs recorded a layer: "
          f"{sorted({sum(l.record.q) if l.record else None for l in sr.layers}, key=str)}")
    want = sr.base_state_dict()
    with tempfile.TemporaryDirectory() as work:
        for base in ("record", "whole"):
            folder = os.path.join(work, base)
            t0 = time.perf_counter()
            path = sr.save(folder, base=base)
            saved = time.perf_counter() - t0
            fresh = build(a.blocks, a.rank, dtype)
            t0 = time.perf_counter()
            load_base_weights(fresh, folder, check_adapter=False)   # the base weights alone are compared
            loaded = time.perf_counter() - t0
            same = all(torch.equal(fresh.state_dict()[k], w) for k, w in want.items())
            print(f"base={base}: {os.path.getsize(path) / 1e6:.1f} MB, saved in {saved:.2f} s, loaded in "
                  f"{loaded:.2f} s, base weights bit-identical: {same}", flush=True)


if __name__ == "__main__":
    main()
