"""Triton fused softmax-KL kernels for the KD loss (DESIGN §3-4): forward, backward, autograd Function.

Why the fusion wins, per row of V logits (b bytes each), forward + backward:
- eager torch (log_softmax for CE, z/T, log_softmax, gather, then autograd): about 6 reads and 6 writes
  of V fp32 values plus the bf16 cast: ~12·V·4 bytes moved and several [N, V] fp32 buffers alive at once.
- this kernel: forward reads the row once (V·b), keeps three online logsumexp states in registers and
  writes 10 floats; backward reads the row once more and writes the gradient once (2·V·b), in place
  over the logits when allowed. 3·V·b in all, no [N, V] fp32 buffer ever exists.

Numerics: every logsumexp is kept as (m, r) with lse = m + log1p(r), r the sum of exp(x - m) over all
elements but one maximum, so 1 - softmax(max) = r / (1 + r) never cancels (confident rows stay exact);
the label gradient uses expm1. In tail mode the student's tail mass comes from a third state over the
vocabulary with the top-k ids masked to -inf (the complement), never from 1 - Σq.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddk_kernels.spec import KDSpec

MAX_BLOCK_V = 4096  # tests lower it to exercise the cross-block merge on small vocabularies
_NEG_INF = float("-inf")


@triton.jit
def _log1p(x):
    # Kahan's trick: exact to a few ulp for tiny x without libdevice (which the interpreter lacks).
    u = 1.0 + x
    safe = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * x / safe)


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0 (Kahan); -1 once exp underflows.
    u = tl.exp(x)
    lu = tl.where(u == 1.0, 1.0, tl.log(u))
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / lu))


@triton.jit
def _merge_block(m, r, x):
    # Fold block x [BLOCK] (masked lanes -inf) into the running state (m, r): Σexp = exp(m)·(1 + r).
    mb = tl.max(x, 0)
    is_max = x == mb
    mb_safe = tl.where(mb == float("-inf"), 0.0, mb)  # an all -inf block: no inf - inf anywhere
    # (count - 1) first: adding 1 to the small sum and then subtracting it would round r to ulp(1)
    rb = tl.sum(tl.where(is_max, 0.0, tl.exp(x - mb_safe)), 0) + (tl.sum(is_max.to(tl.float32), 0) - 1.0)
    m_new = tl.maximum(m, mb)
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = tl.where(m_new == float("-inf"), float("-inf"), tl.minimum(m, mb) - m_new_safe)
    keep_old = m >= mb
    r_big = tl.where(keep_old, r, rb)
    r_small = tl.where(keep_old, rb, r)
    return m_new, r_big + tl.exp(d) * (1.0 + r_small)


@triton.jit
def _teacher_probs(ids_row_ptr, t_row_ptr, tlse_ptr, K, inv_t, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    # ids_row_ptr: [K] int, t_row_ptr: [K] float, tlse_ptr: [] fp32 (tail only).
    # Returns ids [BLOCK_K] int64, ok (valid slot), p, log p, P = Σp + p_tail, p_tail.
    kk = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_row_ptr + kk, mask=kk < K, other=-1).to(tl.int64)
    ok = (kk < K) & (ids >= 0)
    u = tl.load(t_row_ptr + kk, mask=ok, other=0.0).to(tl.float32) * inv_t
    if MODE == 1:  # tail (spec.TAIL; a jit function reads no Python globals)
        logp = u - tl.load(tlse_ptr)
        p = tl.where(ok, tl.exp(logp), 0.0)
        p_tail = tl.maximum(1.0 - tl.sum(p, 0), 0.0)
    else:
        um = tl.where(ok, u, float("-inf"))
        mx = tl.max(um, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # every slot padded: p = 0, KL = 0
        e = tl.where(ok, tl.exp(um - mx), 0.0)
        se = tl.sum(e, 0)
        se_safe = tl.where(se > 0.0, se, 1.0)
        logp = (u - mx) - tl.log(se_safe)
        p = e / se_safe
        p_tail = tl.sum(p, 0) * 0.0
    return ids, ok, p, logp, tl.sum(p, 0) + p_tail, p_tail


@triton.jit
def _kd_fwd_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16, row stride logits_stride, unit column stride
    labels_ptr,  # [N] int64
    ids_ptr,  # [N, K] int32/int64 teacher top-k ids, id < 0 = padded slot
    tlogits_ptr,  # [N, K] float teacher top-k logits (raw, T = 1)
    tlse_ptr,  # [N] fp32 teacher logsumexp at temperature T (tail mode only)
    sorted_ptr,  # [N, K] int32 the same ids sorted ascending per row (tail mode only)
    ce_ptr,  # [N] fp32 out: CE per row (0 where ignored)
    kl_ptr,  # [N] fp32 out: KL per row (0 where ignored)
    stats_ptr,  # [N, 8] fp32 out: m1, l1, mT, lT, mC, lC (lse = m + l), unused, unused
    logits_stride,
    ids_stride,
    tlogits_stride,
    sorted_stride,
    V,
    K,
    ignore_index,
    inv_t,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    row_ptr = logits_ptr + row * logits_stride
    ids, ok, p, logp, P, p_tail = _teacher_probs(
        ids_ptr + row * ids_stride, tlogits_ptr + row * tlogits_stride, tlse_ptr + row, K, inv_t, MODE, BLOCK_K
    )
    m1 = tl.full((), float("-inf"), tl.float32)
    r1 = tl.zeros((), tl.float32)
    mT = tl.full((), float("-inf"), tl.float32)
    rT = tl.zeros((), tl.float32)
    mC = tl.full((), float("-inf"), tl.float32)
    rC = tl.zeros((), tl.float32)
    j = tl.zeros((), tl.int32)
    sorted_row = sorted_ptr + row * sorted_stride
    n_blocks = tl.where(valid, tl.cdiv(V, BLOCK_V), 0)  # ignored rows cost no vocabulary pass
    for b in range(0, n_blocks):
        offs = b * BLOCK_V + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m1, r1 = _merge_block(m1, r1, z)
        zt = z * inv_t
        mT, rT = _merge_block(mT, rT, zt)
        if MODE == 1:  # tail (spec.TAIL; a jit function reads no Python globals)
            # Mask the top-k ids that fall in this block: walk the row's sorted ids (K steps per row in all).
            hi = (b + 1) * BLOCK_V
            sid = tl.load(sorted_row + j, mask=j < K, other=2147483647)
            while sid < hi:
                zt = tl.where(offs == sid, float("-inf"), zt)
                j += 1
                sid = tl.load(sorted_row + j, mask=j < K, other=2147483647)
            mC, rC = _merge_block(mC, rC, zt)
    # Ignored rows skipped the pass: give them finite dummy states (their outputs are zeroed below).
    m1 = tl.where(valid, m1, 0.0)
    mT = tl.where(valid, mT, 0.0)
    mC = tl.where(valid, mC, 0.0)
    l1 = _log1p(r1)
    lT = _log1p(rT)
    zy = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
    ce = (m1 - zy) + l1
    okv = ok & ((ids * 0 + valid.to(tl.int64)) > 0)  # explicit broadcast: the interpreter rejects bool & scalar
    zk = tl.load(row_ptr + ids, mask=okv, other=0.0).to(tl.float32)
    logq = (zk * inv_t - mT) - lT
    kl = tl.sum(tl.where(p > 0.0, p * (logp - logq), 0.0), 0)
    lC = _log1p(rC)
    if MODE == 1:  # tail (spec.TAIL; a jit function reads no Python globals)
        log_qtail = (mC - mT) + (lC - lT)
        safe_pt = tl.where(p_tail > 0.0, p_tail, 1.0)
        kl += tl.where(p_tail > 0.0, p_tail * (tl.log(safe_pt) - log_qtail), 0.0)
    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
    st = stats_ptr + row * 8
    tl.store(st + 0, tl.where(valid, m1, 0.0))
    tl.store(st + 1, tl.where(valid, l1, 0.0))
    tl.store(st + 2, tl.where(valid, mT, 0.0))
    tl.store(st + 3, tl.where(valid, lT, 0.0))
    tl.store(st + 4, tl.where(valid & (mC > float("-inf")), mC, 0.0))
    tl.store(st + 5, tl.where(valid & (mC > float("-inf")), lC, 0.0))


@triton.jit
def _kd_bwd_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16 (read), row stride logits_stride
    grad_ptr,  # [N, V] same dtype (written); may be the logits buffer itself (in-place)
    labels_ptr,  # [N] int64
    ids_ptr,  # [N, K] int32/int64
    tlogits_ptr,  # [N, K] float
    tlse_ptr,  # [N] fp32 (tail mode only)
    stats_ptr,  # [N, 8] fp32 from the forward
    scale_ptr,  # [2] fp32: grad_output·α/n_valid, grad_output·γ·T/n_valid
    logits_stride,
    grad_stride,
    ids_stride,
    tlogits_stride,
    V,
    K,
    ignore_index,
    inv_t,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    row_ptr = logits_ptr + row * logits_stride
    grow_ptr = grad_ptr + row * grad_stride
    c_ce = tl.load(scale_ptr)
    c_kl = tl.load(scale_ptr + 1)
    st = stats_ptr + row * 8
    m1 = tl.load(st)
    l1 = tl.load(st + 1)
    mT = tl.load(st + 2)
    lT = tl.load(st + 3)
    mC = tl.load(st + 4)
    lC = tl.load(st + 5)
    ids, ok, p, logp, P, p_tail = _teacher_probs(
        ids_ptr + row * ids_stride, tlogits_ptr + row * tlogits_stride, tlse_ptr + row, K, inv_t, MODE, BLOCK_K
    )
    # Gather before the pass overwrites the row (in-place); the barrier orders these loads before its stores.
    zy = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
    okv = ok & ((ids * 0 + valid.to(tl.int64)) > 0)  # explicit broadcast: the interpreter rejects bool & scalar
    zk = tl.load(row_ptr + ids, mask=okv, other=0.0).to(tl.float32)
    tl.debug_barrier()
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        offs = b * BLOCK_V + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
        zt = z * inv_t
        g = c_ce * tl.exp((z - m1) - l1) + c_kl * P * tl.exp((zt - mT) - lT)
        if MODE == 1:  # tail (spec.TAIL; a jit function reads no Python globals)
            g -= c_kl * p_tail * tl.exp((zt - mC) - lC)  # ids in I are rewritten below without this term
        g = tl.where(valid, g, 0.0)
        tl.store(grow_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < V)
    # Rewrite the label and the top-k ids from fp32 (the -1 and -p added before rounding).
    tl.debug_barrier()
    same = ids[:, None] == ids[None, :]
    s = tl.sum(tl.where(same & ok[None, :], p[None, :], 0.0), 1)  # duplicates: scatter-add of their p
    is_y = ids == y
    xk = (zk - m1) - l1
    q1k = tl.where(is_y, _expm1(xk), tl.exp(xk))
    gk = c_ce * q1k + c_kl * (P * tl.exp((zk * inv_t - mT) - lT) - s)
    tl.store(grow_ptr + ids, gk.to(grad_ptr.dtype.element_ty), mask=okv)
    y_in_ids = tl.sum((is_y & ok).to(tl.int32), 0) > 0
    zyt = zy * inv_t
    gy = c_ce * _expm1((zy - m1) - l1) + c_kl * P * tl.exp((zyt - mT) - lT)
    if MODE == 1:  # tail (spec.TAIL; a jit function reads no Python globals)
        gy -= c_kl * p_tail * tl.exp((zyt - mC) - lC)
    tl.store(grow_ptr + y, gy.to(grad_ptr.dtype.element_ty), mask=valid & (y_in_ids == 0))


def _blocks(V: int, K: int) -> tuple[int, int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    block_k = triton.next_power_of_2(max(K, 1))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, block_k, num_warps


def kd_forward(logits, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec):
    """Launch the forward kernel. Returns (ce [N], kl [N], stats [N, 8]) fp32."""
    N, V = logits.shape
    K = topk_ids.shape[1]
    dev = logits.device
    ce = torch.empty(N, dtype=torch.float32, device=dev)
    kl = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.zeros(N, 8, dtype=torch.float32, device=dev)
    if N == 0:
        return ce, kl, stats
    if spec.uses_lse:
        sorted_ids = topk_ids.to(torch.int32).sort(dim=1).values.contiguous()
    else:
        sorted_ids, teacher_lse = topk_ids, ce  # never read (the branches that read them are compiled out)
    block_v, block_k, num_warps = _blocks(V, K)
    _kd_fwd_kernel[(N,)](
        logits, labels, topk_ids, topk_logits, teacher_lse, sorted_ids, ce, kl, stats,
        logits.stride(0), topk_ids.stride(0), topk_logits.stride(0), sorted_ids.stride(0),
        V, K, spec.ignore_index, spec.inv_t,
        MODE=spec.mode, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return ce, kl, stats


def kd_backward(logits, grad, labels, topk_ids, topk_logits, teacher_lse, stats, scale, spec: KDSpec):
    """Launch the backward kernel, writing d loss / d logits into `grad` (which may be `logits`)."""
    N, V = logits.shape
    if N == 0:
        return grad
    K = topk_ids.shape[1]
    block_v, block_k, num_warps = _blocks(V, K)
    _kd_bwd_kernel[(N,)](
        logits, grad, labels, topk_ids, topk_logits, teacher_lse if spec.uses_lse else stats, stats, scale,
        logits.stride(0), grad.stride(0), topk_ids.stride(0), topk_logits.stride(0),
        V, K, spec.ignore_index, spec.inv_t,
        MODE=spec.mode, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return grad


class TritonKDLoss(torch.autograd.Function):
    """loss = (1/n) Σ_{rows, y ≠ ignore} α·CE + γ·T²·KL, n = number of non-ignored rows (max 1).

    d loss / d z_v = g/n · [α·(softmax(z)_v − 1[v = y]) + γ·T·(P·q_T,v − Σ_{j: id_j = v} p_j − p_tail·c_v·1[v ∉ I])]
    with q_T = softmax(z/T), P = Σ_j p_j + p_tail (1 unless tail-mode duplicates push Σp over 1),
    c = softmax of z/T over the complement of I (tail mode; p_tail = 0 in renorm), g = grad_output.
    Outputs (loss, ce [N], kl [N]); ce and kl are not differentiable.
    """

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec):
        ce, kl, stats = kd_forward(logits, labels, topk_ids, topk_logits, teacher_lse, spec)
        n_valid = (labels != spec.ignore_index).sum().clamp_min(1).to(torch.float32)
        loss = (spec.alpha * ce + (spec.gamma * spec.temperature * spec.temperature) * kl).sum() / n_valid
        tlse = teacher_lse if teacher_lse is not None else stats
        ctx.save_for_backward(logits, labels, topk_ids, topk_logits, tlse, stats, n_valid)
        ctx.spec = spec
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if getattr(ctx, "grad_written_in_place", False):
            raise RuntimeError("ddk_kernels.fused_kd_loss(inplace_grad=True): the first backward overwrote the logits "
                               "with their gradient, so backward cannot run again; use inplace_grad=False")  # fmt: skip
        logits, labels, topk_ids, topk_logits, tlse, stats, n_valid = ctx.saved_tensors
        spec = ctx.spec
        g = grad_loss.to(torch.float32) / n_valid
        scale = torch.stack([g * spec.alpha, g * (spec.gamma * spec.temperature)]).contiguous()
        grad = logits if spec.inplace else torch.empty_like(logits)
        ctx.grad_written_in_place = spec.inplace
        kd_backward(logits, grad, labels, topk_ids, topk_logits, tlse, stats, scale, spec)
        return grad, None, None, None, None, None
