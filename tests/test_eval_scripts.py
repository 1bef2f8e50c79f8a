"""The SST-2 evaluation scripts in bench/: a bad --sst2 fails up front with one line (no traceback,
no cache lookup), the EigenLoRAx source cache is keyed by the data, and the commands the docs quote
parse with the scripts' own options and write the report that quotes them. No training runs here."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import evalcommon  # noqa: E402

SCRIPTS = ("eval_eigenlorax.py", "eval_solar.py", "eval_srlora.py")


def _sst2(folder, header="sentence\tlabel", files=("train.tsv", "dev.tsv"), rows=("a fine film\t1",)):
    os.makedirs(folder, exist_ok=True)
    for name in files:
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write("\n".join([header, *rows]) + "\n")
    return str(folder)


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_sst2_is_one_line_error(script, tmp_path):
    missing = str(tmp_path / "no-such-sst2")
    cache = tmp_path / "cache"
    extra = ["--cache", str(cache)] if script == "eval_eigenlorax.py" else []
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), "--sst2", missing, *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and missing in last, last
    assert not cache.exists()  # failed before any cache lookup
    assert p.stdout == ""


def test_sst2_problem(tmp_path):
    assert evalcommon.sst2_problem(_sst2(tmp_path / "ok")) is None
    assert "does not exist" in evalcommon.sst2_problem(str(tmp_path / "none"))
    (tmp_path / "file").write_text("x")
    assert "not a folder" in evalcommon.sst2_problem(str(tmp_path / "file"))
    assert "has no dev.tsv" in evalcommon.sst2_problem(_sst2(tmp_path / "half", files=("train.tsv",)))
    assert "header" in evalcommon.sst2_problem(_sst2(tmp_path / "hdr", header="text\tlabel"))


def test_require_sst2(tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="x")
    good = _sst2(tmp_path / "ok")
    assert evalcommon.require_sst2(ap, os.path.relpath(good)) == os.path.abspath(good)
    for bad, words in ((None, "SST-2 not found"), (str(tmp_path / "none"), str(tmp_path / "none"))):
        with pytest.raises(SystemExit) as e:
            evalcommon.require_sst2(ap, bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("x: error: ") and words in err[-1]


def test_eigenlorax_cache_key_follows_the_data(tmp_path):
    import eval_eigenlorax

    a, b = _sst2(tmp_path / "a"), _sst2(tmp_path / "b")
    args = types.SimpleNamespace(source_steps=150, limit=2000, sst2_limit=20000, lr_lora=3e-3, batch_size=32,
                                 cache=str(tmp_path / "cache"), sst2=a)
    key_a, folder_a = eval_eigenlorax.source_key("sst2", args)
    assert key_a["data"]["path"] == os.path.realpath(a)
    assert eval_eigenlorax.source_key("sst2", args)[1] == folder_a  # stable
    args.sst2 = b  # same content, another folder
    assert eval_eigenlorax.source_key("sst2", args)[1] != folder_a
    args.sst2 = a
    _sst2(a, rows=("a fine film\t1", "a dull film\t0"))  # same folder, other content
    assert eval_eigenlorax.source_key("sst2", args)[1] != folder_a
    # word tasks never read --sst2
    args.sst2 = None
    assert "data" not in eval_eigenlorax.source_key("vader-polarity", args)[0]


def _quoted_commands(path):
    """(script, argv) of every `... bench/eval_*.py ...` command quoted in backticks or a code block."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"\\\n\s*", " ", f.read())  # join shell line continuations
    out = []
    for m in re.finditer(r"(?:`|^)(?:\S*python\S* )?bench/(eval_\w+\.py)([^`\n]*)", text, re.M):
        out.append((m.group(1), shlex.split(m.group(2))))
    return out


def _doc_files():
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")] + \
        [os.path.join(BENCH, "README.md")]


def test_quoted_commands_parse_and_write_the_quoting_report():
    import eval_eigenlorax
    import eval_solar
    import eval_srlora

    parsers = {"eval_eigenlorax.py": eval_eigenlorax.build_parser, "eval_solar.py": eval_solar.build_parser,
               "eval_srlora.py": eval_srlora.build_parser}
    seen = 0
    for doc in _doc_files():
        for script, argv in _quoted_commands(doc):
            args = parsers[script]().parse_args(argv)  # exits on an unknown option
            seen += 1
            if os.path.basename(doc).startswith("results_"):
                # a per-script report quotes the command that wrote it
                assert os.path.abspath(os.path.join(ROOT, args.output)) == doc, (doc, argv)
            elif os.path.basename(doc) == "results.md":
                # a section of the summary quotes the run whose report and JSON it stands for
                report = os.path.join(ROOT, args.output)
                assert args.json and os.path.isfile(report), (doc, argv)
                quoted = [a for s, a in _quoted_commands(report) if s == script]
                assert any(parsers[script]().parse_args(a).json == args.json for a in quoted), (report, argv)
    assert seen >= 10


def test_make_results_rebuilds_the_eigenlorax_command():
    import eval_eigenlorax
    import eval_solar

    with open(os.path.join(ROOT, "docs", "data", "eigenlorax_sst2.json"), encoding="utf-8") as f:
        a = json.load(f)["args"]
    cmd = evalcommon.command_from_args("eval_eigenlorax.py", eval_eigenlorax.build_parser(),
                                       dict(eval_eigenlorax.cli_args(a), json="docs/data/eigenlorax_sst2.json"),
                                       last=("json",))
    argv = shlex.split(cmd)[2:]
    args = eval_eigenlorax.build_parser().parse_args(argv)
    assert args.output == "docs/results_eigenlorax_sst2.md" and args.held_out == "sst2"
    assert "--tasks" not in argv and args.steps == 200 and args.source_steps == 150

    # a machine-dependent parser default (--sst2 where ../shared/data/sst2 is missing) does not leak in
    ap = eval_solar.build_parser()
    ap.set_defaults(sst2=None)
    sa = {"sst2": os.path.relpath(evalcommon.DEFAULT_SST2, ROOT), "steps": 500, "threads": 1}
    assert "--sst2" not in evalcommon.command_from_args("eval_solar.py", ap, sa,
                                                        defaults={"sst2": evalcommon.DEFAULT_SST2})


def test_quoted_commands_with_json_match_the_recorded_run():
    """A quoted command that writes docs/data/X.json has the settings X.json records (so running it
    as written repeats that run)."""
    import eval_eigenlorax
    import eval_solar
    import eval_srlora

    parsers = {"eval_eigenlorax.py": eval_eigenlorax.build_parser, "eval_solar.py": eval_solar.build_parser,
               "eval_srlora.py": eval_srlora.build_parser}
    derived = {"tasks", "source_steps", "interval", "warmup", "sst2", "json", "command", "cache"}
    rel = lambda v: os.path.relpath(v, ROOT) if isinstance(v, str) and os.path.isabs(v) else v  # noqa: E731
    checked = 0
    for doc in _doc_files():
        for script, argv in _quoted_commands(doc):
            args = parsers[script]().parse_args(argv)
            if not args.json:
                continue
            with open(os.path.join(ROOT, args.json), encoding="utf-8") as f:
                rec = json.load(f)["args"]
            if script == "eval_eigenlorax.py":
                rec = eval_eigenlorax.cli_args(rec)
                assert args.tasks == rec["tasks"]
                assert (args.source_steps or args.steps) == (rec["source_steps"] or rec["steps"])
            diff = {k: (rel(v), rec[k]) for k, v in vars(args).items() if k in rec and k not in derived
                    and rel(v) != rec[k]}
            assert not diff, (doc, script, diff)
            checked += 1
    assert checked >= 6


def test_solar_alignment_matches_the_dense_computation():
    """bench/solar_alignment.py's factored shares equal the ones computed from the dense ΔW (float64)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "solar_alignment", os.path.join(os.path.dirname(__file__), "..", "bench", "solar_alignment.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(37, 29, generator=g, dtype=torch.float64)
    B, A = torch.randn(37, 3, generator=g, dtype=torch.float64), torch.randn(3, 29, generator=g, dtype=torch.float64)
    got = mod.layer_alignment(W0, B, A, 5)
    dW = B @ A
    U, _, Vh = torch.linalg.svd(W0)
    total = float((dW * dW).sum())
    s = torch.linalg.svdvals(dW)
    assert abs(got["left"] - float((U[:, :5].T @ dW).pow(2).sum()) / total) < 1e-12
    assert abs(got["both"] - float((U[:, :5].T @ dW @ Vh[:5].T).pow(2).sum()) / total) < 1e-12
    assert abs(got["top1"] - float(s[0] ** 2 / (s ** 2).sum())) < 1e-12
    assert got["random_left"] == 5 / 37 and abs(got["random_both"] - 25 / (37 * 29)) < 1e-15
    # the stored-numbers comparison, by brute force over C = Uᵀ ΔW V (complete bases): 0.3 of (37 + 29) 3
    # numbers = 59: the 29 largest |c| against the best leading block of at most 57 coefficients
    got = mod.layer_alignment(W0, B, A, 5, ratio=0.3)
    c2 = (U.T @ dW @ Vh.T).pow(2)
    assert abs(got["topc"] - float(c2.flatten().sort(descending=True).values[:29].sum()) / total) < 1e-12
    best = max(float(c2[:k1, :min(29, 57 // k1)].sum()) for k1 in range(1, 38) if 57 // k1 >= 1)
    assert abs(got["block"] - best / total) < 1e-12 and got["block"] < got["topc"]
    one, none = mod.block_or_top(U.T @ dW @ Vh.T, 2)   # 1 coefficient; no block fits
    assert abs(one - float(c2.max()) / total) < 1e-12 and none == 0.0


def test_solar_memory_script_runs_and_the_cache_does_not_change_the_package(tmp_path):
    """bench/solar_memory.py (the README's memory numbers) on a tiny model, in its own processes: the
    package digest is the same with the basis cache off, and the report has every field."""
    outs = []
    for cache in ("1024", "0"):
        p = subprocess.run([sys.executable, os.path.join(BENCH, "solar_memory.py"), "--layers", "3", "--shape", "24",
                            "17", "--rank", "2", "--ratio", "0.3", "--cache-mib", cache, "--work", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        outs.append(dict(kv.split("=", 1) for kv in p.stdout.split()))
    assert outs[0]["digest"] == outs[1]["digest"]
    assert float(outs[1]["cache_mib"]) == 0 and int(outs[0]["peak_rss_mib"]) > 0
    assert set(outs[0]) == {"layers", "shape", "method", "ratio", "cache_mib", "seconds", "peak_rss_mib",
                            "layer_u_v_c_mib", "digest"}


@pytest.mark.parametrize("extra, words", [
    (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    (["--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
    (["--pilot-seed", "1"], "--pilot-seed 1 is one of --seeds"),
    (["--lr-grid-lora", "1e-3", "1e-3"], "--lr-grid-lora needs distinct positive lrs"),
    (["--lr-grid-eigen", "0.01", "-0.1"], "--lr-grid-eigen needs distinct positive lrs"),
])
def test_select_lr_bad_settings_fail_before_any_training(extra, words, tmp_path, capsys):
    import eval_eigenlorax

    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        eval_eigenlorax.main(["--select-lr", "--seeds", "0", "1", "--cache", str(cache), *extra])
    assert e.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]
    assert not cache.exists()


def test_validation_split_is_disjoint_and_seeded():
    import eval_eigenlorax
    from subspace_ext import data

    task = data.Task("t", [(f"w{i}", i % 2) for i in range(101)], [("dev", 0)], ("a", "b"))
    pilot = eval_eigenlorax.validation_split(task, 0.1, seed=100)
    assert len(pilot.dev) == 10 and len(pilot.train) == 91
    assert sorted(pilot.train + pilot.dev) == sorted(task.train)  # a partition of train; dev never enters
    assert ("dev", 0) not in pilot.train + pilot.dev
    assert eval_eigenlorax.validation_split(task, 0.1, seed=100) == pilot
    assert eval_eigenlorax.validation_split(task, 0.1, seed=101).dev != pilot.dev
    assert len(eval_eigenlorax.validation_split(task, 1e-6, seed=0).dev) == 1
    with pytest.raises(ValueError, match="leaves no training examples"):
        eval_eigenlorax.validation_split(data.Task("t", [("x", 0)], [], ("a", "b")), 0.5, seed=0)


def test_select_lrs_takes_the_best_validation_accuracy(monkeypatch):
    """Each method gets the lr its pilot run scores best on the validation split (ties: the first in
    the grid); every pilot run uses the pilot seed and the split, never the dev set."""
    import eval_eigenlorax
    from subspace_ext import data

    task = data.Task("t", [(f"w{i}", i % 2) for i in range(50)], [("dev", 0)], ("a", "b"))
    scores = {"lora": {1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.7},
              "eigen-lora": {1e-2: 0.5, 3e-2: 0.8}, "eigen-uniform": {1e-2: 0.9, 3e-2: 0.8}}
    seen = []

    def fake(method):
        def run(pilot, *rest):
            seed, lr = (rest[0], rest[1]) if method == "lora" else (rest[1], rest[3])
            assert seed == 100 and ("dev", 0) not in pilot.train + pilot.dev and len(pilot.dev) == 5
            seen.append((method, lr))
            return {"acc": scores[method][lr]}
        return run

    monkeypatch.setattr(eval_eigenlorax, "run_lora", fake("lora"))
    monkeypatch.setattr(eval_eigenlorax, "run_eigen",
                        lambda pilot, sub, seed, init, lr, args: fake(f"eigen-{init}")(pilot, sub, seed, init, lr))
    args = eval_eigenlorax.build_parser().parse_args(
        ["--select-lr", "--lr-grid-lora", "1e-3", "3e-3", "1e-2", "--lr-grid-eigen", "1e-2", "3e-2"])
    chosen = eval_eigenlorax.select_lrs(task, None, args)
    assert {m: chosen[m]["lr"] for m in scores} == {"lora": 3e-3, "eigen-lora": 3e-2, "eigen-uniform": 1e-2}
    assert chosen["lora"]["grid"] == scores["lora"]
    assert chosen["split"] == {"train": 45, "validation": 5, "seed": 100}
    assert len(seen) == 7
    assert "chose 0.003" in eval_eigenlorax.selection_line(chosen)


def test_tf32_rounding_and_quick_report(capsys):
    """bench/tf32_error.py: tf32() rounds float32 to 10 explicit mantissa bits (to nearest, ties to
    even; or truncated), symmetric in the sign; its TF32 variants change only the GEMM precision (a
    matrix of TF32-exact entries gives the float32 result) and the quick report has every row."""
    import tf32_error

    u = 2.0 ** -10  # TF32's unit in the last place at 1
    x = torch.tensor([1 + u / 2, 1 + 3 * u / 2, 1 + u / 2 + 2.0 ** -20, 1 + 5 * u / 2, 3.0, 2.0 ** -100, 0.0])
    want_rn = torch.tensor([1.0, 1 + 2 * u, 1 + u, 1 + 2 * u, 3.0, 2.0 ** -100, 0.0])
    want_tr = torch.tensor([1.0, 1 + u, 1.0, 1 + 2 * u, 3.0, 2.0 ** -100, 0.0])
    assert torch.equal(tf32_error.tf32(x), want_rn) and torch.equal(tf32_error.tf32(-x), -want_rn)
    assert torch.equal(tf32_error.tf32(x, truncate=True), want_tr)
    g = torch.Generator().manual_seed(0)
    A = tf32_error.tf32(torch.randn(30, 20, generator=g))
    assert torch.equal(tf32_error.tf32(A), A)
    with pytest.raises(ValueError, match="variant must be one of"):
        tf32_error.rsvd(A, 3, "bf16")
    assert tf32_error.main(["--quick", "--ranks", "4"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| synthetic")]
    assert len(rows) == 1 and rows[0].count("ppm") == 0 and rows[0].count("(") == 3
