"""The top-k codec in worker processes: decode rows for training and evaluation, encode sequences for a dump.

The codec is pure Python and numpy, bound to one core by the GIL (docs/CODEC.md gives its per-core throughput), so a
fast GPU needs several processes to keep it fed. A pool here runs the same functions as the in-process path on the
same inputs, so its results are bit-identical whatever the number of workers; only the wall time changes. Results
come back in the order they were asked for (futures), never in completion order.

Processes are started with ``fork`` on Linux (what ``torch.utils.data.DataLoader`` does; a worker touches only
numpy, pyarrow and zstandard) and ``spawn`` elsewhere. A worker that dies (the OOM killer, a signal) surfaces as a
:class:`WorkerDiedError` naming what to do, never as a hang.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from ddk_offline.errors import UserError
from ddk_offline.format import hidden_codec
from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import Manifest
from ddk_offline.format.reader import DumpReader
from ddk_offline.format.storage import Storage

#: Upper bound of the automatic worker count: beyond it the pipe transfers, not the decode, limit the gain.
MAX_AUTO_WORKERS = 8


class WorkerDiedError(UserError):
    """A codec worker process died; the message says what was lost (nothing durable) and how to go on."""


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_workers(reserved: int = 2) -> int:
    """Worker processes that use the spare cores of this process's share of the machine.

    Under torchrun every rank of the node asks this, so the node's cores are divided by ``LOCAL_WORLD_SIZE``; each
    rank keeps ``reserved`` cores for itself (its main thread and its prefetch thread). 0 means: decode in-thread.
    """
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_AUTO_WORKERS, usable_cores() // ranks - reserved))


def _context():
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _died(what: str, exc: BaseException) -> WorkerDiedError:
    return WorkerDiedError(
        f"a {what} worker process died ({type(exc).__name__}: {exc}); nothing half-written was kept. This is usually "
        f"the out-of-memory killer: rerun the same command (with --resume for distill) and fewer workers"
    )


def _die_with_parent(parent: int) -> None:
    """In a worker: exit as soon as the parent process is gone (a ``kill -9`` of the run leaves no orphans behind).

    Forked workers hold both ends of the pool's pipes, so they would otherwise wait for work forever. A polling
    thread, not ``PR_SET_PDEATHSIG``: that signal fires when the *thread* that forked exits, and pools are grown
    from whichever thread submits first.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="ddk-parent-watch", daemon=True).start()


class _CodecPool:
    """One function in ``workers`` processes, or in the caller's thread when ``workers`` is 0, with the same results.

    Futures come back in the order they were asked for; a dead worker becomes a :class:`WorkerDiedError`.
    """

    what = ""  # names the worker in WorkerDiedError ("data", "encode")

    def __init__(self, workers: int, initializer, initargs: tuple):
        self.workers = int(workers)
        self._pool = None
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=_context(), initializer=initializer, initargs=initargs
            )

    def _submit(self, here, there, *args) -> Future:
        """``here(*args)`` now (no workers), or ``there(*args)`` in a worker."""
        if self._pool is None:
            done: Future = Future()
            done.set_result(here(*args))
            return done
        try:
            return self._pool.submit(there, *args)
        except BrokenProcessPool as e:
            raise _died(self.what, e) from None

    def result(self, future: Future):
        """The future's value; a dead worker becomes a :class:`WorkerDiedError`."""
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise _died(self.what, e) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --- decoding (phase two) ---------------------------------------------------------------------------------------
_READER: DumpReader | None = None


def _init_reader(parent: int, location: str, manifest: dict[str, Any]) -> None:
    global _READER
    _die_with_parent(parent)
    # The parent checked every shard's sha256 before asking for its rows: the workers do not hash again.
    _READER = DumpReader(Storage(location), Manifest.from_dict(manifest), verify_checksums=False)


def _read_rows(
    domain: str, split: str, shard: int, rows: list[int], decode_topk: bool, hidden: bool
) -> dict[str, np.ndarray]:
    return _READER.read_rows(domain, split, shard, rows, decode_topk=decode_topk, hidden=hidden)


class RowDecoder(_CodecPool):
    """``read_rows`` of one dump, in ``workers`` processes (0: in this thread, the same results).

    Args:
        reader: the parent's reader; it checks each shard's sha256 once before any of its rows is asked for.
        workers: worker processes (0 decodes synchronously in the caller's thread).
    """

    what = "data"

    def __init__(self, reader: DumpReader, workers: int):
        self.reader = reader
        location = str(reader.store.local) if reader.store.local is not None else reader.store.url
        super().__init__(workers, _init_reader, (os.getpid(), location, reader.manifest.to_dict()))

    def submit(
        self,
        domain: str,
        split: str,
        shard: int,
        rows: Sequence[int],
        *,
        decode_topk: bool = True,
        hidden: bool = False,
    ) -> Future:
        """A future of ``reader.read_rows(domain, split, shard, rows, ...)`` (stacked arrays in the order of ``rows``;
        ``hidden``: with the decoded ``teacher_hidden`` [B, L, D])."""
        rows = [int(r) for r in rows]
        if self.workers > 0:
            self.reader.check_shard(domain, split, shard)  # the workers do not hash again
        return self._submit(self._read_here, _read_rows, domain, split, shard, rows, decode_topk, hidden)

    def _read_here(self, domain: str, split: str, shard: int, rows: list[int], decode_topk: bool, hidden: bool):
        return self.reader.read_rows(domain, split, shard, rows, decode_topk=decode_topk, hidden=hidden)


# --- encoding (phase one) ---------------------------------------------------------------------------------------
_CODEC: TopKCodec | None = None


def _init_codec(parent: int, description: dict[str, Any], vocab_size: int, k: int) -> None:
    global _CODEC
    _die_with_parent(parent)
    _CODEC = TopKCodec.from_description(description, vocab_size=vocab_size, k=k)


def _encode(ids: np.ndarray, logits: np.ndarray, lse: np.ndarray, input_ids: np.ndarray) -> bytes:
    return _CODEC.encode(ids, logits, lse, input_ids)


class BlobEncoder(_CodecPool):
    """``codec.encode`` in ``workers`` processes (0: in this thread, the same bytes).

    Args:
        codec: the dump's codec (the workers rebuild it from its description, vocabulary size and k).
        workers: worker processes.
    """

    what = "encode"

    def __init__(self, codec: TopKCodec, *, workers: int):
        self.codec = codec
        super().__init__(workers, _init_codec, (os.getpid(), codec.describe(), codec.vocab_size, codec.k))

    def submit(self, ids: np.ndarray, logits: np.ndarray, lse: np.ndarray, input_ids: np.ndarray) -> Future:
        """A future of the sequence's blob."""
        return self._submit(self.codec.encode, _encode, ids, logits, lse, input_ids)

    def submit_hidden(self, hidden: np.ndarray, encoding: str) -> Future:
        """A future of the blob of one row's hidden states [L, D] (:func:`ddk_offline.format.hidden_codec.encode`)."""
        return self._submit(hidden_codec.encode, hidden_codec.encode, hidden, encoding)
