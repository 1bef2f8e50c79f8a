"""SOLAR (subspace_ext.solar): compression of a real peft LoRA adapter into sparse coefficients over
bases of the base model's weights, the package file, decoding back to a peft folder, and the CLI.

One LoRA adapter (r=8 on the 12 query/value Linears + the classifier head) is trained on the
bundled MiniLM once per session (solar_fixtures.trained_adapter_dir). Within this module
``ops.solar_basis`` is memoised (keyed by the weight's content hash, seed, stream, eps and thread
count, so every basis used is one the real op computed under the same conditions); the tests about
the basis itself, its repeatability and its thread independence call the real op.
"""
import dataclasses
import json
import math
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import save_file

from subspace_ext import cli, io, ops, solar, train
from subspace_ext.io import FormatError
from subspace_ext.solar import BaseMismatchError, SolarPackage

from solar_fixtures import (  # noqa: F401  (fixtures)
    PEFT_PREFIX, REAL_SOLAR_BASIS, SMALL_MODULES, base_weights, basis_memo, dense_updates, lora_only_adapter,
    minilm_base, one_layer_adapter, read_json, rel_err, safetensors_data_start, trained_adapter,
    trained_adapter_dir, write_base_copy)

ROUNDING = 1e-5  # relative error of a float32 adapter's update after a lossless round trip
WORDS = ["wonderful", "terrible", "okay", "disaster", "love", "boring"]
Q = SMALL_MODULES[0]
Q_KEY = "encoder.layer.0.attention.self.query.weight"
# the layer the "wrong base" tests break: one in the middle, so that earlier layers decode fine first
BROKEN = "bert.encoder.layer.3.attention.self.value"
BROKEN_KEY = "encoder.layer.3.attention.self.value.weight"


# ---------------------------------------------------------------------------------------------
# shared packages (module scope: each is made once)

@pytest.fixture(scope="module")
def full_pkg(trained_adapter, base_weights):
    return solar.compress(trained_adapter, base_weights, budget="full")


@pytest.fixture(scope="module")
def full_decoded(full_pkg, base_weights):
    return solar.decompress(full_pkg, base_weights)


@pytest.fixture(scope="module")
def full_coefficients(full_pkg):
    """{module: dense k1 x k2 coefficient matrix} from the full package (every coefficient kept)."""
    out = {}
    for info, vals, idx in zip(full_pkg.layers, full_pkg.values, full_pkg.indices):
        C = torch.zeros(info.shape[0] * info.shape[1], dtype=torch.float64)
        C[idx.long()] = vals.double()
        out[info.module] = C.reshape(info.shape)
    return out


RATIOS = (0.05, 0.2, 0.6)


@pytest.fixture(scope="module")
def ratio_pkgs(trained_adapter, base_weights):
    return {r: solar.compress(trained_adapter, base_weights, ratio=r) for r in RATIOS}


def _assert_updates_close(decoded: io.PeftAdapter, original: io.PeftAdapter, tol=ROUNDING):
    got, ref = dense_updates(decoded), dense_updates(original)
    assert sorted(got) == sorted(ref)
    for module in ref:
        assert got[module].shape == ref[module].shape, module
        e = rel_err(got[module], ref[module])
        assert e < tol, (module, e)


# ---------------------------------------------------------------------------------------------
# lossless round trip


def test_full_round_trip_reproduces_every_update(trained_adapter, full_pkg, full_decoded):
    assert [l.module for l in full_pkg.layers] == [u.module for u in trained_adapter.updates()]
    _assert_updates_close(full_decoded, trained_adapter)
    for u in full_decoded.updates():  # same rank and dtype as the original factors
        assert tuple(u.B.shape) == (384, 8) and tuple(u.A.shape) == (8, 384), u.module
        assert u.B.dtype == u.A.dtype == torch.float32
    for info in full_pkg.layers:
        assert info.nnz == info.shape[0] * info.shape[1]
        assert abs(info.energy - 1.0) < 1e-6
        assert 0 <= info.rel_error < ROUNDING


def test_full_round_trip_extra_tensors_and_config(trained_adapter, full_decoded, trained_adapter_dir, tmp_path):
    extra = trained_adapter.extra_tensors()
    assert extra, "the trained adapter should carry its classifier head"
    assert full_decoded.extra_tensors().keys() == extra.keys()
    for k, v in extra.items():
        got = full_decoded.tensors[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    assert full_decoded.config == trained_adapter.config
    out = tmp_path / "decoded"
    full_decoded.save_adapter(str(out))
    assert read_json(out / io.ADAPTER_CONFIG) == read_json(os.path.join(trained_adapter_dir, io.ADAPTER_CONFIG))
    reloaded = io.PeftAdapter.load(str(out))
    assert reloaded.tensors.keys() == full_decoded.tensors.keys()
    for k in reloaded.tensors:
        assert torch.equal(reloaded.tensors[k], full_decoded.tensors[k]), k


def test_full_package_coefficients_are_the_projection(trained_adapter, full_pkg, full_coefficients, base_weights):
    """Each stored coefficient is (Uᵀ ΔW V)[i, j] for the bases regenerated from W0, and ‖C‖ = ‖ΔW‖."""
    dense = dense_updates(trained_adapter)
    for info in full_pkg.layers:
        C = full_coefficients[info.module]
        W0 = base_weights.get(info.base_key)
        assert info.base_key == base_weights.key_for_module(info.module)
        U, Vb = ops.solar_basis(W0, full_pkg.seed, info.stream, full_pkg.eps)
        expected = U.T @ dense[info.module] @ Vb
        assert rel_err(C, expected) < ROUNDING, info.module
        assert abs(float(torch.linalg.norm(C) / torch.linalg.norm(dense[info.module])) - 1) < 1e-6, info.module


def test_decoded_folder_loads_in_peft_with_same_logits(trained_adapter_dir, full_decoded, tmp_path):
    dec_dir = str(tmp_path / "decoded")
    full_decoded.save_adapter(dec_dir)
    logits, lora_B = {}, {}
    for name, path in (("original", trained_adapter_dir), ("decoded", dec_dir)):
        model, tok = train.load_adapter_model(path)
        model.eval()
        with torch.no_grad():
            enc, _ = train.encode(tok, [(w, 0) for w in WORDS])
            logits[name] = model(**enc).logits
        lora_B[name] = dict(model.named_parameters())[
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"].detach().clone()
    # the decoded factors really were loaded (not peft's zero init for a key it did not find)
    key = f"{PEFT_PREFIX}{Q}.lora_B.weight"
    assert torch.equal(lora_B["decoded"], full_decoded.tensors[key])
    assert lora_B["original"].abs().max() > 0
    torch.testing.assert_close(logits["decoded"], logits["original"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# budgets


def test_error_falls_as_budget_grows(ratio_pkgs, full_pkg):
    means = [sum(l.rel_error for l in ratio_pkgs[r].layers) / len(ratio_pkgs[r].layers) for r in RATIOS]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[0] <= 1.0 + 1e-9
    full_mean = sum(l.rel_error for l in full_pkg.layers) / len(full_pkg.layers)
    assert full_mean < ROUNDING and full_mean < means[-1]


@pytest.mark.parametrize("ratio", RATIOS)
def test_ratio_and_budget_are_respected(ratio_pkgs, ratio):
    pkg = ratio_pkgs[ratio]
    extra = sum(t.numel() for t in pkg.extra.values())
    assert extra > 0  # the classifier head counts towards the ratio
    total = pkg.lora_numbers()
    assert total == sum((l.shape[0] + l.shape[1]) * l.rank for l in pkg.layers) + extra
    budget = ratio * total
    assert pkg.numbers() <= budget
    assert budget - pkg.numbers() < solar.NUMBERS_PER_COEFFICIENT  # no more than one coefficient unspent
    assert abs(pkg.ratio() / ratio - 1) < 1e-3
    assert pkg.numbers() == 2 * sum(v.numel() for v in pkg.values) + extra
    for info, v, ix in zip(pkg.layers, pkg.values, pkg.indices):
        assert info.nnz == v.numel() == ix.numel()
        assert v.dtype == torch.float32 and ix.dtype == torch.int32
        if ix.numel():
            assert 0 <= int(ix.min()) and int(ix.max()) < info.shape[0] * info.shape[1]
        assert len(set(ix.tolist())) == ix.numel()
    assert sum(v.numel() for v in pkg.values) > 0


def test_energy_in_unit_interval_and_monotone(ratio_pkgs, full_pkg):
    series = {l.module: [] for l in full_pkg.layers}
    for r in RATIOS:
        for l in ratio_pkgs[r].layers:
            assert 0.0 <= l.energy <= 1.0, (r, l.module, l.energy)
            series[l.module].append(l.energy)
    for l in full_pkg.layers:
        series[l.module].append(l.energy)
    for module, e in series.items():
        assert all(a <= b + 1e-12 for a, b in zip(e, e[1:])), (module, e)
        assert abs(e[-1] - 1.0) < 1e-6


def test_budget_keeps_the_globally_largest_coefficients(ratio_pkgs, full_coefficients, trained_adapter):
    """Kept set = the largest |c| over all layers; each layer's stored values are its coefficients and
    its reported energy is the kept fraction of ‖ΔW‖²."""
    dense = dense_updates(trained_adapter)
    pkg = ratio_pkgs[0.2]
    kept_min, dropped_max = math.inf, 0.0
    for info, v, ix in zip(pkg.layers, pkg.values, pkg.indices):
        C = full_coefficients[info.module].flatten()
        torch.testing.assert_close(v.double(), C[ix.long()], rtol=1e-5, atol=1e-9 * float(C.abs().max()))
        mask = torch.ones_like(C, dtype=torch.bool)
        mask[ix.long()] = False
        if ix.numel():
            kept_min = min(kept_min, float(C[~mask].abs().min()))
        dropped_max = max(dropped_max, float(C[mask].abs().max()))
        energy = float((v.double() ** 2).sum() / (dense[info.module] ** 2).sum())
        assert abs(info.energy - energy) < 1e-5, (info.module, info.energy, energy)
    assert kept_min >= dropped_max * (1 - 1e-6), (kept_min, dropped_max)


@pytest.mark.parametrize("ratio", RATIOS)
def test_reported_error_is_the_decoded_error(ratio_pkgs, trained_adapter, base_weights, ratio):
    pkg = ratio_pkgs[ratio]
    decoded = solar.decompress(pkg, base_weights)
    got, ref = dense_updates(decoded), dense_updates(trained_adapter)
    for info in pkg.layers:
        actual = rel_err(got[info.module], ref[info.module])
        assert abs(actual - info.rel_error) < 1e-5, (info.module, actual, info.rel_error)


def test_ratio_counts_extra_tensors(trained_adapter, base_weights):
    pkg = solar.compress(trained_adapter, base_weights, ratio=0.3)
    extra = sum(t.numel() for t in trained_adapter.extra_tensors().values())
    assert extra > 0 and pkg.extra_numbers() == extra
    assert pkg.lora_numbers() == sum(l.lora_numbers for l in pkg.layers) + extra
    assert pkg.numbers() == 2 * sum(v.numel() for v in pkg.values) + extra
    assert pkg.numbers() <= 0.3 * pkg.lora_numbers() and abs(pkg.ratio() / 0.3 - 1) < 1e-3
    # a ratio the extra tensors alone exceed is refused, saying why
    too_small = 0.5 * extra / pkg.lora_numbers()
    with pytest.raises(ValueError, match="extra tensors"):
        solar.compress(trained_adapter, base_weights, ratio=too_small)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=1000, ratio=0.2), "budget.*ratio|ratio.*budget"),
    (dict(budget="full", ratio=0.2), "budget.*ratio|ratio.*budget"),
    (dict(ratio=0), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(ratio=float("inf")), "ratio"),
    (dict(ratio=float("nan")), "ratio"),
    (dict(budget="lots"), "budget"),
    (dict(budget=1), "budget"),
    (dict(budget=True), "budget"),
    (dict(), "budget|ratio"),
    (dict(budget="full", eps=-1.0), "eps"),
    (dict(budget="full", seed=2**64), "seed"),
], ids=["budget+ratio", "full+ratio", "ratio0", "ratio-neg", "ratio-inf", "ratio-nan", "budget-lots",
        "budget-1", "budget-bool", "neither", "eps-neg", "seed-big"])
def test_bad_budget_arguments(one_layer_adapter, base_weights, kwargs, match, monkeypatch):
    def no_basis(*a, **k):
        raise AssertionError("bad arguments must be refused before any basis is computed")
    monkeypatch.setattr(solar.ops, "solar_basis", no_basis)
    with pytest.raises(ValueError, match=match):
        solar.compress(one_layer_adapter, base_weights, **kwargs)


# ---------------------------------------------------------------------------------------------
# package file


def _assert_packages_equal(a: SolarPackage, b: SolarPackage):
    assert (a.seed, a.eps, a.dtype) == (b.seed, b.eps, b.dtype)
    assert a.peft_config == b.peft_config
    assert [vars(l) for l in a.layers] == [vars(l) for l in b.layers]
    assert len(a.values) == len(b.values) == len(a.indices) == len(b.indices)
    for x, y in zip(a.values + a.indices, b.values + b.indices):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert a.extra.keys() == b.extra.keys()
    for k in a.extra:
        assert a.extra[k].dtype == b.extra[k].dtype and torch.equal(a.extra[k], b.extra[k]), k
    assert getattr(a, "skipped", []) == getattr(b, "skipped", [])


@pytest.fixture(scope="module")
def ratio_pkg_with_extra(trained_adapter, base_weights):
    return solar.compress(trained_adapter, base_weights, ratio=0.3, seed=5)


@pytest.fixture(params=solar.LAYOUTS)
def saved_pkg(ratio_pkg_with_extra, tmp_path, request):
    """The package saved in each layout: "packed" (version 4, the default) and "layers" (version 1)."""
    path = str(tmp_path / "pkg.safetensors")
    size = ratio_pkg_with_extra.save(path, layout=request.param)
    assert size == os.path.getsize(path) > 0
    assert io.safetensors_metadata(path)["format_version"] == ("4" if request.param == "packed" else "1")
    return path


def test_save_load_round_trip(ratio_pkg_with_extra, saved_pkg, base_weights):
    loaded = SolarPackage.load(saved_pkg)
    _assert_packages_equal(loaded, ratio_pkg_with_extra)
    assert loaded.numbers() == ratio_pkg_with_extra.numbers()
    assert loaded.summary() == ratio_pkg_with_extra.summary()
    a = solar.decompress(loaded, base_weights)
    b = solar.decompress(ratio_pkg_with_extra, base_weights)
    c = solar.decompress(saved_pkg, base_weights)  # from the path
    assert a.config == b.config == c.config
    assert a.tensors.keys() == b.tensors.keys() == c.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]) and torch.equal(c.tensors[k], b.tensors[k]), k


def test_package_file_is_smaller_than_the_adapter_at_low_ratio(ratio_pkgs, trained_adapter_dir, tmp_path):
    path = str(tmp_path / "p.safetensors")
    size = ratio_pkgs[0.05].save(path)
    assert size < os.path.getsize(os.path.join(trained_adapter_dir, io.ADAPTER_WEIGHTS))


@pytest.fixture(params=["whole-file", "memory-mapped"])
def read_path(request, monkeypatch):
    """Both ways io.read_safetensors reads a file: small files in one read, big ones via safe_open."""
    if request.param == "memory-mapped":
        monkeypatch.setattr(io, "_READ_WHOLE_BYTES", -1)
    return request.param


def test_saving_again_writes_the_same_bytes(ratio_pkg_with_extra, saved_pkg, tmp_path):
    """safetensors writes the metadata's keys in its hash map's order, new each time: the same package saved twice
    was other bytes (an adapter store could not deduplicate or sign it by its hash). The keys are now sorted."""
    layout = "packed" if io.safetensors_metadata(saved_pkg)["format_version"] == "4" else "layers"
    for i in range(3):
        again = str(tmp_path / f"again{i}.safetensors")
        ratio_pkg_with_extra.save(again, layout=layout)
        with open(saved_pkg, "rb") as a, open(again, "rb") as b:
            assert a.read() == b.read(), i
    with open(saved_pkg, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_sorting_the_metadata_of_a_header_of_another_length_moves_the_data(tmp_path, monkeypatch):
    """A header that sorted and compact is another length (another writer's spacing or escaping) is written anew
    and the data moved behind it, the tensors and metadata unchanged."""
    tensors = {"b": torch.arange(5, dtype=torch.float32), "a": torch.ones(2, 3, dtype=torch.float64)}
    path = str(tmp_path / "spaced.safetensors")
    save_file(tensors, path, metadata={"z": "1", "y": "é\"\n", "x": "3"})
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(size)), f.read()
    text = json.dumps(header, indent=3).encode()   # spaced: longer than safetensors' compact header
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
    with open(path, "rb") as f:
        spaced = f.read()

    def broken(src, dst, length=0):
        raise OSError("disk full")
    monkeypatch.setattr(io.shutil, "copyfileobj", broken)
    with pytest.raises(OSError, match="disk full"):   # a failed rewrite: no stray file, the file as it was
        io._sort_metadata(path)
    assert os.listdir(tmp_path) == ["spaced.safetensors"]
    with open(path, "rb") as f:
        assert f.read() == spaced
    monkeypatch.undo()
    io._sort_metadata(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        assert size < len(text) and size % 8 == 0
        assert list(json.loads(f.read(size))["__metadata__"]) == ["x", "y", "z"]
    assert io.safetensors_metadata(path) == {"z": "1", "y": "é\"\n", "x": "3"}
    got = io.read_safetensors(path)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_writers_with_the_same_pid_use_other_temporary_names(tmp_path, monkeypatch):
    """Files are written beside their name and renamed into place. The temporary name was the pid's alone, so
    two writers on two hosts (containers: the same small pids) saving into one shared folder wrote into each
    other's file and one rename failed (distributed review: 6 of 80 saves raised). Now a random part is added."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"x")
    for _ in range(2):
        io._write_atomically(str(tmp_path / "f.bin"), write)
    assert len(set(seen)) == 2 and all(os.path.dirname(s) == str(tmp_path) for s in seen)
    assert os.listdir(tmp_path) == ["f.bin"]


def test_read_paths_agree(saved_pkg, monkeypatch):
    whole = io.read_safetensors(saved_pkg)
    monkeypatch.setattr(io, "_READ_WHOLE_BYTES", -1)
    mapped = io.read_safetensors(saved_pkg)
    assert list(whole) == list(mapped) == sorted(mapped)
    for k in whole:
        assert whole[k].dtype == mapped[k].dtype and torch.equal(whole[k], mapped[k]), k


@pytest.mark.parametrize("cut", ["4-bytes", "in-header", "first-data-byte", "last-byte"])
def test_truncated_package_raises_format_error(saved_pkg, tmp_path, cut, base_weights, read_path):
    raw = pathlib.Path(saved_pkg).read_bytes()
    start = safetensors_data_start(saved_pkg)
    n = {"4-bytes": 4, "in-header": start // 2, "first-data-byte": start + 1, "last-byte": len(raw) - 1}[cut]
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[:n])
    with pytest.raises(FormatError, match="truncated.safetensors"):
        SolarPackage.load(str(bad))
    with pytest.raises(FormatError):
        solar.decompress(str(bad), base_weights)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_tampered_package_raises_format_error(saved_pkg, tmp_path, where, read_path):
    raw = bytearray(pathlib.Path(saved_pkg).read_bytes())
    start = safetensors_data_start(saved_pkg)
    pos = {"first": start, "middle": (start + len(raw)) // 2, "last": len(raw) - 1}[where]
    raw[pos] ^= 0x10
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="(?i)digest|tamper"):
        SolarPackage.load(str(bad))


def test_tampered_metadata_does_not_silently_change_the_adapter(ratio_pkg_with_extra, saved_pkg, base_weights,
                                                                tmp_path):
    """A flipped digit in the package's metadata (here: a layer's LoRA scaling, 2.0 -> 4.0; same
    length, so the file stays well-formed) must be refused (FormatError at load, or an error at
    decode), not decoded into a different adapter."""
    raw = pathlib.Path(saved_pkg).read_bytes()
    start = safetensors_data_start(saved_pkg)
    header = raw[8:start].decode()
    info = next(l for l in ratio_pkg_with_extra.layers if l.nnz > 0)
    old = f'\\"module\\": \\"{info.module}\\"'
    at = header.index(old)
    s_old = f'\\"scaling\\": {json.dumps(info.scaling)}'
    s_new = f'\\"scaling\\": {json.dumps(info.scaling * 2)}'
    assert len(s_old) == len(s_new) and header.index(s_old, at) > at
    pos = header.index(s_old, at)
    forged = header[:pos] + s_new + header[pos + len(s_old):]
    bad = tmp_path / "forged.safetensors"
    bad.write_bytes(raw[:8] + forged.encode() + raw[start:])
    try:
        decoded = solar.decompress(str(bad), base_weights)
    except ValueError:  # FormatError / BaseMismatchError: detected
        return
    honest = solar.decompress(ratio_pkg_with_extra, base_weights)
    got, ref = dense_updates(decoded), dense_updates(honest)
    assert rel_err(got[info.module], ref[info.module]) < ROUNDING, \
        f"tampered metadata of {info.module} loaded and decoded into a different update"


def _resigned(pkg_path, tmp_path, edit_meta=None, edit_tensors=None):
    """The package with its metadata / tensors edited and the digest recomputed (a deliberate edit, which
    the digest cannot catch: the field checks must)."""
    from safetensors import safe_open

    with safe_open(pkg_path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["solar"])
    if edit_meta:
        edit_meta(info)
    if edit_tensors:
        edit_tensors(tensors)
    meta["solar"] = json.dumps(info)
    meta["digest"] = io.content_digest(tensors, meta["solar"])
    out = str(tmp_path / "edited.safetensors")
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("case,match", [
    ("dtype-int8", "dtype 'int8' is not one of"),
    ("dtype-os", "dtype 'os' is not one of"),
    ("no-peft-config", "peft_config"),
    ("seed-string", "seed must be int"),
    ("rank-string", "layer 0: rank must be int"),
    ("float-indices", "layer 0: indices must be int32/int64"),
    ("unknown-field", "layer 0: unexpected field 'evil'"),
    ("layers-not-list", "layers must be list"),
    ("rank-too-large", r"layer 0: rank must be an integer in \[1, "),
    ("scaling-inf", "layer 0: scaling must be a finite number > 0"),
    ("nnz-mismatch", "layer 0: nnz .* != the .* stored coefficients"),
    ("peft-r-string", "peft_config r must be"),
    ("seed-2^64", "seed must fit in 64 bits"),          # the C++ decoder refused these two, Python took them
    ("scaling-10^400", "layer 0: scaling must be a finite number > 0"),
])
def test_edited_package_metadata_is_refused(saved_pkg, tmp_path, case, match):
    """The Python decoder checks every field as the C++ decoder does (both refuse, neither writes a broken
    adapter or dies with a traceback)."""
    def meta(info):
        if case.startswith("dtype"):
            info["dtype"] = case.split("-")[1]
        elif case == "no-peft-config":
            del info["peft_config"]
        elif case == "seed-string":
            info["seed"] = str(info["seed"])
        elif case == "rank-string":
            info["layers"][0]["rank"] = "4"
        elif case == "unknown-field":
            info["layers"][0]["evil"] = 1
        elif case == "layers-not-list":
            info["layers"] = {}
        elif case == "rank-too-large":
            info["layers"][0]["rank"] = min(info["layers"][0]["shape"]) + 1
        elif case == "scaling-inf":
            info["layers"][0]["scaling"] = math.inf
        elif case == "nnz-mismatch":
            info["layers"][0]["nnz"] += 5
        elif case == "peft-r-string":
            info["peft_config"]["r"] = "x"
        elif case == "seed-2^64":
            info["seed"] = 2**64
        elif case == "scaling-10^400":
            info["layers"][0]["scaling"] = 10**400

    packed = io.safetensors_metadata(saved_pkg)["format_version"] == "4"
    name = "packed.indices" if packed else "layer.0.indices"
    if packed:  # the per-layer checks, where the packed layout has its own
        match = {"float-indices": "packed.indices must be a 1-D int32", "nnz-mismatch": "packed.values ends before"}.get(case, match)

    def tens(t):
        if case == "float-indices":
            t[name] = t[name].float()
    path = _resigned(saved_pkg, tmp_path, meta, tens)
    with pytest.raises(FormatError, match="malformed package metadata.*" + match):
        SolarPackage.load(path)


def test_repeated_coefficient_indices_are_refused(saved_pkg, base_weights, tmp_path):
    def tens(t):
        k = next(k for k in t if k.endswith(".indices") and t[k].numel() > 1)
        t[k] = t[k].clone()
        t[k][1] = t[k][0]
    path = _resigned(saved_pkg, tmp_path, edit_tensors=tens)
    with pytest.raises(ValueError, match="coefficient indices repeat"):
        solar.decompress(path, base_weights)


def test_foreign_files_are_not_packages(trained_adapter_dir, minilm_base, tmp_path):
    for path in (os.path.join(trained_adapter_dir, io.ADAPTER_WEIGHTS), os.path.join(minilm_base, "model.safetensors")):
        with pytest.raises(FormatError, match="not a SOLAR package"):
            SolarPackage.load(path)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file at all, just some words\n" * 4)
    with pytest.raises(FormatError, match="notes.safetensors"):
        SolarPackage.load(str(text))
    with pytest.raises(FormatError, match="no such file"):
        SolarPackage.load(str(tmp_path / "missing.safetensors"))


def test_unsupported_format_version(saved_pkg, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(saved_pkg, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = str(max(solar.FORMAT_VERSIONS) + 1)
    path = str(tmp_path / "future.safetensors")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(FormatError, match="version"):
        SolarPackage.load(path)


# ---------------------------------------------------------------------------------------------
# determinism


@pytest.fixture(scope="module")
def one_layer_full_pkg(one_layer_adapter, base_weights):
    return solar.compress(one_layer_adapter, base_weights, budget="full")


def test_decode_is_independent_of_thread_count(one_layer_full_pkg, base_weights):
    """Bases and decoding with 1 and 2 threads (each thread count's basis from the real op)."""
    out, before = {}, torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out[n] = solar.decompress(one_layer_full_pkg, base_weights)
    finally:
        torch.set_num_threads(before)
    assert out[1].tensors.keys() == out[2].tensors.keys()
    for k, t1 in out[1].tensors.items():
        t2 = out[2].tensors[k]
        assert t1.shape == t2.shape and t1.dtype == t2.dtype
        assert rel_err(t1, t2) < 1e-5, k


def test_solar_basis_threads_and_repeats(base_weights, basis_memo):
    W0 = base_weights.get(Q_KEY)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        U2, V2 = basis_memo(W0, 0, 0, 0.0)  # the real op's result at 2 threads, made earlier or now
        Ur, Vr = REAL_SOLAR_BASIS(W0, 0, 0, 0.0)  # a fresh call
        assert torch.equal(U2, Ur) and torch.equal(V2, Vr)  # same call, same bits
        torch.set_num_threads(1)
        U1, V1 = basis_memo(W0, 0, 0, 0.0)  # the real op at 1 thread
    finally:
        torch.set_num_threads(before)
    assert (U1 - U2).abs().max() < 1e-8 and (V1 - V2).abs().max() < 1e-8


def test_same_seed_gives_identical_packages(one_layer_adapter, base_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "solar_basis", REAL_SOLAR_BASIS)  # two real computations of the basis
    a = solar.compress(one_layer_adapter, base_weights, ratio=0.4, seed=11, eps=0.1)
    b = solar.compress(one_layer_adapter, base_weights, ratio=0.4, seed=11, eps=0.1)
    _assert_packages_equal(a, b)
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    a.save(pa)
    b.save(pb)
    _assert_packages_equal(SolarPackage.load(pa), SolarPackage.load(pb))


def test_other_seed_and_eps_still_lossless(one_layer_adapter, one_layer_full_pkg, base_weights):
    pkg = solar.compress(one_layer_adapter, base_weights, budget="full", seed=7, eps=0.3)
    ref = one_layer_full_pkg  # seed 0, eps 0
    assert pkg.seed == 7 and pkg.eps == 0.3
    # the perturbed basis is another basis: other coefficients, same update
    assert not torch.allclose(pkg.values[0], ref.values[0], rtol=1e-3, atol=1e-6)
    assert pkg.layers[0].checksum != ref.layers[0].checksum
    _assert_updates_close(solar.decompress(pkg, base_weights), one_layer_adapter)
    assert pkg.layers[0].rel_error < ROUNDING


def test_wrong_seed_at_decode_is_detected(one_layer_adapter, base_weights):
    pkg = solar.compress(one_layer_adapter, base_weights, ratio=0.5, seed=7, eps=0.3)
    forged = dataclasses.replace(pkg, seed=8)
    with pytest.raises(BaseMismatchError, match=Q):
        solar.decompress(forged, base_weights)


def test_base_with_tied_singular_values_decodes_at_another_thread_count(tmp_path, monkeypatch):
    """A rank-deficient base weight (8 of 300 x 200, float64, pruned rows) and an orthogonal one (all values
    tied). LAPACK's vectors for a null space or a tie changed with the thread count: a package made
    with 2 threads failed its checksum with 1 (BaseMismatchError). solar_basis now resolves ties
    with the seed, so the receiver's bases match whatever its LAPACK returns."""
    monkeypatch.setattr(ops, "solar_basis", REAL_SOLAR_BASIS)
    g = torch.Generator().manual_seed(8)
    low = torch.randn(300, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 200, dtype=torch.float64,
                                                                              generator=g)
    low[:40] = 0
    weights = {"layer.0.low.weight": low,
               "layer.0.orth.weight": torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=g)).Q.float().contiguous()}
    base = str(tmp_path / "base.safetensors")
    save_file(weights, base)
    r, tensors = 4, {}
    for key, W in weights.items():
        module = key[: -len(".weight")]
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(W.shape[0], r, dtype=W.dtype, generator=g)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(r, W.shape[1], dtype=W.dtype, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["low", "orth"], "bias": "none",
              "lora_dropout": 0.0, "fan_in_fan_out": False, "task_type": None}
    adapter = io.PeftAdapter(config, tensors)
    torch.set_num_threads(2)
    pkg = solar.compress(adapter, base, budget="full")
    torch.set_num_threads(1)
    for e in solar.relative_errors(adapter, solar.decompress(pkg, base)):
        assert e < ROUNDING


# ---------------------------------------------------------------------------------------------
# solar_basis


@pytest.mark.parametrize("m,n", [(40, 64), (64, 40), (33, 33)])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solar_basis_orthonormal_complete(m, n, eps, dtype):
    W0 = torch.randn(m, n, dtype=torch.float64).to(dtype)
    U, Vb = REAL_SOLAR_BASIS(W0, 5, 2, eps)
    assert U.dtype == Vb.dtype == torch.float64
    assert U.shape == (m, m) and Vb.shape == (n, n)
    assert (U.T @ U - torch.eye(m, dtype=torch.float64)).abs().max() < 1e-12
    assert (Vb.T @ Vb - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert (U @ U.T - torch.eye(m, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("m,n", [(40, 64), (64, 40)])
def test_solar_basis_starts_with_singular_vectors(m, n):
    W0 = torch.randn(m, n, dtype=torch.float64)
    k = min(m, n)
    Ur, S, Vh = torch.linalg.svd(W0)
    U, Vb = REAL_SOLAR_BASIS(W0, 9, 0, 0.0)
    for j in range(k):
        for got, ref in ((U[:, j], Ur[:, j]), (Vb[:, j], Vh[j])):
            assert min(float((got - ref).norm()), float((got + ref).norm())) < 1e-9, j
    # U and V signs pair up: U_kᵀ W0 V_k = diag(S) with positive entries
    core = U[:, :k].T @ W0 @ Vb[:, :k]
    assert (core - torch.diag(S)).abs().max() < 1e-10 * float(S[0])
    # canonical sign: the largest-magnitude entry of each leading U column is positive
    rows = U[:, :k].abs().argmax(0)
    assert bool((U[rows, torch.arange(k)] > 0).all())
    # the completion is seeded; the singular part is not
    U2, V2 = REAL_SOLAR_BASIS(W0, 10, 0, 0.0)
    assert torch.equal(U2[:, :k], U[:, :k]) and torch.equal(V2[:, :k], Vb[:, :k])
    big_u, big_v = (U, U2) if m > n else (Vb, V2)
    assert not torch.allclose(big_u[:, k:], big_v[:, k:])


def test_solar_basis_eps_perturbs_by_about_eps():
    W0 = torch.randn(48, 48, dtype=torch.float64)
    U0, V0 = REAL_SOLAR_BASIS(W0, 1, 0, 0.0)
    U1, V1 = REAL_SOLAR_BASIS(W0, 1, 0, 0.3)
    d = float((U1 - U0).norm() / U0.norm())
    assert 0.05 < d < 1.0, d  # perturbed, but not a random basis unrelated to W0
    # not the same basis rotated as a whole: W0's projection is no longer diagonal
    core = U1.T @ W0 @ V1
    off = core - torch.diag(torch.diagonal(core))
    assert float(off.norm() / core.norm()) > 1e-3


# ---------------------------------------------------------------------------------------------
# bad inputs: base model


def _nudge_one_ulp(t):
    t = t.clone()
    t[3, 5] = torch.nextafter(t[3, 5], torch.tensor(math.inf, dtype=t.dtype))
    return t


@pytest.fixture(scope="module")
def nudged_base(minilm_base, tmp_path_factory):
    """A copy of MiniLM whose layer-3 value weight differs from the real one in one entry by one ulp."""
    dst = str(tmp_path_factory.mktemp("solar_bases") / "nudged.safetensors")
    return write_base_copy(minilm_base, dst, modify={BROKEN_KEY: _nudge_one_ulp})


def test_wrong_base_names_the_layer(ratio_pkgs, nudged_base, monkeypatch):
    pkg = ratio_pkgs[0.2]
    bases = []  # every layer's fingerprint is checked before any layer is decoded
    monkeypatch.setattr(ops, "solar_basis", lambda *a: bases.append(a) or REAL_SOLAR_BASIS(*a))
    with pytest.raises(BaseMismatchError) as e:
        solar.decompress(pkg, nudged_base)
    assert not bases
    msg = str(e.value)
    assert BROKEN in msg and "base" in msg
    others = [l.module for l in pkg.layers if l.module != BROKEN]
    assert not any(m in msg.replace(BROKEN, "") for m in others), msg  # only the broken layer


def test_base_without_the_weight(trained_adapter, ratio_pkgs, minilm_base, tmp_path):
    base = write_base_copy(minilm_base, str(tmp_path / "b.safetensors"), drop=[BROKEN_KEY])
    with pytest.raises(BaseMismatchError, match=BROKEN.replace(".", r"\.")):
        solar.decompress(ratio_pkgs[0.2], base)
    with pytest.raises(FormatError, match=BROKEN.replace(".", r"\.")):
        solar.compress(trained_adapter, base, ratio=0.2)


def test_base_with_wrong_shape(trained_adapter, ratio_pkgs, minilm_base, tmp_path, base_weights):
    W = base_weights.get(BROKEN_KEY)
    base = write_base_copy(minilm_base, str(tmp_path / "b.safetensors"), replace={BROKEN_KEY: W[:, :200].clone()})
    for call in (lambda: solar.decompress(ratio_pkgs[0.2], base),
                 lambda: solar.compress(trained_adapter, base, ratio=0.2)):
        with pytest.raises(BaseMismatchError) as e:
            call()
        assert BROKEN in str(e.value) and "384" in str(e.value) and "200" in str(e.value)


def test_missing_base_path(trained_adapter, tmp_path):
    with pytest.raises(FormatError, match="nowhere"):
        solar.compress(trained_adapter, str(tmp_path / "nowhere"), budget="full")


# ---------------------------------------------------------------------------------------------
# bad inputs: adapter folder


def test_adapter_folder_without_config(trained_adapter_dir, base_weights, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    (d / io.ADAPTER_WEIGHTS).write_bytes(pathlib.Path(trained_adapter_dir, io.ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(FormatError, match="adapter_config.json"):
        solar.compress(str(d), base_weights, budget="full")


def test_adapter_folder_with_only_bin(trained_adapter_dir, base_weights, tmp_path):
    d = tmp_path / "binonly"
    d.mkdir()
    (d / io.ADAPTER_CONFIG).write_text(pathlib.Path(trained_adapter_dir, io.ADAPTER_CONFIG).read_text())
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FormatError) as e:
        solar.compress(str(d), base_weights, budget="full")
    assert "pickle" in str(e.value) and "safetensors" in str(e.value)


def test_adapter_folder_missing(base_weights, tmp_path):
    with pytest.raises(FormatError, match="no_such_adapter"):
        solar.compress(str(tmp_path / "no_such_adapter"), base_weights, budget="full")


# ---------------------------------------------------------------------------------------------
# AdaLoRA


def _adalora_adapter():
    cfg = {"peft_type": "ADALORA", "lora_alpha": 8, "r": 8, "init_r": 6, "target_r": 4, "tinit": 0,
           "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 100,
           "target_modules": ["query", "value"], "layers_to_transform": [0], "lora_dropout": 0.0,
           "bias": "none", "task_type": None}
    tensors = {}
    for module in SMALL_MODULES:
        p = f"{PEFT_PREFIX}{module}"
        tensors[f"{p}.lora_A"] = torch.randn(6, 384) * 0.05
        tensors[f"{p}.lora_B"] = torch.randn(384, 6) * 0.05
        E = torch.randn(6, 1)
        E[4] = 0.0  # a pruned triplet, as AdaLoRA leaves them
        tensors[f"{p}.lora_E"] = E
    return io.PeftAdapter(cfg, tensors)


def _adalora_reference(ad):
    """ΔW = B (A ⊙ E) · alpha / (r + 1e-5), peft's AdaLoRA forward, in float64."""
    out = {}
    alpha = ad.config["lora_alpha"]
    for module in SMALL_MODULES:
        p = f"{PEFT_PREFIX}{module}"
        A, B, E = (ad.tensors[f"{p}.lora_{x}"].double() for x in "ABE")
        out[module] = (B @ (A * E)) * alpha / (A.shape[0] + 1e-5)
    return out


@pytest.fixture(scope="module")
def adalora_case(base_weights):
    ad = _adalora_adapter()
    dec = solar.decompress(solar.compress(ad, base_weights, budget="full"), base_weights)
    return ad, _adalora_reference(ad), dec


def test_adalora_decodes_to_equivalent_lora(adalora_case, tmp_path):
    ad, ref, dec = adalora_case
    assert dec.peft_type == "LORA" and dec.config["peft_type"] == "LORA"
    for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"):
        assert k not in dec.config, k
    assert not any("lora_E" in k for k in dec.tensors)
    ups = {u.module: u for u in dec.updates()}
    assert sorted(ups) == sorted(ref)
    for module, D in ref.items():
        u = ups[module]
        assert abs(u.scaling - ad.config["lora_alpha"] / (6 + 1e-5)) < 1e-9 * u.scaling, (module, u.scaling)
        assert rel_err(u.scaling * (u.B.double() @ u.A.double()), D) < ROUNDING, module
    # and the same through a folder written and read back
    dec.save_adapter(str(tmp_path / "ada"))
    again = {u.module: u for u in io.PeftAdapter.load(str(tmp_path / "ada")).updates()}
    for module, D in ref.items():
        u = again[module]
        assert abs(u.scaling - ups[module].scaling) < 1e-12 * u.scaling
        assert rel_err(u.scaling * (u.B.double() @ u.A.double()), D) < ROUNDING, module


def test_adalora_decoded_folder_means_the_same_to_peft(adalora_case, tmp_path):
    """peft itself reads the rank/alpha patterns of the decoded config into the right update."""
    from peft import PeftModel

    _, ref, dec = adalora_case
    path = str(tmp_path / "ada")
    dec.save_adapter(path)
    model, _ = train.load_classifier()
    pm = PeftModel.from_pretrained(model, path)
    mods = dict(pm.named_modules())
    for module, D in ref.items():
        got = mods[f"{PEFT_PREFIX}{module}"].get_delta_weight("default")
        assert rel_err(got, D) < ROUNDING, module
    # the other layers are not adapted
    assert not hasattr(mods[f"{PEFT_PREFIX}bert.encoder.layer.1.attention.self.query"], "lora_A")


# ---------------------------------------------------------------------------------------------
# truncated-SVD baseline


def _kept_components(ad: io.PeftAdapter):
    return {u.module: int((u.B.double().norm(dim=0) > 0).sum()) for u in ad.updates()}


@pytest.mark.parametrize("kw", [dict(ratio=0.2), dict(budget=5 * 769), dict(budget=5 * 769 - 1)])
def test_svd_baseline_budget(lora_only_adapter, kw):
    ad, used = solar.truncated_svd_baseline(lora_only_adapter, **kw)
    total = sum((u.shape[0] + u.shape[1]) * u.A.shape[0] for u in lora_only_adapter.updates())
    budget = kw["budget"] if "budget" in kw else kw["ratio"] * total
    assert used <= budget
    kept = _kept_components(ad)
    assert used == sum(k * (384 + 384 + 1) for k in kept.values())
    assert budget - used < 384 + 384 + 1  # could not afford one more component
    assert ad.config == lora_only_adapter.config
    for k, t in lora_only_adapter.tensors.items():
        assert ad.tensors[k].shape == t.shape and ad.tensors[k].dtype == t.dtype, k


def test_svd_baseline_counts_extra_tensors(trained_adapter):
    ad, used = solar.truncated_svd_baseline(trained_adapter, ratio=0.3)
    extra = trained_adapter.extra_tensors()
    total = sum((u.shape[0] + u.shape[1]) * u.A.shape[0] for u in trained_adapter.updates()) + sum(
        t.numel() for t in extra.values())
    assert used <= 0.3 * total
    assert used == sum(k * 769 for k in _kept_components(ad).values()) + sum(t.numel() for t in extra.values())
    for k, t in extra.items():
        assert torch.equal(ad.tensors[k], t), k


def test_svd_baseline_is_eckart_young_optimal(lora_only_adapter):
    ad, _ = solar.truncated_svd_baseline(lora_only_adapter, ratio=0.2)
    orig, got = dense_updates(lora_only_adapter), dense_updates(ad)
    kept = _kept_components(ad)
    assert sum(kept.values()) >= 1
    energies_kept, energies_dropped = [], []
    for module, D in orig.items():
        k = kept[module]
        U, S, Vh = torch.linalg.svd(D)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        err = float(torch.linalg.norm(D - got[module]))
        opt = float(S[k:].square().sum().sqrt())
        assert abs(err - opt) <= 1e-5 * float(torch.linalg.norm(D)), (module, err, opt)
        if k:
            assert rel_err(got[module], best) < 1e-5, module
        energies_kept += S[:k].square().tolist()
        energies_dropped += S[k:8].square().tolist()
    # equal cost per component (all layers 384 x 384): the kept ones are the largest overall
    assert min(energies_kept) >= max(energies_dropped) * (1 - 1e-9)


# ---------------------------------------------------------------------------------------------
# CLI


def loaded_modules(adapter_dir):
    return [u.module for u in io.PeftAdapter.load(adapter_dir).updates()]


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_cli_compress_inspect_decompress(trained_adapter_dir, minilm_base, base_weights, ratio_pkg_with_extra,
                                        tmp_path, capsys):
    pkg = str(tmp_path / "pkg.safetensors")
    out = str(tmp_path / "restored")
    assert cli.main(["solar", "compress", trained_adapter_dir, "--base", minilm_base, "-o", pkg,
                     "--ratio", "0.3", "--seed", "5", "--eps", "0", "-q"]) == 0
    captured = capsys.readouterr()
    assert f"{len(loaded_modules(trained_adapter_dir))} layers" in captured.out and pkg in captured.out
    loaded = SolarPackage.load(pkg)
    assert loaded.seed == 5 and loaded.numbers() <= 0.3 * loaded.lora_numbers()
    assert abs(loaded.ratio() / 0.3 - 1) < 1e-3
    _assert_packages_equal(loaded, ratio_pkg_with_extra)  # = solar.compress(..., ratio=0.3, seed=5)

    assert cli.main(["solar", "inspect", pkg]) == 0
    text = capsys.readouterr().out
    rows = [l for l in text.splitlines() if l.startswith("| ") and "---" not in l]
    assert rows[0].startswith("| layer |")
    assert [r.split("|")[1].strip() for r in rows[1:]] == loaded_modules(trained_adapter_dir)
    for row, info in zip(rows[1:], loaded.layers):
        assert f"{info.rel_error:.4f}" in row and str(info.nnz) in row
    assert "ratio" in text and f"{loaded.ratio():.4f}" in text

    assert cli.main(["solar", "decompress", pkg, "--base", minilm_base, "-o", out, "-q"]) == 0
    assert "decoded" in capsys.readouterr().out
    restored = io.PeftAdapter.load(out)
    expected = solar.decompress(loaded, base_weights)
    assert restored.config == expected.config
    assert restored.tensors.keys() == expected.tensors.keys()
    for k in expected.tensors:
        assert torch.equal(restored.tensors[k], expected.tensors[k]), k


@pytest.mark.parametrize("extra,match", [
    ([], "--ratio|--budget"),
    (["--budget", "lots"], "budget"),
    (["--budget", "1"], "budget.*>= 2"),
    (["--budget", "1e3"], "budget"),
    (["--ratio", "0"], "ratio"),
    (["--ratio", "inf"], "ratio"),
    (["--ratio", "0.1", "--eps", "-1"], "eps"),
    (["--ratio", "0.1", "--rank", "4"], "--rank applies only with --dense"),
], ids=["no-budget", "budget-lots", "budget-1", "budget-float", "ratio0", "ratio-inf", "eps-negative", "rank-not-dense"])
def test_cli_compress_usage_errors(trained_adapter_dir, minilm_base, tmp_path, capsys, extra, match):
    """Bad options are usage errors: one line naming the option, exit status 2, nothing written."""
    import re

    try:
        rc = cli.main(["solar", "compress", trained_adapter_dir, "--base", minilm_base,
                       "-o", str(tmp_path / "p.safetensors"), "-q", *extra])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    assert rc == 2
    line = _one_error_line(capsys)
    assert re.search(match, line), line
    assert not os.path.exists(tmp_path / "p.safetensors")


def test_cli_compress_output_policy(trained_adapter_dir, minilm_base, tmp_path, capsys):
    """-o creates missing folders and replaces an earlier package, but never another kind of file."""
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(3)}, str(other))
    before = other.read_bytes()
    argv = ["solar", "compress", trained_adapter_dir, "--base", minilm_base, "--ratio", "0.1", "-q", "-o"]
    assert cli.main(argv + [str(other)]) == 1
    assert "exists and is not a SOLAR package" in _one_error_line(capsys)
    assert other.read_bytes() == before
    nested = tmp_path / "new" / "dir" / "p.safetensors"
    assert cli.main(argv + [str(nested)]) == 0
    assert cli.main(argv + [str(nested)]) == 0   # an earlier package is replaced
    capsys.readouterr()


def test_cli_inspect_into_a_closed_pipe_is_quiet(ratio_pkg_with_extra, tmp_path):
    import subprocess
    import sys

    pkg = str(tmp_path / "p.safetensors")
    ratio_pkg_with_extra.save(pkg)
    r = subprocess.run(f"'{sys.executable}' -m subspace_ext.cli solar inspect '{pkg}' | head -c 10", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert len(r.stdout) == 10 and r.stderr == "", r.stderr


def test_cli_both_budget_and_ratio(trained_adapter_dir, minilm_base, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["solar", "compress", trained_adapter_dir, "--base", minilm_base, "-o", str(tmp_path / "p"),
                  "--ratio", "0.1", "--budget", "100"])
    assert e.value.code != 0
    assert "--ratio" in _one_error_line(capsys)


def test_cli_nonexistent_adapter(minilm_base, tmp_path, capsys):
    rc = cli.main(["solar", "compress", str(tmp_path / "ghost_adapter"), "--base", minilm_base,
                   "-o", str(tmp_path / "p.safetensors"), "--ratio", "0.1", "-q"])
    assert rc != 0
    assert "ghost_adapter" in _one_error_line(capsys)


def test_cli_wrong_base(ratio_pkg_with_extra, nudged_base, tmp_path, capsys):
    pkg = str(tmp_path / "pkg.safetensors")
    ratio_pkg_with_extra.save(pkg)
    rc = cli.main(["solar", "decompress", pkg, "--base", nudged_base, "-o", str(tmp_path / "out"), "-q"])
    assert rc != 0
    line = _one_error_line(capsys)
    assert BROKEN in line
    assert not os.path.exists(tmp_path / "out" / io.ADAPTER_WEIGHTS)


def test_cli_compress_against_a_base_without_the_layers(trained_adapter_dir, tmp_path, capsys):
    not_the_base = os.path.join(trained_adapter_dir, io.ADAPTER_WEIGHTS)  # a safetensors file, wrong content
    rc = cli.main(["solar", "compress", trained_adapter_dir, "--base", not_the_base,
                   "-o", str(tmp_path / "p.safetensors"), "--ratio", "0.2", "-q"])
    assert rc != 0
    line = _one_error_line(capsys)
    assert "bert.encoder.layer.0.attention.self.query" in line
    assert not os.path.exists(tmp_path / "p.safetensors")


def test_cli_inspect_not_a_package(trained_adapter_dir, capsys):
    rc = cli.main(["solar", "inspect", os.path.join(trained_adapter_dir, io.ADAPTER_WEIGHTS)])
    assert rc != 0
    assert "not a SOLAR package" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# outputs never destroy inputs; failed writes leave nothing half-written

def _copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _bytes_of(folder):
    return {f: pathlib.Path(folder, f).read_bytes() for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("case", ["package over the adapter's weights", "package over the base",
                                  "decompress into the package's folder as the package",
                                  "decompress into an adapter folder"])
def test_cli_refuses_to_overwrite_inputs(case, trained_adapter_dir, ratio_pkg_with_extra, tmp_path, capsys):
    ad = _copy_adapter(trained_adapter_dir, tmp_path / "adapter")
    pkg = str(tmp_path / "pkg.safetensors")
    ratio_pkg_with_extra.save(pkg)
    base = str(tmp_path / "base.safetensors")  # any file: the check runs before anything is read
    shutil.copy(os.path.join(ad, io.ADAPTER_WEIGHTS), base)
    if case == "package over the adapter's weights":
        argv = ["solar", "compress", ad, "--base", base, "-o", os.path.join(ad, io.ADAPTER_WEIGHTS), "--ratio", "0.1"]
        match = "is one of this command's inputs"
    elif case == "package over the base":
        argv = ["solar", "compress", ad, "--base", base, "-o", base, "--ratio", "0.1"]
        match = "is one of this command's inputs"
    elif case == "decompress into the package's folder as the package":
        os.rename(pkg, os.path.join(ad, io.ADAPTER_WEIGHTS))  # a package stored under the adapter's file name
        pkg = os.path.join(ad, io.ADAPTER_WEIGHTS)
        argv = ["solar", "decompress", pkg, "--base", base, "-o", ad, "--force"]
        match = "would overwrite this command's input"
    else:
        argv = ["solar", "decompress", pkg, "--base", base, "-o", ad]
        match = "already holds a peft adapter; pass --force"
    before = {p: pathlib.Path(p).read_bytes() for p in (pkg, base)} | {f"ad/{k}": v for k, v in _bytes_of(ad).items()}
    assert cli.main(argv + ["-q"]) == 1
    assert match in _one_error_line(capsys)
    after = {p: pathlib.Path(p).read_bytes() for p in (pkg, base)} | {f"ad/{k}": v for k, v in _bytes_of(ad).items()}
    assert after == before


def test_cli_decompress_force_replaces_an_adapter(trained_adapter_dir, ratio_pkg_with_extra, minilm_base, tmp_path,
                                                 capsys):
    out = _copy_adapter(trained_adapter_dir, tmp_path / "adapter")
    pkg = str(tmp_path / "pkg.safetensors")
    ratio_pkg_with_extra.save(pkg)
    assert cli.main(["solar", "decompress", pkg, "--base", minilm_base, "-o", out, "--force", "-q"]) == 0
    restored = io.PeftAdapter.load(out)
    assert restored.config == read_json(os.path.join(out, io.ADAPTER_CONFIG))
    assert restored.tensors.keys() == solar.decompress(ratio_pkg_with_extra, minilm_base).tensors.keys()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_cli_inspect_a_folder(trained_adapter_dir, capsys):
    assert cli.main(["solar", "inspect", trained_adapter_dir]) == 1
    assert "is a folder; expected a SOLAR package file" in _one_error_line(capsys)


def test_failed_writes_keep_the_old_file_and_leave_no_partial_output(ratio_pkg_with_extra, trained_adapter,
                                                                    tmp_path, monkeypatch):
    import safetensors.torch

    pkg = str(tmp_path / "pkg.safetensors")
    ratio_pkg_with_extra.save(pkg)
    old = pathlib.Path(pkg).read_bytes()

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.raises(OSError, match="pkg.safetensors: could not write .*No space left"):
        ratio_pkg_with_extra.save(pkg)
    assert pathlib.Path(pkg).read_bytes() == old and os.listdir(tmp_path) == ["pkg.safetensors"]
    with pytest.raises(OSError, match="could not write"):
        trained_adapter.save_adapter(str(tmp_path / "new_adapter"))
    assert os.listdir(tmp_path) == ["pkg.safetensors"]  # the folder this call created is gone
    monkeypatch.setattr(io, "save_file", safetensors.torch.save_file)
    SolarPackage.load(pkg)


def test_package_reports_growth_as_more(ratio_pkg_with_extra):
    big = dataclasses.replace(ratio_pkg_with_extra, values=[v.repeat(40) for v in ratio_pkg_with_extra.values],
                              indices=[i.repeat(40) for i in ratio_pkg_with_extra.indices])
    assert ratio_pkg_with_extra.size_change().endswith("x fewer")
    assert big.ratio() > 1 and big.size_change() == f"{big.ratio():.1f}x more"
    assert "x more" in big.summary()


def test_non_finite_base_weight_named(trained_adapter, minilm_base, tmp_path):
    base = write_base_copy(minilm_base, str(tmp_path / "nan_base.safetensors"),
                           modify={BROKEN_KEY: lambda W: W.index_fill_(0, torch.tensor([3]), float("nan"))})
    with pytest.raises(ValueError, match=f"base weight {BROKEN_KEY} contains NaN or Inf"):
        solar.compress(trained_adapter, base, ratio=0.1)


def test_non_finite_extra_tensor_named(trained_adapter, minilm_base):
    """A head with Inf compressed, saved and decoded without complaint; the factors were checked."""
    t = dict(trained_adapter.tensors)
    k = next(k for k in trained_adapter.extra_tensors() if k.endswith("bias"))
    t[k] = t[k].clone().index_fill_(0, torch.tensor([0]), float("inf"))
    with pytest.raises(io.FormatError, match=f"{k} holds NaN or Inf"):
        solar.compress(io.PeftAdapter(trained_adapter.config, t), minilm_base, ratio=0.1)


@pytest.mark.parametrize("method", ["solar", "lowrank"])
def test_reported_error_is_that_of_the_decoded_adapter_in_its_dtype(trained_adapter, minilm_base, method):
    """A bfloat16 adapter at budget 'full' reported ~1e-8 (the error before the cast to bfloat16),
    while its decoded adapter is off by bfloat16's rounding, ~1e-3: the report is now the real one."""
    t = {k: v.to(torch.bfloat16) if "lora_" in k else v for k, v in trained_adapter.tensors.items()}
    bf16 = io.PeftAdapter(trained_adapter.config, t)
    pkg = solar.compress(bf16, minilm_base, budget="full", method=method)
    measured = solar.relative_errors(bf16, solar.decompress(pkg, minilm_base))
    assert max(measured) > 1e-4  # bfloat16 rounding, not float32's
    for layer, err in zip(pkg.layers, measured):
        assert layer.rel_error == pytest.approx(err, rel=1e-6, abs=1e-9), layer.module


def test_storage_defaults_to_bfloat16_for_a_bfloat16_adapter(trained_adapter, minilm_base, tmp_path):
    """float32 storage doubled a bfloat16 adapter's package for the same decoded adapter: bfloat16 adapters
    now store bfloat16 unless told otherwise; float16 (narrow range) and float32 adapters keep float32."""
    def cast(dtype):
        return io.PeftAdapter(trained_adapter.config, {k: v.to(dtype) if "lora_" in k else v
                                                       for k, v in trained_adapter.tensors.items()})
    bf16 = cast(torch.bfloat16)
    pkg = solar.compress(bf16, minilm_base, budget="full", method="lowrank")
    wide = solar.compress(bf16, minilm_base, budget="full", method="lowrank", storage="float32")
    assert (pkg.storage(), wide.storage()) == ("bfloat16", "float32")
    pkg.save(str(tmp_path / "a.safetensors"))
    wide.save(str(tmp_path / "b.safetensors"))
    assert os.path.getsize(tmp_path / "a.safetensors") < 0.6 * os.path.getsize(tmp_path / "b.safetensors")
    got, ref = solar.decompress(pkg, minilm_base), solar.decompress(wide, minilm_base)
    assert max(solar.relative_errors(ref, got)) < 1e-2   # within bfloat16's rounding of the same factors
    for dtype in (torch.float16, torch.float32):
        assert solar.compress(cast(dtype), minilm_base, ratio=0.1, method="lowrank").storage() == "float32"


def test_mixed_dtype_adapter_decodes_in_its_widest_dtype(trained_adapter, minilm_base):
    """The package took its first layer's dtype for every layer: a bfloat16 first layer rounded the float32
    ones to bfloat16 (2e-3 off where 1e-7 is right). The widest dtype is kept; the bfloat16 layer's upcast
    is exact."""
    first = next(u.module for u in trained_adapter.updates())
    t = {k: v.to(torch.bfloat16) if "lora_" in k and f"{first}." in k else v
         for k, v in trained_adapter.tensors.items()}
    mixed = io.PeftAdapter(trained_adapter.config, t)
    pkg = solar.compress(mixed, minilm_base, budget="full", method="lowrank")
    assert pkg.dtype == "float32"
    out = solar.decompress(pkg, minilm_base)
    assert {v.dtype for k, v in out.tensors.items() if "lora_" in k} == {torch.float32}
    assert max(solar.relative_errors(mixed, out)) < 1e-5


def test_integer_lora_factors_refused(trained_adapter, minilm_base):
    t = dict(trained_adapter.tensors)
    k = next(k for k in t if k.endswith("lora_A.weight"))
    t[k] = t[k].to(torch.int32)
    with pytest.raises(io.FormatError, match="lora_A / lora_B must be floating point, got torch.int32"):
        solar.compress(io.PeftAdapter(trained_adapter.config, t), minilm_base, ratio=0.1)
