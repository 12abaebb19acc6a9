"""Which teacher layers should a derived student keep? Per-domain PPL ratios of untrained derived students.

    python pipelines/derive_scan.py --dump runs/study-quick/dump [--teacher T.gguf] [--specs layers=24,drop=13-18]
        [--out docs/results]

Every derive spec (``derive_student``) is built from the same teacher and evaluated, with no training, on the dump's
val split (the study's *choices* split, never its report split): the PPL ratio PPL_S / PPL_T per domain, its mean
and worst. This is how `pipelines/study_ddk.py` chose its quick-size student (issue #17: a student that starts
near the teacher, per-domain ratios <= ~3 after a short warm-up). About 10 s per spec for a 135M teacher on 2 CPU
cores. Writes OUT/derive_scan.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

# Evenly spaced layers (the default derive) against contiguous blocks removed, for SmolLM2-135M (30 layers).
DEFAULT_SPECS = (
    "layers=20;layers=24;layers=27;layers=28;"
    "drop=1-3;drop=2-7;drop=8-13;drop=12-19;drop=13-18;drop=14-19;drop=16-21;drop=14-21;drop=20-22;drop=22-28"
)


def scan(dump: str, teacher: str, specs: list[str]) -> list[dict]:
    """Derive and evaluate each spec; one dict per spec (spec, layers kept, ratios per domain, mean, worst, seconds)."""
    from ddk_offline.distillation.evaluation import evaluate_model
    from ddk_offline.distillation.student import derive_student, load_student
    from ddk_offline.format.reader import open_dump

    reader = open_dump(dump)
    model = load_student(pretrained=teacher).float().eval()
    rows = []
    for spec in ["teacher", *specs]:
        start = time.time()
        student = model if spec == "teacher" else derive_student(model, spec).eval()
        result = evaluate_model(student, reader, name=spec, split="val").to_dict()
        kept = (
            student.config.ddk_derived["layers"] if spec != "teacher" else list(range(model.config.num_hidden_layers))
        )
        rows.append({
            "spec": spec, "layers": len(kept), "kept": kept, "mean": result["mean_ratio"],
            "worst": result["worst_ratio"], "ratio": {d: v["ratio"] for d, v in result["domains"].items()},
            "seconds": round(time.time() - start, 1),
        })  # fmt: skip
        print(
            f"{spec:>12}: {len(kept)} layers, mean ratio {result['mean_ratio']:.4g}, worst {result['worst_ratio']:.4g}"
        )
        if student is not model:
            del student
    return rows


def write(rows: list[dict], out: Path, dump: str, teacher: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from ddk_offline.format.workers import usable_cores

    meta = {"machine": f"{platform.machine()}, {usable_cores()} cores", "dump": dump,
            "teacher": Path(teacher).name, "split": "val (the dump's choices split)"}  # fmt: skip
    (out / "derive_scan.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    domains = list(rows[0]["ratio"])
    lines = [
        "# Derived students before any training: per-domain PPL ratio to the teacher",
        "",
        f"`python pipelines/derive_scan.py --dump {dump}`; teacher {meta['teacher']}, {meta['split']}, "
        f"{meta['machine']}. Lower is better; 1 = the teacher.",
        "",
        "| spec | layers | " + " | ".join(domains) + " | mean | worst |",
        "|---|---:|" + "---:|" * (len(domains) + 2),
    ]
    for r in rows:
        cells = [f"{r['ratio'][d]:.3g}" for d in domains] + [f"{r['mean']:.3g}", f"{r['worst']:.3g}"]
        lines.append(f"| {r['spec']} | {r['layers']} | " + " | ".join(cells) + " |")
    (out / "derive_scan.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", required=True, help="a dump with a val split (e.g. the study's runs/study-quick/dump)")
    ap.add_argument("--teacher", help="teacher folder or .gguf (default: the dump manifest's teacher)")
    ap.add_argument("--specs", default=DEFAULT_SPECS, help="derive specs separated by ';'")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args(argv)
    teacher = args.teacher
    if teacher is None:
        teacher = json.loads((Path(args.dump) / "manifest.json").read_text(encoding="utf-8"))["teacher"]["name"]
    rows = scan(args.dump, teacher, [s.strip() for s in args.specs.split(";") if s.strip()])
    write(rows, args.out, args.dump, teacher)
    print(f"wrote {args.out / 'derive_scan.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
