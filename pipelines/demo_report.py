"""The demo's report: per-domain student/teacher ratios of the three students, the verdict, and plots.

    python pipelines/demo_report.py --demo runs/demo-quick --out runs/demo-quick/report [--results docs/results]

Reads what `pipelines/demo.sh` left in the demo folder: ``eval.json`` (``ddk-offline eval --json`` of the three
students), each student's ``metrics.jsonl`` and ``summary.json``, the dump's manifest and the corpus manifest.
Writes into ``--out`` (and copies to ``--results`` when given):

    README.md        the per-domain table, the mean and worst domain per student, the verdict, DDK's weights
    results.json     the same numbers for machines
    ratios.png       per-domain val ratio (PPL_S / PPL_T) of each student, grouped by domain
    ddk_weights.png  the DDK run's domain weights over steps next to its per-domain train loss ratio

Every number comes from those files; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
from pathlib import Path

from ddk_offline.format.workers import usable_cores

STUDENTS = {  # folder under students/ -> (label, what it is)
    "ddk": ("DDK", "KD (CE + 0.2 KL), DDK domain sampler"),
    "uniform": ("uniform KD", "KD (CE + 0.2 KL), uniform domain mix"),
    "ce-only": ("CE only", "--kd-weight 0: continued pre-training, uniform mix"),
}
LAST_WINDOWS = 5  # log windows pooled for the train-loss ratio at the start and the end of a run


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_demo(demo: Path) -> dict:
    """Everything the report needs from a finished demo folder, keyed by student name."""
    eval_path = demo / "eval.json"
    if not eval_path.is_file():
        raise SystemExit(f"{eval_path} is missing: run pipelines/demo.sh first (step 4 writes it)")
    evals = json.loads(eval_path.read_text(encoding="utf-8"))  # `eval --json`: one object per --model
    by_student: dict[str, dict] = {}
    for result in evals:
        name = Path(result["model"]).parent.name  # .../students/NAME/final
        if name not in STUDENTS:
            raise SystemExit(f"{eval_path}: model {result['model']!r} is not one of students/{{{','.join(STUDENTS)}}}")
        run = demo / "students" / name
        by_student[name] = {
            "eval": result,
            "metrics": _read_jsonl(run / "metrics.jsonl"),
            "summary": json.loads((run / "summary.json").read_text(encoding="utf-8")),
            "config": json.loads((run / "config.json").read_text(encoding="utf-8")),
        }
    missing = [s for s in STUDENTS if s not in by_student]
    if missing:
        raise SystemExit(f"{eval_path}: no evaluation of students {missing}; rerun pipelines/demo.sh")
    manifest = json.loads((demo / "dump" / "manifest.json").read_text(encoding="utf-8"))
    corpus = json.loads((demo / "corpus" / "manifest.json").read_text(encoding="utf-8"))
    return {"students": by_student, "manifest": manifest, "corpus": corpus}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summarise(data: dict) -> dict:
    """The numbers of the report: per-domain val ratios, mean/worst per student, the verdict, DDK's weights."""
    students = data["students"]
    domains = list(students["ddk"]["eval"]["domains"])
    per_domain = {
        d: {
            "teacher_loss": students["ddk"]["eval"]["domains"][d]["teacher_loss"],
            "positions": students["ddk"]["eval"]["domains"][d]["positions"],
            **{s: students[s]["eval"]["domains"][d]["ratio"] for s in STUDENTS},
            **{f"{s}_loss": students[s]["eval"]["domains"][d]["loss"] for s in STUDENTS},
        }
        for d in domains
    }
    overall = {
        s: {
            "mean_ratio": students[s]["eval"]["mean_ratio"],
            "worst_ratio": students[s]["eval"]["worst_ratio"],
            "worst_domain": students[s]["eval"]["worst_domain"],
            "train_seconds": students[s]["summary"].get("seconds"),
            "steps": students[s]["summary"].get("steps"),
            "tokens": students[s]["summary"].get("tokens"),
        }
        for s in STUDENTS
    }
    verdict = {}
    for other in ("uniform", "ce-only"):
        for key in ("mean_ratio", "worst_ratio"):
            verdict[f"ddk_vs_{other}_{key}"] = overall["ddk"][key] - overall[other][key]
    verdict["ddk_beats_uniform"] = all(verdict[f"ddk_vs_uniform_{k}"] < 0 for k in ("mean_ratio", "worst_ratio"))
    verdict["ddk_beats_ce_only"] = all(verdict[f"ddk_vs_ce-only_{k}"] < 0 for k in ("mean_ratio", "worst_ratio"))
    # DDK's weights at every sampler update (a row whose weights differ from the previous row's).
    weights, last = [], None
    for row in students["ddk"]["metrics"]:
        w = row.get("weights")
        if w and w != last:
            weights.append({"step": row["step"], **w})
            last = w
    train_ratio = {}
    for s in STUDENTS:
        train_ratio[s] = {}
        for d in domains:
            # CE / NLL over the first and the last LAST_WINDOWS log windows in which this domain had samples
            # (sums of the window means: one window is a step or two of a few sequences, too noisy alone).
            seen = [r for r in students[s]["metrics"] if _ratio(r, d) is not None]
            head, tail = seen[:LAST_WINDOWS], seen[-LAST_WINDOWS:]
            train_ratio[s][d] = {
                "first": _pooled_ratio(head, d),
                "last": _pooled_ratio(tail, d),
                "first_steps": [r["step"] for r in head],
                "last_steps": [r["step"] for r in tail],
            }
    return {
        "domains": domains,
        "per_domain": per_domain,
        "overall": overall,
        "verdict": verdict,
        "ddk_weights": weights,
        "train_loss_ratio": train_ratio,
    }


def _pooled_ratio(rows: list[dict], domain: str) -> float | None:
    if not rows:
        return None
    return sum(r["student_loss"][domain] for r in rows) / sum(r["teacher_loss"][domain] for r in rows)


def _ratio(row: dict, domain: str) -> float | None:
    s, t = (row.get("student_loss") or {}).get(domain), (row.get("teacher_loss") or {}).get(domain)
    return s / t if s is not None and t else None


def render_markdown(data: dict, summary: dict, *, size: str, seconds: float | None) -> str:
    """The report's README.md."""
    m, students = data["manifest"], data["students"]
    cfg = students["ddk"]["config"]
    lines = [
        f"# Demo results ({size} size)",
        "",
        "Produced by `pipelines/demo.sh"
        + (f" --size {size}" if size != "quick" else "")
        + "`; every number below is read from that run's files by `pipelines/demo_report.py`.",
        "",
        f"- Machine: {platform.machine()}, {usable_cores()} CPU cores, Python {platform.python_version()}"
        + (f"; the whole demo took {seconds / 60:.1f} min" if seconds else "")
        + ".",
        f"- Teacher: `{Path(str(m['teacher'].get('name', m['teacher']))).name}`; dump: seq_len {m['seq_len']}, "
        f"k = {m['k']}.",
        f"- Students: `--derive-from-teacher {cfg.get('derive_from_teacher')}`, {cfg.get('max_steps')} steps of "
        f"{cfg.get('batch_size')} x {m['seq_len']} tokens, lr {cfg.get('lr')}, seed {cfg.get('seed')}; the same "
        "init, data and schedule for all three, only the sampler and the KD weight differ.",
        "",
        "## Per-domain student/teacher perplexity ratio on the dump's validation split",
        "",
        "PPL_S / PPL_T = exp(CE_student - NLL_teacher) on the same positions; 1.0 = as good as the teacher; "
        "lower is better.",
        "",
        "| domain | val positions | teacher NLL | " + " | ".join(STUDENTS[s][0] for s in STUDENTS) + " |",
        "|---|---:|---:|" + "---:|" * len(STUDENTS),
    ]
    for d in summary["domains"]:
        row = summary["per_domain"][d]
        best = min(row[s] for s in STUDENTS)
        cells = [(f"**{_fmt(row[s])}**" if row[s] == best else _fmt(row[s])) for s in STUDENTS]
        lines.append(f"| {d} | {row['positions']} | {_fmt(row['teacher_loss'])} | " + " | ".join(cells) + " |")
    ov = summary["overall"]
    lines += [
        "| **mean** | | | " + " | ".join(_fmt(ov[s]["mean_ratio"]) for s in STUDENTS) + " |",
        "| **worst domain** | | | "
        + " | ".join(f"{_fmt(ov[s]['worst_ratio'])} ({ov[s]['worst_domain']})" for s in STUDENTS)
        + " |",
        "",
        "## Verdict",
        "",
    ]
    v = summary["verdict"]
    for other, label in (("uniform", "uniform KD"), ("ce-only", "CE only")):
        beats = v[f"ddk_beats_{other.replace('-', '_')}"]
        dm, dw = v[f"ddk_vs_{other}_mean_ratio"], v[f"ddk_vs_{other}_worst_ratio"]
        lines.append(
            f"- DDK vs {label}: mean ratio {dm:+.3f}, worst-domain ratio {dw:+.3f} (negative = DDK better): "
            + ("**DDK better on both**." if beats else "**DDK not better on both**.")
        )
    lines += [
        "",
        "## DDK's domain weights at each sampler update",
        "",
        "| step | " + " | ".join(summary["domains"]) + " |",
        "|---:|" + "---:|" * len(summary["domains"]),
    ]
    for w in summary["ddk_weights"]:
        lines.append(f"| {w['step']} | " + " | ".join(_fmt(w[d]) for d in summary["domains"]) + " |")
    lines += [
        "",
        f"## Train loss ratio CE_student / NLL_teacher, first and last {LAST_WINDOWS} log windows",
        "",
        "| domain | " + " | ".join(f"{STUDENTS[s][0]} first → last" for s in STUDENTS) + " |",
        "|---|" + "---:|" * len(STUDENTS),
    ]
    for d in summary["domains"]:
        tr = summary["train_loss_ratio"]
        cells = [f"{_fmt(tr[s][d]['first'])} → {_fmt(tr[s][d]['last'])}" for s in STUDENTS]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![per-domain val ratio](ratios.png)",
        "",
        "![DDK weights and train loss ratio](ddk_weights.png)",
        "",
        "Students: " + "; ".join(f"{STUDENTS[s][0]} = {STUDENTS[s][1]}" for s in STUDENTS) + ".",
        "",
    ]
    return "\n".join(lines)


def write_plots(data: dict, summary: dict, out: Path) -> list[Path]:
    """``ratios.png`` and ``ddk_weights.png``; none (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ddk_offline.distillation.plots import log_ratio_axis
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'ddk-offline[demo]')", file=sys.stderr)
        return []
    domains = summary["domains"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(STUDENTS)
    for i, s in enumerate(STUDENTS):
        xs = [j + (i - (len(STUDENTS) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [summary["per_domain"][d][s] for d in domains], width, label=STUDENTS[s][0])
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="teacher (ratio 1)")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("val PPL_student / PPL_teacher (lower is better)")
    ax.set_title("Per-domain student/teacher perplexity ratio")
    ax.legend()
    fig.tight_layout()
    ratios = out / "ratios.png"
    fig.savefig(ratios, dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = data["students"]["ddk"]["metrics"]
    for d in domains:
        pts = [(r["step"], r["weights"][d]) for r in rows if r.get("weights")]
        a1.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=d)
        rs = [(r["step"], _ratio(r, d)) for r in rows]
        rs = [p for p in rs if p[1] is not None]
        a2.plot([p[0] for p in rs], [p[1] for p in rs], label=d)
    a1.set_title("DDK domain weights")
    a1.set_xlabel("step")
    a1.set_ylabel("sampling weight")
    a2.set_title("DDK run: train CE_student / NLL_teacher")
    a2.set_xlabel("step")
    a2.set_ylabel("student CE / teacher NLL (log scale)")
    log_ratio_axis(a2)
    for a in (a1, a2):
        a.legend()
    fig.tight_layout()
    weights = out / "ddk_weights.png"
    fig.savefig(weights, dpi=120)
    plt.close(fig)
    return [ratios, weights]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, type=Path, help="the demo folder (pipelines/demo.sh --out)")
    ap.add_argument("--out", required=True, type=Path, help="where to write README.md, results.json and plots")
    ap.add_argument("--results", type=Path, help="also copy the report there (e.g. docs/results)")
    ap.add_argument("--size", default="quick", help="the demo size, for the title")
    ap.add_argument("--seconds", type=float, help="wall time of the whole demo so far, for the report")
    args = ap.parse_args(argv)

    data = load_demo(args.demo)
    summary = summarise(data)
    args.out.mkdir(parents=True, exist_ok=True)
    files = write_plots(data, summary, args.out)
    readme = args.out / "README.md"
    readme.write_text(render_markdown(data, summary, size=args.size, seconds=args.seconds), encoding="utf-8")
    results = args.out / "results.json"
    payload = {"size": args.size, "seconds": args.seconds, "machine": platform.machine(), **summary}
    results.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    files += [readme, results]
    print(readme.read_text(encoding="utf-8"))
    if args.results:
        dest = args.results / f"demo_{args.size}"
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / f.name)
        print(f"copied {len(files)} files to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
