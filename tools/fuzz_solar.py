"""Structured fuzzer for the two SOLAR decoders (subspace_ext.solar.decompress and tools/solar_decode.cpp).

    python tools/fuzz_solar.py --decoder build-asan/cmake/solar_decode --cases 1000 --seed 1 --work /tmp/fz

Makes a few packages of a tiny base (every method, storage and layout), then, per case, either edits one
(its solar metadata, its tensors or its file metadata, 1 to 3 edits, the digest recomputed: the digest
detects damage, not deliberate edits) or damages its raw header (byte flips, truncation, header length,
offsets), and gives it to both decoders. A finding: a Python exception that is not a ValueError, a C++
exit other than 0 (no output) or 1 (one line of UTF-8 on stderr) -- a sanitizer report is one --, the
decoders disagreeing (one refuses, one decodes), a refusal that left an adapter behind, or two decodes
whose folders differ. Each finding is printed and its package kept in the work folder. Build the
decoder with the sanitizers for the most from it (`make sanitize` builds build-asan/cmake/solar_decode).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from subspace_ext import io, solar

# (out, in) of the tiny base's adapted weights; the adapter's rank
SHAPES = {"enc.q": (48, 40), "enc.dense": (40, 64)}
RANK = 4
SEED_PACKAGES = [dict(ratio=0.5), dict(budget="full", method="lowrank"),
                 dict(ratio=0.3, method="auto", storage="int8"), dict(ratio=0.5, storage="float16", eps=0.01),
                 dict(ratio=0.3, method="auto", layout="layers"), dict(ratio=0.5, storage="int8", layout="layers"),
                 dict(ratio=0.5, kind="ADALORA", method="auto")]
# values an edit sets: types, signs, widths and names the decoders must take or refuse
POOL = [0, -1, 1, 2, 3, 47, 48, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63, 10**30,
        1e308, -1e-300, 0.5, 1.5, -0.0, True, False, None, "", "x", "solar", "lowrank", "float16", "int8",
        [], {}, [1, 2], [48, 40], [40, 48], [0, 5], [1, 1], [2**31, 2], float("inf"), float("nan"), "\u2603",
        "base_model.model.x", "enc.q.weight", {"r": 4}, [[1]], "1"]


def make_seed_packages(work: Path):
    """(base file, [package paths]): a tiny base and one package per entry of SEED_PACKAGES."""
    g = torch.Generator().manual_seed(1)
    weights = {f"{m}.weight": torch.randn(*s, generator=g) for m, s in SHAPES.items()}
    weights["emb.weight"] = torch.randn(30, 40, generator=g)
    base = work / "base.safetensors"
    save_file(weights, str(base))
    packages = []
    for i, case in enumerate(SEED_PACKAGES):
        case = dict(case)
        kind, layout = case.pop("kind", "LORA"), case.pop("layout", "packed")
        tensors = {}
        for m, (rows, cols) in SHAPES.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(RANK, cols, generator=g)
            tensors[f"base_model.model.{m}.lora_B.weight"] = 0.1 * torch.randn(rows, RANK, generator=g)
            if kind == "ADALORA":
                tensors[f"base_model.model.{m}.lora_E.weight"] = torch.randn(RANK, 1, generator=g)
        tensors["base_model.model.head.weight"] = torch.randn(3, 48, generator=g)
        config = {"peft_type": kind, "r": RANK, "lora_alpha": 8, "target_modules": ["q", "dense"],
                  "modules_to_save": ["head"], "task_type": "SEQ_CLS", "fan_in_fan_out": False,
                  "base_model_name_or_path": "tiny \u2603", "rank_pattern": {}, "alpha_pattern": {}}
        if kind == "ADALORA":
            config.update(init_r=6, target_r=RANK, tinit=0, tfinal=0, deltaT=1, total_step=100)
        path = work / f"seed{i}.safetensors"
        solar.compress(io.PeftAdapter(config, tensors), str(base), **case).save(str(path), layout=layout)
        packages.append(path)
    return base, packages


def read_package(path: Path):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, json.loads(meta["solar"]), tensors


def write_package(path: Path, meta, info, tensors) -> None:
    meta = dict(meta, solar=json.dumps(info))
    meta["digest"] = io.content_digest(tensors, meta["solar"])
    save_file(tensors, str(path), metadata=meta)


def _paths(obj, pre=()):
    yield pre
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in children:
        yield from _paths(v, pre + (k,))


def edit_metadata(rng: random.Random, info) -> str:
    """Set, delete or duplicate one value anywhere in the solar metadata, or add a key."""
    path = rng.choice([p for p in _paths(info) if p])
    parent, key = info, path[-1]
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.6:
        old, value = parent[key], copy.deepcopy(rng.choice(POOL))
        if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.5:
            value = rng.choice([old + 1, old - 1, -old, old * 2, old // 2 if isinstance(old, int) else old / 2])
        parent[key] = value
        return f"set {path} = {value!r:.40}"
    if op < 0.8:
        del parent[key]
        return f"del {path}"
    if isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
        return f"dup {path}"
    parent[f"zz{rng.randint(0, 9)}"] = rng.choice(POOL)
    return f"add a key to {path[:-1]}"


def edit_tensor(rng: random.Random, tensors) -> str:
    """Change one tensor's dtype, length, shape or one value; delete, empty, reverse or copy it elsewhere."""
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    op = rng.randrange(9)
    if op == 0:
        dtype = rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                            torch.int8, torch.uint8, torch.bool, torch.float32])
        tensors[name] = t.to(dtype)
        return f"{name} as {dtype}"
    if op == 1:
        tensors[name] = t.flatten()[:-1].clone()
        return f"{name} cut by one"
    if op == 2:
        tensors[name] = torch.cat([t.flatten(), t.flatten()[:1]])
        return f"{name} one longer"
    if op == 3 and t.numel():
        flat = t.clone().flatten()
        i = rng.randrange(flat.numel())
        if flat.is_floating_point():
            flat[i] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, 0.0, -1.0])
        elif flat.dtype == torch.bool:
            flat[i] = not bool(flat[i])
        else:
            lim = torch.iinfo(flat.dtype)
            flat[i] = rng.choice([lim.min, lim.max, -1, 0, 1, 48 * 40, 48 * 40 - 1, 40 * 64])
        tensors[name] = flat.reshape(t.shape)
        return f"{name}[{i}] set"
    if op == 4:
        del tensors[name]
        return f"del {name}"
    if op == 5:
        tensors[name] = t.reshape(1, -1) if t.dim() == 1 else t.flatten()
        return f"{name} reshaped"
    if op == 6:
        other = rng.choice(["layer.0.values", "layer.9.indices", "extra.foo", "packed.scales", "layer.1.lora_A",
                            "extra.base_model.model.head.weight", "extra."])
        tensors[other] = t.clone()
        return f"{name} copied to {other}"
    if op == 7:
        tensors[name] = t.flatten()[:0].clone()
        return f"{name} emptied"
    tensors[name] = t.flip(0).contiguous() if t.dim() else t
    return f"{name} reversed"


def edit_file_metadata(rng: random.Random, meta) -> str:
    key = rng.choice(["format", "format_version", "digest", "extra"])
    meta[key] = rng.choice(["", "0", "1", "2", "3", "4", "5", "-1", "solar", "x" * 100])
    return f"file metadata {key} = {meta[key]!r:.20}"


def damage_header(rng: random.Random, raw: bytearray) -> (bytearray, str):
    n = struct.unpack("<Q", raw[:8])[0]
    op = rng.randrange(4)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(8, 8 + n)] = rng.randrange(256)
        return raw, "header bytes flipped"
    if op == 1:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncated at {cut}"
    if op == 2:
        value = rng.choice([0, 1, n - 1, n + 1, 2**40, 2**63, len(raw)])
        raw[:8] = struct.pack("<Q", value)
        return raw, f"header length {value}"
    header = raw[8:8 + n].decode("utf-8", "replace")
    m = rng.choice(list(re.finditer(r"\d+", header)))
    value = str(rng.choice([0, 1, int(m.group()) + 1, int(m.group()) - 1, 2**64, 2**63, 99999999999]))
    header = (header[:m.start()] + value + header[m.end():]).encode()
    return bytearray(struct.pack("<Q", len(header)) + header + raw[8 + n:]), f"header number {m.group()} -> {value}"


def run_python(package: Path, base: Path, out: Path):
    try:
        solar.decompress(str(package), str(base)).save_adapter(str(out))
        return "decoded", None
    except ValueError as e:
        return "refused", str(e).splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001 (any other exception is a finding)
        return "crashed", f"{type(e).__name__}: {e}"


def run_cpp(decoder: str, package: Path, base: Path, out: Path):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    r = subprocess.run([decoder, str(package), str(base), str(out)], capture_output=True, timeout=300, env=env)
    try:
        err = r.stderr.decode("utf-8")
    except UnicodeDecodeError:
        return "crashed", "stderr is not UTF-8: " + r.stderr.decode("utf-8", "backslashreplace")[-500:]
    lines = err.strip().splitlines()
    if r.returncode == 0 and not lines:
        return "decoded", None
    if r.returncode == 1 and len(lines) == 1:
        return "refused", lines[0][:200]
    return "crashed", f"exit {r.returncode}: {err[-3000:]}"


def same_folders(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / io.ADAPTER_WEIGHTS)), load_file(str(b / io.ADAPTER_WEIGHTS))
    return (sorted(ta) == sorted(tb) and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
            and (a / io.ADAPTER_CONFIG).read_bytes() == (b / io.ADAPTER_CONFIG).read_bytes())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decoder", required=True, help="the edge decoder binary (best: the sanitized build)")
    p.add_argument("--cases", type=int, default=500, help="how many packages to try (default 500)")
    p.add_argument("--seed", type=int, default=0, help="the fuzzer's random seed (default 0)")
    p.add_argument("--work", default="fuzz_solar_work", help="work folder (emptied first; keeps the findings)")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    base, seeds = make_seed_packages(work)
    counts, findings, t0 = {}, 0, time.time()
    for case in range(args.cases):
        source = rng.choice(seeds)
        package, what = work / f"case{case}.safetensors", [source.stem]
        if rng.random() < 0.15:
            raw, how = damage_header(rng, bytearray(source.read_bytes()))
            package.write_bytes(bytes(raw))
            what.append(how)
        else:
            meta, info, tensors = read_package(source)
            for _ in range(rng.randint(1, 3)):
                r = rng.random()
                try:
                    what.append(edit_metadata(rng, info) if r < 0.55 else edit_tensor(rng, tensors) if r < 0.9
                                else edit_file_metadata(rng, meta))
                except (RuntimeError, OverflowError):  # a value the dtype cannot hold: no edit
                    pass
            write_package(package, meta, info, tensors)
        py_out, cpp_out = work / f"py{case}", work / f"cpp{case}"
        py, cpp = run_python(package, base, py_out), run_cpp(args.decoder, package, base, cpp_out)
        key = (py[0], cpp[0])
        counts[key] = counts.get(key, 0) + 1
        bad = "crashed" in key or key[0] != key[1]
        bad |= key == ("decoded", "decoded") and not same_folders(py_out, cpp_out)
        bad |= key[1] == "refused" and (cpp_out / io.ADAPTER_WEIGHTS).exists()
        if bad:
            findings += 1
            print(f"finding: case {case} ({'; '.join(what)})\n  python: {py}\n  c++:    {cpp}", flush=True)
        else:
            package.unlink()
        shutil.rmtree(py_out, ignore_errors=True)
        shutil.rmtree(cpp_out, ignore_errors=True)
    summary = ", ".join(f"python {a} / c++ {b}: {n}" for (a, b), n in sorted(counts.items()))
    print(f"{args.cases} cases in {time.time() - t0:.0f} s, {findings} findings ({summary})")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
