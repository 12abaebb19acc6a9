"""Step time of cross-tokenizer training against a same-tokenizer run of the same student (issue #16).

    python pipelines/crosstok_step_time.py --gemma-dump G --smollm2-dump S [--steps 5 --batch-size 2]

The student is SmolLM2-135M-Instruct in every arm: ``same-tokenizer`` trains it on a SmolLM2 dump (CE + KL), the
others on a Gemma-3-270M dump of the same corpus with ``--cross-tokenizer`` (their student rows already cached, so
the one-off alignment is not timed). Each arm runs ``distill`` through the CLI with a metrics row per step; the step
time is the median over the steps after the first. Cross-tokenizer rows hold more student tokens than a teacher row
(the student re-tokenises the same bytes), so the table also gives the seconds per 1,000 student tokens, which
separates "longer rows" from "slower per token". Run it on a quiet machine: the arms run one after another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))

from crosstok_real_check import run_measured  # noqa: E402

ARMS = {
    "same-tokenizer": [],
    "cross ce-only": ["--cross-tokenizer", "exact-map", "--kd-weight", "0"],
    "cross exact-map": ["--cross-tokenizer", "exact-map"],
    "cross uld": ["--cross-tokenizer", "uld"],
}


def student_tokens_per_row(dump: Path, student: str) -> float:
    """Mean student row length over the dump's train rows (1 row = 1 teacher row of L tokens)."""
    from ddk_offline.distillation.crosstok.session import CrossTokenizer, load_tokenizer
    from ddk_offline.format.reader import open_dump

    reader = open_dump(dump)
    cross = CrossTokenizer(reader, load_tokenizer(student))
    lengths = [
        len(cross.rows.row(d, "train", s, r).student_ids)
        for d in reader.domains
        for s, info in enumerate(reader.shards(d, "train"))
        for r in range(info.rows)
    ]
    return sum(lengths) / len(lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gemma-dump", type=Path, required=True)
    ap.add_argument("--smollm2-dump", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    from smollm2_path import smollm2_gguf

    from ddk_offline.format.reader import open_dump

    student = smollm2_gguf()
    seq_len = open_dump(args.gemma_dump).seq_len
    per_row = {"same-tokenizer": float(open_dump(args.smollm2_dump).seq_len)}
    per_row["cross"] = student_tokens_per_row(args.gemma_dump, student)
    out: dict = {"settings": vars(args) | {"student": student}, "arms": {}}
    for name, extra in ARMS.items():
        run = args.work / name.replace(" ", "-")
        dump = args.smollm2_dump if name == "same-tokenizer" else args.gemma_dump
        if not (run / "summary.json").is_file():
            print(f"timing {name}", flush=True)
            run_measured("distill", "--dump", str(dump), "--out", str(run), "--student", student, "--max-steps",
                         str(args.steps), "--batch-size", str(args.batch_size), "--log-every", "1", "--sampler",
                         "uniform", "--device", "cpu", "--data-workers", "0", "--save-every", "0", "--report-to",
                         "none", "-q", *extra)  # fmt: skip
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        teacher_tokens = args.batch_size * seq_len
        steps = [teacher_tokens / r["tokens_per_s"] for r in rows[1:]]
        tokens = args.batch_size * per_row["same-tokenizer" if name == "same-tokenizer" else "cross"]
        step = statistics.median(steps)
        out["arms"][name] = {"step_seconds": step, "student_tokens_per_step": tokens, "s_per_1k": 1000 * step / tokens}
    base = out["arms"]["same-tokenizer"]
    lines = [
        "# Cross-tokenizer step time (`pipelines/crosstok_step_time.py`)",
        "",
        f"SmolLM2-135M-Instruct student, batch {args.batch_size} rows, median over steps 2-{args.steps}, CPU (fp32).",
        "",
        "| arm | s / step | student tokens / step | s / 1k student tokens | vs same-tokenizer per token |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, a in out["arms"].items():
        ratio = a["s_per_1k"] / base["s_per_1k"]
        lines.append(
            f"| {name} | {a['step_seconds']:.2f} | {a['student_tokens_per_step']:.0f} | {a['s_per_1k']:.2f} | "
            f"{ratio:.2f}x |"
        )
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "crosstok_step_time.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    (args.report / "crosstok_step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
