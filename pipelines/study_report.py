"""The DDK study's report (pipelines/study_ddk.py): ratio tables shaped like the paper's, paired differences
against uniform KD with bootstrap errors over sequences, the seed-to-seed spread, the verdict, and plots.

Every number is computed from the study folder's files: ``report_teacher.json`` and each run's
``report_scores.json`` (per-sequence sums of CE and of the teacher's stored NLL on the report split),
``warmup/choices_eval.json`` (the warm start on the choices split), and each run's ``metrics.jsonl``.

Statistics. Per run and domain, the ratio is PPL_S / PPL_T = exp((sum CE - sum NLL) / positions) over the
report split; the mean is over domains, the worst is the largest. A difference arm - KD is averaged over seeds;
its standard error combines (a) the evaluation noise, a bootstrap over the report sequences (resampled within
each domain, the same draw for every arm and seed, so the comparison stays paired), and (b) the training noise,
the seed-to-seed standard deviation / sqrt(seeds): SE = sqrt(SE_boot^2 + SE_seed^2). An arm "beats" KD when
its difference is below -2 SE on both the mean and the worst domain.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

from ddk_offline.format.workers import usable_cores

try:
    from .demo_paired import BOOTSTRAP, bootstrap_se
except ImportError:
    from demo_paired import BOOTSTRAP, bootstrap_se

PAPER_ROWS = ("cpt", "cpt-doremi", "kd", "ddk")  # the paper's Table 1 methods we can run
ABLATION_ROWS = ("ddk", "ddk-no-smoothing", "ddk-k-small", "ddk-k-large", "ddk-val", "kd")  # Table 3/4, + held-out gaps
WEIGHT_ARMS = ("ddk", "ddk-no-smoothing", "ddk-k-small", "ddk-k-large", "ddk-val", "cpt-doremi")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ratios(score: dict, teacher: dict, idx: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-domain ratio exp((sum CE - sum NLL) / positions); with ``idx`` ([B, n] per domain) one per draw."""
    out = {}
    for d in teacher:
        ce, nll, n = (np.asarray(x, dtype=np.float64) for x in (score[d]["ce_sum"], teacher[d]["nll_sum"],
                                                                 score[d]["positions"]))  # fmt: skip
        if idx is None:
            out[d] = np.exp((ce.sum() - nll.sum()) / n.sum())
        else:
            out[d] = np.exp((ce[idx[d]].sum(1) - nll[idx[d]].sum(1)) / n[idx[d]].sum(1))
    return out


def _mean_worst(r: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    stack = np.stack([np.asarray(v) for v in r.values()])
    return stack.mean(0), stack.max(0)


def summarise(scores: dict, teacher: dict, seeds: list[int], baseline: str, *, seed: int = 0) -> dict:
    """Ratios per arm (seed means and spreads), differences vs ``baseline`` with combined SEs, paired CE diffs."""
    rng = np.random.default_rng(seed)
    domains = list(teacher)
    idx = {d: rng.integers(0, len(teacher[d]["nll_sum"]), (BOOTSTRAP, len(teacher[d]["nll_sum"]))) for d in domains}
    arms = [a for a in scores if a != "warmup"]
    have = {a: [s for s in seeds if s in scores[a]] for a in arms}  # a study cut short may lack some runs
    table, draws = {}, {}
    for arm in arms:
        per_seed = [ratios(scores[arm][s], teacher) for s in have[arm]]
        mw = [_mean_worst(r) for r in per_seed]
        draws[arm] = {s: _mean_worst(ratios(scores[arm][s], teacher, idx)) for s in have[arm]}  # ([B], [B])
        row = {d: _spread([float(r[d]) for r in per_seed]) for d in domains}
        row["mean"] = _spread([float(m) for m, _ in mw])
        row["worst"] = _spread([float(w) for _, w in mw])
        row["worst_domain"] = [domains[int(np.argmax([r[d] for d in domains]))] for r in per_seed]
        row["seeds"] = have[arm]
        table[arm] = row
    versus = {}
    for arm in arms:
        common = [s for s in have[arm] if s in have[baseline]]
        if arm == baseline or not common:
            continue
        versus[arm] = {"seeds": common}
        for j, key in enumerate(("mean", "worst")):
            pick = [table[arm]["seeds"].index(s) for s in common], [table[baseline]["seeds"].index(s) for s in common]
            diff_seeds = (
                np.array(table[arm][key]["values"])[pick[0]] - np.array(table[baseline][key]["values"])[pick[1]]
            )
            boot = np.mean([draws[arm][s][j] - draws[baseline][s][j] for s in common], axis=0)
            se_boot = float(boot.std())
            se_seed = float(diff_seeds.std(ddof=1) / math.sqrt(len(common))) if len(common) > 1 else 0.0
            se = math.hypot(se_boot, se_seed)
            diff = float(diff_seeds.mean())
            versus[arm][key] = {
                "diff": diff,
                "se_boot": se_boot,
                "se_seed": se_seed,
                "se": se,
                "per_seed": diff_seeds.tolist(),
                "better": diff < -2 * se,
                "worse": diff > 2 * se,
            }
        versus[arm]["beats"] = versus[arm]["mean"]["better"] and versus[arm]["worst"]["better"]
        versus[arm]["paired_ce"] = _paired_ce(scores[arm], scores[baseline], common, domains, rng)
    warm = {d: float(v) for d, v in ratios(scores["warmup"][0], teacher).items()} if "warmup" in scores else {}
    return {"domains": domains, "table": table, "versus": versus, "warmup_report": warm,
            "sequences": {d: len(teacher[d]["nll_sum"]) for d in domains}}  # fmt: skip


def _spread(values: list[float]) -> dict:
    arr = np.asarray(values)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": values}


def _paired_ce(arm: dict, base: dict, seeds: list[int], domains: list[str], rng: np.random.Generator) -> dict:
    """Per domain: mean per-position CE difference arm - baseline (nats, seed mean), bootstrap SE over sequences."""
    out = {}
    for d in domains:
        n = np.asarray(base[seeds[0]][d]["positions"], dtype=np.float64)
        diff = np.mean([np.asarray(arm[s][d]["ce_sum"]) - np.asarray(base[s][d]["ce_sum"]) for s in seeds], axis=0)
        out[d] = {"mean_diff_nats": float(diff.sum() / n.sum()), "bootstrap_se_nats": bootstrap_se(diff / n, rng)}
    return out


def _verdict(mean: dict, worst: dict) -> str:
    """One arm against the baseline, from the > 2 SE flags of its mean and worst-domain differences."""
    if mean["better"] and worst["better"]:
        return "**better on both by > 2 SE**"
    parts = [f"{'better' if x['better'] else 'worse'} on the {name} by > 2 SE"
             for name, x in (("mean", mean), ("worst domain", worst)) if x["better"] or x["worse"]]  # fmt: skip
    return "; ".join(parts) if parts else "no difference beyond 2 SE"


def _cell(x: dict, bold: bool = False) -> str:
    text = f"{x['mean']:.3f}" + (f" ± {x['sd']:.3f}" if len(x["values"]) > 1 else "")
    return f"**{text}**" if bold else text


def _table(summary: dict, rows: tuple[str, ...], labels: dict[str, str]) -> list[str]:
    rows = tuple(r for r in rows if r in summary["table"])
    cols = [*summary["domains"], "mean", "worst"]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            best = min(summary["table"][o][c]["mean"] for o in rows)
            cells.append(_cell(summary["table"][r][c], summary["table"][r][c]["mean"] == best))
        lines.append(f"| {labels[r]} | {len(summary['table'][r]['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def render(summary: dict, *, size: str, cfg: dict, arms: dict[str, str], seeds: list[int], baseline: str,
           warm_choices: dict, seconds: dict, finals: dict, train_gap: dict) -> str:  # fmt: skip
    """The report's README.md."""
    tokens = cfg["steps"] * cfg["batch"] * cfg["seq_len"]
    cross = cfg.get("regime") == "cross"
    lines = [
        f"# Does DDK beat uniform KD? Study results ({size} size)",
        "",
        f"Produced by `{cfg['command']}`; every number is read from that run's files by `pipelines/study_report.py`.",
        "",
        f"- Machine: {platform.machine()}, {usable_cores()} CPU cores, Python {platform.python_version()}.",
        *_protocol(cfg, tokens),
        f"- Seeds requested: {seeds}; the seeds each arm has are in the tables' `seeds` column (a study cut short "
        "reports what finished). Report split: held-out documents, "
        + ", ".join(f"{d} {n}" for d, n in summary["sequences"].items())
        + " sequences; nothing was tuned on it (the warm start was checked on the choices split).",
        "",
        f"## The {'start' if cross else 'warm start'} (shared by every arm)",
        "",
        "| split | " + " | ".join(summary["domains"]) + " |",
        "|---|" + "---:|" * len(summary["domains"]),
        "| choices (dump val) | "
        + " | ".join(f"{warm_choices.get(d, float('nan')):.3f}" for d in summary["domains"])
        + " |",
        "| report | "
        + " | ".join(f"{summary['warmup_report'].get(d, float('nan')):.3f}" for d in summary["domains"])
        + " |",
        f"| train batches ({arms[baseline]}, steps 0-{TRAIN_GAP_STEPS - 1}, every seed) | "
        + " | ".join(f"{train_gap.get(d, float('nan')):.3f}" for d in summary["domains"])
        + " |",
        "",
        "The last row is the gap the `ddk` arms read (`--gap-source train`): exp of the mean over batches of "
        "CE_S - NLL_T as logged by the baseline's first steps, where the student is still near its start.",
        "",
        f"## Per-domain PPL ratio PPL_S / PPL_T{' per byte' if cross else ''} on the report "
        "split (mean ± sd over seeds; lower is better)",
        "",
        "Shaped like the paper's Table 1 (methods) and its ablation (arXiv 2407.16154).",
        "",
        *_table(summary, PAPER_ROWS, arms),
        "",
        "Ablation:",
        "",
        *_table(summary, ABLATION_ROWS, {**arms, "kd": "equal sampling (KD)"}),
        "",
        f"## Against {arms[baseline]} (difference of the seed mean; SE = bootstrap over sequences ⊕ seed spread)",
        "",
        "| arm | seeds | Δ mean ratio | SE (boot, seed) | Δ worst ratio | SE (boot, seed) | per-seed Δ mean "
        "| verdict |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for arm, v in summary["versus"].items():
        m, w = v["mean"], v["worst"]
        verdict = _verdict(m, w)
        lines.append(
            f"| {arms[arm]} | {','.join(map(str, v['seeds']))} | {m['diff']:+.4f} | "
            f"{m['se']:.4f} ({m['se_boot']:.4f}, {m['se_seed']:.4f}) | "
            f"{w['diff']:+.4f} | {w['se']:.4f} ({w['se_boot']:.4f}, {w['se_seed']:.4f}) | "
            + ", ".join(f"{x:+.4f}" for x in m["per_seed"])
            + f" | {verdict} |"
        )
    lines += [
        "",
        f"## Paired per-{'byte' if cross else 'position'} CE difference arm - {arms[baseline]} (nats, seed mean ± "
        "bootstrap SE over "
        f"sequences, {BOOTSTRAP} resamples; negative = arm better)",
        "",  # fmt: skip
        "| arm | " + " | ".join(summary["domains"]) + " |",
        "|---|" + "---:|" * len(summary["domains"]),
    ]
    for arm, v in summary["versus"].items():
        p = v["paired_ce"]
        cells = [f"{p[d]['mean_diff_nats']:+.4f} ± {p[d]['bootstrap_se_nats']:.4f}" for d in summary["domains"]]
        lines.append(f"| {arms[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "## Final domain weights (seed 0)", "", "| arm | " + " | ".join(summary["domains"]) + " |",
              "|---|" + "---:|" * len(summary["domains"])]  # fmt: skip
    for arm, w in finals.items():
        lines.append(
            f"| {arms[arm]} | " + " | ".join(f"{w.get(d, float('nan')):.3f}" for d in summary["domains"]) + " |"
        )
    total = sum(s for s in seconds.values() if s)
    lines += ["", f"Training time of the arms: {total / 60:.1f} min in all ({len(seconds)} runs).", "",
              "![per-domain ratios](ratios.png)", "", "![weights over steps](weights.png)", "",
              "![train ratios over steps](train_ratios.png)", ""]  # fmt: skip
    return "\n".join(lines)


def _protocol(cfg: dict, tokens: int) -> list[str]:
    """The report's lines on the student, its start and the arms' budget (regime (a) or (b))."""
    budget = (
        f"{cfg['steps']} steps x {cfg['batch']} x {cfg['seq_len']} = {tokens} teacher tokens, lr {cfg['lr']}, "
        f"K = {cfg['k']} (K too small = {cfg['k_small']}, too large = {cfg['k_large']}), gamma 0.2, T 1"
    )
    if cfg.get("regime") == "cross":
        return [
            f"- Regime (b), across tokenizers: the student `{Path(cfg['student']).name}` is pretrained and is every "
            f"arm's start as it is (no warm-up); KD through `--cross-tokenizer uld`. Every ratio is per byte, "
            "exp((CE_S - NLL_T) / bytes) over the bytes both tokenisations score (docs/CROSSTOK.md), so `positions` "
            "below are bytes.",
            f"- Every arm trains {budget}.",
        ]
    return [
        f"- Student: `--derive-from-teacher {cfg['student']}`, warmed up once ({cfg['warmup_steps']} steps of "
        f"uniform KD, lr {cfg['warmup_lr']}, on its own documents: about {cfg.get('warmup_fraction', 0):.0%} of the "
        "training text by source file, which no arm trains on); every arm starts from that checkpoint and trains "
        f"{budget}."
    ]


TRAIN_GAP_STEPS = 8  # the first steps of a run, where the student is still near the shared start


def train_gap(rows_per_seed: list[list[dict]], steps: int = TRAIN_GAP_STEPS) -> dict[str, float]:
    """Per domain exp(mean of CE_S - NLL_T over the logged batches of the first ``steps`` steps of every seed's
    metrics rows): the train-batch gap a ``ddk`` arm reads, in the report's ratio units."""
    diffs: dict[str, list[float]] = {}
    for rows in rows_per_seed:
        for row in rows:
            if row.get("step", steps) >= steps:
                continue
            for d, st in (row.get("student_loss") or {}).items():
                te = (row.get("teacher_loss") or {}).get(d)
                if st is not None and te is not None:
                    diffs.setdefault(d, []).append(st - te)
    return {d: math.exp(float(np.mean(v))) for d, v in diffs.items()}


def _weights(rows: list[dict]) -> list[tuple[int, dict]]:
    return [(r["step"], r["weights"]) for r in rows if r.get("weights")]


def _train_ratio(row: dict, d: str) -> float | None:
    s, t = (row.get("student_loss") or {}).get(d), (row.get("teacher_loss") or {}).get(d)
    return math.exp(s - t) if s is not None and t is not None else None


def write_plots(out: Path, summary: dict, arms: dict[str, str], metrics: dict[str, list[dict]]) -> list[Path]:
    """ratios.png, weights.png (seed 0), train_ratios.png (seed 0); none when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'ddk-offline[demo]')", file=sys.stderr)
        return []
    domains, table = summary["domains"], summary["table"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(table)
    for i, arm in enumerate(table):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [table[arm][d]["mean"] for d in domains], width, yerr=[table[arm][d]["sd"] for d in domains],
               label=arms[arm])  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("report PPL_S / PPL_T (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files = [out / "ratios.png"]
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    shown = [a for a in WEIGHT_ARMS if metrics.get(a)]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.4), squeeze=False)
    for ax, arm in zip(axes[0], shown, strict=False):
        pts = _weights(metrics[arm])
        for d in domains:
            ax.step([p[0] for p in pts], [p[1][d] for p in pts], where="post", label=d)
        ax.set_title(arms[arm], fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("sampling weight")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    files.append(out / "weights.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    shown = [a for a in ("kd", "ddk") if metrics.get(a)]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(5.5 * max(1, len(shown)), 3.6), squeeze=False)
    for ax, arm in zip(axes[0], shown, strict=False):
        for d in domains:
            pts = [(r["step"], _train_ratio(r, d)) for r in metrics[arm]]
            pts = [p for p in pts if p[1] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=d, lw=0.9)
        ax.set_title(f"{arms[arm]}: train PPL_S / PPL_T per batch", fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    files.append(out / "train_ratios.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def write_report(study: Path, *, size: str, cfg: dict, arms: dict[str, str], seeds: list[int], scores: dict,
                 baseline: str, results: Path | None = None) -> dict:  # fmt: skip
    """Summarise, render and write README.md, results.json and the plots under STUDY/report (and copy them to the
    folder ``results``)."""
    teacher = json.loads((study / "report_teacher.json").read_text(encoding="utf-8"))
    summary = summarise(scores, teacher, seeds, baseline)
    choices = json.loads((study / "warmup" / "choices_eval.json").read_text(encoding="utf-8"))
    choices = choices[0] if isinstance(choices, list) else choices
    warm_choices = {d: v["ratio"] for d, v in choices["domains"].items()}
    metrics = {a: _read_jsonl(study / "arms" / a / f"seed{seeds[0]}" / "metrics.jsonl") for a in arms}
    finals = {a: _weights(metrics[a])[-1][1] for a in arms if _weights(metrics[a])}
    seconds = {}
    for a in arms:
        for s in seeds:
            path = study / "arms" / a / f"seed{s}" / "summary.json"
            if not path.is_file():
                continue
            seconds[f"{a}/seed{s}"] = json.loads(path.read_text()).get("seconds")
    out = study / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = write_plots(out, summary, arms, metrics)
    gap = train_gap([_read_jsonl(study / "arms" / baseline / f"seed{s}" / "metrics.jsonl") for s in seeds])
    text = render(summary, size=size, cfg=cfg, arms=arms, seeds=seeds, baseline=baseline, warm_choices=warm_choices,
                  seconds=seconds, finals=finals, train_gap=gap)  # fmt: skip
    (out / "README.md").write_text(text, encoding="utf-8")
    payload = {"size": size, "config": cfg, "seeds": seeds, "arms": arms, "baseline": baseline,
               "machine": platform.machine(), "warmup_choices": warm_choices, "train_gap": gap, "final_weights": finals,
               "train_seconds": seconds, **summary}  # fmt: skip
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    files += [out / "README.md", out / "results.json"]
    print(text)
    if results:
        results.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, results / f.name)
        print(f"copied {len(files)} files to {results}")
    return payload
