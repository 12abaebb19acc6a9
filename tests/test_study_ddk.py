"""The DDK study (pipelines/study_ddk.py) end to end at its smoke size with a tiny teacher, its rerun, and the
report's statistics against hand computations (pipelines/study_report.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from crosstok_tiny import save_other_tokenizer_student

from pipelines import study_ddk, study_report

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("kd", "ddk")  # a subset keeps the test short; the arms share one code path (the rest: arm_args below)
SEEDS = (0, 1)


def _study(out: Path, teacher: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, str(ROOT / "pipelines" / "study_ddk.py"), "--size", "smoke", "--teacher", str(teacher),
           "--out", str(out), "--seeds", "0,1", "--arms", ",".join(ARMS), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"study_ddk failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory, teacher_dir) -> Path:
    out = tmp_path_factory.mktemp("study") / "run"
    _study(out, teacher_dir)
    return out


@pytest.mark.slow
def test_every_arm_starts_from_the_one_warm_start_and_trains_on_the_one_dump(study):
    cfgs = {
        (a, s): json.loads((study / "arms" / a / f"seed{s}" / "config.json").read_text()) for a in ARMS for s in SEEDS
    }
    for (_, seed), cfg in cfgs.items():
        assert Path(cfg["dump"]).resolve() == (study / "dump").resolve(), "never the report dump"
        assert Path(cfg["student"]).resolve() == (study / "warmup" / "final").resolve()
        assert cfg["seed"] == seed
    budgets = {(c["max_steps"], c["batch_size"]) for c in cfgs.values()}
    assert len(budgets) == 1, "every arm gets the same token budget"
    assert {a: cfgs[(a, 0)]["kd_weight"] for a in ARMS} == {"kd": 0.2, "ddk": 0.2}
    # Finished runs keep their final model and drop the checkpoint they no longer need.
    assert not any((study / "arms" / a / f"seed{s}" / "checkpoints").exists() for a in ARMS for s in SEEDS)
    assert not (study / "warmup" / "checkpoints").exists() and (study / "warmup" / "final" / "config.json").is_file()
    assert cfgs[("ddk", 0)]["ddk_signal"] == "ppl-ratio"
    # The warm start trained on its own dump, of source files no arm trains on, with a seed no arm uses.
    warm = json.loads((study / "warmup" / "config.json").read_text())
    assert Path(warm["dump"]).resolve() == (study / "warmup_dump").resolve() and warm["seed"] not in SEEDS
    sources = {}
    for side in ("warmup", "arms"):
        lines = (study / "corpus" / side).glob("*.jsonl")
        sources[side] = {json.loads(x)["source"].split("#")[0] for p in lines for x in p.read_text().splitlines()}
    assert sources["warmup"] and sources["arms"] and not sources["warmup"] & sources["arms"]
    report_dump = json.loads((study / "report_dump" / "manifest.json").read_text())
    assert report_dump["complete"]


@pytest.mark.slow
def test_the_report_matches_the_scores(study):
    res = json.loads((study / "report" / "results.json").read_text())
    teacher = json.loads((study / "report_teacher.json").read_text())
    assert set(res["domains"]) == set(teacher) and len(res["domains"]) >= 3
    for arm in ARMS:
        for i, seed in enumerate(SEEDS):
            scores = json.loads((study / "arms" / arm / f"seed{seed}" / "report_scores.json").read_text())
            for d in res["domains"]:
                want = math.exp((sum(scores[d]["ce_sum"]) - sum(teacher[d]["nll_sum"])) / sum(scores[d]["positions"]))
                assert res["table"][arm][d]["values"][i] == pytest.approx(want)
            mean = np.mean([res["table"][arm][d]["values"][i] for d in res["domains"]])
            assert res["table"][arm]["mean"]["values"][i] == pytest.approx(mean)
    v = res["versus"]["ddk"]["mean"]
    assert v["diff"] == pytest.approx(np.mean(v["per_seed"]))
    assert v["se"] == pytest.approx(math.hypot(v["se_boot"], v["se_seed"])) and v["se_boot"] >= 0
    assert "kd" not in res["versus"]
    readme = (study / "report" / "README.md").read_text()
    assert "| DDK |" in readme and "| KD (uniform mix) |" in readme and "Against KD" in readme
    for png in ("ratios.png", "weights.png", "train_ratios.png"):
        assert (study / "report" / png).stat().st_size > 1000
    ddk = res["final_weights"]["ddk"]
    assert sum(ddk.values()) == pytest.approx(1.0) and min(ddk.values()) >= 0.5 / len(ddk) - 1e-9


@pytest.mark.slow
def test_a_rerun_reuses_every_finished_arm(study, teacher_dir):
    before = {p: p.stat().st_mtime_ns for p in study.glob("**/final/*.safetensors")}
    assert len(before) == 1 + len(ARMS) * len(SEEDS)
    proc = _study(study, teacher_dir)
    assert proc.stdout.count("reusing") == 5 + len(ARMS) * len(SEEDS)  # corpus, three dumps, warm start, the arms
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_rerun_with_another_budget_is_refused_before_anything_is_touched(study, teacher_dir):
    assert json.loads((study / "study.json").read_text()) == {"size": "smoke", "regime": "same", "steps": 6}
    before = {p: p.stat().st_mtime_ns for p in study.rglob("*") if p.is_file()}
    argv = ["--size", "smoke", "--teacher", str(teacher_dir), "--out", str(study), "--arms", "kd", "--steps", "3"]
    with pytest.raises(SystemExit, match=r"study\.json records steps = 6 but this run asks for 3.*new --out"):
        study_ddk.main(argv)
    assert {p: p.stat().st_mtime_ns for p in study.rglob("*") if p.is_file()} == before


def test_a_folder_of_the_older_layout_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "dump").mkdir()  # warm-up and arms on one dump: no corpus/arms split
    with pytest.raises(SystemExit, match="older version of this study.*new --out"):
        study_ddk.pin_study(tmp_path, {"size": "quick", "regime": "same", "steps": 24})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump"]


def test_a_budget_study_has_its_own_name_and_results_folder():
    assert study_ddk.study_name("quick") == "study-quick"
    assert study_ddk.study_name("quick", "same", study_ddk.SIZES["quick"]["steps"]) == "study-quick"
    assert study_ddk.study_name("quick", "cross", 96) == "study-quick-cross-steps96"
    assert study_ddk.results_name("quick", "cross") == "study_ddk_quick_cross"
    assert study_ddk.results_name("quick", "same", 96) == "study_ddk_quick_steps96"
    cmd = study_ddk.study_command("quick", "same", 96, ["kd", "ddk"], [0, 1, 2])
    assert cmd == "python pipelines/study_ddk.py --size quick --steps 96 --arms kd,ddk --seeds 0,1,2"
    cross = study_ddk.study_command("quick", "cross", 24, list(study_ddk.CROSS_ARMS), [0])
    assert cross == "python pipelines/study_ddk.py --size quick --regime cross --seeds 0"
    with pytest.raises(SystemExit, match="at least 1 step"):
        study_ddk.run_study(Path("unused"), size="smoke", teacher="t", seeds=[0], arms=["kd"], steps=0)


@pytest.fixture(scope="module")
def cross_study(tmp_path_factory, teacher_dir) -> tuple[Path, Path]:
    """Regime (b) at the smoke size: a pretrained-style student with its own tokenizer, KD and DDK, one seed."""
    root = tmp_path_factory.mktemp("cross_study")
    student = save_other_tokenizer_student(root / "student")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, str(ROOT / "pipelines" / "study_ddk.py"), "--size", "smoke", "--regime", "cross",
           "--teacher", str(teacher_dir), "--student", str(student), "--out", str(root / "run"), "--seeds", "0",
           "--arms", "kd,ddk", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"study_ddk failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return root / "run", student


@pytest.mark.slow
def test_cross_regime_starts_every_arm_from_the_pretrained_student_and_scores_per_byte(cross_study):
    from ddk_offline.distillation.evaluation import evaluate

    study, student = cross_study
    for arm in ("kd", "ddk"):
        cfg = json.loads((study / "arms" / arm / "seed0" / "config.json").read_text())
        assert Path(cfg["student"]).resolve() == student.resolve() and cfg["cross_tokenizer"] == "uld"
        assert Path(cfg["dump"]).resolve() == (study / "dump").resolve()
    assert not (study / "warmup_dump").exists(), "no warm-up: the pretrained student is the start"
    res = json.loads((study / "report" / "results.json").read_text())
    assert res["config"]["regime"] == "cross" and "--regime cross" in (study / "report" / "README.md").read_text()
    # The study's per-sequence scores of the start, summed, equal the library's per-byte evaluation of the same
    # model on the same rows: ratio exp((CE_S - NLL_T) / bytes) over the bytes both tokenisations score.
    (lib,) = evaluate(study / "report_dump", [str(student)], split="train", device="cpu", data_workers=0)
    teacher = json.loads((study / "report_teacher.json").read_text())
    start = json.loads((study / "warmup" / "report_scores.json").read_text())
    mine = study_report.ratios(start, teacher)
    assert {d.domain: d.ratio for d in lib.domains} == pytest.approx({d: float(r) for d, r in mine.items()}, rel=1e-4)
    for d in lib.domains:  # positions are bytes here
        nbytes = sum(start[d.domain]["positions"])
        assert nbytes > 0 and len(start[d.domain]["positions"]) == d.sequences
        assert d.student_bpb == pytest.approx(sum(start[d.domain]["ce_sum"]) / nbytes / math.log(2), rel=1e-4)
        assert d.teacher_bpb == pytest.approx(sum(teacher[d.domain]["nll_sum"]) / nbytes / math.log(2), rel=1e-4)


def test_train_gap_by_hand():
    rows = [
        [{"step": 0, "student_loss": {"a": 2.0, "b": None}, "teacher_loss": {"a": 1.0, "b": 3.0}},
         {"step": 1, "student_loss": {"a": 1.0, "b": 4.0}, "teacher_loss": {"a": 1.0, "b": 3.5}}],
        [{"step": 0, "student_loss": {"a": 3.0}, "teacher_loss": {"a": 1.0}},
         {"step": 2, "student_loss": {"a": 9.0}, "teacher_loss": {"a": 1.0}}],  # past the first 2 steps: left out
    ]  # fmt: skip
    gap = study_report.train_gap(rows, steps=2)
    assert gap == pytest.approx({"a": math.exp((1.0 + 0.0 + 2.0) / 3), "b": math.exp(0.5)})


def test_split_warmup_keeps_each_source_file_on_one_side(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    docs = [
        {"text": "x" * n, "domain": "a", "source": f"f{i // 2}#{i % 2}"} for i, n in enumerate([10, 30, 20, 20, 5, 15])
    ]
    (train / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    study_ddk.split_warmup(train, tmp_path / "w", tmp_path / "r", 0.5)
    sides = [[json.loads(x) for x in (tmp_path / s / "a.jsonl").read_text().splitlines()] for s in ("w", "r")]
    assert sorted(map(json.dumps, sides[0] + sides[1])) == sorted(map(json.dumps, docs)), "nothing lost or doubled"
    files = [{d["source"].split("#")[0] for d in side} for side in sides]
    assert files[0] and files[1] and not files[0] & files[1]
    study_ddk.split_warmup(train, tmp_path / "w2", tmp_path / "r2", 0.5)
    assert (tmp_path / "w2" / "a.jsonl").read_text() == (tmp_path / "w" / "a.jsonl").read_text(), "deterministic"
    (train / "a.jsonl").write_text(json.dumps(docs[0]) + "\n")
    with pytest.raises(SystemExit, match="1 source file"):
        study_ddk.split_warmup(train, tmp_path / "w3", tmp_path / "r3", 0.5)


def test_every_arm_has_the_same_budget_and_its_own_sampler_and_weights():
    cfg, warm = study_ddk.SIZES["smoke"], Path("w")
    args = {name: study_ddk.arm_args(name, cfg, 3, warm) for name in study_ddk.ARMS}

    def flag(a: list[str], name: str) -> str:
        return a[a.index(name) + 1]

    assert {
        (flag(a, "--max-steps"), flag(a, "--lr"), flag(a, "--seed"), flag(a, "--student")) for a in args.values()
    } == {(str(cfg["steps"]), str(cfg["lr"]), "3", "w")}
    assert {n: flag(a, "--kd-weight") for n, a in args.items() if n.startswith("cpt")} == {
        "cpt": "0",
        "cpt-doremi": "0",
    }
    assert flag(args["cpt-doremi"], "--sampler") == "doremi" and flag(args["ddk"], "--ddk-signal") == "ppl-ratio"
    assert flag(args["ddk-no-smoothing"], "--ddk-alpha") == "1.0"
    K = {n: flag(a, "--ddk-interval") for n, a in args.items()}
    assert (K["ddk-k-small"], K["ddk"], K["ddk-k-large"]) == (str(cfg["k_small"]), str(cfg["k"]), str(cfg["k_large"]))


def test_ratios_and_combined_errors_by_hand():
    teacher = {"a": {"nll_sum": [1.0, 2.0]}, "b": {"nll_sum": [3.0, 1.0]}}

    def score(a, b):
        return {"a": {"ce_sum": a, "positions": [2, 2]}, "b": {"ce_sum": b, "positions": [1, 3]}}

    scores = {
        "kd": {0: score([2.0, 3.0], [4.0, 2.0]), 1: score([2.0, 3.0], [4.0, 2.0])},
        "ddk": {0: score([1.0, 3.0], [4.0, 2.0]), 1: score([2.0, 3.0], [3.0, 2.0])},
    }
    s = study_report.summarise(scores, teacher, [0, 1], "kd")
    # kd: a = exp((5 - 3) / 4), b = exp((6 - 4) / 4); ddk seed 0: a = exp((4 - 3) / 4), seed 1: b = exp((5 - 4) / 4).
    assert s["table"]["kd"]["a"]["values"] == pytest.approx([math.exp(0.5)] * 2)
    assert s["table"]["ddk"]["a"]["values"] == pytest.approx([math.exp(0.25), math.exp(0.5)])
    mean0 = (math.exp(0.25) + math.exp(0.5)) / 2 - math.exp(0.5)  # seed 0 minus kd; seed 1 is the same number
    v = s["versus"]["ddk"]["mean"]
    assert v["per_seed"] == pytest.approx([mean0, mean0]) and v["se_seed"] == pytest.approx(0.0)
    assert v["diff"] == pytest.approx(mean0) and v["se"] == pytest.approx(v["se_boot"])
    assert s["versus"]["ddk"]["worst"]["diff"] == pytest.approx(0.0)  # the worst domain is unchanged at exp(0.5)
    assert s["versus"]["ddk"]["beats"] is False
    # The paired CE difference: (sum over seeds of arm - kd) / seeds / positions, per domain.
    assert s["versus"]["ddk"]["paired_ce"]["a"]["mean_diff_nats"] == pytest.approx(-0.5 / 4)


def test_derive_scan_rates_untrained_students_on_the_choices_split(study, teacher_dir, tmp_path):
    """pipelines/derive_scan.py on the study's dump: the teacher itself scores ratio 1 (its stored loss), each spec
    keeps the layers it names, and the report lists every row."""
    from pipelines import derive_scan

    rows = derive_scan.scan(str(study / "dump"), str(teacher_dir), ["layers=1", "drop=1-1"])
    assert [r["spec"] for r in rows] == ["teacher", "layers=1", "drop=1-1"]
    assert rows[0]["mean"] == pytest.approx(1.0, rel=1e-3) and rows[0]["worst"] == pytest.approx(1.0, rel=1e-3)
    assert rows[1]["kept"] == [0] and rows[2]["kept"] == [0]
    for r in rows[1:]:  # an untrained cut of a 2-layer random teacher is not the teacher
        assert r["mean"] != pytest.approx(1.0, rel=1e-3) and r["worst"] >= max(r["ratio"].values()) - 1e-9
    derive_scan.write(rows, tmp_path, "runs/x/dump", str(teacher_dir))
    table = (tmp_path / "derive_scan.md").read_text(encoding="utf-8")
    assert "| drop=1-1 | 1 |" in table and json.loads((tmp_path / "derive_scan.json").read_text())["rows"] == rows


def test_study_returns_recovers_known_slopes(tmp_path):
    """A study folder whose arms gain exactly slope_d nats per unit of share on domain d (plus a constant)."""
    from pipelines import study_returns

    slopes, n = {"a": -0.5, "b": -0.1, "c": 0.05}, 10.0

    def write(arm, seed, share):
        run = tmp_path / "arms" / arm / f"seed{seed}"
        (run / "final").mkdir(parents=True)
        ce = {d: 2.0 + (0.0 if arm == "kd" else slopes[d] * share[d] + 0.02) for d in slopes}
        (run / "report_scores.json").write_text(
            json.dumps({d: {"ce_sum": [ce[d] * n / 2] * 2, "positions": [n / 2] * 2} for d in slopes})
        )
        rows = [{"step": i, "weights": share, "student_loss": {"a": 2.0}, "teacher_loss": {"a": 1.0}} for i in range(3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    uniform = dict.fromkeys(slopes, 1 / 3)
    for seed in (0, 1):
        write("kd", seed, uniform)
        write("ddk", seed, {"a": 0.2, "b": 0.5, "c": 0.3} if seed else {"a": 0.6, "b": 0.1, "c": 0.3})
        write("ddk-val", seed, {"a": 0.1, "b": 0.2, "c": 0.7})
    res = study_returns.returns(tmp_path, "report")
    assert {d: res["slopes"][d]["slope"] for d in slopes} == pytest.approx(slopes, abs=1e-9)
    assert res["steepest_first"] == ["a", "b", "c"] and res["slopes"]["a"]["runs"] == 4
    assert res["shares"]["ddk"] == pytest.approx({"a": 0.4, "b": 0.3, "c": 0.3})
    assert res["train_gap"] == pytest.approx({"a": math.e})
    text = study_returns.markdown(res, tmp_path)
    assert "| a | -0.5000 |" in text and "share: ddk-val" in text


def test_verdict_names_which_difference_is_beyond_two_se():
    def flags(better=False, worse=False):
        return {"better": better, "worse": worse}

    assert study_report._verdict(flags(True), flags(True)) == "**better on both by > 2 SE**"
    assert study_report._verdict(flags(), flags(True)) == "better on the worst domain by > 2 SE"
    assert study_report._verdict(flags(worse=True), flags(True)) == (
        "worse on the mean by > 2 SE; better on the worst domain by > 2 SE"
    )
    assert study_report._verdict(flags(), flags()) == "no difference beyond 2 SE"
