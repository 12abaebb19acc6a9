"""The distillation loop on a synthetic dump: metrics rows, exact resume, CE-only runs, refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import tiny
import torch

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.setup import lr_factor
from ddk_offline.distillation.trainer import distill
from ddk_offline.errors import UserError

DOMAINS = ["code", "numbers", "prose"]


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, tokenizer):
    model = tiny.make_model(len(tokenizer), hidden=32, layers=2, heads=2, max_pos=64)
    path = tmp_path_factory.mktemp("student") / "config.json"
    path.write_text(model.config.to_json_string())
    return path


def _config(dump, student_config, out, **kw) -> DistillConfig:
    base = dict(dump=str(dump), out=str(out), student_config=str(student_config), max_steps=6, batch_size=3,
                log_every=2, lr=3e-3, save_every=0, device="cpu")  # fmt: skip
    return DistillConfig(**{**base, **kw})


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_rows_and_outputs(dump, student_config, tmp_path):
    summary = distill(_config(dump, student_config, tmp_path, sampler="ddk", ddk_interval=2, eval_every=4))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 2, 4, 5]  # step 0 first (before any update), every 2, and the last
    for r in rows:
        assert {"step", "loss", "ce", "kl", "lr", "tokens_per_s", "weights", "student_loss", "teacher_loss"} <= set(r)
        for key in ("weights", "student_loss", "teacher_loss"):
            assert sorted(r[key]) == DOMAINS
        assert r["loss"] == pytest.approx(r["ce"] + 0.2 * r["kl"], rel=1e-5)
    assert rows[0]["weights"] == {d: pytest.approx(1 / 3) for d in DOMAINS}  # DDK: uniform until measured
    assert rows[-1]["weights"] != rows[0]["weights"]  # ... and updated at steps 2 and 4
    seen = [d for d in DOMAINS if rows[0]["student_loss"][d] is not None]
    assert seen and all(rows[0]["teacher_loss"][d] > 0 for d in seen)
    assert summary.steps == 6 and summary.tokens == 6 * 3 * 16
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_steps"] == 6 and saved["ddk_interval"] == 2 and saved["warmup_steps"] == 0
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "final" / "tokenizer.json").is_file()
    assert set(summary.eval["domains"]) == set(DOMAINS) and summary.eval["worst_ratio"] >= summary.eval["mean_ratio"]
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4, 6] and evals[-1]["mean_ratio"] == summary.eval["mean_ratio"]
    assert (tmp_path / "domain_weights.png").is_file() and (tmp_path / "loss_ratio.png").is_file()


class _Crash(Exception):
    pass


@pytest.mark.parametrize("gap_source", ["train", "val"])
def test_resume_reproduces_the_uninterrupted_run(dump, student_config, tmp_path, gap_source):
    kw = dict(max_steps=8, grad_accum=2, sampler="ddk", ddk_interval=3, log_every=5, save_every=4,
              kd_mode="tail", temperature=2.0, gap_source=gap_source, eval_max_sequences=2)  # fmt: skip
    straight = distill(_config(dump, student_config, tmp_path / "a", **kw))

    def crash_after_4(step, total):
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):
        distill(_config(dump, student_config, tmp_path / "b", **kw), progress=crash_after_4)
    resumed = distill(_config(dump, student_config, tmp_path / "b", resume=True, **kw))
    timing = {"tokens_per_s"}
    a = [{k: v for k, v in r.items() if k not in timing} for r in _rows(tmp_path / "a")]
    b = [{k: v for k, v in r.items() if k not in timing} for r in _rows(tmp_path / "b")]
    assert [r["step"] for r in a] == [0, 5, 7]
    assert a == b  # losses, per-domain losses, weights, lr, grad norms: exactly equal
    assert straight.weights == resumed.weights
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / d / "final" / "model.safetensors") for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kd_weight_zero_trains_ce_only(dump, student_config, tmp_path):
    distill(_config(dump, student_config, tmp_path, kd_weight=0.0, sampler="uniform", max_steps=3))
    rows = _rows(tmp_path)
    assert all(r["kl"] is None for r in rows) and all(r["loss"] == pytest.approx(r["ce"]) for r in rows)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"student": "somewhere"}, "exactly one student source"),
        ({"student_config": None}, "exactly one student source"),
        ({"kd_mode": "tail", "temperature": 3.0}, "re-dump with --extra-temperatures 3"),
        ({"max_steps": 5, "max_tokens": 100}, "not both"),
        ({"sampler": "fixed:code=1"}, "missing"),
        ({"gap_source": "held-out"}, "--gap-source"),
        ({"gap_source": "val", "eval_max_sequences": 0}, "--eval-max-sequences must be >= 1"),
    ],
)
def test_refusals(dump, student_config, tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        distill(replace(_config(dump, student_config, tmp_path), **change))


def test_vocab_mismatch_is_refused(dump, tmp_path):
    path = tmp_path / "small.json"
    path.write_text(tiny.make_model(100, hidden=16, layers=1, heads=2).config.to_json_string())
    with pytest.raises(UserError, match="vocabulary does not match"):
        distill(_config(dump, path, tmp_path / "out"))


def test_an_existing_run_is_not_overwritten(dump, student_config, tmp_path):
    distill(_config(dump, student_config, tmp_path, max_steps=1))
    with pytest.raises(UserError, match="pass --resume"):
        distill(_config(dump, student_config, tmp_path, max_steps=1))
    with pytest.raises(UserError, match="different settings"):
        distill(_config(dump, student_config, tmp_path, max_steps=1, lr=1e-3, resume=True))


def test_lr_schedule():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25) and lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0) and lr_factor(19, 4, 20) == pytest.approx(0.1)
    assert lr_factor(0, 0, 1) == pytest.approx(1.0)


def test_grad_accumulation_equals_one_big_batch(dump, student_config, tmp_path):
    """B = 4 in one micro-batch and B = 2 x 2 micro-batches draw the same sequences and take the same steps."""
    kw = dict(max_steps=4, log_every=1, sampler="uniform", kd_mode="tail")
    distill(_config(dump, student_config, tmp_path / "one", batch_size=4, **kw))
    distill(_config(dump, student_config, tmp_path / "two", batch_size=2, grad_accum=2, **kw))
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_config_resolution_defaults():
    base = DistillConfig(dump="d", out="o", student="s", batch_size=4, grad_accum=2)
    r = base.resolve(seq_len=128, temperatures=[1.0])
    assert (r.max_steps, r.ddk_interval, r.warmup_steps, r.save_every) == (1000, 50, 50, 100)
    r = replace(base, max_tokens=128 * 8 * 10 + 1).resolve(seq_len=128, temperatures=[1.0])
    assert (r.max_steps, r.max_tokens, r.ddk_interval, r.warmup_steps) == (11, None, 1, 0)  # tokens round up
    r = replace(base, max_tokens=128 * 8 * 10 * 2).resolve(seq_len=128, temperatures=[1.0], world=2)
    assert r.max_steps == 10  # --batch-size is per process: a step of 2 processes trains 2 x 128 x 8 tokens
    r = replace(base, kd_mode="tail", temperature=2.0).resolve(seq_len=128, temperatures=[1.0, 2.0])
    assert r.temperature == 2.0  # tail at a dumped T is fine
    r = replace(base, kd_mode="tail", temperature=3.0, kd_weight=0.0).resolve(seq_len=128, temperatures=[1.0])
    assert r.kd_weight == 0.0  # no KL, so no lse needed
