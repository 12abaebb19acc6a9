#!/usr/bin/env python
"""Static report of the fused KD kernels compiled for Hopper / Ampere on a machine without a GPU.

Triton compiles for a GPU target on the CPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``);
its bundled ``cuobjdump`` reads registers, local memory (spills) and shared memory from the cubin and disassembles
it to SASS. For every kernel of ``ddk_kernels.kd_triton`` and every configuration of the production grid this script
reports those counts, the SASS instructions and MUFU (special-function) operations per vocabulary element in the hot
loop, the bytes each element costs, and the fraction of the memory floor that the issue-rate / bandwidth / latency
model of benchmarks/NOTES.md predicts on an H100 and an H200. The CSV is regenerated from the code on every run.

    python pipelines/kernel_report.py                          # full grid, sm_90a + sm_80 (~15 min on 2 cores)
    python pipelines/kernel_report.py --baseline main          # also the kernels of `main` (sm_90a bf16): before/after
    python pipelines/kernel_report.py --grid ci --check --out-dir /tmp/r   # the CI subset; exit 1 on a violation

Outputs: benchmarks/results/kernel_report.csv (one row per kernel and configuration), kernel_report.md (summary,
targets, before/after when --baseline is given) and kernel_report_baseline.csv with --baseline.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# ---- the grid -----------------------------------------------------------------------------------------------------
GRIDS = {
    "full": dict(targets=["sm_90a", "sm_80"], V=[32000, 50257, 151936, 262144], K=[16, 64, 128, 256],
                 dtype=["bf16", "fp16", "fp32"], mode=["renorm", "tail"], temperature=[1.0, 2.0],
                 id_dtype=["int32", "int64"]),
    # Before/after with --baseline: the old kernels on sm_90a bf16 (what the comparison table shows); v1's spilling
    # backward takes ptxas ~30 s per configuration, so the baseline is not compiled over the full grid.
    "compare": dict(targets=["sm_90a"], V=[32000, 50257], K=[16, 64, 128, 256], dtype=["bf16"], mode=["renorm", "tail"],
                    temperature=[1.0, 2.0], id_dtype=["int64"]),
    # CI: every kernel and mode at the largest K, bf16 and fp32, both temperatures (kernel_compile test), at an
    # aligned V and at GPT-2's 50257 (rows in every 16-byte phase: the head / aligned loop / tail split).
    "ci": dict(targets=["sm_90a"], V=[50257, 151936], K=[256], dtype=["bf16", "fp32"], mode=["renorm", "tail"],
               temperature=[1.0, 2.0], id_dtype=["int64"]),
    # A minute or two: the issue's target case (T = 1, bf16) at an aligned and an unaligned V, both modes.
    "quick": dict(targets=["sm_90a"], V=[32000, 50257], K=[128], dtype=["bf16"], mode=["renorm", "tail"],
                  temperature=[1.0], id_dtype=["int64"]),
}  # fmt: skip
TARGETS = {"sm_90a": 90, "sm_80": 80}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# ---- the performance model (assumptions in benchmarks/NOTES.md) ---------------------------------------------------
GPUS = {
    # SMs, sustained SM clock (Hz), peak HBM bytes/s; the model uses ACHIEVABLE_BW of the peak as the floor.
    "h100": dict(sms=132, clock=1.755e9, bw=3.35e12),
    "h200": dict(sms=132, clock=1.755e9, bw=4.8e12),
}
ACHIEVABLE_BW = 0.9  # a copy kernel reaches ~90% of peak HBM bandwidth
ISSUE_PER_SM = 4 * 32  # four schedulers, one warp instruction (32 lanes) per clock each
MUFU_PER_SM = 16  # ex2 / lg2 / rcp results per clock per SM (CUDA guide, compute capability 8.x / 9.0)
DRAM_LATENCY_S = 600e-9  # loaded HBM latency: bytes in flight per SM / latency bounds the bandwidth
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32

COLUMNS = ["kernel", "pass", "target", "V", "K", "dtype", "mode", "temperature", "id_dtype", "block_v", "num_warps",
           "registers", "spills_bytes", "shared_bytes", "blocks_per_sm", "loop_instr", "other_loops_instr",
           "loop_load_bits", "loop_store_bits", "unroll",
           "instr_per_element", "mufu_per_element", "bytes_per_element", "predicted_floor_fraction_h100",
           "predicted_floor_fraction_h200", "bound_h100"]  # fmt: skip

TARGETS_T1_BF16 = dict(max_registers=128, fwd_instr=12.0, bwd_instr=10.0, floor_h100=0.85, slack=1.5)


def predict(row: dict, gpu: dict) -> tuple[float, str]:
    """Fraction of the memory floor the kernel reaches, and the bound: max of four times per element (seconds).

    Issue: instructions / (SMs · 128 · clock); MUFU: ops / (SMs · 16 · clock); memory: bytes / achievable bandwidth;
    latency: bytes / (SMs · bytes in flight per SM / latency), the bytes in flight being one loop iteration of every
    resident block. Per-row work outside the hot loop is not counted (it is O(K) against O(V)).
    """
    per_sm_clock = gpu["sms"] * gpu["clock"]
    t_issue = row["instr_per_element"] / (per_sm_clock * ISSUE_PER_SM)
    t_mufu = row["mufu_per_element"] / (per_sm_clock * MUFU_PER_SM)
    t_mem = row["bytes_per_element"] / (gpu["bw"] * ACHIEVABLE_BW)
    in_flight = row["blocks_per_sm"] * row["block_v"] * DTYPE_BYTES[row["dtype"]]
    t_lat = row["bytes_per_element"] / (gpu["sms"] * in_flight / DRAM_LATENCY_S) if in_flight else math.inf
    times = {"issue": t_issue, "mufu": t_mufu, "memory": t_mem, "latency": t_lat}
    bound = max(times, key=times.get)
    return t_mem / times[bound], bound


def blocks_per_sm(registers: int, num_warps: int, shared: int) -> int:
    threads = 32 * num_warps
    regs = max(8, -(-registers // 8) * 8)  # allocated per thread in units of 8
    by_regs = REGS_PER_SM // (regs * threads)
    by_smem = (228 * 1024) // shared if shared else MAX_BLOCKS_PER_SM
    return max(0, min(by_regs, MAX_THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM, by_smem))


# ---- SASS ---------------------------------------------------------------------------------------------------------
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def hot_loop(sass: str) -> tuple[list[str], int]:
    """The vocabulary loop: the first outermost loop (a backward branch) that loads from global memory.

    Nested loops are counted once (static count). Returns its instructions ([] when there is none) and the
    instruction count of the other such loops (e.g. tail mode's masked pass, run only on rows that need it).
    """
    instrs = [(int(a, 16), text.strip()) for a, text in _INSTR.findall(sass)]
    loops = []
    for addr, text in instrs:
        m = _BRA.search(text)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    found = []
    for lo, hi in sorted(loops):
        body = [t for a, t in instrs if lo <= a <= hi]
        outer = not any((lo2 < lo and hi2 >= hi) or (lo2 <= lo and hi2 > hi) for lo2, hi2 in loops)
        if outer and any(opcode(t).startswith("LDG") for t in body):
            found.append(body)
    if not found:
        return [], 0
    return found[0], sum(len(b) for b in found[1:])


def access_bits(loop: list[str], prefix: str) -> tuple[int, int]:
    """The narrowest global access of `prefix` (LDG / STG) in the loop, in bits (0 when none), and the bits all
    of them move per thread and trip. 128 is a vectorised 16-byte access; 16 a bf16 element at a time."""
    widths = []
    for t in loop:
        op = opcode(t)
        if op.startswith(prefix):
            m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
            widths.append(({"128": 128, "64": 64, "U16": 16, "S16": 16}.get(m.group(1), 8)) if m else 32)
    return (min(widths), sum(widths)) if widths else (0, 0)


def opcode(text: str) -> str:
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


# ---- compiling (runs in a worker process: no TRITON_INTERPRET, the chosen kernels directory first on sys.path) ----
def _signature(fn, cfg: dict, constexprs: dict) -> tuple[dict, dict]:
    """Argument types by name, as the launcher passes them, and the divisibility the JIT would specialise."""
    float_ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[cfg["dtype"]]
    ids = {"int32": "*i32", "int64": "*i64"}[cfg["id_dtype"]]
    div16 = cfg["V"] % 16 == 0
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            sig[name] = float_ptr
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name == "ids_ptr":
            sig[name] = ids
        elif name == "sorted_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("inv_t", "scale") or name.startswith("c_"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # V, K, strides, ignore_index: the JIT passes Python ints below 2^31 as i32
        # The JIT specialises pointers and integers divisible by 16: the launcher's aligned bases, a column offset
        # of 0 (contiguous logits), V and the row strides of contiguous [N, V] logits and gradient when 16 | V.
        row_stride = name.endswith("stride") and ("logits" in name or "grad" in name)
        if name.endswith("_ptr") or name.endswith("col0") or (div16 and (name == "V" or row_stride)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _launch(kd, cfg: dict) -> dict:
    """The kernels' constexprs and warps for a configuration, from the module's own launcher policy."""
    temperature = cfg["temperature"]
    mode = ["renorm", "tail"].index(cfg["mode"])
    if hasattr(kd, "launch_config"):
        return kd.launch_config(cfg["V"], cfg["K"], DTYPE_BYTES[cfg["dtype"]], mode, temperature)
    block_v, block_k, num_warps = kd._blocks(cfg["V"], cfg["K"])  # kernels v1
    return {"*": dict(constexprs=dict(MODE=mode, BLOCK_V=block_v, BLOCK_K=block_k), num_warps=num_warps)}


def _kernels(kd) -> dict:
    out = {}
    for name in dir(kd):
        if name.startswith("_kd_") and name.endswith("_kernel"):
            out[name.strip("_")] = getattr(kd, name)
    return out


def worker(configs: list[dict]) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kd = importlib.import_module("ddk_kernels.kd_triton")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cache: dict = {}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="kernel_report_"))
    for cfg in configs:
        launch = _launch(kd, cfg)
        for kname, fn in sorted(_kernels(kd).items()):
            lc = launch.get(kname, launch.get("*"))
            if lc is None:
                continue
            constexprs = {k: v for k, v in lc["constexprs"].items() if k in fn.arg_names}
            sig, attrs = _signature(fn, cfg, constexprs)
            key = (kname, cfg["target"], json.dumps(sig, sort_keys=True), str(sorted(attrs)),
                   str(sorted(constexprs.items())), lc["num_warps"])  # fmt: skip
            if key not in cache:
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[cfg["target"]], 32),
                                          options={"num_warps": lc["num_warps"]})  # fmt: skip
                cubin = tmp / f"{len(cache)}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                       text=True, check=True).stdout  # fmt: skip
                sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                                      check=True).stdout  # fmt: skip
                res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
                loop, other = hot_loop(sass)
                (load_bits, load_total), (store_bits, _) = access_bits(loop, "LDG"), access_bits(loop, "STG")
                cache[key] = dict(registers=int(res["REG"]), spills_bytes=int(res["LOCAL"]) + int(res["STACK"]),
                                  shared_bytes=int(res["SHARED"]), loop_instr=len(loop), other_loops_instr=other,
                                  loop_mufu=sum(opcode(t).startswith("MUFU") for t in loop), loop_load_bits=load_bits,
                                  loop_store_bits=store_bits, load_total_bits=load_total)  # fmt: skip
            c = cache[key]
            block_v = constexprs.get("BLOCK_V", 0)
            per_thread = block_v / (32 * lc["num_warps"]) if block_v else 1.0
            kind = "forward" if "fwd" in kname else "backward" if "bwd" in kname else "other"
            b = DTYPE_BYTES[cfg["dtype"]]
            # Loop trips per block of BLOCK_V elements: > 1 when the compiler unrolled the loop; the per-element
            # counts divide by the elements one trip covers (the loads' bits over the element's).
            unroll = max(1, round(c["load_total_bits"] / (8 * b * per_thread))) if block_v else 1
            per_thread *= unroll
            row = dict(kernel=kname, **{"pass": kind}, target=cfg["target"], V=cfg["V"], K=cfg["K"], dtype=cfg["dtype"],
                       mode=cfg["mode"], temperature=cfg["temperature"], id_dtype=cfg["id_dtype"], block_v=block_v,
                       num_warps=lc["num_warps"], registers=c["registers"], spills_bytes=c["spills_bytes"],
                       shared_bytes=c["shared_bytes"], loop_instr=c["loop_instr"],
                       other_loops_instr=c["other_loops_instr"], loop_load_bits=c["loop_load_bits"],
                       loop_store_bits=c["loop_store_bits"], unroll=unroll,
                       instr_per_element=round(c["loop_instr"] / per_thread, 2),
                       mufu_per_element=round(c["loop_mufu"] / per_thread, 3),
                       bytes_per_element=lc.get("bytes", {}).get(kind, b if kind == "forward" else 2 * b))  # fmt: skip
            row["blocks_per_sm"] = blocks_per_sm(c["registers"], lc["num_warps"], c["shared_bytes"])
            for gpu in GPUS:
                frac, bound = predict(row, GPUS[gpu])
                row[f"predicted_floor_fraction_{gpu}"] = round(frac, 3)
                if gpu == "h100":
                    row["bound_h100"] = bound
            rows.append(row)
    return rows


# ---- driver -------------------------------------------------------------------------------------------------------
def expand(grid: dict) -> list[dict]:
    keys = ["target", "V", "K", "dtype", "mode", "temperature", "id_dtype"]
    lists = [grid["targets"], grid["V"], grid["K"], grid["dtype"], grid["mode"], grid["temperature"], grid["id_dtype"]]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*lists)]


def collect(kernels_dir: Path, configs: list[dict], jobs: int) -> list[dict]:
    """Compile in `jobs` worker processes with `kernels_dir` first on the path and TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(kernels_dir), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; silences triton 3.9's warning
    # Configurations that differ only in V compile alike: shard by everything else so each worker caches them.
    shards: list[list[dict]] = [[] for _ in range(jobs)]
    groups = itertools.groupby(sorted(configs, key=lambda c: (c["target"], c["K"], c["dtype"], c["mode"])),
                               key=lambda c: (c["target"], c["K"], c["dtype"], c["mode"]))  # fmt: skip
    for i, (_, group) in enumerate(groups):
        shards[i % jobs].extend(group)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for shard in shards if shard]  # fmt: skip
    for proc, shard in zip(procs, [s for s in shards if s], strict=True):
        proc.stdin.write(json.dumps(shard))
        proc.stdin.close()
    rows = []
    for proc in procs:
        out = proc.stdout.read()
        if proc.wait() != 0:
            raise SystemExit(f"kernel_report worker failed (exit {proc.returncode})")
        rows.extend(json.loads(out.strip().splitlines()[-1]))
    order = {k: i for i, k in enumerate(["target", "kernel", "mode", "temperature", "dtype", "id_dtype", "K", "V"])}
    return sorted(rows, key=lambda r: tuple(str(r[k]).zfill(8) for k in sorted(order, key=order.get)))


def violations(rows: list[dict]) -> list[str]:
    """CI rule: no spills and at most 128 registers, every kernel, K <= 256."""
    bad = []
    for r in rows:
        if r["K"] <= 256 and (r["spills_bytes"] > 0 or r["registers"] > TARGETS_T1_BF16["max_registers"]):
            bad.append(f"{r['kernel']} {r['target']} K={r['K']} {r['dtype']} {r['mode']} T={r['temperature']} "
                       f"{r['id_dtype']}: {r['registers']} registers, {r['spills_bytes']} B spilled")  # fmt: skip
    return bad


def target_check(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """The issue's targets on sm_90a: (what, measured, met)."""
    t = TARGETS_T1_BF16
    out = []
    core = [r for r in rows if r["target"] == "sm_90a" and r["dtype"] == "bf16" and r["K"] <= 128]
    for kind, limit in (("forward", t["fwd_instr"]), ("backward", t["bwd_instr"])):
        for mode, temp, slack in (("renorm", 1.0, 1.0), ("tail", 1.0, t["slack"]), ("renorm", 2.0, t["slack"]),
                                  ("tail", 2.0, t["slack"])):  # fmt: skip
            sel = [r for r in core if r["pass"] == kind and r["mode"] == mode and r["temperature"] == temp]
            if not sel:
                continue
            ipe = max(r["instr_per_element"] for r in sel)
            regs = max(r["registers"] for r in sel)
            spills = max(r["spills_bytes"] for r in sel)
            frac = min(r["predicted_floor_fraction_h100"] for r in sel)
            what = f"{kind} {mode} T={temp:g} (bf16, K<=128)"
            out.append((f"{what}: instr/element <= {limit * slack:g}", f"{ipe:g}", ipe <= limit * slack))
            out.append((f"{what}: registers <= 128, no spills", f"{regs} regs, {spills} B", regs <= 128 and not spills))
            if slack == 1.0:
                out.append((f"{what}: predicted H100 floor >= 85%", f"{frac:.0%}", frac >= t["floor_h100"]))
    return out


def summary(rows: list[dict]) -> list[dict]:
    """One line per (kernel, target, mode, T, dtype, K): the worst over V and id dtype."""
    keyf = lambda r: (r["target"], r["kernel"], r["mode"], r["temperature"], r["dtype"], r["K"])  # noqa: E731
    out = []
    for key, group in itertools.groupby(sorted(rows, key=keyf), key=keyf):
        g = list(group)
        out.append(dict(zip(["target", "kernel", "mode", "T", "dtype", "K"], key, strict=True),
                        regs=max(r["registers"] for r in g), spills=max(r["spills_bytes"] for r in g),
                        ipe=max(r["instr_per_element"] for r in g), mufu=max(r["mufu_per_element"] for r in g),
                        h100=min(r["predicted_floor_fraction_h100"] for r in g),
                        h200=min(r["predicted_floor_fraction_h200"] for r in g),
                        ld=min(int(r.get("loop_load_bits", 0)) for r in g),
                        st=min(int(r.get("loop_store_bits", 0)) for r in g),
                        bound=sorted({r["bound_h100"] for r in g})))  # fmt: skip
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _bits(s: dict) -> str:
    """The hot loop's narrowest load (and store, when it stores) in bits: 128 = 16-byte vector accesses."""
    return f"{s['ld']}/{s['st']}" if s["st"] else f"{s['ld']}"


def markdown(rows: list[dict], base: list[dict] | None, base_rev: str | None, meta: dict) -> str:
    lines = ["# Fused KD kernels compiled for GPU targets on the CPU", "",
             f"Generated by `python pipelines/kernel_report.py{' --baseline ' + base_rev if base_rev else ''}` "
             f"({meta['triton']}, grid `{meta['grid']}`, {meta['n_rows']} rows in kernel_report.csv). Static counts "
             "from the cubin; the floor fractions are the model of benchmarks/NOTES.md, not measurements.", "",
             "## Targets (sm_90a)", "", "| target | measured | met |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {w} | {m} | {'yes' if ok else '**no**'} |" for w, m, ok in target_check(rows)]
    lines += ["", "## Per kernel (worst over V and id dtype)", "",
              "| target | kernel | mode | T | dtype | K | regs | spills B | instr/elem | MUFU/elem | load/store bits | "
              "H100 floor | H200 floor | H100 bound |", "|---" * 14 + "|"]  # fmt: skip
    for s in summary(rows):
        lines.append(f"| {s['target']} | {s['kernel']} | {s['mode']} | {s['T']:g} | {s['dtype']} | {s['K']} | "
                     f"{s['regs']} | {s['spills']} | {s['ipe']:g} | {s['mufu']:g} | {_bits(s)} | {s['h100']:.0%} | "
                     f"{s['h200']:.0%} | {'/'.join(s['bound'])} |")  # fmt: skip
    if base:
        lines += ["", f"## Before (`{base_rev}`) and after, sm_90a bf16, worst over V and id dtype", "",
                  "| pass | mode | T | K | regs before → after | spills B | instr/elem | MUFU/elem | load/store bits | "
                  "H100 floor |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        kind = lambda s: "forward" if "fwd" in s["kernel"] else "backward" if "bwd" in s["kernel"] else "other"  # noqa: E731
        before = {(kind(s), s["mode"], s["T"], s["K"]): s for s in summary(base)
                  if s["target"] == "sm_90a" and s["dtype"] == "bf16"}  # fmt: skip
        for s in summary(rows):
            b = before.get((kind(s), s["mode"], s["T"], s["K"]))
            if s["target"] != "sm_90a" or s["dtype"] != "bf16" or b is None:
                continue
            lines.append(f"| {kind(s)} | {s['mode']} | {s['T']:g} | {s['K']} | {b['regs']} → {s['regs']} | "
                         f"{b['spills']} → {s['spills']} | {b['ipe']:g} → {s['ipe']:g} | {b['mufu']:g} → {s['mufu']:g} "
                         f"| {_bits(b)} → {_bits(s)} | {b['h100']:.0%} → {s['h100']:.0%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full", help="configurations to compile")
    ap.add_argument("--targets", default=None, help="comma-separated subset of sm_90a,sm_80 (default: the grid's)")
    ap.add_argument("--baseline", default=None, help="git revision whose kernels to compile as 'before'")
    ap.add_argument("--baseline-grid", choices=sorted(GRIDS), default="compare", help="the grid of the baseline")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV and Markdown go")
    ap.add_argument("--jobs", type=int, default=1, help="compile worker processes")
    ap.add_argument("--check", action="store_true", help="exit 1 on a spill or more than 128 registers")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return
    grid = dict(GRIDS[args.grid])
    if args.targets:
        grid["targets"] = args.targets.split(",")
    configs = expand(grid)
    rows = collect(ROOT / "kernels", configs, args.jobs)
    base = None
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            tar = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "kernels/ddk_kernels"],
                                 capture_output=True, check=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
            base = collect(Path(tmp) / "kernels", expand(GRIDS[args.baseline_grid]), args.jobs)
    import triton

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "kernel_report.csv", rows)
    if base:
        write_csv(args.out_dir / "kernel_report_baseline.csv", base)
    meta = dict(triton=f"triton {triton.__version__}", grid=args.grid, n_rows=len(rows))
    (args.out_dir / "kernel_report.md").write_text(markdown(rows, base, args.baseline, meta))
    print((args.out_dir / "kernel_report.md").read_text())
    bad = violations(rows)
    if args.check and bad:
        print("\n".join(["register / spill violations:", *bad]), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
