"""SOLAR on real adapters: accuracy and error vs. compression ratio, against truncated SVD of each ΔW
at the same number of stored numbers. Writes a markdown table (default docs/results_solar.md).

    .venv/bin/python bench/eval_solar.py --sst2 ../shared/data/sst2 --seeds 0 1 2

For each seed: train MiniLM + LoRA (r=8, query/value) on an SST-2 subset, then compress with SOLAR
(the paper's method, and ``--method auto``: per layer SOLAR coefficients or ΔW's leading singular
pairs) and with the truncated-SVD baseline at each ratio, decode, and measure SST-2 dev accuracy;
also the time of compress + decompress. ``--storage float16 int8`` also makes the ``auto`` packages
with those stored dtypes and reports their accuracy and file bytes against the adapter's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import evalcommon  # noqa: E402
from subspace_ext import data, models, plots, solar, train  # noqa: E402


def evaluate(task, adapter_dir, tok, folder) -> float:
    model, _ = train.load_adapter_model(folder)
    return train.accuracy(model, tok, task.dev)


def run_seed(task, seed: int, ratios, steps: int, work: str, storages=(), log=print):
    adapter = os.path.join(work, f"lora_seed{seed}")
    t0 = time.perf_counter()
    model, tok, _ = train.train_lora_adapter(task, adapter, steps=steps, lr=1e-3, seed=seed)
    log(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s")
    base = models.minilm_dir()
    rows = {"lora": train.accuracy(model, tok, task.dev),
            "adapter_bytes": os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))}
    for ratio in ratios:
        t0 = time.perf_counter()
        pkg = solar.compress(adapter, base, budget="full" if ratio == "full" else None,
                             ratio=None if ratio == "full" else ratio, seed=seed)
        out = os.path.join(work, f"solar_{seed}_{ratio}")
        solar.decompress(pkg, base).save_adapter(out)
        seconds = time.perf_counter() - t0
        err = statistics.mean(l.rel_error for l in pkg.layers)
        acc = evaluate(task, adapter, tok, out)
        entry = {"solar_acc": acc, "solar_err": err, "seconds": seconds, "ratio": pkg.ratio()}
        if ratio != "full":
            for st in ("float32", *storages):
                key = "auto" if st == "float32" else f"auto_{st}"
                auto = solar.compress(adapter, base, ratio=ratio, seed=seed, method="auto", storage=st)
                aout = os.path.join(work, f"{key}_{seed}_{ratio}")
                nbytes = auto.save(aout + ".safetensors")
                solar.decompress(aout + ".safetensors", base).save_adapter(aout)
                entry.update({f"{key}_acc": evaluate(task, adapter, tok, aout), f"{key}_ratio": auto.ratio(),
                              f"{key}_err": statistics.mean(l.rel_error for l in auto.layers),
                              f"{key}_bytes": nbytes, f"{key}_encodings": auto.encodings()})
            bl, _ = solar.truncated_svd_baseline(adapter, ratio=ratio)
            bout = os.path.join(work, f"svd_{seed}_{ratio}")
            bl.save_adapter(bout)
            entry["svd_acc"] = evaluate(task, adapter, tok, bout)
            entry["svd_err"] = statistics.mean(solar.relative_errors(adapter, bl))
        rows[ratio] = entry
        log(f"  ratio {ratio}: solar acc {acc:.4f} err {err:.3f}" +
            (f" | auto acc {entry['auto_acc']:.4f} err {entry['auto_err']:.3f} ({entry['auto_encodings']})"
             f" | svd acc {entry['svd_acc']:.4f} err {entry['svd_err']:.3f}" if "svd_acc" in entry else "") +
            "".join(f" | auto {st} acc {entry[f'auto_{st}_acc']:.4f} ({entry[f'auto_{st}_bytes']} bytes)"
                    for st in storages if f"auto_{st}_acc" in entry) +
            f" | {seconds:.2f} s")
    return rows


def fmt(values):
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def bytes_table(results, ratios, storages):
    """Markdown lines: the auto packages' file bytes (and the adapter's / theirs) and accuracy per storage."""
    if "adapter_bytes" not in results[0]:
        return []
    adapter = results[0]["adapter_bytes"]
    out = ["", f"`--method auto` packages by stored dtype: file bytes (the first seed's package; the adapter file "
           f"is {adapter:,} bytes), adapter bytes / package bytes, dev accuracy over the seeds:", "",
           "| ratio | storage | package bytes | bytes fewer | auto acc | auto rel. error |", "| --- | --- | --- | --- | --- | --- |"]
    for ratio in ratios:
        if ratio == "full":
            continue
        es = [r[ratio] for r in results]
        for st in ("float32", *storages):
            key = "auto" if st == "float32" else f"auto_{st}"
            if f"{key}_bytes" not in es[0]:
                continue
            nbytes = es[0][f"{key}_bytes"]
            out.append(f"| {ratio} | {st} | {nbytes:,} | {adapter / nbytes:.1f}× | {fmt(e[f'{key}_acc'] for e in es)} | "
                       f"{fmt(e[f'{key}_err'] for e in es)} |")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sst2", default=data.default_sst2_path(),
                    help="folder with train.tsv / dev.tsv (default ../shared/data/sst2 when it exists)")
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", nargs="+", default=["0.02", "0.05", "0.1", "0.2", "0.5", "full"])
    ap.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results_solar.md"))
    ap.add_argument("--json", default=None, help="also write the raw per-seed results to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--storage", nargs="*", default=[], choices=[s for s in solar.STORAGE if s != "float32"],
                    help="also make the auto packages with these stored dtypes (accuracy and bytes)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.sst2 = evalcommon.require_sst2(ap, args.sst2)
    command = evalcommon.command_line(__file__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [r if r == "full" else float(r) for r in args.ratios]
    task = data.sst2(args.sst2, train_limit=args.train_limit, seed=0)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            results.append(run_seed(task, seed, ratios, args.steps, work, args.storage))
    lines = [
        "# SOLAR vs truncated SVD on SST-2 (MiniLM-L6 + LoRA r=8 on query/value)",
        "",
        f"Command: `{command}`; CPU, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Dev accuracy on the {len(task.dev)} SST-2 dev sentences, mean ± std over seeds {args.seeds}. "
        "Ratio = stored numbers / adapter numbers (LoRA factors + classifier head, which both keep); a SOLAR "
        "coefficient costs 2 numbers (value + index), a rank-1 SVD component m + n + 1 (a low-rank pair of an "
        "`auto` package m + n). `auto`: `--method auto` packages (each layer SOLAR coefficients or ΔW's leading "
        "singular pairs, whichever keeps more of ΔW for its numbers).",
        "",
        f"Uncompressed LoRA: {fmt(r['lora'] for r in results)}",
        "",
        "| ratio | SOLAR acc | SOLAR rel. error | auto acc | auto rel. error | truncated-SVD acc | "
        "truncated-SVD rel. error | SOLAR compress+decompress (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ratio in ratios:
        es = [r[ratio] for r in results]
        opt = lambda key: fmt(e[key] for e in es) if key in es[0] else "—"  # noqa: E731
        lines.append(f"| {ratio} | {fmt(e['solar_acc'] for e in es)} | {fmt(e['solar_err'] for e in es)} | "
                     f"{opt('auto_acc')} | {opt('auto_err')} | {opt('svd_acc')} | {opt('svd_err')} | "
                     f"{fmt(e['seconds'] for e in es)} |")
    lines += bytes_table(results, ratios, args.storage)
    text = "\n".join(lines) + "\n"
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": plots.portable_args(vars(args), ROOT), "command": command,
                       "ratios": [str(r) for r in ratios], "dev_size": len(task.dev),
                       "results": [{str(k): v for k, v in r.items()} for r in results]}, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
