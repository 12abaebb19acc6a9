"""Reading a teacher dump: :func:`open_dump` and :class:`DumpReader`.

Sequential iteration (``sequences``) and random access by (domain, split, shard, row) for the trainer.
Decoding returns numpy arrays; nothing here imports torch. A dump may live on any fsspec filesystem: pass a URL
(``s3://bucket/dump``, ``file:///data/dump``, ...) instead of a local path (see :mod:`.storage`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddk_offline.format import hidden_codec
from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import Manifest, ManifestError, ShardInfo
from ddk_offline.format.schema import (
    FORMAT_NAME,
    INPUT_IDS,
    MANIFEST_NAME,
    SEQ_INDEX,
    SPLITS,
    TEACHER_HIDDEN,
    TEACHER_LSE,
    TEACHER_NLL,
    TOKENIZER_DIR,
    TOPK_BLOB,
    TOPK_IDS,
    TOPK_LOGITS,
    lse_column,
)
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.runtime.files import hash_stream


class ShardError(ValueError):
    """A shard that does not match its manifest entry or cannot be decoded."""


def open_dump(path: str | os.PathLike | Storage, *, allow_incomplete: bool = False) -> DumpReader:
    """Open a dump written by ``ddk-offline dump-teacher``.

    Args:
        path: the dump directory (the one holding ``manifest.json``): a local path or an fsspec URL.
        allow_incomplete: read a dump whose writer has not finished (default: refuse).

    Returns:
        A :class:`DumpReader`.
    """
    store = as_storage(path)
    manifest = Manifest.load(store)
    if not manifest.complete and not allow_incomplete:
        raise ManifestError(
            f"{store.where(MANIFEST_NAME)}: the dump is incomplete (field 'complete' is false); "
            "re-run `ddk-offline dump-teacher` with the same arguments to finish it"
        )
    return DumpReader(store, manifest)


class DumpReader:
    """Read access to one dump. Cheap to create; shard files are opened lazily and cached.

    Each shard's sha256 is checked against the manifest the first time this reader opens it (one extra sequential
    read per shard and reader): Parquet pages carry no checksum, so a flipped bit could otherwise decode silently
    into wrong teacher targets. ``verify_checksums=False`` skips it (``dumps verify`` hashes on its own).

    ``path`` is the dump's local folder (a :class:`~pathlib.Path`) or, for a dump on another filesystem, its URL.
    """

    def __init__(self, path: str | os.PathLike | Storage, manifest: Manifest, *, verify_checksums: bool = True):
        self.store = as_storage(path)
        self.path: Path | str = self.store.local if self.store.local is not None else self.store.url
        self.manifest = manifest
        self.codec = TopKCodec.from_description(manifest.codec, vocab_size=manifest.vocab_size, k=manifest.k)
        self.verify_checksums = verify_checksums
        self._verified: set[str] = set()
        self._open = lru_cache(maxsize=64)(self._open_uncached)

    @property
    def domains(self) -> list[str]:
        """Domain names, sorted."""
        return sorted(self.manifest.domains)

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def k(self) -> int:
        return self.manifest.k

    def tokenizer(self):
        """The dump's copy of the teacher tokenizer (``transformers.AutoTokenizer``)."""
        import tempfile

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="ddk-tokenizer-") as tmp:  # used only when the dump is remote
            return AutoTokenizer.from_pretrained(self.store.get_dir(TOKENIZER_DIR, Path(tmp)))

    def shards(self, domain: str, split: str = "train") -> list[ShardInfo]:
        """The shards of a (domain, split) stream, in order."""
        return self._split(domain, split).shards

    def num_sequences(self, domain: str, split: str = "train") -> int:
        return self._split(domain, split).sequences

    def teacher_loss(self, domain: str, split: str = "train") -> float:
        """Mean teacher NLL per labelled position, from the manifest."""
        return self._split(domain, split).teacher_loss

    def sequences(self, domain: str, split: str = "train", *, hidden: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Yield the stream's sequences in order, each a dict of numpy arrays (see docs/FORMAT.md).

        ``hidden=True`` adds ``teacher_hidden`` [L, D] float32 (a dump written with ``--store-hidden-states``);
        without it that column is not even read.
        """
        columns = self._columns(hidden)
        for s in range(len(self.shards(domain, split))):
            pf = self._open(domain, split, s)
            for rg in range(pf.num_row_groups):
                batch = self._decode(pf.read_row_group(rg, columns=columns), domain, split, s, hidden=hidden)
                for i in range(len(batch[INPUT_IDS])):
                    yield {key: value[i] for key, value in batch.items()}

    def read_rows(
        self,
        domain: str,
        split: str,
        shard: int,
        rows: Sequence[int],
        *,
        decode_topk: bool = True,
        hidden: bool = False,
    ) -> dict[str, np.ndarray]:
        """Random access: rows of one shard, stacked ([B, L], [B, L, k]) in the order given.

        ``decode_topk=False`` skips the top-k codec (no ``topk_ids`` / ``topk_logits``): what CE-only training needs.
        ``hidden=True`` adds ``teacher_hidden`` [B, L, D] float32 (only in a dump with hidden states; otherwise the
        column is never read).
        """
        columns = self._columns(hidden)
        pf = self._open(domain, split, shard)
        info = self.shards(domain, split)[shard]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= info.rows):
            raise IndexError(f"{info.file}: rows must be in [0, {info.rows}), got {rows.tolist()}")
        rg_rows = pf.metadata.row_group(0).num_rows if pf.num_row_groups else 1
        groups = sorted({int(r) // rg_rows for r in rows})
        table = pf.read_row_groups(groups, columns=columns)
        local = {g: i * rg_rows for i, g in enumerate(groups)}
        take = [local[int(r) // rg_rows] + int(r) % rg_rows for r in rows]
        table = table.take(pa.array(take, pa.int64()))
        return self._decode(table, domain, split, shard, decode_topk=decode_topk, hidden=hidden)

    def _columns(self, hidden: bool) -> list[str] | None:
        """The columns to read: all but ``teacher_hidden`` unless it is asked for (None: all of them)."""
        m = self.manifest
        if hidden and not m.has_hidden_states:
            raise ManifestError(
                f"{self.store.where(MANIFEST_NAME)}: the dump holds no teacher hidden states (no "
                "'settings.hidden_states'); re-dump with `ddk-offline dump-teacher --store-hidden-states`"
            )
        if hidden or not m.has_hidden_states:
            return None
        # Every other column of the format (the shard's own schema is checked when the shard is opened).
        return [SEQ_INDEX, INPUT_IDS, TOPK_BLOB, TEACHER_LSE, TEACHER_NLL] + [
            lse_column(t) for t in m.temperatures if t != 1.0
        ]

    # --- internals -----------------------------------------------------------------------------
    def _split(self, domain: str, split: str):
        if domain not in self.manifest.domains:
            raise KeyError(f"{self.path}: no domain {domain!r}; the dump has {self.domains}")
        if split not in SPLITS:
            raise KeyError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest.domains[domain].splits.get(split) or _EMPTY

    def check_shard(self, domain: str, split: str, shard: int) -> None:
        """Check the shard's sha256 against the manifest once per reader (a no-op without ``verify_checksums``).

        Raises:
            ShardError: the file is missing or differs from what the manifest recorded.
        """
        info = self.shards(domain, split)[shard]
        if self.verify_checksums and info.file not in self._verified:
            if _sha256(self.store, info.file) != info.sha256:
                raise ShardError(
                    f"{self.store.where(info.file)}: missing, or its sha256 differs from the manifest (corrupted or "
                    f"replaced); refusing to train on it. Run `ddk-offline dumps verify {self.path} --repair` to "
                    "recompute it"
                )
            self._verified.add(info.file)

    def _open_uncached(self, domain: str, split: str, shard: int) -> pq.ParquetFile:
        info = self.shards(domain, split)[shard]
        path = self.store.where(info.file)
        self.check_shard(domain, split, shard)
        try:
            pf = pq.ParquetFile(self.store.open_input(info.file))
        except (OSError, pa.ArrowInvalid) as e:
            raise ShardError(f"{path}: cannot open shard ({e}); run `ddk-offline dumps verify {self.path}`") from None
        meta = pf.schema_arrow.metadata or {}
        if meta.get(b"ddk_format") != FORMAT_NAME.encode() or pf.metadata.num_rows != info.rows:
            raise ShardError(
                f"{path}: shard does not match the manifest (format or row count); "
                f"run `ddk-offline dumps verify {self.path}`"
            )
        return pf

    def _decode(
        self, table: pa.Table, domain: str, split: str, shard: int, *, decode_topk: bool = True, hidden: bool = False
    ) -> dict[str, np.ndarray]:
        L, k = self.manifest.seq_len, self.manifest.k
        n = table.num_rows
        out = {
            INPUT_IDS: _flat(table, INPUT_IDS, n, L).astype(np.int64),
            TEACHER_LSE: _flat(table, TEACHER_LSE, n, L).astype(np.float32),
            TEACHER_NLL: _flat(table, TEACHER_NLL, n, L).astype(np.float32),
        }
        for t in self.manifest.temperatures:
            if t != 1.0:
                out[lse_column(t)] = _flat(table, lse_column(t), n, L).astype(np.float32)
        out[SEQ_INDEX] = table.column(SEQ_INDEX).to_numpy()
        if hidden:
            out[TEACHER_HIDDEN] = self._decode_hidden(table, domain, split, shard)
        if not decode_topk:
            return out
        ids = np.empty((n, L, k), np.int64)
        logits = np.empty((n, L, k), np.float32)
        for i, blob in enumerate(table.column(TOPK_BLOB).to_pylist()):
            try:
                ids[i], logits[i] = self.codec.decode(blob, out[TEACHER_LSE][i], out[INPUT_IDS][i])
            except ValueError as e:
                f = self.shards(domain, split)[shard].file
                raise ShardError(
                    f"{self.store.where(f)}: row {i}: top-k blob cannot be decoded ({e}); "
                    f"run `ddk-offline dumps verify {self.path}`"
                ) from None
        out[TOPK_IDS], out[TOPK_LOGITS] = ids, logits
        return out

    def _decode_hidden(self, table: pa.Table, domain: str, split: str, shard: int) -> np.ndarray:
        """The ``teacher_hidden`` blobs of ``table`` as float32 [n, L, D]."""
        spec, L = self.manifest.hidden_states, self.manifest.seq_len
        blobs = table.column(TEACHER_HIDDEN).to_pylist()
        out = np.empty((len(blobs), L, int(spec["dim"])), np.float32)
        for i, blob in enumerate(blobs):
            try:
                out[i] = hidden_codec.decode(blob, L, int(spec["dim"]), spec["encoding"])
            except (ValueError, TypeError) as e:
                f = self.shards(domain, split)[shard].file
                raise ShardError(
                    f"{self.store.where(f)}: row {i}: teacher_hidden cannot be decoded ({e}); "
                    f"run `ddk-offline dumps verify {self.path}`"
                ) from None
        return out


def _sha256(store: Storage, rel: str) -> str | None:
    """The sha256 of ``rel`` in ``store`` (streamed in 4 MiB blocks), or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        src = store.open_input(rel)
        with open(src, "rb") if isinstance(src, str) else src as f:
            hash_stream(h, f)
    except OSError:
        return None
    return h.hexdigest()


def _flat(table: pa.Table, name: str, n: int, L: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    if values.size != n * L:
        raise ShardError(f"column {name!r} holds {values.size} values, expected {n} rows x {L}")
    return values.reshape(n, L)


class _EmptySplit:
    shards: list[ShardInfo] = []
    sequences = 0
    teacher_loss = float("nan")


_EMPTY = _EmptySplit()
