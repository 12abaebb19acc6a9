"""Measure what DSKD needs from the teacher besides its top-k: hidden-state encodings and the matrices' dtype.

Sections (a 2-core CPU, SmolLM2-135M GGUF, the default 8192 tokens: ~1 min forward, ~1 min encodings, ~300 MB RAM):
  1. capture   run the teacher over real text (shipped with Python and its packages, as bench_dump.py does) and
               keep ``outputs.hidden_states[-1]`` [L, D] per row (what DSKD's t2s projector reads), and check that
               it is the state the head multiplies (hidden @ head.T == logits)
  2. hidden    every encoding of ddk_offline/format/hidden_codec.py: bytes/token, the error in units of the
               std DSKD divides by (RMS and max), per-position cosine, the teacher's logits recomputed from the
               decoded state (max |d logit|, KL nats, top-1 agreement), encode/decode speed on one core
  3. matrices  the embedding module's output for every id and the output head in bfloat16 / float16 / float32:
               bytes, and the relative error of each row against float32
Results: benchmarks/results/dskd_extras.{md,json}.

    python pipelines/bench_dskd_extras.py                       # SmolLM2-135M GGUF (pipelines/smollm2_path.py)
    python pipelines/bench_dskd_extras.py --teacher "$(python pipelines/gemma3_path.py)" --tokens 4096 --tag gemma3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import default_gguf, load_teacher, real_text_sources  # noqa: E402

from ddk_offline.format import hidden_codec  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# 1. capture
def capture(model, tok, tokens: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows of real text, their last hidden states [S, L, D] and the logits' check against hidden @ head.T."""
    import torch

    sources = real_text_sources()
    per_source = -(-tokens // (seq_len * len(sources)))
    rows = []
    for text in sources.values():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rows += [ids[s * seq_len : (s + 1) * seq_len] for s in range(per_source) if (s + 1) * seq_len <= len(ids)]
    input_ids = np.asarray(rows[: max(1, tokens // seq_len)], np.int64)
    head = model.get_output_embeddings().weight
    hidden, worst = [], 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in input_ids:
            out = model(torch.from_numpy(row)[None], output_hidden_states=True, use_cache=False)
            h = out.hidden_states[-1][0].float()
            worst = max(worst, float((h @ head.float().T - out.logits[0].float()).abs().max()))
            hidden.append(h.numpy())
    return {
        "input_ids": input_ids,
        "hidden": np.stack(hidden),
        "forward_s": time.perf_counter() - t0,
        "head_check_max_abs": worst,
    }


# ----------------------------------------------------------------------------------------------------------
# 2. hidden-state encodings
def _kl_and_top1(h: np.ndarray, d: np.ndarray, head: np.ndarray) -> tuple[float, float, float]:
    """Mean KL(p || p_decoded) in nats, top-1 agreement and max |d logit| of the teacher's logits from h vs d."""
    import torch

    a, b = torch.from_numpy(h) @ torch.from_numpy(head).T, torch.from_numpy(d) @ torch.from_numpy(head).T
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return float(kl.mean()), float((a.argmax(-1) == b.argmax(-1)).float().mean()), float((a - b).abs().max())


def measure_encodings(cap: dict, head: np.ndarray, logit_rows: int) -> list[dict]:
    hidden = cap["hidden"]  # [S, L, D]
    S, L, D = hidden.shape
    sigma = float(hidden.std())  # DSKD: teacher_hiddens / teacher_hiddens.std(), one std over the batch
    flat = hidden.reshape(-1, D)
    sub = flat[np.linspace(0, len(flat) - 1, min(logit_rows, len(flat))).astype(int)]
    results = []
    for enc in hidden_codec.ENCODINGS:
        t0 = time.perf_counter()
        blobs = [hidden_codec.encode(row, enc) for row in hidden]
        t1 = time.perf_counter()
        decoded = np.stack([hidden_codec.decode(b, L, D, enc) for b in blobs])
        t2 = time.perf_counter()
        err = (decoded - hidden).reshape(-1, D)
        cos = (flat * decoded.reshape(-1, D)).sum(1) / (
            np.linalg.norm(flat, axis=1) * np.linalg.norm(decoded.reshape(-1, D), axis=1)
        )
        dsub = decoded.reshape(-1, D)[np.linspace(0, len(flat) - 1, len(sub)).astype(int)]
        kl, top1, dlogit = _kl_and_top1(sub, dsub, head)
        results.append(
            {
                "encoding": enc,
                "bytes_per_token": sum(map(len, blobs)) / (S * L),
                "raw_fp32_bytes_per_token": 4 * D,
                "rms_error_over_std": float(np.sqrt((err**2).mean())) / sigma,
                "max_error_over_std": float(np.abs(err).max()) / sigma,
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "teacher_logits_kl_nats_mean": kl,
                "teacher_logits_top1_agreement": top1,
                "teacher_logits_max_abs_diff": dlogit,
                "encode_mb_s": hidden.nbytes / 1e6 / (t1 - t0),
                "decode_mb_s": hidden.nbytes / 1e6 / (t2 - t1),
            }
        )
    return results


# ----------------------------------------------------------------------------------------------------------
# 3. matrix dtypes
def measure_matrices(model) -> dict:
    import torch

    with torch.inference_mode():
        emb_module = model.get_input_embeddings()
        embed = emb_module(torch.arange(emb_module.num_embeddings)).float()
        head = model.get_output_embeddings().weight.detach().float()
    tied = model.get_output_embeddings().weight.data_ptr() == emb_module.weight.data_ptr()
    out = {"embed_shape": list(embed.shape), "head_shape": list(head.shape), "tied": bool(tied), "dtypes": {}}
    for name in ("bfloat16", "float16", "float32"):
        dt = getattr(torch, name)
        row = {}
        for key, m in (("embed", embed), ("head", head)):
            back = m.to(dt).float()
            rel = (back - m).norm(dim=1) / m.norm(dim=1).clamp_min(1e-30)
            row[key] = {
                "row_rel_error_max": float(rel.max()),
                "row_rel_error_mean": float(rel.mean()),
                "non_finite": int((~torch.isfinite(back)).sum()),
            }
        n = head.numel() + (0 if tied and torch.equal(embed, head) else embed.numel())
        row["bytes"] = n * torch.finfo(dt).bits // 8
        row["file"] = _file_round_trip(model, embed, name)
        out["dtypes"][name] = row
    return out


def _file_round_trip(model, embed, dtype: str) -> dict:
    """The dump's own path: model_matrices -> teacher_matrices.safetensors -> load_teacher_matrices (a temp folder)."""
    import tempfile

    import torch

    from ddk_offline.dump.teachers.hf import model_matrices
    from ddk_offline.format.manifest import Manifest
    from ddk_offline.format.teacher_matrices import load_teacher_matrices, save_teacher_matrices

    with tempfile.TemporaryDirectory() as tmp:
        rec = save_teacher_matrices(tmp, model_matrices(model), dtype)
        manifest = Manifest(teacher={}, tokenizer={"vocab_size": 1}, seq_len=1, k=1, codec={}, corpus={}, settings={})
        manifest.teacher_matrices = rec
        back = load_teacher_matrices(tmp, manifest).embed.float()
    rel = (back - embed).norm(dim=1) / embed.norm(dim=1).clamp_min(1e-30)
    return {
        "bytes": rec["bytes"],
        "embed_stored": rec["embed_scale"] is None,
        "embed_scale": rec["embed_scale"],
        "loaded_embed_row_rel_error_max": float(rel.max()),
        "loaded_embed_equal": bool(torch.equal(back, embed.to(getattr(torch, dtype)).float())),
    }


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="a .gguf file or model folder (default: SmolLM2-135M GGUF)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--logit-rows", type=int, default=1024, help="positions whose full logits are recomputed")
    ap.add_argument("--tag", default="", help="suffix of the result files (dskd_extras_<tag>.*)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    teacher = args.teacher or default_gguf()
    tok, model = load_teacher(teacher)
    cap = capture(model, tok, args.tokens, args.seq_len)
    head = model.get_output_embeddings().weight.detach().float().numpy()
    result = {
        "teacher": Path(teacher).name,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "tokens": int(cap["input_ids"].size),
        "seq_len": args.seq_len,
        "hidden_dim": int(cap["hidden"].shape[-1]),
        "hidden_std": float(cap["hidden"].std()),
        "head_check_max_abs": cap["head_check_max_abs"],
        "forward_s": cap["forward_s"],
        "encodings": measure_encodings(cap, head, args.logit_rows),
        "matrices": measure_matrices(model),
    }
    out = ROOT / "benchmarks" / "results" / f"dskd_extras{'_' + args.tag if args.tag else ''}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    lines = [
        f"# DSKD extras: hidden states and teacher matrices ({r['teacher']})",
        "",
        f"`python pipelines/bench_dskd_extras.py` on {r['machine']}, torch {r['torch']}: {r['tokens']} tokens of "
        f"real text, L = {r['seq_len']}, D = {r['hidden_dim']}. The stored state is `hidden_states[-1]`; "
        f"`hidden @ head.T` reproduces the logits to {r['head_check_max_abs']:.2e} (max abs), so it is the state "
        f"after the final norm. std of the hidden states (what DSKD divides by): {r['hidden_std']:.4f}.",
        "",
        "## Hidden-state encodings (one blob per row)",
        "",
        "| encoding | bytes/token | RMS err / std | max err / std | cos mean | cos min | teacher KL (nats) "
        "| top-1 agree | max d logit | enc MB/s | dec MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in r["encodings"]:
        lines.append(
            f"| {e['encoding']} | {e['bytes_per_token']:.0f} | {e['rms_error_over_std']:.2e} | "
            f"{e['max_error_over_std']:.2e} | {e['cosine_mean']:.7f} | {e['cosine_min']:.7f} | "
            f"{e['teacher_logits_kl_nats_mean']:.2e} | {e['teacher_logits_top1_agreement']:.4f} | "
            f"{e['teacher_logits_max_abs_diff']:.3f} | {e['encode_mb_s']:.0f} | {e['decode_mb_s']:.0f} |"
        )
    m = r["matrices"]
    lines += [
        "",
        f"Raw float32 would be {4 * r['hidden_dim']} bytes/token. Teacher KL / top-1 / d logit: the teacher's own "
        "head applied to the exact and the decoded state, on a sample of positions.",
        "",
        f"## Teacher matrices: embed {m['embed_shape']}, head {m['head_shape']}, tied {m['tied']}",
        "",
        "| dtype | bytes | embed row rel. error (max / mean) | head row rel. error (max / mean) | non-finite "
        "| file bytes | embed in file | embed_scale | loaded embed rel. error (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in m["dtypes"].items():
        lines.append(
            f"| {name} | {d['bytes'] / 1e6:.1f} MB | {d['embed']['row_rel_error_max']:.2e} / "
            f"{d['embed']['row_rel_error_mean']:.2e} | {d['head']['row_rel_error_max']:.2e} / "
            f"{d['head']['row_rel_error_mean']:.2e} | {d['embed']['non_finite'] + d['head']['non_finite']} | "
            f"{d['file']['bytes'] / 1e6:.1f} MB | {d['file']['embed_stored']} | {d['file']['embed_scale']} | "
            f"{d['file']['loaded_embed_row_rel_error_max']:.2e} |"
        )
    lines += [
        "",
        "bytes: the matrices in that dtype; file bytes: `teacher_matrices.safetensors` as the dump writes it (the "
        "embedding output is left out when it equals the head times `embed_scale`, and rebuilt on load); loaded "
        "embed rel. error: the loader's embed against the embedding module's float32 output.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
