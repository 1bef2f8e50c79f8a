"""peft adapter variants that users produce, on tiny random models built from configs (nothing is
downloaded): the scaling subspace_ext reads must be the one peft applies, and a SOLAR round trip
at budget 'full' must give peft the same model. Each case here was a defect once:

- AdaLoRA after rank allocation: peft keeps ranknum = init_r for pruned layers (scaling alpha /
  init_r, not alpha / pruned r) and may prune a layer to rank 0 (ΔW = 0);
- two alpha_pattern keys matching one module: peft takes the first in the file's order;
- a LoRA on a tied lm_head (the checkpoint holds only the input embedding);
- LoRA on embeddings, and an adapter saved under a non-default name (a subfolder): named in errors;
- EigenLoRAx export with a task type whose peft model restores a head that was not saved."""
from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from subspace_ext import eigenlorax, io, solar  # noqa: E402

IDS = torch.tensor([[5, 17, 3, 42, 8, 61, 2], [9, 1, 33, 70, 12, 4, 50]])


def _bert(path: str) -> str:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def _llama_tied(path: str, tie: bool = True) -> str:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _bert(str(tmp_path_factory.mktemp("bert")))


def _model(base: str):
    cls = transformers.LlamaForCausalLM if os.path.isfile(os.path.join(base, "generation_config.json")) \
        else transformers.BertForSequenceClassification
    return cls.from_pretrained(base).eval()


def _randomize(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _save(base: str, config, folder: str, seed: int = 1, **kw) -> str:
    model = peft.get_peft_model(_model(base), config, **kw)
    _randomize(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _logits(base: str, adapter: str) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(_model(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _scalings(base: str, adapter: str) -> dict:
    model = peft.PeftModel.from_pretrained(_model(base), adapter)
    return {name: mod.scaling["default"] for name, mod in model.base_model.model.named_modules()
            if isinstance(mod, peft.tuners.lora.LoraLayer)}


def _roundtrip(base: str, adapter: str, out: str) -> None:
    """SOLAR at budget 'full' (lossless), decoded, gives peft the same model."""
    solar.decompress(solar.compress(adapter, base, budget="full"), base).save_adapter(out)
    torch.testing.assert_close(_logits(base, out), _logits(base, adapter), atol=1e-5, rtol=0)


def test_pattern_order_survives_save_and_round_trip(bert, tmp_path):
    """Where several alpha_pattern keys match a module the first wins (peft's get_pattern_key), so the written
    adapter_config.json keeps the patterns' order (peft >= 0.22 writes it so) while it sorts every other key: a
    sorted alpha_pattern gave layer 0's query 400 / 4 instead of 1 / 4 after a SOLAR round trip."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
              "alpha_pattern": {"query": 1, "layer.0.attention.self.query": 400},
              "rank_pattern": {"value": 4, "query": 4}, "z": {"b": 1, "a": 2}}
    text = io.config_json(config)
    assert list(json.loads(text)) == sorted(config) and list(json.loads(text)["z"]) == ["a", "b"]
    assert list(json.loads(text)["alpha_pattern"]) == ["query", "layer.0.attention.self.query"]
    assert list(json.loads(text)["rank_pattern"]) == ["value", "query"]
    folder = _save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                         alpha_pattern=config["alpha_pattern"]), str(tmp_path / "a"))
    ad = io.PeftAdapter.load(folder)
    io.PeftAdapter(dict(ad.config, alpha_pattern=config["alpha_pattern"]), ad.tensors).save_adapter(
        str(tmp_path / "ordered"))   # the order peft >= 0.22 saves (0.21 sorted it)
    out = str(tmp_path / "restored")
    solar.decompress(solar.compress(str(tmp_path / "ordered"), bert, budget="full"), bert).save_adapter(out)
    restored = io.PeftAdapter.load(out)
    assert list(restored.config["alpha_pattern"]) == list(config["alpha_pattern"])
    assert {u.module: u.scaling for u in restored.updates()} == \
        {u.module: u.scaling for u in io.PeftAdapter.load(str(tmp_path / "ordered")).updates()}
    torch.testing.assert_close(_logits(bert, out), _logits(bert, str(tmp_path / "ordered")), atol=1e-5, rtol=0)


def test_adalora_after_rank_allocation(bert, tmp_path):
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=["query", "value"], total_step=20,
                             tinit=1, tfinal=2, deltaT=1)
    model = peft.get_peft_model(_model(bert), cfg)
    _randomize(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(20):
        model(input_ids=IDS[:, :5], labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    folder = str(tmp_path / "adalora")
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads(pathlib.Path(folder, "adapter_config.json").read_text())
    ranks = {k: sum(v) for k, v in config["rank_pattern"].items()}
    assert 0 in ranks.values() and any(0 < r < 6 for r in ranks.values())  # both cases are exercised
    ups = io.PeftAdapter.load(folder).updates()
    assert all(u.scaling == pytest.approx(8 / 6, rel=1e-5) for u in ups)  # alpha / init_r, as peft
    pkg = solar.compress(folder, bert, budget="full")
    assert len(pkg.layers) == sum(r > 0 for r in ranks.values())  # rank-0 layers: no update, not carried
    out = str(tmp_path / "restored")
    solar.decompress(pkg, bert).save_adapter(out)
    assert io.PeftAdapter.load(out).config["target_modules"] == [l.module for l in pkg.layers]
    torch.testing.assert_close(_logits(bert, out), _logits(bert, folder), atol=1e-5, rtol=0)
    # relative_errors leaves the rank-0 layers out on both sides (the decoded adapter lacks them)
    assert len(solar.relative_errors(folder, out)) == len(pkg.layers) and max(solar.relative_errors(folder, out)) < 1e-5


@pytest.mark.parametrize("kw", [
    dict(alpha_pattern={"query": 1, "layer.0.attention.self.query": 400}),  # both match layer 0's query
    dict(alpha_pattern={"layer.0.attention.self.query": 400, "query": 1}),
    dict(use_rslora=True, rank_pattern={"value": 2}, alpha_pattern={"value": 3}),
], ids=["overlap-generic-first", "overlap-specific-first", "rslora-patterns"])
def test_scaling_is_the_one_peft_applies(bert, tmp_path, kw):
    folder = _save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **kw),
                   str(tmp_path / "a"))
    ours = {u.module: u.scaling for u in io.PeftAdapter.load(folder).updates()}
    theirs = _scalings(bert, folder)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-12), name
    _roundtrip(bert, folder, str(tmp_path / "restored"))


def test_tied_lm_head(tmp_path):
    base = _llama_tied(str(tmp_path / "llama"))
    assert not any("lm_head" in k for k in io.BaseWeights(base).keys())  # the checkpoint drops it
    folders = [_save(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
                     str(tmp_path / f"a{i}"), seed=i + 1) for i in range(2)]
    _roundtrip(base, folders[0], str(tmp_path / "restored"))
    # in a bare .safetensors file the tie is unknown: the error names the module
    bare = str(tmp_path / "bare.safetensors")
    io.save_safetensors(io.read_safetensors(os.path.join(base, "model.safetensors")), bare)
    with pytest.raises(io.FormatError, match="no weight for adapted module lm_head .*tied .* pass the model's folder"):
        solar.compress(folders[0], bare, budget="full")
    sub = eigenlorax.build_subspace(folders, components=2, base=base)
    assert "lm_head" in sub.meta["fingerprints"]


def test_embedding_lora_is_named(bert, tmp_path):
    only = _save(bert, peft.LoraConfig(r=4, target_modules=["word_embeddings"]), str(tmp_path / "emb"))
    with pytest.raises(io.FormatError, match="lora_embedding_A/B of .*word_embeddings.* not supported"):
        solar.compress(only, bert, budget="full")
    mixed = _save(bert, peft.LoraConfig(r=4, target_modules=["word_embeddings", "query"]), str(tmp_path / "mixed"))
    pkg = solar.compress(mixed, bert, budget="full")
    assert any("LoRA on embeddings is not compressed" in n and "word_embeddings" in n for n in pkg.notes())
    _roundtrip(bert, mixed, str(tmp_path / "restored"))  # carried unchanged
    with pytest.raises(ValueError, match=r"extra tensors.*largest: .*lora_embedding"):
        solar.compress(mixed, bert, ratio=0.1)


def test_adapter_in_a_subfolder_is_pointed_to(bert, tmp_path):
    folder = str(tmp_path / "out")
    _save(bert, peft.LoraConfig(r=4, target_modules=["query"]), folder, adapter_name="other")
    assert os.path.isfile(os.path.join(folder, "other", "adapter_config.json"))
    with pytest.raises(io.FormatError, match=r"adapter folder\(s\) other/.*pass .*other"):
        io.PeftAdapter.load(folder)


def test_eigen_task_type_needs_the_head(bert, tmp_path):
    folders = [_save(bert, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
                     str(tmp_path / f"a{i}"), seed=i + 1) for i in range(2)]
    sub = eigenlorax.build_subspace(folders, components=2)
    em = eigenlorax.apply(_model(bert), sub, 2)
    task = str(tmp_path / "task.safetensors")
    with pytest.raises(ValueError, match="SEQ_CLS makes peft load a trained head"):
        em.save_coefficients(task, task_type="SEQ_CLS")
    assert not os.path.exists(task)
    em.save_coefficients(task)
    with pytest.raises(ValueError, match="SEQ_CLS makes peft load a trained head"):
        eigenlorax.export_task(sub, task, str(tmp_path / "export"), task_type="SEQ_CLS")
    assert not os.path.exists(tmp_path / "export")
    head = {n: p for n, p in em.model.named_parameters() if "classifier" in n}
    em.export_peft(str(tmp_path / "ok"), extra=head, task_type="SEQ_CLS")
    peft.PeftModel.from_pretrained(_model(bert), str(tmp_path / "ok"))  # loads


def _variants():
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig
    return {
        "KaSA": dict(kasa_config=KasaConfig()),
        "BD-LoRA": dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["query"], target_modules_bd_b=["value"],
                                                nblocks=2)),
        "DoRA": dict(use_dora=True),
    }


@pytest.mark.parametrize("variant", ["KaSA", "BD-LoRA", "DoRA"])
def test_lora_variants_whose_update_is_not_s_B_A_are_refused(bert, tmp_path, variant):
    """KaSA's update is s B diag(lora_diag) A: SOLAR compressed s B A with 'no error' and carried
    lora_diag as an extra, so the decoded adapter computed another function; BD-LoRA failed with
    'do not chain'. Each is now refused by name, before any work."""
    folder = _save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                         **_variants()[variant]), str(tmp_path / "a"))
    with pytest.raises(io.FormatError, match=f"{variant} adapters"):
        solar.compress(folder, bert, budget="full")
    plain = _save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), str(tmp_path / "p"))
    with pytest.raises(io.FormatError, match=f"{os.sep}a: {variant} adapters"):
        eigenlorax.build_subspace([plain, folder])


def test_unknown_lora_tensors_are_refused_and_lora_bias_is_carried(bert, tmp_path):
    """A tensor named like a LoRA part that the reader does not know (here a DoRA magnitude vector
    under a config that does not say DoRA) is refused; lora_bias's lora_B.bias is an extra tensor that
    the SOLAR round trip carries (peft computes the same model)."""
    folder = _save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True),
                   str(tmp_path / "bias"))
    _roundtrip(bert, folder, str(tmp_path / "restored"))
    ad = io.PeftAdapter.load(folder)
    key = next(k for k in ad.tensors if k.endswith("lora_A.weight")).replace("lora_A.weight", "lora_magnitude_vector")
    ad.tensors[key] = torch.ones(32)
    with pytest.raises(io.FormatError, match=r"lora_magnitude_vector is not a LoRA factor this reader knows"):
        ad.updates()


@pytest.mark.parametrize("missing", ["lora_A", "lora_B"])
def test_a_factor_without_its_pair_is_refused(bert, tmp_path, missing):
    """A lora_B without its lora_A was dropped without a word (compress reported one layer fewer); the
    reverse was refused. Both are refused, naming the tensor."""
    folder = _save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), str(tmp_path / "a"))
    ad = io.PeftAdapter.load(folder)
    gone = next(k for k in sorted(ad.tensors) if f".{missing}." in k)
    del ad.tensors[gone]
    other = "lora_B" if missing == "lora_A" else "lora_A"
    with pytest.raises(io.FormatError, match=f"{gone.replace(missing, other)} has no matching "):
        ad.updates()


def test_adalora_with_lora_alpha_zero(bert, tmp_path):
    """peft's AdaLoRA takes lora_alpha <= 0 as init_r (a scaling of about 1); it was refused here as a
    zero scaling."""
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=0, target_modules=["query", "value"], total_step=10)
    folder = _save(bert, cfg, str(tmp_path / "a"))
    assert all(u.scaling == pytest.approx(4 / (4 + 1e-5), rel=1e-12) for u in io.PeftAdapter.load(folder).updates())
    _roundtrip(bert, folder, str(tmp_path / "restored"))


def test_tied_lm_head_edge_decoder(tmp_path):
    """The C++ edge decoder finds a tied lm_head's weight as the Python decoder does (it failed with
    'no weight for adapted module lm_head'): from the key the package records, checked by fingerprint."""
    from test_solar_edge import BINARY, _assert_same_folder, _run
    if not (BINARY.is_file() and os.access(BINARY, os.X_OK)):
        pytest.skip(f"edge decoder binary {BINARY} not built (run `make cmake-test`)")
    base = _llama_tied(str(tmp_path / "llama"))
    folder = _save(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), str(tmp_path / "a"))
    pkg = str(tmp_path / "pkg.safetensors")
    solar.compress(folder, base, budget="full", method="solar").save(pkg)
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "py"))
    r = _run(pkg, base, tmp_path / "cpp")
    assert r.returncode == 0, r.stderr
    _assert_same_folder(tmp_path / "py", tmp_path / "cpp")


def test_adapter_of_a_bare_encoder_on_a_task_models_checkpoint(bert, tmp_path):
    """An adapter trained on AutoModel / BertModel (modules encoder.layer.0...) of a BertForSequenceClassification
    checkpoint (weights bert.encoder.layer.0...) was refused by compress and both decoders: 'no weight for adapted
    module'. The one key ending with the module's path is its weight."""
    from test_solar_edge import BINARY, _assert_same_folder, _run

    encoder = lambda: transformers.BertModel.from_pretrained(bert).eval()  # noqa: E731
    model = peft.get_peft_model(encoder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    _randomize(model)
    folder = str(tmp_path / "enc_adapter")
    model.save_pretrained(folder, safe_serialization=True)
    assert any(k.startswith("bert.encoder.") for k in io.BaseWeights(bert).keys())
    pkg = str(tmp_path / "pkg.safetensors")
    solar.compress(folder, bert, budget="full").save(pkg)
    solar.decompress(pkg, bert).save_adapter(str(tmp_path / "py"))

    def hidden(adapter):
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(encoder(), adapter).eval()(input_ids=IDS).last_hidden_state

    torch.testing.assert_close(hidden(str(tmp_path / "py")), hidden(folder), atol=1e-5, rtol=0)
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        r = _run(pkg, bert, tmp_path / "cpp")
        assert r.returncode == 0, r.stderr
        _assert_same_folder(tmp_path / "py", tmp_path / "cpp")


def test_tied_lm_head_decodes_against_a_bare_file(tmp_path):
    """An edge device may hold only model.safetensors: both decoders refused a tied lm_head there (no config to
    say it is tied). The key the encoder resolved is taken, and the fingerprint shows it is that weight."""
    from test_solar_edge import BINARY, _assert_same_folder, _run

    base = _llama_tied(str(tmp_path / "llama"))
    folder = _save(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), str(tmp_path / "a"))
    pkg = str(tmp_path / "pkg.safetensors")
    solar.compress(folder, base, budget="full").save(pkg)
    bare = str(tmp_path / "bare.safetensors")
    io.save_safetensors(io.read_safetensors(os.path.join(base, "model.safetensors")), bare)
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "from_folder"))
    solar.decompress(pkg, bare).save_adapter(str(tmp_path / "py"))
    _assert_same_folder(tmp_path / "from_folder", tmp_path / "py")
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        r = _run(pkg, bare, tmp_path / "cpp")
        assert r.returncode == 0, r.stderr
        _assert_same_folder(tmp_path / "py", tmp_path / "cpp")
    changed = io.read_safetensors(bare)   # another embedding under that key: refused by its fingerprint
    changed["model.embed_tokens.weight"] = changed["model.embed_tokens.weight"] + 1e-3
    io.save_safetensors(changed, bare)
    with pytest.raises(solar.BaseMismatchError, match="layer lm_head: base weight model.embed_tokens.weight"):
        solar.decompress(pkg, bare)


def test_layer_replication_is_refused_by_name(tmp_path):
    """peft's layer_replication stacks copies of base layers (model.layers.2 shares layer 1's weights): the
    adapted module has no weight of its own, and compress said 'no weight for adapted module ... (is this the
    adapter's base model?)' about the right base. Refused by name, as the variants are."""
    base = _llama_tied(str(tmp_path / "llama"))
    folder = _save(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                         layer_replication=[[0, 2], [1, 2]]), str(tmp_path / "rep"))
    with pytest.raises(io.FormatError, match=f"{folder}: layer_replication adapters .* renumbers copies"):
        solar.compress(folder, base, budget="full")
    other = _save(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                        layer_replication=[[0, 2], [1, 2]]), str(tmp_path / "rep2"), seed=2)
    with pytest.raises(io.FormatError, match="layer_replication adapters"):
        eigenlorax.build_subspace([folder, other], components=2, base=base)
    with pytest.raises(io.FormatError, match="layer_replication adapters"):   # nor could an export say it
        eigenlorax.build_subspace([folder, other], components=2)
    io.refuse_layer_replication({"layer_replication": [[0, 2]]}, "x")   # layers 0..1 as they are: passes
    for ranges in ([[1, 3]], [[0, 1], [2, 3]], [[2, 4], [0, 2]]):   # renumbered, though nothing repeats
        with pytest.raises(io.FormatError, match="layer_replication adapters"):
            io.refuse_layer_replication({"layer_replication": ranges}, "x")


@pytest.mark.parametrize("kw", [
    dict(target_modules=[], target_parameters=["q_proj.weight", "v_proj.weight"], alpha_pattern={"q_proj.weight": 32}),
    dict(target_modules=["v_proj"], target_parameters=["q_proj.weight"], alpha_pattern={"v_proj": 4, "q_proj": 64,
                                                                                       "q_proj.weight": 32}),
], ids=["params-only", "params-and-modules"])
def test_target_parameters_scaling_is_the_one_peft_applies(tmp_path, kw):
    """peft matches a target parameter's alpha_pattern / rank_pattern keys on '<module>.<parameter>'
    (q_proj.weight); the reader matched them on the module (q_proj), so a LoRA on a parameter read
    scaling 2 where peft applies 8: a ΔW 4x too small, and an EigenLoRAx subspace weighted wrongly."""
    base = _llama_tied(str(tmp_path / "llama"), tie=False)
    folder = _save(base, peft.LoraConfig(r=4, lora_alpha=8, **kw), str(tmp_path / "a"))
    ours = {u.module: u.scaling for u in io.PeftAdapter.load(folder).updates()}
    theirs = _scalings(base, folder)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    assert len(set(ours.values())) == 2   # the patterns took effect: the test can tell them apart
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-12), name
    _roundtrip(base, folder, str(tmp_path / "restored"))


def test_lora_on_moe_expert_parameters_is_refused_by_eigen_build_by_name(tmp_path):
    """peft's target_parameters on a MoE block's 3-D expert tensors stores one rank-r pair per expert in
    lora_A / lora_B: not scaling * B @ A of a weight. eigen build without a base took it for a Linear and
    exported an adapter peft refuses. (SOLAR takes such adapters: tests/test_moe.py.)"""
    torch.manual_seed(0)
    base = str(tmp_path / "mixtral")
    cfg = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(base, safe_serialization=True)
    folders = []
    for i in range(2):
        model = peft.get_peft_model(transformers.MixtralForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                    target_parameters=["experts.gate_up_proj"]))
        _randomize(model, seed=i + 1)
        model.save_pretrained(str(tmp_path / f"m{i}"), safe_serialization=True)
        folders.append(str(tmp_path / f"m{i}"))
    why = r"mlp.experts: LoRA on the parameter\(s\) gate_up_proj of this module \(peft's target_parameters\)"
    with pytest.raises(io.FormatError, match=why):
        eigenlorax.build_subspace(folders, components=2)
    with pytest.raises(io.FormatError, match=why):
        solar.relative_errors(folders[0], folders[1])


def test_lora_on_a_convolution_is_refused_by_name(tmp_path):
    """LoRA on a Conv2d (4-D lora_A / lora_B) was refused as 'lora_B (32, 4, 1, 1) and lora_A (4, 3, 4, 4)
    do not chain', which reads like a corrupt file."""
    torch.manual_seed(0)
    base = str(tmp_path / "vit")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                 image_size=8, patch_size=4)
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(base, safe_serialization=True)
    model = peft.get_peft_model(transformers.ViTForImageClassification.from_pretrained(base),
                                peft.LoraConfig(r=4, target_modules=["projection", "query"]))
    folders = []
    for i in range(2):
        _randomize(model, seed=i + 1)
        folders.append(str(tmp_path / f"v{i}"))
        model.save_pretrained(folders[-1], safe_serialization=True)
    why = r"projection: lora_A \(4, 3, 4, 4\) / lora_B \(32, 4, 1, 1\) are 4-D: LoRA on a convolution"
    with pytest.raises(io.FormatError, match=why):
        solar.compress(folders[0], base, budget="full")
    with pytest.raises(io.FormatError, match=why):
        eigenlorax.build_subspace(folders, components=2)


def test_base_modifying_init_is_noted(bert, tmp_path):
    """An adapter saved after PiSSA init without peft's conversion holds the init (a principal part of the
    base weight) plus the training: SOLAR's round trip is right (peft redoes the init on load), but its
    errors are of s B A, not of the fine-tune; the package says so, and eigen build warns."""
    folders = [_save(bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                           init_lora_weights="pissa"), str(tmp_path / f"p{i}"), seed=i + 1)
               for i in range(2)]
    pkg = solar.compress(folders[0], bert, budget="full")
    assert any("init_lora_weights='pissa'" in n for n in pkg.notes())
    assert not any("init_lora_weights" in n for n in solar.compress(
        _save(bert, peft.LoraConfig(r=4, target_modules=["query"]), str(tmp_path / "plain")), bert,
        budget="full").notes())
    _roundtrip(bert, folders[0], str(tmp_path / "restored"))
    with pytest.warns(UserWarning, match="init_lora_weights='pissa' without peft's conversion"):
        eigenlorax.build_subspace(folders, components=2)


def _tiny_vit(path: str) -> str:
    """A ViT classifier saved as a folder: transformers (5 and later) loads its stored
    vit.encoder.layer.N.attention.attention.query as vit.layers.N.attention.q_proj, and saves it back
    under the stored name."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48, num_labels=3)
    model = transformers.ViTForImageClassification(cfg)
    if not hasattr(model.vit, "layers"):
        pytest.skip(f"transformers {transformers.__version__} loads ViT under its stored names")
    model.save_pretrained(path)
    return path


def _vit_logits(base: str, adapter=None) -> torch.Tensor:
    model = transformers.ViTForImageClassification.from_pretrained(base)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(pixel_values=torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))).logits


def test_a_model_transformers_loads_under_other_names(tmp_path):
    """peft names a ViT's modules as the loaded model does (vit.layers.0.attention.q_proj); the checkpoint
    stores vit.encoder.layer.0.attention.attention.query.weight. solar compress and eigen build --base
    failed with "no weight for adapted module ... (is this the adapter's base model?)" on the model's own
    folder; the stored key is now found by transformers' load-time renaming, recorded, and the package
    decodes to the adapter (the edge decoder's side: test_solar_edge.py)."""
    base = _tiny_vit(str(tmp_path / "vit"))
    folders = []
    for seed in range(2):
        model = peft.get_peft_model(transformers.ViTForImageClassification.from_pretrained(base),
                                    peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        _randomize(model, seed)
        model.save_pretrained(str(tmp_path / f"a{seed}"))
        folders.append(str(tmp_path / f"a{seed}"))
    pkg = solar.compress(folders[0], base, budget="full")
    assert len(pkg.layers) == 4 and all(l.renamed for l in pkg.layers)
    assert pkg.layers[0].module == "vit.layers.0.attention.q_proj"
    assert pkg.layers[0].base_key == "vit.encoder.layer.0.attention.attention.query.weight"
    pkg.save(str(tmp_path / "p.safetensors"))
    solar.decompress(str(tmp_path / "p.safetensors"), base).save_adapter(str(tmp_path / "dec"))
    assert max(solar.relative_errors(folders[0], str(tmp_path / "dec"))) < 1e-6
    torch.testing.assert_close(_vit_logits(base, str(tmp_path / "dec")), _vit_logits(base, folders[0]),
                               atol=1e-5, rtol=0)
    sub = eigenlorax.build_subspace(folders, components=2, base=base)
    assert set(sub.meta["fingerprints"]) == {l.module for l in pkg.layers}


def test_a_dense_fine_tune_of_a_model_transformers_loads_under_other_names(tmp_path):
    """solar compress --dense of a ViT fine-tune named the decoded adapter's modules by the stored keys
    (vit.encoder.layer.0.attention.attention.query): peft adapted only the classifier and dropped the other
    12 layers with a warning (logits 0.17 off at --budget full). The modules are now the loaded model's."""
    base = _tiny_vit(str(tmp_path / "vit"))
    model = transformers.ViTForImageClassification.from_pretrained(base)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for n in linears:
            w = model.get_submodule(n).weight
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(len(n))))
    model.save_pretrained(str(tmp_path / "ft"))
    pkg = solar.compress_dense(str(tmp_path / "ft"), base, budget="full", rank=32)
    assert sorted(l.module for l in pkg.layers) == sorted(linears) and not pkg.skipped
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "dec"))
    torch.testing.assert_close(_vit_logits(base, str(tmp_path / "dec")), _vit_logits(str(tmp_path / "ft")),
                               atol=1e-4, rtol=0)


def test_a_dense_moe_fine_tune_carries_the_merged_experts_as_expert_lora(tmp_path):
    """Mixtral stores each expert's w1 / w2 / w3 as 2-D weights, which transformers merges into 3-D parameters
    as it loads them: no Linear holds them. compress --dense read them as Linear weights by their name and
    wrote layers for modules the loaded model lacks (an adapter peft could not load where ranks differed).
    The router (stored block_sparse_moe.gate, loaded as mlp.gate: a parameter of a router module, not a Linear) is
    listed as not carried; the attention is carried, and the experts as LoRA on their 3-D parameters (peft's
    target_parameters; tests/test_moe.py)."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                     num_experts_per_tok=1, max_position_embeddings=32)
    base = str(tmp_path / "mixtral")
    moe_model = transformers.MixtralForCausalLM(cfg)
    if not any(p.dim() == 3 for n, p in moe_model.named_parameters() if "experts" in n):
        pytest.skip(f"transformers {transformers.__version__} keeps Mixtral's experts as Linear layers")
    moe_model.save_pretrained(base)
    stored = io.BaseWeights(base)
    model = transformers.MixtralForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in n and "lm_head" not in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    model.save_pretrained(str(tmp_path / "ft"))
    pkg = solar.compress_dense(str(tmp_path / "ft"), base, budget="full", rank=16)
    experts = [k for k in stored.keys() if ".experts." in k]
    assert len(experts) == 6 and not set(experts) & set(pkg.skipped)
    assert [k for k in pkg.skipped if "moe" in k] == ["model.layers.0.block_sparse_moe.gate.weight"]
    assert {l.module for l in pkg.layers} == {"model.layers.0.self_attn." + p for p in ("q_proj", "k_proj", "v_proj",
                                                                                         "o_proj")} | {
        "model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"}
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "dec"))
    loaded = peft.PeftModel.from_pretrained(transformers.MixtralForCausalLM.from_pretrained(base),
                                            str(tmp_path / "dec"))
    adapted = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {l.module for l in pkg.layers}
