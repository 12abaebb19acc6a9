"""Tokenise documents, append EOS, pack into ``seq_len`` sequences per domain, assign train/val while streaming.

Rules (docs/FORMAT.md, "Packing"):

- each non-empty document is tokenised without special tokens and followed by the tokenizer's EOS; documents whose
  text is empty or only whitespace are skipped and counted (``empty_documents``);
- with a BOS (``bos_token_id``, see :mod:`.bos`) each document is also preceded by it, and every sequence starts
  with it: a sequence that would begin inside a document gets a BOS inserted in front (``row_bos_tokens``), so the
  teacher never sees a context its training never showed it (a BOS-trained teacher without one runs out of
  distribution: docs/FORMAT.md, "BOS");
- a domain's tokens are concatenated in corpus order and cut into non-overlapping sequences of exactly
  ``seq_len`` tokens (a document may span two sequences); the final remainder (< seq_len) is dropped and counted;
- with ``max_tokens`` the domain stops after ``max_tokens // seq_len`` sequences (later documents are not read);
- validation split, exact and interleaved: the domain's i-th sequence (i = 0, 1, ...) goes to ``val`` when
  ``round((i + 1) * f) > round(i * f)`` (round half up, exact rational arithmetic), so after any n sequences the
  val split holds round(n * f) of them, spread evenly (the first at i ~ 1 / (2 f)). The decision needs only i, so
  it is the same whether the stream is read once, resumed, or split across workers.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ddk_offline.dump.corpus import Document

_DOC_BATCH = 64  # documents tokenised per call: amortises the tokenizer's per-call cost


@dataclass
class PackedSequence:
    """One packed sequence. ``seq_index`` counts within the (domain, split) stream; ``input_ids`` is [L] int64."""

    domain: str
    split: str
    seq_index: int
    input_ids: np.ndarray


@dataclass
class DomainStats:
    """Per-domain counts recorded in the manifest (``corpus.domains``)."""

    documents: int = 0
    empty_documents: int = 0
    unread_documents: int = 0
    tokens: int = 0
    dropped_tokens: int = 0
    sequences: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    sha256: str = ""
    row_bos_tokens: int | None = None  # BOS tokens inserted at sequence starts (None: packed without BOS)

    def to_dict(self) -> dict:
        d = {
            "documents": self.documents,
            "empty_documents": self.empty_documents,
            "unread_documents": self.unread_documents,
            "tokens": self.tokens,
            "dropped_tokens": self.dropped_tokens,
            "sequences": dict(self.sequences),
            "sha256": self.sha256,
        }
        if self.row_bos_tokens is not None:  # dumps without BOS keep their manifest record as it was
            d["row_bos_tokens"] = self.row_bos_tokens
        return d


def document_tokens(ids: list[int], eos: int, bos: int | None) -> list[int]:
    """A document's tokens in the packed stream: ``[BOS] + ids + [EOS]`` (no BOS when ``bos`` is None)."""
    return [*ids, eos] if bos is None else [bos, *ids, eos]


def take_row(buffer: list[int], seq_len: int, bos: int | None) -> tuple[list[int], int] | None:
    """The next packed sequence cut from the front of ``buffer`` and the stream tokens it used; None: too short.

    Without a BOS a sequence is the next ``seq_len`` tokens. With one, a sequence always starts with it: when the
    buffer does not (the sequence begins inside a document), a BOS is inserted and ``seq_len - 1`` tokens are used.
    """
    if bos is None or buffer[:1] == [bos]:
        return (buffer[:seq_len], seq_len) if len(buffer) >= seq_len else None
    return ([bos, *buffer[: seq_len - 1]], seq_len - 1) if len(buffer) >= seq_len - 1 else None


def is_val(i: int, fraction: Fraction) -> bool:
    """Whether a domain's i-th sequence belongs to the validation split (see the module docstring)."""
    half = Fraction(1, 2)
    return math.floor((i + 1) * fraction + half) > math.floor(i * fraction + half)


class _DomainPacker:
    def __init__(self, domain: str, seq_len: int, fraction: Fraction, max_sequences: int | None, bos: int | None):
        self.domain, self.seq_len, self.fraction, self.max_sequences = domain, seq_len, fraction, max_sequences
        self.bos = bos
        self.buffer: list[int] = []
        self.count = 0  # sequences emitted, both splits
        self.stats = DomainStats(row_bos_tokens=None if bos is None else 0)
        self.hash = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.max_sequences is not None and self.count >= self.max_sequences

    def add(self, text: str, ids: list[int]) -> Iterator[PackedSequence]:
        raw = text.encode("utf-8")
        self.hash.update(struct.pack("<Q", len(raw)) + raw)  # length-prefixed: document boundaries are hashed too
        self.stats.documents += 1
        self.stats.tokens += len(ids)
        self.buffer.extend(ids)
        while not self.full and (cut := take_row(self.buffer, self.seq_len, self.bos)) is not None:
            seq, used = cut
            self.buffer = self.buffer[used:]
            if used < self.seq_len:  # a BOS was inserted in front
                self.stats.row_bos_tokens += 1
            split = "val" if is_val(self.count, self.fraction) else "train"
            index = self.stats.sequences[split]
            self.stats.sequences[split] += 1
            self.count += 1
            yield PackedSequence(self.domain, split, index, np.asarray(seq, dtype=np.int64))

    def finish(self) -> DomainStats:
        self.stats.dropped_tokens = len(self.buffer)  # every stream token is in a sequence or still buffered
        self.stats.sha256 = self.hash.hexdigest()
        return self.stats


class Packer:
    """Streams documents into per-domain packed sequences; :attr:`stats` is complete after :meth:`pack` ends.

    Args:
        tokenizer: the teacher's tokenizer (``transformers``); EOS is its ``eos_token_id``.
        seq_len: tokens per sequence (L).
        val_fraction: fraction f in [0, 1) of each domain's sequences held out as ``val``.
        max_tokens_per_domain: stop a domain after ``max_tokens_per_domain // seq_len`` sequences (None: no limit).
        bos_token_id: the BOS that starts each document and sequence (None: no BOS, see :mod:`.bos`).
    """

    def __init__(
        self,
        tokenizer,
        *,
        seq_len: int,
        val_fraction: float,
        max_tokens_per_domain: int | None = None,
        bos_token_id: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self.bos = bos_token_id
        self.seq_len = seq_len
        self.fraction = Fraction(repr(float(val_fraction)))
        self.max_sequences = None if max_tokens_per_domain is None else max_tokens_per_domain // seq_len
        self._packers: dict[str, _DomainPacker] = {}
        self.stats: dict[str, DomainStats] = {}

    def pack(self, documents: Iterable[Document]) -> Iterator[PackedSequence]:
        """Yield every packed sequence in deterministic order (per domain: seq_index ascending)."""
        batch: list[Document] = []
        for doc in documents:
            packer = self._packer(doc.domain)
            if not doc.text.strip():
                packer.stats.empty_documents += 1
                continue
            if packer.full:
                packer.stats.unread_documents += 1
                continue
            batch.append(doc)
            if len(batch) >= _DOC_BATCH:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)
        self.stats = {name: p.finish() for name, p in sorted(self._packers.items())}

    def _packer(self, domain: str) -> _DomainPacker:
        if domain not in self._packers:
            self._packers[domain] = _DomainPacker(domain, self.seq_len, self.fraction, self.max_sequences, self.bos)
        return self._packers[domain]

    def _flush(self, batch: list[Document]) -> Iterator[PackedSequence]:
        if not batch:
            return
        encoded = self.tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, encoded, strict=True):
            packer = self._packers[doc.domain]
            if packer.full:  # filled up by an earlier document of this batch
                packer.stats.unread_documents += 1
                continue
            yield from packer.add(doc.text, document_tokens(ids, self.eos, self.bos))
