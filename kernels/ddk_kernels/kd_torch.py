"""Pure-torch twin of the fused KD loss: chunked over rows, fp32 accumulation, the CPU path.

Same math and the same numerics as ``kd_triton`` (see its module docstring): logsumexps kept as
(m, log1p(r)), expm1 at the label, the tail mass from the complement logsumexp. Memory: the forward
keeps only per-row statistics (a few floats per row); the backward recomputes each chunk from the
logits, so at most one chunk of fp32 temporaries (a handful of [chunk, V] buffers) is alive at a time.
"""

from __future__ import annotations

import torch

from ddk_kernels.spec import TAIL, KDSpec

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # 4 MiB per fp32 [chunk, V] temporary: cache-friendly, ~5 alive at once


def _chunk_rows(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, min(n_rows, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1)))


def _lse_state(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, V] fp32 (may hold -inf) -> (m, l) [R]: logsumexp = m + l, l = log1p(Σ_{all but one max} e^{x-m})."""
    m = x.amax(dim=1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    is_max = x == m[:, None]
    e = torch.exp(x - m_safe[:, None]).masked_fill_(is_max, 0.0)
    rest = e.sum(dim=1) + (is_max.sum(dim=1).to(torch.float32) - 1.0)  # not (sum + count) - 1: that rounds to ulp(1)
    return m, torch.log1p(rest)


def teacher_probs(topk_ids, topk_logits, teacher_lse, spec: KDSpec):
    """Teacher side per row: (ids int64 clamped >= 0, ok [R, K] bool, p, log p, P [R], p_tail [R]); fp32."""
    ok = topk_ids >= 0
    ids = topk_ids.long().clamp_min(0)
    u = topk_logits.float() * spec.inv_t
    if spec.mode == TAIL:
        logp = u - teacher_lse.float()[:, None]
        p = torch.where(ok, torch.exp(logp), torch.zeros_like(u))
        p_tail = (1.0 - p.sum(dim=1)).clamp_min(0.0)
    else:
        um = u.masked_fill(~ok, float("-inf"))
        mx = um.amax(dim=1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = torch.where(ok, torch.exp(um - mx), torch.zeros_like(u))
        se = e.sum(dim=1, keepdim=True)
        se = torch.where(se > 0, se, torch.ones_like(se))
        logp = (u - mx) - torch.log(se)
        p = e / se
        p_tail = torch.zeros_like(p[:, 0])
    return ids, ok, p, logp, p.sum(dim=1) + p_tail, p_tail


def _in_topk(ids: torch.Tensor, ok: torch.Tensor, vocab: int) -> torch.Tensor:
    # [R, V] bool membership of the set I; padded slots go to a spare column so scatter never conflicts.
    mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(ok, ids, torch.full_like(ids, vocab)), True)
    return mask[:, :vocab]


def forward_chunk(z, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec):
    """One chunk: z [R, V] any float dtype. Returns ce [R], kl [R], stats [R, 8] fp32 (as the Triton kernel)."""
    R, V = z.shape
    zf = z.float()
    valid, inv_t = labels != spec.ignore_index, spec.inv_t
    ids, ok, p, logp, _P, p_tail = teacher_probs(topk_ids, topk_logits, teacher_lse, spec)
    m1, l1 = _lse_state(zf)
    zt = zf * inv_t
    mT, lT = (m1, l1) if inv_t == 1.0 else _lse_state(zt)
    zy = zf.gather(1, torch.where(valid, labels, torch.zeros_like(labels))[:, None]).squeeze(1)
    ce = (m1 - zy) + l1
    logq = (zf.gather(1, ids) * inv_t - mT[:, None]) - lT[:, None]
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=1)
    stats = torch.zeros(R, 8, dtype=torch.float32, device=z.device)
    if spec.mode == TAIL:
        mC, lC = _lse_state(zt.masked_fill_(_in_topk(ids, ok, V), float("-inf")))
        log_qtail = (mC - mT) + (lC - lT)
        safe_pt = torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))
        kl = kl + torch.where(p_tail > 0, p_tail * (torch.log(safe_pt) - log_qtail), torch.zeros_like(kl))
        finite = torch.isfinite(mC)
        stats[:, 4] = torch.where(finite, mC, torch.zeros_like(mC))
        stats[:, 5] = torch.where(finite, lC, torch.zeros_like(lC))
    for col, val in enumerate((m1, l1, mT, lT)):
        stats[:, col] = val
    zero = torch.zeros_like(ce)
    stats = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return torch.where(valid, ce, zero), torch.where(valid, kl, zero), stats


def backward_chunk(z, labels, topk_ids, topk_logits, teacher_lse, stats, c_ce, c_kl, spec: KDSpec):
    """One chunk of d loss / d z as fp32 [R, V]; c_ce = g·α/n, c_kl = g·γ·T/n (0-dim tensors)."""
    R, V = z.shape
    zf = z.float()
    valid = labels != spec.ignore_index
    ids, ok, p, _logp, P, p_tail = teacher_probs(topk_ids, topk_logits, teacher_lse, spec)
    m1, l1, mT, lT, mC, lC = (stats[:, i : i + 1] for i in range(6))
    y = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
    grad = torch.exp((zf - m1) - l1)
    grad.scatter_(1, y, torch.expm1((zf.gather(1, y) - m1) - l1))  # softmax - onehot, exact when confident
    grad.mul_(c_ce)
    zt = zf * spec.inv_t
    kl_part = torch.exp((zt - mT) - lT).mul_(P[:, None])
    if spec.mode == TAIL:
        comp = torch.exp((zt - mC) - lC).mul_(p_tail[:, None]).masked_fill_(_in_topk(ids, ok, V), 0.0)
        kl_part.sub_(comp)
        del comp
    kl_part.scatter_add_(1, ids, -p)  # padded slots carry p = 0
    grad.add_(kl_part.mul_(c_kl))
    return grad.masked_fill_(~valid[:, None], 0.0)


class TorchKDLoss(torch.autograd.Function):
    """Chunked torch version of ``TritonKDLoss`` (same formula, see there); saves only per-row stats."""

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec, chunk_rows):
        N, V = logits.shape
        step = _chunk_rows(N, V, chunk_rows)
        ce = torch.zeros(N, dtype=torch.float32, device=logits.device)
        kl = torch.zeros_like(ce)
        stats = torch.zeros(N, 8, dtype=torch.float32, device=logits.device)
        for s in range(0, N, step):
            e = min(N, s + step)
            tl_ = teacher_lse[s:e] if spec.uses_lse else None
            ce[s:e], kl[s:e], stats[s:e] = forward_chunk(
                logits[s:e], labels[s:e], topk_ids[s:e], topk_logits[s:e], tl_, spec
            )
        n_valid = (labels != spec.ignore_index).sum().clamp_min(1).to(torch.float32)
        loss = (spec.alpha * ce + (spec.gamma * spec.temperature * spec.temperature) * kl).sum() / n_valid
        tlse = teacher_lse if spec.uses_lse else stats
        ctx.save_for_backward(logits, labels, topk_ids, topk_logits, tlse, stats, n_valid)
        ctx.spec, ctx.step = spec, step
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if getattr(ctx, "grad_written_in_place", False):
            raise RuntimeError("ddk_kernels.fused_kd_loss(inplace_grad=True): the first backward overwrote the logits "
                               "with their gradient, so backward cannot run again; use inplace_grad=False")  # fmt: skip
        logits, labels, topk_ids, topk_logits, tlse, stats, n_valid = ctx.saved_tensors
        spec, step = ctx.spec, ctx.step
        g = grad_loss.to(torch.float32) / n_valid
        c_ce, c_kl = g * spec.alpha, g * (spec.gamma * spec.temperature)
        N = logits.shape[0]
        grad = logits if spec.inplace else torch.empty_like(logits)
        ctx.grad_written_in_place = spec.inplace
        for s in range(0, N, step):
            e = min(N, s + step)
            tl_ = tlse[s:e] if spec.uses_lse else None
            chunk = backward_chunk(logits[s:e], labels[s:e], topk_ids[s:e], topk_logits[s:e], tl_, stats[s:e], c_ce,
                                   c_kl, spec)  # fmt: skip
            grad[s:e].copy_(chunk)
            del chunk
        return grad, None, None, None, None, None, None
