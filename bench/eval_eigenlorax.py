"""EigenLoRAx leave-one-out evaluation on the bundled MiniLM-L6: recycle LoRA adapters of the other
tasks into a shared subspace, then learn the held-out task with loadings only, against LoRA from
scratch. Writes a markdown table (default docs/results_eigenlorax.md).

    .venv/bin/python bench/eval_eigenlorax.py --held-out vader-intensity --seeds 0 1 2 --steps 150
    .venv/bin/python bench/eval_eigenlorax.py --held-out sst2 --sst2 ../shared/data/sst2 --seeds 0 1 2 \
        --steps 200 --source-steps 150 --output docs/results_eigenlorax_sst2.md

1. Train LoRA r=8 (query/value, alpha 16, head trainable) on every task except the held-out one
   (seed 0; cached under --cache, keyed by task and settings, and for sst2 by the resolved --sst2
   folder and the SHA-256 of its files).
2. Build the EigenLoRAx subspace of those adapters (--components per layer and side, --augment).
3. On the held-out task, for every seed and with the same steps, batch and data order:
   (a) LoRA r=8 from scratch (lr --lr-lora, head at --lr-head),
   (b) EigenLoRAx loadings only, task rank 8, init "lora" (B loadings zero) and "uniform"
       (the authors' uniform(-0.5, 0.5) on both sides), loadings at --lr-eigen, head at --lr-head,
       scaling 1 (the authors' no-scaling forward),
   (c) the head alone (frozen base; shows how much of the task a linear probe already gets).
   Report dev accuracy (mean ± std over seeds), trainable parameters (adapter part and head
   separately), the ratio, accuracy as % of LoRA's, and the task-switch time (load_coefficients
   from a file, median of 50) next to a peft LoRA adapter swap.

With --select-lr, step 3 first chooses each method's lr (LoRA factors; loadings, per init) from a
grid (--lr-grid-lora, --lr-grid-eigen): one pilot seed (--pilot-seed, not a reported seed) trains on
the held-out task's training set less a validation split (--val-fraction), and the lr with the best
accuracy on that split wins (ties: the first in the grid). The dev set is never looked at to choose;
the reported runs then train on the whole training set with the chosen lrs.
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import platform
import random
import shutil
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
from subspace_ext import data, eigenlorax, models, plots, train  # noqa: E402

RANK = 8
ALPHA = 16
TARGETS = ("query", "value")
# Chosen by a one-seed pilot (seed 100, not one of the reported seeds) on vader-intensity, 150 steps,
# batch 32, 2000 examples: LoRA lr 1e-3 / 3e-3 / 1e-2 -> dev acc 0.760 / 0.773 / 0.498 (head at the
# same lr, 3e-3 for 1e-2); loadings lr 3e-3 / 1e-2 / 3e-2 -> 0.728 / 0.740 / 0.658 (init lora) and
# 0.733 / 0.725 / 0.698 (init uniform), head 3e-3.
DEFAULT_LR = {"lora": 3e-3, "eigen": 1e-2, "head": 3e-3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_task(name: str, args) -> data.Task:
    if name == "sst2":
        return data.sst2(args.sst2, train_limit=args.sst2_limit, seed=0)
    return data.word_task(name, limit=args.limit)


def source_key(name: str, args) -> tuple[dict, str]:
    """(cache key, cache folder) of the source adapter of ``name``: the task, the training settings and,
    for sst2, the resolved --sst2 folder and the SHA-256 of its files (main() has checked the folder
    before any lookup)."""
    key = dict(task=name, steps=args.source_steps, limit=args.limit if name != "sst2" else args.sst2_limit,
               lr=args.lr_lora, bs=args.batch_size, r=RANK, alpha=ALPHA, seed=0, v=2)
    if name == "sst2":
        key["data"] = evalcommon.sst2_fingerprint(args.sst2)
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key, os.path.join(args.cache, f"{name}-{tag}")


def source_adapter(name: str, args) -> str:
    """Folder of a LoRA adapter trained on ``name`` (trained once, then reused from the cache; see
    source_key). The key is also written to key.json in the folder and must match for a cached
    adapter to be used."""
    key, folder = source_key(name, args)
    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        try:
            with open(os.path.join(folder, "key.json"), encoding="utf-8") as f:
                hit = json.load(f) == json.loads(json.dumps(key))
        except (OSError, ValueError):
            hit = False
        if hit:
            log(f"source {name}: cached {folder}")
            return folder
        log(f"source {name}: {folder} does not hold this key; retraining")
        shutil.rmtree(folder)
    task = load_task(name, args)
    t0 = time.perf_counter()
    model, tok, _ = train.train_lora_adapter(task, folder + ".tmp", r=RANK, alpha=ALPHA, targets=TARGETS,
                                             steps=args.source_steps, lr=args.lr_lora,
                                             batch_size=args.batch_size, seed=0)
    acc = train.accuracy(model, tok, task.dev)
    with open(os.path.join(folder + ".tmp", "eval.json"), "w") as f:
        json.dump({"dev_acc": acc, "seconds": time.perf_counter() - t0}, f)
    with open(os.path.join(folder + ".tmp", "key.json"), "w", encoding="utf-8") as f:
        json.dump(key, f, sort_keys=True, indent=1)
    os.replace(folder + ".tmp", folder)
    log(f"source {name}: dev acc {acc:.4f}, {time.perf_counter() - t0:.0f} s -> {folder}")
    return folder


def run_lora(task, seed, lr, args):
    model, tok = train.load_classifier(seed=seed)
    model = train.lora_model(model, r=RANK, alpha=ALPHA, targets=TARGETS)
    lora, head = train.trainable(model, "lora_"), train.trainable(model, "classifier")
    assert train.count(lora) + train.count(head) == train.count(train.trainable(model))
    opt = train.adamw([{"params": lora, "lr": lr}, {"params": head, "lr": args.lr_head}])
    lg = train.train(model, tok, task, steps=args.steps, batch_size=args.batch_size, seed=seed, optimizer=opt)
    return dict(acc=train.accuracy(model, tok, task.dev), adapter=train.count(lora), head=train.count(head),
                seconds=lg.seconds, model=model)


def run_eigen(task, sub, seed, init, lr, args):
    model, tok = train.load_classifier(seed=seed)
    em = eigenlorax.apply(model, sub, RANK, scaling=args.scaling, init=init, trainable=("classifier",), seed=seed)
    loadings, head = train.trainable(model, ".alpha_"), train.trainable(model, "classifier")
    assert train.count(loadings) == em.coefficient_count()
    assert train.count(loadings) + train.count(head) == em.trainable_parameters()
    opt = train.adamw([{"params": loadings, "lr": lr}, {"params": head, "lr": args.lr_head}])
    lg = train.train(model, tok, task, steps=args.steps, batch_size=args.batch_size, seed=seed, optimizer=opt)
    return dict(acc=train.accuracy(model, tok, task.dev), adapter=train.count(loadings), head=train.count(head),
                seconds=lg.seconds, em=em, model=model)


def run_head(task, seed, args):
    model, tok = train.load_classifier(seed=seed)
    head = train.head_only(model)
    opt = train.adamw([{"params": head, "lr": args.lr_head}])
    lg = train.train(model, tok, task, steps=args.steps, batch_size=args.batch_size, seed=seed, optimizer=opt)
    return dict(acc=train.accuracy(model, tok, task.dev), adapter=0, head=train.count(head), seconds=lg.seconds)


def validation_split(task: data.Task, fraction: float, seed: int) -> data.Task:
    """The task with ``fraction`` of its training examples (at least 1, seeded shuffle) moved to
    ``dev``: the pilot's data, disjoint from the real dev set."""
    order = list(range(len(task.train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    if n_val >= len(order):
        raise ValueError(f"--val-fraction {fraction} leaves no training examples of {task.name}")
    return data.Task(task.name, [task.train[i] for i in order[n_val:]], [task.train[i] for i in order[:n_val]],
                     task.labels)


def select_lrs(task: data.Task, sub, args) -> dict:
    """{method: {"grid": {lr: validation accuracy}, "lr": the chosen lr}} for LoRA and both
    EigenLoRAx inits (see --select-lr)."""
    pilot = validation_split(task, args.val_fraction, args.pilot_seed)
    runs = {"lora": (args.lr_grid_lora, lambda lr: run_lora(pilot, args.pilot_seed, lr, args)),
            **{f"eigen-{init}": (args.lr_grid_eigen,
                                 lambda lr, init=init: run_eigen(pilot, sub, args.pilot_seed, init, lr, args))
               for init in ("lora", "uniform")}}
    chosen = {}
    for method, (grid, run) in runs.items():
        scores = {}
        for lr in grid:
            scores[lr] = run(lr)["acc"]
            log(f"lr selection {method}: lr {lr:g} -> validation acc {scores[lr]:.4f}")
        chosen[method] = {"grid": scores, "lr": max(grid, key=lambda lr: (scores[lr], -grid.index(lr)))}
    chosen["split"] = {"train": len(pilot.train), "validation": len(pilot.dev), "seed": args.pilot_seed}
    return chosen


def selection_line(selection: dict) -> str:
    split = selection["split"]
    parts = [f"{m}: " + ", ".join(f"{lr:g} → {100 * acc:.2f}%" for lr, acc in v["grid"].items()) + f" (chose {v['lr']:g})"
             for m, v in selection.items() if m != "split"]
    return (f"- lr chosen per method (--select-lr) by accuracy on a validation split of the training data "
            f"({split['validation']:,} examples; the pilot trains on the other {split['train']:,}, seed "
            f"{split['seed']}, not a reported seed; the dev set is not used): " + "; ".join(parts) + ".")


def switch_times(em, lora_model, work):
    """(EigenLoRAx load_coefficients from a file, peft LoRA swap from a file), median seconds of 50,
    and the two files' sizes."""
    coef = os.path.join(work, "task.safetensors")
    em.save_coefficients(coef)  # with the head apply(trainable=) unfroze
    ad = os.path.join(work, "lora_task")
    lora_model.save_pretrained(ad)
    weights = os.path.join(ad, "adapter_model.safetensors")
    eigen_s, lora_s = eigenlorax.task_switch_seconds(em, coef, lora_model, weights)
    return eigen_s, lora_s, os.path.getsize(coef), os.path.getsize(weights)


def fmt(values, pct=False):
    values = [100 * v for v in values] if pct else list(values)
    if len(values) == 1:
        return f"{values[0]:.2f}" if pct else f"{values[0]:.4f}"
    m, s = statistics.mean(values), statistics.stdev(values)
    return f"{m:.2f} ± {s:.2f}" if pct else f"{m:.4f} ± {s:.4f}"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        return str(os.getuid()) if hasattr(os, "getuid") else "user"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(data.WORD_TASKS), choices=list(data.WORD_TASKS) + ["sst2"],
                    help="the task pool (held-out task + sources); default: the 6 word tasks")
    ap.add_argument("--sst2", metavar="PATH", help="SST-2 folder (train.tsv, dev.tsv): add sst2 to the pool")
    ap.add_argument("--sst2-limit", type=int, default=20000, help="SST-2 training examples (default 20000)")
    ap.add_argument("--held-out", default="vader-intensity", choices=list(data.WORD_TASKS) + ["sst2"],
                    help="the new task (default vader-intensity)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150, help="training steps on the held-out task (default 150)")
    ap.add_argument("--source-steps", type=int, help="training steps of the source adapters (default --steps)")
    ap.add_argument("--limit", type=int, default=2000, help="examples per word task (20%% dev; default 2000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--components", type=int, default=16, help="principal directions per layer and side")
    ap.add_argument("--augment", type=int, default=0, help="extra seeded orthogonal directions")
    ap.add_argument("--scaling", type=float, default=1.0, help="EigenLoRAx update scaling (1 = the authors')")
    ap.add_argument("--lr-lora", type=float, default=DEFAULT_LR["lora"],
                    help="LoRA factors' lr (and the source adapters'; default %(default)s)")
    ap.add_argument("--lr-eigen", type=float, default=DEFAULT_LR["eigen"],
                    help="EigenLoRAx loadings' lr (default %(default)s)")
    ap.add_argument("--lr-head", type=float, default=DEFAULT_LR["head"],
                    help="the classifier head's lr, in every method (default %(default)s)")
    ap.add_argument("--select-lr", action="store_true",
                    help="choose each method's lr from the grids below by accuracy on a validation split of "
                         "the held-out task's training data (see the top of this help); --lr-lora still "
                         "trains the source adapters and --lr-head the head")
    ap.add_argument("--lr-grid-lora", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], metavar="LR",
                    help="LoRA factors' lrs tried by --select-lr (default %(default)s)")
    ap.add_argument("--lr-grid-eigen", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1], metavar="LR",
                    help="loadings' lrs tried by --select-lr, per init (default %(default)s)")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of the held-out task's training examples --select-lr validates on (default 0.1)")
    ap.add_argument("--pilot-seed", type=int, default=100,
                    help="seed of the --select-lr runs (default 100; keep it out of --seeds)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: fastest for these tiny batches, esp. on a busy machine)")
    ap.add_argument("--cache",
                    default=os.path.join(tempfile.gettempdir(), f"subspace_ext_eigenlorax_cache-{_user()}"),
                    help="folder for the source adapters (reused across runs; default: per user, in the temp dir)")
    ap.add_argument("--output", default="docs/results_eigenlorax.md",
                    help="the markdown report (default %(default)s; give another for an SST-2 run, e.g. "
                         "docs/results_eigenlorax_sst2.md)")
    ap.add_argument("--json", default=None, help="also write the raw per-seed results to this JSON file")
    return ap


def cli_args(recorded: dict) -> dict:
    """Recorded arguments (the JSON's "args") with what main() derives put back to what was typed, so
    that ``evalcommon.command_from_args`` can quote the command: --source-steps equal to --steps and
    --tasks holding just the default pool plus the tasks main() appends are dropped."""
    a = dict(recorded)
    if a.get("source_steps") == a.get("steps"):
        a["source_steps"] = None
    expected = list(data.WORD_TASKS)
    if a.get("sst2") and "sst2" not in expected:
        expected.append("sst2")
    if a.get("held_out") not in expected:
        expected.append(a.get("held_out"))
    if a.get("tasks") == expected:
        a["tasks"] = list(data.WORD_TASKS)
    return a


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.source_steps = args.source_steps or args.steps
    if args.sst2 and "sst2" not in args.tasks:
        args.tasks.append("sst2")
    if "sst2" in args.tasks + [args.held_out]:
        # before any cache lookup: a missing or unreadable folder is a one-line error, never a cached adapter
        args.sst2 = evalcommon.require_sst2(ap, args.sst2 or data.default_sst2_path())
    if args.held_out not in args.tasks:
        args.tasks.append(args.held_out)
    sources = [t for t in args.tasks if t != args.held_out]
    if len(sources) < 2:
        ap.error(f"need at least 2 source tasks besides {args.held_out}, got {sources}")
    if args.select_lr:
        if not 0 < args.val_fraction < 1:
            ap.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        if args.pilot_seed in args.seeds:
            ap.error(f"--pilot-seed {args.pilot_seed} is one of --seeds: the lr would be chosen on a reported run")
        for name in ("lr_grid_lora", "lr_grid_eigen"):
            grid = getattr(args, name)
            if any(not lr > 0 for lr in grid) or len(set(grid)) != len(grid):
                ap.error(f"--{name.replace('_', '-')} needs distinct positive lrs, got {grid}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    command = evalcommon.command_line(__file__, argv)

    folders = [source_adapter(name, args) for name in sources]
    src_acc = {}
    for name, folder in zip(sources, folders):
        try:
            with open(os.path.join(folder, "eval.json")) as f:
                src_acc[name] = json.load(f)["dev_acc"]
        except OSError:
            src_acc[name] = float("nan")
    t0 = time.perf_counter()
    sub = eigenlorax.build_subspace(folders, components=args.components, augment=args.augment, seed=0,
                                    base=str(models.minilm_dir()))
    build_s = time.perf_counter() - t0
    ks = sorted({(sub.A[m].P.shape[1], sub.B[m].P.shape[1]) for m in sub.modules})
    ev_A = statistics.mean(float(sub.A[m].explained.sum()) for m in sub.modules)
    ev_B = statistics.mean(float(sub.B[m].explained.sum()) for m in sub.modules)
    log(f"subspace: {len(sub.modules)} layers, K (A, B) {ks}, explained A {ev_A:.3f} B {ev_B:.3f}, {build_s:.2f} s")

    task = load_task(args.held_out, args)
    methods = ["lora", "eigen-lora", "eigen-uniform", "head"]
    selection = select_lrs(task, sub, args) if args.select_lr else None
    lrs = {"lora": args.lr_lora, "eigen-lora": args.lr_eigen, "eigen-uniform": args.lr_eigen, "head": None}
    if selection:
        lrs.update({m: selection[m]["lr"] for m in methods if m in selection})
    res = {m: [] for m in methods}
    switch = None
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            r = run_lora(task, seed, lrs["lora"], args)
            lora_model = r.pop("model")
            res["lora"].append(r)
            for init in ("lora", "uniform"):
                e = run_eigen(task, sub, seed, init, lrs[f"eigen-{init}"], args)
                em, _ = e.pop("em"), e.pop("model")
                res[f"eigen-{init}"].append(e)
            res["head"].append(run_head(task, seed, args))
            log(f"seed {seed}: " + ", ".join(f"{m} {res[m][-1]['acc']:.4f} ({res[m][-1]['seconds']:.0f} s)"
                                           for m in methods))
            if switch is None:
                switch = switch_times(em, lora_model, work)

    lora_acc = statistics.mean(r["acc"] for r in res["lora"])
    lora_n = res["lora"][0]["adapter"]
    names = {"lora": f"LoRA r={RANK} (query, value) from scratch",
             "eigen-lora": "EigenLoRAx loadings, init 'lora' (α_B = 0)",
             "eigen-uniform": "EigenLoRAx loadings, init 'uniform' (authors')",
             "head": "head only (frozen base)"}
    lines = [
        f"# EigenLoRAx leave-one-out on MiniLM-L6: held-out task `{args.held_out}`",
        "",
        f"Command: `{command}`",
        "",
        f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.threads} thread(s); "
        f"total wall time {time.perf_counter() - t_start:.0f} s.",
        "",
        f"- Sources: LoRA r={RANK}, alpha {ALPHA}, query/value + head, {args.source_steps} steps, lr {args.lr_lora}, "
        f"batch {args.batch_size}, seed 0, on: " + ", ".join(f"{n} (dev acc {src_acc[n]:.3f})" for n in sources) + ".",
        f"- Subspace: {len(sources)} adapters, --components {args.components} (cap N·r−1 = {len(sources) * RANK - 1}), "
        f"--augment {args.augment}; K per layer (A, B) = {ks}; mean explained variance of the kept components "
        f"A {ev_A:.3f}, B {ev_B:.3f}; built in {build_s:.2f} s.",
        f"- Held-out `{args.held_out}`: {len(task.train)} train / {len(task.dev)} dev examples; every method trains "
        f"{args.steps} steps, batch {args.batch_size}, AdamW (no weight decay), same seeds {args.seeds} "
        f"(same head init and data order per seed). lr: LoRA factors {lrs['lora']:g}, EigenLoRAx loadings "
        f"{lrs['eigen-lora']:g} (init lora) / {lrs['eigen-uniform']:g} (init uniform) (task rank {RANK}, scaling "
        f"{args.scaling}), head {args.lr_head:g} in every method.",
        "- Accuracy: dev accuracy after the last step (no checkpoint selection), mean ± std over seeds.",
        *([selection_line(selection)] if selection else
          ["- The default lrs come from a one-seed pilot (seed 100, not a reported seed) on vader-intensity: "
           "LoRA {1e-3, 3e-3, 1e-2}, loadings {3e-3, 1e-2, 3e-2}; see DEFAULT_LR in the script."]
          if (args.lr_lora, args.lr_eigen, args.lr_head) == tuple(DEFAULT_LR.values()) else []),
        "",
        "| method | trainable adapter params | head params | LoRA params / these | lr | dev accuracy (%) | % of LoRA | train s / run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in methods:
        rs = res[m]
        n = rs[0]["adapter"]
        ratio = "1×" if m == "lora" else ("—" if n == 0 else f"{lora_n / n:.1f}×")
        pct = 100 * statistics.mean(r["acc"] for r in rs) / lora_acc
        lr = f"{lrs[m]:g}" if lrs[m] is not None else f"{args.lr_head:g} (head)"
        lines.append(f"| {names[m]} | {n:,} | {rs[0]['head']:,} | {ratio} | {lr} | {fmt((r['acc'] for r in rs), pct=True)} | "
                     f"{pct:.1f} | {statistics.mean(r['seconds'] for r in rs):.1f} |")
    eigen_s, lora_s, coef_bytes, lora_bytes = switch
    lines += [
        "",
        "Task switch (median of 50, after 3 warm-ups): EigenLoRAx `load_coefficients` from its file "
        f"({coef_bytes:,} bytes: loadings + head) **{eigen_s * 1e3:.3f} ms**; peft LoRA swap "
        f"(`load_file` + `set_peft_model_state_dict`, {lora_bytes:,} bytes) {lora_s * 1e3:.3f} ms.",
        "",
    ]
    text = "\n".join(lines)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            recorded = {k: v for k, v in vars(args).items() if k != "cache"}  # a per-user temp path
            json.dump({"args": plots.portable_args(recorded, ROOT), "command": command, "names": names,
                       "switch_s": {"eigen": eigen_s, "lora": lora_s}, "lrs": lrs,
                       "selection": selection and {m: ({"grid": [[lr, acc] for lr, acc in v["grid"].items()],
                                                        "lr": v["lr"]} if m != "split" else v)
                                                   for m, v in selection.items()},
                       "results": {m: [{k: v for k, v in r.items()} for r in res[m]] for m in methods}}, f, indent=1)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
