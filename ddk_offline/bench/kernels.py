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

import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# torch-chunked-inplace: the same with inplace_grad=True (the trainer's case: lm_head's output dies with the loss)
PROVIDERS = ("triton-fused", "torch-chunked", "torch-chunked-inplace", "torch-eager", "torch-compile", "liger")
MODES = ("forward", "backward", "full")
GPU_SHAPES = {
    "quick": [(4096, 32000, 64), (4096, 151936, 64)],
    "full": [(n, v, k) for n in (4096, 16384) for v in (32000, 49152, 128256, 151936) for k in (16, 64, 128)],
}
CPU_SHAPES = {
    "quick": [(1024, 32000, 64), (4096, 49152, 64)],
    "full": [(1024, 32000, 64), (4096, 49152, 16), (4096, 49152, 64), (4096, 49152, 128), (1024, 151936, 64)],
}


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
    custom_shapes: list[tuple[int, int, int]] | None = None  # (N, V, k) list replacing the shape set (tests)


def _resolve(cfg: BenchConfig) -> tuple[str, str]:
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return device, dtype


def make_inputs(N: int, V: int, k: int, dtype: str, device: str, temperature: float = 1.0, seed: int = 0):
    """Student logits [N, V] (dtype) and a consistent top-k teacher; labels have ~5% ignored rows."""
    import torch

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(N, V, device=device, generator=g, dtype=torch.float32).mul_(3.0).to(tdt)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    labels[torch.rand(N, device=device, generator=g) < 0.05] = -100
    topk_ids = torch.randint(0, V, (N, k), device=device, generator=g)
    topk_logits = torch.randn(N, k, device=device, generator=g).mul_(3.0).sort(dim=1, descending=True).values
    teacher_lse = torch.logsumexp(topk_logits / temperature, dim=1) + 0.5  # some mass outside the top-k
    return logits, labels, topk_ids, topk_logits, teacher_lse


def _loss_fn(provider: str, loss_mode: str):
    """Returns f(x, labels, ids, tlog, tlse) -> scalar loss, or raises RuntimeError('skip: why')."""
    import torch

    kw = dict(temperature=1.0, alpha=1.0, gamma=1.0, mode=loss_mode)
    if provider in ("triton-fused", "torch-chunked", "torch-chunked-inplace"):
        from ddk_kernels import fused_kd_loss

        backend = "triton" if provider == "triton-fused" else "torch"
        inplace = provider == "torch-chunked-inplace"
        # In place, the first backward leaves the gradient in the logits buffer and later repetitions run on
        # those values: the work per call does not depend on the data, so the timing is unaffected.
        return lambda x, y, i, t, s: fused_kd_loss(x, y, i, t, s, backend=backend, inplace_grad=inplace, **kw)
    from ddk_kernels.reference import eager_kd_loss

    eager = lambda x, y, i, t, s: eager_kd_loss(x, y, i, t, s, **kw)[0]
    if provider == "torch-eager":
        return eager
    if provider == "torch-compile":
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False  # the backward mode re-runs backward(retain_graph=True)
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss  # optional dependency

        ce = LigerCrossEntropyLoss(ignore_index=-100)
        return lambda x, y, i, t, s: ce(x, y)
    raise ValueError(f"bench-kernels: unknown provider {provider!r}; use one of {PROVIDERS}")


def _skip_reason(provider: str, device: str) -> str | None:
    import importlib.util

    if provider == "triton-fused" and device != "cuda":
        return "skipped: needs a GPU (the CPU interpreter's timings mean nothing)"
    if provider == "liger":
        if device != "cuda":
            return "skipped: Liger-Kernel runs on GPU only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "skipped: liger-kernel is not installed"
    return None


class _CpuPeak:
    """Peak extra resident memory of one call (see the module docstring for why this is sound)."""

    @staticmethod
    def _kib(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field_name}")

    def __enter__(self):
        import gc

        gc.collect()
        self.base = self._kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        self.peak_mib = (self._kib("VmHWM") - self.base) / 1024.0


def _mode_call(mode: str, fn, x, args):
    """The timed callable of one mode; ``backward`` runs a forward first (not timed) and reuses its graph.

    Gradients are taken with ``torch.autograd.grad``, not ``.backward()``: accumulating into the leaf's
    ``.grad`` would copy a gradient that aliases the logits (inplace_grad), which no trainer does (there
    the logits are lm_head's output and their gradient flows on into the matmul backward).
    """
    import torch

    if mode == "forward":

        def forward():
            with torch.no_grad():
                return fn(x, *args)

        return forward
    if mode == "backward":
        loss = fn(x, *args)
        return lambda: torch.autograd.grad(loss, x, retain_graph=True)
    return lambda: torch.autograd.grad(fn(x, *args), x)


def _measure_shape(
    provider: str, N: int, V: int, k: int, cfg: BenchConfig, device: str, dtype: str, what: str = "both"
) -> list[dict]:
    """All modes of one (provider, shape), in this process. Returns one row dict per mode."""
    import torch

    # The in-place provider leaves gradients (tiny, some subnormal) in its input; subnormal arithmetic is
    # ~100x slower on x86 and would distort its later timings, so flush them for every provider alike.
    torch.set_flush_denormal(True)
    fn = _loss_fn(provider, cfg.loss_mode)
    logits, labels, ids, tlog, tlse = make_inputs(N, V, k, dtype, device)
    x = logits.requires_grad_(True)
    args = (labels, ids, tlog, tlse)
    torch.autograd.grad(fn(x, *args), x)  # warm-up: compiles (torch.compile / Triton) before anything is measured
    x.grad = None
    rows = []
    for mode in cfg.modes:
        if mode == "backward" and provider.endswith("inplace"):
            rows.append(dict(mode=mode, provider=provider, N=N, V=V, k=k, status="n/a: an in-place backward cannot be "
                             "repeated on one graph (it overwrote the logits); see full"))  # fmt: skip
            continue
        try:
            rows.append({**_measure_mode(mode, fn, x, args, device, cfg, what), "status": "ok"})
        except Exception as exc:  # e.g. a compiler refusing one mode: report it, keep the other modes
            rows.append(dict(mode=mode, status=f"error: {type(exc).__name__}: {str(exc)[:200]}"))
        x.grad = None
        floor = N * V * x.element_size() * (1 if mode == "forward" else 2)
        rows[-1].update(provider=provider, N=N, V=V, k=k)
        if rows[-1]["status"] == "ok" and rows[-1].get("ms") is not None:
            rows[-1]["gbps"] = floor / rows[-1]["ms"] / 1e6
    return rows


def _measure_mode(mode: str, fn, x, args, device: str, cfg: BenchConfig, what: str) -> dict:
    """Peak extra memory (MiB) of one call and/or (``what``: memory, time, both) the median time (ms)."""
    import torch

    call = _mode_call(mode, fn, x, args)
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        x.grad = None
        import triton.testing

        ms = triton.testing.do_bench(call, grad_to_none=[x], return_mode="median")
    else:
        peak = ms = None
        if what in ("memory", "both"):
            with _CpuPeak() as meter:
                call()
            peak = meter.peak_mib
            x.grad = None
        if what in ("time", "both"):
            call()  # warm the allocator's caches for this mode
            x.grad = None
            times = []
            for _ in range(cfg.cpu_reps):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
                x.grad = None
            ms = statistics.median(times)
    return dict(mode=mode, ms=ms, peak_mib=peak)


def _cpu_subprocess(provider: str, shape: tuple[int, int, int], cfg: BenchConfig, dtype: str) -> list[dict]:
    # Memory in one process (mmap threshold pinned, see the module docstring), time in another with the
    # default allocator: pinned mmaps make every temporary page-fault afresh, which would distort timings.
    mem = _cpu_child_run(provider, shape, cfg, dtype, "memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})
    tim = _cpu_child_run(provider, shape, cfg, dtype, "time", {})
    merged = []
    for m_row, t_row in zip(mem, tim, strict=True):
        row = {**m_row, "ms": t_row.get("ms"), "gbps": t_row.get("gbps")}
        if m_row.get("status") == "ok" and t_row.get("status") != "ok":
            row["status"] = t_row.get("status")
        merged.append(row)
    return merged


def _cpu_child_run(provider, shape, cfg: BenchConfig, dtype: str, what: str, extra_env: dict) -> list[dict]:
    spec = dict(
        provider=provider, shape=shape, cfg={**asdict(cfg), "out_dir": str(cfg.out_dir)}, dtype=dtype, what=what
    )
    env = {**os.environ, **extra_env}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "kernels"), env.get("PYTHONPATH", "")])
    code = "import sys, json; from ddk_offline.bench.kernels import _child; _child(json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(cfg.modes):
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return [dict(provider=provider, mode=m, N=shape[0], V=shape[1], k=shape[2], status=f"error: {why}")
                for m in cfg.modes]  # fmt: skip
    return [json.loads(ln) for ln in lines]


def _child(spec: dict) -> None:
    cfg = BenchConfig(**{**spec["cfg"], "out_dir": Path(spec["cfg"]["out_dir"])})
    N, V, k = spec["shape"]
    try:
        rows = _measure_shape(spec["provider"], N, V, k, cfg, "cpu", spec["dtype"], spec["what"])
    except Exception as exc:  # report why (e.g. torch.compile without a working C++ toolchain) and go on
        rows = [dict(provider=spec["provider"], mode=m, N=N, V=V, k=k, status=f"skipped: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") for m in cfg.modes]  # fmt: skip
    for r in rows:
        print(json.dumps(r), flush=True)


def environment(device: str) -> dict:
    """Device name and library versions recorded beside every result."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
    )
    return dict(device=device, device_name=name, torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), timestamp=dt.datetime.now(dt.timezone.utc).isoformat())  # fmt: skip


def run_benchmarks(cfg: BenchConfig, log=print) -> Path:
    """Run the suite, append rows to ``<out_dir>/kernels_<device>.csv``, write JSON and PNG; returns the CSV path."""
    device, dtype = _resolve(cfg)
    bad = [p for p in cfg.providers if p not in PROVIDERS] + [m for m in cfg.modes if m not in MODES]
    if bad:
        raise ValueError(f"bench-kernels: unknown provider/mode {bad}; providers {PROVIDERS}, modes {MODES}")
    shapes = cfg.custom_shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)[cfg.shapes]
    env = environment(device)
    rows: list[dict] = []
    for shape in shapes:
        for provider in cfg.providers:
            reason = _skip_reason(provider, device)
            if reason:
                got = [
                    dict(provider=provider, mode=m, N=shape[0], V=shape[1], k=shape[2], status=reason)
                    for m in cfg.modes
                ]
            elif device == "cuda":
                try:
                    got = _measure_shape(provider, *shape, cfg, device, dtype)
                except Exception as exc:  # one failing provider must not lose the others' numbers
                    got = [dict(provider=provider, mode=m, N=shape[0], V=shape[1], k=shape[2],
                                status=f"error: {type(exc).__name__}: {exc}"[:300]) for m in cfg.modes]  # fmt: skip
            else:
                got = _cpu_subprocess(provider, shape, cfg, dtype)
            for r in got:
                r.update(dtype=dtype, loss_mode=cfg.loss_mode)
                log(_fmt(r))
            rows.extend(got)
    _add_ratios(rows)
    return _write(rows, env, cfg.out_dir, device)


def _fmt(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['provider']:>14} {r['mode']:>8} N={r['N']} V={r['V']} k={r['k']}: {r['status']}"
    return (f"{r['provider']:>14} {r['mode']:>8} N={r['N']} V={r['V']} k={r['k']}: {r['ms']:9.2f} ms "
            f"{r['peak_mib']:9.1f} MiB {r['gbps']:7.2f} GB/s")  # fmt: skip


def _add_ratios(rows: list[dict]) -> None:
    # Ratios against torch-eager measured in the same run, same shape and mode.
    eager = {
        (r["N"], r["V"], r["k"], r["mode"]): r
        for r in rows
        if r["provider"] == "torch-eager" and r.get("status") == "ok"
    }
    for r in rows:
        e = eager.get((r["N"], r["V"], r["k"], r["mode"]))
        ok = r.get("status") == "ok" and e is not None
        r["speedup_vs_eager"] = e["ms"] / r["ms"] if ok and r["ms"] > 0 else None
        r["mem_ratio_vs_eager"] = r["peak_mib"] / e["peak_mib"] if ok and e["peak_mib"] > 0 else None


COLUMNS = ["timestamp", "device_name", "torch", "triton", "provider", "mode", "loss_mode", "dtype", "N", "V", "k",
           "ms", "peak_mib", "gbps", "speedup_vs_eager", "mem_ratio_vs_eager", "status"]  # fmt: skip


def _write(rows: list[dict], env: dict, out_dir: Path, device: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"kernels_{device}.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**env, **r})
    (out_dir / f"kernels_{device}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    _plot(rows, env, out_dir / f"kernels_{device}.png")
    return csv_path


def _plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r["mode"] == "full"]
    if not ok:
        return
    shapes = sorted({(r["N"], r["V"], r["k"]) for r in ok})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        for ax, key in zip(axes, ("ms", "peak_mib"), strict=True):
            vals = [
                next((r[key] for r in ok if r["provider"] == p and (r["N"], r["V"], r["k"]) == s), 0) for s in shapes
            ]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
    for ax, title in zip(axes, ("median time, forward + backward (ms)", "peak extra memory (MiB)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"N={n}\nV={v}\nk={k}" for n, v, k in shapes])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"fused KD loss, {env['device_name']}, torch {env['torch']}, {ok[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
