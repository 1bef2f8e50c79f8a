"""EigenLoRAx on LoRA of MoE expert parameters: a training step of a Qwen3-MoE-shaped model (``bench.qwen3_moe``:
2 layers, 32 experts) with peft's LoRA r=8 on q_proj and both expert parameters (peft's ParamWrapper) against the
same model with EigenLoRAx loadings (rank 8, K = 16 per expert and side, over a subspace of three random such
adapters), and peft's LoRA on q_proj alone (the floor: the backward runs through the frozen experts as well, but
no expert has an update). Both expert adapters add each expert's update to its parameter in the forward (W + ΔW of
every expert) and so get the parameter's whole gradient in the backward; EigenLoRAx trains 2·K·r numbers per
expert instead of (m + n)·r."""
from __future__ import annotations

import pytest
import torch

from subspace_ext import bench

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def subspace(tmp_path_factory):
    peft = pytest.importorskip("peft")
    from subspace_ext import eigenlorax
    tmp = tmp_path_factory.mktemp("moe")
    base = bench.qwen3_moe()
    if base is None:
        pytest.skip("this transformers has no Qwen3-MoE, or keeps its experts as Linear layers")
    base.save_pretrained(str(tmp / "base"))
    adapters = []
    for seed in range(3):
        pm = peft.get_peft_model(bench.qwen3_moe(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                                                    target_parameters=TARGETS))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(str(tmp / f"a{seed}"))
        adapters.append(str(tmp / f"a{seed}"))
    return eigenlorax.build_subspace(adapters, components=16, base=str(tmp / "base"))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("kind", ["peft LoRA", "EigenLoRAx", "q_proj LoRA only"])
def test_moe_training_step(benchmark, subspace, kind, device):
    import peft

    from subspace_ext import eigenlorax
    model = bench.qwen3_moe(device)
    if kind == "EigenLoRAx":
        eigenlorax.apply(model, subspace, 8)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                                           target_parameters=TARGETS if kind == "peft LoRA" else None))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (4, 64), generator=g).to(device) for _ in range(8)]
    step = bench.lm_training_step(model, opt, batches, device)
    benchmark.group = f"Qwen3-MoE-shaped (32 experts), adapter on the experts, training step, {device}"
    benchmark.extra_info["trainable"] = sum(p.numel() for p in params)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
