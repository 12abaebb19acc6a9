"""distill under torchrun's environment: 2 gloo CPU processes (DDP) follow the single-process loss trajectory with
the same global batch, only rank 0 writes, and a 2-process run resumes exactly from its checkpoint."""

from __future__ import annotations

import json

import distworkers
import pytest
import tiny
import torch.multiprocessing as mp
from synthdump import write_synth_dump

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.trainer import distill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tokenizer):
    return write_synth_dump(tmp_path_factory.mktemp("dump"), tokenizer)


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, tokenizer):
    model = tiny.make_model(len(tokenizer), hidden=32, layers=2, heads=2, max_pos=64)
    path = tmp_path_factory.mktemp("student") / "config.json"
    path.write_text(model.config.to_json_string())
    return path


def _config(dump, student_config, out, **kw) -> DistillConfig:
    # DDK updates every 2 steps (all-reduced gap stats), 2 micro-batches per step (DDP no_sync), a checkpoint at 3.
    base = dict(dump=str(dump), out=str(out), student_config=str(student_config), max_steps=6, grad_accum=2,
                log_every=1, lr=3e-3, save_every=3, device="cpu", sampler="ddk", ddk_interval=2,
                ddk_signal="loss-ratio")  # fmt: skip
    return DistillConfig(**{**base, **kw})


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _spawn(config, stop_after=None):
    mp.spawn(distworkers.distill_rank, args=(2, distworkers.free_port(), config, stop_after), nprocs=2, join=True)


@pytest.fixture(scope="module")
def two(dump, student_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    _spawn(_config(dump, student_config, out, batch_size=2))  # 2 ranks x 2 sequences x 2 micro-batches
    return out


def _same_trajectory(a_rows, b_rows, rel):
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows, strict=True):
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=rel), (a["step"], key)
        for key in ("weights", "student_loss", "teacher_loss"):
            assert a[key] == pytest.approx(b[key], rel=rel, nan_ok=True), (a["step"], key)
        assert a["tokens"] == b["tokens"]


def test_two_processes_follow_the_single_process_trajectory(two, dump, student_config, tmp_path):
    one = tmp_path / "one"
    distill(_config(dump, student_config, one, batch_size=4))  # the same global batch in one process
    rows = _rows(two)
    _same_trajectory(_rows(one), rows, rel=1e-4)
    assert rows[-1]["weights"] != rows[0]["weights"]  # the DDK sampler moved, identically on both ranks
    assert (two / "final" / "config.json").is_file() and (two / "summary.json").is_file()
    state = json.loads((two / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["world"] == 2


def test_two_processes_resume_from_a_checkpoint(two, dump, student_config, tmp_path):
    out = tmp_path / "run"
    config = _config(dump, student_config, out, batch_size=2)
    _spawn(config, stop_after=5)  # dies two steps after the step-3 checkpoint
    assert json.loads((out / "checkpoints" / "latest").read_text())["checkpoint"] == "step-00000003"
    config.resume = True
    _spawn(config)
    _same_trajectory(_rows(two), _rows(out), rel=1e-6)


def test_max_tokens_counts_every_process(dump, student_config, tmp_path):
    # --batch-size is per process, so a 2-process step trains twice the tokens of a 1-process one.
    out = tmp_path / "run"
    seq_len = json.loads((dump / "manifest.json").read_text())["seq_len"]
    tokens = 3 * 2 * 2 * 2 * seq_len  # 3 steps of 2 ranks x 2 sequences x 2 micro-batches
    _spawn(_config(dump, student_config, out, batch_size=2, max_steps=None, max_tokens=tokens, save_every=0))
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    assert json.loads((out / "summary.json").read_text())["tokens"] == tokens
