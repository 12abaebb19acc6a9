"""Distill data-path benchmark: training step time with batches read from the shards vs the same batches from memory.

    python pipelines/bench_distill.py [--dump DIR] [--steps 20] [--batch-size 8] [--out benchmarks/results]

Both runs go through the trainer's own step (`Trainer.train_step`: sampler draws, loss via fused_kd_loss, AdamW) with
the same seed, so they compute exactly the same thing; only where the batch comes from differs:

- ``shards``: the real path, BatchLoader planning on the main thread and decoding Parquet/zstd/top-k on its
  background thread while the previous step trains (prefetch);
- ``memory``: the batches recorded from a first pass, handed out from a list (no I/O, no decoding).

Target: shards / memory <= 1.05. Without --dump a synthetic dump in the real format is written to a temp folder
(V = 49152 like SmolLM2, k = 64, L = 256; ~1 min to write, ~60 MB) and the student is a tiny Llama of that vocab.
Sections and expected time on a 2-core CPU: write the dump (~1 min), record pass (~1 min), the two timed passes
(interleaved ABAB, ~2 min each), results written as JSON + Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.setup import RunParts, build_loader
from ddk_offline.distillation.trainer import Trainer
from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import DomainInfo, Manifest
from ddk_offline.format.writer import SequenceRecord, ShardWriter


def synthetic_dump(root: Path, *, vocab: int, seq_len: int, k: int, rows: int, seed: int = 0) -> Path:
    """A complete dump of random but well-formed teacher targets (3 domains x ``rows`` train sequences)."""
    rng = np.random.default_rng(seed)
    codec = TopKCodec(vocab_size=vocab, k=k)
    domains = ["code", "math", "web"]
    manifest = Manifest(
        teacher={"name": "synthetic"}, tokenizer={"vocab_size": vocab, "tokens": vocab}, seq_len=seq_len, k=k,
        codec=codec.describe(), corpus={}, settings={}, domains={d: DomainInfo(d, d) for d in domains},
    )  # fmt: skip

    def on_shard(domain, split, index, info):
        manifest.domains[domain].splits[split].shards.append(info)

    with ShardWriter(root, codec=codec, rows_per_shard=64, on_shard=on_shard, domain_dirs={d: d for d in domains}) as w:
        for d in domains:
            for i in range(rows):
                ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(seq_len)])
                logits = -np.sort(-rng.standard_normal((seq_len, k)) * 3, axis=1).astype(np.float32)
                lse = (np.log(np.exp(logits).sum(1)) + 0.3).astype(np.float32)
                nll = np.append(rng.random(seq_len - 1) * 4, np.nan).astype(np.float32)
                w.put(SequenceRecord(d, "train", i, rng.integers(0, vocab, seq_len), ids, logits, lse, nll))
    manifest.complete = True
    manifest.write_atomic(root)
    return root


class _RecordingLoader:
    """The real loader, keeping every batch it hands out."""

    def __init__(self, inner, store: list):
        self.inner, self.store = inner, store

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def next(self):
        self.store.append(self.inner.next())
        return self.store[-1]


class _MemoryLoader:
    """Stands in for BatchLoader: hands out pre-recorded batches in order (plans are ignored)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def plan(self, draws):
        return np.asarray(draws)

    def submit(self, plan):
        self.i += 0

    def pending_plans(self):
        return []

    def next(self):
        b = self.batches[self.i]
        self.i += 1
        return b

    def close(self):
        pass


def timed_steps(run: Trainer, steps: int, warmup: int) -> list[float]:
    times = []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        run.train_step()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    run.loader.close()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", help="An existing dump (default: a synthetic one in a temp folder).")
    p.add_argument("--student-config", help="Student config JSON (default: a tiny Llama of the dump's vocab).")
    p.add_argument("--derive-from-teacher", help="Derive spec instead, e.g. 'layers=4' (teacher from the manifest).")
    p.add_argument("--teacher", help="Teacher path for --derive-from-teacher (default: the dump's manifest).")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="Interleaved shards/memory rounds.")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="distill_cpu")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    total_steps = args.warmup + args.steps
    rows_needed = total_steps * args.batch_size  # every domain could be drawn for every sample: no epoch wrap
    t0 = time.perf_counter()
    dump = args.dump or str(synthetic_dump(tmp / "dump", vocab=args.vocab, seq_len=args.seq_len, k=args.k,
                                           rows=rows_needed))  # fmt: skip
    write_s = time.perf_counter() - t0
    from ddk_offline.format.reader import open_dump

    reader = open_dump(dump)
    student_config = args.student_config
    if student_config is None and args.derive_from_teacher is None:
        from transformers import LlamaConfig

        cfg = LlamaConfig(vocab_size=reader.manifest.vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=reader.seq_len,
                          tie_word_embeddings=False)  # fmt: skip
        student_config = str(tmp / "student.json")
        Path(student_config).write_text(cfg.to_json_string())

    def config(name: str) -> DistillConfig:
        return DistillConfig(dump=dump, out=str(tmp / name), student_config=student_config, teacher=args.teacher,
                             derive_from_teacher=args.derive_from_teacher, max_steps=total_steps,
                             batch_size=args.batch_size, device="cpu", save_every=0, log_every=10**9,
                             sampler="ddk", ddk_interval=5)  # fmt: skip

    # Record pass: the exact batches the timed runs will see.
    recorded = []
    rec = Trainer(config("record"), parts=RunParts(loader=lambda *a: _RecordingLoader(build_loader(*a), recorded)))
    for _ in range(total_steps):
        rec.train_step()
    rec.loader.close()

    results: dict[str, list[float]] = {"shards": [], "memory": []}
    for r in range(args.rounds):
        for mode in ("shards", "memory"):
            parts = RunParts(loader=lambda *a: _MemoryLoader(recorded)) if mode == "memory" else None
            run = Trainer(config(f"{mode}{r}"), parts=parts)
            results[mode] += timed_steps(run, args.steps, args.warmup)

    tokens = args.batch_size * reader.seq_len
    med = {m: statistics.median(t) for m, t in results.items()}
    out = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dump": "synthetic" if args.dump is None else args.dump,
        "vocab": reader.manifest.vocab_size,
        "seq_len": reader.seq_len,
        "k": reader.k,
        "batch_size": args.batch_size,
        "student": args.derive_from_teacher or args.student_config or "tiny llama (hidden 64, 2 layers)",
        "steps_timed": len(results["shards"]),
        "step_s_median": med,
        "step_s_mean": {m: statistics.fmean(t) for m, t in results.items()},
        "tokens_per_s": {m: tokens / s for m, s in med.items()},
        "ratio_shards_over_memory": med["shards"] / med["memory"],
        "target_ratio": 1.05,
        "synthetic_dump_write_s": write_s if args.dump is None else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        f"# Distill data path ({out['cpu']}, {out['threads']} threads, torch {out['torch']})",
        "",
        f"V = {out['vocab']}, L = {out['seq_len']}, k = {out['k']}, batch {args.batch_size}, student: {out['student']}",
        "",
        "| batches from | median step (s) | tokens/s |",
        "|---|---|---|",
        *[f"| {m} | {med[m]:.4f} | {out['tokens_per_s'][m]:,.0f} |" for m in ("shards", "memory")],
        "",
        f"shards / memory = **{out['ratio_shards_over_memory']:.3f}** (target <= 1.05), "
        f"{out['steps_timed']} timed steps each, interleaved rounds.",
        "",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
