"""What a domain gains per unit of data in a finished DDK study (pipelines/study_ddk.py), against the mix DDK chose.

    python pipelines/study_returns.py runs/study-quick                        # the report split (cached scores)
    python pipelines/study_returns.py runs/study-quick --split choices --out docs/results/study_ddk_quick

Every DDK variant (the arms that differ from uniform KD in their mix alone) is a dose of data per domain: its
mean weight over the run. Against the baseline (uniform KD) of the same seed, each run gives, per domain, the paired
per-position CE difference (nats; negative = the arm is better there) and the share it gave that domain. The
least-squares slope of the difference against the share, per domain, is that domain's return on data at this
budget (nats per unit of share). A reweighting helps the mean only when it moves data toward the domains with the
steepest slopes; DDK moves it toward the largest gaps. The table sets the two side by side.

``--split choices`` scores every final model on the training dump's validation split first (cached per run in
``choices_scores.json``), so the returns can be read on a split the study does not report on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    from . import study_ddk
    from .study_report import train_gap
except ImportError:
    import study_ddk
    from study_report import train_gap

BASELINE = study_ddk.BASELINE  # uniform KD, the arm every other is paired with


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _scores(run: Path, study: Path, split: str) -> dict:
    if split == "report":
        return json.loads((run / "report_scores.json").read_text(encoding="utf-8"))
    return study_ddk.score(run / "final", study / "dump", run / "choices_scores.json", split="val")


def returns(study: Path, split: str = "report") -> dict:
    """Per domain: the slope of paired CE (arm - baseline) against the arm's mean share, over every moving arm x
    seed; each moving arm's mean share per domain; the baseline's train-batch gap (what DDK reads)."""
    # The DDK variants only: each differs from the baseline in its mix alone (CPT + DoReMi also drops the KL term).
    arms = sorted(p.name for p in (study / "arms").iterdir() if p.is_dir() and p.name.startswith("ddk"))
    seeds = sorted(int(p.name[4:]) for p in (study / "arms" / BASELINE).glob("seed*") if (p / "final").is_dir())
    base = {s: _scores(study / "arms" / BASELINE / f"seed{s}", study, split) for s in seeds}
    domains = list(base[seeds[0]])
    points: dict[str, list[tuple[float, float]]] = {d: [] for d in domains}
    shares: dict[str, dict[str, float]] = {}
    for arm in arms:
        per_seed = []
        for s in seeds:
            run = study / "arms" / arm / f"seed{s}"
            if not (run / "final").is_dir():
                continue
            weights = [r["weights"] for r in _rows(run / "metrics.jsonl") if r.get("weights")]
            share = {d: float(np.mean([w[d] for w in weights])) for d in domains}
            if max(share.values()) - min(share.values()) < 1e-9:
                break  # a fixed uniform mix (CPT): no dose to read
            per_seed.append(share)
            sc = _scores(run, study, split)
            for d in domains:
                n = float(np.sum(sc[d]["positions"]))
                diff = (float(np.sum(sc[d]["ce_sum"])) - float(np.sum(base[s][d]["ce_sum"]))) / n
                points[d].append((share[d], diff))
        if per_seed:
            shares[arm] = {d: float(np.mean([p[d] for p in per_seed])) for d in domains}
    slopes = {}
    for d, pts in points.items():
        x, y = np.array(pts).T
        slopes[d] = {"slope": float(np.polyfit(x, y, 1)[0]), "corr": float(np.corrcoef(x, y)[0, 1]),
                     "share_min": float(x.min()), "share_max": float(x.max()), "runs": len(pts)}  # fmt: skip
    gap = train_gap([_rows(study / "arms" / BASELINE / f"seed{s}" / "metrics.jsonl") for s in seeds])
    order = sorted(domains, key=lambda d: slopes[d]["slope"])
    return {"split": split, "seeds": seeds, "domains": domains, "slopes": slopes, "shares": shares,
            "train_gap": gap, "steepest_first": order}  # fmt: skip


def markdown(res: dict, study: Path) -> str:
    arms = [a for a in ("ddk", "ddk-val") if a in res["shares"]]
    lines = [
        f"# Returns on data per domain ({res['split']} split)",
        "",
        f"`python pipelines/study_returns.py {study} --split {res['split']}`: per domain, the least-squares slope "
        "of the paired per-position CE difference (arm - uniform KD, same seed; nats) against the arm's mean "
        f"share of the data, over every DDK variant x seed (seeds {res['seeds']}). Negative: more data there "
        "helps there. Beside it, what DDK reads (the train-batch gap exp(CE_S - NLL_T) of the first 8 steps) and "
        "the mean share DDK (train-batch gaps) and DDK on the choices split's gaps gave the domain.",
        "",
        "| domain | slope (nats / share) | corr | share range | runs | train-batch gap | "
        + " | ".join(f"share: {a}" for a in arms)
        + " |",
        "|---|---:|---:|---|---:|---:|" + "---:|" * len(arms),
    ]
    for d in res["steepest_first"]:
        s = res["slopes"][d]
        lines.append(
            f"| {d} | {s['slope']:+.4f} | {s['corr']:+.2f} | {s['share_min']:.2f}-{s['share_max']:.2f} | {s['runs']} | "
            f"{res['train_gap'].get(d, float('nan')):.3f} | "
            + " | ".join(f"{res['shares'][a][d]:.3f}" for a in arms)
            + " |"
        )
    slope = np.array([res["slopes"][d]["slope"] for d in res["domains"]])
    for a in arms:
        share = np.array([res["shares"][a][d] for d in res["domains"]])
        lines.append("")
        r = np.corrcoef(share, slope)[0, 1]
        lines.append(f"Correlation over domains of {a}'s mean share with the slope: {r:+.2f} (negative: it gave more "
                     "data where data helps more).")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="a finished study folder (pipelines/study_ddk.py --out)")
    ap.add_argument("--split", choices=("report", "choices"), default="report")
    ap.add_argument("--out", type=Path, help="also write returns_SPLIT.md / .json into this folder")
    args = ap.parse_args(argv)
    res = returns(args.study, args.split)
    text = markdown(res, args.study)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"returns_{args.split}.md").write_text(text, encoding="utf-8")
        (args.out / f"returns_{args.split}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
