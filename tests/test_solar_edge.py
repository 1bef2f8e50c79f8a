"""The C++ SOLAR edge decoder (tools/solar_decode.cpp, built by CMake as cmake-build/solar_decode)
must write the same peft folder as the Python decoder: ``solar.decompress(pkg, base).save_adapter``.

Both call the same ops (subspace_ext::solar_basis / solar_decode) from the same library on the same
inputs, and the casts to the package dtype are torch's own, so the tensors are compared exactly.
"""
import dataclasses
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from subspace_ext import io, solar
from subspace_ext.io import FormatError, PeftAdapter

REPO = Path(__file__).resolve().parents[1]
BINARY = Path(os.environ.get("SUBSPACE_EXT_SOLAR_DECODE", REPO / "cmake-build" / "solar_decode"))

pytestmark = pytest.mark.skipif(
    not (BINARY.is_file() and os.access(BINARY, os.X_OK)),
    reason=f"edge decoder binary {BINARY} not built (run `make cmake-test`, or set SUBSPACE_EXT_SOLAR_DECODE)")

# base weight key -> shape (out x in)
BASE_SHAPES = {
    "encoder.layer.0.attention.self.query.weight": (48, 40),
    "encoder.layer.0.output.dense.weight": (40, 64),
    "encoder.layer.0.attention.self.query.bias": (48,),
    "embeddings.word_embeddings.weight": (30, 40),
}
MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]
RANK = 4


def _base(tmp_path, sharded=False, conv1d=False):
    """``conv1d``: the query weight is stored in x out (transformers' Conv1D), the dense one as a Linear."""
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(*s, generator=g) for k, s in BASE_SHAPES.items()}
    if conv1d:
        key = MODULES[0] + ".weight"
        weights[key] = weights[key].T.contiguous()
    if not sharded:
        path = tmp_path / "base.safetensors"
        save_file(weights, str(path))
        return path, weights
    folder = tmp_path / "base"
    folder.mkdir()
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[:2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: weights[k] for k in keys[2:]}, str(folder / "model-00002-of-00002.safetensors"))
    return folder, weights


def _adapter(tmp_path, kind="LORA", dtype=torch.float32, fan_in_fan_out=False, rank=RANK):
    """``rank`` may exceed a layer's min(m, n): peft allows it (the update's rank is min(m, n) at most)."""
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for module in MODULES:
        m, n = BASE_SHAPES[module + ".weight"]
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n, generator=g).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = (0.1 * torch.randn(m, rank, generator=g)).to(dtype)
        if kind == "ADALORA":
            tensors[f"{prefix}.lora_E.weight"] = torch.randn(rank, 1, generator=g).to(dtype)
    tensors["base_model.model.classifier.weight"] = torch.randn(3, 48, generator=g)
    tensors["base_model.model.classifier.bias"] = torch.randn(3, generator=g).double()
    config = {
        "peft_type": kind, "r": rank, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["query", "dense"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS",
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "revision": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": "tiny-b\u00e9rt \"q\"\t\u2603\U0001f600",
        "layer_norm_eps": 1e-12, "big": 12345678901234567890, "scale": 1e22, "neg": -0.0,
    }
    if kind == "LORA":   # patterns out of sorted order: where several match, the first wins, so both decoders keep it
        config.update({"alpha_pattern": {"query": 16, "encoder.layer.0.output.dense": 4, "dense": 8},
                       "rank_pattern": {"query": rank, "dense": rank}})
    if kind == "ADALORA":
        config.update({"init_r": 6, "target_r": RANK, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85,
                       "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 100})
    path = tmp_path / "adapter"
    PeftAdapter(config, tensors).save_adapter(str(path))
    return path


def _run(*args):
    return subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True, timeout=300)


def _read_package(path):
    """(file metadata, the solar metadata parsed, tensors) of a package, for edits."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, json.loads(meta["solar"]), tensors


def _write_package(path, meta, info, tensors):
    """An edited package, its digest recomputed (the digest detects damage, not edits)."""
    meta = dict(meta, solar=json.dumps(info))
    meta["digest"] = io.content_digest(tensors, meta["solar"])
    save_file(tensors, str(path), metadata=meta)
    return path


def _assert_same_folder(py_dir, cpp_dir):
    py, cpp = load_file(str(py_dir / "adapter_model.safetensors")), load_file(str(cpp_dir / "adapter_model.safetensors"))
    assert sorted(py) == sorted(cpp)
    for k in py:
        assert py[k].dtype == cpp[k].dtype, k
        assert py[k].shape == cpp[k].shape, k
        assert torch.equal(py[k], cpp[k]), k
    py_cfg, cpp_cfg = (d / "adapter_config.json" for d in (py_dir, cpp_dir))
    assert json.loads(py_cfg.read_text()) == json.loads(cpp_cfg.read_text())
    # The decoder writes peft's text exactly: json.dump(indent=2), keys sorted but inside the pattern dicts.
    assert py_cfg.read_bytes() == cpp_cfg.read_bytes()
    patterns = json.loads(py_cfg.read_text()).get("alpha_pattern") or {}
    if "query" in patterns:   # _adapter's LoRA patterns (AdaLoRA's conversion writes its own)
        assert list(patterns) == ["query", "encoder.layer.0.output.dense", "dense"]


CASES = [
    pytest.param(dict(kind="LORA", ratio=0.5), id="lora-ratio0.5"),
    pytest.param(dict(kind="LORA", budget="full", sharded=True, seed=2**63 + 12345), id="lora-full-sharded-bigseed"),
    pytest.param(dict(kind="ADALORA", ratio=0.5, dtype=torch.bfloat16, eps=0.01), id="adalora-bf16-eps"),
    pytest.param(dict(kind="LORA", budget="full", dtype=torch.float16, seed=7), id="lora-full-fp16"),
    pytest.param(dict(kind="LORA", ratio=0.5, conv1d=True), id="lora-conv1d-and-linear"),
    # low-rank layers (format version 2): the factors padded to the layer's rank, no basis
    pytest.param(dict(kind="LORA", ratio=0.3, method="lowrank", dtype=torch.bfloat16), id="lowrank-bf16"),
    pytest.param(dict(kind="LORA", budget="full", method="lowrank", conv1d=True), id="lowrank-full-conv1d"),
    pytest.param(dict(kind="ADALORA", ratio=0.3, method="auto"), id="adalora-auto"),
    pytest.param(dict(kind="LORA", budget=200, method="auto", sharded=True), id="auto-budget-sharded"),
    # coefficients / factors stored in half precision
    pytest.param(dict(kind="LORA", ratio=0.3, method="auto", storage="float16"), id="auto-float16"),
    pytest.param(dict(kind="LORA", ratio=0.5, storage="bfloat16", eps=0.01), id="solar-bfloat16"),
    # int8 codes + float32 scales (format version 3)
    pytest.param(dict(kind="LORA", ratio=0.3, method="auto", storage="int8", dtype=torch.bfloat16), id="auto-int8"),
    pytest.param(dict(kind="LORA", ratio=0.5, storage="int8", eps=0.01), id="solar-int8"),
    pytest.param(dict(kind="ADALORA", budget="full", method="lowrank", storage="int8", conv1d=True),
                 id="adalora-lowrank-int8-conv1d"),
    # the per-layer layout (format versions 1-3) that builds before version 4 wrote
    pytest.param(dict(kind="LORA", ratio=0.5, layout="layers"), id="layers-solar"),
    pytest.param(dict(kind="LORA", ratio=0.3, method="auto", storage="int8", layout="layers"), id="layers-auto-int8"),
    # a LoRA rank above a layer's min(m, n) (r = 48 on 48 x 40 and 40 x 64 layers)
    pytest.param(dict(kind="LORA", ratio=0.5, rank=48, method="auto"), id="rank-above-min-mn"),
]


@pytest.mark.parametrize("case", CASES)
def test_edge_decoder_matches_python(tmp_path, case):
    conv1d = case.get("conv1d", False)
    base, _ = _base(tmp_path, sharded=case.get("sharded", False), conv1d=conv1d)
    adapter = _adapter(tmp_path, case["kind"], case.get("dtype", torch.float32), fan_in_fan_out=conv1d,
                       rank=case.get("rank", RANK))
    method = case.get("method", "solar")
    pkg = solar.compress(str(adapter), str(base), ratio=case.get("ratio"), budget=case.get("budget"),
                         seed=case.get("seed", 0), eps=case.get("eps", 0.0), method=method,
                         storage=case.get("storage", "float32"))
    assert [l.fan_in_fan_out for l in pkg.layers] == [conv1d, False]
    if method != "solar":
        assert "lowrank" in [l.kind for l in pkg.layers]
    pkg_path = tmp_path / "package.safetensors"
    pkg.save(str(pkg_path), layout=case.get("layout", "packed"))
    assert (io.safetensors_metadata(str(pkg_path))["format_version"] == "4") == ("layout" not in case)

    py_dir, cpp_dir = tmp_path / "py", tmp_path / "cpp"
    solar.decompress(str(pkg_path), str(base)).save_adapter(str(py_dir))
    r = _run(pkg_path, base, cpp_dir)
    assert r.returncode == 0, r.stderr
    _assert_same_folder(py_dir, cpp_dir)
    if case["kind"] == "ADALORA":
        assert json.loads((cpp_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.fixture
def package(tmp_path):
    base, weights = _base(tmp_path)
    adapter = _adapter(tmp_path)
    pkg_path = tmp_path / "package.safetensors"
    solar.compress(str(adapter), str(base), ratio=0.5).save(str(pkg_path), layout="layers")  # edits by layer
    return pkg_path, base, weights


def test_the_base_folder_files_read_are_those_transformers_loads(tmp_path, package):
    """Every .safetensors file of a base folder was read, the last file winning where two held a weight: a variant
    (model.fp16.safetensors) or a stray copy beside the model was read in its place, by the encoder and both
    decoders alike. Now all three read model.safetensors, else the shards model.safetensors.index.json names, else
    (other names) every file, refusing a weight in two of them; an index naming a missing shard is refused."""
    pkg_path, base, weights = package
    other = dict(weights)
    key = MODULES[0] + ".weight"
    other[key] = other[key] + 1
    want = solar.decompress(str(pkg_path), str(base))

    def decoded_alike(folder, name):
        got = solar.decompress(str(pkg_path), str(folder))
        assert all(torch.equal(got.tensors[k], v) for k, v in want.tensors.items()), name
        got.save_adapter(str(tmp_path / f"py-{name}"))
        r = _run(pkg_path, folder, tmp_path / f"cpp-{name}")
        assert r.returncode == 0, r.stderr
        _assert_same_folder(tmp_path / f"py-{name}", tmp_path / f"cpp-{name}")

    def refused(folder, message):
        with pytest.raises(FormatError, match=f"^{message}$"):
            solar.compress(str(_adapter(tmp_path)), str(folder), ratio=0.5)
        with pytest.raises(FormatError, match=f"^{message}$") as python:
            solar.decompress(str(pkg_path), str(folder))
        r = _run(pkg_path, folder, tmp_path / "out")
        assert r.returncode == 1 and str(python.value) in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
            r.stderr
        assert not (tmp_path / "out").exists()

    beside = tmp_path / "beside"   # the model, its float16 variant and a changed copy
    beside.mkdir()
    save_file(weights, str(beside / "model.safetensors"))
    save_file({k: v.half() for k, v in other.items()}, str(beside / "model.fp16.safetensors"))
    save_file(other, str(beside / "zz_copy.safetensors"))
    decoded_alike(beside, "beside")
    sharded = tmp_path / "sharded"   # two shards by the index, a changed copy beside them
    sharded.mkdir()
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, part in shards.items():
        save_file({k: weights[k] for k in part}, str(sharded / name))
    save_file(other, str(sharded / "aa_copy.safetensors"))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    decoded_alike(sharded, "sharded")
    index["weight_map"][keys[0]] = "model-00003-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(sharded, re.escape(f"{sharded / 'model.safetensors.index.json'}: maps weights to "
                               "model-00003-of-00002.safetensors, which is not in the folder"))
    loose = tmp_path / "loose"   # files of other names: all read, a weight in two of them refused
    loose.mkdir()
    save_file(weights, str(loose / "weights.safetensors"))
    save_file(other, str(loose / "zz_copy.safetensors"))
    refused(loose, re.escape(f"{loose}: ") + r"\S+" + re.escape(" is in two files, weights.safetensors and "
                                                               "zz_copy.safetensors: keep one copy of the model in "
                                                               "the folder"))


def test_tampered_package_fails_on_digest(tmp_path, package):
    pkg_path, base, _ = package
    data = bytearray(pkg_path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + 5] ^= 0x01  # one bit of the data section
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(solar.FormatError, match="digest"):
        solar.SolarPackage.load(str(bad))
    r = _run(bad, base, tmp_path / "out")
    assert r.returncode != 0
    assert "digest" in r.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_modified_base_weight_fails_naming_the_layer(tmp_path, package):
    pkg_path, _, weights = package
    weights = dict(weights)
    key = "encoder.layer.0.output.dense.weight"
    weights[key] = weights[key].clone()
    weights[key][3, 7] += 1e-3
    other = tmp_path / "other_base.safetensors"
    save_file(weights, str(other))
    with pytest.raises(solar.BaseMismatchError, match="encoder.layer.0.output.dense"):
        solar.decompress(str(pkg_path), str(other))
    r = _run(pkg_path, other, tmp_path / "out")
    assert r.returncode == 1
    assert "layer encoder.layer.0.output.dense" in r.stderr and "fingerprint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["absent", "unknown", "unknown-with-new-fields", "zero", "not-int",
                                  "absent-seed-edited", "seed-edited"])
def test_basis_rule_in_both_decoders(tmp_path, package, lowrank_package, case):
    """A package names the rule its bases were built by ("basis": 2, ties resolved with the seed). One
    without the field comes from an older build (rule 1, LAPACK's tied vectors): its generic layers
    decode unchanged, and a checksum failure says it may need compressing again; an edited package's
    says so. A rule this build does not know is refused by name before any other field is checked (a
    newer build's package may bring new fields too), in the same words by both decoders."""
    pkg_path, base, _ = package
    meta, info, tensors = _read_package(pkg_path)
    assert info["basis"] == solar.BASIS_RULE == 2 and solar.SolarPackage.load(str(pkg_path)).basis == 2
    if case.startswith("absent"):
        del info["basis"]
    elif case.startswith("unknown"):
        info["basis"] = 3
    elif case == "zero":
        info["basis"] = 0
    elif case == "not-int":
        info["basis"] = "2"
    if case == "unknown-with-new-fields":  # each of these alone is refused as malformed
        info["layers"][0]["new_field"] = 1
        info["dtype"] = "float8"
    if case.endswith("seed-edited"):
        info["seed"] += 1
    edited = _write_package(tmp_path / "edited.safetensors", meta, info, tensors)
    r = _run(edited, base, tmp_path / "out")
    if case == "absent":
        pkg = solar.SolarPackage.load(str(edited))
        assert pkg.basis == 1 and any("basis rule 1" in n for n in pkg.notes())
        assert not any("basis rule" in n for n in solar.SolarPackage.load(str(pkg_path)).notes())
        lowrank = solar.SolarPackage.load(str(lowrank_package[0]))  # no bases: nothing to note
        assert not any("basis rule" in n for n in dataclasses.replace(lowrank, basis=1).notes())
        pkg.save(str(tmp_path / "again.safetensors"), layout="layers")  # re-saved as rule 1: no field
        assert "basis" not in _read_package(tmp_path / "again.safetensors")[1]
        solar.decompress(pkg, str(base)).save_adapter(str(tmp_path / "py"))
        assert r.returncode == 0, r.stderr
        _assert_same_folder(tmp_path / "py", tmp_path / "out")
        return
    error = solar.BaseMismatchError if case.endswith("seed-edited") else solar.FormatError
    with pytest.raises(error) as e:
        solar.decompress(str(edited), str(base))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    rule = 0 if case == "zero" else 3
    expected = "malformed package metadata (basis must be" if case == "not-int" else {
        "absent-seed-edited": "the package predates basis rule 2 (made by an older build)",
        "seed-edited": "the seed, eps or the layer's stream differs from the sender's (an edited package), or this "
                       "machine's LAPACK resolves"}.get(
        case, f"edited.safetensors: basis rule {rule} is unknown to this build (it knows 1, 2): a package from a "
              "newer subspace_ext")
    assert expected in str(e.value) and expected in r.stderr, (str(e.value), r.stderr)
    if case != "not-int":  # (type messages are worded per decoder)
        assert r.stderr.strip().endswith(str(e.value))


def test_every_base_weight_is_checked_before_any_layer_is_decoded(tmp_path, package):
    """The last layer's base weight differs and the first layer's checksum was edited (it fails its
    decode): both decoders check every fingerprint first, so both name the last layer's weight, in the
    same words (the C++ one decoded layer by layer and reported the first layer's checksum)."""
    pkg_path, _, weights = package
    meta, info, tensors = _read_package(pkg_path)
    assert len(info["layers"]) == 2 and info["layers"][0]["nnz"] > 0
    info["layers"][0]["checksum"][0] += 1.0
    edited = _write_package(tmp_path / "edited.safetensors", meta, info, tensors)
    last = info["layers"][-1]["base_key"]
    weights = dict(weights)
    weights[last] = weights[last] + 1e-3
    other = tmp_path / "other_base.safetensors"
    save_file(weights, str(other))
    with pytest.raises(solar.BaseMismatchError, match="fingerprint") as e:
        solar.decompress(str(edited), str(other))
    assert last in str(e.value)
    r = _run(edited, other, tmp_path / "out")
    assert r.returncode == 1 and r.stderr.strip().endswith(str(e.value)), (r.stderr, str(e.value))


def test_wrong_shape_and_missing_weight(tmp_path, package):
    pkg_path, _, weights = package
    weights = dict(weights)
    weights["encoder.layer.0.attention.self.query.weight"] = torch.randn(40, 48)
    wrong = tmp_path / "wrong_shape.safetensors"
    save_file(weights, str(wrong))
    r = _run(pkg_path, wrong, tmp_path / "out")
    assert r.returncode == 1 and "layer encoder.layer.0.attention.self.query" in r.stderr and "shape" in r.stderr
    with pytest.raises(solar.BaseMismatchError) as e:
        solar.decompress(str(pkg_path), str(wrong))
    assert r.stderr.strip().endswith(str(e.value))  # the same message from both decoders
    del weights["encoder.layer.0.attention.self.query.weight"]
    missing = tmp_path / "missing.safetensors"
    save_file(weights, str(missing))
    r = _run(pkg_path, missing, tmp_path / "out")
    assert r.returncode == 1 and "layer encoder.layer.0.attention.self.query" in r.stderr


def test_usage_and_foreign_files(tmp_path, package):
    pkg_path, base, _ = package
    assert _run(pkg_path, base).returncode == 2
    r = _run(base, base, tmp_path / "out")  # a safetensors file that is not a package
    assert r.returncode == 1 and "not a SOLAR package" in r.stderr
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(pkg_path.read_bytes()[:-3])
    r = _run(trunc, base, tmp_path / "out")
    assert r.returncode == 1 and "not a readable safetensors file" in r.stderr
    r = _run(tmp_path / "nope.safetensors", base, tmp_path / "out")
    assert r.returncode == 1 and "no such file" in r.stderr


@pytest.fixture
def lowrank_package(tmp_path):
    base, _ = _base(tmp_path)
    pkg_path = tmp_path / "lowrank.safetensors"
    solar.compress(str(_adapter(tmp_path)), str(base), ratio=0.5, method="lowrank").save(str(pkg_path), layout="layers")
    return pkg_path, base


LOWRANK_EDITS = ["lowrank-kind-unknown", "lowrank-rank-below-pairs", "lowrank-wrong-shape", "lowrank-nan",
                 "lowrank-nnz-mismatch", "lowrank-missing-factor"]


@pytest.fixture
def int8_package(tmp_path):
    base, _ = _base(tmp_path)
    pkg_path = tmp_path / "int8.safetensors"
    solar.compress(str(_adapter(tmp_path)), str(base), ratio=0.5, method="lowrank", storage="int8").save(
        str(pkg_path), layout="layers")
    return pkg_path, base


INT8_EDITS = ["int8-missing-scale", "int8-scale-float64", "int8-scale-wrong-shape", "int8-scale-negative",
              "int8-scale-nan", "int8-values-int16"]


@pytest.mark.parametrize("case", ["rank-too-large", "rank-bomb", "skipped-not-list", "peft-r-null", "extra-nan",
                                  "scaling-inf", "nnz-mismatch", "repeated-index", "dtype-int8",
                                  "checksum-empty", "checksum-nan", "peft-config-nan", "peft-config-inf-nested",
                                  "module-empty", "module-empty-part", "module-newline", "extra-decoded-factor",
                                  "eps-nan", "index-past-C"]
                         + LOWRANK_EDITS + INT8_EDITS)
def test_edited_package_refused_by_both_decoders(tmp_path, package, lowrank_package, int8_package, case):
    """A package edited with its digest recomputed (the digest detects damage, not edits): both decoders
    refuse the edits that would otherwise decode into a broken adapter, and write nothing."""
    pkg_path, base = (lowrank_package if case.startswith("lowrank") else int8_package if case.startswith("int8")
                      else package[:2])
    meta, info, tensors = _read_package(pkg_path)
    if case.startswith(("lowrank", "int8")):
        layer = next(i for i, l in enumerate(info["layers"]) if l.get("nnz", 0) >= 1)
        L = info["layers"][layer]
        assert L["kind"] == "lowrank"
    else:
        layer = next(i for i, l in enumerate(info["layers"]) if tensors[f"layer.{i}.indices"].numel() > 1)
        L = info["layers"][layer]
    B_key, A_key = f"layer.{layer}.lora_B", f"layer.{layer}.lora_A"
    if case == "lowrank-kind-unknown":
        L["kind"] = "dense"
    elif case == "lowrank-rank-below-pairs":
        tensors[B_key] = torch.randn(L["shape"][0], 2)
        tensors[A_key] = torch.randn(2, L["shape"][1])
        L["nnz"], L["rank"] = 2, 1
    elif case == "lowrank-wrong-shape":
        tensors[A_key] = tensors[A_key][:, :-1].contiguous()
    elif case == "lowrank-nan":
        tensors[B_key] = tensors[B_key].clone()
        tensors[B_key][0, 0] = float("nan")
    elif case == "lowrank-nnz-mismatch":
        L["nnz"] = L["nnz"] + 1
    elif case == "lowrank-missing-factor":
        del tensors[A_key]
    elif case == "rank-too-large":
        L["rank"] = min(L["shape"]) + 1
    elif case == "rank-bomb":  # a rank the config allows, but 2.8 KB would decode into 1.6 GB of zero padding
        info["peft_config"]["r"] = L["rank"] = 2**21
    elif case == "skipped-not-list":  # the C++ decoder took these three; the Python one refused them
        info["skipped"] = "x"
    elif case == "peft-r-null":  # ... and wrote r: null into adapter_config.json
        info["peft_config"]["r"] = None
    elif case == "extra-nan":
        tensors["extra.base_model.model.classifier.bias"] = torch.full((3,), float("nan"), dtype=torch.float64)
    elif case == "scaling-inf":
        L["scaling"] = float("inf")
    elif case == "eps-nan":   # the Python decoder named neither the layer nor the package (the ops' own message)
        info["eps"] = float("nan")
    elif case == "index-past-C":
        ix = tensors[f"layer.{layer}.indices"].clone()
        ix[-1] = L["shape"][0] * L["shape"][1]
        tensors[f"layer.{layer}.indices"] = ix
    elif case == "extra-decoded-factor":   # both decoders wrote it in place of the decoded lora_A
        tensors[f"extra.base_model.model.{L['module']}.lora_A.weight"] = torch.ones(L["rank"], L["shape"][1])
    elif case == "nnz-mismatch":
        L["nnz"] = L["nnz"] + 5
    elif case == "repeated-index":
        ix = tensors[f"layer.{layer}.indices"].clone()
        ix[1] = ix[0]
        tensors[f"layer.{layer}.indices"] = ix
    elif case == "dtype-int8":
        info["dtype"] = "int8"
    elif case == "checksum-empty":  # the basis check would be skipped (zip of nothing)
        L["checksum"] = []
    elif case == "checksum-nan":
        L["checksum"] = [float("nan"), 0.0]
    elif case == "module-empty":  # the edge decoder wrote base_model.model..lora_A.weight
        L["module"] = ""
    elif case == "module-empty-part":
        L["module"] = "encoder..query"
    elif case == "module-newline":  # messages naming the layer would not be one line
        L["module"] = "encoder.layer.0\nquery"
    elif case == "peft-config-nan":  # the C++ decoder wrote it into adapter_config.json, the Python one refused late
        info["peft_config"]["lora_dropout"] = float("nan")
    elif case == "peft-config-inf-nested":
        info["peft_config"]["alpha_pattern"] = {"query": [1.0, {"x": float("-inf")}]}
    elif case == "int8-missing-scale":
        del tensors[B_key + "_scale"]
    elif case == "int8-scale-float64":
        tensors[A_key + "_scale"] = tensors[A_key + "_scale"].double()
    elif case == "int8-scale-wrong-shape":
        tensors[B_key + "_scale"] = tensors[B_key + "_scale"].flatten().contiguous()
    elif case == "int8-scale-negative":
        tensors[A_key + "_scale"] = -tensors[A_key + "_scale"]
    elif case == "int8-scale-nan":
        tensors[B_key + "_scale"] = torch.full_like(tensors[B_key + "_scale"], float("nan"))
    elif case == "int8-values-int16":
        tensors[B_key] = tensors[B_key].to(torch.int16)
    edited = _write_package(tmp_path / "edited.safetensors", meta, info, tensors)
    with pytest.raises(ValueError, match="peft_config holds NaN or Inf" if case.startswith("peft-config") else
                       "is a LoRA factor the package decodes" if case == "extra-decoded-factor" else
                       f"^layer {L['module']}: " if case in ("eps-nan", "index-past-C") else None):
        solar.decompress(str(edited), str(base))
    r = _run(edited, base, tmp_path / "out")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if "scale" in case:  # refused for the scales (not some other check the edit tripped)
        assert "_scale" in r.stderr, r.stderr
    if case.startswith("checksum"):
        assert "checksum must be 2 finite numbers" in r.stderr, r.stderr
    if case.startswith("rank"):
        assert "rank must be an integer in [1, " in r.stderr, r.stderr
    if case.startswith("peft-config"):
        assert "peft_config holds NaN or Inf" in r.stderr, r.stderr
    if case.startswith("module"):
        assert "module must be a dotted module path" in r.stderr, r.stderr
    if case in ("eps-nan", "index-past-C"):
        assert f"layer {L['module']}: " in r.stderr, r.stderr
    if case == "extra-decoded-factor":
        assert f"(extra: tensor base_model.model.{L['module']}.lora_A.weight is a LoRA factor the package " \
               "decodes)" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


PACKED_EDITS = {  # case -> (storage, edit(info, tensors), what both decoders' messages contain); method solar
    # but for "shape-edited" (a low-rank layer's share depends on its shape)
    "nnz-up": ("float32", lambda i, t: i["layers"][0].update(nnz=i["layers"][0]["nnz"] + 1), "packed.values ends before"),
    "nnz-down": ("float32", lambda i, t: i["layers"][0].update(nnz=i["layers"][0]["nnz"] - 1), "packed.values holds"),
    "nnz-missing": ("float32", lambda i, t: i["layers"][0].pop("nnz"), "nnz must be an integer >= 0"),
    "nnz-negative": ("float32", lambda i, t: i["layers"][0].update(nnz=-1), "nnz must be an integer >= 0"),
    "values-cut": ("float32", lambda i, t: t.update({"packed.values": t["packed.values"][:-1].clone()}),
                   "packed.values holds|packed.values ends before"),
    "indices-int64": ("float32", lambda i, t: t.update({"packed.indices": t["packed.indices"].long()}),
                      "packed.indices must be a 1-D int32"),
    "indices-missing": ("float32", lambda i, t: t.pop("packed.indices"), "packed.indices"),
    "per-layer-tensor": ("float32", lambda i, t: t.update({"layer.0.values": t["packed.values"][:1].clone()}),
                         "unexpected tensor 'layer.0.values'"),
    "kind-unknown": ("float32", lambda i, t: i["layers"][0].update(kind="dense"), "kind must be 'solar' or 'lowrank'"),
    "shape-edited": ("float32", lambda i, t: i["layers"][0].update(shape=[48, 41]), "packed.values"),
    "scales-missing": ("int8", lambda i, t: t.pop("packed.scales"), "packed.scales must be present"),
    "scales-float64": ("int8", lambda i, t: t.update({"packed.scales": t["packed.scales"].double()}),
                       "packed.scales must be a 1-D float32"),
    "scales-cut": ("int8", lambda i, t: t.update({"packed.scales": t["packed.scales"][:-1].clone()}),
                   "packed.scales ends before|packed.scales holds"),
    "scales-on-float": ("float32", lambda i, t: t.update({"packed.scales": torch.ones(3)}),
                        "packed.scales must be present exactly when"),
}


@pytest.mark.parametrize("case", sorted(PACKED_EDITS))
def test_edited_packed_package_refused_by_both_decoders(tmp_path, case):
    """Packed layout (version 4): each layer's share of the 3 tensors follows from its kind, nnz and shape, so
    an edit of those (digest recomputed) or of the tensors is refused by both decoders, naming the tensor."""
    storage, edit, match = PACKED_EDITS[case]
    base, _ = _base(tmp_path)
    pkg_path = tmp_path / "packed.safetensors"
    method = "lowrank" if case == "shape-edited" else "solar"
    solar.compress(str(_adapter(tmp_path)), str(base), ratio=0.5, method=method, storage=storage).save(str(pkg_path))
    meta, info, tensors = _read_package(pkg_path)
    assert meta["format_version"] == "4" and {k for k in tensors if not k.startswith("extra.")} == (
        {"packed.values", "packed.indices"} | ({"packed.scales"} if storage == "int8" else set()))
    assert info["layers"][0]["nnz"] >= 1 and info["layers"][0].get("kind", "solar") == method
    edit(info, tensors)
    edited = _write_package(tmp_path / "edited.safetensors", meta, info, tensors)
    with pytest.raises(ValueError, match=match):
        solar.decompress(str(edited), str(base))
    r = _run(edited, base, tmp_path / "out")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(match, r.stderr), r.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("name", [b'"extra.x\\ud800"', b'"extra.x\xff"', b'"extra.x\xc0\xaf"'],
                         ids=["lone-surrogate-escape", "raw-0xff", "overlong-slash"])
def test_header_strings_must_be_utf8(tmp_path, package, name):
    """A tensor name that is not UTF-8 was copied into the adapter's header, which safetensors then
    could not read; the decoder now refuses the package at its header."""
    pkg_path, base, _ = package
    raw = pkg_path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n]
    key = b'"extra.base_model.model.classifier.bias"'
    assert key in header
    header = header.replace(key, name)
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    r = _run(edited, base, tmp_path / "out")
    assert r.returncode == 1 and "not valid UTF-8" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("where", ["value", "escape"])
def test_a_byte_that_is_not_text_is_shown_as_hex(tmp_path, package, where):
    """A damaged header byte that the JSON parser names is written as \\xNN: the message stays one line of
    valid UTF-8 (the raw byte went to stderr as it was)."""
    pkg_path, base, _ = package
    raw = bytearray(pkg_path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    at = (raw.index(b'"format":"subspace_ext.solar"') + len(b'"format":') if where == "value"
          else raw.index(b'\\"seed\\"') + 1)
    raw[at] = 0xA6   # the value's opening quote, or the '"' after a backslash inside the solar metadata
    assert at < 8 + n
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(bytes(raw))
    r = subprocess.run([str(BINARY), str(edited), str(base), str(tmp_path / "out")], capture_output=True)
    err = r.stderr.decode()   # UTF-8, or this raises
    assert r.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert ("unexpected character '\\xa6'" if where == "value" else "invalid escape '\\\\xa6'") in err, err


@pytest.mark.parametrize("where", ["bare-file", "folder-may-tie", "folder-no-config", "folder-untied"])
def test_module_the_base_lacks(tmp_path, package, where):
    """A layer whose module the base has no weight for (a tied lm_head; here an edited name). From a bare
    .safetensors file (no config to say how the model ties weights) or a folder whose config.json may tie
    embeddings, both decoders take the key the encoder resolved and recorded (the fingerprint shows it is the
    same weight) and write the same folder; from a folder without config.json or with tie_word_embeddings
    false, both refuse, naming the module. (The edge decoder took the key from any folder whose config may
    tie, where the Python decoder refused all but the model's output embedding.)"""
    pkg_path, base, weights = package
    if where != "bare-file":
        base = tmp_path / "base_folder"
        base.mkdir()
        save_file(weights, str(base / "model.safetensors"))
        if where != "folder-no-config":
            config = {"model_type": "bert", **({"tie_word_embeddings": False} if where == "folder-untied" else {})}
            (base / "config.json").write_text(json.dumps(config))
    meta, info, tensors = _read_package(pkg_path)
    info["layers"][0]["module"] += "_renamed"
    edited = _write_package(tmp_path / "edited.safetensors", meta, info, tensors)
    r = _run(edited, base, tmp_path / "cpp")
    if where in ("folder-no-config", "folder-untied"):
        with pytest.raises(solar.BaseMismatchError, match="no weight for adapted module .*_renamed"):
            solar.decompress(str(edited), str(base))
        assert r.returncode == 1 and "no weight for adapted module" in r.stderr, r.stderr
        assert not (tmp_path / "cpp" / "adapter_model.safetensors").exists()
    else:
        assert r.returncode == 0, r.stderr
        solar.decompress(str(edited), str(base)).save_adapter(str(tmp_path / "py"))
        _assert_same_folder(tmp_path / "py", tmp_path / "cpp")


@pytest.mark.parametrize("digits", [4300, 4301])
def test_integer_literals_over_pythons_digit_limit(tmp_path, package, digits):
    """Python's json refuses an integer literal of more than 4300 digits; the edge decoder took it (and
    copied it into adapter_config.json). Both now take 4300 digits to the same folder and refuse 4301."""
    pkg_path, base, _ = package
    meta, info, tensors = _read_package(pkg_path)
    info["peft_config"]["big"] = "BIG"
    meta = dict(meta, solar=json.dumps(info).replace('"BIG"', "7" * digits))
    meta["digest"] = io.content_digest(tensors, meta["solar"])
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    r = _run(edited, base, tmp_path / "cpp")
    if digits == 4301:
        with pytest.raises(ValueError, match="4300"):
            solar.decompress(str(edited), str(base))
        assert r.returncode == 1 and "integer of more than 4300 digits" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "cpp" / "adapter_model.safetensors").exists()
    else:
        assert r.returncode == 0, r.stderr
        solar.decompress(str(edited), str(base)).save_adapter(str(tmp_path / "py"))
        _assert_same_folder(tmp_path / "py", tmp_path / "cpp")


def test_compress_refuses_an_adapter_config_with_nan(tmp_path):
    """Python's json reads NaN in an adapter_config.json; a package carrying it was written, and then refused
    by both decoders (and by solar inspect)."""
    base, _ = _base(tmp_path)
    adapter = PeftAdapter.load(str(_adapter(tmp_path)))
    adapter.config["lora_dropout"] = float("nan")
    with pytest.raises(ValueError, match="adapter: its config holds NaN or Inf"):
        solar.compress(adapter, str(base), budget="full")


def test_a_layer_that_keeps_no_coefficient_builds_no_basis(tmp_path, monkeypatch):
    """A SOLAR layer whose coefficients all lost the budget decodes to zero factors and a zero checksum
    whatever its bases: both decoders built them anyway (seconds for a large weight: 5 of 37 MiniLM layers
    at ratio 0.1). They now skip them and write the same folder; a checksum edited away from zero is still
    refused."""
    base, _ = _base(tmp_path)
    ad = PeftAdapter.load(str(_adapter(tmp_path)))
    quiet = f"base_model.model.{MODULES[1]}.lora_B.weight"
    ad.tensors[quiet] = ad.tensors[quiet] * 1e-6   # its coefficients lose the global top-|c| to the query's
    pkg = solar.compress(ad, str(base), ratio=0.2)
    assert [l.nnz > 0 for l in pkg.layers] == [True, False]
    pkg_path = tmp_path / "package.safetensors"
    pkg.save(str(pkg_path), layout="layers")
    calls = []
    real = solar.ops.solar_basis
    monkeypatch.setattr(solar.ops, "solar_basis", lambda W0, *a: calls.append(tuple(W0.shape)) or real(W0, *a))
    out = solar.decompress(str(pkg_path), str(base))
    assert calls == [BASE_SHAPES[MODULES[0] + ".weight"]]   # the kept layer's only
    m, n = BASE_SHAPES[MODULES[1] + ".weight"]
    for side, shape in (("lora_B", (m, RANK)), ("lora_A", (RANK, n))):
        t = out.tensors[f"base_model.model.{MODULES[1]}.{side}.weight"]
        assert t.shape == shape and not t.any()
    py_dir, cpp_dir = tmp_path / "py", tmp_path / "cpp"
    out.save_adapter(str(py_dir))
    r = _run(pkg_path, base, cpp_dir)
    assert r.returncode == 0, r.stderr
    _assert_same_folder(py_dir, cpp_dir)
    meta, info, tensors = _read_package(pkg_path)
    info["layers"][1]["checksum"] = [0.5, 0.0]
    edited = _write_package(tmp_path / "edited.safetensors", meta, info, tensors)
    with pytest.raises(solar.BaseMismatchError, match="output.dense: the regenerated basis does not match"):
        solar.decompress(str(edited), str(base))
    r = _run(edited, base, tmp_path / "cpp2")
    assert r.returncode != 0 and "output.dense: the regenerated basis does not match" in r.stderr


def test_a_model_transformers_loads_under_other_names(tmp_path):
    """A ViT adapter names vit.layers.0.attention.q_proj, which transformers loads from the stored
    vit.encoder.layer.0.attention.attention.query.weight. The encoder records the layer as renamed; the edge
    decoder, which cannot work out transformers' renaming, takes the recorded key (its fingerprint checked)
    and writes the Python decoder's folder; without the flag it refuses, naming the module."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=48, num_labels=3)
    base = tmp_path / "vit"
    vit = transformers.ViTForImageClassification(cfg)
    if not hasattr(vit.vit, "layers"):
        pytest.skip(f"transformers {transformers.__version__} loads ViT under its stored names")
    vit.save_pretrained(str(base))
    (base / "config.json").write_text(json.dumps(dict(json.loads((base / "config.json").read_text()),
                                                      tie_word_embeddings=False)))   # not the tied-head rule
    model = peft.get_peft_model(transformers.ViTForImageClassification.from_pretrained(str(base)),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "fc1"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    model.save_pretrained(str(tmp_path / "adapter"))
    pkg_path = tmp_path / "p.safetensors"
    solar.compress(str(tmp_path / "adapter"), str(base), ratio=0.5).save(str(pkg_path))
    r = _run(pkg_path, base, tmp_path / "cpp")
    assert r.returncode == 0, r.stderr
    solar.decompress(str(pkg_path), str(base)).save_adapter(str(tmp_path / "py"))
    _assert_same_folder(tmp_path / "py", tmp_path / "cpp")
    meta, info, tensors = _read_package(pkg_path)
    assert [l.get("renamed") for l in info["layers"]] == [True, True]
    del info["layers"][0]["renamed"]
    r = _run(_write_package(tmp_path / "edited.safetensors", meta, info, tensors), base, tmp_path / "cpp2")
    assert r.returncode == 1 and "no weight for adapted module vit.layers.0" in r.stderr, r.stderr
