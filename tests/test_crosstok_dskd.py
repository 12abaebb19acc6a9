"""``--cross-tokenizer dskd`` (issue #16): the loss against a dense reference written from the paper's code, end to
end through the CLI with eval's bits per byte, resume with the projectors, and the refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import tiny
import torch
from conftest import run_cli
from crosstok_tiny import save_other_tokenizer_student

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.crosstok.batch import StudentBatch
from ddk_offline.distillation.crosstok.dskd import DSKD, topk_kl
from ddk_offline.distillation.crosstok.vocab_bytes import VocabBytes
from ddk_offline.distillation.data import Batch
from ddk_offline.distillation.loss import LossSpec
from ddk_offline.distillation.trainer import Trainer

TRAIN = ["--max-steps", "4", "--batch-size", "2", "--log-every", "1", "--device", "cpu", "--lr", "3e-3",
         "--ce-weight", "0.5", "--kd-weight", "0.5", "--temperature", "2", "--kd-mode", "renorm"]  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _vocab(n, eos):
    pieces = tuple(b"x%d" % i for i in range(n))
    return VocabBytes(pieces, "byte-level", frozenset(), frozenset(), eos, None, f"v{n}", frozenset())


# --- the loss against a dense reference ---------------------------------------------------------------------------
Vt, Dt, Vs, K, T = 37, 6, 23, 5, 2.0
EOS_T, EOS_S = 1, 2


def _micro(mode):
    """Two rows: teacher L = 6 (row 0 holds an EOS: two documents), student Ls = 5 with one padded position."""
    g = torch.Generator().manual_seed(1)
    t_ids = torch.tensor([[5, 7, EOS_T, 9, 4, 8], [3, 6, 10, 11, 12, 13]])
    t_labels = torch.cat([t_ids[:, 1:], torch.full((2, 1), -100)], 1)
    full = torch.randn(2, 6, Vt, generator=g) * 3  # the teacher's full logits; the dump keeps the top-k and the lse
    top = full.topk(K, dim=-1)
    lse = torch.logsumexp(full / T, -1) if mode == "tail" else torch.logsumexp(full, -1)
    s_ids = torch.tensor([[4, 6, EOS_S, 8, 9], [3, 5, 7, 9, EOS_S]])
    s_labels = torch.tensor([[6, EOS_S, 8, 9, -100], [5, 7, 9, -100, -100]])  # row 1's last position is padding
    sb = StudentBatch(
        input_ids=s_ids, labels=s_labels, pair_student=torch.zeros(0, dtype=torch.long),
        pair_teacher=torch.zeros(0, dtype=torch.long), scored_student=torch.zeros(2, 5, dtype=torch.bool),
        scored_teacher=torch.zeros(2, 6, dtype=torch.bool), nbytes=torch.zeros(2, dtype=torch.long),
        teacher_hidden=torch.randn(2, 6, Dt, generator=g),
    )  # fmt: skip
    batch = Batch(
        input_ids=t_ids, labels=t_labels, topk_ids=top.indices, topk_logits=top.values, teacher_lse=lse,
        teacher_nll=torch.zeros(2, 6), domain=torch.zeros(2, dtype=torch.long), student=sb,
    )  # fmt: skip
    return batch


def _method(model, with_t2s=True):
    m = DSKD(_vocab(Vt, EOS_T), _vocab(Vs, EOS_S))
    g = torch.Generator().manual_seed(2)
    m.embed, m.head, m.bias, m.softcap = torch.randn(Vt, Dt, generator=g), torch.randn(Vt, Dt, generator=g), None, None
    m.with_t2s = with_t2s
    m.chunk_rows = 3  # several chunks of teacher-space logits
    m.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    return m


def dense_reference(m, model, flat, hidden, batch, mode, with_t2s=True):
    """The reference code's equations, one row and one position at a time, with full teacher-space logits."""
    P, sb = m.projectors, batch.student
    E_s, W_s = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    total = torch.zeros((), dtype=torch.float64)
    z_s = flat.reshape(2, 5, -1)
    labelled = batch.labels >= 0  # the reference reads id 0 at unlabelled positions, inputs and targets alike
    t_x = m.embed[batch.input_ids.masked_fill(~labelled, 0)]
    t_y = m.embed[batch.labels.masked_fill(~labelled, 0)]
    keys_all = torch.cat([t_x, t_y], -1)
    k_std, y_std, h_std = keys_all.std(), t_y.std(), sb.teacher_hidden.std()
    for b in range(2):
        s_doc = [int((sb.input_ids[b, :i] == EOS_S).sum()) for i in range(5)]
        t_doc = [int((batch.input_ids[b, :j] == EOS_T).sum()) for j in range(6)]
        s_ok = [i for i in range(5) if sb.labels[b, i] >= 0]
        t_ok = [j for j in range(6) if batch.labels[b, j] >= 0]
        score = {}
        for i in s_ok:
            q = P.query(torch.cat([E_s[sb.input_ids[b, i]], E_s[sb.labels[b, i]]]))
            for j in t_ok:
                if s_doc[i] == t_doc[j]:
                    score[i, j] = q @ (keys_all[b, j] / k_std) / math.sqrt(2 * Dt)
        for i in s_ok if with_t2s else []:
            js = [j for j in t_ok if (i, j) in score]
            if not js:
                continue
            w = torch.softmax(torch.stack([score[i, j] for j in js]), 0)
            v = torch.stack([P.t2s(sb.teacher_hidden[b, j] / h_std + t_y[b, j] / y_std) for j in js])
            z = (w @ v) @ W_s.T
            y = sb.labels[b, i]
            total = total + torch.logsumexp(z, 0) - z[y]
            if int(z.argmax()) == int(y):
                p = torch.softmax(z.detach() / T, 0)
                total = total + (p * (torch.log(p) - torch.log_softmax(z_s[b, i] / T, 0))).sum()
        for j in t_ok:
            is_ = [i for i in s_ok if (i, j) in score]
            if not is_:
                continue
            w = torch.softmax(torch.stack([score[i, j] for i in is_]), 0)
            z = ((w @ torch.stack([P.s2t(hidden[b, i]) for i in is_])) @ m.head.T).double()
            z = m.softcap * torch.tanh(z / m.softcap) if m.softcap else z
            log_q = torch.log_softmax(z / T, 0)
            ids, tl = batch.topk_ids[b, j], batch.topk_logits[b, j].double()
            if mode == "tail":
                log_p = tl / T - batch.teacher_lse[b, j].double()
                p_tail = 1 - log_p.exp().sum()
                q_tail = 1 - log_q[ids].exp().sum()
                total = total + (log_p.exp() * (log_p - log_q[ids])).sum() + p_tail * (p_tail / q_tail).log()
            else:
                log_p = torch.log_softmax(tl / T, 0)
                total = total + (log_p.exp() * (log_p - log_q[ids])).sum()
    return total


@pytest.mark.parametrize(
    ("mode", "with_t2s", "softcap"),
    [("tail", True, None), ("tail", False, None), ("renorm", True, None), ("renorm", False, None),
     ("tail", False, 3.0), ("renorm", True, 3.0)],  # the soft-capped head takes its own chunked path
)  # fmt: skip
def test_the_loss_and_its_gradients_match_the_dense_reference(mode, with_t2s, softcap):
    model = tiny.make_model(Vs, hidden=8, layers=1, heads=2, max_pos=32)
    m = _method(model, with_t2s)
    m.softcap = softcap
    batch = _micro(mode)
    flat = torch.randn(10, Vs, requires_grad=True)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    spec = LossSpec(alpha=0.5, gamma=0.5, temperature=T, mode=mode)
    kd, value = m.kd(flat, batch, spec, hidden=hidden, model=model)
    params = [flat, hidden, *m.projectors.parameters()]
    got = torch.autograd.grad(kd, params, allow_unused=True, materialize_grads=True)
    ref = 0.5 * dense_reference(m, model, flat, hidden, batch, mode, with_t2s)
    want = torch.autograd.grad(ref, params, allow_unused=True, materialize_grads=True)
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5) and value == pytest.approx(ref.item() / 0.5, rel=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5)  # fp32 against a partly fp64 reference
    fields = m.log_fields()
    assert fields["s2t_kl"] > 0 and (("t2s_ce" in fields) == with_t2s)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("k", [3, 9])
def test_topk_kl_and_its_gradient_match_autograd_on_the_dense_definition(mode, k):
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64) * 2
    top = t.topk(k, dim=1)
    ids = top.indices.clone()
    ids[0, -1] = -1  # a padded slot
    kl, grad = topk_kl(z.detach().float(), ids, top.values.float(), torch.logsumexp(t / T, 1).float(), T, mode)
    log_q = torch.log_softmax(z / T, 1)
    valid = ids >= 0
    tl = top.values.masked_fill(~valid, float("-inf"))
    log_p = tl / T - torch.logsumexp(t / T, 1, keepdim=True) if mode == "tail" else torch.log_softmax(tl / T, 1)
    p = log_p.exp()
    want = (p * (log_p.masked_fill(~valid, 0) - log_q.gather(1, ids.clamp_min(0)))).masked_fill(~valid, 0).sum(1)
    if mode == "tail":
        inside = torch.zeros_like(z, dtype=torch.bool)
        for r in range(4):
            inside[r, ids[r][valid[r]]] = True
        p_tail, q_tail = 1 - p.sum(1), log_q.exp().masked_fill(inside, 0).sum(1)
        want = want + torch.where(p_tail > 1e-12, p_tail * (p_tail / q_tail).log(), 0.0)
    want_grad = torch.autograd.grad(want.sum(), z)[0]
    torch.testing.assert_close(kl.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


# --- through the CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dumps(tmp_path_factory, teacher_dir):
    """A dump with the teacher matrices and hidden states, and a plain one."""
    root = tmp_path_factory.mktemp("dskd")
    corpus = tiny.write_jsonl(tiny.make_corpus(8), root / "corpus.jsonl")
    args = ["--teacher", str(teacher_dir), "--data", str(corpus), "--seq-len", "32", "--top-k", "8",
            "--batch-size", "4", "--val-fraction", "0.25", "-q"]  # fmt: skip
    run_cli("dump-teacher", *args, "--out", str(root / "full"), "--store-teacher-matrices", "--store-hidden-states")
    run_cli("dump-teacher", *args, "--out", str(root / "plain"))
    return root / "full", root / "plain"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_other_tokenizer_student(tmp_path_factory.mktemp("student"))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dskd_trains_resumes_with_its_projectors_and_eval_reports_bits_per_byte(cli, dumps, student, tmp_path):
    full, _ = dumps
    out = tmp_path / "run"
    args = ["distill", "--dump", str(full), "--student", str(student), *TRAIN, "--cross-tokenizer", "dskd"]
    cli(*args, "--out", str(out))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["s2t_kl"] > 0 and r["t2s_ce"] > 0 and 0 <= r["t2s_acc"] <= 1
               for r in rows)  # fmt: skip
    saved = torch.load(out / "checkpoints" / "step-00000004" / "tensors.pt", weights_only=True)
    assert set(saved["cross"]) >= {"query.weight", "s2t.weight", "t2s.weight"}
    # A resume puts the trained projectors back, and their AdamW moments in the optimiser.
    cfg = DistillConfig(dump=str(full), student=str(student), out=str(out), max_steps=6, batch_size=2,
                        device="cpu", cross_tokenizer="dskd", resume=True, extend=True, ce_weight=0.5,
                        kd_weight=0.5, temperature=2.0, lr=3e-3, kd_mode="renorm")  # fmt: skip
    trainer = Trainer(cfg)
    try:
        projectors = trainer.cross.method.projectors
        for name, tensor in projectors.state_dict().items():
            torch.testing.assert_close(tensor, saved["cross"][name], rtol=0, atol=0)
        assert all(trainer.opt.state[p]["step"] == 4 for p in projectors.parameters())
        assert trainer.opt.param_groups[-1]["params"] == list(projectors.parameters())
    finally:
        trainer.close()
    evaluated = json.loads(cli("eval", "--dump", str(full), "--model", str(out / "final"), "--json",
                               "--device", "cpu").stdout)  # fmt: skip
    for d in evaluated[0]["domains"].values():
        assert d["student_bpb"] > 0 and d["bpb_ratio"] == pytest.approx(d["student_bpb"] / d["teacher_bpb"])


@pytest.mark.slow
def test_dskd_refuses_a_dump_without_matrices_and_runs_s2t_only_without_hidden_states(cli, dumps, student, tmp_path):
    _, plain = dumps
    dump = tmp_path / "dump"
    shutil.copytree(plain, dump)
    args = ["distill", "--dump", str(dump), "--student", str(student), *TRAIN, "--cross-tokenizer", "dskd"]
    proc = cli(*args, "--out", str(tmp_path / "refused"), check=False)
    assert proc.returncode != 0 and "dumps add-teacher-matrices" in proc.stderr + proc.stdout
    assert not (tmp_path / "refused").exists()
    cli("dumps", "add-teacher-matrices", str(dump))
    proc = cli(*args, "--out", str(tmp_path / "s2t"), "--max-steps", "2")
    assert "no teacher hidden states" in proc.stdout + proc.stderr and "--store-hidden-states" in proc.stdout
    rows = _metrics(tmp_path / "s2t")
    assert all(r["s2t_kl"] > 0 and "t2s_ce" not in r for r in rows)
