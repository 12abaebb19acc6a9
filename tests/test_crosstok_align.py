"""Cross-tokenizer alignment (issue #16): vocabulary bytes and byte-exact pairing of teacher and student positions."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
from crosstok_tiny import sentencepiece_tokenizer

from ddk_offline.distillation.crosstok.align import align_rows
from ddk_offline.distillation.crosstok.vocab_bytes import vocab_bytes

TEXTS = [
    "Hello wörld, naïve café",
    "  two leading spaces and 日本語のテキスト",
    "emoji 😀👍🏽 and combining e\u0301 a\u0308",
    "def f(x):\n    return x + 1\n",
]


@pytest.fixture(scope="module")
def byte_level():
    return tiny.train_tokenizer(384, bos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "dummy-prefix"])
def spiece(request):
    return sentencepiece_tokenizer(dummy_prefix=request.param)


def _row(tok, texts, *, bos=True):
    """A packed teacher row: [BOS] doc EOS [BOS] doc EOS ... (BOS where the tokenizer adds one)."""
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=bos)["input_ids"] + [tok.eos_token_id]
    return np.asarray(ids, np.int64)


def _tokenize(tok):
    return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]


def _check(a, t_ids, tv, sv):
    """Every pair predicts from the same byte; the scored targets of both models are the same bytes.

    A dummy-prefix normaliser adds one space in front of each document's student bytes: with it, bytes are compared
    without spaces.
    """
    assert not a.error, a.error
    prefix = sv.family == "sentencepiece" and b"".join(sv.pieces[i] for i in a.student_ids).startswith(b" ")
    same = (lambda b: b.replace(b" ", b"")) if prefix else (lambda b: b)  # noqa: E731
    t_pieces = [tv.pieces[i] for i in t_ids]
    s_bytes = same(b"".join(sv.pieces[i] for i in a.student_ids))
    # Student bytes are the teacher's, up to the partial characters dropped at the row's cuts.
    assert s_bytes and s_bytes in same(b"".join(t_pieces))
    for pt, ps in zip(a.pair_teacher, a.pair_student, strict=True):
        nt, ns = t_ids[pt + 1], a.student_ids[ps + 1]
        if tv.pieces[nt]:
            assert same(sv.pieces[ns])[:1] == same(tv.pieces[nt])[:1] or not same(tv.pieces[nt])
        else:  # both predict the end of the document
            assert nt == tv.eos and ns == sv.eos
    scored_t = b"".join(t_pieces[p + 1] for p in a.scored_teacher)
    scored_s = b"".join(sv.pieces[a.student_ids[p + 1]] for p in a.scored_student)
    assert len(scored_t) == a.nbytes > 0
    assert same(scored_t) == same(scored_s)


@pytest.mark.parametrize("direction", ["bl->sp", "sp->bl"])
def test_whole_documents_round_trip_and_pair(byte_level, spiece, direction):
    teacher, student = (byte_level, spiece) if direction == "bl->sp" else (spiece, byte_level)
    tv, sv = vocab_bytes(teacher), vocab_bytes(student)
    row = _row(teacher, TEXTS)
    [a] = align_rows([row], tv, sv, _tokenize(student), bos_id=tv.bos)
    _check(a, row, tv, sv)
    # Every document ends with the student's EOS and starts with its BOS (both tokenizers use one).
    assert (a.student_ids == sv.eos).sum() == len(TEXTS) and (a.student_ids == sv.bos).sum() == len(TEXTS)
    # Document ends pair up: each teacher position before an EOS pairs with the student's.
    eos_pairs = [pt for pt in a.pair_teacher if row[pt + 1] == tv.eos]
    assert len(eos_pairs) == len(TEXTS)
    # Whole documents with a BOS are scored from their first byte: every content byte of the row counts (a teacher
    # with a dummy prefix holds one more space per document).
    assert a.nbytes == len(b"".join(tv.pieces[i] for i in row)) >= sum(len(t.encode()) for t in TEXTS)


@pytest.mark.parametrize("cut", range(1, 40, 3))
def test_rows_cut_anywhere_drop_only_the_partial_character(byte_level, spiece, cut):
    tv, sv = vocab_bytes(spiece), vocab_bytes(byte_level)
    full = _row(spiece, TEXTS)
    for row in (full[cut:], full[:-cut], full[cut : cut + 30]):
        [a] = align_rows([row], tv, sv, _tokenize(byte_level), bos_id=tv.bos)
        if a.nbytes == 0:
            continue  # a row too short to hold a common boundary after its first token
        _check(a, row, tv, sv)


def test_pairs_never_cross_a_row_start_without_context(byte_level, spiece):
    tv, sv = vocab_bytes(byte_level), vocab_bytes(spiece)
    row = _row(byte_level, ["abc def ghi jkl"], bos=False)
    [a] = align_rows([row], tv, sv, _tokenize(spiece), bos_id=None)
    _check(a, row, tv, sv)
    # Without a BOS neither model predicts the first token: its bytes are not scored.
    first = len(tv.pieces[row[0]])
    assert a.nbytes <= len(b"abc def ghi jkl") - first


def test_a_row_that_does_not_round_trip_is_refused_not_misaligned(byte_level, spiece):
    tv, sv = vocab_bytes(byte_level), vocab_bytes(spiece)
    row = _row(byte_level, ["fine text", "more text"])
    lying = lambda texts: [ids[:-1] for ids in spiece(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    [a] = align_rows([row], tv, sv, lying, bos_id=tv.bos)
    assert a.error.startswith("the student's tokens of a document do not give back its bytes")
    assert len(a.student_ids) == len(a.pair_teacher) == a.nbytes == 0


def test_unknown_token_refuses_the_row(byte_level, spiece):
    tv, sv = vocab_bytes(spiece), vocab_bytes(byte_level)
    row = np.asarray(spiece("abc", add_special_tokens=False)["input_ids"] + [spiece.unk_token_id], np.int64)
    [a] = align_rows([row], tv, sv, _tokenize(byte_level), bos_id=None)
    assert "unknown-token" in a.error


def test_vocab_bytes_reads_byte_fallback_and_byte_level_pieces(byte_level, spiece):
    for tok in (byte_level, spiece):
        vb = vocab_bytes(tok)
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            got = b"".join(vb.pieces[i] for i in ids)
            assert got in (text.encode(), b" " + text.encode())
        assert all(vb.pieces[i] == b"" for i in vb.special)
    assert vocab_bytes(spiece).family == "sentencepiece" and vocab_bytes(byte_level).family == "byte-level"
