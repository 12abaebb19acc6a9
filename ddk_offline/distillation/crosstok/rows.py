"""The student's rows of a whole dump: aligned once per (dump, student tokenizer), cached, and served by position.

Building reads every shard's ``input_ids`` (no top-k decode), aligns its rows (:func:`.align.align_rows`) and writes
one Parquet file per shard into a cache folder named by a hash of the dump's identity and both vocabularies, so a
second run with the same pair (and every epoch) reuses it. The folder is written under a temporary name and
renamed when complete: an interrupted build leaves nothing that a later run could mistake for a cache.

Where: ``<dump>/student_rows/<key>`` when the dump is a writable local folder, else ``<run>/student_rows/<key>``
(``--student-rows DIR`` chooses). The dump's manifest never lists these files, so they change nothing it checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddk_offline.distillation.crosstok.align import RowAlignment, Tokenize, align_rows
from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes
from ddk_offline.format.reader import DumpReader
from ddk_offline.format.schema import INPUT_IDS, SPLITS
from ddk_offline.runtime.files import fsync_dir, json_bytes, write_bytes_atomic

FOLDER = "student_rows"
META = "student_rows.json"
_COLUMNS = ("student_ids", "pair_teacher", "pair_student", "scored_teacher", "scored_student")


@dataclass
class DomainAlignment:
    """How well one (domain, split) aligned: rows refused and teacher positions paired (logged per domain)."""

    rows: int = 0
    refused: int = 0
    teacher_positions: int = 0
    paired: int = 0
    bytes: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Share of teacher positions paired with a student position (refused rows count as unpaired)."""
        return self.paired / self.teacher_positions if self.teacher_positions else 0.0


def cache_key(reader: DumpReader, teacher: VocabBytes, student: VocabBytes) -> str:
    """What the rows depend on: the dump's identity and both vocabularies' bytes."""
    identity = json.dumps(reader.manifest.identity(), sort_keys=True, default=str)
    return hashlib.sha256(f"{identity}|{teacher.sha256}|{student.sha256}".encode()).hexdigest()[:20]


def default_cache_root(reader: DumpReader, out: str | os.PathLike) -> Path:
    """``<dump>/student_rows`` for a writable local dump, else ``<out>/student_rows``."""
    local = reader.store.local
    if local is not None and os.access(local, os.W_OK):
        return Path(local) / FOLDER
    return Path(out) / FOLDER


class StudentRows:
    """The student rows of a dump (both splits), in memory, looked up by (domain, split, shard, row).

    Attributes:
        seq_len: the longest student row: batches are padded to it.
        alignment: ``{split: {domain: DomainAlignment}}``.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder, self.meta = folder, meta
        self.seq_len = int(meta["seq_len"])
        self.alignment = {
            split: {d: DomainAlignment(**v) for d, v in per.items()} for split, per in meta["alignment"].items()
        }
        self._shards: dict[tuple[str, str, int], dict[str, list]] = {}

    def _shard(self, domain: str, split: str, shard: int) -> dict[str, list]:
        key = (domain, split, shard)
        if key not in self._shards:
            table = pq.read_table(self.folder / _file(self.meta["dirs"][domain], split, shard))
            self._shards[key] = {c: table.column(c).to_pylist() for c in (*_COLUMNS, "nbytes", "error")}
        return self._shards[key]

    def row(self, domain: str, split: str, shard: int, row: int) -> RowAlignment:
        data = self._shard(domain, split, shard)
        arrays = [np.asarray(data[c][row], np.int32) for c in _COLUMNS]
        return RowAlignment(*arrays, nbytes=int(data["nbytes"][row]), error=data["error"][row])


def _file(domain_dir: str, split: str, shard: int) -> str:
    return f"{domain_dir}/{split}-{shard:05d}.parquet"


def load_or_build(
    reader: DumpReader,
    teacher: VocabBytes,
    student: VocabBytes,
    tokenize: Tokenize,
    root: Path,
    *,
    progress: Any = None,
) -> StudentRows:
    """The cached student rows for (dump, student tokenizer) under ``root``, built first if missing.

    Args:
        progress: optional callable ``(done_rows, total_rows)`` for a progress bar.
    """
    folder = root / cache_key(reader, teacher, student)
    if (folder / META).is_file():
        return StudentRows(folder, json.loads((folder / META).read_text()))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bos = reader.manifest.bos_token_id
    dirs = {d: reader.manifest.domains[d].dir for d in reader.domains}
    total = sum(reader.num_sequences(d, s) for d in reader.domains for s in SPLITS)
    done, longest = 0, 1
    alignment: dict[str, dict[str, dict]] = {s: {} for s in SPLITS}
    for split in SPLITS:
        for domain in reader.domains:
            stats = DomainAlignment()
            for s, info in enumerate(reader.shards(domain, split)):
                ids = reader.read_rows(domain, split, s, range(info.rows), decode_topk=False)[INPUT_IDS]
                rows = align_rows(list(ids), teacher, student, tokenize, bos)
                _write_shard(tmp / _file(dirs[domain], split, s), rows)
                for r in rows:
                    stats.rows += 1
                    stats.teacher_positions += ids.shape[1] - 1
                    stats.paired += len(r.pair_teacher)
                    stats.bytes += r.nbytes
                    longest = max(longest, len(r.student_ids))
                    if r.error:
                        stats.refused += 1
                        stats.reasons[r.error] = stats.reasons.get(r.error, 0) + 1
                done += info.rows
                if progress is not None:
                    progress(done, total)
            alignment[split][domain] = stats.__dict__
    meta = {
        "key": folder.name,
        "teacher_vocab_sha256": teacher.sha256,
        "student_vocab_sha256": student.sha256,
        "seq_len": longest,
        "dirs": dirs,
        "alignment": alignment,
    }
    write_bytes_atomic(tmp / META, json_bytes(meta))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    return StudentRows(folder, json.loads((folder / META).read_text()))


def _write_shard(path: Path, rows: list[RowAlignment]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {c: pa.array([getattr(r, c).tolist() for r in rows], pa.list_(pa.int32())) for c in _COLUMNS}
    columns["nbytes"] = pa.array([r.nbytes for r in rows], pa.int64())
    columns["error"] = pa.array([r.error for r in rows], pa.string())
    pq.write_table(pa.table(columns), path, compression="zstd")
