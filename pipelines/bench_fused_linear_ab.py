#!/usr/bin/env python
"""Interleaved timing of fused_linear_kd_loss against the logits path, forward + backward, in one process.

On a shared machine, providers timed one after the other (`bench_fused_linear.py`) see different loads; here the two
alternate call by call on the same inputs, so each ratio compares neighbouring calls.

    python pipelines/bench_fused_linear_ab.py --reps 3     # both CPU shapes, ~10 min on 2 cores

Writes benchmarks/results/fused_linear/interleaved_cpu.json (every call's seconds, the ratio per pair, the median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

import torch  # noqa: E402
from ddk_kernels import fused_kd_loss, fused_linear_kd_loss  # noqa: E402

from ddk_offline.bench import report  # noqa: E402
from ddk_offline.bench.providers import make_leaves  # noqa: E402

SHAPES = [(4096, 49152, 64, 576), (2048, 262144, 64, 640)]  # (N, V, k, D), as bench_fused_linear.py


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_shape(shape: tuple, reps: int) -> list[tuple[float, float]]:
    """(logits-path seconds, fused-linear seconds) of ``reps`` neighbouring calls, after one warm-up of each."""
    (h, w), targets = make_leaves(shape, "fp32", "cpu")

    def logits():
        return torch.autograd.grad(fused_kd_loss(h @ w.T, *targets, backend="torch"), (h, w))

    def fused():
        return torch.autograd.grad(fused_linear_kd_loss(h, w, *targets), (h, w))

    logits(), fused()
    return [(_seconds(logits), _seconds(fused)) for _ in range(reps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="(logits, fused) pairs per shape after one warm-up pair")
    args = ap.parse_args()
    out = {"environment": report.environment("cpu"), "shapes": []}
    for shape in SHAPES:
        pairs = time_shape(shape, args.reps)
        ratio = statistics.median(f / lg for lg, f in pairs)
        print(f"N={shape[0]} V={shape[1]} D={shape[3]}: (logits s, fused s) {pairs}; median fused/logits {ratio:.2f}",
              flush=True)  # fmt: skip
        out["shapes"].append(dict(N=shape[0], V=shape[1], k=shape[2], D=shape[3], pairs=pairs, median_ratio=ratio))
    path = ROOT / "benchmarks/results/fused_linear/interleaved_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(path)


if __name__ == "__main__":
    main()
