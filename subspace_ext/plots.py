"""PNG plots, markdown tables and small reporting helpers for the demo and the evaluation reports
(matplotlib, Agg backend)."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence


@dataclass
class Series:
    """One line (or point set) of a plot; ``err`` draws ± bars (e.g. std over seeds)."""
    label: str
    x: Sequence[float]
    y: Sequence[float]
    err: Optional[Sequence[float]] = None
    style: str = "o-"


@dataclass
class Figure:
    title: str
    xlabel: str
    ylabel: str
    series: List[Series] = field(default_factory=list)
    hlines: List[tuple] = field(default_factory=list)  # (y, label)
    logx: bool = False


def save_png(fig: Figure, path: str) -> str:
    """Render ``fig`` to ``path`` (PNG, 110 dpi); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for s in fig.series:
        if s.err is not None:
            ax.errorbar(s.x, s.y, yerr=s.err, fmt=s.style, capsize=3, label=s.label)
        else:
            ax.plot(s.x, s.y, s.style, label=s.label)
    for k, (y, label) in enumerate(fig.hlines):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{len(fig.series) + k}", label=label)
    if fig.logx:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.set_xticks(sorted({float(x) for s in fig.series for x in s.x}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(fig.title)
    ax.set_xlabel(fig.xlabel)
    ax.set_ylabel(fig.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    f.tight_layout()
    f.savefig(path)
    plt.close(f)
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: Sequence[float]) -> str:
    """Accuracies (0-1) as 'mean ± std' percent, or one number for a single value."""
    values = [100 * v for v in values]
    m, s = mean_std(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {s:.2f}"


def portable_args(args: dict, root: str) -> dict:
    """A copy of parsed arguments for a committed JSON: absolute paths become relative to ``root`` (no
    machine paths in results)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, str) and os.path.isabs(v):
            v = os.path.relpath(v, root)
        out[k] = v
    return out


def median_seconds(fn, n: int = 20, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``n`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
