"""The one-command demo (pipelines/demo.sh) end to end at its `smoke` size with a tiny teacher, and its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("ddk", "uniform", "ce-only")


def _demo(out: Path, teacher: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    # The console script of this interpreter's environment first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = ["bash", str(ROOT / "pipelines" / "demo.sh"), "--size", "smoke", "--teacher", str(teacher),
           "--out", str(out), "--device", "cpu", "--no-setup", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"demo.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, teacher_dir) -> tuple[Path, Path, subprocess.CompletedProcess]:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    out = tmp_path_factory.mktemp("demo") / "run"
    results = out.parent / "results"
    return out, results, _demo(out, teacher_dir, "--results", str(results))


@pytest.mark.slow
def test_demo_runs_every_stage_from_one_dump(demo_run):
    out, _, _ = demo_run
    manifest = json.loads((out / "dump" / "manifest.json").read_text())
    assert manifest["complete"]
    evals = json.loads((out / "eval.json").read_text())
    assert [Path(e["model"]).parent.name for e in evals] == list(STUDENTS)
    for name in STUDENTS:
        run = out / "students" / name
        cfg = json.loads((run / "config.json").read_text())
        assert Path(cfg["dump"]).resolve() == (out / "dump").resolve(), "every student trains from the one dump"
        assert (run / "final" / "config.json").is_file()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        # One row per step (the smoke size logs every step); row n is step n's loss, before its update.
        assert [r["step"] for r in rows] == list(range(cfg["max_steps"]))
    kd = {name: json.loads((out / "students" / name / "config.json").read_text())["kd_weight"] for name in STUDENTS}
    assert kd == {"ddk": 0.2, "uniform": 0.2, "ce-only": 0.0}


@pytest.mark.slow
def test_demo_report_matches_the_evaluation(demo_run):
    out, results, _ = demo_run
    report = json.loads((out / "report" / "results.json").read_text())
    evals = {Path(e["model"]).parent.name: e for e in json.loads((out / "eval.json").read_text())}
    for name in STUDENTS:
        assert report["overall"][name]["mean_ratio"] == pytest.approx(evals[name]["mean_ratio"])
        assert report["overall"][name]["worst_domain"] == evals[name]["worst_domain"]
        for domain, row in report["per_domain"].items():
            assert row[name] == pytest.approx(evals[name]["domains"][domain]["ratio"])
    v = report["verdict"]
    d_mean, d_worst = v["ddk_vs_uniform_mean_ratio"], v["ddk_vs_uniform_worst_ratio"]
    assert d_mean == pytest.approx(evals["ddk"]["mean_ratio"] - evals["uniform"]["mean_ratio"])
    assert v["ddk_beats_uniform"] == (d_mean < 0 and d_worst < 0)
    # DDK's weights: a distribution at every update, each domain above the (1 - alpha) / N floor.
    n = len(report["domains"])
    assert len(report["ddk_weights"]) >= 2, "the smoke run makes several sampler updates"
    for w in report["ddk_weights"]:
        shares = [w[d] for d in report["domains"]]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6)
        assert min(shares) >= 0.5 / n - 1e-9
    readme = (out / "report" / "README.md").read_text()
    for domain in report["domains"]:
        assert f"| {domain} |" in readme
    assert "DDK vs uniform KD" in readme and "DDK vs CE only" in readme
    copied = results / "demo_smoke"
    assert (copied / "README.md").read_text() == readme
    assert json.loads((copied / "results.json").read_text()) == report


@pytest.mark.slow
def test_demo_rerun_reuses_finished_work(demo_run, teacher_dir):
    out, _, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in (out / "students").glob("*/final/*.safetensors")}
    assert before
    proc = _demo(out, teacher_dir)
    assert proc.stdout.count("reusing") >= 1 + len(STUDENTS)  # corpus + three students
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_paired_differences_match_the_evaluation(demo_run):
    from pipelines.demo_paired import paired, render

    out, _, _ = demo_run
    result = paired(out)
    evals = {Path(e["model"]).parent.name: e for e in json.loads((out / "eval.json").read_text())}
    for domain, row in result.items():
        for other in ("uniform", "ce-only"):
            got = row[other]
            # The paired mean is the difference of the two students' mean CE on the same positions.
            want = evals["ddk"]["domains"][domain]["loss"] - evals[other]["domains"][domain]["loss"]
            assert got["mean_diff_nats"] == pytest.approx(want, abs=1e-4)
            assert got["positions"] == evals["ddk"]["domains"][domain]["positions"]
            assert got["bootstrap_se_nats"] >= 0
    assert all(f"| {d} |" in render(result) for d in result)
