"""PNG plots of a distillation run from its ``metrics.jsonl``: domain weights and student/teacher loss ratios.

matplotlib is optional (the ``demo`` extra): it is imported lazily with the Agg backend, and when it is missing
the plots are skipped with a warning instead of failing the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict], fn) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for domain, value in fn(row).items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            steps, values = out.setdefault(domain, ([], []))
            steps.append(row["step"])
            values.append(value)
    return out


def _ratios(row: dict) -> dict[str, float | None]:
    s, t = row.get("student_loss") or {}, row.get("teacher_loss") or {}
    return {d: (s[d] / t[d] if s.get(d) is not None and t.get(d) else None) for d in s}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping plots (pip install 'ddk-offline[demo]')")
        return None
    return plt


def log_ratio_axis(ax) -> None:
    """The y axis of student/teacher ratios (call after plotting): log scale with ticks labelled at 1, 2, 5 x 10^n when
    the data spans more than 3x (linear and finely labelled otherwise), and the teacher's line at 1, labelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="teacher (ratio 1)")
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def write_plots(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``domain_weights.png`` and ``loss_ratio.png`` into ``out_dir``.

    Returns:
        The files written (empty when matplotlib is not installed or there is nothing to plot).
    """
    plt = _pyplot()
    if plt is None:
        return []
    rows = read_metrics(metrics_path)
    plots = [
        # Weights are piecewise constant between sampler updates: draw them as steps.
        ("domain_weights.png", _series(rows, lambda r: r.get("weights") or {}), "sampling weight", False, "steps-post"),
        ("loss_ratio.png", _series(rows, _ratios), "student CE / teacher NLL (train, per log window)", True, "default"),
    ]
    written = []
    for name, series, ylabel, log, drawstyle in plots:
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for domain, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, label=domain, marker="." if len(steps) < 50 else None, drawstyle=drawstyle)
        if log:
            log_ratio_axis(ax)
        ax.set_title(f"{Path(out_dir).resolve().name}: {ylabel.split(' (')[0]}", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_compare_plots(runs: list, out_dir: str | os.PathLike) -> list[Path]:
    """``compare_ratio.png`` and ``compare_weights.png``: one panel per run (same axes), one line per domain.

    Args:
        runs: :class:`ddk_offline.distillation.compare.RunRecord` objects (their ``metrics`` rows are plotted).
        out_dir: where the PNGs go (created).
    """
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = [
        ("compare_ratio.png", _ratios, "student CE / teacher NLL (train, per log window)", True, "default"),
        ("compare_weights.png", lambda r: r.get("weights") or {}, "sampling weight", False, "steps-post"),
    ]
    written = []
    for name, fn, ylabel, log, drawstyle in panels:
        fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4), dpi=100, sharey=True, squeeze=False)
        for ax, run in zip(axes[0], runs, strict=True):
            for domain, (steps, values) in sorted(_series(run.metrics, fn).items()):
                ax.plot(steps, values, label=domain, drawstyle=drawstyle)
            if log:
                log_ratio_axis(ax)
            ax.set_title(run.path.name, fontsize="medium")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written
