"""Real check of cross-tokenizer distillation (issue #16): Gemma-3-270M (vocabulary 262,144, BOS) teaches
SmolLM2-135M-Instruct (vocabulary 49,152, byte-level BPE) from one dump, nothing downloaded.

    python pipelines/crosstok_real_check.py --work runs/crosstok-check            # ~1 h on 2 CPU cores
    python pipelines/crosstok_real_check.py --work W --dump runs/bos-check/gemma-auto   # reuse a Gemma dump

Sections:

1. corpus: ``demo_corpus.py --size quick`` (4 domains), unless ``--dump`` is given;
2. dumps through the CLI at the demo's settings (L = 256, k = 64, fp32): Gemma ``--bos auto`` (the teacher), and
   SmolLM2 (a same-tokenizer dump of the same corpus, only for the step-time comparison);
3. arms, each ``distill`` through the CLI from the same pretrained student, the same steps, batch, learning rate and
   uniform domain mix (equal budget): ``ce-only`` (``--kd-weight 0``), ``exact-map``, ``uld``, ``dskd`` (the
   reference's weights and T = 2; without hidden states in a reused ``--dump``, its s2t half only); ``same-tokenizer``
   (SmolLM2 on its own dump, CE + KL) for the step time. Wall time, teacher tokens per second and peak RSS of each;
4. evaluation on the val rows: per row, the student's CE over the scored bytes (the span both tokenisations cover,
   docs/CROSSTOK.md) and the teacher's NLL over the same bytes; bits per byte per domain for the teacher, the
   student before training and each arm; each arm minus ``ce-only`` per byte, with a bootstrap standard error over
   rows.

Writes ``REPORT/crosstok_real_check.{json,md}`` (default ``docs/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))

from ddk_offline.distillation.crosstok.session import CrossTokenizer, load_tokenizer  # noqa: E402
from ddk_offline.distillation.data import collate  # noqa: E402
from ddk_offline.format.reader import open_dump  # noqa: E402
from ddk_offline.format.schema import TEACHER_LSE  # noqa: E402

SEQ_LEN, TOP_K, DUMP_BATCH, VAL_FRACTION = 256, 64, 4, 0.15  # the demo's quick settings
ARMS = {
    "ce-only": ["--cross-tokenizer", "exact-map", "--kd-weight", "0"],
    "exact-map": ["--cross-tokenizer", "exact-map"],
    "uld": ["--cross-tokenizer", "uld"],
    # The reference's setting (kd_rate 0.5, T = 2; renorm: the dump holds the lse at T = 1 only).
    "dskd": ["--cross-tokenizer", "dskd", "--ce-weight", "0.5", "--kd-weight", "0.5", "--temperature", "2",
             "--kd-mode", "renorm"],
}  # fmt: skip
BOOTSTRAP = 2000
LN2 = math.log(2)


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_measured(*args: str) -> tuple[float, float]:
    """``ddk-offline ARGS`` in a subprocess: (wall seconds, peak RSS in MiB, sampled every 0.2 s)."""
    t0, peak = time.perf_counter(), 0
    proc = subprocess.Popen([sys.executable, "-m", "ddk_offline", *args], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            rss = [line for line in status.read_text().splitlines() if line.startswith("VmHWM")]
            peak = max(peak, int(rss[0].split()[1])) if rss else peak
        except OSError:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"ddk-offline {' '.join(args)} failed ({proc.returncode}):\n{out}")
    return time.perf_counter() - t0, peak / 1024


def dump(teacher: str, corpus: Path, out: Path) -> None:
    """A dump of the corpus at the demo's settings, with the teacher matrices and hidden states (the dskd arm)."""
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return
    run_measured("dump-teacher", "--teacher", teacher, "--data", str(corpus / "train"), "--out", str(out),
                 "--text-column", "text", "--domain-column", "domain", "--seq-len", str(SEQ_LEN), "--top-k",
                 str(TOP_K), "--batch-size", str(DUMP_BATCH), "--val-fraction", str(VAL_FRACTION), "--dtype",
                 "float32", "--device", "cpu", "--bos", "auto", "--store-teacher-matrices", "--store-hidden-states",
                 "-q")  # fmt: skip


@torch.no_grad()
def per_row(model, cross: CrossTokenizer, batch_size: int = 4, split: str = "val") -> dict[str, dict[str, np.ndarray]]:
    """Per row of ``split``: the model's CE over the scored bytes, the teacher's NLL over them, and those bytes."""
    reader, out = cross.reader, {}
    for d, domain in enumerate(reader.domains):
        plan = [(d, s, r) for s, info in enumerate(reader.shards(domain, split)) for r in range(info.rows)]
        ce, nll, nbytes = [], [], []
        for i in range(0, len(plan), batch_size):
            part = np.asarray(plan[i : i + batch_size], np.int64)
            rows = {}
            for _, s, r in part:
                one = reader.read_rows(domain, split, int(s), [int(r)], decode_topk=False)
                for k, v in one.items():
                    rows.setdefault(k, []).append(v[0])
            batch = collate({k: np.stack(v) for k, v in rows.items()}, part[:, 0], lse_key=TEACHER_LSE,
                            with_topk=False, bos_id=reader.manifest.bos_token_id)  # fmt: skip
            sb = cross.batch(part, split)
            logits = model(input_ids=sb.input_ids).logits.float()
            row_ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), sb.labels.reshape(-1), ignore_index=-100, reduction="none"
            ).reshape(sb.labels.shape)
            ce += (row_ce.double() * sb.scored_student).sum(1).tolist()
            nll += (batch.teacher_nll.double() * sb.scored_teacher).sum(1).tolist()
            nbytes += sb.nbytes.tolist()
        out[domain] = {"ce": np.array(ce), "nll": np.array(nll), "bytes": np.array(nbytes, np.float64)}
    return out


def paired_bpb(a: dict, b: dict, rng) -> tuple[float, float]:
    """Bits per byte of a minus b over the same rows, and its bootstrap standard error over rows."""
    diff, nbytes = a["ce"] - b["ce"], a["bytes"]
    draws = rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))
    boot = diff[draws].sum(1) / np.maximum(nbytes[draws].sum(1), 1)
    return float(diff.sum() / nbytes.sum() / LN2), float(boot.std() / LN2)


def markdown(res: dict) -> str:
    domains = [d for d in res["bpb"]["teacher"] if d != "all"]
    lines = [
        "# Cross-tokenizer real check: Gemma-3-270M -> SmolLM2-135M-Instruct (`pipelines/crosstok_real_check.py`)",
        "",
        f"{res['settings']['machine']}. One Gemma dump (L = {SEQ_LEN}, k = {TOP_K}, `--bos auto`), "
        f"{res['settings']['steps']} steps x batch {res['settings']['batch_size']} rows, lr {res['settings']['lr']}, "
        "uniform mix, same pretrained start for every arm. Bits per byte on the val rows over the bytes both "
        "tokenisations score (lower is better).",
        "",
        "| model | " + " | ".join(domains) + " | all |",
        "|---|" + "---:|" * (len(domains) + 1),
    ]
    for name, per in res["bpb"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per[d]:.4f}" for d in domains) + f" | {per['all']:.4f} |")
    lines += ["", "Each arm minus `ce-only`, bits per byte (± bootstrap SE over val rows; negative: better):", ""]
    lines += ["| arm | " + " | ".join(domains) + " | all |", "|---|" + "---:|" * (len(domains) + 1)]
    for name, per in res["paired_vs_ce_only"].items():
        cells = [f"{per[d][0]:+.4f} ± {per[d][1]:.4f}" for d in [*domains, "all"]]  # (difference, SE)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | wall s | s / step | teacher tokens/s | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    for name, c in res["cost"].items():
        lines.append(
            f"| {name} | {c['seconds']:.0f} | {c['step_seconds']:.2f} | {c['tokens_per_s']:.0f} | {c['peak_mib']:.0f} |"
        )
    a = res["alignment"]
    lines += [
        "",
        f"Alignment (val + train): {a['paired']:.1%} of teacher positions paired, {a['refused']} rows refused of "
        f"{a['rows']}; built in {a['seconds']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Work folder (corpus, dumps, runs); reruns resume.")
    ap.add_argument("--dump", type=Path, help="An existing BOS Gemma dump of the demo corpus (skips 1-2).")
    ap.add_argument("--same-dump", type=Path, help="An existing SmolLM2 dump of the same corpus (for step time).")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    from gemma3_path import gemma3_gguf
    from smollm2_path import smollm2_gguf

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gemma_dump, same_dump = args.dump or work / "gemma-dump", args.same_dump or work / "smollm2-dump"
    if args.dump is None or args.same_dump is None:
        corpus = work / "corpus"
        if not (corpus / "manifest.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "pipelines" / "demo_corpus.py"), str(corpus), "--size",
                            "quick"], check=True)  # fmt: skip
        if args.dump is None:
            print("dumping Gemma-3-270M", flush=True)
            dump(gemma3_gguf(), corpus, gemma_dump)
        if args.same_dump is None:
            print("dumping SmolLM2-135M-Instruct (same-tokenizer step time)", flush=True)
            dump(smollm2_gguf(), corpus, same_dump)
    student = smollm2_gguf()
    train = ["--student", student, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
             str(args.lr), "--warmup-steps", "0", "--sampler", "uniform", "--device", "cpu", "--data-workers", "0",
             "--save-every", "0", "--report-to", "none", "-q"]  # fmt: skip
    if json.loads((gemma_dump / "manifest.json").read_text()).get("teacher_matrices") is None:
        print("adding the teacher matrices to the Gemma dump (dskd)", flush=True)  # a --dump from before them
        run_measured("dumps", "add-teacher-matrices", str(gemma_dump))  # the manifest's teacher, checked by hash
    cost = {}
    for name, extra in [*ARMS.items(), ("same-tokenizer", [])]:
        out, dump_dir = work / "runs" / name, same_dump if name == "same-tokenizer" else gemma_dump
        if not (out / "summary.json").is_file():
            print(f"training {name}", flush=True)
            again = ["--resume"] if (out / "config.json").is_file() else []  # an interrupted arm continues
            seconds, peak = run_measured("distill", "--dump", str(dump_dir), "--out", str(out), *train, *extra, *again)
            (out / "cost.json").write_text(json.dumps({"seconds": seconds, "peak_mib": peak}))
        summary, measured = (json.loads((out / f).read_text()) for f in ("summary.json", "cost.json"))
        speed = {"step_seconds": summary["seconds"] / args.steps, "tokens_per_s": summary["tokens_per_s"]}
        cost[name] = measured | speed
    from ddk_offline.distillation.student import load_student

    reader = open_dump(gemma_dump)
    t0 = time.perf_counter()
    cross = CrossTokenizer(reader, load_tokenizer(student), cache_root=work / "student_rows")
    built = time.perf_counter() - t0
    stats = [a for per in cross.rows.alignment.values() for a in per.values()]
    rows: dict[str, dict] = {}
    for name, path in [("student before", student), *[(n, work / "runs" / n / "final") for n in ARMS]]:
        print(f"evaluating {name}", flush=True)
        model = load_student(pretrained=path).eval()  # a .gguf or a save_pretrained folder, fp32 on CPU
        rows[name] = per_row(model, cross)
        del model
    teacher = {d: {"ce": r["nll"], "bytes": r["bytes"]} for d, r in rows["student before"].items()}
    bpb = {"teacher": teacher} | rows
    table = {}
    for name, per in bpb.items():
        cells = {d: float(r["ce"].sum() / r["bytes"].sum() / LN2) for d, r in per.items()}
        every = sum(r["ce"].sum() for r in per.values()) / sum(r["bytes"].sum() for r in per.values())
        table[name] = cells | {"all": float(every / LN2)}
    rng = np.random.default_rng(0)
    paired = {}
    for name in [n for n in ARMS if n != "ce-only"] + ["student before"]:
        per = {d: paired_bpb(rows[name][d], rows["ce-only"][d], rng) for d in reader.domains}
        cat = {k: np.concatenate([rows[name][d][k] for d in reader.domains]) for k in ("ce", "bytes")}
        base = {k: np.concatenate([rows["ce-only"][d][k] for d in reader.domains]) for k in ("ce", "bytes")}
        paired[name] = per | {"all": paired_bpb(cat, base, rng)}
    result = {
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "dump": str(gemma_dump),
            "machine": f"{os.cpu_count()}-core x86_64, torch {torch.__version__}, no GPU",
        },  # fmt: skip
        "bpb": table,
        "paired_vs_ce_only": paired,
        "cost": cost,
        "alignment": {
            "rows": sum(a.rows for a in stats),
            "refused": sum(a.refused for a in stats),
            "paired": sum(a.paired for a in stats) / max(1, sum(a.teacher_positions for a in stats)),
            "seconds": built,
        },
    }
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "crosstok_real_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.report / "crosstok_real_check.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
