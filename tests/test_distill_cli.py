"""End to end through the real CLI: dump-teacher -> distill (every sampler, and CE only) -> eval; user errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tiny
from conftest import run_cli

from ddk_offline.distillation.config import DistillConfig

DOMAINS = ["code", "numbers", "prose"]
TRAIN = ["--max-steps", "20", "--batch-size", "2", "--log-every", "5", "--device", "cpu", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def e2e_dump(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("e2e")
    corpus = tiny.write_jsonl(tiny.make_corpus(12), root / "corpus.jsonl")
    run_cli("dump-teacher", "--teacher", str(teacher_dir), "--data", str(corpus), "--out", str(root / "dump"),
            "--seq-len", "32", "--top-k", "8", "--batch-size", "4", "--val-fraction", "0.2", "--shard-tokens", "256",
            "--extra-temperatures", "2.0", "-q")  # fmt: skip
    return root / "dump"


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dump_distill_eval_via_cli(cli, e2e_dump, teacher_dir, tmp_path):
    out = tmp_path / "run"
    proc = cli("distill", "--dump", str(e2e_dump), "--out", str(out), "--derive-from-teacher", "layers=1", *TRAIN,
               "--sampler", "ddk", "--ddk-interval", "5", "--ddk-signal", "loss-ratio")  # fmt: skip
    assert "ppl ratio" in proc.stdout and "final model" in proc.stdout  # the summary table
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 19]
    # A periodic line per logged row in non-terminal output (a log file, Slurm), and what the long phases are.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1]) for line in lines] == [1, 6, 11, 16, 20]
    assert all(" | kl " in line and " tok/s | weights code=" in line for line in lines)
    assert "loading the dump" in proc.stdout and "evaluating the final model on the val split" in proc.stdout

    # --resume of the finished run: says so and changes nothing.
    def stamps():  # every file but the lock, whose content is the pid of the run holding it
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    before = stamps()
    again = cli("distill", "--dump", str(e2e_dump), "--out", str(out), "--derive-from-teacher", "layers=1", *TRAIN,
                "--sampler", "ddk", "--ddk-interval", "5", "--ddk-signal", "loss-ratio", "--resume")  # fmt: skip
    assert "is complete (20 of 20 steps); nothing to do" in again.stdout
    assert stamps() == before
    assert all(sorted(r["weights"]) == DOMAINS for r in rows)
    assert rows[-1]["weights"] != rows[0]["weights"]  # DDK moved the mix
    assert rows[-1]["ce"] < rows[0]["ce"]  # it learns

    result = json.loads(cli("eval", "--dump", str(e2e_dump), "--model", str(out / "final"), "--model",
                            str(teacher_dir), "--json", "--device", "cpu").stdout)  # fmt: skip
    student, teacher = result  # one object per --model, in order
    # (the random-init tiny teacher is a weak LM: a student trained on the data may beat it, ratio < 1)
    assert sorted(student["domains"]) == DOMAINS and student["worst_ratio"] >= student["mean_ratio"] > 0
    # The teacher evaluated now reproduces its stored loss on the same positions.
    for d in teacher["domains"].values():
        assert d["ratio"] == pytest.approx(1.0, abs=1e-4) and d["positions"] > 0
    table = cli("eval", "--dump", str(e2e_dump), "--model", str(out / "final"), "--device", "cpu").stdout
    assert "worst" in table and "prose" in table
    proc = cli("eval", "--dump", str(e2e_dump), "--model", str(out / "final"), "--model", str(teacher_dir),
               "--device", "cpu")  # fmt: skip
    both = proc.stdout
    assert "[1/2] loading" in proc.stderr and "[2/2] evaluating on the val split" in proc.stderr  # what it is doing
    side = both[both.index("ppl ratio vs the teacher") :]  # one domains x models table after the per-model ones
    assert "[1]" in side and "[2]" in side and "worst" in side and "1.000" in side
    one = json.loads(cli("eval", "--dump", str(e2e_dump), "--model", str(out / "final"), "--json", "--device", "cpu",
                         "--max-sequences", "1").stdout)  # fmt: skip
    assert isinstance(one, list) and len(one) == 1 and sorted(one[0]["domains"]) == DOMAINS  # same shape for one model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = tok("def alpha(x, y):", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"sampler": "uniform", "kd_mode": "tail", "temperature": 2.0},
        {"sampler": "proportional", "gap_source": "val", "ddk_interval": 10},
        {"sampler": "fixed:code=0.6,numbers=0.2,prose=0.2", "draw": "sample"},
        {"sampler": "uniform", "kd_weight": 0.0},
    ],
    ids=["uniform-tail-T2", "proportional-val", "fixed", "ce-only"],
)
def test_dump_distill_eval_in_process(e2e_dump, tmp_path, extra):
    """The other samplers and the CE-only baseline, on the same dump, through the library (no process start-up)."""
    from ddk_offline.distillation.evaluation import evaluate
    from ddk_offline.distillation.trainer import distill

    config = DistillConfig(dump=str(e2e_dump), out=str(tmp_path), derive_from_teacher="layers=1", max_steps=20,
                           batch_size=2, log_every=5, device="cpu", lr=3e-3, **extra)  # fmt: skip
    summary = distill(config)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 19] and rows[-1]["ce"] < rows[0]["ce"]
    if extra["sampler"].startswith("fixed"):
        assert rows[-1]["weights"]["code"] == pytest.approx(0.6)
    if extra["sampler"] == "proportional":
        assert rows[0]["weights"] == rows[-1]["weights"] != {d: pytest.approx(1 / 3) for d in DOMAINS}
    if extra.get("kd_weight") == 0:
        assert all(r["kl"] is None for r in rows)
    (result,) = evaluate(e2e_dump, [summary.final_model], device="cpu")
    assert result.to_dict()["domains"].keys() == set(DOMAINS)
    # the saved model, reloaded, scores what the run's final evaluation reported
    assert result.mean_ratio == pytest.approx(summary.eval["mean_ratio"], rel=1e-5)
    assert result.worst.domain == summary.eval["worst_domain"]


def test_user_errors_exit_2(cli, e2e_dump, teacher_dir, tmp_path):
    base = ["distill", "--dump", str(e2e_dump), "--out", str(tmp_path / "o"), *TRAIN, "-q"]
    cases = [
        (["--student", str(teacher_dir), "--derive-from-teacher", "layers=1"], "exactly one student source"),
        (["--derive-from-teacher", "layers=1", "--kd-mode", "tail", "--temperature", "3"], "--extra-temperatures 3"),
    ]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(tiny.make_model(100, hidden=16, layers=1, heads=2).config.to_json_string())
    cases.append((["--student-config", str(wrong)], "vocabulary does not match"))
    for args, match in cases:
        proc = cli(*base, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert match in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    proc = cli("eval", "--dump", str(tmp_path), "--model", str(teacher_dir), check=False)
    assert proc.returncode == 2 and "no manifest" in proc.stderr
    proc = cli("eval", "--dump", str(e2e_dump), "--model", str(teacher_dir), "--max-sequences", "0", check=False)
    assert proc.returncode == 2 and "--max-sequences must be >= 1" in proc.stderr


def test_cli_defaults_match_distill_config():
    import typer

    from ddk_offline.commands import distill as distill_cmd

    app = typer.Typer()
    distill_cmd.register(app)
    params = {p.name: p.default for p in typer.main.get_command(app).params}
    for f in dataclasses.fields(DistillConfig):
        if f.default is not dataclasses.MISSING:
            assert params[f.name] == f.default, f.name


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(cli, e2e_dump, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    args = ["--dump", str(e2e_dump), "--derive-from-teacher", "layers=1", "--max-steps", "40", "--batch-size", "2",
            "--log-every", "3", "--save-every", "2", "--ddk-interval", "5", "--device", "cpu", "-q"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ddk_offline", "distill", *args, "--out", str(killed)], env=env)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # land somewhere in the middle of the run (possibly mid-save)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    cli("distill", *args, "--out", str(killed), "--resume")
    cli("distill", *args, "--out", str(tmp_path / "straight"))

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    assert rows(killed) == rows(tmp_path / "straight")
    assert [r["step"] for r in rows(killed)] == list(range(0, 40, 3))  # 39 is both a multiple of 3 and the last
