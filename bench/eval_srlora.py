#!/usr/bin/env python
"""SRLoRA vs plain LoRA on SST-2 with the bundled MiniLM (CPU-friendly).

For every seed, trains (same seed, data order, steps, learning rate, rank, targets)

  * plain LoRA   r=8, alpha=16, query/value, AdamW (no weight decay), lr --lr (default 1e-3)
  * SRLoRA       the same LoRA with SRLoRA(model, optimizer, SRLoRAConfig(interval, warmup,
                 fuse_fraction, total_steps=steps)) stepped after every optimizer step
                 (PiSSA init, the paper's setting); interval and warmup default to steps // 10

via ``train.train(..., after_step=..., eval_every=...)``, records dev accuracy vs step on a fixed
400-sentence subset of the SST-2 dev set (the same subset for every run), the accuracy on the full
dev set at the end, and the time per training step (evaluation excluded). Writes a markdown report:
final dev accuracy (mean ± std over seeds), the first step at which SRLoRA's curve reaches LoRA's
final accuracy, SRLoRA's overhead per step, and the curves.

    .venv/bin/python bench/eval_srlora.py --seeds 0 1 2 --steps 250 --train-limit 8000 \
        --eval-every 50 --max-length 48
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import evalcommon  # noqa: E402
from subspace_ext import data, plots, train  # noqa: E402
from subspace_ext.srlora import SRLoRA, SRLoRAConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sst2", default=data.default_sst2_path(), help="folder with SST-2 train.tsv and dev.tsv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--train-limit", type=int, default=8000, help="SST-2 training sentences (seeded subset)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--dev-subset", type=int, default=400, help="dev sentences for the curve (fixed subset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--interval", type=int, default=None, help="SRLoRA interval (default steps // 10)")
    p.add_argument("--warmup", type=int, default=None, help="SRLoRA warm-up (default steps // 10)")
    p.add_argument("--fuse-fraction", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "results_srlora.md"))
    p.add_argument("--json", default=None, help="also write the raw per-run results to this JSON file")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.sst2 = evalcommon.require_sst2(p, args.sst2)
    if args.steps < 1 or args.eval_every < 1:
        p.error("--steps and --eval-every must be >= 1")
    args.interval = args.interval or max(1, args.steps // 10)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    return args


def run(method, task, dev_curve, args, seed):
    model, tok = train.load_classifier(seed=seed)
    model = train.lora_model(model, r=args.rank, alpha=args.alpha, targets=("query", "value"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sr, init_s, sr_s = None, 0.0, [0.0]
    if method == "srlora":
        cfg = SRLoRAConfig(interval=args.interval, warmup=args.warmup, fuse_fraction=args.fuse_fraction,
                           total_steps=args.steps)
        t = time.perf_counter()
        sr = SRLoRA(model, opt, cfg)
        init_s = time.perf_counter() - t
    stamps = []

    def after(step):
        stamps.append(time.perf_counter())
        if sr is not None:
            t = time.perf_counter()
            sr.step()
            sr_s[0] += time.perf_counter() - t

    log = train.train(model, tok, task, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                      max_length=args.max_length, eval_every=args.eval_every, eval_examples=dev_curve,
                      optimizer=opt, after_step=after)
    # stamps[i - 1] is taken in after_step(i); the gap to stamps[i] holds the rest of step i's
    # after_step, the evaluation after step i (if any) and the whole of step i + 1
    gaps = [stamps[i] - stamps[i - 1] for i in range(1, len(stamps)) if i % args.eval_every != 0]
    full = train.accuracy(model, tok, task.dev, max_length=args.max_length)
    return {
        "curve": dict(zip(log.dev_steps, log.dev_acc)),
        "full": full,
        "step_s": statistics.mean(gaps) if gaps else float("nan"),
        "step_med_s": statistics.median(gaps) if gaps else float("nan"),
        "srlora_step_s": sr_s[0] / args.steps,
        "init_s": init_s,
        "events": len(sr.log) if sr else 0,
        "pairs": sum(e.pairs for e in sr.log) if sr else 0,
        "loss_last": statistics.mean(log.loss[-20:]),
        "seconds": log.seconds,
    }


def ms(xs):
    xs = list(xs)
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m, s


def pct(x):
    return f"{100 * x:.2f}"


def first_reach(curve, target):
    for step in sorted(curve):
        if curve[step] >= target - 1e-12:
            return step
    return None


def report(args, res, wall):
    seeds = args.seeds
    L, S = res["lora"], res["srlora"]
    steps_list = sorted(L[seeds[0]]["curve"])
    lf, sf = ms(L[s]["full"] for s in seeds), ms(S[s]["full"] for s in seeds)
    lc, sc = ms(L[s]["curve"][steps_list[-1]] for s in seeds), ms(S[s]["curve"][steps_list[-1]] for s in seeds)
    # steps for SRLoRA to reach LoRA's final accuracy (dev subset curve), per seed and on the mean curves
    per_seed = [first_reach(S[s]["curve"], L[s]["curve"][steps_list[-1]]) for s in seeds]
    per_seed_l = [first_reach(L[s]["curve"], L[s]["curve"][steps_list[-1]]) for s in seeds]
    mean_l = {k: statistics.mean(L[s]["curve"][k] for s in seeds) for k in steps_list}
    mean_s = {k: statistics.mean(S[s]["curve"][k] for s in seeds) for k in steps_list}
    reach_mean = first_reach(mean_s, mean_l[steps_list[-1]])
    reach_mean_l = first_reach(mean_l, mean_l[steps_list[-1]])
    lt, st = ms(L[s]["step_s"] for s in seeds), ms(S[s]["step_s"] for s in seeds)
    over = [S[s]["step_s"] / L[s]["step_s"] - 1 for s in seeds]
    direct = [S[s]["srlora_step_s"] / L[s]["step_s"] for s in seeds]
    fmt_reach = lambda x: "not reached" if x is None else str(x)  # noqa: E731

    out = []
    w = out.append
    w("# SRLoRA vs LoRA on SST-2 (MiniLM-L6, CPU)\n")
    w(f"Generated by `bench/eval_srlora.py` on {_dt.date.today().isoformat()} "
      f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
      f"{wall / 60:.1f} min wall).\n")
    w("Command:\n")
    w("```\n" + args.command + "\n```\n")
    w(f"Setup: bundled all-MiniLM-L6-v2 with a fresh classification head; LoRA r={args.rank}, alpha={args.alpha} on "
      f"query/value (+ trained head); AdamW lr {args.lr:g}, no weight decay, batch {args.batch_size}, "
      f"max_length {args.max_length}, {args.steps} steps on a seeded {len(res['task'].train)}-sentence subset of "
      f"SST-2 train. SRLoRA: PiSSA init, interval {args.interval}, warm-up {args.warmup}, fuse_fraction "
      f"{args.fuse_fraction}, stop 0.9 (defaults otherwise). Same seed, data order and learning rate for both. "
      f"Curve: accuracy on a fixed {len(res['dev_curve'])}-sentence subset of SST-2 dev every {args.eval_every} "
      f"steps; final: full dev set ({len(res['task'].dev)} sentences). Seeds: {' '.join(map(str, seeds))}.\n")
    w("## Summary\n")
    w("| | LoRA | SRLoRA |")
    w("|---|---|---|")
    w(f"| final dev acc, full dev (%) | {pct(lf[0])} ± {pct(lf[1])} | {pct(sf[0])} ± {pct(sf[1])} |")
    w(f"| final dev acc, {len(res['dev_curve'])}-subset (%) | {pct(lc[0])} ± {pct(lc[1])} | {pct(sc[0])} ± {pct(sc[1])} |")
    w(f"| first step reaching LoRA's final subset acc (mean curves) | {fmt_reach(reach_mean_l)} | "
      f"{fmt_reach(reach_mean)} |")
    w(f"| same, per seed (target: that seed's LoRA final) | {', '.join(fmt_reach(x) for x in per_seed_l)} | "
      f"{', '.join(fmt_reach(x) for x in per_seed)} |")
    w(f"| time per training step (ms, eval excluded) | {1e3 * lt[0]:.1f} ± {1e3 * lt[1]:.1f} | "
      f"{1e3 * st[0]:.1f} ± {1e3 * st[1]:.1f} |")
    w(f"| SRLoRA overhead per step, wall-clock difference (%) | | {ms(over)[0] * 100:+.1f} ± {ms(over)[1] * 100:.1f} |")
    w(f"| SRLoRA overhead per step, time inside SRLoRA.step() (%) | | {ms(direct)[0] * 100:.2f} ± {ms(direct)[1] * 100:.2f} |")
    w(f"| SRLoRA one-off init (rsvd of 12 weights + PiSSA, ms) | | {1e3 * ms(S[s]['init_s'] for s in seeds)[0]:.1f} |")
    w(f"| recompositions per run / pairs re-initialised per run | | {S[seeds[0]]['events']} / {S[seeds[0]]['pairs']} |")
    w(f"| mean training loss, last 20 steps | {ms(L[s]['loss_last'] for s in seeds)[0]:.4f} | "
      f"{ms(S[s]['loss_last'] for s in seeds)[0]:.4f} |")
    w("")
    w(f"\"First step reaching\" is read off the {args.eval_every}-step curve below (LoRA's own column shows when "
      "LoRA itself first got there; the curves are noisy, so read it with the ± columns).\n")
    w("The wall-clock difference compares two runs on a shared machine and is noisy; the time inside "
      "`SRLoRA.step()` (importance update every step + recompositions) is the direct cost.\n")
    w("## Per seed\n")
    w("| seed | LoRA full dev (%) | SRLoRA full dev (%) | LoRA ms/step | SRLoRA ms/step | SRLoRA.step() ms/step |")
    w("|---|---|---|---|---|---|")
    for s in seeds:
        w(f"| {s} | {pct(L[s]['full'])} | {pct(S[s]['full'])} | {1e3 * L[s]['step_s']:.1f} | "
          f"{1e3 * S[s]['step_s']:.1f} | {1e3 * S[s]['srlora_step_s']:.2f} |")
    w("")
    w(f"## Dev accuracy vs step ({len(res['dev_curve'])}-sentence dev subset, mean ± std over seeds, %)\n")
    w("| step | LoRA | SRLoRA |")
    w("|---|---|---|")
    for k in steps_list:
        a, b = ms(L[s]["curve"][k] for s in seeds), ms(S[s]["curve"][k] for s in seeds)
        w(f"| {k} | {pct(a[0])} ± {pct(a[1])} | {pct(b[0])} ± {pct(b[1])} |")
    w("")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    args.command = evalcommon.command_line(__file__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = data.sst2(args.sst2, train_limit=args.train_limit, seed=0)
    dev_curve = random.Random(1234).sample(task.dev, min(args.dev_subset, len(task.dev)))
    res = {"lora": {}, "srlora": {}, "task": task, "dev_curve": dev_curve}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for method in ("lora", "srlora"):
            r = run(method, task, dev_curve, args, seed)
            res[method][seed] = r
            print(f"seed {seed} {method:6s}: full dev {100 * r['full']:.2f}%  curve "
                  + " ".join(f"{k}:{100 * v:.1f}" for k, v in sorted(r["curve"].items()))
                  + f"  {1e3 * r['step_s']:.0f} ms/step (srlora.step {1e3 * r['srlora_step_s']:.2f} ms)"
                  + f"  [{(time.perf_counter() - t0) / 60:.1f} min]", flush=True)
    text = report(args, res, time.perf_counter() - t0)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    if args.json:
        import json

        raw = {m: {str(k): v for k, v in res[m].items()} for m in ("lora", "srlora")}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": plots.portable_args(vars(args), ROOT), "results": raw}, f, indent=1)
    print(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
