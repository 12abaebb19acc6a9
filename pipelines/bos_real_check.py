"""Real check of the BOS policy (issue #14): dump the demo corpus with Gemma-3-270M (a BOS teacher) and SmolLM2-135M
(none), and compare each dump's teacher loss per byte with the teacher's standard per-document figure.

    python pipelines/bos_real_check.py --work runs/bos-check                  # ~30 min on 2 CPU cores, ~1 GB disk
    git archive a7bd745 | tar -x -C /tmp/ddk-before                           # the code before --bos (optional)
    python pipelines/bos_real_check.py --work runs/bos-check --baseline-src /tmp/ddk-before

Sections (time on 2 shared CPU cores):

1. corpus: ``demo_corpus.py --size quick`` (4 domains, ~29k SmolLM2 tokens of train text; seconds)
2. dumps through the CLI, the demo's settings (L = 256, k = 64, fp32 on CPU): Gemma ``--bos auto`` (BOS at each
   document and row start), Gemma ``--bos never`` (the layout before format 3; its start-up check warns), SmolLM2
   ``--bos auto`` (no BOS); with ``--baseline-src`` also SmolLM2 with the older code, to show its shards are
   byte-identical (~4 + 4 + 2 + 2 min)
3. standard figure: each document alone, ``add_special_tokens=True`` (Gemma: BOS first), the teacher's NLL of every
   token of the document (~4 + 1 min)
4. the comparison, over the same tokens: every dump position whose target is a document's text token (BOS and EOS
   targets are left out: they spell no bytes), and the teacher's standard NLL of that token; bits per byte are
   sum(NLL) / ln 2 / the UTF-8 bytes those tokens spell. Over all tokens the dump scores worse than the standard
   figure whatever the BOS policy: a row cut inside a document loses the text before the cut. The same-context
   columns keep the tokens whose document begins in the same row (the dump saw the whole document, plus the
   domain's earlier documents in that row, which help it a little); the row-opener columns keep only the document
   that opens each row, where the dump saw exactly what the standard figure saw: there a dump that packs the way the
   teacher was trained matches the standard figure, and one that does not, does not
5. row-start study (the BOS dump): rows that begin inside a document, scored three ways on the same tokens (the rest
   of that document in the row): as dumped (BOS inserted at the row start), without the inserted BOS, and with the
   whole document before them (the standard figure) (~1 min)

Writes ``WORK/bos_real_check.json`` and ``WORK/bos_real_check.md`` (the README's table) and prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))

from demo_corpus_nll import load_teacher  # noqa: E402

from ddk_offline.dump.packing import document_tokens, is_val, take_row  # noqa: E402
from ddk_offline.format.reader import open_dump  # noqa: E402
from ddk_offline.format.schema import INPUT_IDS, TEACHER_NLL  # noqa: E402

SEQ_LEN, TOP_K, BATCH, VAL_FRACTION = 256, 64, 4, 0.15  # pipelines/demo.sh, quick size
LN2 = math.log(2)


def cli(*args: str, src: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(src / "kernels")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "ddk_offline", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"ddk-offline {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dump(teacher: str, corpus: Path, out: Path, bos: str | None, src: Path = ROOT) -> str:
    """Run dump-teacher (resumes / skips a finished dump); returns its stderr (the start-up check's warning)."""
    extra = [] if bos is None else ["--bos", bos]  # the code before --bos has no such option
    proc = cli("dump-teacher", "--teacher", teacher, "--data", str(corpus / "train"), "--out", str(out),
               "--text-column", "text", "--domain-column", "domain", "--seq-len", str(SEQ_LEN), "--top-k", str(TOP_K),
               "--batch-size", str(BATCH), "--val-fraction", str(VAL_FRACTION), "--dtype", "float32",
               "--device", "cpu", "-q", *extra, src=src)  # fmt: skip
    return proc.stderr


def documents(corpus: Path, domain: str) -> list[str]:
    """The domain's documents in the order the dump read them (empty ones are skipped there too)."""
    rows = [json.loads(line) for line in (corpus / "train" / f"{domain}.jsonl").read_text("utf-8").splitlines()]
    return [r["text"] for r in rows if r["text"].strip()]


def token_bytes(tok, ids: list[int]) -> np.ndarray:
    """UTF-8 bytes each token adds to the decoded text [len(ids)] (a token ending inside a character may be < 0)."""
    ends = [len(tok.decode(ids[:j], clean_up_tokenization_spaces=False).encode("utf-8")) for j in range(len(ids) + 1)]
    return np.diff(np.asarray(ends, np.int64))


@torch.inference_mode()
def nll_of(model, ids: list[int]) -> np.ndarray:
    """The model's loss at each position on the next token [len(ids) - 1] (float64)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double().numpy()


def standard_nll(model, tok, text: str, content: list[int]) -> np.ndarray:
    """The standard figure: NLL of each of the document's tokens [len(content)], NaN where nothing predicts it."""
    framed = tok(text, add_special_tokens=True)["input_ids"]
    s = next(s for s in range(len(framed) - len(content) + 1) if framed[s : s + len(content)] == content)
    nll = nll_of(model, framed)
    out = np.full(len(content), np.nan)
    out[max(0, 1 - s) :] = nll[max(0, s - 1) : s - 1 + len(content)]
    return out


def packed_rows(content: list[list[int]], eos: int, bos: int | None):
    """Every full row the dump cuts from the domain's documents, with each position's origin ((doc, token) or None)."""
    stream, origin = [], []
    for i, ids in enumerate(content):
        stream += document_tokens(ids, eos, bos)
        origin += ([None] if bos is not None else []) + [(i, j) for j in range(len(ids))] + [None]
    rows, pos = [], 0
    while (cut := take_row(stream[pos:], SEQ_LEN, bos)) is not None:
        row, used = cut
        rows.append((row, ([None] if len(row) > used else []) + origin[pos : pos + used]))
        pos += used
    return rows


def dumped_rows(reader, domain: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The domain's dumped sequences in packing order (the split rule interleaves train and val): (ids, nll)."""
    splits = {s: iter(list(reader.sequences(domain, s))) for s in ("train", "val")}
    n = sum(reader.num_sequences(domain, s) for s in ("train", "val"))
    fraction = Fraction(repr(float(reader.manifest.settings["val_fraction"])))
    rows = [next(splits["val" if is_val(i, fraction) else "train"]) for i in range(n)]
    return [(r[INPUT_IDS], r[TEACHER_NLL]) for r in rows]


def aligned_rows(reader, domain: str, content: list[list[int]]) -> tuple[list, list]:
    """The domain's rows as packed here (with each position's origin) and as dumped (ids, nll), checked equal."""
    m = reader.manifest
    rows = packed_rows(content, int(m.tokenizer["eos_token_id"]), m.bos_token_id)
    got = dumped_rows(reader, domain)
    assert len(rows) == len(got) and all(np.array_equal(a[0], b[0]) for a, b in zip(rows, got, strict=True)), (
        f"{domain}: the dump's rows are not the packing of the corpus"
    )
    return rows, got


def compare(dump_dir: Path, corpus: Path, tok, standard: dict) -> dict:
    """Per domain: the dump's and the standard bits per byte over the same text tokens."""
    reader = open_dump(dump_dir)
    out = {}
    for domain in reader.domains:
        content, std, nbytes = standard[domain]
        rows, got = aligned_rows(reader, domain, content)
        # acc[0]: every text token; acc[1]: tokens whose document begins in the same row, so that the dump saw
        # the same context as the standard figure (a row cut mid-document loses the text before the cut).
        # acc[2]: tokens of a document that opens the row: nothing but the framing (the BOS) comes before it, as in
        # the standard figure; acc[1] also holds later documents, which see earlier documents of the domain too.
        acc = np.zeros((3, 4))  # dump nll, standard nll, tokens, bytes
        for (_, origin), (_, nll) in zip(rows, got, strict=True):
            started = {o[0] for o in origin if o is not None and o[1] == 0}
            head = next(o for o in origin if o is not None)
            opener = head[0] if head[1] == 0 else None
            for n in range(SEQ_LEN - 1):
                o = origin[n + 1]
                if o is None or not math.isfinite(nll[n]) or not math.isfinite(std[o[0]][o[1]]):
                    continue
                add = (float(nll[n]), float(std[o[0]][o[1]]), 1, int(nbytes[o[0]][o[1]]))
                acc[0] += add
                if o[0] in started:
                    acc[1] += add
                if o[0] == opener:
                    acc[2] += add
        out[domain] = {
            "tokens": int(acc[0, 2]),
            "bytes": int(acc[0, 3]),
            "dump": acc[0, 0] / acc[0, 3] / LN2,
            "standard": acc[0, 1] / acc[0, 3] / LN2,
            "same_context_tokens": int(acc[1, 2]),
            "same_context_dump": acc[1, 0] / acc[1, 3] / LN2,
            "same_context_standard": acc[1, 1] / acc[1, 3] / LN2,
            "row_opener_tokens": int(acc[2, 2]),
            "row_opener_dump": acc[2, 0] / acc[2, 3] / LN2,
            "row_opener_standard": acc[2, 1] / acc[2, 3] / LN2,
        }
    return out


def row_start_study(dump_dir: Path, model, standard: dict, rows_per_domain: int) -> dict:
    """Rows beginning inside a document: dumped (inserted BOS), without it, and with the whole document before."""
    reader = open_dump(dump_dir)
    sums = {}
    for domain in reader.domains:
        content, std, nbytes = standard[domain]
        rows, got = aligned_rows(reader, domain, content)
        picked = [(r, g) for r, g in zip(rows, got, strict=True) if r[1][0] is None and r[1][1] and r[1][1][1] > 0]
        acc = np.zeros(4)  # with BOS, without, whole document, bytes
        for (row, origin), (_, nll) in picked[:rows_per_domain]:
            doc = origin[1][0]
            without = nll_of(model, row[1:])  # position n of the row is position n - 1 there
            for n in range(1, SEQ_LEN - 1):
                o = origin[n + 1]
                if o is None or o[0] != doc:
                    break
                acc += (nll[n], without[n - 1], std[doc][o[1]], nbytes[doc][o[1]])
        sums[domain] = {
            "rows": min(len(picked), rows_per_domain),
            "bytes": int(acc[3]),
            "row_start_bos": acc[0] / acc[3] / LN2,
            "no_row_start_bos": acc[1] / acc[3] / LN2,
            "whole_document": acc[2] / acc[3] / LN2,
        }
    return sums


def shard_hashes(dump_dir: Path) -> dict[str, str]:
    return {
        str(f.relative_to(dump_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in dump_dir.rglob("*.parquet")
    }


def score_standard(teacher: str, corpus: Path, domains: list[str]) -> tuple[object, object, dict]:
    """Load the teacher (fp32, as the dump ran it) and compute every document's standard NLL and token bytes."""
    model, tok = load_teacher(teacher)
    standard = {}
    for domain in domains:
        texts = documents(corpus, domain)
        content = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        std = [standard_nll(model, tok, t, c) for t, c in zip(texts, content, strict=True)]
        standard[domain] = (content, std, [token_bytes(tok, c) for c in content])
    return model, tok, standard


def markdown(results: dict) -> str:
    lines = [
        "| teacher | `--bos` | domain | tokens | dump bits/byte | standard bits/byte | dump vs standard "
        "| doc starts in row: tokens | dump vs standard | doc opens the row: tokens | dump bits/byte "
        "| standard bits/byte | dump vs standard | start-up check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["dumps"].values():
        check = r["check"]["relative_difference"] if r["check"] else None
        for i, (domain, d) in enumerate(r["domains"].items()):
            rel = d["dump"] / d["standard"] - 1
            first = i == 0
            lines.append(
                f"| {r['teacher'] if first else ''} | {r['bos'] if first else ''} | {domain} | {d['tokens']:,} | "
                f"{d['dump']:.3f} | {d['standard']:.3f} | {rel:+.1%} | {d['same_context_tokens']:,} | "
                f"{d['same_context_dump'] / d['same_context_standard'] - 1:+.1%} | {d['row_opener_tokens']:,} | "
                f"{d['row_opener_dump']:.3f} | {d['row_opener_standard']:.3f} | "
                f"{d['row_opener_dump'] / d['row_opener_standard'] - 1:+.1%} | "
                f"{'' if not first or check is None else f'{check:+.1%}'} |"
            )
    study = results.get("row_start")
    if study:
        lines += [
            "",
            "Rows that begin inside a document (Gemma-3-270M), bits per byte on the rest of that document in the row:",
            "",
            "| domain | rows | bytes | BOS inserted at the row start (the dump) | no BOS at the row start | "
            "whole document before (standard) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for domain, s in study.items():
            lines.append(
                f"| {domain} | {s['rows']} | {s['bytes']:,} | {s['row_start_bos']:.3f} | "
                f"{s['no_row_start_bos']:.3f} | {s['whole_document']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def run_name(teacher: str, bos: str) -> str:
    """The dump folder of a (teacher, --bos) run, e.g. ``gemma-auto``."""
    return f"{teacher.split('-')[0].lower()}-{bos}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Work folder (corpus, dumps, results); reruns resume.")
    ap.add_argument(
        "--baseline-src", type=Path, help="Source tree of older ddk-offline: prove SmolLM2's dump is unchanged."
    )
    ap.add_argument("--row-start-rows", type=int, default=8, help="Rows per domain in the row-start study.")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads of the scoring (the dumps use the default)."
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gemma3_path import gemma3_gguf
    from smollm2_path import smollm2_gguf

    work, corpus = args.work, args.work / "corpus"
    if not (corpus / "manifest.json").is_file():  # 1. corpus
        subprocess.run([sys.executable, str(ROOT / "pipelines" / "demo_corpus.py"), str(corpus), "--size", "quick"],
                       check=True)  # fmt: skip
    teachers = {"Gemma-3-270M": gemma3_gguf(), "SmolLM2-135M-Instruct": smollm2_gguf()}
    runs = [("Gemma-3-270M", "auto"), ("Gemma-3-270M", "never"), ("SmolLM2-135M-Instruct", "auto")]
    results: dict = {"settings": {"seq_len": SEQ_LEN, "top_k": TOP_K, "corpus": str(corpus)}, "dumps": {}}
    logs = {}
    for teacher, bos in runs:  # 2. dumps
        name = run_name(teacher, bos)
        print(f"dumping {teacher} --bos {bos} -> {work / name}", flush=True)
        logs[name] = dump(teachers[teacher], corpus, work / name, bos)
        if "WARNING" in logs[name]:
            print(logs[name].strip(), flush=True)
    if args.baseline_src:
        print(f"dumping SmolLM2-135M-Instruct with the code in {args.baseline_src}", flush=True)
        dump(teachers["SmolLM2-135M-Instruct"], corpus, work / "smollm2-baseline", None, src=args.baseline_src)
        new, old = shard_hashes(work / "smollm2-auto"), shard_hashes(work / "smollm2-baseline")
        results["smollm2_baseline"] = {"shards": len(new), "identical": new == old}
        print(f"SmolLM2 shards vs the older code: {len(new)} shards, identical: {new == old}", flush=True)
    for teacher in teachers:  # 3-5, one teacher loaded at a time
        domains = open_dump(work / run_name(teacher, "auto")).domains
        print(f"scoring {teacher}'s standard per-document figure", flush=True)
        model, tok, standard = score_standard(teachers[teacher], corpus, domains)
        for bos in [b for t, b in runs if t == teacher]:
            name = run_name(teacher, bos)
            results["dumps"][name] = {
                "teacher": teacher,
                "bos": bos,
                "check": open_dump(work / name).manifest.packing_check,
                "warned": "WARNING" in logs[name],
                "domains": compare(work / name, corpus, tok, standard),
            }
        if open_dump(work / run_name(teacher, "auto")).manifest.bos_token_id is not None:
            print(f"row-start study ({teacher})", flush=True)
            results["row_start"] = row_start_study(
                work / run_name(teacher, "auto"), model, standard, args.row_start_rows
            )
        del model
    (work / "bos_real_check.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (work / "bos_real_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
