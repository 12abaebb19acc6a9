"""Cross-tokenizer KD losses at paired positions, one class per ``--cross-tokenizer`` method (registered by name).

Every method sees the student's flat logits [B·Ls, Vs], the teacher batch (stored top-k at the teacher's positions)
and the :class:`~.batch.StudentBatch` pairs, and returns the KD term summed over paired positions (the trainer adds
``alpha``·CE over every labelled student position and divides by their count).

- ``exact-map``: each stored teacher id whose bytes equal a student token's bytes becomes that student id (teacher
  EOS -> student EOS); ids with the same bytes merge (their probabilities add). The KL runs through
  :func:`ddk_kernels.fused_kd_loss` in ``tail`` mode with the unmapped slots padded, so the teacher's mass on
  unmapped ids (and beyond its top-k) is the tail bucket the student's remaining mass is matched to.
- ``uld``: Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two distributions'
  probabilities sorted in decreasing order, which needs no id correspondence. Offline the teacher is known only at
  its top-k: the distance is summed over the k largest probabilities of each side, plus one term for the rest,
  ``|tail_T - tail_S|`` (the teacher's mass beyond its top-k against the student's beyond its own top k). By the
  triangle inequality this is a lower bound of the full sorted distance, equal to it when the two tails are
  ordered alike. Both sides use the run's temperature; the term is weighted by ``kd_weight`` (no T²: it is not a KL).
"""

from __future__ import annotations

from typing import Any

import torch

from ddk_offline.distillation.crosstok.batch import IGNORE_INDEX
from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    METHODS[cls.name] = cls
    return cls


def _paired(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids, logits [P, k] and lse [P] at the paired teacher positions."""
    pt = batch.student.pair_teacher
    k = batch.topk_ids.shape[-1]
    ids = batch.topk_ids.reshape(-1, k).index_select(0, pt)
    logits = batch.topk_logits.reshape(-1, k).index_select(0, pt)
    return ids, logits, batch.teacher_lse.reshape(-1).index_select(0, pt)


class CrossMethod:
    """The interface: ``kd(flat_logits, batch, spec) -> (kd_sum tensor, kd_sum float)`` plus log fields."""

    name = ""

    def __init__(self, teacher: VocabBytes, student: VocabBytes) -> None:
        self.teacher, self.student = teacher, student

    def kd(self, flat: torch.Tensor, batch: Any, spec: Any) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def bind(self, reader: Any, say: Any) -> None:
        """Read what the method needs from the dump besides the rows (dskd: the teacher matrices)."""

    def attach(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
        """Add the method's own trainable parameters to the optimiser (none here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def log_fields(self) -> dict[str, float]:
        """Extra numbers for the metrics row since the last call (e.g. the mapped teacher mass)."""
        return {}


def id_map(teacher: VocabBytes, student: VocabBytes) -> torch.Tensor:
    """[Vt] int64: the student id with the same bytes as each teacher id, -1 where there is none.

    A plain piece wins over a byte-fallback spelling of the same byte; teacher EOS maps to student EOS.
    """
    by_bytes: dict[bytes, int] = {}
    for i, piece in enumerate(student.pieces):
        if piece and (piece not in by_bytes or by_bytes[piece] in student.fallback):
            by_bytes[piece] = i
    out = torch.tensor([by_bytes.get(p, -1) if p else -1 for p in teacher.pieces], dtype=torch.int64)
    if teacher.eos is not None and student.eos is not None:
        out[teacher.eos] = student.eos
    return out


def merge_duplicates(ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of a row mapped to the same id become one: the first keeps logsumexp of their logits, the others -1."""
    valid = ids >= 0
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
    duplicate = (same & earlier).any(dim=2)
    merged = torch.logsumexp(logits[:, None, :].masked_fill(~same, float("-inf")), dim=2)
    logits = torch.where(valid, merged, logits)
    return ids.masked_fill(duplicate, -1), logits


@register
class ExactMap(CrossMethod):
    name = "exact-map"

    def __init__(self, teacher: VocabBytes, student: VocabBytes) -> None:
        super().__init__(teacher, student)
        self.map = id_map(teacher, student)
        # Mapped teacher mass and all top-k teacher mass over the paired positions since the last log, kept on the
        # device so a step costs no host sync for it (read in log_fields).
        self._mass = torch.zeros(2, dtype=torch.float64)

    def kd(self, flat, batch, spec):
        from ddk_kernels import fused_kd_loss

        sb = batch.student
        t_ids, t_logits, lse = _paired(batch)
        s_ids = self.map.to(t_ids.device)[t_ids.clamp_min(0)].masked_fill(t_ids < 0, -1)
        with torch.no_grad():
            p = torch.exp(t_logits.float() / spec.temperature - lse[:, None])
            self._mass = self._mass.to(p.device) + torch.stack([(p * (s_ids >= 0)).sum(), p.sum()]).double()
        s_ids, scaled = merge_duplicates(s_ids, t_logits.float() / spec.temperature)  # merged at the run's T
        t_logits = scaled * spec.temperature
        labels = sb.labels.reshape(-1).index_select(0, sb.pair_student)
        if len(labels) == 0:
            return flat.sum() * 0.0, 0.0
        loss, _, kl = fused_kd_loss(
            flat.index_select(0, sb.pair_student),
            labels,
            s_ids,
            t_logits,
            lse,
            temperature=spec.temperature,
            alpha=0.0,
            gamma=spec.gamma,
            mode="tail",
            ignore_index=IGNORE_INDEX,
            return_per_row=True,
        )
        rows = int((labels != IGNORE_INDEX).sum())
        return loss * rows, float(kl.sum())

    def log_fields(self):
        mapped, total = self._mass.tolist()
        self._mass = torch.zeros_like(self._mass)
        return {"mapped_mass": mapped / total} if total > 0 else {}


@register
class ULD(CrossMethod):
    name = "uld"

    def kd(self, flat, batch, spec):
        sb = batch.student
        _, t_logits, lse = _paired(batch)
        if len(lse) == 0:
            return flat.sum() * 0.0, 0.0
        k = t_logits.shape[1]
        p = torch.exp(t_logits.float() / spec.temperature - lse[:, None]).sort(dim=1, descending=True).values
        z = flat.index_select(0, sb.pair_student).float() / spec.temperature
        top = z.topk(min(k, z.shape[1]), dim=1).values
        q = torch.exp(top - torch.logsumexp(z, dim=1, keepdim=True))
        tail_t = (1.0 - p.sum(dim=1)).clamp_min(0.0)
        tail_s = (1.0 - q.sum(dim=1)).clamp_min(0.0)
        dist = (p[:, : q.shape[1]] - q).abs().sum(dim=1) + (tail_t - tail_s).abs()
        total = dist.sum()
        return spec.gamma * total, float(total.detach())
