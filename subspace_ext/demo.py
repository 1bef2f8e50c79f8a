"""The end-to-end demo on the embedded default: the bundled MiniLM-L6 and the word-level tasks that ship
inside PyPI packages (vaderSentiment, textblob). No network, a few minutes on 2 CPU cores.

1. LoRA r=8 (query/value + head) on six word tasks; the adapters are saved as peft folders.
2. SOLAR: compress one adapter at several ratios (and the complete basis), decode, re-measure dev
   accuracy; the truncated-SVD baseline at the same stored numbers next to it.
3. EigenLoRAx: build a subspace from five adapters, train the held-out sixth task on loadings only;
   against its LoRA adapter and a head-only probe; the task-switch time.
4. SRLoRA vs LoRA on one task, same seed, data order and learning rate: dev accuracy vs step.

Writes ``results.md``, ``results.json`` and PNG plots (solar.png, eigenlorax.png, srlora.png) to the
output folder, next to the adapters, SOLAR packages, the subspace and the task coefficients it made.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import data, eigenlorax, models, plots, solar, train
from .io import progress_bar
from .srlora import SRLoRA, SRLoRAConfig

SOURCE_TASKS = ("vader-polarity", "blob-polarity", "blob-subjectivity", "pos-noun-verb", "pos-adj-adv")


@dataclass
class DemoConfig:
    steps: int = 150              # training steps of every run
    limit: int = 2000             # examples per word task (20% dev)
    batch_size: int = 32
    lr: float = 3e-3              # LoRA factors and heads (AdamW, no weight decay)
    eigen_lr: float = 1e-2        # EigenLoRAx loadings
    rank: int = 8
    alpha: int = 16
    components: int = 16          # EigenLoRAx principal directions per layer and side
    ratios: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5)
    solar_task: str = "vader-polarity"
    held_out: str = "vader-intensity"
    srlora_task: str = "blob-subjectivity"
    eval_every: int = 15          # dev-accuracy curve of the SRLoRA comparison
    seed: int = 0
    threads: int = 1              # 1 is fastest for these small batches on a 2-core machine
    sources: Sequence[str] = field(default_factory=lambda: list(SOURCE_TASKS))

    def validate(self) -> None:
        for name in ("steps", "limit", "batch_size", "rank", "components", "eval_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.limit < 20:
            raise ValueError(f"limit must be >= 20 examples per task, got {self.limit}")
        known = set(data.WORD_TASKS)
        for name in [self.solar_task, self.held_out, self.srlora_task, *self.sources]:
            if name not in known:
                raise ValueError(f"unknown task {name!r}; known: {', '.join(data.WORD_TASKS)}")
        if self.held_out in self.sources:
            raise ValueError(f"held-out task {self.held_out!r} must not be one of the sources")
        if len(self.sources) < 2:
            raise ValueError("EigenLoRAx needs at least 2 source tasks")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be in (0, 1), got {list(self.ratios)}")


def quick_config() -> DemoConfig:
    """A seconds-scale run of every stage (smoke test; the numbers mean nothing)."""
    return DemoConfig(steps=4, limit=200, batch_size=8, ratios=(0.1,), eval_every=2, components=4,
                      sources=["vader-polarity", "blob-polarity"])


def _lora(cfg: DemoConfig):
    model, tok = train.load_classifier(seed=cfg.seed)
    model = train.lora_model(model, r=cfg.rank, alpha=cfg.alpha)
    return model, tok


class _Stages:
    """A progress bar over the demo's training runs and evaluations, plus one log line per result."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
        self.log = log
        # None without progress; a bar that does not draw when stderr is no terminal (the log lines remain)
        self.bar = progress_bar(None, "demo", enabled, unit="stage", total=total, leave=True)

    def done(self, msg: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.update(1)
            self.bar.write(msg, file=sys.stderr)   # above the bar, which is on stderr too
        else:
            self.log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Written first into the output folder: a folder that holds it is an earlier demo's, whose files are replaced.
MARKER = ".subspace-ext-demo"


def run(out_dir: str, cfg: Optional[DemoConfig] = None, *, progress: bool = True, force: bool = False,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Dict:
    """Run the whole demo into ``out_dir``; returns the results (also written as results.json). A folder
    that holds anything but an earlier demo's output is refused unless ``force`` (the demo replaces
    results.md, results.json, the plots, adapters/, solar/ and eigenlorax/ there)."""
    cfg = cfg or DemoConfig()
    cfg.validate()
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if entries and not _earlier_demo(out_dir, entries) and not force:
        raise ValueError(f"{out_dir} holds files no earlier demo wrote ({', '.join(entries[:3])}"
                         f"{' ...' if len(entries) > 3 else ''}): the demo replaces results.md, results.json, its "
                         "plots, adapters/, solar/ and eigenlorax/ there; choose another folder (or --force)")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        f.write("an output folder of `subspace-ext demo`: a later demo replaces its files\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(out_dir, cfg, progress, log)
    finally:
        torch.set_num_threads(threads)


def _earlier_demo(out_dir: str, entries: List[str]) -> bool:
    """Whether a folder holds an earlier demo's output: its marker, or (builds before the marker) a
    results.json with the demo's sections."""
    if MARKER in entries:
        return True
    try:
        with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(res, dict) and {"config", "tasks", "lora"} <= set(res)


def _run(out_dir: str, cfg: DemoConfig, progress: bool, log) -> Dict:
    t_start = time.perf_counter()
    names = list(dict.fromkeys([*cfg.sources, cfg.held_out, cfg.solar_task, cfg.srlora_task]))
    tasks = {n: data.word_task(n, limit=cfg.limit) for n in names}
    base = str(models.minilm_dir())
    stages = _Stages(len(names) + len(cfg.ratios) + 1 + 3 + 1, progress, log)
    res: Dict = {"config": asdict(cfg), "tasks": {n: [len(t.train), len(t.dev)] for n, t in tasks.items()}}

    # 1. LoRA adapters ------------------------------------------------------------------------
    adapters, lora = {}, {}
    for name in names:
        task, folder = tasks[name], os.path.join(out_dir, "adapters", name)
        model, tok = _lora(cfg)
        curve = cfg.eval_every if name == cfg.srlora_task else 0
        lg = train.train(model, tok, task, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                         eval_every=curve, progress=progress)
        model.save_pretrained(folder)
        adapters[name] = folder
        lora[name] = dict(acc=train.accuracy(model, tok, task.dev), params=train.count(train.trainable(model, "lora_")),
                          head=train.count(train.trainable(model, "classifier")), seconds=lg.seconds,
                          curve=[lg.dev_steps, lg.dev_acc], model=model)
        stages.done(f"LoRA {name}: dev acc {100 * lora[name]['acc']:.2f}% ({lg.seconds:.0f} s)")
    res["lora"] = {n: {k: v for k, v in r.items() if k != "model"} for n, r in lora.items()}

    # 2. SOLAR --------------------------------------------------------------------------------
    src, task = adapters[cfg.solar_task], tasks[cfg.solar_task]
    _, tok = train.load_classifier(seed=cfg.seed)
    rows = []
    os.makedirs(os.path.join(out_dir, "solar"), exist_ok=True)
    def package(ratio, method: str, tag: str) -> Dict:
        """Compress ``src`` at ``ratio``, save, load, decode, and measure the decoded adapter."""
        pkg_path = os.path.join(out_dir, "solar", tag + ".safetensors")
        t0 = time.perf_counter()
        pkg = solar.compress(src, base, ratio=None if ratio == "full" else ratio,
                             budget="full" if ratio == "full" else None, seed=cfg.seed, method=method)
        nbytes = pkg.save(pkg_path)
        restored = solar.decompress(solar.SolarPackage.load(pkg_path), base)
        seconds = time.perf_counter() - t0
        restored_dir = os.path.join(out_dir, "solar", tag)
        restored.save_adapter(restored_dir)
        return dict(actual_ratio=pkg.ratio(), bytes=nbytes, seconds=seconds, encodings=pkg.encodings(),
                    error=statistics.mean(solar.relative_errors(src, restored)),
                    acc=train.accuracy(train.load_adapter_model(restored_dir, seed=cfg.seed)[0], tok, task.dev))

    for ratio in [*cfg.ratios, "full"]:
        tag = f"{cfg.solar_task}-{'full' if ratio == 'full' else f'r{ratio:g}'}"
        row = dict(ratio=ratio, **package(ratio, "solar", tag))
        if ratio != "full":
            auto = package(ratio, "auto", tag + "-auto")
            row.update(auto_ratio=auto["actual_ratio"], auto_bytes=auto["bytes"], auto_error=auto["error"],
                       auto_acc=auto["acc"], auto_encodings=auto["encodings"])
            svd, _ = solar.truncated_svd_baseline(src, ratio=ratio)
            svd_dir = os.path.join(out_dir, "solar", tag + "-svd")
            svd.save_adapter(svd_dir)
            row["svd_error"] = statistics.mean(solar.relative_errors(src, svd))
            row["svd_acc"] = train.accuracy(train.load_adapter_model(svd_dir, seed=cfg.seed)[0], tok, task.dev)
        rows.append(row)
        stages.done(f"SOLAR ratio {ratio}: error {row['error']:.3f}, acc {100 * row['acc']:.2f}%"
                    + (f" (--method auto {100 * row['auto_acc']:.2f}%, truncated SVD {100 * row['svd_acc']:.2f}%)"
                       if "svd_acc" in row else ""))
    res["solar"] = {"task": cfg.solar_task, "lora_acc": lora[cfg.solar_task]["acc"],
                    "adapter_bytes": os.path.getsize(os.path.join(src, "adapter_model.safetensors")), "rows": rows}

    # 3. EigenLoRAx ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    sub = eigenlorax.build_subspace([adapters[n] for n in cfg.sources], components=cfg.components,
                                    seed=cfg.seed, base=base)
    build_s = time.perf_counter() - t0
    sub_path = os.path.join(out_dir, "eigenlorax", "subspace.safetensors")
    os.makedirs(os.path.dirname(sub_path), exist_ok=True)
    sub.save(sub_path)
    stages.done(f"EigenLoRAx subspace of {len(cfg.sources)} adapters: {len(sub.modules)} layers ({build_s:.2f} s)")
    task = tasks[cfg.held_out]
    model, tok = train.load_classifier(seed=cfg.seed)
    em = eigenlorax.apply(model, sub, cfg.rank, init="lora", trainable=("classifier",), seed=cfg.seed)
    opt = train.adamw([{"params": train.trainable(model, ".alpha_"), "lr": cfg.eigen_lr},
                       {"params": train.trainable(model, "classifier"), "lr": cfg.lr}])
    lg = train.train(model, tok, task, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, optimizer=opt,
                     progress=progress)
    eigen_acc = train.accuracy(model, tok, task.dev)
    coef_path = os.path.join(out_dir, "eigenlorax", cfg.held_out + ".safetensors")
    em.save_coefficients(coef_path, task_type="SEQ_CLS")  # with the head apply(trainable=) unfroze
    stages.done(f"EigenLoRAx {cfg.held_out}: dev acc {100 * eigen_acc:.2f}% with {em.coefficient_count():,} "
                f"loadings ({lg.seconds:.0f} s)")
    model, tok = train.load_classifier(seed=cfg.seed)
    opt = train.adamw([{"params": train.head_only(model), "lr": cfg.lr}])
    train.train(model, tok, task, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, optimizer=opt,
                progress=progress)
    head_acc = train.accuracy(model, tok, task.dev)
    stages.done(f"head only {cfg.held_out}: dev acc {100 * head_acc:.2f}%")
    switch_s, lora_switch_s = eigenlorax.task_switch_seconds(
        em, coef_path, lora[cfg.held_out]["model"], os.path.join(adapters[cfg.held_out], "adapter_model.safetensors"),
        n=20, warmup=1)
    res["eigenlorax"] = {"held_out": cfg.held_out, "sources": list(cfg.sources), "components": cfg.components,
                         "build_s": build_s, "lora_acc": lora[cfg.held_out]["acc"],
                         "lora_params": lora[cfg.held_out]["params"], "eigen_acc": eigen_acc,
                         "eigen_params": em.coefficient_count(), "head_acc": head_acc,
                         "head_params": lora[cfg.held_out]["head"], "switch_ms": 1e3 * switch_s,
                         "lora_switch_ms": 1e3 * lora_switch_s}

    # 4. SRLoRA vs LoRA -----------------------------------------------------------------------
    task = tasks[cfg.srlora_task]
    model, tok = _lora(cfg)
    opt = train.adamw([{"params": train.trainable(model), "lr": cfg.lr}])
    every = max(1, cfg.steps // 10)
    sr = SRLoRA(model, opt, SRLoRAConfig(interval=every, warmup=every, fuse_fraction=0.25, total_steps=cfg.steps,
                                         seed=cfg.seed))
    lg = train.train(model, tok, task, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                     eval_every=cfg.eval_every, optimizer=opt, after_step=lambda s: sr.step(), progress=progress)
    sr_acc = train.accuracy(model, tok, task.dev)
    res["srlora"] = {"task": cfg.srlora_task, "lora_acc": lora[cfg.srlora_task]["acc"], "srlora_acc": sr_acc,
                     "lora_curve": lora[cfg.srlora_task]["curve"], "srlora_curve": [lg.dev_steps, lg.dev_acc],
                     "recompositions": len(sr.log), "pairs": sum(e.pairs for e in sr.log),
                     "interval": every, "lora_s": lora[cfg.srlora_task]["seconds"], "srlora_s": lg.seconds}
    stages.done(f"SRLoRA {cfg.srlora_task}: dev acc {100 * sr_acc:.2f}% vs LoRA "
                f"{100 * lora[cfg.srlora_task]['acc']:.2f}% ({len(sr.log)} recompositions)")
    stages.close()

    res["seconds"] = time.perf_counter() - t_start
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {cfg.threads} thread(s)"
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    write_report(out_dir, res)
    return res


def write_report(out_dir: str, res: Dict) -> str:
    """results.md and the three PNG plots from ``run``'s results."""
    cfg, so, ei, sr = res["config"], res["solar"], res["eigenlorax"], res["srlora"]
    acc = lambda x: f"{100 * x:.2f}"  # noqa: E731
    rows = so["rows"]
    plots.save_png(plots.Figure(
        f"SOLAR on {so['task']}: accuracy vs stored numbers", "stored numbers / adapter numbers",
        "dev accuracy (%)",
        [plots.Series("SOLAR", [r["ratio"] for r in rows if r["ratio"] != "full"],
                      [100 * r["acc"] for r in rows if r["ratio"] != "full"]),
         plots.Series("truncated SVD of each ΔW", [r["ratio"] for r in rows if r["ratio"] != "full"],
                      [100 * r["svd_acc"] for r in rows if r["ratio"] != "full"], style="s--"),
         *([plots.Series("package, --method auto", [r["ratio"] for r in rows if "auto_acc" in r],
                         [100 * r["auto_acc"] for r in rows if "auto_acc" in r], style="^:")]
           if any("auto_acc" in r for r in rows) else [])],
        hlines=[(100 * so["lora_acc"], "uncompressed LoRA")], logx=True), os.path.join(out_dir, "solar.png"))
    plots.save_png(plots.Figure(
        f"EigenLoRAx, held-out {ei['held_out']}", "trainable adapter parameters (log)", "dev accuracy (%)",
        [plots.Series("LoRA r=8", [ei["lora_params"]], [100 * ei["lora_acc"]], style="o"),
         plots.Series(f"EigenLoRAx (K={ei['components']})", [ei["eigen_params"]], [100 * ei["eigen_acc"]], style="s")],
        hlines=[(100 * ei["head_acc"], "head only")], logx=True), os.path.join(out_dir, "eigenlorax.png"))
    plots.save_png(plots.Figure(
        f"SRLoRA vs LoRA on {sr['task']}", "training step", "dev accuracy (%)",
        [plots.Series("LoRA", sr["lora_curve"][0], [100 * a for a in sr["lora_curve"][1]]),
         plots.Series("SRLoRA", sr["srlora_curve"][0], [100 * a for a in sr["srlora_curve"][1]], style="s-")]),
        os.path.join(out_dir, "srlora.png"))

    solar_rows = [[r["ratio"], f"{r['actual_ratio']:.4f}", f"{r['bytes']:,}", f"{r['error']:.4f}", acc(r["acc"]),
                   f"{r['auto_error']:.4f}" if "auto_error" in r else "—", acc(r["auto_acc"]) if "auto_acc" in r else "—",
                   r.get("auto_encodings", "—"),
                   f"{r['svd_error']:.4f}" if "svd_error" in r else "—", acc(r["svd_acc"]) if "svd_acc" in r else "—",
                   f"{r['seconds']:.2f}"] for r in rows]
    text = "\n".join([
        "# subspace_ext demo: SOLAR, EigenLoRAx and SRLoRA on the bundled MiniLM-L6",
        "",
        f"Command: `subspace-ext demo` · {res['machine']} · {res['seconds'] / 60:.1f} min. Word-level tasks from "
        f"the lexicons in vaderSentiment and textblob ({cfg['limit']} examples each, 20% dev); LoRA r={cfg['rank']}, "
        f"alpha {cfg['alpha']} on query/value + head; every run {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"AdamW lr {cfg['lr']:g}, seed {cfg['seed']}. One seed: differences of a point or two are noise.",
        "",
        "## Headline",
        "",
        plots.table(["method", "what", "result"], [
            ["SOLAR", f"compress the {so['task']} adapter to ~10% of its numbers",
             _solar_headline(so)],
            ["EigenLoRAx", f"learn {ei['held_out']} from a subspace of {len(ei['sources'])} other adapters",
             f"{acc(ei['eigen_acc'])}% vs LoRA {acc(ei['lora_acc'])}% with {ei['eigen_params']:,} vs "
             f"{ei['lora_params']:,} trainable adapter parameters ({ei['lora_params'] / ei['eigen_params']:.0f}× fewer)"],
            ["SRLoRA", f"train {sr['task']} with recomposition",
             f"{acc(sr['srlora_acc'])}% vs LoRA {acc(sr['lora_acc'])}% ({sr['recompositions']} recompositions)"],
        ]),
        "",
        f"## SOLAR: compress the `{so['task']}` adapter (LoRA dev accuracy {acc(so['lora_acc'])}%, "
        f"adapter file {so['adapter_bytes']:,} bytes)",
        "",
        "Ratio = stored numbers / adapter numbers (the head is stored as is by every method). Error = mean over "
        "layers of ‖ΔW − ΔŴ‖/‖ΔW‖. Seconds = SOLAR compress + save + load + decompress. `--method auto`: the "
        "same package format with each layer stored as SOLAR coefficients or as ΔW's leading singular pairs, "
        "whichever keeps more of ΔW for its numbers; the truncated-SVD baseline is not a package.",
        "",
        plots.table(["ratio asked", "ratio", "package bytes", "SOLAR error", "SOLAR acc (%)", "auto error",
                     "auto acc (%)", "auto encodings", "trunc. SVD error", "trunc. SVD acc (%)", "seconds"],
                    solar_rows),
        "",
        "![SOLAR](solar.png)",
        "",
        f"## EigenLoRAx: held-out `{ei['held_out']}` from a subspace of {', '.join(ei['sources'])}",
        "",
        plots.table(["method", "trainable adapter params", "head params", "dev acc (%)", "% of LoRA"], [
            ["LoRA r=8 (from scratch)", f"{ei['lora_params']:,}", f"{ei['head_params']:,}", acc(ei["lora_acc"]), "100.0"],
            [f"EigenLoRAx loadings (K={ei['components']}, rank {cfg['rank']})", f"{ei['eigen_params']:,}",
             f"{ei['head_params']:,}", acc(ei["eigen_acc"]), f"{100 * ei['eigen_acc'] / ei['lora_acc']:.1f}"],
            ["head only (frozen base)", "0", f"{ei['head_params']:,}", acc(ei["head_acc"]),
             f"{100 * ei['head_acc'] / ei['lora_acc']:.1f}"],
        ]),
        "",
        f"Subspace built in {ei['build_s']:.2f} s. Task switch (median of 20): EigenLoRAx `load_coefficients` "
        f"{ei['switch_ms']:.2f} ms vs peft adapter swap {ei['lora_switch_ms']:.2f} ms.",
        "",
        "![EigenLoRAx](eigenlorax.png)",
        "",
        f"## SRLoRA vs LoRA on `{sr['task']}` (same seed, data order, learning rate)",
        "",
        plots.table(["step", "LoRA dev acc (%)", "SRLoRA dev acc (%)"],
                    [[s, acc(a), acc(b)] for s, a, b in zip(sr["lora_curve"][0], sr["lora_curve"][1],
                                                           sr["srlora_curve"][1])]),
        "",
        f"SRLoRA: interval {sr['interval']}, fuse_fraction 0.25, PiSSA init; {sr['recompositions']} recompositions, "
        f"{sr['pairs']} pairs re-initialised; training {sr['srlora_s']:.1f} s vs LoRA {sr['lora_s']:.1f} s "
        "(both include the same curve evaluations).",
        "",
        "![SRLoRA](srlora.png)",
        "",
    ])
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def _solar_headline(so: Dict) -> str:
    rows = [r for r in so["rows"] if r["ratio"] != "full"]
    r = min(rows, key=lambda r: abs(r["ratio"] - 0.1))
    return (f"ratio {r['actual_ratio']:.3f}: {100 * r['acc']:.2f}% vs uncompressed {100 * so['lora_acc']:.2f}% "
            + (f"(`--method auto` {100 * r['auto_acc']:.2f}%, " if "auto_acc" in r else "(")
            + f"truncated SVD at the same size {100 * r['svd_acc']:.2f}%)")
