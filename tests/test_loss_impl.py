"""``--loss-impl``: the fused-linear loss (no [N, V] logits) trains as the logits path does, and is chosen or refused
for the right students."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.data import IGNORE_INDEX, Batch
from ddk_offline.distillation.head import choose_loss_impl, linear_head
from ddk_offline.distillation.loss import FusedLinearLoss, LossSpec, fused_linear_step, loss_step
from ddk_offline.distillation.trainer import distill
from ddk_offline.errors import UserError

V = 96


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, tokenizer):
    model = tiny.make_model(len(tokenizer), hidden=32, layers=2, heads=2, max_pos=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("student") / "config.json"
    path.write_text(model.config.to_json_string())
    return path


def _curve(dump, student_config, out, impl, **kw):
    cfg = DistillConfig(dump=str(dump), out=str(out), student_config=str(student_config), max_steps=20, batch_size=3,
                        log_every=1, lr=3e-3, save_every=0, device="cpu", loss_impl=impl, **kw)  # fmt: skip
    said = []
    distill(cfg, say=said.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, said


@pytest.mark.parametrize("kw", [dict(kd_mode="tail", temperature=2.0), dict(kd_weight=0.0)], ids=["tail-T2", "ce-only"])
def test_twenty_steps_match_the_logits_path(dump, student_config, tmp_path, kw):
    fused, said = _curve(dump, student_config, tmp_path / "fused", "auto", **kw)
    logits, _ = _curve(dump, student_config, tmp_path / "logits", "logits", **kw)
    assert any("fused-linear" in line for line in said)  # auto chose it: a tied Llama head is a plain Linear
    assert [r["step"] for r in fused] == list(range(20))
    for a, b in zip(fused, logits, strict=True):
        for key in ("loss", "ce", "kl"):
            if b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), (a["step"], key)
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-3)


def _batch(B=2, L=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    t = torch.randn(B, L, V, generator=g) * 3
    tl, ti = t.topk(k, dim=-1)
    return Batch(ids, labels, ti, tl, torch.logsumexp(t, -1), torch.rand(B, L, generator=g), torch.zeros(B).long())


def _with_bias_head():
    model = tiny.make_model(V, hidden=16, layers=1, heads=2, max_pos=32)
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(16, V, bias=True)
    return model.train()


@pytest.mark.parametrize("mode", ["renorm", "tail"])
def test_one_step_gradients_equal_with_a_bias(mode):
    spec = LossSpec(alpha=1.0, gamma=0.5, temperature=1.0, mode=mode)
    batch = _batch()
    n = int((batch.labels != IGNORE_INDEX).sum())
    a, b = _with_bias_head(), _with_bias_head()
    found = linear_head(a)
    assert isinstance(found, tuple) and found[1].bias is not None
    ra = fused_linear_step(FusedLinearLoss(a, *found), batch, spec, n, n)
    rb = loss_step(b, batch, spec, n, n)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["kl"] == pytest.approx(rb["kl"], rel=1e-5)
    torch.testing.assert_close(ra["row_ce"], rb["row_ce"], rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


class _ScaledHead(torch.nn.Linear):
    pass


def test_soft_capping_and_custom_heads_fall_back_or_refuse():
    capped = tiny.make_model(V, hidden=16, layers=1, heads=2, max_pos=32)
    capped.config.final_logit_softcapping = 30.0
    custom = tiny.make_model(V, hidden=16, layers=1, heads=2, max_pos=32)
    custom.lm_head = _ScaledHead(16, V, bias=False)
    for model, why in ((capped, "final_logit_softcapping"), (custom, "_ScaledHead")):
        said = []
        assert choose_loss_impl("auto", model, cross=False, say=said.append) is None
        assert why in said[0] and "logits path" in said[0]
        with pytest.raises(UserError, match="--loss-impl logits"):
            choose_loss_impl("fused-linear", model, cross=False, say=said.append)
    plain = tiny.make_model(V, hidden=16, layers=1, heads=2, max_pos=32)
    assert choose_loss_impl("logits", plain, cross=False, say=print) is None
    assert choose_loss_impl("auto", plain, cross=True, say=print) is None  # cross-tokenizer runs score logits
    with pytest.raises(UserError, match="cross-tokenizer"):
        choose_loss_impl("fused-linear", plain, cross=True, say=print)


def test_a_transform_after_the_head_is_caught_by_the_probe():
    model = tiny.make_model(V, hidden=16, layers=1, heads=2, max_pos=32)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    assert "differ" in linear_head(model)


def test_the_option_is_validated():
    with pytest.raises(UserError, match="--loss-impl"):
        DistillConfig(dump="d", out="o", student="s", loss_impl="fast").resolve(seq_len=16, temperatures=[1.0])
