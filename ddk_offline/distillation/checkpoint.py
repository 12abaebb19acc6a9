"""Atomic training checkpoints with everything a resume needs, loadable without unpickling user objects.

Layout of ``OUT/checkpoints``::

    step-00000100/            a complete checkpoint (renamed into place only after every file is durable)
        model.safetensors     the student's weights (safetensors; shared/tied tensors handled)
        tensors.pt            optimiser state + torch/CUDA RNG states (torch.save of tensors, lists and numbers)
        state.json            step, config, scheduler, sampler, gap stats, data cursors, draw/python/numpy RNG
    latest                    name of the newest complete checkpoint (atomically replaced)
    .tmp-step-00000200/       a save in progress (ignored and removed by the next save)

A save writes into ``.tmp-*``, fsyncs every file and the folder, renames it to ``step-*``, then points ``latest``
at it and only then removes the older checkpoint: a crash at any point leaves the previous one loadable.
``tensors.pt`` is read with ``torch.load(weights_only=True)``: states are converted to tensors, numbers and JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk_offline.errors import UserError
from ddk_offline.runtime.files import fsync_dir, write_json_atomic

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_PREFIX, _TMP_PREFIX = "step-", ".tmp-step-"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the path, the JSON state and the tensor state (model weights stay on disk)."""

    path: Path
    state: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def load_model(self, model: torch.nn.Module) -> None:
        """Load the saved weights into ``model`` (strict: every key must match)."""
        from safetensors.torch import load_model

        try:
            load_model(model, str(self.path / "model.safetensors"), strict=True)
        except RuntimeError as e:  # missing / unexpected keys: the checkpoint of another model
            raise UserError(
                f"{self.path / 'model.safetensors'}: does not fit this student ({e}); resume with the student the "
                "run started with"
            ) from None
        except Exception as e:  # a damaged file
            raise _damaged(self.path / "model.safetensors", e) from None


def rng_state() -> dict[str, Any]:
    """Global RNG states: python and numpy as JSON, torch and CUDA as tensors (under ``tensors``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return {"json": state, "tensors": tensors}


def set_rng_state(json_state: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_checkpoint(
    out: str | os.PathLike, step: int, *, model: torch.nn.Module, tensors: dict[str, Any], state: dict[str, Any]
) -> Path:
    """Write a complete checkpoint for ``step`` atomically and drop the older ones.

    Args:
        out: the run's output directory.
        step: optimiser steps completed.
        model: the student (saved with safetensors).
        tensors: torch objects (optimiser state dict, RNG tensors): tensors, numbers, strings, lists, dicts.
        state: JSON-serialisable state (config, sampler, cursors, ...); ``step`` is added.

    Returns:
        The checkpoint's directory.
    """
    from safetensors.torch import save_model

    root = Path(out) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # a save that crashed earlier
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{_PREFIX}{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{step:08d}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(tensors, tmp / "tensors.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1, allow_nan=True), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_json_atomic(root / LATEST, {"checkpoint": name})
    for old in root.glob(f"{_PREFIX}*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out`` (None when there is none)."""
    root = Path(out) / CHECKPOINT_DIR
    try:
        name = json.loads((root / LATEST).read_text(encoding="utf-8"))["checkpoint"]
        if (root / name / "state.json").is_file():
            return root / name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # `latest` missing or stale (a crash between the rename and the pointer update): the highest complete step.
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory (tensors with ``weights_only=True``); a damaged file is a :class:`UserError`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _damaged(path / "state.json", e) from None
    try:
        tensors = torch.load(path / "tensors.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError: the file asks to build arbitrary Python objects
        if type(e).__name__ != "UnpicklingError":
            raise _damaged(path / "tensors.pt", e) from None
        raise UserError(
            f"{path / 'tensors.pt'}: holds objects other than tensors and plain data, so it was not written by "
            "ddk-offline; refusing to unpickle it. Restore the checkpoint, or start the run again without --resume"
        ) from None
    try:  # the header and the tensor extents, before minutes of set-up: a truncated file fails here
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise _damaged(path / "model.safetensors", e) from None
    return Checkpoint(path=path, state=state, tensors=tensors)


def _damaged(file: Path, exc: BaseException) -> UserError:
    return UserError(
        f"{file}: damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}), so this "
        "checkpoint cannot be resumed (ddk-offline writes checkpoints atomically: the file was changed or truncated "
        "afterwards). Restore it from a copy, or start a new run with another --out"
    )
