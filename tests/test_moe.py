"""SOLAR and SRLoRA on LoRA of a MoE block's 3-D expert parameters (peft's target_parameters, its ParamWrapper).

peft stores one rank-r pair per expert: lora_A (r·E x n) stacks the experts' A_e, lora_B (m x r·E) interleaves
their columns. Mixtral's checkpoint stores each expert's w1 / w3 / w2 as 2-D weights that transformers stacks
(and concatenates) into gate_up_proj / down_proj as it loads the model; GPT-OSS stores the 3-D tensors, in x out.
"""
import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from subspace_ext import eigenlorax, io, solar  # noqa: E402
from subspace_ext.io import safetensors_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BINARY = Path(os.environ.get("SUBSPACE_EXT_SOLAR_DECODE", REPO / "cmake-build" / "solar_decode"))
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _models():
    small = dict(vocab_size=64, hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64)
    square = dict(small, intermediate_size=12)   # gate_up_proj's experts 24 x 24: the model tells the layout
    out = {"mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, small),
           "mixtral_square": (transformers.MixtralConfig, transformers.MixtralForCausalLM, square)}
    if hasattr(transformers, "GptOssForCausalLM"):
        out["gpt_oss"] = (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(small, head_dim=8))
        out["gpt_oss_square"] = (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(square, head_dim=8))
    return out


def _lora_factors(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _moe_model(name, device="cpu"):
    config_cls, model_cls, kw = _models()[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw)).to(device)
    if not isinstance(getattr(model.model.layers[0].mlp.experts, "gate_up_proj", None), torch.nn.Parameter):
        pytest.skip(f"transformers {transformers.__version__} keeps {name}'s experts as Linear layers")
    return model


@pytest.fixture(scope="module", params=sorted(_models()))
def moe(request, tmp_path_factory):
    """(name, base folder, adapter folder, model class) of a tiny MoE model with a LoRA on q_proj and on both
    expert parameters of every layer (the two wrappers nest: experts.base_layer and experts)."""
    model_cls = _models()[request.param][1]
    tmp = tmp_path_factory.mktemp(request.param)
    model = _moe_model(request.param).eval()
    base = str(tmp / "base")
    model.save_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    target_parameters=TARGETS))
    _lora_factors(pm, 1)
    adapter = str(tmp / "adapter")
    pm.save_pretrained(adapter)
    return request.param, base, adapter, model_cls


def _logits(model_cls, base, adapter=None):
    model = model_cls.from_pretrained(base).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.arange(14).reshape(2, 7) % 64).logits


def _expert_updates(adapter, base):
    """(update, (key, parts, transposed)) of each expert of the adapter's LoRA on expert parameters."""
    ad, bw = io.PeftAdapter.load(adapter), io.BaseWeights(base)
    return [e for u in ad.updates(experts=True) if u.params for e in solar._expert_updates(ad, bw, u)]


def test_expert_slices_are_the_loaded_models_parameters(moe):
    """Mixtral's gate_up_proj[e] is transformers' concatenation of the stored w1_e and w3_e: read without the
    model, each expert's slice must equal the loaded model's."""
    _, base, _, model_cls = moe
    bw, model = io.BaseWeights(base), model_cls.from_pretrained(base)
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for param in ("gate_up_proj", "down_proj"):
            key, parts = bw.expert_sources(f"model.layers.{layer}.mlp.experts", param)
            loaded = getattr(experts, param)
            assert len(parts) in (0, loaded.shape[0])
            for e in range(loaded.shape[0]):
                assert torch.equal(bw.get_expert(key, parts[e] if parts else [], e), loaded[e]), (param, e)


def test_each_experts_update_is_the_one_peft_applies(moe):
    """scaling · B_e @ A_e (in the weight's stored layout) of every split expert equals peft's own delta of that
    expert; each is matched to the right parameter of the nested wrappers and gets its base slice's layout."""
    name, base, adapter, model_cls = moe
    pm = peft.PeftModel.from_pretrained(model_cls.from_pretrained(base), adapter)
    wrappers = {n[len("base_model.model."):]: m for n, m in pm.named_modules()
                if type(m).__name__ == "ParamWrapper"}
    split = _expert_updates(adapter, base)
    assert len(split) == 2 * 2 * 3   # layers x parameters x experts
    for u, (key, parts, transposed) in split:
        w = wrappers[u.module]
        assert u.params == (w.parameter_name,) and u.experts == 3
        assert transposed == name.startswith("gpt_oss")   # GPT-OSS's experts are stored experts x in x out
        delta = (u.scaling * u.B.double() @ u.A.double())
        theirs = w.get_delta_weight("default")[u.expert].double()
        torch.testing.assert_close(delta.T if transposed else delta, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(budget="full"), dict(budget="full", method="lowrank")],
                         ids=["solar-full", "lowrank-full"])
def test_full_budget_round_trip_gives_the_same_model(moe, tmp_path, kw):
    _, base, adapter, model_cls = moe
    pkg = solar.compress(adapter, base, **kw)
    assert sum(l.expert >= 0 for l in pkg.layers) == 12 and len(pkg.layers) == 14
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    solar.decompress(path, base).save_adapter(str(tmp_path / "dec"))
    original, restored = (io.PeftAdapter.load(p).tensors for p in (adapter, str(tmp_path / "dec")))
    assert sorted(original) == sorted(restored)
    assert all(restored[k].shape == original[k].shape for k in original)
    torch.testing.assert_close(_logits(model_cls, base, str(tmp_path / "dec")), _logits(model_cls, base, adapter),
                               rtol=0, atol=1e-5)
    assert (_logits(model_cls, base, adapter) - _logits(model_cls, base)).abs().max() > 1e-2   # the LoRA matters


@pytest.mark.parametrize("method,cache", [("solar", True), ("auto", True), ("solar", False)],
                         ids=["solar", "auto", "solar-bases-regenerated"])
def test_lossy_errors_reported_per_expert_are_the_decoded_ones(moe, tmp_path, monkeypatch, method, cache):
    """At a lossy budget each expert's reported error is ‖ΔW_e − ΔŴ_e‖ / ‖ΔW_e‖ of the decoded adapter's expert
    e (split again from the stacked factors): the stacking puts every expert's pair back in its place. Without
    the basis cache the encoder's decode check reads each expert's slice again."""
    _, base, adapter, _ = moe
    if not cache:
        monkeypatch.setattr(solar, "BASIS_CACHE_BYTES", 0)
    pkg = solar.compress(adapter, base, ratio=0.3, method=method)
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    dec = solar.decompress(path, base)
    dec.save_adapter(str(tmp_path / "dec"))
    ours = {(u.module, u.expert): u for u, _ in _expert_updates(str(tmp_path / "dec"), base)}
    theirs = {(u.module, u.expert): u for u, _ in _expert_updates(adapter, base)}
    errors = [l.rel_error for l in pkg.layers if l.expert >= 0]
    assert 0.05 < min(errors) and max(errors) <= 1 and sum(errors) < 0.95 * len(errors)   # lossy, not nothing
    for l in pkg.layers:
        if l.expert >= 0:
            a, b = theirs[l.module, l.expert], ours[l.module, l.expert]
            assert solar._lowrank_rel_error(a.B, a.A, a.scaling, b.B, b.A, b.scaling) == pytest.approx(l.rel_error,
                                                                                                   abs=1e-5)
    assert "(expert 2)" in pkg.summary()


def test_relative_errors_split_expert_lora_with_the_base(moe, tmp_path):
    """relative_errors counts a MoE expert parameter's LoRA one layer per expert, given the base (its expert count and
    layout): a decoded package's errors are the ones the encoder reported. Without the base it is refused by name."""
    _, base, adapter, _ = moe
    pkg = solar.compress(adapter, base, ratio=0.3)
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    dec = solar.decompress(path, base)
    errors = solar.relative_errors(adapter, dec, base=base)
    assert len(errors) == 14 and sorted(errors) == pytest.approx(sorted(l.rel_error for l in pkg.layers), abs=1e-5)
    assert max(solar.relative_errors(adapter, solar.decompress(solar.compress(adapter, base, budget="full"), base),
                                     base=base)) < 1e-5
    with pytest.raises(io.FormatError, match=r"gate_up_proj of this module .* with a base .*relative_errors take MoE"):
        solar.relative_errors(adapter, dec)


@pytest.mark.skipif(not (BINARY.is_file() and os.access(BINARY, os.X_OK)),
                    reason=f"edge decoder binary {BINARY} not built (run `make cmake-test`)")
@pytest.mark.parametrize("kw", [dict(ratio=0.3), dict(ratio=0.3, method="auto", storage="int8")],
                         ids=["solar", "auto-int8"])
def test_edge_decoder_writes_the_same_adapter(moe, tmp_path, kw):
    _, base, adapter, _ = moe
    path = str(tmp_path / "p.safetensors")
    solar.compress(adapter, base, **kw).save(path)
    solar.decompress(path, base).save_adapter(str(tmp_path / "py"))
    _edge_decoder_agrees(path, base, tmp_path)


def _edge_decoder_agrees(path, base, tmp_path):
    """The edge decoder writes tmp_path/"py" (the Python decoder's folder) byte for byte, where it is built."""
    if not (BINARY.is_file() and os.access(BINARY, os.X_OK)):
        return
    r = subprocess.run([str(BINARY), path, base, str(tmp_path / "cpp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cpp" / f).read_bytes(), f


def _edited(path, out, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["solar"])
    edit(info["layers"])
    meta["solar"] = json.dumps(info)
    meta["digest"] = io.content_digest(tensors, meta["solar"])
    save_file(tensors, out, metadata=meta)
    return out


def _both_refuse(path, base, tmp_path, says):
    """Both decoders refuse the package, saying ``says``."""
    with pytest.raises((io.FormatError, solar.BaseMismatchError), match=re.escape(says)):
        solar.decompress(path, base)
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        r = subprocess.run([str(BINARY), path, base, str(tmp_path / "cpp")], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 1 and says in r.stderr, r.stderr


def test_wrong_base_and_edited_packages_are_refused_by_both_decoders(moe, tmp_path):
    name, base, adapter, model_cls = moe
    path = str(tmp_path / "p.safetensors")
    pkg = solar.compress(adapter, base, ratio=0.3)
    pkg.save(path)
    first = next(i for i, l in enumerate(pkg.layers) if l.expert >= 0)
    module = pkg.layers[first].module
    # another model of the same shapes: the first expert layer's slice differs
    torch.manual_seed(5)
    other = str(tmp_path / "other")
    model_cls(model_cls.config_class.from_pretrained(base)).save_pretrained(other)
    q_first = pkg.layers[0].expert < 0   # the q_proj layer comes first in file order: it is named first
    _both_refuse(path, other, tmp_path, f"layer {pkg.layers[0].module}" + ("" if q_first else " (expert 0)"))

    def more(layers):   # a fourth expert the package lacks: the module's LoRA cannot be stacked
        for l in layers[first:first + 3]:
            l["experts"] = 4
    _both_refuse(_edited(path, str(tmp_path / "more.safetensors"), more), base, tmp_path,
                 f"module {module}: 3 layers, not one, nor experts 0 .. E-1 once each")

    def twice(layers):
        layers[first + 1]["expert"] = layers[first]["expert"]
    _both_refuse(_edited(path, str(tmp_path / "twice.safetensors"), twice), base, tmp_path,
                 f"module {module}: 3 layers, not one, nor experts 0 .. E-1")

    def beyond(layers):
        layers[first]["expert"] = 7
    _both_refuse(_edited(path, str(tmp_path / "beyond.safetensors"), beyond), base, tmp_path,
                 "expert 7 of 3 experts: an expert layer needs 0 <= expert < experts")
    for value in (-2, 2 ** 62 + 1, 2 ** 70):   # out of the decoders' range: refused before any list is built
        def huge(layers, value=value):
            for l in layers[first:first + 3]:
                l["experts"] = value
        _both_refuse(_edited(path, str(tmp_path / "huge.safetensors"), huge), base, tmp_path,
                     "experts must be int, got a number out of range")

    def many(layers):   # within range, far more experts than layers: refused without counting to it
        for l in layers[first:first + 3]:
            l["experts"] = 2 ** 62
    _both_refuse(_edited(path, str(tmp_path / "many.safetensors"), many), base, tmp_path,
                 f"module {module}: 3 layers, not one, nor experts 0 .. E-1")

    def foreign_part(layers):   # a part the base lacks (Mixtral), or a 3-D key it lacks (GPT-OSS)
        if layers[first].get("base_parts"):
            layers[first]["base_parts"][0] = "model.layers.0.nothing.weight"
        else:
            layers[first]["base_key"] = "model.layers.0.nothing.weight"
    _both_refuse(_edited(path, str(tmp_path / "part.safetensors"), foreign_part), base, tmp_path,
                 f"layer {module} (expert 0): the base has no weight model.layers.0.nothing.weight")


def test_experts_listed_in_another_order_decode_to_the_same_adapter(moe, tmp_path):
    """Each expert's pair goes to its own place (its recorded index), not to the place of its row in the package."""
    _, base, adapter, _ = moe
    path = str(tmp_path / "p.safetensors")
    pkg = solar.compress(adapter, base, ratio=0.5, method="auto")
    pkg.save(path)
    i = next(k for k, l in enumerate(pkg.layers) if l.expert >= 0)
    j = i + 2   # the first module's experts 0 and 2
    for field in ("layers", "values", "indices", "factors"):
        items = getattr(pkg, field)
        items[i], items[j] = items[j], items[i]
    swapped = str(tmp_path / "order.safetensors")
    pkg.save(swapped)
    assert [l.expert for l in solar.SolarPackage.load(swapped).layers][i:j + 1] == [2, 1, 0]
    want = solar.decompress(path, base).tensors
    got = solar.decompress(swapped, base).tensors
    assert all(torch.equal(want[k], got[k]) for k in want)
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        solar.decompress(path, base).save_adapter(str(tmp_path / "py"))
        r = subprocess.run([str(BINARY), swapped, base, str(tmp_path / "cpp")], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        f = "adapter_model.safetensors"
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cpp" / f).read_bytes()


@pytest.fixture(scope="module")
def eigen_moe(moe, tmp_path_factory):
    """(moe, subspace file, the other two adapters) of an EigenLoRAx subspace built from the moe fixture's adapter and
    two more of other factors (with the base: one layer per expert)."""
    name, base, adapter, _ = moe
    tmp = tmp_path_factory.mktemp(f"eigen_{name}")
    ads = [adapter]
    for seed in (7, 8):
        pm = peft.get_peft_model(_moe_model(name).eval(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=TARGETS))
        _lora_factors(pm, seed)
        pm.save_pretrained(str(tmp / f"ad{seed}"))
        ads.append(str(tmp / f"ad{seed}"))
    path = str(tmp / "sub.safetensors")
    eigenlorax.build_subspace(ads, components=6, base=base).save(path)
    return moe, path, ads


def _model_with(model_cls, base, deltas):
    """The base model with ``deltas`` ({module: (parameter, tensor in the parameter's stored layout)}) added."""
    model = model_cls.from_pretrained(base).eval()
    with torch.no_grad():
        for module, (param, delta) in deltas.items():
            W = getattr(model.get_submodule(module), param)
            W.copy_((W.double() + delta).to(W.dtype))
    return model


def test_eigenlorax_needs_the_base_for_expert_lora(moe, tmp_path):
    _, base, adapter, _ = moe
    ad = io.PeftAdapter.load(adapter)
    io.PeftAdapter(ad.config, {k: 2 * v for k, v in ad.tensors.items()}).save_adapter(str(tmp_path / "twice"))
    with pytest.raises(io.FormatError, match=r"down_proj, gate_up_proj of this module .*EigenLoRAx's build_subspace"):
        eigenlorax.build_subspace([adapter, str(tmp_path / "twice")], components=2)


def test_eigenlorax_subspace_has_a_layer_per_expert(eigen_moe):
    (name, base, adapter, _), path, ads = eigen_moe
    sub = eigenlorax.EigenSubspace.load(path)
    assert sub.experts == {f"model.layers.{i}.mlp.experts.{p}": (3, d) for i in range(2)
                           for p, d in (("gate_up_proj", 1), ("down_proj", 0))}
    assert len(sub.modules) == 2 + 2 * 2 * 3 and len(sub.meta["fingerprints"]) == len(sub.modules)
    assert sub.expert_layer("model.layers.1.mlp.experts.down_proj[2]") == ("model.layers.1.mlp.experts", "down_proj", 2)
    assert sub.expert_layer("model.layers.1.self_attn.q_proj") is None
    assert safetensors_metadata(path)["format_version"] == str(eigenlorax.FORMAT_VERSION_EXPERTS)
    # each expert's components are the top principal directions of its own pairs in the three adapters (float64
    # SVD of the row-centred stack of s·B_e, and of A_eᵀ): the split, the scaling and the order are right
    split = [{f"{eigenlorax._expert_group(u)}[{u.expert}]": u for u, _ in _expert_updates(a, base)} for a in ads]
    for layer in split[0]:
        for side, P in (("B", sub.B[layer].P), ("A", sub.A[layer].P)):
            M = torch.cat([u[layer].B.double() * u[layer].scaling if side == "B" else u[layer].A.double().T
                           for u in split], dim=1)
            U = torch.linalg.svd(M - M.mean(dim=1, keepdim=True), full_matrices=False)[0][:, :6]
            torch.testing.assert_close(P.double() @ P.double().T, U @ U.T, rtol=0, atol=1e-4)
    grown = dict(sub.B, **{"model.layers.0.mlp.experts.down_proj[1]": eigenlorax.SideBasis(
        torch.eye(30, 6), torch.full((6,), 0.1), 6)})   # one expert's basis of another shape
    gu, dn = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    for bad, B, why in (({dn: [4, 0]}, sub.B, "no layer"), ({dn: [3]}, sub.B, "count >= 1"),
                        ({dn: [2, 0]}, sub.B, "beyond its parameter's expert count"),
                        ({gu: [3, 0]}, sub.B, r"nesting depths .* are \[0, 0\]"),
                        ({gu: [3, 2]}, sub.B, "nesting depths"), ({}, grown, "different shapes")):
        meta = dict(sub.meta, experts=dict(sub.meta["experts"], **bad))
        bad_path = path + ".bad"
        eigenlorax.EigenSubspace(sub.A, B, meta).save(bad_path)
        with pytest.raises(io.FormatError, match="malformed subspace file .*experts.*" + why):
            eigenlorax.EigenSubspace.load(bad_path)


def test_eigenlorax_project_start_is_each_experts_projection(eigen_moe):
    """init="project" (rank above K): each expert's update is P_B,e P_B,eᵀ ΔW_e P_A,e P_A,eᵀ of the source's own
    expert update (peft's get_delta_weight, float64), added in the parameter's stored layout (GPT-OSS: in x out)."""
    (name, base, adapter, model_cls), path, _ = eigen_moe
    sub = eigenlorax.EigenSubspace.load(path)
    pm = peft.PeftModel.from_pretrained(model_cls.from_pretrained(base), adapter)
    deltas = {}
    for mod_name, m in pm.named_modules():
        if not hasattr(m, "get_delta_weight"):
            continue
        core = io.unnested(mod_name[len("base_model.model."):])
        if type(m).__name__ == "ParamWrapper":
            param, D = m.parameter_name, m.get_delta_weight("default").double()
            proj = []
            for e in range(D.shape[0]):
                PA, PB = (s[f"{core}.{param}[{e}]"].P.double() for s in (sub.A, sub.B))
                De = D[e].T if name.startswith("gpt_oss") else D[e]
                Pe = PB @ PB.T @ De @ PA @ PA.T
                proj.append(Pe.T if name.startswith("gpt_oss") else Pe)
            deltas[(core, param)] = torch.stack(proj)
        else:
            PA, PB = sub.A[core].P.double(), sub.B[core].P.double()
            deltas[(core, "weight")] = PB @ PB.T @ m.get_delta_weight("default").double() @ PA @ PA.T
    assert len(deltas) == 6
    ref = model_cls.from_pretrained(base).eval()
    with torch.no_grad():
        for (core, param), D in deltas.items():
            W = getattr(ref.get_submodule(core), param)
            W.copy_((W.double() + D).float())
    x = torch.arange(14).reshape(2, 7) % 64
    model = model_cls.from_pretrained(base).eval()
    em = eigenlorax.apply(model, sub, 16, init="project", source=adapter)
    assert isinstance(model.model.layers[0].mlp.experts, eigenlorax.EigenExperts)
    with torch.no_grad():
        got, want, plain = model(x).logits, ref(x).logits, model_cls.from_pretrained(base).eval()(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (want - plain).abs().max() > 1e-2   # the projected update matters
    assert em.coefficient_count() == 6 * 2 * 16 * (2 + 2 * 2 * 3)


def _random_loadings(em, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in em.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_eigenlorax_experts_export_save_merge_unload(eigen_moe, tmp_path):
    """A task on expert parameters: peft loads its export (and the CLI's export of the saved task file: the same
    tensors) to the same logits; load_coefficients onto a fresh model, merge / unmerge (bit for bit) and
    unload(merge=True) keep them; the eigen CLI exports it as well."""
    from subspace_ext import cli
    (name, base, adapter, model_cls), path, _ = eigen_moe
    sub = eigenlorax.EigenSubspace.load(path)
    x = torch.arange(14).reshape(2, 7) % 64
    model = model_cls.from_pretrained(base).eval()
    em = eigenlorax.apply(model, sub, 3)
    _random_loadings(em, 1)
    with torch.no_grad():
        want = model(x).logits
    em.export_peft(str(tmp_path / "exp"))
    assert io.PeftAdapter.load(str(tmp_path / "exp")).config["target_parameters"] == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    torch.testing.assert_close(_logits(model_cls, base, str(tmp_path / "exp")), want, rtol=0, atol=1e-5)
    task = str(tmp_path / "task.safetensors")
    em.save_coefficients(task)
    assert cli.main(["eigen", "export", path, "--coefficients", task, "-o", str(tmp_path / "cli")]) == 0
    a, b = (io.PeftAdapter.load(str(tmp_path / d)).tensors for d in ("exp", "cli"))
    assert sorted(a) == sorted(b)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)   # batched and per-expert products round alike or near
    fresh = model_cls.from_pretrained(base).eval()
    em2 = eigenlorax.apply(fresh, sub, 3, seed=5)
    em2.load_coefficients(task)
    stored = fresh.model.layers[1].mlp.experts.base.down_proj.detach().clone()
    em2.merge()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, rtol=0, atol=1e-5)
    assert not torch.equal(fresh.model.layers[1].mlp.experts.base.down_proj, stored)
    em2.unmerge()
    assert torch.equal(fresh.model.layers[1].mlp.experts.base.down_proj, stored)
    plain = em2.unload(merge=True)
    assert type(plain.model.layers[0].mlp.experts).__name__.endswith("Experts")
    assert not isinstance(plain.model.layers[0].mlp.experts, eigenlorax.EigenExperts)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, want, rtol=0, atol=1e-5)


def test_eigenlorax_trains_experts_of_unequal_k(eigen_moe):
    """Experts whose bases have different K (variance, rank caps) are padded to one stacked basis: the padding's
    loadings get no gradient and stay 0, each expert's task tensors keep its own K, and the forward is each
    expert's own W_e + s·(P_B,e α_B,e)(P_A,e α_A,e)ᵀ (float64 reference)."""
    (name, base, adapter, model_cls), path, _ = eigen_moe
    sub = eigenlorax.EigenSubspace.load(path)
    cut = "model.layers.0.mlp.experts.gate_up_proj[1]"
    sub.A[cut] = eigenlorax.SideBasis(sub.A[cut].P[:, :2].contiguous(), sub.A[cut].explained[:2], 2)
    sub.B[cut] = eigenlorax.SideBasis(sub.B[cut].P[:, :4].contiguous(), sub.B[cut].explained[:4], 4)
    x = torch.arange(14).reshape(2, 7) % 64
    model = model_cls.from_pretrained(base)
    em = eigenlorax.apply(model, sub, 2, scaling=0.5)
    ep = model.model.layers[0].mlp.experts.eigen["gate_up_proj"]
    assert ep.KA == [6, 2, 6] and ep.KB == [6, 4, 6] and float(ep.alpha_A.detach()[1, 2:].abs().max()) == 0
    co = em.coefficients()
    assert co[cut + ".alpha_A"].shape == (2, 2) and co[cut + ".alpha_B"].shape == (4, 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        assert float(ep.alpha_A.grad[1, 2:].abs().max()) == 0 and float(ep.alpha_A.grad.abs().max()) > 0
        opt.step()
    assert float(ep.alpha_A[1, 2:].abs().max()) == 0 and float(ep.alpha_B[1, 4:].abs().max()) == 0
    deltas = {}
    for layer, (aA, aB) in ((k[: -len(".alpha_A")], (v, em.coefficients()[k[:-1] + "B"]))
                            for k, v in em.coefficients().items() if k.endswith(".alpha_A")):
        ex = sub.expert_layer(layer)
        D = 0.5 * (sub.B[layer].P.double() @ aB.double()) @ (sub.A[layer].P.double() @ aA.double()).T
        if ex is None:
            deltas[(layer, "weight", -1)] = D
        else:
            deltas[(ex[0], ex[1], ex[2])] = D.T if name.startswith("gpt_oss") else D
    model.eval()
    ref = model_cls.from_pretrained(base).eval()
    with torch.no_grad():
        for (core, param, e), D in deltas.items():
            W = getattr(ref.get_submodule(core), param)
            target = W if e < 0 else W[e]
            target.copy_((target.double() + D).float())
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eigenlorax_experts_on_cuda(eigen_moe):
    """The same task on CUDA: the logits of the CPU run (float32, 1e-4), a training step's loadings gradients
    (1e-4 relative), and merge / unmerge restoring the experts bit for bit on the device."""
    (name, base, adapter, model_cls), path, _ = eigen_moe
    sub = eigenlorax.EigenSubspace.load(path)
    x = torch.arange(14).reshape(2, 7) % 64
    runs = {}
    for device in ("cpu", "cuda"):
        model = model_cls.from_pretrained(base).to(device)
        em = eigenlorax.apply(model, sub, 3, seed=2)
        assert all(p.device.type == device for p in model.parameters())
        _random_loadings(em, 4)
        model(x.to(device), labels=x.to(device)).loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            logits = model(x.to(device)).logits.cpu()
        runs[device] = (logits, grads, model, em)
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], rtol=0, atol=1e-4)
    for n, g in runs["cpu"][1].items():
        torch.testing.assert_close(runs["cuda"][1][n], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    model, em = runs["cuda"][2], runs["cuda"][3]
    W = model.model.layers[0].mlp.experts.base.gate_up_proj
    kept = W.detach().clone()
    em.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(x.cuda()).logits.cpu(), runs["cpu"][0], rtol=0, atol=1e-4)
    em.unmerge()
    assert torch.equal(W, kept)


@pytest.mark.skipif(not hasattr(transformers, "JetMoeForCausalLM"), reason="this transformers has no JetMoe")
def test_eigenlorax_projects_a_jetmoe_source(tmp_path):
    """JetMoe's experts are a 3-D ``weight``, which an adapter alone reads as 2-D LoRA: init="project" splits the
    source per expert by the subspace's shapes (it used to find no such layer); the start exports to the same logits,
    and a source that adapts more than the subspace (kv_proj) is taken, its extra layer ignored."""
    torch.manual_seed(0)
    cfg = transformers.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=8, intermediate_size=20, num_local_experts=3, num_experts_per_tok=2,
                                    max_position_embeddings=64)
    transformers.JetMoeForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    base, model_cls = str(tmp_path / "base"), transformers.JetMoeForCausalLM
    ads = []
    for seed, extra in ((1, []), (2, []), (3, ["kv_proj"])):
        pm = peft.get_peft_model(model_cls.from_pretrained(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=extra or None,
            target_parameters=["mlp.input_linear.weight", "mlp.output_linear.weight"]))
        _lora_factors(pm, seed)
        pm.save_pretrained(str(tmp_path / f"a{seed}"))
        ads.append(str(tmp_path / f"a{seed}"))
    sub = eigenlorax.build_subspace(ads[:2], components=3, base=base)
    assert len(sub.experts) == 4 and len(sub.modules) == 12
    model = model_cls.from_pretrained(base).eval()
    em = eigenlorax.apply(model, sub, 4, init="project", source=ads[2])
    x = torch.arange(14).reshape(2, 7) % 64
    with torch.no_grad():
        got = model(x).logits
    em.export_peft(str(tmp_path / "exp"))
    torch.testing.assert_close(_logits(model_cls, base, str(tmp_path / "exp")), got, rtol=0, atol=1e-5)
    assert (got - _logits(model_cls, base)).abs().max() > 1e-3


@pytest.mark.skipif(not hasattr(transformers, "NemotronHForCausalLM"), reason="this transformers has no NemotronH")
@pytest.mark.parametrize("subspace_targets", [["experts.up_proj"], ["experts.down_proj"]], ids=["up", "down"])
def test_eigenlorax_project_takes_each_parameters_own_lora(tmp_path, subspace_targets):
    """NemotronH's up_proj and down_proj experts are both square of one shape, so the factors' shapes do not tell the
    source's two wrappers apart: the model's parameter order does (peft's nesting). A subspace on one parameter
    starts from the projection of the source's LoRA of that parameter (float64, from peft's get_delta_weight), not of
    the other one (which the first fix took)."""
    cfg = dict(vocab_size=64, hidden_size=16, moe_intermediate_size=16, intermediate_size=16, head_dim=8,
               layers_block_type=["attention", "moe"], num_attention_heads=2, num_key_value_heads=1,
               n_routed_experts=3, num_experts_per_tok=2, n_shared_experts=1, moe_shared_expert_intermediate_size=16,
               max_position_embeddings=64, n_group=1, topk_group=1)

    def fresh():
        torch.manual_seed(0)
        return transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg)).eval()

    def adapter(targets, seed):
        pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                          target_parameters=targets))
        _lora_factors(pm, seed)
        pm.save_pretrained(str(tmp_path / f"a{seed}"))
        return str(tmp_path / f"a{seed}"), pm

    fresh().save_pretrained(str(tmp_path / "base"))
    sub = eigenlorax.build_subspace([adapter(subspace_targets, s)[0] for s in (1, 2, 3)], components=4,
                                    base=str(tmp_path / "base"))
    source, pm = adapter(["experts.up_proj", "experts.down_proj"], 9)
    em = eigenlorax.apply(fresh(), sub, 8, init="project", source=source)
    checked = 0
    for n, w in pm.named_modules():
        core = io.unnested(n[len("base_model.model."):])
        if type(w).__name__ != "ParamWrapper" or f"{core}.{w.parameter_name}" not in sub.experts:
            continue
        D, layer = w.get_delta_weight("default").double(), f"{core}.{w.parameter_name}"
        want = torch.stack([(lambda PA, PB: PB @ PB.T @ D[e] @ PA @ PA.T)(
            sub.A[f"{layer}[{e}]"].P.double(), sub.B[f"{layer}[{e}]"].P.double()) for e in range(D.shape[0])])
        got = em.layers[core].eigen[w.parameter_name]._delta().double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
        checked += 1
    assert checked == 1


def test_eigenlorax_apply_shows_progress(eigen_moe, monkeypatch):
    """apply(progress=True) draws a bar over the modules it checks (a MoE model's expert fingerprints take seconds
    per layer), on a terminal."""
    import io as io_module
    import sys

    class Terminal(io_module.StringIO):
        def isatty(self):
            return True
    (name, base, adapter, model_cls), path, _ = eigen_moe
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    eigenlorax.apply(model_cls.from_pretrained(base), eigenlorax.EigenSubspace.load(path), 2, progress=True)
    assert "eigen: apply:" in err.getvalue() and "0/4" in err.getvalue()   # q_proj x 2, experts x 2


def test_eigenlorax_refuses_another_experts_base(eigen_moe):
    (name, base, adapter, model_cls), path, _ = eigen_moe
    sub = eigenlorax.EigenSubspace.load(path)
    model = model_cls.from_pretrained(base)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] += 1.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer model.layers.1.mlp.experts.down_proj\[2\]: the model's expert 2"):
        eigenlorax.apply(model, sub, 2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())   # nothing changed
    assert not isinstance(model.model.layers[0].mlp.experts, eigenlorax.EigenExperts)
    eigenlorax.apply(model, sub, 2, check_base=False)


def test_a_bare_file_of_a_merging_model_names_the_folder(moe, tmp_path):
    """From the bare model.safetensors, Mixtral's merged experts cannot be found (no config to ask transformers
    about); GPT-OSS's stored 3-D tensors can."""
    name, base, adapter, _ = moe
    bare = os.path.join(base, "model.safetensors")
    if name.startswith("mixtral"):
        with pytest.raises(solar.BaseMismatchError, match="pass the model's folder"):
            solar.compress(adapter, bare, budget="full")
        return
    folder = solar.compress(adapter, base, budget="full")
    if name == "gpt_oss_square":   # square experts: a bare file does not tell their layout
        with pytest.warns(UserWarning, match="gate_up_proj are square and .* does not tell their layout"):
            pkg = solar.compress(adapter, bare, budget="full")
    else:
        pkg = solar.compress(adapter, bare, budget="full")
        assert [l.fan_in_fan_out for l in pkg.layers] == [l.fan_in_fan_out for l in folder.layers]
    assert [l.fingerprint for l in pkg.layers] == [l.fingerprint for l in folder.layers]
    torch.testing.assert_close(solar.decompress(pkg, bare).tensors, solar.decompress(folder, base).tensors,
                               rtol=1e-5, atol=1e-6)


def test_cli_compresses_and_decompresses_a_moe_adapter(moe, tmp_path, capsys):
    from subspace_ext import cli
    _, base, adapter, model_cls = moe
    pkg, out = str(tmp_path / "p.safetensors"), str(tmp_path / "dec")
    assert cli.main(["solar", "compress", adapter, "--base", base, "-o", pkg, "--budget", "full", "-q"]) == 0
    assert "14 layers" in capsys.readouterr().out
    assert cli.main(["solar", "inspect", pkg]) == 0
    assert "mlp.experts.base_layer (expert 2) |" in capsys.readouterr().out
    assert cli.main(["solar", "decompress", pkg, "--base", base, "-o", out, "-q"]) == 0
    torch.testing.assert_close(_logits(model_cls, base, out), _logits(model_cls, base, adapter), rtol=0, atol=1e-5)


def _srlora_run(name, steps, device="cpu", config=None):
    """(peft model, optimizer, SRLoRA, input, logits before SRLoRA) of a tiny MoE model with LoRA on q_proj and on
    both expert parameters, trained ``steps`` AdamW steps with SRLoRA stepped after each (PiSSA init, then half of
    each layer's pairs recomposed every 2 steps)."""
    from subspace_ext import srlora
    pm = peft.get_peft_model(_moe_model(name, device), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                       target_parameters=TARGETS))
    x = torch.arange(14, device=device).reshape(2, 7) % 64
    before = _moe_logits(pm, x)
    opt = _adamw(pm)
    sr = srlora.SRLoRA(pm, opt, config or srlora.SRLoRAConfig(interval=2, warmup=2, fuse_fraction=0.5,
                                                              total_steps=20))
    for _ in range(steps):
        _srlora_step(pm, opt, sr, x)
    return pm, opt, sr, x, before


def _adamw(pm):
    return torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)


def _backward_and_step(pm, opt, x):
    pm.train()
    opt.zero_grad()
    pm(x, labels=x).loss.backward()
    opt.step()


def _srlora_step(pm, opt, sr, x):
    _backward_and_step(pm, opt, x)
    return sr.step()


def _moe_logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


@pytest.mark.parametrize("name", sorted(_models()))
def test_srlora_recomposes_each_expert_as_a_layer_of_its_own(name, device):
    """SRLoRA on LoRA of the experts' 3-D parameters: one layer per expert, whose pairs are lora_A's rows e·r + k
    and lora_B's columns k·E + e and whose weight is the expert's slice in the update's layout (GPT-OSS's stored
    in x out; square experts told apart by the model). PiSSA and the recomposition keep the function, each
    fusion lands in its own expert's slice, and only the re-initialised pairs' optimizer moments are zeroed."""
    pm, opt, sr, x, before = _srlora_run(name, 0, device)
    torch.testing.assert_close(_moe_logits(pm, x), before, rtol=0, atol=1e-5)   # PiSSA
    experts = [l for l in sr.layers if l.expert >= 0]
    assert len(sr.layers) == 14 and len(experts) == 12 and {l.experts for l in experts} == {3}
    assert experts[0].name.endswith("layers.0.mlp.experts.down_proj[0]")
    assert experts[3].name.endswith("layers.0.mlp.experts.base_layer.gate_up_proj[0]")
    for l in experts:   # s B_e A_e, in W's m x n view, is peft's own update of the expert (after PiSSA: nonzero)
        delta = l.module.get_delta_weight(l.adapter)[l.expert]
        ours = l.scaling * l.B.double() @ l.A.double()
        torch.testing.assert_close(ours.T if name.startswith("gpt_oss") else ours, delta.double(), rtol=1e-5,
                                   atol=1e-7)
        assert l.weight.data_ptr() == l.param.data_ptr() + l.expert * l.param.stride(0) * l.param.element_size()
    assert _srlora_step(pm, opt, sr, x) is None   # step 1: scored, no recomposition
    _backward_and_step(pm, opt, x)
    before = _moe_logits(pm, x)
    params = {id(l.param): l.param.detach().clone() for l in sr.layers}
    factors = [(l.B.clone(), l.A.clone()) for l in sr.layers]
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]}
    ev = sr.step()
    assert ev is not None and ev.layers == 14 and ev.pairs == 28
    torch.testing.assert_close(_moe_logits(pm, x), before, rtol=0, atol=1e-5)
    zeroed = {}
    for l, (B, A) in zip(sr.layers, factors):
        pick = torch.tensor(ev.detail[l.name])
        old = params[id(l.param)]
        old = old if l.expert < 0 else old[l.expert].T if name.startswith("gpt_oss") else old[l.expert]
        fused = l.scaling * (B[:, pick].double() @ A[pick].double() - l.B[:, pick].double() @ l.A[pick].double())
        torch.testing.assert_close(l.W.double(), old.double() + fused, rtol=0, atol=1e-6)
        a_mask = zeroed.setdefault(id(l.A_param), torch.zeros_like(l.A_param, dtype=torch.bool))
        b_mask = zeroed.setdefault(id(l.B_param), torch.zeros_like(l.B_param, dtype=torch.bool))
        l.rows(a_mask)[pick] = True
        l.cols(b_mask)[:, pick] = True
    for g in opt.param_groups:
        for p in g["params"]:
            mask = zeroed[id(p)]
            assert int(mask.sum()) == p.numel() // 2   # half of every layer's pairs
            for k in ("exp_avg", "exp_avg_sq"):
                new, prev = opt.state[p][k], moments[id(p)][k]
                assert bool((new[mask] == 0).all()) and torch.equal(new[~mask], prev[~mask]), k


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("base", ["record", "whole"])
def test_a_moe_srlora_run_saves_reloads_and_resumes(name, base, tmp_path, monkeypatch):
    """The state of a run on expert parameters (each expert's record replayed on its slice, or its slice saved
    whole) loads onto the base model loaded afresh with the run's adapter: the trained model's logits, bit for bit;
    a resumed run goes on as the run does. base_state_dict holds each expert parameter once, whole."""
    from subspace_ext import srlora
    from subspace_ext.io import save_with_digest
    pm, opt, sr, x, _ = _srlora_run(name, 4)
    assert [e.pairs for e in sr.log] == [28, 28]
    trained = _moe_logits(pm, x)
    folder = str(tmp_path / "run")
    pm.save_pretrained(folder)
    saved = []
    monkeypatch.setattr(srlora, "save_with_digest", lambda t, *a: saved.append(t) or save_with_digest(t, *a))
    sr.save(folder, base=base)   # each tensor of its own (an expert's slice and states are views of one tensor)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in saved[0].values())
    state = sr.base_state_dict()
    assert set(state) <= set(pm.state_dict()) and len(state) == 2 * 3   # q_proj, gate_up_proj, down_proj
    assert sorted(t.dim() for t in state.values()) == [2, 2, 3, 3, 3, 3]
    loaded = peft.PeftModel.from_pretrained(_moe_model(name), folder)
    assert srlora.load_base_weights(loaded, folder) == 14
    assert torch.equal(_moe_logits(loaded, x), trained)
    resumed = peft.PeftModel.from_pretrained(_moe_model(name), folder, is_trainable=True)
    opt2 = _adamw(resumed)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))   # (a state_dict shares its tensors)
    sr2 = srlora.SRLoRA(resumed, opt2, resume_from=folder)
    assert sr2.step_count == 4 and [l.next_dir for l in sr2.layers] == [l.next_dir for l in sr.layers]
    assert torch.equal(_moe_logits(resumed, x), trained)
    for _ in range(2):
        ev, ev2 = _srlora_step(pm, opt, sr, x), _srlora_step(resumed, opt2, sr2, x)
    assert ev2.detail == ev.detail and ev.pairs == 28
    torch.testing.assert_close(_moe_logits(resumed, x), _moe_logits(pm, x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"MixtralExperts|GptOssExperts"):   # a model without the experts' LoRA
        plain = peft.get_peft_model(_moe_model(name), peft.LoraConfig(r=4, target_modules=["q_proj"]))
        srlora.load_base_weights(plain, folder)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_expert_importance_is_each_experts_own(name):
    """The per-step importance update takes a MoE parameter's experts in one op layer (B's columns reordered expert
    by expert): each expert's states and scores must equal the float64 reference on its own pairs and gradients."""
    import reference as ref
    from subspace_ext import srlora
    pm, opt, sr, x, _ = _srlora_run(name, 0, config=srlora.SRLoRAConfig(beta1=0.6, beta2=0.7, fuse_fraction=0.0))
    d = lambda ts: [t.detach().double().clone() for t in ts]   # noqa: E731
    states = [[torch.zeros(t.shape, dtype=torch.float64) for t in ts] for ts in (
        [l.A for l in sr.layers], [l.B for l in sr.layers])]
    iA, iB = states
    uA, uB = [t.clone() for t in iA], [t.clone() for t in iB]
    for step in range(3):
        _backward_and_step(pm, opt, x)
        seen = (d(l.A for l in sr.layers), d(l.B for l in sr.layers), d(l.rows(l.A_param.grad) for l in sr.layers),
                d(l.cols(l.B_param.grad) for l in sr.layers))
        scores = sr.update_importance()
        want, iA, iB, uA, uB = ref.pair_importance_ref(*seen, iA, iB, uA, uB, 0.6, 0.7)
        for k, l in enumerate(sr.layers):
            torch.testing.assert_close(scores[k].double(), want[k], rtol=1e-5, atol=1e-12, msg=l.name)
            for got, exp in zip(sr.state, (iA, iB, uA, uB)):
                torch.testing.assert_close(got[k].double(), exp[k], rtol=1e-5, atol=1e-12, msg=l.name)


def test_an_expert_no_token_reaches_is_not_recomposed():
    """An expert no token is routed to has zero gradients, so its importance stays 0: which of its pairs to fuse
    would be an arbitrary choice, so it is left alone (warned once) while the others are recomposed."""
    from subspace_ext import srlora
    pm = peft.get_peft_model(_moe_model("mixtral"), peft.LoraConfig(r=4, lora_alpha=8, target_parameters=TARGETS))
    x = torch.arange(14).reshape(2, 7) % 64
    opt = _adamw(pm)
    sr = srlora.SRLoRA(pm, opt, srlora.SRLoRAConfig(interval=2, warmup=2, fuse_fraction=0.5, total_steps=20))
    idle = [l for l in sr.layers if l.expert == 2]
    for p in {id(l.A_param): l.A_param for l in idle}.values():   # as if expert 2 got no token: its grads are 0
        p.register_hook(lambda g: torch.cat([g[:8], torch.zeros_like(g[8:])]))   # rows 2 r .. 3 r
    for p in {id(l.B_param): l.B_param for l in idle}.values():
        p.register_hook(lambda g: g * (torch.arange(g.shape[1]) % 3 != 2))      # columns k E + 2
    before = [(l.W.clone(), l.next_dir) for l in idle]
    _srlora_step(pm, opt, sr, x)
    _backward_and_step(pm, opt, x)
    with pytest.warns(UserWarning, match=r"4 layer\(s\) have importance 0 \(.*down_proj\[2\] \.\.\.\): no gradient"):
        ev = sr.step()
    assert ev.layers == 8 and not set(ev.detail) & {l.name for l in idle}
    assert all(torch.equal(l.W, W) and l.next_dir == n for l, (W, n) in zip(idle, before))


def test_a_conversion_other_than_a_stack_of_experts_is_described_not_guessed():
    """Only transformers' MergeModulelist(dim=0) [then Concatenate(dim=1)] is read as experts' slices; another
    conversion (here an interleave, or a pattern of two wildcards, or an expert missing) is named instead."""
    from types import SimpleNamespace as NS

    class MergeModulelist(NS):
        pass

    class Concatenate(NS):
        pass

    class Interleave(NS):
        pass

    stack = NS(source_patterns=[".e.*.w1.weight", ".e.*.w3.weight"],
               operations=[MergeModulelist(dim=0), Concatenate(dim=1)])
    keys = {".e.*.w1.weight": {0: "l.e.0.w1.weight", 1: "l.e.1.w1.weight"},
            ".e.*.w3.weight": {0: "l.e.0.w3.weight", 1: "l.e.1.w3.weight"}}
    assert io._stacked_experts(keys, [stack]) == [["l.e.0.w1.weight", "l.e.0.w3.weight"],
                                                  ["l.e.1.w1.weight", "l.e.1.w3.weight"]]
    odd = NS(source_patterns=stack.source_patterns, operations=[MergeModulelist(dim=0), Interleave(dim=1)])
    assert io._stacked_experts(keys, [odd]) == ("MergeModulelist(dim=0) then Interleave(dim=1) of .e.*.w1.weight, "
                                                ".e.*.w3.weight")
    gap = {p: {e: k for e, k in by.items() if e != 0} for p, by in keys.items()}   # expert 0 missing
    assert isinstance(io._stacked_experts(gap, [stack]), str)
    two = {p: {-1: "a", -2: "b"} for p in keys}   # indices of a pattern of two wildcards
    assert isinstance(io._stacked_experts(two, [stack]), str)


def test_mxfp4_experts_are_refused_as_quantized(moe, tmp_path):
    """GPT-OSS as released stores its experts as MXFP4 blocks + scales (uint8 ``gate_up_proj_blocks``): the error
    says so and how to get the weights, instead of 'no weight for the expert parameter'."""
    import shutil
    from safetensors.torch import load_file, save_file
    name, base, adapter, _ = moe
    if not name.startswith("gpt_oss"):
        pytest.skip("GPT-OSS's layout")
    folder = tmp_path / "mxfp4"
    shutil.copytree(base, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for k in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, a, b = tensors.pop(k).shape
        tensors[k + "_blocks"] = torch.zeros(E, b, a // 32, 16, dtype=torch.uint8)
        tensors[k + "_scales"] = torch.zeros(E, b, a // 32, dtype=torch.uint8)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(solar.BaseMismatchError, match=r"stored quantized \(.*gate_up_proj_blocks, MXFP4 .*"
                                                      r"dequantized \(bfloat16\) copy"):
        solar.compress(adapter, str(folder), budget="full")


def test_wrappers_of_same_shaped_expert_parameters_are_told_apart_as_peft_nests_them():
    """Two expert parameters of one shape fit a LoRA alike: peft wraps a module's targeted parameters in the
    module's order, each wrapper around the last, and the nesting tells which one a wrapper adapts."""
    from types import SimpleNamespace as NS

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Parameter(torch.randn(3, 8, 6))      # registered first
            self.gate_proj = torch.nn.Parameter(torch.randn(3, 8, 6))

        def forward(self, x):
            return x

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return self.experts(x)

    model = torch.nn.Sequential()
    model.add_module("mlp", Block())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_parameters=["experts.gate_proj", "experts.up_proj"]))
    wrapped = {n[len("base_model.model."):]: m.parameter_name for n, m in pm.named_modules()
               if type(m).__name__ == "ParamWrapper"}
    assert len(wrapped) == 2
    fresh = torch.nn.Sequential()   # the model as transformers builds it (peft wrapped the other one in place)
    fresh.add_module("mlp", Block())
    for module, param in wrapped.items():
        u = io.LowRankUpdate(module, torch.zeros(8, 6), torch.zeros(6, 6), 1.0, params=("gate_proj", "up_proj"))
        assert solar._nested_parameter(NS(skeleton=fresh), "mlp.experts", u) == param, module
    assert solar._nested_parameter(NS(skeleton=None), "mlp.experts", u) is None


def _dense_fine_tune(base, model_cls, out):
    """A dense fine-tune of the base: low-rank changes to layer 0's two expert parameters, layer 1's down_proj and
    every q_proj; returns its logits."""
    model = model_cls.from_pretrained(base).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            expert = p.dim() == 3 and ("layers.0.mlp.experts." in name or name.endswith("layers.1.mlp.experts.down_proj"))
            if expert or name.endswith("q_proj.weight"):
                lead = p.shape[:-2]
                p.add_(0.05 * torch.randn(*lead, p.shape[-2], 3, generator=g) @ torch.randn(*lead, 3, p.shape[-1],
                                                                                            generator=g))
    model.save_pretrained(out)
    with torch.no_grad():
        return model(torch.arange(14).reshape(2, 7) % 64).logits


@pytest.mark.parametrize("kw", [dict(budget="full"), dict(ratio=0.2), dict(ratio=0.2, method="auto", storage="int8")],
                         ids=["full", "solar", "auto-int8"])
def test_a_dense_fine_tune_of_the_experts_is_carried_as_expert_lora(moe, tmp_path, kw):
    """compress --dense carries changed expert parameters as peft's LoRA on them (one pair per expert; two of one
    module nest as peft nests them) instead of listing them as not carried; both decoders agree."""
    _, base, _, model_cls = moe
    want = _dense_fine_tune(base, model_cls, str(tmp_path / "ft"))
    pkg = solar.compress_dense(str(tmp_path / "ft"), base, rank=4, **kw)
    assert not [k for k in pkg.skipped if "expert" in k]
    assert sorted(pkg.peft_config["target_parameters"]) == ["model.layers.0.mlp.experts.down_proj",
                                                            "model.layers.0.mlp.experts.gate_up_proj",
                                                            "model.layers.1.mlp.experts.down_proj"]
    assert sorted({l.module for l in pkg.layers if l.expert >= 0}) == [
        "model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer", "model.layers.1.mlp.experts"]
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    solar.decompress(path, base).save_adapter(str(tmp_path / "py"))
    got = _logits(model_cls, base, str(tmp_path / "py"))
    if kw.get("budget") == "full":   # rank 4 holds each rank-3 change: the fine-tune itself
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # each expert's decoded update, split again from the adapter, has the error the package reports
    fw, bw = io.BaseWeights(str(tmp_path / "ft")), io.BaseWeights(base)
    decoded = {(u.module, u.expert): u for u, _ in _expert_updates(str(tmp_path / "py"), base)}
    for l in (l for l in pkg.layers if l.expert >= 0):
        fine = fw.get_expert(l.base_key, l.base_parts, l.expert)   # the fine-tune stores the base's names
        D = io.as_update_layout(fine.double() - bw.get_expert(l.base_key, l.base_parts, l.expert).double(),
                                l.fan_in_fan_out)
        u = decoded[l.module, l.expert]
        err = float(torch.linalg.norm(D - u.scaling * u.B.double() @ u.A.double()) / torch.linalg.norm(D))
        assert err == pytest.approx(l.rel_error, abs=1e-6)
        if kw.get("budget"):
            assert err < 1e-6
    _edge_decoder_agrees(path, base, tmp_path)


def _round_trip_is_exact(model_cls, base, adapter, tmp_path, kw=None):
    """compress at budget full + decompress gives the adapter's logits; at a lossy ratio both decoders agree."""
    pkg = solar.compress(adapter, base, budget="full")
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "dec"))
    torch.testing.assert_close(_logits(model_cls, base, str(tmp_path / "dec")), _logits(model_cls, base, adapter),
                               rtol=0, atol=1e-5)
    assert (_logits(model_cls, base, adapter) - _logits(model_cls, base)).abs().max() > 1e-2   # the LoRA matters
    path = str(tmp_path / "p.safetensors")
    solar.compress(adapter, base, ratio=0.3, **(kw or {})).save(path)
    solar.decompress(path, base).save_adapter(str(tmp_path / "py"))
    _edge_decoder_agrees(path, base, tmp_path)
    return pkg


def _adapter_of(model, lora, folder):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **lora))
    _lora_factors(pm, 2)
    pm.save_pretrained(folder)
    return json.load(open(os.path.join(folder, "adapter_config.json")))


def test_bare_parameter_names_beside_target_modules(tmp_path):
    """peft converts a transformers-4 MoE config (target_modules gate_proj / up_proj / down_proj beside q_proj) to
    bare target_parameters ["gate_up_proj", "down_proj"] that match on any module: q_proj's LoRA is a module LoRA
    (it has no such parameter), the experts' are expert LoRA. q_proj was taken for an expert parameter's."""
    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        pytest.skip("no Qwen3-MoE in this transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=40, moe_intermediate_size=20,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    if not isinstance(getattr(model.model.layers[0].mlp.experts, "gate_up_proj", None), torch.nn.Parameter):
        pytest.skip(f"transformers {transformers.__version__} keeps Qwen3-MoE's experts as Linear layers")
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    config = _adapter_of(model, dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
                         str(tmp_path / "ad"))
    if sorted(config.get("target_parameters") or []) != ["down_proj", "gate_up_proj"]:
        pytest.skip(f"peft {peft.__version__} does not convert the MoE targets to bare parameter names")
    pkg = _round_trip_is_exact(transformers.Qwen3MoeForCausalLM, base, str(tmp_path / "ad"), tmp_path)
    assert {l.module for l in pkg.layers if l.expert < 0} == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert len([l for l in pkg.layers if l.expert >= 0]) == 2 * 2 * 4


def test_a_3d_expert_weight_named_weight(tmp_path):
    """JetMoe's experts are a 3-D ``weight`` (experts x out x in): peft's LoRA on it holds one pair per expert. It
    was read as a 2-D weight's and the base blamed ('wrong base model?')."""
    if not hasattr(transformers, "JetMoeForCausalLM"):
        pytest.skip("no JetMoe in this transformers")
    torch.manual_seed(0)
    cfg = transformers.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=8, intermediate_size=20, num_local_experts=4, num_experts_per_tok=2,
                                    max_position_embeddings=64)
    model = transformers.JetMoeForCausalLM(cfg).eval()
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    _adapter_of(model, dict(target_modules=[], target_parameters=["input_linear.weight", "output_linear.weight"]),
                str(tmp_path / "ad"))
    pkg = _round_trip_is_exact(transformers.JetMoeForCausalLM, base, str(tmp_path / "ad"), tmp_path)
    assert {l.experts for l in pkg.layers} == {4}
    lossy = solar.compress(str(tmp_path / "ad"), base, ratio=0.3)   # relative_errors splits the 3-D weight's LoRA too
    errors = solar.relative_errors(str(tmp_path / "ad"), solar.decompress(lossy, base), base=base)
    assert len(errors) == len(lossy.layers)
    assert sorted(errors) == pytest.approx(sorted(l.rel_error for l in lossy.layers), abs=1e-5)


def test_a_misshapen_merged_part_is_named_by_both_decoders(moe, tmp_path):
    """A part of a merged expert's slice (Mixtral's w3) with another column count: both decoders name the layer and
    the weights that do not stack (Python raised torch.cat's own error)."""
    name, base, adapter, _ = moe
    if not name.startswith("mixtral"):
        pytest.skip("a merged model's")
    path, first = _package_with_first_expert(adapter, base, tmp_path)
    part = first.base_parts[-1]
    folder = _edited_base(base, tmp_path / "edited",
                          lambda t: t.update({part: torch.cat([t[part], t[part][:, :1]], dim=1)}))
    _both_refuse(path, folder, tmp_path, f"layer {first.module} (expert {first.expert}): base weights ")


def _package_with_first_expert(adapter, base, tmp_path):
    """(path, first expert layer) of the adapter's package at ratio 0.3, saved."""
    path = str(tmp_path / "p.safetensors")
    pkg = solar.compress(adapter, base, ratio=0.3)
    pkg.save(path)
    return path, next(l for l in pkg.layers if l.expert >= 0)


def _edited_base(base, folder, edit):
    """A copy of the base folder whose model.safetensors tensors ``edit`` changed in place; its path."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(base, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def _noisy_fine_tune(model_cls, base, out, changed):
    """A fine-tune of ``base`` whose parameters that ``changed(name)`` picks get full-rank noise; its logits."""
    model = model_cls.from_pretrained(base).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if changed(name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    with torch.no_grad():
        return model(torch.arange(14).reshape(2, 7) % 64).logits


def _model(name, folder, **kw):
    """A tiny random model of transformers' class ``name`` (skipped where this transformers lacks it), saved."""
    if not hasattr(transformers, name):
        pytest.skip(f"no {name} in transformers {transformers.__version__}")
    cls = getattr(transformers, name)
    torch.manual_seed(0)
    model = cls(cls.config_class(**kw)).eval()
    model.save_pretrained(folder)
    return cls


def test_dense_experts_take_the_fine_tunes_names(tmp_path):
    """A fine-tune saved as MixtralForCausalLM against its base saved as the bare MixtralModel: the experts' LoRA
    is named as the fine-tune's model names them, like its Linear layers (the adapter goes onto its architecture);
    the experts were named as the base's, and peft dropped them."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=24, intermediate_size=20, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    full = transformers.MixtralForCausalLM(cfg).eval()
    if not isinstance(getattr(full.model.layers[0].mlp.experts, "gate_up_proj", None), torch.nn.Parameter):
        pytest.skip(f"transformers {transformers.__version__} keeps Mixtral's experts as Linear layers")
    full.save_pretrained(str(tmp_path / "full"))
    full.model.save_pretrained(str(tmp_path / "bare"))   # the base, as the bare model
    want = _noisy_fine_tune(transformers.MixtralForCausalLM, str(tmp_path / "full"), str(tmp_path / "ft"),
                            lambda n: n.endswith(("q_proj.weight", "experts.down_proj")))
    pkg = solar.compress_dense(str(tmp_path / "ft"), str(tmp_path / "bare"), budget="full", rank=24)
    assert pkg.peft_config["target_parameters"] == ["model.layers.0.mlp.experts.down_proj"]
    solar.decompress(pkg, str(tmp_path / "bare")).save_adapter(str(tmp_path / "dec"))
    torch.testing.assert_close(_logits(transformers.MixtralForCausalLM, str(tmp_path / "full"), str(tmp_path / "dec")),
                               want, rtol=0, atol=1e-5)


def test_a_router_that_is_a_linear_is_not_carried(tmp_path):
    """Llama4's router is a torch.nn.Linear whose forward returns scores and indices: peft's LoRA on it cannot run
    (it adds its update to the output), so a changed router is listed as not carried, like Mixtral's."""
    base = str(tmp_path / "base")
    cls = _model("Llama4ForCausalLM", base, vocab_size=64, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8,
                 num_local_experts=3, num_experts_per_tok=1, intermediate_size_mlp=20, interleave_moe_layer_step=1,
                 attn_temperature_tuning=False, no_rope_layers=[1, 1])
    want = _noisy_fine_tune(cls, base, str(tmp_path / "ft"), lambda n: n.endswith(("router.weight", "q_proj.weight")))
    pkg = solar.compress_dense(str(tmp_path / "ft"), base, budget="full", rank=24)
    assert sorted(pkg.skipped) == [f"model.layers.{i}.feed_forward.router.weight" for i in range(2)]
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "dec"))
    got = _logits(cls, base, str(tmp_path / "dec"))   # runs: no LoRA on the router
    assert (got - want).abs().max() < (_logits(cls, base) - want).abs().max()


def test_dense_mlp_linears_survive_peft_moe_config_conversion(tmp_path):
    """peft rewrites a Qwen2-MoE-family model's target_modules named down_proj / gate_proj / up_proj into expert
    parameters as it loads an adapter: DeepSeek-V3's dense first MLP and shared experts, carried as module LoRA,
    were dropped (or refused). They are targeted as their weight parameter, which peft adds the same way."""
    base = str(tmp_path / "base")
    cls = _model("DeepseekV3ForCausalLM", base, vocab_size=64, hidden_size=24, intermediate_size=20,
                 moe_intermediate_size=12, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                 kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6, n_group=1,
                 topk_group=1, max_position_embeddings=64)
    want = _noisy_fine_tune(cls, base, str(tmp_path / "ft"),
                            lambda n: n.endswith(("mlp.down_proj.weight", "mlp.gate_proj.weight", "o_proj.weight",
                                                  "shared_experts.gate_proj.weight", "experts.down_proj")))
    pkg = solar.compress_dense(str(tmp_path / "ft"), base, budget="full", rank=24)
    assert "model.layers.0.mlp.down_proj.weight" in pkg.peft_config["target_parameters"]
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in pkg.peft_config["target_parameters"]
    assert pkg.peft_config["target_modules"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    solar.decompress(pkg, base).save_adapter(str(tmp_path / "dec"))
    torch.testing.assert_close(_logits(cls, base, str(tmp_path / "dec")), want, rtol=0, atol=1e-5)


def test_a_fine_tune_missing_one_experts_weight_is_refused_by_name(moe, tmp_path):
    """A fine-tune holding some of an expert parameter's stored weights but not all: the missing one is named (the
    others were listed as not carried, silently)."""
    from safetensors.torch import load_file, save_file
    name, base, _, model_cls = moe
    if not name.startswith("mixtral"):
        pytest.skip("a merged model's")
    _noisy_fine_tune(model_cls, base, str(tmp_path / "ft"), lambda n: n.endswith("experts.down_proj"))
    tensors = load_file(str(tmp_path / "ft" / "model.safetensors"))
    del tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"]
    save_file(tensors, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(solar.BaseMismatchError, match=r"no model.layers.0.block_sparse_moe.experts.2.w2.weight .*"
                                                      r"other experts of model.layers.0.mlp.experts.down_proj"):
        solar.compress_dense(str(tmp_path / "ft"), base, budget="full")


def test_a_base_with_another_expert_count_is_refused(moe, tmp_path):
    """GPT-OSS's stored 3-D experts: a base with one expert more (the package's three unchanged) is not the base:
    the adapter would not fit its parameter. Both decoders said nothing."""
    name, base, adapter, _ = moe
    if not name.startswith("gpt_oss"):
        pytest.skip("a stored 3-D expert tensor's")
    path, first = _package_with_first_expert(adapter, base, tmp_path)
    key = first.base_key
    shape = []
    folder = _edited_base(base, tmp_path / "more", lambda t: (t.update({key: torch.cat([t[key], t[key][:1]])}),
                                                              shape.extend(t[key].shape)))
    _both_refuse(path, folder, tmp_path, f"layer {first.module} (expert 0): base weight {key} has shape "
                 f"{tuple(shape)}, not 3 experts")


def test_dense_experts_against_a_bare_base_file(moe, tmp_path):
    """A bare .safetensors base: GPT-OSS's stored 3-D experts are found by name (the fine-tune's folder tells the
    model); Mixtral's stacked experts cannot be, and a warning says to pass the base's folder."""
    name, base, _, model_cls = moe
    want = _dense_fine_tune(base, model_cls, str(tmp_path / "ft"))
    bare = os.path.join(base, "model.safetensors")
    if name.startswith("mixtral"):
        with pytest.warns(UserWarning, match="bare .safetensors file: the MoE experts .* pass the base model's folder"):
            pkg = solar.compress_dense(str(tmp_path / "ft"), bare, budget="full", rank=4)
        assert "target_parameters" not in pkg.peft_config
        return
    pkg = solar.compress_dense(str(tmp_path / "ft"), bare, budget="full", rank=4)
    assert len(pkg.peft_config["target_parameters"]) == 3
    solar.decompress(pkg, bare).save_adapter(str(tmp_path / "dec"))
    torch.testing.assert_close(_logits(model_cls, base, str(tmp_path / "dec")), want, rtol=0, atol=1e-5)
