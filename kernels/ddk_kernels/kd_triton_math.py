"""Triton building blocks of the KD kernels (kd_triton.py): base-2 online logsumexp states, log1p / expm1 without
libdevice (the interpreter lacks it), the segmented sum that turns duplicate teacher ids into a scatter-add, the
teacher's top-k probabilities, and the masked blocks of a row (the head before its first 16-byte-aligned element and
the tail after its last full block).

All operate in fp32; a jit function reads no Python globals, so constants are literals (log2(e) = 1.4426950408889634).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _log2_1p(x):
    # log2(1 + x), exact to a few ulp for tiny x (Kahan's trick; no libdevice, which the interpreter lacks).
    u = 1.0 + x
    safe = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x * 1.4426950408889634, tl.log2(u) * x / safe)


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0 (Kahan); -1 once exp underflows. Once per row, not per element.
    u = tl.exp(x)
    lu = tl.where(u == 1.0, 1.0, tl.log(u))
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / lu))


@triton.jit
def _online(m, r, x):
    # Per-lane running state, x [BLOCK_V] base 2: r = Σ 2^(v - m) over the lane's elements but one at the max m.
    # One exp2 per element: 2^-|x - m| is the new term when x <= m and the old sum's rescale when x > m.
    d = x - m
    e = tl.exp2(-tl.abs(d))
    return tl.maximum(m, x), tl.where(d > 0.0, r * e + e, r + e)


@triton.jit
def _online_pair(m, r, r_s, x, s):
    # Two sums with one max: Σ 2^(x - m) (r) and Σ 2^(s·(x - m)) (r_s), s = 1/T > 0. The max of s·x sits at the
    # max of x, so the second state shares m and the comparison and costs one FMUL + one exp2 per element.
    d = x - m
    a = -tl.abs(d)
    e = tl.exp2(a)
    e_s = tl.exp2(a * s)
    up = d > 0.0
    return tl.maximum(m, x), tl.where(up, r * e + e, r + e), tl.where(up, r_s * e_s + e_s, r_s + e_s)


@triton.jit
def _merge_lanes(m, r, s):
    # The lanes' states of s·x (m: the lanes' max of x) -> the row's (M, R) with Σ 2^(s·x) = 2^M·(1 + R);
    # (-inf, 0) when the row had no element.
    big = tl.max(m, 0)
    w = tl.exp2((m - big) * s)
    at_max = m == big
    # (count - 1) added last: adding 1 to the small sum and then subtracting it would round R to ulp(1)
    rr = tl.sum(r * w + tl.where(at_max, 0.0, w), 0) + (tl.sum(at_max.to(tl.float32), 0) - 1.0)
    empty = big <= -1.0e30
    return tl.where(empty, float("-inf"), big * s), tl.where(empty, 0.0, rr)


@triton.jit
def _seg_sum(a, fa, b, fb):
    # Segmented scan: a run restarts where the flag is set (the first slot of each distinct sorted id).
    return tl.where(fb != 0, b, a + b), fa | fb


@triton.jit
def _fwd_masked(m1, r1, r_t, row_ptr, lo, hi, inv_t, T_ONE: tl.constexpr, BLOCK_V: tl.constexpr):
    # The forward's lane states over elements [lo, hi) of a row (hi - lo <= BLOCK_V), masked: a row's head (up to
    # its first 16-byte-aligned element) and its tail (after the last full block) are two calls of this one body.
    offs = lo + tl.arange(0, BLOCK_V)
    z = tl.load(row_ptr + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
    if T_ONE:
        m1, r1 = _online(m1, r1, z * 1.4426950408889634)
    else:
        m1, r1, r_t = _online_pair(m1, r1, r_t, z * 1.4426950408889634, inv_t)
    return m1, r1, r_t


@triton.jit
def _grad_block(z, a1, lse1, a_t, lse_t, c_t, T_ONE: tl.constexpr):
    # d loss / d z for the elements outside the label and the top-k ids: a1·q1 + a_t·q_T, one exp2 per q.
    if T_ONE:
        return a1 * tl.exp2(z * 1.4426950408889634 - lse1)
    else:
        return a1 * tl.exp2(z * 1.4426950408889634 - lse1) + a_t * tl.exp2(z * c_t - lse_t)


@triton.jit
def _bwd_masked(row_ptr, grow_ptr, lo, hi, a1, lse1, a_t, lse_t, c_t, T_ONE: tl.constexpr, BLOCK_V: tl.constexpr):
    # The backward over elements [lo, hi) of a row, masked (its head and its tail, as _fwd_masked).
    offs = lo + tl.arange(0, BLOCK_V)
    z = tl.load(row_ptr + offs, mask=offs < hi, other=0.0).to(tl.float32)
    g = _grad_block(z, a1, lse1, a_t, lse_t, c_t, T_ONE)
    tl.store(grow_ptr + offs, g.to(grow_ptr.dtype.element_ty), mask=offs < hi)


@triton.jit
def _teacher_probs(ids_row_ptr, t_row_ptr, tlse_ptr, K, c_t, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    # ids_row_ptr: [K] int sorted ascending, t_row_ptr: [K] float, tlse_ptr: [] fp32 natural lse at T (tail only).
    # Returns ids [BLOCK_K] int64, ok (valid slot), p, log2 p, P = Σp + p_tail, p_tail.
    kk = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_row_ptr + kk, mask=kk < K, other=-1).to(tl.int64)
    ok = (kk < K) & (ids >= 0)
    u = tl.load(t_row_ptr + kk, mask=ok, other=0.0).to(tl.float32) * c_t
    if MODE == 1:  # tail (spec.TAIL)
        log2p = u - tl.load(tlse_ptr) * 1.4426950408889634
        p = tl.where(ok, tl.exp2(log2p), 0.0)
        p_tail = tl.maximum(1.0 - tl.sum(p, 0), 0.0)
    else:
        um = tl.where(ok, u, float("-inf"))
        mx = tl.max(um, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # every slot padded: p = 0, KL = 0
        e = tl.where(ok, tl.exp2(um - mx), 0.0)
        se = tl.sum(e, 0)
        se_safe = tl.where(se > 0.0, se, 1.0)
        log2p = (u - mx) - tl.log2(se_safe)
        p = e / se_safe
        p_tail = tl.sum(p, 0) * 0.0
    return ids, ok, p, log2p, tl.sum(p, 0) + p_tail, p_tail


@triton.jit
def _complement_pass(row_ptr, ids_row, V, K, c_t, BLOCK_V: tl.constexpr):
    # Tail mode's masked pass (rows whose complement sum cancelled): the base-2 (big, log2(1 + r)) of z/T over the
    # ids not among the sorted top-k, walking the ids alongside the blocks (K steps per row in all).
    lanes = tl.arange(0, BLOCK_V)
    m_c = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    r_c = tl.zeros((BLOCK_V,), tl.float32)
    j = tl.zeros((), tl.int32)
    sid = tl.load(ids_row + j, mask=j < K, other=2147483647).to(tl.int64)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        offs = b * BLOCK_V + lanes
        xt = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * c_t
        while sid < (b + 1) * BLOCK_V:
            xt = tl.where(offs == sid, float("-inf"), xt)
            j += 1
            sid = tl.load(ids_row + j, mask=j < K, other=2147483647).to(tl.int64)
        m_c, r_c = _online(m_c, r_c, xt)
    big_c, rr_c = _merge_lanes(m_c, r_c, 1.0)
    return big_c, _log2_1p(rr_c)
