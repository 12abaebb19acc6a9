"""The student's half of a cross-tokenizer batch: its token rows and the position pairs with the teacher's rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from ddk_offline.distillation.crosstok.align import RowAlignment

IGNORE_INDEX = -100  # the trainer's (distillation.data.IGNORE_INDEX); repeated to keep this module import-light


@dataclass
class StudentBatch:
    """B student rows padded to Ls (the batch's longest), aligned with a teacher batch of B rows of L tokens.

    Attributes:
        input_ids: [B, Ls] int64 (padding: the student's EOS, never labelled).
        labels: [B, Ls] int64, ``input_ids`` shifted left; ``IGNORE_INDEX`` on padding, at each row's last token,
            before the student's BOS and on refused rows.
        pair_student: [P] int64 flat indices (b·Ls + position) of paired student positions.
        pair_teacher: [P] int64 flat indices (b·L + position) of their teacher positions.
        scored_student: [B, Ls] bool, positions predicting the scored bytes.
        scored_teacher: [B, L] bool, the teacher's positions predicting the same bytes.
        nbytes: [B] int64 bytes of each row's scored span.
        teacher_hidden: [B, L, D_t] float32 teacher hidden states of the rows (dskd with a dump that has them).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pair_student: torch.Tensor
    pair_teacher: torch.Tensor
    scored_student: torch.Tensor
    scored_teacher: torch.Tensor
    nbytes: torch.Tensor
    teacher_hidden: torch.Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> StudentBatch:
        moved = {
            f.name: _apply(getattr(self, f.name), lambda t: t.to(device, non_blocking=non_blocking))
            for f in fields(self)
        }
        return StudentBatch(**moved)

    def pin_memory(self) -> StudentBatch:
        return StudentBatch(**{f.name: _apply(getattr(self, f.name), lambda t: t.pin_memory()) for f in fields(self)})

    @property
    def labelled(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _apply(t: torch.Tensor | None, fn) -> torch.Tensor | None:
    return fn(t) if t is not None else None


def student_batch(rows: Sequence[RowAlignment], *, teacher_len: int, pad_id: int, bos_id: int | None) -> StudentBatch:
    """Stack aligned rows into tensors, padded to the batch's longest row (refused rows become all-padding rows that
    carry no label)."""
    B = len(rows)
    seq_len = max([2, *(len(r.student_ids) for r in rows)])
    ids = np.full((B, seq_len), pad_id, np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, np.int64)
    scored_s = np.zeros((B, seq_len), bool)
    scored_t = np.zeros((B, teacher_len), bool)
    pair_s, pair_t = [], []
    for b, r in enumerate(rows):
        n = len(r.student_ids)
        if r.error or n == 0:
            continue
        ids[b, :n] = r.student_ids
        labels[b, : n - 1] = r.student_ids[1:]
        if bos_id is not None:
            labels[b, : n - 1][r.student_ids[1:] == bos_id] = IGNORE_INDEX
        scored_s[b, r.scored_student] = True
        scored_t[b, r.scored_teacher] = True
        pair_s.append(b * seq_len + r.pair_student.astype(np.int64))
        pair_t.append(b * teacher_len + r.pair_teacher.astype(np.int64))
    cat = lambda parts: torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
    return StudentBatch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        pair_student=cat(pair_s),
        pair_teacher=cat(pair_t),
        scored_student=torch.from_numpy(scored_s),
        scored_teacher=torch.from_numpy(scored_t),
        nbytes=torch.tensor([0 if r.error else r.nbytes for r in rows], dtype=torch.int64),
    )
