"""Float64 oracle of the KD loss, written from DESIGN §3 with autograd doing the calculus.

Deliberately a per-row loop over plain formulas (no shared helper with the kernels): slow, obvious.
"""

from __future__ import annotations

import torch


def oracle_kd_loss(logits, labels, topk_ids, topk_logits, teacher_lse=None, *, temperature=1.0, alpha=1.0,
                   gamma=1.0, mode="renorm", ignore_index=-100):  # fmt: skip
    """Returns (loss, ce [N], kl [N]) in float64; loss differentiable w.r.t. ``logits``."""
    z_all = logits.double() if logits.dtype != torch.float64 else logits
    T = float(temperature)
    ces, kls = [], []
    for n in range(z_all.shape[0]):
        z = z_all[n]
        y = int(labels[n])
        if y == ignore_index:
            ces.append(z.sum() * 0.0)
            kls.append(z.sum() * 0.0)
            continue
        ces.append(torch.logsumexp(z, 0) - z[y])
        log_q = z / T - torch.logsumexp(z / T, 0)
        slots = [j for j in range(topk_ids.shape[1]) if int(topk_ids[n, j]) >= 0]
        t = topk_logits[n].double() / T
        if mode == "renorm":
            log_p = {j: t[j] - torch.logsumexp(t[slots], 0) for j in slots} if slots else {}
        else:
            log_p = {j: t[j] - float(teacher_lse[n]) for j in slots}
        kl = z.sum() * 0.0
        for j in slots:
            p = torch.exp(log_p[j])
            if p > 0:
                kl = kl + p * (log_p[j] - log_q[int(topk_ids[n, j])])
        if mode == "tail":
            p_tail = max(1.0 - sum(float(torch.exp(log_p[j])) for j in slots), 0.0)
            in_set = torch.zeros_like(z, dtype=torch.bool)
            for j in slots:
                in_set[int(topk_ids[n, j])] = True
            if p_tail > 0:
                # the student's tail mass as the complement's logsumexp, never 1 - Σq
                log_q_tail = torch.logsumexp(log_q[~in_set], 0)
                kl = kl + p_tail * (torch.log(torch.tensor(p_tail, dtype=torch.float64)) - log_q_tail)
        kls.append(kl)
    ce = torch.stack(ces)
    kl = torch.stack(kls)
    n_valid = max(int((labels != ignore_index).sum()), 1)
    loss = (alpha * ce + gamma * T * T * kl).sum() / n_valid
    return loss, ce, kl
