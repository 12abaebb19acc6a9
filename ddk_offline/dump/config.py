"""Every option of ``dump-teacher`` (:class:`DumpConfig`), and what a dump run reports back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from ddk_offline.errors import UserError
from ddk_offline.format.hidden_codec import DEFAULT_ENCODING, ENCODINGS
from ddk_offline.format.manifest import Manifest
from ddk_offline.format.teacher_matrices import DEFAULT_DTYPE, DTYPES


@dataclass
class DumpConfig:
    """Every option of ``dump-teacher``; the one place for defaults (the CLI mirrors these).

    Attributes:
        teacher: local model folder, ``.gguf`` file, or Hub name.
        data: corpus file, folder, glob, saved dataset or Hub dataset name (see :mod:`ddk_offline.corpus`).
        out: the dump directory (created after validation passes): a local path or an fsspec URL (``s3://...``).
        text_column, domain_column: field names in structured corpora.
        seq_len: tokens per packed sequence (L).
        top_k: teacher logits kept per position (K).
        batch_size: sequences per teacher forward.
        val_fraction: fraction of each domain's sequences held out as ``val``.
        max_tokens_per_domain: cap per domain (train + val), None for no cap.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        shard_tokens: tokens per shard; rows per shard = max(1, shard_tokens // seq_len).
        extra_temperatures: temperatures T != 1 whose full-row logsumexp(logits / T) is also stored.
        trust_remote_code: allow the teacher's own modelling code (off by default).
        gguf_file: GGUF file name inside ``teacher`` when ``teacher`` is a folder.
        teacher_backend: how the teacher runs (a name in :data:`ddk_offline.dump.teachers.BACKENDS`).
        encode_workers: processes that run the top-k codec beside the teacher (None: the spare cores, see
            :func:`ddk_offline.format.workers.auto_workers`; 0: the writer thread). Shards are byte-identical for
            every value.
        bos: ``auto`` (the tokenizer's convention), ``always`` or ``never``: whether each document and packed row
            starts with the teacher's BOS token (see :mod:`ddk_offline.dump.bos`; a resume keeps the dump's own).
        store_hidden_states: also store the teacher's last hidden state [L, D] per row (column ``teacher_hidden``,
            encoded as ``hidden_encoding``), for DSKD's teacher-to-student half.
        hidden_encoding: how those hidden states are encoded (a name in
            :data:`ddk_offline.format.hidden_codec.ENCODINGS`; benchmarks/results/dskd_extras.md compares them).
        store_teacher_matrices: also write ``teacher_matrices.safetensors`` (embedding output, head, bias) for DSKD.
        matrices_dtype: the dtype of those matrices (``bfloat16``, ``float16``, ``float32``).
    """

    teacher: str
    data: str
    out: str
    text_column: str = "text"
    domain_column: str = "domain"
    seq_len: int = 512
    top_k: int = 64
    batch_size: int = 8
    val_fraction: float = 0.05
    max_tokens_per_domain: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    shard_tokens: int = 262144
    extra_temperatures: tuple[float, ...] = ()
    trust_remote_code: bool = False
    gguf_file: str | None = None
    teacher_backend: str = "hf"
    encode_workers: int | None = None
    bos: str = "auto"
    store_hidden_states: bool = False
    hidden_encoding: str = DEFAULT_ENCODING
    store_teacher_matrices: bool = False
    matrices_dtype: str = DEFAULT_DTYPE

    def validate(self) -> None:
        """Raise :class:`UserError` naming the option for any value out of range."""
        checks = [
            (self.seq_len >= 2, "--seq-len", f"{self.seq_len}: must be at least 2"),
            (self.top_k >= 1, "--top-k", f"{self.top_k}: must be at least 1"),
            (self.batch_size >= 1, "--batch-size", f"{self.batch_size}: must be at least 1"),
            (0 <= self.val_fraction < 1, "--val-fraction", f"{self.val_fraction}: must be in [0, 1)"),
            (self.shard_tokens >= 1, "--shard-tokens", f"{self.shard_tokens}: must be positive"),
            (self.bos in ("auto", "always", "never"), "--bos", f"{self.bos!r}: choose one of auto, always, never"),
            (
                self.hidden_encoding in ENCODINGS,
                "--hidden-encoding",
                f"{self.hidden_encoding!r}: choose one of {', '.join(ENCODINGS)}",
            ),
            (
                self.matrices_dtype in DTYPES,
                "--matrices-dtype",
                f"{self.matrices_dtype!r}: choose one of {', '.join(DTYPES)}",
            ),
            (
                self.encode_workers is None or self.encode_workers >= 0,
                "--encode-workers",
                f"{self.encode_workers}: must be >= 0 (or left out for automatic)",
            ),
            (
                self.max_tokens_per_domain is None or self.max_tokens_per_domain >= self.seq_len,
                "--max-tokens-per-domain",
                f"{self.max_tokens_per_domain}: must be at least --seq-len ({self.seq_len})",
            ),
            (
                all(t > 0 and math.isfinite(t) for t in self.extra_temperatures),
                "--extra-temperatures",
                f"{list(self.extra_temperatures)}: temperatures must be positive",
            ),
        ]
        for ok, option, what in checks:
            if not ok:
                raise UserError(f"{option} {what}")

    @property
    def temperatures(self) -> tuple[float, ...]:
        """Extra temperatures, sorted, without duplicates and without 1.0 (always stored)."""
        return tuple(sorted({float(t) for t in self.extra_temperatures} - {1.0}))

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)


class PackingMismatchWarning(UserWarning):
    """The start-up check found the teacher's loss on packed rows far from its loss on standard tokenisation."""


class DumpProgress(Protocol):
    """What the dump reports while it runs (the CLI draws a rich progress bar from it)."""

    def start(self, todo_tokens: dict[str, int], done_tokens: dict[str, int]) -> None: ...

    def advance(self, domain: str, tokens: int) -> None: ...

    def stop(self) -> None: ...


@dataclass
class DumpStats:
    """Timings of one run (not stored in the manifest: they differ between runs of the same dump).

    ``forward_s`` is the time inside the teacher's forward; ``loop_s`` the wall time from the model being ready to
    the last shard being durable, so ``1 - forward_s / loop_s`` is everything else's share of the dump loop.
    """

    prepass_s: float = 0.0
    load_s: float = 0.0
    check_s: float = 0.0  # the start-up check of the packing (bos_check), once per dump
    forward_s: float = 0.0
    loop_s: float = 0.0
    total_s: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)
    shards_written: int = 0
    shards_kept: int = 0
    world: int = 1

    @property
    def overhead(self) -> float:
        return 1.0 - self.forward_s / self.loop_s if self.loop_s > 0 else 0.0


@dataclass
class DumpResult:
    """The final manifest and this run's timings."""

    manifest: Manifest
    stats: DumpStats
