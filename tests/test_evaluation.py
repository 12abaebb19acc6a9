"""Evaluation numbers against hand-computed values, and plots (including the missing-matplotlib path)."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import tiny
import torch
import torch.nn.functional as F
from synthdump import write_synth_dump

from ddk_offline.distillation.crosstok.vocab_bytes import vocab_bytes
from ddk_offline.distillation.evaluation import evaluate_model, summarise
from ddk_offline.distillation.plots import write_plots
from ddk_offline.format.reader import open_dump


def test_summarise_by_hand():
    # Rows (evaluation.SUM_ROWS): ce, nll, positions, ce over byte targets, nll over them, bytes, teacher positions.
    sums = np.array([[20.0, 0.0], [10.0, 0.0], [10.0, 0.0], [18.0, 0.0], [9.0, 0.0], [30.0, 0.0], [10.0, 0.0]])
    r = summarise("m", ["a", "b"], sums, np.array([2, 0]), "val")
    a, b = r.domains
    assert a.loss == 2.0 and a.teacher_loss == 1.0 and a.ratio == pytest.approx(math.e) and a.loss_ratio == 2.0
    assert a.ppl == pytest.approx(math.exp(2)) and b.positions == 0 and math.isnan(b.loss)
    assert a.student_bpb == pytest.approx(18 / 30 / math.log(2)) and a.teacher_bpb == pytest.approx(
        9 / 30 / math.log(2)
    )
    assert a.bpb_ratio == pytest.approx(2.0) and math.isnan(b.student_bpb)
    d = r.to_dict()
    assert d["mean_ratio"] == pytest.approx(math.e) and d["worst_domain"] == "a"  # empty domains are left out
    # A model with another tokenizer: its ratio is per byte over the same bytes; the teacher's loss is per its token.
    sums[6, 0] = 5.0
    x = summarise("m", ["a", "b"], sums, np.array([2, 0]), "val", cross=True).domains[0]
    assert x.ratio == pytest.approx(math.exp((18 - 9) / 30)) and x.loss_ratio == pytest.approx(2.0)
    assert x.teacher_loss == 2.0 and x.loss == 2.0


def test_evaluate_model_matches_a_direct_computation(tmp_path):
    tok = tiny.train_tokenizer(128)
    reader = open_dump(write_synth_dump(tmp_path, tok))
    model = tiny.make_model(len(tok), hidden=16, layers=1, heads=2)
    result = evaluate_model(model, reader, batch_size=3, max_sequences=3)
    for d in result.domains:
        seqs = list(reader.sequences(d.domain, "val"))[:3]
        ids = torch.tensor(np.stack([s["input_ids"] for s in seqs]))
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
        nll = float(np.mean(np.concatenate([s["teacher_nll"][:-1] for s in seqs]).astype(np.float64)))
        assert d.sequences == 3 and d.positions == 3 * (reader.seq_len - 1)
        assert d.loss == pytest.approx(ce, rel=1e-5) and d.teacher_loss == pytest.approx(nll, rel=1e-6)
        assert d.ratio == pytest.approx(math.exp(ce - nll), rel=1e-4)
        # Bits per byte: the same positions, counting only targets that are bytes (EOS is not), by their length.
        pieces = vocab_bytes(tok).pieces
        targets = ids[:, 1:].reshape(-1)
        nbytes = torch.tensor([len(pieces[t]) for t in targets.tolist()], dtype=torch.float64)
        ce_rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none").double()
        nll_rows = torch.tensor(np.concatenate([s["teacher_nll"][:-1] for s in seqs]), dtype=torch.float64)
        has = nbytes > 0
        want_s = float(ce_rows[has].sum() / nbytes.sum()) / math.log(2)
        want_t = float(nll_rows[has].sum() / nbytes.sum()) / math.log(2)
        assert d.student_bpb == pytest.approx(want_s, rel=1e-5) and d.teacher_bpb == pytest.approx(want_t, rel=1e-5)


def _metrics(path):
    rows = [
        {"step": s, "weights": {"a": w, "b": 1 - w}, "student_loss": {"a": 3.0 - s / 10, "b": None},
         "teacher_loss": {"a": 2.0, "b": 2.5}}
        for s, w in ((0, 0.5), (5, 0.6), (10, 0.7))
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plots_are_written(tmp_path):
    written = write_plots(_metrics(tmp_path / "metrics.jsonl"), tmp_path)
    assert sorted(p.name for p in written) == ["domain_weights.png", "loss_ratio.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_plots(_metrics(tmp_path / "metrics.jsonl"), tmp_path) == []
    assert "matplotlib is not installed" in caplog.text
