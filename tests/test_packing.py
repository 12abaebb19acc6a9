"""Packing: EOS per document, exact seq_len cuts, dropped remainder, token cap, exact interleaved val split."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from ddk_offline.dump.corpus import Document
from ddk_offline.dump.packing import Packer, is_val


@pytest.mark.parametrize("f", [0.0, 0.05, 0.1, 0.2, 1 / 3, 0.5, 0.9])
def test_val_split_is_exact_after_every_prefix(f):
    fr = Fraction(repr(f))
    picks = [is_val(i, fr) for i in range(500)]
    for n in range(501):
        assert sum(picks[:n]) == math.floor(n * fr + Fraction(1, 2))  # round(n * f), half up
    gaps = np.diff(np.flatnonzero(picks))
    if f > 0 and len(gaps):
        assert gaps.max() - gaps.min() <= 1  # evenly interleaved


class _CharTokenizer:
    """Token id = character code; EOS = 0. Enough to check packing arithmetic exactly."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _docs():
    return [
        Document("a", "hello", "x:1"),
        Document("b", "xy", "x:2"),
        Document("a", "   ", "x:3"),
        Document("a", "world!", "x:4"),
        Document("b", "", "x:5"),
        Document("a", "abc", "x:6"),
    ]


def test_packing_concatenates_documents_with_eos_and_drops_the_remainder():
    packer = Packer(_CharTokenizer(), seq_len=4, val_fraction=0.0)
    seqs = list(packer.pack(_docs()))
    stream = [ord(c) for c in "hello"] + [0] + [ord(c) for c in "world!"] + [0] + [ord(c) for c in "abc"] + [0]
    a = [s for s in seqs if s.domain == "a"]
    assert [s.seq_index for s in a] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in a]), stream[:16])
    st = packer.stats["a"]
    assert (st.documents, st.empty_documents, st.tokens, st.dropped_tokens) == (3, 1, 17, 1)
    assert packer.stats["b"].empty_documents == 1 and packer.stats["b"].dropped_tokens == 3
    assert packer.stats["b"].sequences == {"train": 0, "val": 0}


def test_token_cap_and_val_assignment():
    packer = Packer(_CharTokenizer(), seq_len=2, val_fraction=0.5, max_tokens_per_domain=5)
    seqs = [s for s in packer.pack(_docs()) if s.domain == "a"]
    # f = 1/2: sequence 0 goes to val (round(1/2) = 1, half up), sequence 1 to train; the cap is 5 // 2 = 2.
    assert [(s.split, s.seq_index) for s in seqs] == [("val", 0), ("train", 0)]
    assert packer.stats["a"].unread_documents == 2  # "world!" and "abc" were never needed
