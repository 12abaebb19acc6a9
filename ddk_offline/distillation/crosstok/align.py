"""Byte-exact alignment of one teacher row with the student's tokenisation of the same bytes.

A teacher row (L ids from the dump) is rebuilt into bytes with the teacher's vocabulary bytes
(:mod:`~ddk_offline.distillation.crosstok.vocab_bytes`), split into documents at the teacher's EOS, and each document
is tokenised by the student (no special tokens). The student's bytes must concatenate back to the document's; a
row where any document does not round-trip is refused as a whole (counted, never silently misaligned).

Coordinates are byte offsets into the row's bytes. A position *predicts* the token after it; a prediction is keyed by
where that token starts (content tokens) or by the document end (EOS). A teacher and a student position **pair**
when their keys are equal: both contexts end at the same byte and both predict what comes next from there.

For bits per byte over the same bytes, each document's *scored span* runs between the first and the last byte
offset that is a token boundary of both models and from which both predict: the tokens inside it partition it in
both tokenisations, so the teacher's NLL and the student's CE over it cost the same bytes. Special tokens (EOS, BOS)
are not bytes and are not scored.

Row cuts: a row may start or end inside a UTF-8 character (the packer cuts at teacher tokens). The partial
character is dropped at both ends, and the teacher tokens that hold any dropped byte are not aligned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes

Tokenize = Callable[[list[str]], list[list[int]]]


@dataclass
class RowAlignment:
    """One row's student tokens and its alignment with the teacher row (positions are indices into the rows).

    Attributes:
        student_ids: [Ls] the student's row (its BOS where the teacher's row had one and the student uses one, the
            documents' tokens, its EOS where the teacher's had one).
        pair_teacher, pair_student: [P] paired positions (same context end, both predicting the next bytes or EOS).
        scored_teacher, scored_student: positions whose predicted tokens lie in the scored spans.
        nbytes: bytes in the scored spans (the same bytes for both models).
        error: why the row could not be aligned ("" when it was).
    """

    student_ids: np.ndarray
    pair_teacher: np.ndarray
    pair_student: np.ndarray
    scored_teacher: np.ndarray
    scored_student: np.ndarray
    nbytes: int
    error: str = ""

    @classmethod
    def failed(cls, error: str) -> RowAlignment:
        empty = np.zeros(0, np.int32)
        return cls(empty, empty, empty, empty, empty, 0, error)


@dataclass
class _Document:
    """One teacher document inside the row: its positions [first, end) and its kept bytes [lo, hi)."""

    first: int
    end: int
    lo: int
    hi: int
    eos: bool  # ended by the teacher's EOS (at position ``end``)
    bos: bool  # started by the teacher's BOS


def _trim(data: bytes, lo: int, hi: int, *, head: bool, tail: bool) -> tuple[int, int]:
    """Drop a partial UTF-8 character at a row cut: continuation bytes at the head, an unfinished one at the tail."""
    if head:
        while lo < hi and 0x80 <= data[lo] < 0xC0:
            lo += 1
    if tail:
        for back in range(1, 4):  # the last lead byte within reach, and whether its character is complete
            i = hi - back
            if i < lo:
                break
            b = data[i]
            if b < 0x80:
                break
            if b >= 0xC0:
                need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                if back < need:
                    hi = i
                break
    return lo, hi


def split_documents(ids: np.ndarray, teacher: VocabBytes, bos_id: int | None) -> tuple[bytes, np.ndarray, list]:
    """The row's bytes, each position's start offset [L + 1] and its documents (cut at EOS, partial chars dropped)."""
    lengths = np.fromiter((len(teacher.pieces[i]) for i in ids), np.int64, len(ids))
    starts = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    data = b"".join(teacher.pieces[i] for i in ids)
    docs, first = [], 0
    eos_at = [p for p, i in enumerate(ids) if i == teacher.eos] if teacher.eos is not None else []
    for end in [*eos_at, len(ids)]:
        if end > first or end < len(ids):
            lo, hi = _trim(data, int(starts[first]), int(starts[end]), head=first == 0, tail=end == len(ids))
            bos = bos_id is not None and first < len(ids) and int(ids[first]) == bos_id
            docs.append(_Document(first, end, lo, hi, eos=end < len(ids), bos=bos))
        first = end + 1
    return data, starts, docs


def _keys(starts: np.ndarray, lengths: np.ndarray, is_eos: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Prediction key of each position (for the token after it): 2·start (content), 2·start + 1 (EOS), -1."""
    nxt_start, nxt_len = starts[1:], lengths[1:]
    keys = np.full(len(lengths), -1, np.int64)
    content = (nxt_len > 0) & kept[1:]
    keys[:-1] = np.where(content, 2 * nxt_start, np.where(is_eos[1:], 2 * nxt_start + 1, -1))
    return keys


def _kept(starts: np.ndarray, lengths: np.ndarray, docs: Sequence[_Document]) -> np.ndarray:
    kept = np.zeros(len(lengths), bool)
    for d in docs:
        s, e = starts[d.first : d.end], starts[d.first : d.end] + lengths[d.first : d.end]
        kept[d.first : d.end] = (s >= d.lo) & (e <= d.hi) & (lengths[d.first : d.end] > 0)
    return kept


def _scored(keys_t, ends_t, keys_s, ends_s, docs) -> tuple[np.ndarray, np.ndarray, int]:
    """Positions of both models predicting tokens inside each document's common span, and the span's bytes."""
    out_t, out_s, nbytes = [], [], 0
    ct, cs = keys_t >= 0, keys_s >= 0
    content_t, content_s = ct & (keys_t % 2 == 0), cs & (keys_s % 2 == 0)
    st, ss = keys_t // 2, keys_s // 2
    for d in docs:
        in_t = content_t & (st >= d.lo) & (st < d.hi)
        in_s = content_s & (ss >= d.lo) & (ss < d.hi)
        if not in_t.any() or not in_s.any():
            continue
        bt = np.union1d(st[in_t], ends_t[in_t])
        bs = np.union1d(ss[in_s], ends_s[in_s])
        common = np.intersect1d(bt, bs)
        lo = max(st[in_t].min(), ss[in_s].min())
        hi = min(ends_t[in_t].max(), ends_s[in_s].max())
        common = common[(common >= lo) & (common <= hi)]
        if len(common) < 2:
            continue
        lo, hi = common[0], common[-1]
        out_t.append(np.flatnonzero(in_t & (st >= lo) & (ends_t <= hi)))
        out_s.append(np.flatnonzero(in_s & (ss >= lo) & (ends_s <= hi)))
        nbytes += int(hi - lo)
    cat = lambda parts: np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)  # noqa: E731
    return cat(out_t), cat(out_s), nbytes


def align_rows(
    rows: Sequence[np.ndarray], teacher: VocabBytes, student: VocabBytes, tokenize: Tokenize, bos_id: int | None
) -> list[RowAlignment]:
    """Align each teacher row [L] with the student's tokenisation of its documents.

    Args:
        rows: teacher rows, token ids [L] each.
        teacher, student: the two vocabularies' bytes.
        tokenize: the student tokenizer on a list of texts, without special tokens (one call for all documents).
        bos_id: the BOS the dump's rows were packed with (``manifest.bos_token_id``), or None.
    """
    split = [split_documents(np.asarray(r, np.int64), teacher, bos_id) for r in rows]
    texts, where, failed = [], [], {}
    for r, (data, _, docs) in enumerate(split):
        for d in docs:
            chunk = data[d.lo : d.hi]
            if any(int(i) in teacher.unknown for i in rows[r][d.first : d.end]):
                failed[r] = "the teacher row holds an unknown-token id (its bytes are not known)"
                break
            try:
                texts.append(chunk.decode("utf-8"))
            except UnicodeDecodeError as e:
                failed[r] = f"the teacher's bytes are not UTF-8 inside a document ({e.reason} at byte {e.start})"
                break
            where.append((r, d))
    tokenized = tokenize(texts) if texts else []
    per_row: dict[int, list[tuple[_Document, list[int]]]] = {}
    for (r, d), ids in zip(where, tokenized, strict=True):
        per_row.setdefault(r, []).append((d, ids))
    out = []
    for r, (data, starts, _) in enumerate(split):
        if r in failed:
            out.append(RowAlignment.failed(failed[r]))
            continue
        out.append(_assemble(np.asarray(rows[r], np.int64), data, starts, per_row.get(r, []), teacher, student))
    return out


def _assemble(ids, data, starts, docs, teacher: VocabBytes, student: VocabBytes) -> RowAlignment:
    s_ids, s_len, s_start, s_eos = [], [], [], []
    for d, tokens in docs:
        pieces = [student.pieces[i] for i in tokens]
        joined, chunk = b"".join(pieces), data[d.lo : d.hi]
        if joined != chunk:
            # A normaliser that prefixes a space (SentencePiece's dummy prefix) keeps the bytes otherwise.
            if joined == b" " + chunk and pieces and pieces[0].startswith(b" "):
                pieces[0] = pieces[0][1:]
            else:
                return RowAlignment.failed(f"the student's tokens of a document do not give back its bytes ({d.lo})")
        offset = d.lo
        if d.bos and student.bos is not None:
            s_ids.append(student.bos), s_len.append(0), s_start.append(offset), s_eos.append(False)
        for tok, piece in zip(tokens, pieces, strict=True):
            s_ids.append(tok), s_len.append(len(piece)), s_start.append(offset), s_eos.append(False)
            offset += len(piece)
        if d.eos and student.eos is not None:
            s_ids.append(student.eos), s_len.append(0), s_start.append(d.hi), s_eos.append(True)
    t_len = np.diff(starts)
    plain = [d for d, _ in docs]
    t_eos = np.asarray([i == teacher.eos for i in ids], bool)
    keys_t = _keys(starts[:-1], t_len, t_eos, _kept(starts, t_len, plain))
    s_len_a = np.asarray(s_len, np.int64)
    s_start_a = np.asarray(s_start, np.int64)
    keys_s = _keys(s_start_a, s_len_a, np.asarray(s_eos, bool), s_len_a > 0)
    _, pt, ps = np.intersect1d(keys_t, keys_s, assume_unique=False, return_indices=True)
    keep = keys_t[pt] >= 0
    ends_t = np.append(starts[2:], 0)[: len(ids)]  # end of the token each position predicts
    ends_s = np.append(s_start_a[1:] + s_len_a[1:], 0)
    sc_t, sc_s, nbytes = _scored(keys_t, ends_t, keys_s, ends_s, plain)
    return RowAlignment(
        np.asarray(s_ids, np.int32), pt[keep].astype(np.int32), ps[keep].astype(np.int32), sc_t, sc_s, nbytes
    )
