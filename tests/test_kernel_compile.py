"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one, in every KD mode.

The interpreter (TRITON_INTERPRET=1, tests/test_kd_loss.py) checks the numbers but not that the kernel compiles:
constexpr branches, dtypes and block shapes are only checked by the real compiler, which Triton runs here for a GPU
target without a GPU (ptxas is bundled).
"""

from __future__ import annotations

import pytest
import triton
from ddk_kernels import KD_MODES, kd_triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FWD_POINTERS = ["*bf16", "*i64", "*i64", "*fp32", "*fp32", "*i32", "*fp32", "*fp32", "*fp32"]
BWD_POINTERS = ["*bf16", "*bf16", "*i64", "*i64", "*fp32", "*fp32", "*fp32", "*fp32"]


def _signature(fn, pointers: list[str]) -> dict[str, str]:
    names = fn.arg_names
    sig = {}
    for i, name in enumerate(names):
        if i < len(pointers):
            sig[name] = pointers[i]
        elif name in ("MODE", "BLOCK_V", "BLOCK_K"):
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name == "inv_t" else "i64"
    return sig


@pytest.mark.parametrize("mode", KD_MODES)
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_kernel_compiles_for_sm90(kernel, mode):
    fn, pointers = (
        (kd_triton._kd_fwd_kernel, FWD_POINTERS) if kernel == "forward" else (kd_triton._kd_bwd_kernel, BWD_POINTERS)
    )
    source = ASTSource(
        fn=fn,
        signature=_signature(fn, pointers),
        constexprs={"MODE": KD_MODES.index(mode), "BLOCK_V": 4096, "BLOCK_K": 64},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 10_000 and ".target sm_90" in compiled.asm["ptx"]
