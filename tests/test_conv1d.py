"""GPT-2-style bases: transformers' Conv1D stores its weight in x out, and peft marks such adapters
``fan_in_fan_out``. lora_A / lora_B keep the Linear convention (ΔW = s B A is out x in), so every
method must read the base weight transposed — and must be checked against the layout, since a
square layer (GPT-2's attention c_proj) would accept either orientation silently.

A tiny GPT-2 with random weights is built from its config (nothing is downloaded); the Linear twin
of each test is the same network with every Conv1D weight transposed into a torch.nn.Linear."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from subspace_ext import eigenlorax, io, solar  # noqa: E402
from subspace_ext.srlora import SRLoRA, SRLoRAConfig  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]  # 24 -> 72, 24 -> 24 (square) and 96 -> 24, 24 -> 96


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=24, n_layer=2, n_head=2)
    return transformers.GPT2Model(cfg).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpt2_base"))
    _gpt2().save_pretrained(path, safe_serialization=True)
    return path


def _load_base(base_dir):
    return transformers.GPT2Model.from_pretrained(base_dir).eval()


def _adapter(base_dir, folder, seed: int, r: int = 4) -> str:
    """A peft LoRA adapter of the tiny GPT-2 with random (non-zero) factors, saved in ``folder``."""
    model = peft.get_peft_model(_load_base(base_dir), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _gpt2_lm(tmp_path, n_layer: int = 2) -> str:
    """A tiny GPT2LMHeadModel (Conv1D layers and a Linear lm_head) saved as a model folder."""
    torch.manual_seed(0)
    base = str(tmp_path / "gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=24, n_layer=n_layer,
                                                         n_head=2)).eval().save_pretrained(base)
    return base


def _save_random(model, folder: str, g: torch.Generator) -> str:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return folder


def _lm_logits(base: str, adapter: str) -> torch.Tensor:
    m = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return m(input_ids=torch.arange(12).reshape(2, 6) % 64).logits.double()


def _outputs(base_dir, adapter_dir) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(_load_base(base_dir), adapter_dir).eval()
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.double()


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    return _adapter(base_dir, str(tmp_path_factory.mktemp("gpt2_lora")), seed=1)


def test_peft_marks_conv1d_adapters_fan_in_fan_out(adapter_dir):
    ad = io.PeftAdapter.load(adapter_dir)
    assert ad.config["fan_in_fan_out"] is True
    ups = ad.updates()
    assert len(ups) == 2 * len(TARGETS) + 2  # c_proj is in attn and mlp, per block
    assert all(u.fan_in_fan_out for u in ups)
    assert {u.shape for u in ups} == {(72, 24), (24, 24), (96, 24), (24, 96)}  # out x in


def test_solar_full_roundtrip_gives_peft_the_same_model(base_dir, adapter_dir, tmp_path):
    pkg = solar.compress(adapter_dir, base_dir, budget="full")
    assert max(l.rel_error for l in pkg.layers) < 1e-5
    out = str(tmp_path / "restored")
    solar.decompress(pkg, base_dir).save_adapter(out)
    assert io.PeftAdapter.load(out).config["fan_in_fan_out"] is True
    torch.testing.assert_close(_outputs(base_dir, out), _outputs(base_dir, adapter_dir), atol=2e-5, rtol=0)


def _linear_twin(base_dir, adapter_dir, tmp_path):
    """The same base with every Conv1D weight stored transposed (as a Linear's out x in) and the same
    adapter marked fan_in_fan_out = False: mathematically the same network and update."""
    tensors = io.read_safetensors(os.path.join(base_dir, "model.safetensors"))
    conv = {k for k in tensors if k.endswith(".weight") and any(f".{t}." in k for t in TARGETS)}
    twin_base = str(tmp_path / "twin_base.safetensors")
    io.save_safetensors({k: (v.T.contiguous() if k in conv else v) for k, v in tensors.items()}, twin_base)
    ad = io.PeftAdapter.load(adapter_dir)
    twin = io.PeftAdapter(dict(ad.config, fan_in_fan_out=False), dict(ad.tensors))
    return twin_base, twin


def test_solar_reads_conv1d_weights_transposed(base_dir, adapter_dir, tmp_path):
    """The Conv1D adapter and its Linear twin give the same coefficients at a tight budget: the basis
    comes from W0ᵀ (out x in), not from the stored in x out weight."""
    twin_base, twin = _linear_twin(base_dir, adapter_dir, tmp_path)
    got = solar.compress(adapter_dir, base_dir, ratio=0.3)
    ref = solar.compress(twin, twin_base, ratio=0.3)
    for g, r in zip(got.indices, ref.indices):
        assert torch.equal(g, r)
    for g, r in zip(got.values, ref.values):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert [l.rel_error for l in got.layers] == pytest.approx([l.rel_error for l in ref.layers], rel=1e-5)
    assert 0.0 < min(l.rel_error for l in got.layers)  # lossy at this ratio: the test can tell layouts apart


def test_solar_layout_per_layer(base_dir, adapter_dir, tmp_path):
    """peft decides the layout per module type (its config flag is global and it flips it per module):
    the module's type decides where the base has a config.json (a square Conv1D weight, attn.c_proj,
    was read out x in under a flag of False); from a bare file a non-square layer stored the other way
    round is read as stored, and a square one takes the flag. The decoder uses the layout recorded per
    layer, and a base that fits neither way is refused."""
    ad = io.PeftAdapter.load(adapter_dir)
    flagless = io.PeftAdapter(dict(ad.config, fan_in_fan_out=False), dict(ad.tensors))
    assert all(l.fan_in_fan_out for l in solar.compress(flagless, base_dir, budget="full").layers)
    bare = str(tmp_path / "bare.safetensors")
    io.save_safetensors(io.read_safetensors(os.path.join(base_dir, "model.safetensors")), bare)
    pkg = solar.compress(flagless, bare, budget="full")
    assert [l.fan_in_fan_out for l in pkg.layers] == [l.shape[0] != l.shape[1] for l in pkg.layers]
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    out = str(tmp_path / "restored")
    solar.decompress(path, base_dir).save_adapter(out)
    torch.testing.assert_close(_outputs(base_dir, out), _outputs(base_dir, adapter_dir), atol=2e-5, rtol=0)
    tensors = io.read_safetensors(os.path.join(base_dir, "model.safetensors"))
    key = "h.0.attn.c_attn.weight"
    wrong = str(tmp_path / "wrong.safetensors")
    io.save_safetensors(dict(tensors, **{key: torch.randn(24, 70)}), wrong)
    with pytest.raises(solar.BaseMismatchError, match=r"c_attn.weight has shape \(24, 70\).*needs \(24, 72\)"):
        solar.compress(adapter_dir, wrong, budget="full")
    with pytest.raises(solar.BaseMismatchError, match=r"c_attn.weight has shape \(24, 70\)"):
        solar.decompress(path, wrong)


def test_solar_dense_gpt2_reads_module_types(base_dir, tmp_path):
    """A dense GPT-2 fine-tune: the Conv1D deltas are carried (transposed to out x in, decoded as a
    fan_in_fan_out LoRA that peft loads); the changed token embedding is skipped, not taken for a
    Linear weight (its name has no "embed"); the model's config decides, not the names."""
    tensors = io.read_safetensors(os.path.join(base_dir, "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    ft = dict(tensors)
    for key in ("h.0.attn.c_attn.weight", "h.1.attn.c_proj.weight", "h.1.mlp.c_fc.weight"):
        n_in, n_out = ft[key].shape
        ft[key] = ft[key] + 0.2 * torch.randn(n_in, 2, generator=g) @ torch.randn(2, n_out, generator=g)
    ft["wte.weight"] = ft["wte.weight"] + 1.0
    ft_dir = str(tmp_path / "ft")
    model = _load_base(base_dir)
    model.load_state_dict(ft)
    model.save_pretrained(ft_dir, safe_serialization=True)
    pkg = solar.compress_dense(ft_dir, base_dir, budget="full", rank=2)
    assert pkg.skipped == ["wte.weight"]
    assert all(l.fan_in_fan_out for l in pkg.layers) and max(l.rel_error for l in pkg.layers) < 1e-6
    out = str(tmp_path / "restored")
    solar.decompress(pkg, base_dir).save_adapter(out)
    expected = _load_base(base_dir)
    expected.load_state_dict(dict(ft, **{"wte.weight": tensors["wte.weight"]}))
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        want = expected(input_ids=ids).last_hidden_state.double()
    torch.testing.assert_close(_outputs(base_dir, out), want, atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def subspace(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_sources")
    sources = [_adapter(base_dir, str(root / f"a{i}"), seed=10 + i) for i in range(3)]
    return eigenlorax.build_subspace(sources, components=4, augment=2, base=base_dir)


def test_eigenlorax_on_conv1d_merge_and_export(base_dir, subspace, tmp_path):
    assert subspace.meta["fan_in_fan_out"] is True
    model = _load_base(base_dir)
    em = eigenlorax.apply(model, subspace, 3, scaling=1.5, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for l in em.layers.values():
            l.alpha_B.copy_(torch.randn(l.alpha_B.shape, generator=g))
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state.double()
        em.merge()
        merged = model(input_ids=ids).last_hidden_state.double()
        em.unmerge()
        after = model(input_ids=ids).last_hidden_state.double()
    torch.testing.assert_close(merged, before, atol=2e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
    out = str(tmp_path / "export")
    em.export_peft(out)
    assert io.PeftAdapter.load(out).config["fan_in_fan_out"] is True
    torch.testing.assert_close(_outputs(base_dir, out), before, atol=2e-5, rtol=0)
    task = str(tmp_path / "task.safetensors")
    em.save_coefficients(task)
    out2 = str(tmp_path / "export_task")
    eigenlorax.export_task(subspace, task, out2, scaling=1.5)
    assert io.PeftAdapter.load(out2).config["fan_in_fan_out"] is True
    torch.testing.assert_close(_outputs(base_dir, out2), before, atol=2e-5, rtol=0)


def test_conv1d_and_linear_layers_in_one_adapter(tmp_path):
    """A GPT-2 adapter on c_attn, c_proj and lm_head (a Linear): peft saves its last choice of layout,
    fan_in_fan_out = False, for all. SOLAR read the square Conv1D attn.c_proj out x in under it (lossless
    still exact, but a basis of Wᵀ's transpose: lossy errors 0.9 where 0.35 is right), and eigen build
    --base blamed the base. Each layer now takes its module's layout, and eigen accepts both."""
    base = _gpt2_lm(tmp_path)
    folders = []
    for i in range(2):
        model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "lm_head"],
                                                    fan_in_fan_out=True))
        folders.append(_save_random(model, str(tmp_path / f"a{i}"), torch.Generator().manual_seed(i + 1)))
    assert io.PeftAdapter.load(folders[0]).config["fan_in_fan_out"] is False   # peft's last choice
    pkg = solar.compress(folders[0], base, budget="full")
    assert {l.module: l.fan_in_fan_out for l in pkg.layers} == {
        l.module: not l.module.endswith("lm_head") for l in pkg.layers}
    out = str(tmp_path / "restored")
    solar.decompress(pkg, base).save_adapter(out)
    torch.testing.assert_close(_lm_logits(base, out), _lm_logits(base, folders[0]), atol=2e-5, rtol=0)
    other = io.PeftAdapter.load(folders[1])   # the flags may disagree (peft's last choice): harmless
    flagged = io.PeftAdapter(dict(other.config, fan_in_fan_out=True), dict(other.tensors))
    sub = eigenlorax.build_subspace([io.PeftAdapter.load(folders[0]), flagged], components=2, base=base)
    assert sub.meta["fan_in_fan_out"] is True and "lm_head" in sub.meta["fingerprints"]


def test_srlora_on_conv1d_is_continuous(base_dir):
    """SRLoRA fuses into and re-initialises from the transposed (in x out) Conv1D weights."""
    model = peft.get_peft_model(_load_base(base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sr = SRLoRA(model, opt, SRLoRAConfig(interval=2, warmup=2, fuse_fraction=0.5))
    ids = torch.arange(24).reshape(3, 8) % 64
    for step in range(1, 5):
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            before = model(input_ids=ids).last_hidden_state.double()
        ev = sr.step()
        with torch.no_grad():
            after = model(input_ids=ids).last_hidden_state.double()
        if step % 2 == 0:
            assert ev is not None and ev.pairs == 2 * len(sr.layers)
            torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert len(changed) == len(sr.layers)  # every Conv1D weight took fused pairs, in its own layout
    for l in sr.layers:
        assert l.W.shape == (l.B.shape[0], l.A.shape[1]) and l.weight.shape == (l.A.shape[1], l.B.shape[0])


def test_the_model_is_built_only_where_it_may_hold_conv1d(base_dir, adapter_dir, tmp_path):
    """The square layers' layout comes from the module types, but building a model (importing its code)
    cost 2-3 s and 155 MB per compress: it is built only where config.json's model types may hold Conv1D
    (a type transformers does not ship, remote code, is not built: its layouts come from shapes and flag)."""
    bw = io.BaseWeights(base_dir)
    assert bw.may_hold_conv1d
    solar.compress(adapter_dir, bw, budget="full")
    assert "skeleton" in bw.__dict__   # GPT-2: built
    torch.manual_seed(0)
    bert = str(tmp_path / "bert")
    transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=48)).save_pretrained(bert)
    model = peft.get_peft_model(transformers.BertModel.from_pretrained(bert),
                                peft.LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(str(tmp_path / "bert_lora"))
    bw = io.BaseWeights(bert)
    assert not bw.may_hold_conv1d
    pkg = solar.compress(str(tmp_path / "bert_lora"), bw, budget="full")
    assert "skeleton" not in bw.__dict__ and not any(l.fan_in_fan_out for l in pkg.layers)
    for cfg, want in (({"model_type": "vision-encoder-decoder", "decoder": {"model_type": "gpt2"}}, True),
                      ({"model_type": "some-remote-code-model"}, False), ({"model_type": "llama"}, False),
                      ({"model_type": "openai-gpt"}, True)):   # its module is transformers.models.openai
        folder = tmp_path / cfg["model_type"]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        io.save_safetensors({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
        assert io.BaseWeights(str(folder)).may_hold_conv1d is want, cfg


def test_lora_on_conv1d_weights_as_parameters(tmp_path):
    """peft's target_parameters adds scaling * B @ A to the weight as stored (in x out for a Conv1D), not
    transposed as its LoRA on the module does: SOLAR must read those layers as stored (a non-square one
    was refused as 'needs (72, 24)', a square one's basis came from the transpose)."""
    base = _gpt2_lm(tmp_path, n_layer=1)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                target_parameters=["c_attn.weight", "attn.c_proj.weight"]))
    g = torch.Generator().manual_seed(3)
    folder = _save_random(model, str(tmp_path / "tp"), g)
    ups = io.PeftAdapter.load(folder).updates()
    assert all(u.as_stored and not u.fan_in_fan_out for u in ups) and {u.shape for u in ups} == {(24, 72), (24, 24)}
    pkg = solar.compress(folder, base, budget="full")
    assert not any(l.fan_in_fan_out for l in pkg.layers)
    out = str(tmp_path / "restored")
    solar.decompress(pkg, base).save_adapter(out)
    torch.testing.assert_close(_lm_logits(base, out), _lm_logits(base, folder), atol=2e-5, rtol=0)
    # EigenLoRAx: exported as target_parameters (added as stored, as the sources were); apply() refuses it
    other = _save_random(model, str(tmp_path / "tp2"), g)
    sub = eigenlorax.build_subspace([folder, other], components=8, augment=100, base=base)   # complete bases
    assert sub.meta["as_stored"] == sorted(u.module for u in ups)
    src = io.PeftAdapter.load(folder).updates()
    task = {}
    for u in src:   # the first adapter, in the (complete) subspace
        PA, PB = sub.A[u.module].P.double(), sub.B[u.module].P.double()
        task[f"{u.module}.alpha_A"] = (PA.T @ u.A.double().T).float()
        task[f"{u.module}.alpha_B"] = (PB.T @ (u.scaling * u.B.double())).float()
    exported = str(tmp_path / "exported")
    eigenlorax.export_task(sub, task, exported)
    cfg = io.PeftAdapter.load(exported).config
    assert cfg["target_modules"] == [] and sorted(cfg["target_parameters"]) == sorted(f"{u.module}.weight" for u in src)
    torch.testing.assert_close(_lm_logits(base, exported), _lm_logits(base, folder), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="on this Conv1D's weight as a parameter"):
        eigenlorax.apply(transformers.GPT2LMHeadModel.from_pretrained(base), sub, 2)
    saved = str(tmp_path / "sub.safetensors")   # a reader that does not know as_stored must refuse the file
    sub.save(saved)
    assert io.safetensors_metadata(saved)["format_version"] == "2"
    assert eigenlorax.EigenSubspace.load(saved).meta["as_stored"] == sub.meta["as_stored"]
    module_lora = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"]))
    module_lora = _save_random(module_lora, str(tmp_path / "modules"), g)
    with pytest.raises(ValueError, match=r"modules has LoRA on the module, other adapters on its weight as a param"):
        eigenlorax.build_subspace([folder, module_lora], components=2)


def test_eigenlorax_on_a_tied_lm_head_saves_and_resumes(tmp_path):
    """GPT-2's lm_head is its input embedding. Wrapped by apply(), the shared weight's second name was
    lm_head.base.weight, which the model does not declare tied: save_pretrained (and so a Trainer's first
    checkpoint) refused the shared tensor. The wrapper now declares it: the checkpoint holds the embedding
    once, and loads back into a model with EigenLoRAx applied the same way (a Trainer's resume)."""
    from safetensors.torch import load_file
    base = _gpt2_lm(tmp_path, n_layer=1)
    folders = []
    for i in range(2):
        model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                                    peft.LoraConfig(r=2, target_modules=["c_attn", "lm_head"]))
        folders.append(_save_random(model, str(tmp_path / f"a{i}"), torch.Generator().manual_seed(i + 1)))
    sub = eigenlorax.build_subspace(folders, components=2)
    ids = torch.arange(12).reshape(2, 6) % 64
    models, logits = [], []
    for seed in (0, 1):
        model = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
        eigenlorax.apply(model, sub, 2, seed=seed)
        assert model.lm_head.base.weight is model.transformer.wte.weight
        models.append(model)
    models[0].save_pretrained(str(tmp_path / "ckpt"))
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "transformer.wte.weight" in saved and "lm_head.base.weight" not in saved
    assert any(k.startswith("lm_head.alpha") for k in saved)   # the loadings travel
    missing, unexpected = models[1].load_state_dict(saved, strict=False)
    assert set(missing) <= {"lm_head.base.weight", "lm_head.weight"} and not unexpected
    with torch.no_grad():
        for model in models:
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert models[1].lm_head.base.weight is models[1].transformer.wte.weight
