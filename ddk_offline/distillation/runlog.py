"""The run's record: ``metrics.jsonl`` (one row per logged step), optional TensorBoard, a per-window accumulator, and
the run summary (``summary.json``).

Each training row holds the loss terms averaged over the labelled positions of the steps since the previous row,
plus per-domain student CE and teacher NLL over the same positions (keyed by domain name; ``null`` for a domain
without samples in the window), the domain weights in use, the learning rate and the throughput.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddk_offline.distillation.reporters import open_reporters
from ddk_offline.distillation.samplers.stats import GapStats

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


class Window:
    """Sums over the steps since the last logged row (saved in checkpoints so a resumed run logs the same rows)."""

    def __init__(self, domains: list[str]):
        self.domains = domains
        self.stats = GapStats(domains)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = self.ce_sum = self.kl_sum = 0.0
        self.positions = self.tokens = 0
        self.seconds = 0.0
        self.stats.reset()

    def add(self, *, loss_sum: float, ce_sum: float, kl_sum: float, positions: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.ce_sum += ce_sum
        self.kl_sum += kl_sum
        self.positions += positions
        self.tokens += tokens

    def row(self, step: int, *, lr: float, weights: np.ndarray, kd: bool, extra: dict[str, Any]) -> dict[str, Any]:
        n = max(self.positions, 1)
        ce, nll, _ = self.stats.means()
        return {
            "step": step,
            "loss": self.loss_sum / n,
            "ce": self.ce_sum / n,
            "kl": self.kl_sum / n if kd else None,
            "lr": lr,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "weights": {d: float(w) for d, w in zip(self.domains, weights, strict=True)},
            "student_loss": _by_domain(self.domains, ce),
            "teacher_loss": _by_domain(self.domains, nll),
            **extra,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": [self.loss_sum, self.ce_sum, self.kl_sum, self.positions, self.tokens],
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.ce_sum, self.kl_sum, positions, tokens = state["sums"]
        self.positions, self.tokens = int(positions), int(tokens)
        self.stats.load_state_dict(state["stats"])


def _by_domain(domains: list[str], values: np.ndarray) -> dict[str, float | None]:
    return {d: (None if math.isnan(v) else float(v)) for d, v in zip(domains, values, strict=True)}


class MetricsWriter:
    """Appends rows to ``OUT/metrics.jsonl`` and sends them to the ``--report-to`` loggers (see reporters.py).

    On resume the rows at or after the resumed step are dropped first: the resumed run writes them again.
    """

    def __init__(
        self,
        out: Path,
        *,
        resume_step: int | None = None,
        report_to: tuple[str, ...] = ("auto",),
        config: dict[str, Any] | None = None,
    ):
        self.path = Path(out) / METRICS_FILE
        self.eval_path = Path(out) / EVAL_FILE
        for path in (self.path, self.eval_path):
            if resume_step is None:
                path.unlink(missing_ok=True)
            elif path.exists():
                # Eval rows at the resumed step were written just before its checkpoint: keep them.
                last = resume_step if path == self.eval_path else resume_step - 1
                keep = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= last
                ]
                path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._reporters = open_reporters(report_to, Path(out), config or {})

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()
        if self._reporters:
            scalars = row_scalars(row)
            for r in self._reporters:
                r.log(scalars, row["step"])

    def write_eval(self, step: int, result: dict[str, Any]) -> None:
        with open(self.eval_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **result}, allow_nan=True) + "\n")
        scalars = {f"val_ratio/{d}": v["ratio"] for d, v in result["domains"].items() if v["positions"]}
        for r in self._reporters:
            r.log(scalars, step)

    def close(self) -> None:
        self._file.close()
        for r in self._reporters:
            r.close()
        self._reporters = []


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as named series: train/*, and per domain weights/*, student_loss/*, teacher_loss/*, ratio/*."""
    keys = ("loss", "ce", "kl", "lr", "tokens_per_s", "grad_norm")
    out = {f"train/{k}": float(row[k]) for k in keys if isinstance(row.get(k), (int, float))}
    for group in ("weights", "student_loss", "teacher_loss"):
        for domain, value in (row.get(group) or {}).items():
            if value is not None:
                out[f"{group}/{domain}"] = float(value)
    for domain, s in (row.get("student_loss") or {}).items():
        t = (row.get("teacher_loss") or {}).get(domain)
        if s is not None and t:
            out[f"ratio/{domain}"] = s / t
    return out


@dataclass
class DistillSummary:
    """What a finished run reports (also written to ``OUT/summary.json``)."""

    out: str
    final_model: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    weights: dict[str, float]
    eval: dict[str, Any] | None = None
    plots: list[str] = field(default_factory=list)
