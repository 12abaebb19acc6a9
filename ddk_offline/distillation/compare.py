"""``runs compare``: several distill runs of one dump side by side (settings that differ, per-domain ratios, speed).

A run folder is read, never written: ``config.json`` (the resolved settings), ``summary.json`` (steps, tokens,
speed, the final eval), ``eval.jsonl`` (ratios over steps), ``metrics.jsonl`` (domain weights over steps) and the
latest checkpoint's record of its dump's identity. Runs of different dumps are refused: their ratios are measured
against different teachers or data, so a table of them would compare nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddk_offline.distillation.checkpoint import latest_checkpoint
from ddk_offline.errors import UserError
from ddk_offline.format.reader import open_dump

#: Settings that never change what a run learns: left out of the "settings that differ" table.
_NOT_SETTINGS = {"out", "resume", "device", "data_workers", "log_every", "save_every", "eval_every", "dump"}


@dataclass
class RunRecord:
    """What one run folder says about itself."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    dump_identity: dict[str, Any] | None = None


def read_run(path: str | Path) -> RunRecord:
    """Read a finished run folder (``summary.json`` is written last, so its presence means finished)."""
    path = Path(path)
    for name in ("config.json", "summary.json"):
        if not (path / name).is_file():
            raise UserError(f"{path}: no {name}; runs compare reads finished runs (the --out of `ddk-offline distill`)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        evals = _jsonl(path / "eval.jsonl")
        metrics = _jsonl(path / "metrics.jsonl")
    except ValueError as e:
        raise UserError(f"{path}: a run file is not valid JSON ({e}); was it edited by hand?") from None
    identity = None
    ckpt = latest_checkpoint(path)
    if ckpt is not None and (ckpt / "state.json").is_file():
        identity = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("dump_identity")
    if identity is None:  # a run from before identities were recorded: the dump its config names, as it is now
        try:
            identity = open_dump(config["dump"]).manifest.identity()
        except Exception as e:
            raise UserError(f"{path}: which dump it was trained on is unknown ({e}); make its dump readable") from None
    return RunRecord(path, config, summary, evals, metrics, identity)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_runs(paths: list[str | Path]) -> dict[str, Any]:
    """The comparison of ``paths`` (at least two finished runs of one dump) as a JSON-ready dict.

    Raises:
        UserError: fewer than two runs, an unreadable run, or runs of different dumps (naming the difference).
    """
    if len(paths) < 2:
        raise UserError("runs compare: pass at least two run folders")
    runs = [read_run(p) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        both = set(first.dump_identity) | set(r.dump_identity)
        diff = sorted(k for k in both if first.dump_identity.get(k) != r.dump_identity.get(k))
        if diff:
            k = diff[0]
            raise UserError(
                f"runs compare: {r.path} was trained on another dump than {first.path} ({k}: "
                f"{r.dump_identity.get(k)!r} vs {first.dump_identity.get(k)!r}); compare runs of one dump"
            )
    keys = sorted({k for r in runs for k in r.config} - _NOT_SETTINGS)
    differ = [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    domains = list((first.summary.get("eval") or {}).get("domains", {})) or list(first.summary.get("weights", {}))
    rows = []
    for r in runs:
        ev = r.summary.get("eval") or {}
        row = {
            "run": str(r.path),
            "settings": {k: r.config.get(k) for k in differ},
            "steps": r.summary.get("steps"),
            "tokens": r.summary.get("tokens"),
            "tokens_per_s": r.summary.get("tokens_per_s"),
            "ratios": {d: (ev.get("domains", {}).get(d) or {}).get("ratio") for d in domains},
            "mean_ratio": ev.get("mean_ratio"),
            "worst_ratio": ev.get("worst_ratio"),
            "worst_domain": ev.get("worst_domain"),
            "final_weights": r.summary.get("weights"),
        }
        rows.append(row)
    return {"domains": domains, "settings_that_differ": differ, "runs": rows}
