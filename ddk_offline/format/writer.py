"""The shard writer: a context manager with a bounded queue and one writer thread.

The dump's main thread only runs the teacher; encoding (the top-k codec), Parquet/zstd compression,
hashing and the manifest update happen on the writer thread, so they overlap the next teacher forward.
Every shard is written under a temporary name, fsynced and renamed: a crash never leaves a half shard
under a final name. A (domain, split) stream's shard ``j`` always holds sequences
``[j * rows_per_shard, (j + 1) * rows_per_shard)``, so a resumed dump rewrites exactly the same files.
On a remote filesystem (an fsspec URL) the shard is built in a local temp folder and uploaded in one call.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import ShardInfo
from ddk_offline.format.schema import (
    FORMAT_VERSION,
    INPUT_IDS,
    ROW_GROUP_ROWS,
    SEQ_INDEX,
    TEACHER_HIDDEN,
    TEACHER_LSE,
    TEACHER_NLL,
    TOPK_BLOB,
    float_columns,
    lse_column,
    shard_schema,
)
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.format.workers import BlobEncoder
from ddk_offline.runtime.files import sha256_file


@dataclass
class SequenceRecord:
    """The teacher's outputs for one packed sequence of L tokens.

    Attributes:
        domain, split: the stream the sequence belongs to.
        seq_index: index of the sequence within its stream (consecutive from 0).
        input_ids: [L] token ids.
        topk_ids: [L, k] teacher top-k ids.
        topk_logits: [L, k] float32 raw teacher logits at those ids.
        teacher_lse: [L] float32 logsumexp of the full logit row.
        teacher_nll: [L] float32 loss on the next token, NaN where there is no target (the last position; in a
            BOS dump, positions whose next token is the BOS).
        extra_lse: {T: [L] float32 logsumexp(logits / T)} for extra temperatures.
        hidden: [L, D] float32 last hidden state of the teacher (only in a dump with hidden states).
    """

    domain: str
    split: str
    seq_index: int
    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray
    teacher_lse: np.ndarray
    teacher_nll: np.ndarray
    extra_lse: dict[float, np.ndarray] = field(default_factory=dict)
    hidden: np.ndarray | None = None


_NONE = np.empty((0, 0), np.int64)


def shard_relpath(domain_dir: str, split: str, index: int) -> str:
    return f"{domain_dir}/{split}/shard-{index:05d}.parquet"


OnShard = Callable[[str, str, int, ShardInfo], None]


class ShardWriter:
    """Writes shards in the background. Use as a context manager; ``put`` records in stream order.

    Args:
        root: the dump directory (a local path, an fsspec URL or a :class:`Storage`).
        codec: encodes each sequence's top-k.
        rows_per_shard: sequences per shard (the last shard of a stream may hold fewer).
        domain_dirs: domain name -> folder name inside the dump.
        on_shard: called on the writer thread after a shard is durable, with
            ``(domain, split, shard_index, info)``; the dump updates its manifest there.
        extra_temperatures: temperatures with an extra lse column.
        format_version: the dump's format version (written into each shard's schema metadata).
        queue_size: records in flight; bounds memory and back-pressures the teacher.
        encode_workers: processes that run the codec (0: the writer thread itself). Shards are byte-identical
            for every value: each blob is the same function of the same record, and rows keep their order.
        hidden_encoding: write each record's ``hidden`` [L, D] in the ``teacher_hidden`` column with this encoding
            of :mod:`ddk_offline.format.hidden_codec` (None: no such column).
    """

    def __init__(
        self,
        root: Path | str | Storage,
        *,
        codec: TopKCodec,
        rows_per_shard: int,
        domain_dirs: dict[str, str],
        on_shard: OnShard,
        extra_temperatures: tuple[float, ...] = (),
        format_version: int = FORMAT_VERSION,
        queue_size: int = 64,
        compression_level: int = 9,
        encode_workers: int = 0,
        hidden_encoding: str | None = None,
    ):
        self.store = as_storage(root)
        self.codec = codec
        self.rows_per_shard = rows_per_shard
        self.domain_dirs = domain_dirs
        self.on_shard = on_shard
        self.extra_temperatures = tuple(extra_temperatures)
        self.compression_level = compression_level
        self.hidden_encoding = hidden_encoding
        self._schema = shard_schema(self.extra_temperatures, format_version, hidden=hidden_encoding is not None)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._buffers: dict[tuple[str, str], list[tuple[SequenceRecord, Future, Future | None]]] = {}
        self._error: BaseException | None = None
        self._encoder = BlobEncoder(codec, workers=encode_workers)
        # Blobs being encoded, oldest first: at most a few per worker, so the records waiting in the pool stay few.
        self._in_flight: deque = deque()
        self._max_in_flight = 4 * max(1, encode_workers)
        self._thread = threading.Thread(target=self._run, name="ddk-shard-writer", daemon=True)

    # --- main-thread API -----------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        self._scratch = self.store.scratch()
        self._thread.start()
        return self

    def put(self, record: SequenceRecord) -> None:
        """Queue one sequence (blocks when the queue is full); re-raises a writer-thread failure.

        A stream's shard is written when its last row arrives (``seq_index + 1`` a multiple of ``rows_per_shard``),
        at :meth:`end_stream`, or, for rows still buffered, when the context exits without error.
        """
        self._raise_if_failed()
        while True:
            try:
                self._queue.put(record, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def end_stream(self, domain: str, split: str) -> None:
        """Write the (domain, split) stream's buffered rows now as its last, possibly short, shard."""
        self.put(("end", domain, split))  # type: ignore[arg-type]

    def __exit__(self, exc_type, exc, tb) -> None:
        # On success flush the partial last shards; on failure drop them (they are redone on resume).
        # A writer thread that failed has stopped reading the queue, which the producer may have filled before
        # it saw the failure: a plain blocking put would then wait forever (e.g. on a full disk).
        command = "flush" if exc_type is None else "drop"
        while self._thread.is_alive():
            try:
                self._queue.put(command, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._encoder.close()
        if self.store.local is None:
            shutil.rmtree(self._scratch, ignore_errors=True)  # the local staging folder of a remote dump
        if exc_type is None:
            self._raise_if_failed()

    # --- writer thread -------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, str):
                    if item == "flush" and self._error is None:
                        for (domain, split), rows in list(self._buffers.items()):
                            if rows:
                                self._write(domain, split, rows)
                    return
                if self._error is not None:
                    continue  # drain so the producer never blocks forever
                if isinstance(item, tuple):
                    rows = self._buffers.pop(item[1:], [])
                    if rows:
                        self._write(item[1], item[2], rows)
                    continue
                self._add(item)
        except BaseException as e:  # noqa: BLE001 - surfaced to the main thread
            self._error = e

    def _add(self, rec: SequenceRecord) -> None:
        blob = self._encoder.submit(rec.topk_ids, rec.topk_logits, rec.teacher_lse, rec.input_ids)
        self._in_flight.append(blob)
        hidden = None
        if self.hidden_encoding is not None:
            if rec.hidden is None:
                raise RuntimeError(f"internal: {rec.domain}/{rec.split} sequence {rec.seq_index} has no hidden states")
            hidden = self._encoder.submit_hidden(rec.hidden, self.hidden_encoding)
            self._in_flight.append(hidden)
        while len(self._in_flight) > self._max_in_flight:
            self._encoder.result(self._in_flight.popleft())  # back-pressure: the queue fills, the teacher waits
        # Keep only what the table needs: the [L, k] and [L, D] arrays are in the blobs now. Without this a shard
        # buffers rows_per_shard * L * k * 12 bytes per open stream (hundreds of MB at k = 64, L = 512).
        rec = dataclasses.replace(rec, topk_ids=_NONE, topk_logits=_NONE, hidden=None)
        rows = self._buffers.setdefault((rec.domain, rec.split), [])
        expected = rows[-1][0].seq_index + 1 if rows else rec.seq_index - rec.seq_index % self.rows_per_shard
        if rec.seq_index != expected:
            raise RuntimeError(f"internal: {rec.domain}/{rec.split} got sequence {rec.seq_index}, expected {expected}")
        rows.append((rec, blob, hidden))
        if (rec.seq_index + 1) % self.rows_per_shard == 0:
            self._write(rec.domain, rec.split, rows)
            self._buffers[(rec.domain, rec.split)] = []

    def _write(self, domain: str, split: str, rows: list[tuple[SequenceRecord, Future, Future | None]]) -> None:
        result = self._encoder.result
        rows = [(rec, result(blob), None if hidden is None else result(hidden)) for rec, blob, hidden in rows]
        first = rows[0][0].seq_index
        index = first // self.rows_per_shard
        rel = shard_relpath(self.domain_dirs[domain], split, index)
        tmp = self._scratch / (rel.replace("/", "__") + f".{os.getpid()}.tmp")
        table = self._table(rows)
        try:
            pq.write_table(
                table,
                tmp,
                compression="zstd",
                compression_level=self.compression_level,
                row_group_size=ROW_GROUP_ROWS,
                use_dictionary=False,
                use_byte_stream_split=float_columns(self.extra_temperatures),
                write_statistics=False,
            )
            digest, size = sha256_file(tmp, fsync=True)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: give the space back, leave no partial file
            raise
        self.store.commit(tmp, rel)  # rename into place (local) or one upload (remote)
        nll = np.concatenate([r.teacher_nll for r, _, _ in rows])
        finite = np.isfinite(nll)
        L = rows[0][0].input_ids.shape[0]
        info = ShardInfo(
            file=rel,
            first_seq=first,
            rows=len(rows),
            tokens=len(rows) * L,
            labelled=int(finite.sum()),
            teacher_nll_sum=float(nll[finite].astype(np.float64).sum()),
            bytes=size,
            sha256=digest,
        )
        self.on_shard(domain, split, index, info)

    def _table(self, rows: list[tuple[SequenceRecord, bytes, bytes | None]]) -> pa.Table:
        recs = [r for r, _, _ in rows]
        cols = {
            SEQ_INDEX: pa.array([r.seq_index for r in recs], pa.int64()),
            INPUT_IDS: _list_column([r.input_ids.astype(np.int32) for r in recs], pa.int32()),
            TOPK_BLOB: pa.array([b for _, b, _ in rows], pa.binary()),
            TEACHER_LSE: _list_column([r.teacher_lse.astype(np.float32) for r in recs], pa.float32()),
            TEACHER_NLL: _list_column([r.teacher_nll.astype(np.float32) for r in recs], pa.float32()),
        }
        for t in self.extra_temperatures:
            cols[lse_column(t)] = _list_column([r.extra_lse[t].astype(np.float32) for r in recs], pa.float32())
        if self.hidden_encoding is not None:
            cols[TEACHER_HIDDEN] = pa.array([h for _, _, h in rows], pa.binary())
        return pa.table(cols, schema=self._schema)


def _list_column(arrays: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    lengths = np.array([len(a) for a in arrays], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays), typ))
