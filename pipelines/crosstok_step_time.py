"""Step time of cross-tokenizer training against a same-tokenizer run of the same student (issue #16).

    python pipelines/crosstok_step_time.py --gemma-dump G --smollm2-dump S [--steps 5 --batch-size 2]
    python pipelines/crosstok_step_time.py --loss-only        # each method's KD term alone, synthetic, ~2 min


The student is SmolLM2-135M-Instruct in every arm: ``same-tokenizer`` trains it on a SmolLM2 dump (CE + KL), the
others on a Gemma-3-270M dump of the same corpus with ``--cross-tokenizer`` (their student rows already cached, so
the one-off alignment is not timed). Each arm runs ``distill`` through the CLI with a metrics row per step; the step
time is the median over the steps after the first. Cross-tokenizer rows hold more student tokens than a teacher row
(the student re-tokenises the same bytes), so the table also gives the seconds per 1,000 student tokens, which
separates "longer rows" from "slower per token". Run it on a quiet machine: the arms run one after another. The
``cross dskd`` arm runs when the Gemma dump holds the teacher matrices (``ddk-offline dumps add-teacher-matrices``).

``--loss-only`` needs no dump: it times the KD term of each method (forward and backward, no model) on random
tensors of the real pair's shapes (2 rows, L = 256 Gemma tokens, 295 SmolLM2 tokens a row, k = 64, V_t = 262,144,
D_t = 640, V_s = 49,152, D_s = 576), which is what a method adds to the student's own step.
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
    "cross dskd": ["--cross-tokenizer", "dskd"],
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


def loss_only(repeats: int = 3) -> dict[str, float]:
    """Median seconds of each method's KD term, forward + backward, on random tensors of the real pair's shapes."""
    import time

    import torch

    from ddk_offline.distillation.crosstok.batch import StudentBatch
    from ddk_offline.distillation.crosstok.dskd import DSKD
    from ddk_offline.distillation.crosstok.methods import METHODS
    from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes
    from ddk_offline.distillation.data import Batch
    from ddk_offline.distillation.loss import LossSpec

    B, L, Ls, K, Vt, Dt, Vs, Ds = 2, 256, 295, 64, 262_144, 640, 49_152, 576
    torch.manual_seed(0)
    vocab = lambda n: VocabBytes(tuple(b"%d" % i for i in range(n)), "byte-level", frozenset(), frozenset(), 1, None,  # noqa: E731
                                 str(n), frozenset())  # fmt: skip
    pairs = torch.randperm(B * Ls)[: int(0.895 * B * L)].sort().values  # 89.5% of the teacher positions paired
    sb = StudentBatch(
        input_ids=torch.randint(2, Vs, (B, Ls)), labels=torch.randint(2, Vs, (B, Ls)), pair_student=pairs,
        pair_teacher=torch.randperm(B * L)[: len(pairs)], scored_student=torch.ones(B, Ls, dtype=torch.bool),
        scored_teacher=torch.ones(B, L, dtype=torch.bool), nbytes=torch.full((B,), 1000),
        teacher_hidden=torch.randn(B, L, Dt),
    )  # fmt: skip
    top = (torch.randn(B, L, K) * 3).sort(-1, descending=True).values
    batch = Batch(
        input_ids=torch.randint(2, Vt, (B, L)), labels=torch.randint(2, Vt, (B, L)),
        topk_ids=torch.stack([torch.randperm(Vt)[:K] for _ in range(B * L)]).reshape(B, L, K), topk_logits=top,
        teacher_lse=torch.logsumexp(top, -1) + 2.0, teacher_nll=torch.zeros(B, L),
        domain=torch.zeros(B, dtype=torch.long), student=sb,
    )  # fmt: skip
    student = torch.nn.Module()
    student.emb = torch.nn.Embedding(Vs, Ds)
    student.get_input_embeddings = lambda: student.emb
    student.get_output_embeddings = lambda: student.emb  # tied, like SmolLM2
    spec = LossSpec(alpha=0.5, gamma=0.5, temperature=1.0, mode="tail")
    out = {}
    for name in ["exact-map", "uld", "dskd", "dskd (s2t only)"]:
        method = METHODS[name.split(" ")[0]](vocab(Vt), vocab(Vs))
        if isinstance(method, DSKD):
            method.embed, method.head, method.bias, method.softcap = (
                torch.randn(Vt, Dt),
                torch.randn(Vt, Dt),
                None,
                None,
            )
            method.with_t2s = name == "dskd"
            method.attach(student, torch.optim.AdamW(student.parameters()), torch.device("cpu"))
        times = []
        for _ in range(repeats):
            flat = torch.randn(B * Ls, Vs, requires_grad=True)
            hidden = torch.randn(B, Ls, Ds, requires_grad=True)
            extra = {"hidden": hidden, "model": student} if isinstance(method, DSKD) else {}
            start = time.perf_counter()
            kd, _ = method.kd(flat, batch, spec, **extra)
            kd.backward()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
        print(f"{name}: {out[name]:.2f} s (KD term, forward + backward)", flush=True)
    return out


def torch_version() -> str:
    import torch

    return torch.__version__


def loss_markdown(res: dict[str, float], machine: str) -> str:
    lines = [
        "# Cross-tokenizer KD term alone (`pipelines/crosstok_step_time.py --loss-only`)",
        "",
        "Forward + backward of each method's KD term on random tensors of the Gemma-3-270M -> SmolLM2-135M shapes "
        "(2 rows, L = 256, 295 student tokens a row, k = 64, V_t = 262,144, D_t = 640, V_s = 49,152, D_s = 576, "
        f"`tail` mode, fp32), median of 3; no student forward or backward. {machine}",
        "",
        "| method | s (KD term) | vs exact-map |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.2f} | {v / res['exact-map']:.1f}x |" for k, v in res.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gemma-dump", type=Path)
    ap.add_argument("--smollm2-dump", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--loss-only", action="store_true", help="Time each method's KD term on random tensors.")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    if args.loss_only:
        res = loss_only()
        (args.report / "crosstok_loss_time.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.report / "crosstok_loss_time.md").write_text(loss_markdown(res, "CPU, torch " + torch_version()))
        return
    if not (args.gemma_dump and args.smollm2_dump and args.work):
        ap.error("--gemma-dump, --smollm2-dump and --work are required (or --loss-only)")
    from smollm2_path import smollm2_gguf

    from ddk_offline.format.reader import open_dump

    student = smollm2_gguf()
    seq_len = open_dump(args.gemma_dump).seq_len
    per_row = {"same-tokenizer": float(open_dump(args.smollm2_dump).seq_len)}
    per_row["cross"] = student_tokens_per_row(args.gemma_dump, student)
    out: dict = {"settings": vars(args) | {"student": student}, "arms": {}}
    for name, extra in ARMS.items():
        if name == "cross dskd" and open_dump(args.gemma_dump).manifest.teacher_matrices is None:
            print("skipping cross dskd: the Gemma dump holds no teacher matrices (dumps add-teacher-matrices)")
            continue
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
