"""The Triton kernels compile for Hopper (sm_90a) on a machine without a GPU, without spills, in <= 128 registers.

The interpreter (TRITON_INTERPRET=1, tests/test_kd_loss.py) checks the numbers but not what the GPU compiler makes of
the kernels: constexpr branches, dtypes, block shapes, and the register allocation (v1's backward needed 255 registers
and spilled at K = 256). ``pipelines/kernel_report.py --grid ci --check`` compiles every kernel in every mode and at
both temperature cases (T = 1 is a compile-time specialisation) at the largest K, bf16 and fp32, at the production
block size and warps, at V = 151936 and at V = 50257 (whose rows need the 16-byte-aligned head / loop / tail split
to keep 128-bit loads and stores), and exits 1 on a spill or on more than 128 registers. It runs in a fresh process:
once the interpreter is on in this one, ``@triton.jit`` functions are interpreted objects that cannot be compiled.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90a_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "pipelines" / "kernel_report.py"), "--grid", "ci", "--check", "--out-dir",
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "kernel_report.csv").open()))
    seen = {(r["pass"], r["mode"], r["temperature"], r["dtype"]) for r in rows}
    assert seen == {(p, m, t, d) for p in ("forward", "backward") for m in ("renorm", "tail") for t in ("1.0", "2.0")
                    for d in ("bf16", "fp32")}  # fmt: skip
    assert {r["V"] for r in rows} == {"50257", "151936"}
    for r in rows:
        assert r["target"] == "sm_90a" and r["K"] == "256"
        assert int(r["spills_bytes"]) == 0 and 0 < int(r["registers"]) <= 128, r
        assert int(r["loop_instr"]) > 0 and float(r["mufu_per_element"]) >= 1, r  # the vocabulary loop was found
        # 16-byte accesses in the hot loop also when V (and so the row stride) is not a multiple of 16
        assert int(r["loop_load_bits"]) == 128, r
        if r["pass"] == "backward":
            assert int(r["loop_store_bits"]) == 128, r
    # T = 1 is its own compiled case: one exponential per element per pass instead of two.
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    mufu = {(r["pass"], r["mode"], r["temperature"]): float(r["mufu_per_element"]) for r in bf16}
    assert mufu[("forward", "renorm", "1.0")] < mufu[("forward", "renorm", "2.0")]
    assert mufu[("backward", "tail", "1.0")] < mufu[("backward", "tail", "2.0")]
