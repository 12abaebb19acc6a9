"""The fused-linear KD loss, torch backend: ``fused_kd_loss(hidden @ weight.T + bias, ...)`` without the [N, V] logits.

Why it wins: the logits path holds the student's logits [N, V] and their gradient [N, V] (at N = 2048,
V = 262,144 that is 2 + 2 GiB in fp32); here logits exist one tile [R, C] at a time (R rows x C vocabulary
columns, sized from a memory budget), so the loss's extra memory is a few tiles plus an fp32 [N, D] accumulator.

The price is one more matmul: the forward computes each tile's logits and folds them into per-row online
logsumexp states; the backward recomputes the tile and turns it into the tile's gradient, then into
``grad_hidden += g @ W_tile`` and ``grad_weight_tile += g.T @ hidden_rows``. The backward walks the vocabulary in the
outer loop, so each [C, D] slice of ``grad_weight`` is accumulated in fp32 over all rows and written once (a
row-outer loop would read and write the whole [V, D] gradient once per row chunk).

Numerics as ``kd_torch`` (the chunked torch twin of the Triton kernel): logsumexps kept as (m, r) with
lse = m + log1p(r), r the sum of e^(x - m) over all elements but one maximum, merged across tiles exactly, so
confident rows keep their relative accuracy; expm1 at the label; the tail from the complement logsumexp (the
top-k ids masked out in the vocabulary pass). Matmuls run in the inputs' dtype (as ``lm_head`` would) and every
sum over tiles in fp32.
"""

from __future__ import annotations

import torch

from ddk_kernels.kd_torch import teacher_probs
from ddk_kernels.spec import TAIL, KDSpec

DEFAULT_MEMORY_BUDGET = 128 << 20  # bytes of tile temporaries (~5 fp32 [R, C] buffers alive at once)
_TILE_BUFFERS = 5
_MAX_TILE = 1 << 21  # 8 MiB fp32 tiles: larger ones were slower on CPU (cache), N=2048 V=262,144: 23.5 s vs 20.6 s
_MIN_COLS = 512  # narrower tiles make the [R, D] gradient accumulation memory-bound
_MAX_ROWS = 2048


def tile_shape(n_rows: int, vocab: int, memory_budget: int | None, chunk_rows: int | None, chunk_vocab: int | None):
    """(rows R, columns C) of one logits tile: explicit sizes win, else ~memory_budget bytes of temporaries (at most
    ``_MAX_TILE`` elements)."""
    elems = min(_MAX_TILE, max(1, int(memory_budget or DEFAULT_MEMORY_BUDGET) // (4 * _TILE_BUFFERS)))
    rows = chunk_rows or min(n_rows, _MAX_ROWS, max(1, elems // min(vocab, _MIN_COLS)))
    cols = chunk_vocab or min(vocab, max(_MIN_COLS, elems // max(rows, 1)))
    return max(1, int(rows)), max(1, int(cols))


def _block_state(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] fp32 (may hold -inf) -> (m, r) [R]: max and Σ_{all but one max} e^(x - m) (ties count)."""
    m, at = x.max(dim=1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.sub(x, m_safe[:, None]).exp_()
    e.scatter_(1, at[:, None], 0.0)  # one maximum out exactly: 1 - softmax(max) = r / (1 + r) never cancels
    return m, e.sum(dim=1)


def _merge(m: torch.Tensor, r: torch.Tensor, mb: torch.Tensor, rb: torch.Tensor):
    """Exact merge of two (m, r) states; a state with m = -inf is empty."""
    a_big = m >= mb
    hi, lo = torch.where(a_big, m, mb), torch.where(a_big, mb, m)
    r_hi, r_lo = torch.where(a_big, r, rb), torch.where(a_big, rb, r)
    lo_term = torch.where(torch.isfinite(lo), (1.0 + r_lo) * torch.exp(lo - torch.where(torch.isfinite(hi), hi, lo)),
                          torch.zeros_like(r))  # fmt: skip
    merged = torch.where(torch.isfinite(hi), r_hi + lo_term, torch.zeros_like(r))
    return hi, merged


def _local(idx: torch.Tensor, start: int, cols: int):
    """Tile-local column of ``idx`` and whether it falls in [start, start + cols)."""
    loc = idx - start
    inside = (loc >= 0) & (loc < cols)
    return loc.clamp(0, cols - 1), inside


def _tile_in_topk(loc: torch.Tensor, inside: torch.Tensor, cols: int) -> torch.Tensor:
    mask = torch.zeros(loc.shape[0], cols + 1, dtype=torch.bool, device=loc.device)
    mask.scatter_(1, torch.where(inside, loc, torch.full_like(loc, cols)), True)
    return mask[:, :cols]


class _Teacher:
    """Per-row teacher side and labels, computed once per call: ids, ok, p, log p, P, p_tail, y, valid."""

    def __init__(self, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec):
        self.ids, ok, self.p, self.logp, self.P, self.p_tail = teacher_probs(topk_ids, topk_logits, teacher_lse, spec)
        self.ok = ok
        self.valid = labels != spec.ignore_index
        self.y = torch.where(self.valid, labels, torch.zeros_like(labels))


def _logits(hidden, weight, bias, rs, re, cs, ce):
    h, w = hidden[rs:re], weight[cs:ce]
    z = h @ w.T if bias is None else torch.addmm(bias[cs:ce], h, w.T)
    return z.float()


def forward_stats(hidden, weight, bias, tch: _Teacher, spec: KDSpec, rows: int, cols: int):
    """Per-row ce [N], kl [N] and stats [N, 8] (m1, l1, mT, lT, mC, lC as ``kd_torch``), all fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    dev, inv_t, tail = hidden.device, spec.inv_t, spec.mode == TAIL
    f32 = dict(dtype=torch.float32, device=dev)
    ninf = torch.full((N,), float("-inf"), **f32)
    m1, r1, mT, rT, mC, rC = ninf.clone(), torch.zeros(N, **f32), ninf.clone(), torch.zeros(N, **f32), ninf.clone(), \
        torch.zeros(N, **f32)  # fmt: skip
    zy, zk = torch.zeros(N, **f32), torch.zeros(tch.ids.shape, **f32)
    for cs in range(0, V, cols):
        ce_ = min(V, cs + cols)
        for rs in range(0, N, rows):
            re = min(N, rs + rows)
            z = _logits(hidden, weight, bias, rs, re, cs, ce_)
            sl = slice(rs, re)
            m1[sl], r1[sl] = _merge(m1[sl], r1[sl], *_block_state(z))
            zt = z if inv_t == 1.0 else z * inv_t
            if inv_t != 1.0:
                mT[sl], rT[sl] = _merge(mT[sl], rT[sl], *_block_state(zt))
            loc, inside = _local(tch.y[sl], cs, ce_ - cs)
            zy[sl] = torch.where(inside, z.gather(1, loc[:, None]).squeeze(1), zy[sl])
            kloc, kin = _local(tch.ids[sl], cs, ce_ - cs)
            zk[sl] = torch.where(kin, z.gather(1, kloc), zk[sl])
            if tail:
                masked = zt.masked_fill(_tile_in_topk(kloc, kin & tch.ok[sl], ce_ - cs), float("-inf"))
                mC[sl], rC[sl] = _merge(mC[sl], rC[sl], *_block_state(masked))
            del z, zt
    l1 = torch.log1p(r1)
    if inv_t == 1.0:
        mT, lT = m1, l1
    else:
        lT = torch.log1p(rT)
    ce = (m1 - zy) + l1
    logq = (zk * inv_t - mT[:, None]) - lT[:, None]
    kl = torch.where(tch.p > 0, tch.p * (tch.logp - logq), torch.zeros_like(tch.p)).sum(dim=1)
    stats = torch.zeros(N, 8, **f32)
    if tail:
        lC = torch.log1p(rC)
        log_qtail = (mC - mT) + (lC - lT)
        pt = tch.p_tail
        safe_pt = torch.where(pt > 0, pt, torch.ones_like(pt))
        kl = kl + torch.where(pt > 0, pt * (torch.log(safe_pt) - log_qtail), torch.zeros_like(kl))
        finite = torch.isfinite(mC)
        stats[:, 4] = torch.where(finite, mC, torch.zeros_like(mC))
        stats[:, 5] = torch.where(finite, lC, torch.zeros_like(lC))
    for col, val in enumerate((m1, l1, mT, lT)):
        stats[:, col] = val
    v = tch.valid
    stats = torch.where(v[:, None], stats, torch.zeros_like(stats))
    return torch.where(v, ce, torch.zeros_like(ce)), torch.where(v, kl, torch.zeros_like(kl)), stats


class _Coefs:
    """Per-row constants of the backward, 0 on ignored rows: the gradient of a tile is
    ``ce·softmax(z) + kl·softmax(z/T) − tail·c (off the ids) − Σ_ids c_kl·p``, with the label entry recomputed exactly.
    """

    def __init__(self, tch: _Teacher, stats, c_ce, c_kl, spec: KDSpec):
        v = tch.valid.to(torch.float32)
        m1, l1, mT, lT, mC, lC = (stats[:, i] for i in range(6))
        inf = torch.full_like(m1, float("inf"))
        self.lse1 = torch.where(tch.valid, m1 + l1, inf)  # exp(z - inf) = 0 on ignored rows: no 0·inf
        self.lseT = torch.where(tch.valid, mT + lT, inf)
        self.lseC = torch.where(tch.valid, mC + lC, inf)
        self.m1, self.l1, self.mT, self.lT = m1, l1, mT, lT
        self.ce, self.kl = c_ce * v, c_kl * tch.P * v
        self.tail = c_kl * tch.p_tail * v
        self.ids = -(c_kl * tch.p) * v[:, None]
        self.one_t = spec.inv_t == 1.0


def tile_grad(z, rs, re, cs, tch: _Teacher, k: _Coefs, spec: KDSpec):
    """d loss / d z of one tile z [R, C] fp32 at rows [rs, re), columns from cs (``k``: the per-row constants)."""
    R, C = z.shape
    sl = slice(rs, re)
    inv_t = spec.inv_t
    grad = torch.sub(z, k.lse1[sl, None]).exp_()  # softmax(z)
    zt = z if k.one_t else z * inv_t
    if k.one_t:
        grad.mul_((k.ce[sl] + k.kl[sl])[:, None])
    else:
        grad.mul_(k.ce[sl, None]).add_(torch.sub(zt, k.lseT[sl, None]).exp_().mul_(k.kl[sl, None]))
    # The label entry, exactly: softmax_y - 1 as expm1 (a confident row's 1 - q_y would be rounding otherwise).
    loc, inside = _local(tch.y[sl], cs, C)
    inside = inside & tch.valid[sl]
    z_y = z.gather(1, loc[:, None]).squeeze(1)
    exact = k.ce[sl] * torch.expm1((z_y - k.m1[sl]) - k.l1[sl])
    exact = exact + k.kl[sl] * torch.exp((z_y * inv_t - k.mT[sl]) - k.lT[sl])
    grad.scatter_(1, loc[:, None], torch.where(inside, exact, grad.gather(1, loc[:, None]).squeeze(1))[:, None])
    kloc, kin = _local(tch.ids[sl], cs, C)
    if spec.mode == TAIL:
        comp = torch.sub(zt, k.lseC[sl, None]).exp_().mul_(k.tail[sl, None])
        grad.sub_(comp.masked_fill_(_tile_in_topk(kloc, kin & tch.ok[sl], C), 0.0))
        del comp
    grad.scatter_add_(1, kloc, torch.where(kin, k.ids[sl], torch.zeros_like(k.ids[sl])))  # padded slots: p = 0
    return grad


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, the product in b's dtype (as the logits path's matmul backward) unless it is fp32."""
    if b.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc.add_((a.to(b.dtype) @ b).float())


class TorchLinearKDLoss(torch.autograd.Function):
    """``fused_kd_loss(hidden @ weight.T + bias)`` over logits tiles; saves per-row stats, recomputes in backward.

    Gradient w.r.t. the logits z as ``TorchKDLoss`` (DESIGN §3); then d/d hidden = g @ W, d/d W = g.T @ hidden,
    d/d bias = Σ_rows g, each summed over tiles in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec, tile):
        tch = _Teacher(labels, topk_ids, topk_logits, teacher_lse, spec)
        rows, cols = tile
        with torch.no_grad():
            ce, kl, stats = forward_stats(hidden, weight, bias, tch, spec, rows, cols)
        n_valid = tch.valid.sum().clamp_min(1).to(torch.float32)
        loss = (spec.alpha * ce + (spec.gamma * spec.temperature * spec.temperature) * kl).sum() / n_valid
        tlse = teacher_lse if spec.uses_lse else stats
        ctx.save_for_backward(hidden, weight, bias, labels, topk_ids, topk_logits, tlse, stats, n_valid)
        ctx.spec, ctx.tile = spec, tile
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        hidden, weight, bias, labels, topk_ids, topk_logits, tlse, stats, n_valid = ctx.saved_tensors
        spec, (rows, cols) = ctx.spec, ctx.tile
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        tch = _Teacher(labels, topk_ids, topk_logits, tlse if spec.uses_lse else None, spec)
        g = grad_loss.to(torch.float32) / n_valid
        coefs = _Coefs(tch, stats, g * spec.alpha, g * (spec.gamma * spec.temperature), spec)
        N, V = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None
        for cs in range(0, V, cols):
            ce_ = min(V, cs + cols)
            w_tile = weight[cs:ce_]
            gw = torch.zeros(w_tile.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for rs in range(0, N, rows):
                re = min(N, rs + rows)
                with torch.no_grad():
                    z = _logits(hidden, weight, bias, rs, re, cs, ce_)
                    gz = tile_grad(z, rs, re, cs, tch, coefs, spec)
                    del z
                    if need_h:
                        _accumulate(grad_h[rs:re], gz, w_tile)
                    if need_w:
                        _accumulate(gw, gz.T, hidden[rs:re])
                    if need_b:
                        grad_b[cs:ce_] += gz.sum(dim=0)
                del gz
            if need_w:
                grad_w[cs:ce_].copy_(gw)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None
