"""Triton fused softmax-KL kernels for the KD loss (DESIGN §3-4): forward, backward, autograd Function.

Why the fusion wins, per row of V logits (b bytes each), forward + backward:
- eager torch (log_softmax for CE, z/T, log_softmax, gather, then autograd): about 6 reads and 6 writes
  of V fp32 values plus the bf16 cast: ~12·V·4 bytes moved and several [N, V] fp32 buffers alive at once.
- this kernel: forward reads the row once (V·b) and writes 10 floats; backward reads the row once more and
  writes the gradient once (2·V·b), in place over the logits when allowed. 3·V·b in all, no [N, V] fp32 buffer.

Why v2 issues few instructions per element (pipelines/kernel_report.py counts them in the SASS):
- base 2 throughout: x = z·log2(e) costs one FMUL/FFMA and every exponential is one MUFU.EX2 (``tl.exp`` is ~5
  instructions around it); stats are stored in base 2.
- per-thread running states: each lane keeps its own (max m, sum r) and updates it with ONE exp2 per element
  (``exp2(-|x - m|)`` is either the rescale factor or the new term); lanes are merged once per row, so the loop
  has no cross-warp reduction and no barrier.
- ``T == 1`` is a compile-time case (``T_ONE``): one state and one exp per element per pass instead of two; at
  T != 1 the forward's z/T sum shares the lanes' max of z (the max of z/T sits there), one more exp2 per element.
- tail mode needs no extra state in the loop: the complement's logsumexp is the full one minus the top-k terms,
  taken exactly (below) and, where that subtraction would cancel, recomputed by a masked second pass.
- everything about the top-k ids and the label (their gradient, duplicates as a scatter-add) happens once per
  row after the vocabulary loop, in O(K) work: the ids are sorted on the host so duplicates are adjacent runs,
  summed by a segmented scan (no K x K comparison, whose registers stayed live through the loop in v1).
- the loop runs over full blocks unmasked and 16-byte aligned, so every thread loads (and the backward stores) its
  elements with 128-bit accesses whatever V, the row stride or the base offset: a masked head block reaches the
  row's first aligned element, a masked tail block takes the remainder (the launcher passes a 16-byte-aligned base
  pointer and the column of the tensor's first element from it; the out-of-place gradient gets the logits' phase).

Numerics: every logsumexp is kept as (m, r) with lse = m + log2(1 + r), r the sum of 2^(x - m) over all elements
but one maximum, so 1 - softmax(max) = r / (1 + r) never cancels (confident rows stay exact); the label gradient
uses expm1. Lane states start at a finite sentinel (-1e30, base 2) so a lane that sees only -inf stays NaN-free;
rows whose logits are all below -1e30 / log2(e) are outside the kernel's domain. In tail mode the student's tail
mass is never 1 - Σq: the complement sum is (1 + r) minus the distinct top-k terms with the ones at the maximum
removed exactly, and when the rest still cancels by more than 2^TAIL_AMP_BITS the row takes a masked pass.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ddk_kernels import kd_tune
from ddk_kernels.kd_triton_math import (
    _bwd_masked,
    _complement_pass,
    _expm1,
    _fwd_masked,
    _grad_block,
    _log2_1p,
    _merge_lanes,
    _online,
    _online_pair,
    _seg_sum,
    _teacher_probs,
)
from ddk_kernels.spec import KDSpec

MAX_BLOCK_V = 2048  # 8 elements per thread at 8 warps: one 16-byte bf16 load; tests lower it to get several blocks
TAIL_AMP_BITS = 4  # tail mode: a complement sum that cancels by more than 2^4 is recomputed by a masked pass


@triton.jit
def _kd_fwd_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16, row stride logits_stride, unit column stride
    labels_ptr,  # [N] int64
    ids_ptr,  # [N, K] int32/int64 teacher top-k ids sorted ascending per row, id < 0 = padded slot
    tlogits_ptr,  # [N, K] float teacher top-k logits (raw, T = 1), in the order of ids_ptr
    tlse_ptr,  # [N] fp32 teacher logsumexp at temperature T (tail mode only)
    ce_ptr,  # [N] fp32 out: CE per row (0 where ignored)
    kl_ptr,  # [N] fp32 out: KL per row (0 where ignored)
    stats_ptr,  # [N, 8] fp32 out, base 2: m1, l1, mT, lT, mC, lC (lse2 = m + l), 1/q_tail (tail), unused
    logits_stride,
    logits_col0,  # column of logits[0, 0] from the 16-byte-aligned logits_ptr
    ids_stride,
    tlogits_stride,
    V,
    K,
    ignore_index,
    inv_t,
    MODE: tl.constexpr,
    T_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    row_off = row * logits_stride + logits_col0
    row_ptr = logits_ptr + row_off
    c_t = inv_t * 1.4426950408889634
    lanes = tl.arange(0, BLOCK_V)
    m1 = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    r1 = tl.zeros((BLOCK_V,), tl.float32)
    r_t = tl.zeros((BLOCK_V,), tl.float32)  # Σ 2^(x/T) per lane, relative to 2^(m1/T) (T != 1)
    v_row = tl.where(valid, V, 0)  # ignored rows cost no vocabulary pass
    head = tl.minimum(((VEC - row_off % VEC) % VEC).to(tl.int32), v_row)  # before the first aligned element
    if head > 0:  # aligned rows (16 | stride, e.g. V = 32000) skip it
        m1, r1, r_t = _fwd_masked(m1, r1, r_t, row_ptr, 0, head, inv_t, T_ONE, BLOCK_V)
    n_full = (v_row - head) // BLOCK_V
    start = tl.multiple_of(row_off + head, VEC)  # 16-byte aligned: 128-bit loads
    for b in range(0, n_full):  # unmasked: no predicate per element
        z = tl.load(logits_ptr + start + b * BLOCK_V + lanes).to(tl.float32)
        if T_ONE:
            m1, r1 = _online(m1, r1, z * 1.4426950408889634)
        else:
            m1, r1, r_t = _online_pair(m1, r1, r_t, z * 1.4426950408889634, inv_t)
    m1, r1, r_t = _fwd_masked(m1, r1, r_t, row_ptr, head + n_full * BLOCK_V, v_row, inv_t, T_ONE, BLOCK_V)
    if T_ONE:
        big1, rr1 = _merge_lanes(m1, r1, 1.0)
        big_t, rr_t = big1, rr1
    else:
        big1, rr1 = _merge_lanes(m1, r1, 1.0)
        big_t, rr_t = _merge_lanes(m1, r_t, inv_t)
    # Ignored rows skipped the pass: give them finite dummy states (their outputs are zeroed below).
    big1 = tl.where(valid, big1, 0.0)
    big_t = tl.where(valid, big_t, 0.0)
    l1 = _log2_1p(rr1)
    l_t = _log2_1p(rr_t)
    zy = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
    ce = ((big1 - zy * 1.4426950408889634) + l1) * 0.6931471805599453
    ids_row = ids_ptr + row * ids_stride
    ids, ok, p, log2p, P, p_tail = _teacher_probs(
        ids_row, tlogits_ptr + row * tlogits_stride, tlse_ptr + row, K, c_t, MODE, BLOCK_K
    )
    okv = ok & ((ids * 0 + valid.to(tl.int64)) > 0)  # explicit broadcast: the interpreter rejects bool & scalar
    zk = tl.load(row_ptr + ids, mask=okv, other=0.0).to(tl.float32)
    dk = zk * 1.4426950408889634 - big1  # <= 0, == 0 exactly at the maximum (the loop's x, rounded alike)
    dkt = dk if T_ONE else dk * inv_t  # x/T - big_t: the T state's max is the T = 1 state's, scaled
    log2q = dkt - l_t
    kl = tl.sum(tl.where(p > 0.0, p * (log2p - log2q), 0.0), 0) * 0.6931471805599453
    big_c = big_t
    l_c = l_t
    inv_qtail = l_t * 0.0
    if MODE == 1:  # tail: the complement's logsumexp, 2^big_t·(1 + rr_t) minus the distinct top-k terms
        kk = tl.arange(0, BLOCK_K)
        prev = tl.load(ids_row + kk - 1, mask=(kk >= 1) & (kk < K), other=-1).to(tl.int64)
        first = okv & (ids != prev)
        at_max = first & (dk == 0.0)
        n_max = tl.sum(at_max.to(tl.float32), 0)
        rest = tl.sum(tl.where(first & (dk != 0.0), tl.exp2(dkt), 0.0), 0)
        base = rr_t + (1.0 - n_max)  # the ids at the maximum leave exactly: no rounding, no cancellation
        comp = base - rest
        if valid & (comp <= base * 0.0625):  # cancelled by more than 2^TAIL_AMP_BITS: mask the ids, new pass
            big_c, l_c = _complement_pass(row_ptr, ids_row, V, K, c_t, BLOCK_V)
        else:
            l_c = tl.log2(tl.where(comp > 0.0, comp, 1.0))
        log2_qtail = (big_c - big_t) + (l_c - l_t)
        nonempty = big_c > float("-inf")
        inv_qtail = tl.where(nonempty, tl.exp2(-log2_qtail), 0.0)
        safe_pt = tl.where(p_tail > 0.0, p_tail, 1.0)
        kl += tl.where(p_tail > 0.0, p_tail * (tl.log(safe_pt) - log2_qtail * 0.6931471805599453), 0.0)
        big_c = tl.where(nonempty, big_c, 0.0)
        l_c = tl.where(nonempty, l_c, 0.0)
    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
    st = stats_ptr + row * 8
    tl.store(st + 0, tl.where(valid, big1, 0.0))
    tl.store(st + 1, tl.where(valid, l1, 0.0))
    tl.store(st + 2, tl.where(valid, big_t, 0.0))
    tl.store(st + 3, tl.where(valid, l_t, 0.0))
    tl.store(st + 4, tl.where(valid, big_c, 0.0))
    tl.store(st + 5, tl.where(valid, l_c, 0.0))
    tl.store(st + 6, tl.where(valid, inv_qtail, 0.0))


@triton.jit
def _kd_bwd_kernel(
    logits_ptr,  # [N, V] fp32/bf16/fp16 (read), row stride logits_stride
    grad_ptr,  # [N, V] same dtype (written); may be the logits buffer itself (in-place)
    labels_ptr,  # [N] int64
    ids_ptr,  # [N, K] int32/int64 sorted ascending per row (as in the forward)
    tlogits_ptr,  # [N, K] float, in the order of ids_ptr
    tlse_ptr,  # [N] fp32 (tail mode only)
    stats_ptr,  # [N, 8] fp32 from the forward
    scale_ptr,  # [2] fp32: grad_output·α/n_valid, grad_output·γ·T/n_valid
    logits_stride,
    logits_col0,  # column of logits[0, 0] from the 16-byte-aligned logits_ptr
    grad_stride,
    grad_col0,  # the same for grad_ptr
    ids_stride,
    tlogits_stride,
    V,
    K,
    ignore_index,
    inv_t,
    MODE: tl.constexpr,
    T_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes
    GRAD_ALIGNED: tl.constexpr,  # grad's columns have the logits' 16-byte phase in every row: 128-bit stores
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    row_off = row * logits_stride + logits_col0
    grow_off = row * grad_stride + grad_col0
    row_ptr = logits_ptr + row_off
    grow_ptr = grad_ptr + grow_off
    c_t = inv_t * 1.4426950408889634
    c_ce = tl.load(scale_ptr)
    c_kl = tl.load(scale_ptr + 1)
    st = stats_ptr + row * 8
    big1 = tl.load(st)
    l1 = tl.load(st + 1)
    big_t = tl.load(st + 2)
    l_t = tl.load(st + 3)
    big_c = tl.load(st + 4)
    l_c = tl.load(st + 5)
    ids_row = ids_ptr + row * ids_stride
    ids, ok, p, log2p, P, p_tail = _teacher_probs(
        ids_row, tlogits_ptr + row * tlogits_stride, tlse_ptr + row, K, c_t, MODE, BLOCK_K
    )
    # Per-row coefficients: in tail mode q_T,v - p_tail·c_v = q_T,v·(1 - p_tail / q_tail) for v outside the ids.
    a_t = c_kl * P
    if MODE == 1:
        a_t -= c_kl * p_tail * tl.load(st + 6)
    a1 = c_ce
    if T_ONE:
        a1 += a_t
    # Ignored rows: zero coefficients and lse = +inf make every element 0 without a select per element.
    a1 = tl.where(valid, a1, 0.0)
    a_t = tl.where(valid, a_t, 0.0)
    lse1 = tl.where(valid, big1 + l1, float("inf"))
    lse_t = tl.where(valid, big_t + l_t, float("inf"))
    # Gather before the pass overwrites the row (in-place); the barrier orders these loads before its stores.
    zy = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
    okv = ok & ((ids * 0 + valid.to(tl.int64)) > 0)  # explicit broadcast: the interpreter rejects bool & scalar
    zk = tl.load(row_ptr + ids, mask=okv, other=0.0).to(tl.float32)
    tl.debug_barrier()
    lanes = tl.arange(0, BLOCK_V)
    head = tl.minimum(((VEC - row_off % VEC) % VEC).to(tl.int32), V)  # as in the forward
    if head > 0:
        _bwd_masked(row_ptr, grow_ptr, 0, head, a1, lse1, a_t, lse_t, c_t, T_ONE, BLOCK_V)
    n_full = (V - head) // BLOCK_V
    start = tl.multiple_of(row_off + head, VEC)
    gstart = tl.multiple_of(grow_off + head, VEC) if GRAD_ALIGNED else grow_off + head
    for b in range(0, n_full):  # unmasked, aligned loads (and stores when GRAD_ALIGNED)
        z = tl.load(logits_ptr + start + b * BLOCK_V + lanes).to(tl.float32)
        g = _grad_block(z, a1, lse1, a_t, lse_t, c_t, T_ONE)
        tl.store(grad_ptr + gstart + b * BLOCK_V + lanes, g.to(grad_ptr.dtype.element_ty))
    _bwd_masked(row_ptr, grow_ptr, head + n_full * BLOCK_V, V, a1, lse1, a_t, lse_t, c_t, T_ONE, BLOCK_V)
    # Rewrite the label and the top-k ids from fp32 (the -1 and -p added before rounding), O(K) per row: the ids
    # are sorted, so the p of duplicates (a scatter-add) is a segmented sum over each run, stored once per run.
    tl.debug_barrier()
    kk = tl.arange(0, BLOCK_K)
    prev = tl.load(ids_row + kk - 1, mask=(kk >= 1) & (kk < K), other=-1).to(tl.int64)
    nxt = tl.load(ids_row + kk + 1, mask=kk + 1 < K, other=-1).to(tl.int64)
    starts = (ok & (ids != prev)).to(tl.int32)
    s, _ = tl.associative_scan((tl.where(ok, p, 0.0), starts), 0, _seg_sum)
    last = okv & (ids != nxt)
    is_y = ids == y
    xk = (zk * 1.4426950408889634 - big1) - l1
    q1k = tl.where(is_y, _expm1(xk * 0.6931471805599453), tl.exp2(xk))
    gk = c_ce * q1k + c_kl * (P * tl.exp2((zk * c_t - big_t) - l_t) - s)
    tl.store(grow_ptr + ids, gk.to(grad_ptr.dtype.element_ty), mask=last)
    y_in_ids = tl.sum((is_y & ok).to(tl.int32), 0) > 0
    xyt = zy * c_t
    gy = c_ce * _expm1(((zy * 1.4426950408889634 - big1) - l1) * 0.6931471805599453)
    gy += c_kl * P * tl.exp2((xyt - big_t) - l_t)
    if MODE == 1:  # y outside the ids: its share of the student's tail
        gy -= c_kl * p_tail * tl.exp2((xyt - big_c) - l_c)
    tl.store(grow_ptr + y, gy.to(grad_ptr.dtype.element_ty), mask=valid & (y_in_ids == 0))


def launch_config(V: int, K: int, elem_bytes: int, mode: int, temperature: float, config: dict | None = None) -> dict:
    """``{"*": {"constexprs", "num_warps"}}`` of both kernels (kernel_report.py compiles the same); ``config``
    ({"BLOCK_V", "num_warps"}) overrides the static default; GRAD_ALIGNED as for a gradient from :func:`grad_like`."""
    cfg = {**kd_tune.static_config(V, min(MAX_BLOCK_V, triton.next_power_of_2(V))), **(config or {})}
    constexprs = dict(MODE=mode, T_ONE=temperature == 1.0, BLOCK_V=cfg["BLOCK_V"],
                      BLOCK_K=triton.next_power_of_2(max(K, 1)), VEC=16 // elem_bytes, GRAD_ALIGNED=True)  # fmt: skip
    return {"*": dict(constexprs=constexprs, num_warps=cfg["num_warps"])}


def _aligned(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`t` seen from the 16-byte-aligned address at or before its first element, and that element's column there."""
    col0 = (t.data_ptr() % 16) // t.element_size()
    if col0 == 0 or t.storage_offset() < col0:  # aligned already, or a storage that is not (no vector loads then)
        return t, 0
    return t.as_strided(t.shape, t.stride(), t.storage_offset() - col0), col0


def grad_like(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient with the logits' row stride and 16-byte phase, so the backward stores 128 bits
    (``empty_like`` of a ``logits[:, :V]`` view would be contiguous, its rows in another phase)."""
    (N, V), stride = logits.shape, logits.stride(0)
    if logits.is_contiguous() or N == 0 or stride > V + V // 8 + 64:  # a much wider buffer is not worth the memory
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    col0 = (logits.data_ptr() % 16) // logits.element_size()
    buf = torch.empty((N - 1) * stride + V + col0, dtype=logits.dtype, device=logits.device)
    return buf.as_strided((N, V), (stride, 1), col0)


def sort_targets(topk_ids: torch.Tensor, topk_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's teacher ids ascending, the logits alongside ([N, K] each): padded slots first, duplicates
    adjacent. The loss does not depend on the order of the slots; the kernels rely on this one."""
    ids, perm = topk_ids.sort(dim=1)
    return ids.contiguous(), topk_logits.gather(1, perm).contiguous()


def _choose(pass_: str, logits, K: int, spec: KDSpec, config: dict | None) -> dict:
    """`config`, else on CUDA the tuner's choice (kd_tune), else the static default: the launch's constexprs."""
    V, eb = logits.shape[1], logits.element_size()
    compiled = logits.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    if config is None and compiled and kd_tune.autotune_enabled():
        default = kd_tune.static_config(V, min(MAX_BLOCK_V, triton.next_power_of_2(V)))
        config = kd_tune.tuned(pass_, logits, K, spec, default, kd_forward, kd_backward)
    return launch_config(V, K, eb, spec.mode, spec.temperature, config)["*"]


def kd_forward(logits, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec, *, config=None, _out=None):
    """Launch the forward kernel on sorted targets (:func:`sort_targets`). Returns (ce [N], kl [N], stats [N, 8]).

    ``config`` ({"BLOCK_V", "num_warps"}) replaces the tuned / static launch configuration.
    """
    N, V = logits.shape
    K = topk_ids.shape[1]
    dev = logits.device
    ce = torch.empty(N, dtype=torch.float32, device=dev)
    kl = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.zeros(N, 8, dtype=torch.float32, device=dev)
    if N == 0:
        return ce, kl, stats
    if not spec.uses_lse:
        teacher_lse = ce  # never read (the branches that read it are compiled out)
    cfg = _choose("forward", logits, K, spec, config)
    cfg["constexprs"].pop("GRAD_ALIGNED")
    base, col0 = _aligned(logits)
    kernel = _kd_fwd_kernel[(N,)](
        base, labels, topk_ids, topk_logits, teacher_lse, ce, kl, stats,
        logits.stride(0), col0, topk_ids.stride(0), topk_logits.stride(0),
        V, K, spec.ignore_index, spec.inv_t, **cfg["constexprs"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    if _out is not None:
        _out.append(kernel)  # the tuner reads registers and spills from the compiled kernel
    return ce, kl, stats


def kd_backward(logits, grad, labels, topk_ids, topk_logits, teacher_lse, stats, scale, spec: KDSpec, *, config=None,
                _out=None):  # fmt: skip
    """Launch the backward kernel, writing d loss / d logits into `grad` (`logits` itself, or :func:`grad_like`)."""
    N, V = logits.shape
    if N == 0:
        return grad
    K = topk_ids.shape[1]
    cfg = _choose("backward", logits, K, spec, config)
    base, col0 = _aligned(logits)
    gbase, gcol0 = _aligned(grad)
    vec = cfg["constexprs"]["VEC"]
    cfg["constexprs"]["GRAD_ALIGNED"] = (grad.stride(0) - logits.stride(0)) % vec == 0 and (gcol0 - col0) % vec == 0
    kernel = _kd_bwd_kernel[(N,)](
        base, gbase, labels, topk_ids, topk_logits, teacher_lse if spec.uses_lse else stats, stats, scale,
        logits.stride(0), col0, grad.stride(0), gcol0, topk_ids.stride(0), topk_logits.stride(0),
        V, K, spec.ignore_index, spec.inv_t, **cfg["constexprs"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    if _out is not None:
        _out.append(kernel)
    return grad


class TritonKDLoss(torch.autograd.Function):
    """loss = (1/n) Σ_{rows, y ≠ ignore} α·CE + γ·T²·KL, n = number of non-ignored rows (max 1).

    d loss / d z_v = g/n · [α·(softmax(z)_v − 1[v = y]) + γ·T·(P·q_T,v − Σ_{j: id_j = v} p_j − p_tail·c_v·1[v ∉ I])]
    with q_T = softmax(z/T), P = Σ_j p_j + p_tail (1 unless tail-mode duplicates push Σp over 1),
    c = softmax of z/T over the complement of I (tail mode; p_tail = 0 in renorm), g = grad_output.
    Outputs (loss, ce [N], kl [N]); ce and kl are not differentiable. With ``spec.inplace`` the backward writes the
    gradient over the logits and bumps their version counter, so an autograd node that saved them fails loudly.
    """

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec):
        ids, tlog = sort_targets(topk_ids, topk_logits)
        ce, kl, stats = kd_forward(logits, labels, ids, tlog, teacher_lse, spec)
        n_valid = (labels != spec.ignore_index).sum().clamp_min(1).to(torch.float32)
        loss = (spec.alpha * ce + (spec.gamma * spec.temperature * spec.temperature) * kl).sum() / n_valid
        tlse = teacher_lse if teacher_lse is not None else stats
        ctx.save_for_backward(logits, labels, ids, tlog, tlse, stats, n_valid)
        ctx.spec = spec
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if getattr(ctx, "grad_written_in_place", False):
            raise RuntimeError("ddk_kernels.fused_kd_loss(inplace_grad=True): the first backward overwrote the logits "
                               "with their gradient, so backward cannot run again; use inplace_grad=False")  # fmt: skip
        logits, labels, ids, tlog, tlse, stats, n_valid = ctx.saved_tensors
        spec = ctx.spec
        g = grad_loss.to(torch.float32) / n_valid
        scale = torch.stack([g * spec.alpha, g * (spec.gamma * spec.temperature)]).contiguous()
        grad = logits if spec.inplace else grad_like(logits)
        ctx.grad_written_in_place = spec.inplace
        kd_backward(logits, grad, labels, ids, tlog, tlse, stats, scale, spec)
        if spec.inplace:
            # Any other node that saved these logits now sees a newer version and raises instead of reading z'.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None
