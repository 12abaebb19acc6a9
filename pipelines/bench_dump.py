"""Dump overhead benchmark: teacher-forward-only tokens/s vs the full dump's tokens/s, on the same sequences.

    python pipelines/bench_dump.py --teacher MODEL --data CORPUS --work DIR [--seq-len 512 --top-k 64 ...]

Sections (expected on a 2-core CPU with SmolLM2-135M: ~1 min model loads, ~30 s per 12k tokens, < 20 MB disk):
  1. the full dump (`run_dump`, as `ddk-offline dump-teacher` runs it) into DIR/dump; its stats time the forward
     inside the loop and the loop's wall time;
  2. forward only: the same batches of the dump's own input_ids through the same model, nothing else running;
  3. one JSON line appended to DIR/bench_dump.jsonl with both rates, the overhead share and bytes/token.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.format.reader import open_dump
from ddk_offline.teacher import load_model, resolve_device, resolve_dtype, resolve_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens-per-domain", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.125)
    args = p.parse_args()

    # 1. the full dump (fresh)
    out = args.work / "dump"
    shutil.rmtree(out, ignore_errors=True)
    config = DumpConfig(
        teacher=args.teacher, data=args.data, out=str(out), seq_len=args.seq_len, top_k=args.top_k,
        batch_size=args.batch_size, max_tokens_per_domain=args.max_tokens_per_domain, val_fraction=args.val_fraction,
    )  # fmt: skip
    result = run_dump(config)
    s = result.stats
    tokens = sum(s.tokens.values())

    # 2. forward only, same batches (a shard's rows in batches of batch_size), same model settings
    reader = open_dump(out)
    device = resolve_device(config.device)
    model = load_model(resolve_teacher(args.teacher), dtype=resolve_dtype(config.dtype, device), device=device)
    forward_s = 0.0
    with torch.inference_mode():
        for domain in reader.domains:
            for split in ("train", "val"):
                for j, shard in enumerate(reader.shards(domain, split)):
                    ids = reader.read_rows(domain, split, j, list(range(shard.rows)))["input_ids"]
                    for b in range(0, shard.rows, args.batch_size):
                        batch = torch.from_numpy(np.ascontiguousarray(ids[b : b + args.batch_size])).to(device)
                        t = time.perf_counter()
                        model(input_ids=batch, use_cache=False)
                        forward_s += time.perf_counter() - t

    # 3. report
    total_bytes = sum(sp.bytes for d in reader.manifest.domains.values() for sp in d.splits.values())
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {device.type}",
        "teacher": args.teacher,
        "seq_len": args.seq_len,
        "k": args.top_k,
        "batch_size": args.batch_size,
        "tokens": tokens,
        "forward_only_tok_s": tokens / forward_s,
        "forward_in_dump_tok_s": tokens / s.forward_s,
        "dump_loop_tok_s": tokens / s.loop_s,
        "overhead_share_of_loop": s.overhead,
        "loop_vs_forward_only": 1 - forward_s / s.loop_s,
        "prepass_s": s.prepass_s,
        "load_s": s.load_s,
        "total_s": s.total_s,
        "bytes_per_token": total_bytes / tokens,
    }
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "bench_dump.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
