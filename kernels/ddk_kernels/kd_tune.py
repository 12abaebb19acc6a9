"""Launch configurations of the KD kernels: the static default and an autotuner of BLOCK_V and num_warps.

The static default (2048 lanes, 8 warps: eight contiguous elements, one 16-byte bf16 access per thread) is what
``pipelines/kernel_report.py`` compiles and what every CPU / interpreter run uses. On CUDA, the first call for a
problem times a few candidates on scratch buffers (the caller's tensors are never touched) and keeps the fastest:

- the key: pass (forward / backward), V, K, logits dtype, mode, T == 1, GPU name, Triton version and a hash of the
  kernels' source, so a new GPU, Triton or kernel never reuses a stale choice;
- a candidate that fails to compile, spills or uses more than 128 registers is dropped;
- the static default wins unless a candidate is more than 3% faster (timings of a few milliseconds are that noisy);
- choices are cached in-process and in ``$XDG_CACHE_HOME/ddk_kernels/kd_autotune.json`` (written atomically; an
  unreadable file is ignored with a warning and rewritten).

Environment: ``DDK_KD_AUTOTUNE=0`` turns tuning off (static config); ``DDK_KD_AUTOTUNE_CACHE=PATH`` moves the cache
file, ``DDK_KD_AUTOTUNE_CACHE=off`` keeps choices in-process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

MAX_BLOCK_V = 2048  # 8 elements per thread at 8 warps: one 16-byte bf16 load
MAX_REGISTERS = 128  # above it a block of 8 warps no longer fits twice per SM (and the CI rule fails)
TIE = 0.03  # a candidate must beat the static default by more than this fraction of its time
CACHE_VERSION = 1
_SOURCES = ("kd_triton.py", "kd_triton_math.py")

# measure(config) -> (seconds, registers, spill bytes); raises when the configuration does not compile.
Measure = Callable[[dict], tuple[float, int, int]]


def static_config(V: int, block_v: int | None = None, num_warps: int | None = None) -> dict:
    """The default {"BLOCK_V", "num_warps"} of a row of V elements (either may be given to override it)."""
    block_v = block_v or min(MAX_BLOCK_V, _next_pow2(V))
    return {"BLOCK_V": block_v, "num_warps": num_warps or (8 if block_v >= 2048 else 4)}


def candidates(V: int, elem_bytes: int) -> list[dict]:
    """Configurations worth timing: a power-of-two BLOCK_V no wider than the row, 4-16 warps, and at least one
    16-byte access per thread and per block (fewer elements would lose the 128-bit loads)."""
    vec = 16 // elem_bytes
    out = []
    for block_v in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            per_thread = block_v // (32 * warps)
            if block_v <= max(_next_pow2(V), 1024) and vec <= per_thread <= 32:
                out.append({"BLOCK_V": block_v, "num_warps": warps})
    default = static_config(V)
    return [default] + [c for c in out if c != default]


def autotune_enabled(env=None) -> bool:
    return (env if env is not None else os.environ).get("DDK_KD_AUTOTUNE", "1").strip().lower() not in ("0", "off")


def cache_path(env=None) -> Path | None:
    """The cache file, or None when ``DDK_KD_AUTOTUNE_CACHE=off``."""
    env = env if env is not None else os.environ
    value = env.get("DDK_KD_AUTOTUNE_CACHE", "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ddk_kernels" / "kd_autotune.json"


def source_hash() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def tune_key(pass_: str, V: int, K: int, dtype: str, mode: int, t_one: bool, gpu: str, triton_version: str,
             src_hash: str) -> str:  # fmt: skip
    """One string per problem the choice depends on (JSON object keys must be strings)."""
    return "|".join([pass_, f"V={V}", f"K={K}", str(dtype).replace("torch.", ""), f"mode={mode}", f"t1={int(t_one)}",
                     gpu, f"triton={triton_version}", f"src={src_hash}"])  # fmt: skip


class Tuner:
    """Chooses a configuration per key: from memory, from the cache file, or by measuring the candidates."""

    def __init__(self, path: Path | None = None, tie: float = TIE, max_registers: int = MAX_REGISTERS):
        self.path = path
        self.tie = tie
        self.max_registers = max_registers
        self.memory: dict[str, dict] = {}
        self._loaded = False

    def choose(self, key: str, default: dict, configs: list[dict], measure: Measure) -> dict:
        if key in self.memory:
            return self.memory[key]
        self._load()
        if key in self.memory:
            return self.memory[key]
        timings = {}
        for cfg in configs:
            try:
                seconds, registers, spills = measure(cfg)
            except Exception as err:  # noqa: BLE001 - a candidate that does not compile or launch is dropped
                timings[_name(cfg)] = f"failed: {type(err).__name__}"
                continue
            if spills > 0 or registers > self.max_registers:
                timings[_name(cfg)] = f"dropped: {registers} registers, {spills} B spilled"
                continue
            timings[_name(cfg)] = seconds
        ok = {name: t for name, t in timings.items() if isinstance(t, float)}
        best = dict(default)
        if ok:
            fastest = min(ok, key=ok.get)
            default_t = ok.get(_name(default))
            if default_t is None or ok[fastest] < default_t * (1.0 - self.tie):
                best = next(c for c in configs if _name(c) == fastest)
        choice = {"BLOCK_V": best["BLOCK_V"], "num_warps": best["num_warps"]}
        self.memory[key] = choice
        self._save(key, choice, timings)
        return choice

    def _load(self) -> None:
        if self._loaded or self.path is None:
            return
        self._loaded = True
        for key, entry in _read(self.path).items():
            self.memory.setdefault(key, {"BLOCK_V": entry["BLOCK_V"], "num_warps": entry["num_warps"]})

    def _save(self, key: str, choice: dict, timings: dict) -> None:
        if self.path is None:
            return
        entries = _read(self.path, quiet=True)
        entries[key] = {**choice, "timings_s": timings}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kd_autotune.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        except OSError as err:
            warnings.warn(f"ddk_kernels: could not write the autotune cache {self.path}: {err}", stacklevel=3)


def tuned(pass_: str, logits, K: int, spec, default: dict, kd_forward, kd_backward) -> dict:
    """The process tuner's configuration for launching `pass_` on `logits` (CUDA), measured on a scratch problem."""
    import torch
    import triton

    key = tune_key(pass_, logits.shape[1], K, logits.dtype, spec.mode, spec.temperature == 1.0,
                   torch.cuda.get_device_name(logits.device), triton.__version__, source_hash())  # fmt: skip
    measure = scratch_measure(pass_, logits, K, spec, kd_forward, kd_backward)
    configs = [default] + [c for c in candidates(logits.shape[1], logits.element_size()) if c != default]
    return tuner().choose(key, default, configs, measure)


def scratch_measure(pass_: str, logits, K: int, spec, kd_forward, kd_backward, rows: int = 1024) -> Measure:
    """measure(config) for the tuner: times the launcher `pass_` on a scratch problem shaped like the caller's
    (same V, K, dtype, mode and temperature; at most `rows` rows and ~256 MB), so the caller's tensors are never
    read or written. Registers and spills come from the compiled kernel."""
    import torch
    from triton.testing import do_bench

    N, V = logits.shape
    n = max(1, min(N, rows, (1 << 28) // max(V * logits.element_size(), 1)))
    dev = logits.device
    z = (torch.randn(n, V, device=dev) * 3.0).to(logits.dtype)
    labels = torch.randint(0, V, (n,), device=dev)
    ids = torch.randint(0, V, (n, K), device=dev).sort(dim=1).values
    tlog = torch.randn(n, K, device=dev) * 3.0
    tlse = (tlog / spec.temperature).logsumexp(dim=1) + 1.0  # tail mode: ~63% of the teacher's mass in the top-k
    stats = kd_forward(z, labels, ids, tlog, tlse, spec)[2] if pass_ == "backward" else None
    grad = torch.empty_like(z)
    scale = torch.ones(2, device=dev)

    def launch(cfg: dict, out: list | None = None):
        if pass_ == "forward":
            return kd_forward(z, labels, ids, tlog, tlse, spec, config=cfg, _out=out)
        return kd_backward(z, grad, labels, ids, tlog, tlse, stats, scale, spec, config=cfg, _out=out)

    def measure(cfg: dict) -> tuple[float, int, int]:
        out: list = []
        launch(cfg, out)  # compiles
        kernel = out[-1]
        registers, spills = int(getattr(kernel, "n_regs", 0)), int(getattr(kernel, "n_spills", 0))
        if spills > 0 or registers > MAX_REGISTERS:
            return float("inf"), registers, spills  # not worth timing
        return do_bench(lambda: launch(cfg), warmup=10, rep=40) * 1e-3, registers, spills

    return measure


def _read(path: Path, quiet: bool = False) -> dict:
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("version") == CACHE_VERSION else {}
        if not all(isinstance(e["BLOCK_V"], int) and isinstance(e["num_warps"], int) for e in entries.values()):
            raise ValueError("an entry lacks an integer BLOCK_V or num_warps")
        return dict(entries)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        if not quiet:
            warnings.warn(f"ddk_kernels: ignoring the unreadable autotune cache {path} ({err}); it will be rewritten",
                          stacklevel=4)  # fmt: skip
        return {}


def _name(cfg: dict) -> str:
    return f"BLOCK_V={cfg['BLOCK_V']},num_warps={cfg['num_warps']}"


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_TUNER: Tuner | None = None


def tuner() -> Tuner:
    """The process's tuner; a new one (empty memory) when ``DDK_KD_AUTOTUNE_CACHE`` names another file."""
    global _TUNER
    path = cache_path()
    if _TUNER is None or _TUNER.path != path:
        _TUNER = Tuner(path)
    return _TUNER
