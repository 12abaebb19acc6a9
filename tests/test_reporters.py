"""--report-to (issue #21): TensorBoard event files read back, Weights & Biases offline when installed, refusals."""

from __future__ import annotations

import importlib.util

import pytest
import tiny
from synthdump import write_synth_dump

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.reporters import parse_report_to
from ddk_offline.distillation.trainer import distill
from ddk_offline.errors import UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    tokenizer = tiny.train_tokenizer(128)
    student = tiny.write_student_config(root / "student.json", len(tokenizer))
    return root, write_synth_dump(root / "dump", tokenizer), student


def _run(setup, out, report_to):
    root, dump, student = setup
    return distill(DistillConfig(dump=str(dump), out=str(root / out), student_config=str(student), max_steps=4,
                                 batch_size=2, log_every=1, save_every=2, ddk_interval=2, lr=3e-3, device="cpu",
                                 data_workers=0, report_to=report_to))  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_every_series_and_the_config(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(setup, "tb", "tensorboard")
    acc = EventAccumulator(str(setup[0] / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kl", "train/lr", "train/tokens_per_s"} <= tags
    for domain in ("code", "numbers", "prose"):
        assert {f"weights/{domain}", f"student_loss/{domain}", f"teacher_loss/{domain}", f"ratio/{domain}",
                f"val_ratio/{domain}"} <= tags  # fmt: skip
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
    assert any("config" in tag for tag in acc.Tags()["tensors"])  # the resolved config, as text


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_files(setup, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(setup, "wb", "wandb")
    runs = list((setup[0] / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_none_writes_no_logger_files(setup):
    _run(setup, "quiet", "none")
    assert not (setup[0] / "quiet" / "tensorboard").exists() and not (setup[0] / "quiet" / "wandb").exists()


@pytest.mark.parametrize(
    "spec, message",
    [("tensorbord", "unknown logger 'tensorbord'"), ("auto,wandb", "'auto' and 'none' stand alone")],
)
def test_bad_report_to_is_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_report_to(spec)


def test_a_logger_that_is_not_installed_is_refused_before_the_run(setup, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="--report-to wandb: the package is not installed; pip install wandb"):
        _run(setup, "nowandb", "wandb")
    assert not (setup[0] / "nowandb").exists()
