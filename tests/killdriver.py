"""Run a dump or a distill in this process and SIGKILL it at a chosen point (used by tests/test_kills.py).

    python tests/killdriver.py '{"job": "dump"|"distill", "point": NAME, "n": N, "config": {...}}'

The point is a place inside the library (patched here, never in the library itself); the process kills itself
with SIGKILL on the N-th time it gets there, so no ``finally`` block, ``atexit`` hook or writer thread runs:
exactly what a power cut or the OOM killer does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _countdown(n: int):
    left = [n]

    def hit() -> bool:
        left[0] -= 1
        return left[0] == 0

    return hit


def _wrap(owner, name: str, hit, *, before: bool, when=lambda *a, **k: True) -> None:
    """Replace ``owner.name`` so the process dies before (or right after) the N-th call that matches ``when``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        due = when(*args, **kwargs) and hit()
        if due and before:
            _die()
        result = original(*args, **kwargs)
        if due:
            _die()
        return result

    setattr(owner, name, wrapper)


def dump_points(point: str, n: int, config) -> dict:
    """Install a dump kill point; returns extra ``run_dump`` keyword arguments."""
    import ddk_offline.format.storage as storage
    import ddk_offline.format.writer as writer
    import ddk_offline.runtime.files as files
    from ddk_offline.dump.teachers import open_teacher

    hit = _countdown(n)
    if point == "forward":  # inside the N-th teacher forward: earlier rows of the shard are only in memory
        teacher = open_teacher(config.teacher_backend, config.teacher, gguf_file=config.gguf_file)
        _wrap(teacher, "targets", hit, before=True)  # the backend is handed to run_dump, not patched in the library
        return {"teacher": teacher}
    elif point == "shard-written":  # the N-th shard is complete in .tmp/, not yet renamed
        _wrap(writer, "sha256_file", hit, before=False)
    elif point == "shard-renamed":  # the N-th shard has its final name but is not yet in the manifest
        _wrap(storage, "fsync_dir", hit, before=True, when=lambda folder: Path(folder).name in ("train", "val"))
    elif point == "manifest-tmp":  # the N-th manifest write is in its temp file, not yet renamed (N = 1: the first)
        _wrap(files.os, "replace", hit, before=True, when=lambda src, dst: str(dst).endswith("manifest.json"))
    elif point == "after-shard":  # the N-th shard is durable and listed
        return {"after_shard": lambda *a: hit() and _die()}
    else:
        raise SystemExit(f"unknown dump kill point {point!r}")
    return {}


def distill_points(point: str, n: int) -> None:
    """Install a kill point inside the N-th checkpoint save."""
    import ddk_offline.distillation.checkpoint as ckpt

    hit = _countdown(n)
    if point == "save-weights-written":  # model.safetensors written in .tmp-step-*, tensors.pt not yet
        _wrap(ckpt.torch, "save", hit, before=True)
    elif point == "save-before-rename":  # every file of the save is durable in .tmp-step-*, not renamed
        _wrap(ckpt, "fsync_dir", hit, before=False, when=lambda d: d.name.startswith(".tmp-step-"))
    elif point == "save-before-latest":  # step-* renamed into place, `latest` still names the previous one
        _wrap(ckpt, "write_json_atomic", hit, before=True)
    elif point == "save-before-cleanup":  # `latest` names the new one, the previous one is not yet removed
        _wrap(ckpt.shutil, "rmtree", hit, before=True, when=lambda p, **k: os.path.basename(p).startswith("step-"))
    else:
        raise SystemExit(f"unknown distill kill point {point!r}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["job"] == "dump":
        from ddk_offline.dump import DumpConfig, run_dump

        cfg = spec["config"]
        cfg["extra_temperatures"] = tuple(cfg.get("extra_temperatures", ()))
        config = DumpConfig(**cfg)
        run_dump(config, **dump_points(spec["point"], spec["n"], config))
    else:
        from ddk_offline.distillation.config import DistillConfig
        from ddk_offline.distillation.trainer import distill

        distill_points(spec["point"], spec["n"])
        distill(DistillConfig(**spec["config"]))
    print("finished without reaching the kill point")


if __name__ == "__main__":
    main()
