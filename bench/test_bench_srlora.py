"""SRLoRA's per-step overhead: a MiniLM + LoRA r=8 training step with and without ``SRLoRA.step()``
(importance update every step, recomposition every ``interval`` steps at the default interval 100 and
at 10, amortised over the benchmark rounds), plus ``SRLoRA.step()`` alone on a recomposition step."""
from __future__ import annotations

import random

import pytest
import torch

from subspace_ext import bench, data, train
from subspace_ext.srlora import SRLoRA, SRLoRAConfig

BATCH = 32


@pytest.fixture(scope="module")
def task():
    try:
        return data.word_task("vader-polarity", limit=2000)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _setup(task, interval):
    model, tok = train.load_classifier(seed=0)
    model = train.lora_model(model, r=8, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    sr = None
    if interval:
        sr = SRLoRA(model, opt, SRLoRAConfig(interval=interval, warmup=0, total_steps=10 ** 9))
    rng = random.Random(0)
    batches = [train.encode(tok, [task.train[rng.randrange(len(task.train))] for _ in range(BATCH)])
               for _ in range(8)]
    return model, opt, sr, batches


@pytest.mark.parametrize("interval", [0, 100, 10], ids=["plain LoRA", "SRLoRA interval 100", "SRLoRA interval 10"])
def test_training_step(benchmark, task, interval):
    model, opt, sr, batches = _setup(task, interval)
    model.train()
    it = [0]

    def step():
        enc, y = batches[it[0] % len(batches)]
        it[0] += 1
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sr is not None:
            sr.step()

    benchmark.group = f"MiniLM + LoRA r=8 training step, batch {BATCH}"
    benchmark.pedantic(step, rounds=60, iterations=1, warmup_rounds=3)
    if sr is not None:
        benchmark.extra_info["recompositions"] = len(sr.log)


def test_srlora_step_alone(benchmark, task):
    """One SRLoRA.step() that recomposes (interval 1): the importance update + fuse/reinit of 12 layers."""
    model, opt, sr, batches = _setup(task, 1)
    enc, y = batches[0]
    torch.nn.functional.cross_entropy(model(**enc).logits, y).backward()
    opt.step()
    benchmark.group = "SRLoRA.step() alone"
    benchmark.pedantic(sr.step, rounds=30, iterations=1, warmup_rounds=2)


def _moe_setup(interval, device):
    """A Qwen3-MoE-shaped model (2 layers, 32 experts of 512 x 512 gate_up and 512 x 256 down, top 4, hidden 512),
    LoRA r=8 on q_proj and both expert parameters (peft's target_parameters): 130 SRLoRA layers, one per expert."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = bench.qwen3_moe(device)
    if model is None:
        pytest.skip("this transformers has no Qwen3-MoE, or keeps its experts as Linear layers")
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    sr = SRLoRA(model, opt, SRLoRAConfig(interval=interval, warmup=0, total_steps=10 ** 9)) if interval else None
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (4, 64), generator=g).to(device) for _ in range(8)]
    return model, opt, sr, batches


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("interval", [0, 100], ids=["plain LoRA", "SRLoRA interval 100"])
def test_moe_training_step(benchmark, interval, device):
    """SRLoRA on LoRA of MoE expert parameters: a training step of the Qwen3-MoE-shaped model of ``_moe_setup``
    with and without ``SRLoRA.step()`` (each expert a layer; the importance update one op layer per parameter)."""
    model, opt, sr, batches = _moe_setup(interval, device)
    model.train()
    step = bench.lm_training_step(model, opt, batches, device, sr.step if sr is not None else None)
    benchmark.group = f"Qwen3-MoE-shaped (32 experts) + LoRA r=8 on the experts, training step, {device}"
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    if sr is not None:
        benchmark.extra_info["layers"] = len(sr.layers)
