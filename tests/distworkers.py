"""Helpers for multi-process tests: a free port, torchrun command lines, and worker functions for
torch.multiprocessing.spawn (they must live in an importable module, not in a test file)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m ddk_offline ARGS`` with this interpreter's torchrun."""
    exe = Path(sys.executable).with_name("torchrun")
    head = [str(exe)] if exe.is_file() else ([shutil.which("torchrun")] if shutil.which("torchrun") else None)
    if head is None:  # the same entry point as a module
        head = [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", "--nproc_per_node", str(nproc), "-m", "ddk_offline", *args]


def env(extra: dict | None = None) -> dict:
    """Environment for subprocesses: this checkout's sources first, one thread per process."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra or {})
    return e


def _as_rank(rank: int, world: int, port: int) -> None:
    """Set the variables torchrun would set, so the library joins the group exactly as under torchrun."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import torch

    torch.set_num_threads(1)


def dump_rank_dies(rank: int, world: int, port: int, config, die_on_rank: int) -> None:
    """Run a dump as ``rank``; rank ``die_on_rank`` dies abruptly (no cleanup) right after its first shard."""
    _as_rank(rank, world, port)
    from ddk_offline.dump import run_dump

    def die(domain, split, index, info):
        if rank == die_on_rank:
            os._exit(17)

    run_dump(config, after_shard=die)


def distill_rank(rank: int, world: int, port: int, config, stop_after: int | None) -> None:
    """Run ``distill(config)`` as ``rank``; with ``stop_after`` the process ends abruptly after that many steps."""
    _as_rank(rank, world, port)
    from ddk_offline.distillation.trainer import Trainer, distill
    from ddk_offline.runtime import distributed

    if stop_after is None:
        distill(config)
        return
    run = Trainer(config, distributed.setup("cpu"))
    for _ in range(stop_after):
        run.train_step()
    os._exit(0)  # like a kill: no final save, no teardown
