"""The eager torch KD loss: what a user writes by hand (log_softmax + gather), fp32, unfused.

It is the baseline the benchmark times and the tests check against the float64 oracle, kept here
(importable by both ``tests/`` and ``ddk_offline.bench_kernels``) so the two cannot drift.
Same definition as ``fused_kd_loss`` (DESIGN §3), including a correct tail (complement logsumexp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    mode: str = "renorm",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager loss with autograd. Shapes as ``fused_kd_loss``. Returns (loss, ce [N], kl [N]) fp32."""
    z = logits.float()
    valid = labels != ignore_index
    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
    logq = F.log_softmax(z / temperature, dim=-1)
    ok = topk_ids >= 0
    ids = topk_ids.long().clamp_min(0)
    u = topk_logits.float() / temperature
    if mode == "tail":
        logp = u - teacher_lse.float()[:, None]
    else:
        logp = F.log_softmax(u.masked_fill(~ok, float("-inf")), dim=-1)
    p = torch.where(ok, logp.exp(), torch.zeros_like(u))
    head = torch.where(p > 0, p * (logp - logq.gather(1, ids)), torch.zeros_like(p))
    kl = head.sum(dim=1)
    if mode == "tail":
        p_tail = (1.0 - p.sum(dim=1)).clamp_min(0.0)
        in_set = torch.zeros(z.shape[0], z.shape[1] + 1, dtype=torch.bool, device=z.device)
        in_set.scatter_(1, torch.where(ok, ids, torch.full_like(ids, z.shape[1])), True)
        log_qtail = torch.logsumexp(logq.masked_fill(in_set[:, :-1], float("-inf")), dim=1)
        safe_pt = torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))
        kl = kl + torch.where(p_tail > 0, p_tail * (safe_pt.log() - log_qtail), torch.zeros_like(kl))
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    n = valid.sum().clamp_min(1)
    loss = (alpha * ce + gamma * temperature * temperature * kl).sum() / n
    return loss, ce, kl
