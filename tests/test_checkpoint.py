"""Checkpoints: round trip, weights_only loading, and a crash mid-save leaving the previous one loadable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch

import ddk_offline.distillation.checkpoint as ckpt_mod
from ddk_offline.distillation.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _model(seed: int):
    return tiny.make_model(50, hidden=16, layers=1, heads=2, seed=seed)


def _save(out, step, model):
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    tensors = {"optimizer": opt.state_dict(), "rng": rng_state()["tensors"]}
    return save_checkpoint(out, step, model=model, tensors=tensors, state={"note": f"step {step}", "x": [1.5, None]})


def test_round_trip(tmp_path):
    model = _model(0)
    path = _save(tmp_path, 3, model)
    assert path.name == "step-00000003" and latest_checkpoint(tmp_path) == path
    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.state["x"] == [1.5, None]
    fresh = _model(1)
    ck.load_model(fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    opt = torch.optim.AdamW(fresh.parameters())
    opt.load_state_dict(ck.tensors["optimizer"])
    assert opt.state_dict()["state"][0]["step"] == 1


def test_rng_state_round_trip():
    state = rng_state()
    a = (np.random.rand(), torch.rand(2), __import__("random").random())
    set_rng_state(json.loads(json.dumps(state["json"])), state["tensors"])
    b = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model(0)
    first = _save(tmp_path, 1, model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)  # dies after the weights, before the rest
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 2, model)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert (tmp_path / "checkpoints" / ".tmp-step-00000002").is_dir()  # the half save, never renamed
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    fresh = _model(5)
    ck.load_model(fresh)
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    # the next save cleans up the half-written one and replaces the old checkpoint
    third = _save(tmp_path, 3, model)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    assert latest_checkpoint(tmp_path) == third


def test_stale_latest_pointer_falls_back_to_the_newest_complete(tmp_path):
    model = _model(0)
    _save(tmp_path, 1, model)
    (tmp_path / "checkpoints" / "latest").write_text('{"checkpoint": "step-00000099"}')
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert latest_checkpoint(tmp_path / "nothing") is None
