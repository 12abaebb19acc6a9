"""``--report-to``: experiment loggers beside ``metrics.jsonl`` (TensorBoard, Weights & Biases), both optional.

Each logger gets every metrics row as named series (``train/loss``, ``weights/<domain>``, ``ratio/<domain>``,
``val_ratio/<domain>``, ...) and the run's resolved config once. ``auto`` (the default) is TensorBoard when it is
installed and nothing otherwise; a logger asked for by name but not installed is refused before the run starts.
Weights & Biases follows its own environment (``WANDB_MODE=offline`` writes the run under ``OUT/wandb`` without a
network; ``WANDB_PROJECT`` names the project, default ``ddk-offline``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ddk_offline.errors import UserError

REPORTERS = ("auto", "none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_report_to(spec: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> the loggers to open; refuses unknown names and loggers that are not installed."""
    names = tuple(n.strip() for n in str(spec).split(",") if n.strip()) or ("none",)
    for n in names:
        if n not in REPORTERS:
            raise UserError(f"--report-to {spec!r}: unknown logger '{n}'; choose from {', '.join(REPORTERS)}")
    if len(names) > 1 and ({"auto", "none"} & set(names)):
        raise UserError(f"--report-to {spec!r}: 'auto' and 'none' stand alone; list loggers by name instead")
    for n in names:
        if n in _PACKAGES and importlib.util.find_spec(_PACKAGES[n]) is None:
            raise UserError(f"--report-to {n}: the package is not installed; pip install {_PACKAGES[n]}")
    return names


def open_reporters(names: tuple[str, ...], out: Path, config: dict[str, Any]) -> list:
    """The loggers for a run writing into ``out`` (names as :func:`parse_report_to` returns them)."""
    if names == ("auto",):
        names = ("tensorboard",) if importlib.util.find_spec("tensorboard") is not None else ()
    reporters = []
    for n in names:
        if n == "tensorboard":
            reporters.append(_TensorBoard(out / "tensorboard", config))
        elif n == "wandb":
            reporters.append(_WandB(out, config))
    return reporters


class _TensorBoard:
    def __init__(self, path: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config: dict[str, Any]):
        import wandb

        project = os.environ.get("WANDB_PROJECT", "ddk-offline")
        self.run = wandb.init(project=project, name=out.name, dir=str(out), config=config, reinit=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
