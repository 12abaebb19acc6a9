"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one, in every KD mode.

The interpreter (TRITON_INTERPRET=1, tests/test_kd_loss.py) checks the numbers but not that the kernel compiles:
constexpr branches, dtypes and block shapes are only checked by the real compiler, which Triton runs here for a GPU
target without a GPU (ptxas is bundled). The compile runs in a fresh process: once the interpreter is on in this
one, ``@triton.jit`` functions are interpreted objects that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ddk_kernels import KD_MODES, kd_triton

POINTERS = {
    "forward": ["*bf16", "*i64", "*i64", "*fp32", "*fp32", "*i32", "*fp32", "*fp32", "*fp32"],
    "backward": ["*bf16", "*bf16", "*i64", "*i64", "*fp32", "*fp32", "*fp32", "*fp32"],
}
out = {}
for kernel, fn in (("forward", kd_triton._kd_fwd_kernel), ("backward", kd_triton._kd_bwd_kernel)):
    pointers = POINTERS[kernel]
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if i < len(pointers):
            sig[name] = pointers[i]
        elif name in ("MODE", "BLOCK_V", "BLOCK_K"):
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name == "inv_t" else "i64"
    for mode in KD_MODES:
        src = ASTSource(fn=fn, signature=sig, constexprs={"MODE": KD_MODES.index(mode), "BLOCK_V": 4096, "BLOCK_K": 64})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        out[f"{kernel}-{mode}"] = [len(compiled.asm["cubin"]), ".target sm_90" in compiled.asm["ptx"]]
print(json.dumps(out))
"""


def test_both_kernels_compile_for_sm90_in_every_mode():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == ["backward-renorm", "backward-tail", "forward-renorm", "forward-tail"]
    assert all(size > 10_000 and sm90 for size, sm90 in result.values())
    # The tail branches are compiled in only in tail mode.
    assert result["forward-tail"][0] != result["forward-renorm"][0]
