"""Measuring one provider on one shape: median time and peak extra memory of forward, backward or both.

Memory method. GPU: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
CPU: each (provider, shape) runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (every
large buffer is its own mmap, returned to the OS when freed, so resident memory tracks live tensors);
before each call the peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` and the peak
extra memory is VmHWM after the call minus VmRSS before it. Inputs are excluded; the gradient is
included. Shapes with D (hidden [N, D] and weight [V, D] as inputs) also report ``extra_mib``: the peak less the
gradients of the inputs (``grads_mib``), which every provider must return: the loss's own memory.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from ddk_offline.bench.providers import loss_fn, make_leaves


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


def _mode_call(mode: str, fn, x: tuple, args):
    """The timed callable of one mode; ``backward`` runs a forward first (not timed) and reuses its graph.

    Gradients are taken with ``torch.autograd.grad``, not ``.backward()``: accumulating into the leaf's
    ``.grad`` would copy a gradient that aliases the logits (inplace_grad), which no trainer does (there
    the logits are lm_head's output and their gradient flows on into the matmul backward).
    """
    import torch

    if mode == "forward":

        def forward():
            with torch.no_grad():
                return fn(*x, *args)

        return forward
    if mode == "backward":
        loss = fn(*x, *args)
        return lambda: torch.autograd.grad(loss, x, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*x, *args), x)


def measure_shape(provider: str, shape: tuple, cfg: Any, device: str, dtype: str, what: str = "both") -> list[dict]:
    """All modes of one (provider, shape (N, V, k) or (N, V, k, D)), in this process. Returns one row per mode."""
    import torch

    # The in-place provider leaves gradients (tiny, some subnormal) in its input; subnormal arithmetic is
    # ~100x slower on x86 and would distort its later timings, so flush them for every provider alike.
    torch.set_flush_denormal(True)
    N, V, k = shape[:3]
    D = shape[3] if len(shape) == 4 else None
    fn = loss_fn(provider, cfg.loss_mode, linear=D is not None)
    x, args = make_leaves(shape, dtype, device)
    torch.autograd.grad(fn(*x, *args), x)  # warm-up: compiles (torch.compile / Triton) before anything is measured
    grads_mib = sum(t.numel() * t.element_size() for t in x) / 2**20
    rows = []
    for mode in cfg.modes:
        if mode == "backward" and provider.endswith("inplace"):
            rows.append(
                dict(
                    mode=mode,
                    provider=provider,
                    N=N,
                    V=V,
                    k=k,
                    status="n/a: an in-place backward cannot be "
                    "repeated on one graph (it overwrote the logits); see full",
                )
            )
            continue
        try:
            rows.append({**_measure_mode(mode, fn, x, args, device, cfg, what), "status": "ok"})
        except Exception as exc:  # e.g. a compiler refusing one mode: report it, keep the other modes
            rows.append(dict(mode=mode, status=f"error: {type(exc).__name__}: {str(exc)[:200]}"))
        floor = N * V * x[0].element_size() * (1 if mode == "forward" else 2)
        rows[-1].update(provider=provider, N=N, V=V, k=k, D=D)
        if rows[-1]["status"] == "ok" and rows[-1].get("ms") is not None and D is None:
            rows[-1]["gbps"] = floor / rows[-1]["ms"] / 1e6  # the logits' bytes: no floor when there are none
        if rows[-1]["status"] == "ok" and rows[-1].get("peak_mib") is not None and D is not None:
            rows[-1]["grads_mib"] = grads_mib if mode != "forward" else 0.0
            rows[-1]["extra_mib"] = rows[-1]["peak_mib"] - rows[-1]["grads_mib"]
    return rows


def _measure_mode(mode: str, fn, x, args, device: str, cfg: Any, what: str) -> dict:
    """Peak extra memory (MiB) of one call and/or (``what``: memory, time, both) the median time (ms)."""
    import torch

    call = _mode_call(mode, fn, x, args)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        import triton.testing

        ms = triton.testing.do_bench(call, grad_to_none=list(x), return_mode="median")
    else:
        peak = ms = None
        if what in ("memory", "both"):
            with _CpuPeak() as meter:
                call()
            peak = meter.peak_mib
        if what in ("time", "both"):
            call()  # warm the allocator's caches for this mode
            times = []
            for _ in range(cfg.cpu_reps):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
    return dict(mode=mode, ms=ms, peak_mib=peak)
