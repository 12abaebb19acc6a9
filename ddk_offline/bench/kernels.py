"""Benchmark of the fused KD loss against torch baselines: time, peak memory, achieved bandwidth.

Providers: triton-fused, torch-chunked (and torch-chunked-inplace: inplace_grad=True), torch-eager
(``ddk_kernels.reference``, the tests' baseline), torch-compile (torch.compile of the eager loss),
liger (Liger-Kernel's fused cross-entropy: Liger has no sparse top-k KD loss, so this is the CE half
only, a lower bound; GPU and installed only).
Modes: forward, backward (backward alone, after a forward), full (forward + backward).

Memory method. GPU: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
CPU: each (provider, shape) runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (every
large buffer is its own mmap, returned to the OS when freed, so resident memory tracks live tensors);
before each call the peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` and the peak
extra memory is VmHWM after the call minus VmRSS before it. Inputs are excluded; the gradient is
included. Bandwidth floor: forward reads the logits once (N·V·b bytes); backward and full must at
least read the logits once and write the gradient once (2·N·V·b bytes, = 4·N·V for bf16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddk_offline.bench import report
from ddk_offline.bench.measure import measure_shape
from ddk_offline.bench.providers import CPU_SHAPES, GPU_SHAPES, MODES, PROVIDERS, skip_reason


@dataclass
class BenchConfig:
    """What to run; defaults are the CPU quick suite (bf16 on GPU, fp32 on CPU)."""

    device: str = "auto"
    dtype: str = "auto"
    shapes: str = "quick"
    providers: list[str] = field(default_factory=lambda: list(PROVIDERS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    loss_mode: str = "renorm"
    out_dir: Path = Path("benchmarks/results")
    cpu_reps: int = 5
    custom_shapes: list[tuple[int, ...]] | None = None  # (N, V, k) or (N, V, k, D) list replacing the shape set


def _resolve(cfg: BenchConfig) -> tuple[str, str]:
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return device, dtype


def _cpu_subprocess(provider: str, shape: tuple[int, int, int], cfg: BenchConfig, dtype: str) -> list[dict]:
    # Memory in one process (mmap threshold pinned, see the module docstring), time in another with the
    # default allocator: pinned mmaps make every temporary page-fault afresh, which would distort timings.
    mem = _cpu_child_run(provider, shape, cfg, dtype, "memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})
    tim = _cpu_child_run(provider, shape, cfg, dtype, "time", {})
    merged = []
    for m_row, t_row in zip(mem, tim, strict=True):
        row = {**m_row, "ms": t_row.get("ms"), "gbps": t_row.get("gbps")}  # memory from one process, time the other
        if m_row.get("status") == "ok" and t_row.get("status") != "ok":
            row["status"] = t_row.get("status")
        merged.append(row)
    return merged


def _cpu_child_run(provider, shape, cfg: BenchConfig, dtype: str, what: str, extra_env: dict) -> list[dict]:
    spec = dict(
        provider=provider, shape=shape, cfg={**asdict(cfg), "out_dir": str(cfg.out_dir)}, dtype=dtype, what=what
    )
    env = {**os.environ, **extra_env}
    root = Path(__file__).resolve().parents[2]  # the repository: ddk_offline/ and kernels/ live there
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "kernels"), env.get("PYTHONPATH", "")])
    code = "import sys, json; from ddk_offline.bench.kernels import _child; _child(json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(cfg.modes):
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return [
            dict(provider=provider, mode=m, N=shape[0], V=shape[1], k=shape[2], status=f"error: {why}")
            for m in cfg.modes
        ]
    return [json.loads(ln) for ln in lines]


def _child(spec: dict) -> None:
    cfg = BenchConfig(**{**spec["cfg"], "out_dir": Path(spec["cfg"]["out_dir"])})
    N, V, k = spec["shape"][:3]
    try:
        rows = measure_shape(spec["provider"], tuple(spec["shape"]), cfg, "cpu", spec["dtype"], spec["what"])
    except Exception as exc:  # report why (e.g. torch.compile without a working C++ toolchain) and go on
        rows = [
            dict(
                provider=spec["provider"],
                mode=m,
                N=N,
                V=V,
                k=k,
                status=f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            )
            for m in cfg.modes
        ]
    for r in rows:
        print(json.dumps(r), flush=True)


def run_benchmarks(cfg: BenchConfig, log=print) -> Path:
    """Run the suite, append rows to ``<out_dir>/kernels_<device>.csv``, write JSON and PNG; returns the CSV path."""
    device, dtype = _resolve(cfg)
    bad = [p for p in cfg.providers if p not in PROVIDERS] + [m for m in cfg.modes if m not in MODES]
    if bad:
        raise ValueError(f"bench-kernels: unknown provider/mode {bad}; providers {PROVIDERS}, modes {MODES}")
    shapes = cfg.custom_shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)[cfg.shapes]
    env = report.environment(device)
    rows: list[dict] = []
    for shape in shapes:
        for provider in cfg.providers:
            reason = skip_reason(provider, device, tuple(shape))
            if reason:
                got = [
                    dict(provider=provider, mode=m, N=shape[0], V=shape[1], k=shape[2], status=reason)
                    for m in cfg.modes
                ]
            elif device == "cuda":
                try:
                    got = measure_shape(provider, tuple(shape), cfg, device, dtype)
                except Exception as exc:  # one failing provider must not lose the others' numbers
                    got = [
                        dict(
                            provider=provider,
                            mode=m,
                            N=shape[0],
                            V=shape[1],
                            k=shape[2],
                            status=f"error: {type(exc).__name__}: {exc}"[:300],
                        )
                        for m in cfg.modes
                    ]
            else:
                got = _cpu_subprocess(provider, shape, cfg, dtype)
            for r in got:
                r.update(dtype=dtype, loss_mode=cfg.loss_mode, D=shape[3] if len(shape) == 4 else None)
                log(report.fmt_row(r))
            rows.extend(got)
    report.add_ratios(rows)
    return report.write(rows, env, cfg.out_dir, device)
