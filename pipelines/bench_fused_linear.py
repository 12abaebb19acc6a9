#!/usr/bin/env python
"""fused_linear_kd_loss against the logits path (hidden @ weight.T, then the chunked torch fused_kd_loss) and eager,
forward + backward, on CPU; each (provider, shape) in its own subprocesses, as `ddk-offline bench-kernels`.

    python pipelines/bench_fused_linear.py            # 2 shapes; ~40 min on 2 cores; eager only at the first
                                                      # (at N=2048, V=262,144 it would need ~15 GiB)
    python pipelines/bench_fused_linear.py --no-eager # ~30 min

Writes benchmarks/results/fused_linear/kernels_cpu.{csv,json,png}; `extra_mib` is the loss's own memory (the peak
less the gradients of hidden and weight, which every provider returns).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from ddk_offline.bench import report  # noqa: E402
from ddk_offline.bench.kernels import BenchConfig, _cpu_subprocess  # noqa: E402

# (N, V, k, D) -> providers: SmolLM2-135M's head (V = 49,152, D = 576) and Gemma-3-270M's (V = 262,144, D = 640).
PLAN = {
    (4096, 49152, 64, 576): ["fused-linear", "torch-chunked", "torch-eager"],
    (2048, 262144, 64, 640): ["fused-linear", "torch-chunked"],
}

if __name__ == "__main__":
    cfg = BenchConfig(device="cpu", modes=["full"], out_dir=ROOT / "benchmarks/results/fused_linear", cpu_reps=2)
    rows = []
    for shape, providers in PLAN.items():
        for provider in [p for p in providers if not ("--no-eager" in sys.argv and p == "torch-eager")]:
            for r in _cpu_subprocess(provider, shape, cfg, "fp32"):
                r.update(dtype="fp32", loss_mode=cfg.loss_mode, D=shape[3])
                print(report.fmt_row(r), flush=True)
                rows.append(r)
    report.add_ratios(rows)
    for r in rows:
        if r.get("time_ratio_vs_logits") is not None:
            print(f"{r['provider']:>14} N={r['N']} V={r['V']} D={r['D']}: time x{r['time_ratio_vs_logits']:.2f}, "
                  f"extra memory x{r['extra_ratio_vs_logits']:.3f} of the logits path")  # fmt: skip
    print(report.write(rows, report.environment("cpu"), cfg.out_dir, "cpu"))
