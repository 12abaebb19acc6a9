#!/usr/bin/env python
"""Benchmark the fused KD loss (same as `ddk-offline bench-kernels`).

    python pipelines/bench_kernels.py                       # CPU quick suite: ~10 min on 2 cores, ~6 GiB RAM
    python pipelines/bench_kernels.py --shapes full         # GPU: bf16, N in {4096, 16384} x 4 vocabularies x k
    python pipelines/bench_kernels.py --providers torch-chunked,torch-eager --modes full
    python pipelines/bench_kernels.py --shapes linear --providers torch-chunked,torch-eager,fused-linear --modes full \
        --out-dir benchmarks/results/fused_linear   # CPU: fused-linear vs the logits path, ~20 GiB peak (eager)

Results are appended to benchmarks/results/kernels_<device>.csv, with kernels_<device>.json and .png.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from ddk_offline.commands.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
