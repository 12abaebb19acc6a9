"""The cross-tokenizer losses (issue #16) against hand computations: the byte-equal id map, merged duplicates, the
offline ULD distance, and the per-byte statistics the DDK sampler gets."""

from __future__ import annotations

import math

import pytest
import torch

from ddk_offline.distillation.crosstok.methods import ULD, ExactMap, id_map, merge_duplicates
from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes
from ddk_offline.distillation.data import Batch
from ddk_offline.distillation.loss import LossSpec


def _vocab(pieces, *, eos=None, fallback=()):
    return VocabBytes(tuple(pieces), "byte-level", frozenset(), frozenset(), eos, None, "x", frozenset(fallback))


TEACHER = _vocab([b"", b"a", b"b", b"ab", b"zz", b"a"], eos=0)  # id 5 spells "a" again
STUDENT = _vocab([b"", b"a", b"ab", b"b", b"a"], eos=0, fallback=[4])  # id 4: a byte-fallback "a"


def test_id_map_matches_bytes_prefers_plain_pieces_and_maps_eos():
    assert id_map(TEACHER, STUDENT).tolist() == [0, 1, 3, 2, -1, 1]


def test_duplicates_merge_into_one_slot_with_summed_probability():
    ids = torch.tensor([[1, 3, 1, -1]])
    logits = torch.tensor([[2.0, 1.0, 0.5, 9.0]])
    merged_ids, merged = merge_duplicates(ids, logits)
    assert merged_ids.tolist() == [[1, 3, -1, -1]]
    assert merged[0, 0].item() == pytest.approx(math.log(math.exp(2.0) + math.exp(0.5)))
    assert merged[0, 1].item() == pytest.approx(1.0)


def _batch(topk_ids, topk_logits, lse, labels):
    """One teacher row of 2 positions and one student row of 2 positions, paired position 0 <-> 0."""
    from ddk_offline.distillation.crosstok.batch import StudentBatch

    student = StudentBatch(
        input_ids=torch.tensor([[1, 2]]),
        labels=torch.tensor([labels]),
        pair_student=torch.tensor([0]),
        pair_teacher=torch.tensor([0]),
        scored_student=torch.tensor([[True, False]]),
        scored_teacher=torch.tensor([[True, False]]),
        nbytes=torch.tensor([2]),
    )
    k = len(topk_ids)
    return Batch(
        input_ids=torch.tensor([[1, 3]]),
        labels=torch.tensor([[3, -100]]),
        topk_ids=torch.tensor([[topk_ids, [0] * k]]),
        topk_logits=torch.tensor([[topk_logits, [0.0] * k]]),
        teacher_lse=torch.tensor([[lse, 0.0]]),
        teacher_nll=torch.tensor([[0.7, 0.0]]),
        domain=torch.tensor([0]),
        student=student,
    )


def test_exact_map_is_the_tail_mode_kl_over_student_ids():
    # Teacher top-2: "ab" (p = 0.5) and "zz" (unmapped, p = 0.25); its mass beyond the top-k is 0.25.
    lse = 0.0
    batch = _batch([3, 4], [math.log(0.5), math.log(0.25)], lse, [2, -100])
    z = torch.tensor([[0.3, -0.2, 1.1, 0.4, -1.0], [0.0] * 5], requires_grad=True)
    method = ExactMap(TEACHER, STUDENT)
    kd, value = method.kd(z, batch, LossSpec(alpha=1.0, gamma=1.0, temperature=1.0))
    q = torch.softmax(z[0].detach(), 0)
    # Student "ab" is id 2; every other student id is the tail bucket, matched to the teacher's 0.5 (0.25 + 0.25).
    want = 0.5 * math.log(0.5 / q[2]) + 0.5 * math.log(0.5 / (1 - q[2]))
    assert kd.item() == pytest.approx(want, rel=1e-5) and value == pytest.approx(want, rel=1e-5)
    kd.backward()
    assert z.grad[1].abs().sum() == 0 and z.grad[0].abs().sum() > 0  # only the paired position learns
    assert method.log_fields() == {"mapped_mass": pytest.approx(0.5 / 0.75)}


def test_uld_is_the_sorted_l1_distance_with_a_tail_term():
    batch = _batch([1, 2], [math.log(0.6), math.log(0.3)], 0.0, [1, -100])
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5], [0.0] * 5], requires_grad=True)
    kd, value = ULD(TEACHER, STUDENT).kd(z, batch, LossSpec(alpha=1.0, gamma=2.0, temperature=1.0))
    q = torch.softmax(z[0].detach(), 0).sort(descending=True).values
    want = abs(0.6 - q[0]) + abs(0.3 - q[1]) + abs(0.1 - (1 - q[0] - q[1]))
    assert value == pytest.approx(float(want), rel=1e-5) and kd.item() == pytest.approx(2 * float(want), rel=1e-5)


def test_the_loss_step_hands_ddk_per_byte_sums_of_the_same_bytes():
    from ddk_offline.distillation.crosstok.session import CrossTokenizer

    batch = _batch([3, 4], [math.log(0.5), math.log(0.25)], 0.0, [2, -100])
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(5, 5)
    model.forward = lambda input_ids: type("Out", (), {"logits": model.emb(input_ids)})()
    cross = CrossTokenizer.__new__(CrossTokenizer)
    cross.method = ExactMap(TEACHER, STUDENT)
    r = cross.loss_step(model, batch, LossSpec(alpha=1.0, gamma=0.2), positions=1, total=1)
    ce = torch.nn.functional.cross_entropy(model.emb(torch.tensor([1])), torch.tensor([2])).item()
    assert r["row_n"].tolist() == [2]  # bytes, not positions: DDK's gaps are per byte
    assert r["row_ce"].tolist() == pytest.approx([ce]) and r["row_nll"].tolist() == pytest.approx([0.7])
    assert model.emb.weight.grad is not None
