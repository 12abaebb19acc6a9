"""Cross-tokenizer distillation end to end through the CLI (issue #16): a byte-level BPE teacher's dump, a student
with a SentencePiece-style byte-fallback tokenizer; every method trains, eval reports bits per byte."""

from __future__ import annotations

import json
import math

import pytest
import tiny
from conftest import run_cli
from crosstok_tiny import save_other_tokenizer_student

TRAIN = ["--max-steps", "6", "--batch-size", "2", "--log-every", "2", "--device", "cpu", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def dump(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("crosstok")
    corpus = tiny.write_jsonl(tiny.make_corpus(8), root / "corpus.jsonl")
    run_cli("dump-teacher", "--teacher", str(teacher_dir), "--data", str(corpus), "--out", str(root / "dump"),
            "--seq-len", "32", "--top-k", "8", "--batch-size", "4", "--val-fraction", "0.25", "-q")  # fmt: skip
    return root / "dump"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_other_tokenizer_student(tmp_path_factory.mktemp("student"))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_without_the_flag_the_refusal_names_it(cli, dump, student, tmp_path):
    proc = cli("distill", "--dump", str(dump), "--out", str(tmp_path / "run"), "--student", str(student), *TRAIN,
               check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "--cross-tokenizer exact-map|uld|dskd" in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact-map", "uld"])
def test_each_method_trains_and_eval_reports_bits_per_byte(cli, dump, student, teacher_dir, tmp_path, method):
    out = tmp_path / method
    proc = cli("distill", "--dump", str(dump), "--out", str(out), "--student", str(student), *TRAIN,
               "--cross-tokenizer", method, "--sampler", "ddk", "--ddk-interval", "2")  # fmt: skip
    assert "of teacher positions paired" in proc.stdout  # the alignment rate, per domain
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert all(math.isfinite(r["loss"]) and r["kl"] > 0 for r in rows)
    if method == "exact-map":
        assert all(0 < r["mapped_mass"] <= 1 for r in rows)
        assert "mapped " in proc.stdout
    # The DDK gaps are per byte over the same bytes: defined for every domain, and the mix moved.
    assert all(g is not None for g in rows[-1]["gap"].values()) and rows[-1]["weights"] != rows[0]["weights"]
    # The final model carries the student's own tokenizer, so eval sees a cross-tokenizer model.
    assert json.loads((out / "final" / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"
    student_eval, teacher_eval = json.loads(
        cli(
            "eval",
            "--dump",
            str(dump),
            "--model",
            str(out / "final"),
            "--model",
            str(teacher_dir),
            "--json",
            "--device",
            "cpu",
        ).stdout  # fmt: skip
    )
    for d in student_eval["domains"].values():
        assert d["student_bpb"] > 0 and d["teacher_bpb"] > 0
        assert d["bpb_ratio"] == pytest.approx(d["student_bpb"] / d["teacher_bpb"])
        assert d["ratio"] == pytest.approx(2 ** (d["student_bpb"] - d["teacher_bpb"]), rel=1e-6)  # per-byte PPL ratio
    for d in teacher_eval["domains"].values():  # the teacher over its own bytes: ratio 1 per byte and per token
        assert d["bpb_ratio"] == pytest.approx(1.0, abs=1e-4) and d["ratio"] == pytest.approx(1.0, abs=1e-4)
    # Same rows, second run: the cache is reused (no second alignment folder).
    assert len(list((dump / "student_rows").iterdir())) == 1
