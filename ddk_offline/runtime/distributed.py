"""torch.distributed plumbing shared by ``dump-teacher`` and ``distill`` under ``torchrun``.

Nothing here is a scheduler of its own: ``torchrun`` (or Slurm's ``srun`` + ``torchrun``) starts the processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` joins the process
group those variables describe (gloo on CPU, NCCL on CUDA). Without them, or with ``WORLD_SIZE=1``, every helper is
a no-op and the caller runs as a single process, so the same code path serves both.

The helpers exchange small Python objects and float64 arrays only (manifest dicts, per-domain loss sums); model
gradients go through :class:`torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#: How long a rank may wait in a collective. Dump ranks that finish their shards early wait at the final barrier
#: for the slowest one, and a distill rank waits while rank 0 evaluates or saves: far longer than the 10-30 minute
#: defaults of NCCL / gloo. A rank that dies is noticed by torchrun, which stops the others at once.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node.

    Attributes:
        rank: global rank (0 is the one that writes manifests, checkpoints and logs).
        world: number of processes (1 without torchrun).
        local_rank: rank on this node (selects the GPU).
        owner: True when :func:`setup` created the process group (and :func:`teardown` should destroy it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owner: bool = False

    @property
    def active(self) -> bool:
        """True with more than one process (collectives are needed)."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> int:
    """``WORLD_SIZE`` from the environment (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """``RANK`` from the environment (0 when not under torchrun): lets the CLI quiet non-zero ranks early."""
    return int(os.environ.get("RANK", "0") or 0)


def setup(device_type: str = "cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistEnv:
    """Join the process group described by torchrun's environment variables (no-op for a single process).

    Args:
        device_type: ``cpu`` (gloo) or ``cuda`` (NCCL).
        timeout: collective timeout (see :data:`DEFAULT_TIMEOUT`).

    Returns:
        The :class:`DistEnv`. A group initialised by the caller beforehand is used as is (and not destroyed).
    """
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owner=False)
    world = env_world()
    if world <= 1:
        return DistEnv()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, owner=True)


def teardown(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if env.owner and dist.is_initialized():
        # Objects still holding the group (a DDP reducer in a reference cycle) would otherwise be freed during
        # interpreter shutdown, where gloo's threads can abort the process after all the work is done.
        gc.collect()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def broadcast_object(env: DistEnv, obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects only)."""
    if not env.active:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(env: DistEnv, array: np.ndarray) -> np.ndarray:
    """Element-wise sum of a float64 array over all ranks (a new array; the input is unchanged).

    float64 on purpose: per-domain CE and NLL sums over millions of positions lose digits in float32, and every rank
    must derive bit-identical sampler weights from the result.
    """
    arr = np.asarray(array, np.float64)
    if not env.active:
        return arr.copy()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.from_numpy(arr.copy()).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def shard_of(items: list[Any], env: DistEnv) -> list[Any]:
    """This rank's work items: every ``world``-th item starting at ``rank`` (disjoint, together complete)."""
    return items[env.rank :: env.world]


# --- distill: DDP and the per-domain sums -----------------------------------------------------------------
def wrap_ddp(module: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks, else ``module`` itself."""
    if not env.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=device.index if ids else None)


def no_sync(model: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but a step's last (gradients accumulate locally)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def reduce_window(env: DistEnv, window: Any) -> None:
    """Sum a :class:`ddk_offline.runlog.Window`'s loss sums, counts and per-domain stats over ranks, in place.

    Seconds stay local (they are wall time, not a sum).
    """
    if not env.active:
        return
    head = [window.loss_sum, window.ce_sum, window.kl_sum, window.positions, window.tokens]
    flat = all_reduce_sum(env, np.concatenate([np.asarray(head, np.float64), window.stats.as_array().ravel()]))
    window.loss_sum, window.ce_sum, window.kl_sum = (float(x) for x in flat[:3])
    window.positions, window.tokens = int(flat[3]), int(flat[4])
    window.stats.load_array(flat[5:].reshape(3, -1))


def reduced_copy(env: DistEnv, stats: Any) -> Any:
    """A copy of a ``GapStats`` or ``Window`` holding the sums over all ranks (the original is unchanged)."""
    if not env.active:
        return stats
    twin = copy.deepcopy(stats)
    if hasattr(twin, "as_array"):  # GapStats
        twin.load_array(all_reduce_sum(env, twin.as_array()))
    else:
        reduce_window(env, twin)
    return twin
