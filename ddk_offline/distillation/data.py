"""Phase-two data: one shuffled stream per domain over a dump's train shards, and a prefetching batch builder.

Two halves with a strict split of duties, so that prefetching can never change what a run sees:

- :class:`DomainStream` (main thread, no I/O) decides the order of a domain's sequences. Epoch ``e`` of domain
  ``d`` is a pure function of ``(seed, d, e)``: the shard row groups ("units", ``UNIT_ROWS`` rows each) are put in
  a random order, consecutive units are grouped into windows of ``window_units``, and the rows inside each window
  are permuted. A stream's whole state is its cursor ``(epoch, pos)``; when a domain runs out it starts epoch
  ``e + 1`` with a fresh order. Windows (instead of one global permutation) keep reads local: a window's row
  groups are decoded once and served from memory, and a batch never pays a Parquet read per sample.
- :class:`BatchLoader` turns the sampler's per-sample domain draws into a *plan* (which shard row each sample
  gets; advancing the cursors happens here, on the caller's thread) and builds the tensors of a plan on one
  background thread. Plans are built in submission order and a build is a pure function of its plan, so the
  batches, the cursors and a checkpoint taken between steps do not depend on thread timing.

Memory: the builder keeps the decoded row groups of the current window per domain: ``window_units * UNIT_ROWS``
rows of ``L * (k * 12 + 12)`` bytes (e.g. 128 rows x 1.5 MB at L = 2048, k = 64).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ddk_offline.format.reader import DumpReader
from ddk_offline.format.schema import (
    INPUT_IDS,
    ROW_GROUP_ROWS,
    TEACHER_LSE,
    TEACHER_NLL,
    TOPK_IDS,
    TOPK_LOGITS,
    lse_column,
)
from ddk_offline.format.workers import RowDecoder

#: Rows per shuffle unit: one Parquet row group, so a unit is one contiguous read.
UNIT_ROWS = ROW_GROUP_ROWS
#: Units per shuffle window (rows are permuted across a window; more mixes better, costs memory).
WINDOW_UNITS = 4
IGNORE_INDEX = -100


class DomainStream:
    """The shuffled, endlessly repeating order of one domain's train sequences. Index arithmetic only.

    Args:
        shard_rows: rows of each train shard of the domain, in manifest order.
        seed: the run's data seed.
        domain_index: the domain's position in the sorted domain list (part of the shuffle seed).
        window_units: units per shuffle window.
    """

    def __init__(self, shard_rows: Sequence[int], *, seed: int, domain_index: int, window_units: int = WINDOW_UNITS):
        self.shard_rows = [int(r) for r in shard_rows]
        self.seed, self.domain_index, self.window_units = int(seed), int(domain_index), int(window_units)
        self.size = sum(self.shard_rows)
        self.epoch, self.pos = 0, 0
        self._order_epoch: int | None = None
        self._order = np.empty((0, 2), np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sequence order [size, 2] of (shard, row) pairs."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.domain_index, epoch])
            units = [
                (s, start, min(start + UNIT_ROWS, n))
                for s, n in enumerate(self.shard_rows)
                for start in range(0, n, UNIT_ROWS)
            ]
            units = [units[i] for i in rng.permutation(len(units))]
            parts = []
            for w in range(0, len(units), self.window_units):
                rows = np.concatenate(
                    [np.stack([np.full(b - a, s), np.arange(a, b)], 1) for s, a, b in units[w : w + self.window_units]]
                )
                parts.append(rows[rng.permutation(len(rows))])
            self._order = np.concatenate(parts).astype(np.int64) if parts else np.empty((0, 2), np.int64)
            self._order_epoch = epoch
        return self._order

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` (shard, row) pairs [n, 2]; advances the cursor, starting a new epoch when one runs out."""
        if self.size == 0:
            raise ValueError(f"domain #{self.domain_index} has no train sequences; it cannot be sampled")
        out = []
        while n > 0:
            order = self.order(self.epoch)
            got = order[self.pos : self.pos + n]
            out.append(got)
            n -= len(got)
            self.pos += len(got)
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(out) if out else np.empty((0, 2), np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(
                f"checkpoint data cursor: domain #{self.domain_index} had {state['size']} train sequences, the dump "
                f"now has {self.size}; resume with the dump the run started with"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


@dataclass
class Batch:
    """One micro-batch of B sequences of L tokens (CPU tensors unless moved with :meth:`to`).

    Attributes:
        input_ids: [B, L] int64.
        labels: [B, L] int64, ``input_ids`` shifted left; ``IGNORE_INDEX`` at the last position and, in a BOS
            dump, where the next token is the BOS (nothing learns to predict it).
        topk_ids: [B, L, k] int64 teacher top-k ids (None when the run needs no KL).
        topk_logits: [B, L, k] float32 raw teacher logits at T = 1 (None when the run needs no KL).
        teacher_lse: [B, L] float32 logsumexp of the teacher's logits at the run's temperature (the T = 1 column,
            or the dumped extra-T column when the run's T was dumped).
        teacher_nll: [B, L] float32 teacher loss on the label, 0 where the label is ignored.
        domain: [B] int64 domain index of each sequence.
        student: in a cross-tokenizer run, the student's rows of the same bytes and the position pairs
            (:class:`~ddk_offline.distillation.crosstok.batch.StudentBatch`); None otherwise.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    topk_ids: torch.Tensor | None
    topk_logits: torch.Tensor | None
    teacher_lse: torch.Tensor
    teacher_nll: torch.Tensor
    domain: torch.Tensor
    student: Any = None

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if v is not None else None)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

    @property
    def labelled(self) -> int:
        """Positions that carry a label (and count in the loss): the student's in a cross-tokenizer batch."""
        return self.student.labelled if self.student is not None else int((self.labels != IGNORE_INDEX).sum())


def collate(
    rows: dict[str, np.ndarray], domain: np.ndarray, *, lse_key: str, with_topk: bool, bos_id: int | None = None
) -> Batch:
    """Stacked reader arrays ([B, L], [B, L, k]) -> a :class:`Batch` with shifted labels.

    ``bos_id`` is the dump's ``manifest.bos_token_id``: labels equal to it are masked, the positions where the dump
    stored no teacher loss (the student's CE and the teacher's NLL always cover the same positions).
    """
    ids = np.ascontiguousarray(rows[INPUT_IDS], dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    if bos_id is not None:
        labels[labels == bos_id] = IGNORE_INDEX
    nll = np.where(labels != IGNORE_INDEX, rows[TEACHER_NLL], 0.0).astype(np.float32)
    topk = (
        (
            torch.from_numpy(np.ascontiguousarray(rows[TOPK_IDS])),
            torch.from_numpy(np.ascontiguousarray(rows[TOPK_LOGITS], dtype=np.float32)),
        )
        if with_topk
        else (None, None)
    )
    return Batch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        topk_ids=topk[0],
        topk_logits=topk[1],
        teacher_lse=torch.from_numpy(np.ascontiguousarray(rows[lse_key], dtype=np.float32)),
        teacher_nll=torch.from_numpy(nll),
        domain=torch.from_numpy(np.asarray(domain, np.int64)),
    )


def lse_key_for(reader: DumpReader, temperature: float) -> str:
    """The reader column holding the teacher lse at ``temperature`` (falls back to T = 1 when it was not dumped)."""
    if float(temperature) != 1.0 and float(temperature) in [float(t) for t in reader.manifest.temperatures]:
        return lse_column(float(temperature))
    return TEACHER_LSE


class BatchLoader:
    """Per-domain streams plus a one-thread builder that prepares the next batches while the model trains.

    Args:
        reader: the dump (the builder thread opens its own reader on the same path: pyarrow file handles are
            not shared across threads).
        seed: data seed (shuffle orders).
        temperature: the run's KD temperature (selects the lse column).
        with_topk: build the top-k tensors (False for CE-only runs).
        prefetch: build on a background thread (False: build on the caller's thread, same results).
        pin_memory: pin the host tensors (for asynchronous copies to a GPU).
        window_units: shuffle window, see :class:`DomainStream`.
        part: ``(rank, world)``: plans are global (every rank plans the whole step, so cursors and checkpoints are
            identical on all ranks) and this loader builds only its contiguous ``1 / world`` of each plan's rows.
        workers: decode in this many worker processes (0: on the builder thread). Each submitted plan's rows are
            asked for at once, grouped by shard, so the workers decode the next batches while the model trains; the
            batches are bit-identical for every value (the same rows through the same decoder).
    """

    def __init__(
        self,
        reader: DumpReader,
        *,
        seed: int,
        temperature: float = 1.0,
        with_topk: bool = True,
        prefetch: bool = True,
        pin_memory: bool = False,
        window_units: int = WINDOW_UNITS,
        part: tuple[int, int] = (0, 1),
        workers: int = 0,
    ):
        self.domains = reader.domains
        self.rank, self.world = int(part[0]), int(part[1])
        self.streams = [
            DomainStream(
                [s.rows for s in reader.shards(d, "train")], seed=seed, domain_index=i, window_units=window_units
            )
            for i, d in enumerate(self.domains)
        ]
        self.lse_key = lse_key_for(reader, temperature)
        self.bos_id = reader.manifest.bos_token_id
        self.with_topk, self.pin_memory = with_topk, pin_memory
        self._open: Callable[[], DumpReader] = lambda: DumpReader(reader.store, reader.manifest)
        self._worker_reader: DumpReader | None = None
        self._cache: list[OrderedDict] = [OrderedDict() for _ in self.domains]
        self._capacity = window_units + 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ddk-data") if prefetch else None
        self._pending: deque[tuple[np.ndarray, Future | Batch]] = deque()
        self._lock = threading.Lock()
        self._rows = RowDecoder(reader, workers) if workers > 0 else None
        #: cross-tokenizer runs: ``plan [B, 3] -> StudentBatch`` of the same rows, attached to each batch built
        self.student_rows: Callable[[np.ndarray], Any] | None = None

    # --- planning (caller's thread) -------------------------------------------------------------
    def plan(self, domain_idx: np.ndarray) -> np.ndarray:
        """Assign each drawn sample its next sequence: [B] domain indices -> plan [B, 3] (domain, shard, row)."""
        domain_idx = np.asarray(domain_idx, np.int64)
        plan = np.empty((len(domain_idx), 3), np.int64)
        plan[:, 0] = domain_idx
        for d in np.unique(domain_idx):
            where = np.flatnonzero(domain_idx == d)
            try:
                plan[where, 1:] = self.streams[d].take(len(where))
            except ValueError:
                raise ValueError(
                    f"domain {self.domains[d]!r} has no train sequences in the dump; give it weight 0 "
                    "(--sampler fixed:...) or re-dump with data for it"
                ) from None
        return plan

    def submit(self, plan: np.ndarray) -> None:
        """Queue a plan for building (in order); with ``part`` set, only this rank's rows of it are built."""
        local = np.array_split(plan, self.world)[self.rank] if self.world > 1 else plan
        build, args = (self._build, (local,)) if self._rows is None else (self._assemble, (local, self._ask(local)))
        job = self._pool.submit(build, *args) if self._pool is not None else build(*args)
        self._pending.append((plan, job))

    def next(self) -> Batch:
        """The batch of the oldest submitted plan (waits for the builder if needed)."""
        if not self._pending:
            raise RuntimeError("BatchLoader.next() without a submitted plan")
        _, job = self._pending.popleft()
        return job.result() if isinstance(job, Future) else job

    def pending_plans(self) -> list[np.ndarray]:
        """Plans submitted but not yet taken: part of a checkpoint, so a resume rebuilds exactly those batches."""
        return [p for p, _ in self._pending]

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "streams": [s.state_dict() for s in self.streams],
            "pending": [p.tolist() for p in self.pending_plans()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore cursors and re-submit the plans that were in flight when the state was saved."""
        if list(state["domains"]) != self.domains:
            raise ValueError(f"checkpoint data state has domains {state['domains']}, the dump has {self.domains}")
        for stream, s in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(s)
        self.drop_pending()
        for p in state["pending"]:
            self.submit(np.asarray(p, np.int64).reshape(-1, 3))

    def drop_pending(self) -> None:
        while self._pending:
            _, job = self._pending.popleft()
            if isinstance(job, Future):
                job.cancel()

    def close(self) -> None:
        self.drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._rows is not None:
            self._rows.close()

    # --- building (builder thread) --------------------------------------------------------------
    def _unit(self, d: int, shard: int, unit: int) -> dict[str, np.ndarray]:
        cache = self._cache[d]
        key = (shard, unit)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        if self._worker_reader is None:
            self._worker_reader = self._open()
        rows = self.streams[d].shard_rows[shard]
        start = unit * UNIT_ROWS
        span = range(start, min(start + UNIT_ROWS, rows))
        data = self._worker_reader.read_rows(self.domains[d], "train", shard, span, decode_topk=self.with_topk)
        cache[key] = data
        while len(cache) > self._capacity:
            cache.popitem(last=False)
        return data

    def _keys(self) -> list[str]:
        return [INPUT_IDS, TEACHER_NLL, self.lse_key] + ([TOPK_IDS, TOPK_LOGITS] if self.with_topk else [])

    def _build(self, plan: np.ndarray) -> Batch:
        with self._lock:  # one builder at a time, whether threaded or not
            out: dict[str, list[np.ndarray]] = {k: [] for k in self._keys()}
            for d, shard, row in plan:
                data = self._unit(int(d), int(shard), int(row) // UNIT_ROWS)
                for k in out:
                    out[k].append(data[k][int(row) % UNIT_ROWS])
            return self._finish({k: np.stack(v) for k, v in out.items()}, plan)

    def _ask(self, plan: np.ndarray) -> list[tuple[np.ndarray, Future]]:
        """Ask the worker processes for the plan's rows, one request per (domain, shard): (plan positions, future)."""
        jobs = []
        for d, shard in sorted({(int(d), int(s)) for d, s, _ in plan}):
            where = np.flatnonzero((plan[:, 0] == d) & (plan[:, 1] == shard))
            rows = plan[where, 2].tolist()
            jobs.append((where, self._rows.submit(self.domains[d], "train", shard, rows, decode_topk=self.with_topk)))
        return jobs

    def _assemble(self, plan: np.ndarray, jobs: list[tuple[np.ndarray, Future]]) -> Batch:
        """The batch of a plan whose rows the workers decode: each row lands at its position in the plan."""
        out: dict[str, np.ndarray] = {}
        for where, future in jobs:
            data = self._rows.result(future)
            for k in self._keys():
                if k not in out:
                    out[k] = np.empty((len(plan), *data[k].shape[1:]), data[k].dtype)
                out[k][where] = data[k]
        return self._finish(out, plan)

    def _finish(self, stacked: dict[str, np.ndarray], plan: np.ndarray) -> Batch:
        batch = collate(stacked, plan[:, 0], lse_key=self.lse_key, with_topk=self.with_topk, bos_id=self.bos_id)
        if self.student_rows is not None:
            batch.student = self.student_rows(plan)
        if self.pin_memory:
            batch = Batch(
                **{
                    f.name: (v.pin_memory() if v is not None else None)
                    for f in fields(batch)
                    for v in [getattr(batch, f.name)]
                }
            )
        return batch
