"""SOLAR on a dense fine-tune (fine-tuned minus base weights from two safetensors files)."""
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from subspace_ext import solar
from subspace_ext.io import PeftAdapter


@pytest.fixture()
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"enc.q.weight": torch.randn(24, 17, generator=g), "enc.ffn.weight": torch.randn(40, 24, generator=g),
            "enc.norm.bias": torch.randn(24, generator=g), "embeddings.word.weight": torch.randn(30, 24, generator=g),
            "enc.k.weight": torch.randn(24, 24, generator=g)}
    ft = dict(base)
    ft["enc.q.weight"] = base["enc.q.weight"] + 0.1 * torch.randn(24, 2, generator=g) @ torch.randn(2, 17, generator=g)
    ft["enc.ffn.weight"] = base["enc.ffn.weight"] + 0.05 * torch.randn(40, 24, generator=g)
    ft["enc.norm.bias"] = base["enc.norm.bias"] + 1.0
    ft["embeddings.word.weight"] = base["embeddings.word.weight"] + 1.0
    ft["head.weight"] = torch.randn(3, 24, generator=g)  # a new head: not in the base, so not carried
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "ft.safetensors", tmp_path / "base.safetensors", base, ft


def _delta(adapter: PeftAdapter, module: str) -> torch.Tensor:
    u = next(u for u in adapter.updates() if u.module == module)
    return u.scaling * u.B.double() @ u.A.double()


def test_dense_full_budget_is_lossless_up_to_rank(checkpoints, tmp_path):
    ft_path, base_path, base, ft = checkpoints
    pkg = solar.compress_dense(str(ft_path), str(base_path), budget="full", rank=24)
    assert sorted(l.module for l in pkg.layers) == ["enc.ffn", "enc.q"]  # unchanged k is not a layer
    assert sorted(pkg.skipped) == ["embeddings.word.weight", "enc.norm.bias", "head.weight"]  # head: was dropped
    assert any("head.weight" in note for note in pkg.notes())
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    ad = solar.decompress(path, str(base_path))
    for module in ("enc.q", "enc.ffn"):
        D = ft[module + ".weight"].double() - base[module + ".weight"].double()
        err = torch.linalg.norm(_delta(ad, module) - D) / torch.linalg.norm(D)
        assert err < 1e-6, (module, float(err))


def test_dense_rank_truncation_and_budget(checkpoints):
    ft_path, base_path, base, ft = checkpoints
    full = solar.compress_dense(str(ft_path), str(base_path), budget="full", rank=2)
    q = next(l for l in full.layers if l.module == "enc.q")
    assert q.rank == 2 and q.rel_error < 1e-6  # the q delta has rank 2
    ffn = next(l for l in full.layers if l.module == "enc.ffn")
    D = ft["enc.ffn.weight"].double() - base["enc.ffn.weight"].double()
    s = torch.linalg.svdvals(D)
    assert ffn.rel_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)  # Eckart-Young
    errs = [sum(l.rel_error for l in solar.compress_dense(str(ft_path), str(base_path), ratio=r, rank=2).layers)
            for r in (0.05, 0.3, 0.9)]
    assert errs[0] > errs[1] > errs[2]


def test_dense_errors(checkpoints, tmp_path):
    ft_path, base_path, base, ft = checkpoints
    with pytest.raises(ValueError, match="no 2-D Linear weight differs"):
        solar.compress_dense(str(base_path), str(base_path), budget="full")
    bad = dict(ft)
    bad["enc.q.weight"] = torch.randn(24, 18)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(solar.BaseMismatchError, match="enc.q.weight"):
        solar.compress_dense(str(tmp_path / "bad.safetensors"), str(base_path), budget="full")
    with pytest.raises(ValueError, match="rank"):
        solar.compress_dense(str(ft_path), str(base_path), budget="full", rank=0)


def test_bare_files_warn_that_every_weight_is_read_as_a_linear(checkpoints, tmp_path):
    """Without a config.json the module types are unknown: a Conv1D model's (GPT-2's) in x out weights would
    decode transposed (0.5 off on a tiny GPT-2, reported lossless), so the guess is said."""
    ft, base, _, _ = checkpoints
    with pytest.warns(UserWarning, match=r"module types are unknown \(no config.json in the folders given, .* "
                                         r"Conv1D .* decode transposed"):
        solar.compress_dense(str(ft), str(base), budget="full", rank=2)
    # a file with a config.json beside it: the folder is what tells them (the warning blamed a missing config)
    (tmp_path / "m").mkdir()
    shutil.copy(base, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=re.escape(f"module types are unknown ({tmp_path / 'm' / 'model.safetensors'}"
                                                   " is a file: pass its folder, whose config.json tells them)")):
        solar.compress_dense(str(ft), str(tmp_path / "m" / "model.safetensors"), budget="full", rank=2)


@pytest.mark.parametrize("prefixed", ["finetuned", "base"])
def test_checkpoint_names_under_a_prefix_rewrite(checkpoints, tmp_path, prefixed):
    """A fine-tune saved from a task model (bert.encoder...) against the base saved as the bare encoder
    (encoder...) shared no name, and compress --dense blamed a wrong base model; the one prefix rewrite the
    names agree on pairs them (as for adapters), in either direction. The adapter targets the fine-tuned
    model's names where the decoders find the base weight from them."""
    ft_path, base_path, base, ft = checkpoints
    add = lambda d: {("model." + k if k != "head.weight" else k): v for k, v in d.items()}  # noqa: E731
    if prefixed == "finetuned":
        ft = add(ft)
        save_file(ft, str(tmp_path / "ft2.safetensors"))
        ft_path = tmp_path / "ft2.safetensors"
    else:
        base = add(base)
        save_file(base, str(tmp_path / "base2.safetensors"))
        base_path = tmp_path / "base2.safetensors"
    pkg = solar.compress_dense(str(ft_path), str(base_path), budget="full", rank=24)
    prefix = "model." if prefixed == "finetuned" else ""   # the fine-tuned model's names, in both cases
    assert sorted(l.module for l in pkg.layers) == [prefix + "enc.ffn", prefix + "enc.q"]
    assert sorted(l.base_key for l in pkg.layers) == sorted(k for k in base if k.endswith(("q.weight", "ffn.weight")))
    assert "head.weight" in pkg.skipped
    path = str(tmp_path / "p.safetensors")
    pkg.save(path)
    ad = solar.decompress(path, str(base_path))
    for module in ("enc.q", "enc.ffn"):
        D = ft[[k for k in ft if k.endswith(module + ".weight")][0]].double() - \
            base[[k for k in base if k.endswith(module + ".weight")][0]].double()
        err = torch.linalg.norm(_delta(ad, prefix + module) - D) / torch.linalg.norm(D)
        assert err < 1e-6, (module, float(err))


def test_dense_refuses_a_peft_adapter_folder(checkpoints, tmp_path):
    """--dense given an adapter folder blamed the base ('share no tensor name: wrong base model?')."""
    _, base_path, _, _ = checkpoints
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    save_file({"base_model.model.enc.q.lora_A.weight": torch.zeros(2, 17)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is a peft adapter folder .* without --dense"):
        solar.compress_dense(str(folder), str(base_path), budget="full")


def test_unchanged_tensors_outside_the_layers_are_not_listed_as_not_carried(tmp_path):
    """A fine-tune saved as the bare model (layers.0..., norm) against its base saved with the task model's prefix
    (model.layers.0..., model.norm): every name pairs under one rewrite ("" -> "model."). The names' match had
    skipped the whole name as a suffix, so the layers voted for "layers." -> "model.layers.", and the unchanged
    norm and embedding were listed as changed tensors not carried."""
    g = torch.Generator().manual_seed(0)
    ft = {f"layers.{i}.q.weight": torch.randn(12, 10, generator=g) for i in range(3)}
    ft.update({"norm.weight": torch.randn(12, generator=g), "embed.weight": torch.randn(30, 12, generator=g)})
    base = {"model." + k: v.clone() for k, v in ft.items()}
    base["lm_head.weight"] = torch.randn(30, 12, generator=g)
    ft["layers.0.q.weight"] = ft["layers.0.q.weight"] + 0.1 * torch.randn(12, 10, generator=g)
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    with pytest.warns(UserWarning, match="module types are unknown"):
        pkg = solar.compress_dense(str(tmp_path / "ft.safetensors"), str(tmp_path / "base.safetensors"),
                                   budget="full")
    assert [l.module for l in pkg.layers] == ["layers.0.q"] and pkg.skipped == []
    assert [l.base_key for l in pkg.layers] == ["model.layers.0.q.weight"]
