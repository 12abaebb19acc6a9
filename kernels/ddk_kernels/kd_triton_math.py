"""Triton building blocks of the KD kernels (kd_triton.py): base-2 online logsumexp states, log1p / expm1 without
libdevice (the interpreter lacks it), and the segmented sum that turns duplicate teacher ids into a scatter-add.

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
