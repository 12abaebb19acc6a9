"""fused_linear_kd_loss against the float64 oracle of ``hidden @ weight.T + bias``: loss, per-row CE / KL and the
gradients of hidden, weight and bias; both modes, T != 1, ignore_index, fp32 and bf16, tiles that split rows and
vocabulary unevenly. The Triton backend runs under TRITON_INTERPRET=1 on CPU (set before ddk_kernels imports triton).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asserts import assert_close  # noqa: E402
from ddk_kernels import fused_kd_loss, fused_linear_kd_loss  # noqa: E402
from kd_oracle import oracle_kd_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, D, V, k): V = 1271 is irregular; tiles below cut rows and vocabulary off their multiples.
SHAPES = [(12, 24, 1271, 8), (7, 16, 300, 32)]
DTYPES = [torch.float32, torch.bfloat16]
# dtype -> (loss rtol, per-row atol, grad rtol, grad atol as a fraction of max |grad|)
TOL = {torch.float32: (1e-5, 2e-5, 1e-4, 1e-5), torch.bfloat16: (2e-2, 5e-2, 2e-2, 2e-2)}
CONFIGS = [(1.0, 1.0, 1.0), (2.0, 0.5, 0.2), (2.0, 0.0, 1.0)]  # (temperature, alpha, gamma)
MODES = ["renorm", "tail"]
TILES = [(5, 128), (4096, 1 << 20), (1, 97)]  # (rows, columns): boundaries inside rows and vocab; one tile; thin


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(N, D, V, k, dtype, temperature, *, ignored=(1,), bias=True):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * (2.0 / D**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    for r in ignored:
        labels[r] = -100
    teacher = torch.randn(N, V, generator=g) * 3.0
    topk_logits, topk_ids = teacher.topk(k, dim=1)
    teacher_lse = torch.logsumexp(teacher / temperature, dim=1)
    topk_ids[0, 2], topk_logits[0, 2] = topk_ids[0, 1], topk_logits[0, 1]  # a duplicate
    topk_ids[N - 1, k - 1] = -1  # a padded slot
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [move(t) for t in (hidden, weight, b, labels, topk_ids, topk_logits, teacher_lse)]


def run(hidden, weight, bias, labels, ids, tlog, tlse, *, grad_out=2.5, **kw):
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, ce, kl = fused_linear_kd_loss(leaves[0], leaves[1], labels, ids, tlog, tlse, bias=leaves[2],
                                        return_per_row=True, **kw)  # fmt: skip
    (loss * grad_out).backward()
    return loss.detach(), ce, kl, [None if t is None else t.grad for t in leaves]


def run_oracle(hidden, weight, bias, labels, ids, tlog, tlse, *, grad_out=2.5, **kw):
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + (0.0 if bias is None else leaves[2])
    loss, ce, kl = oracle_kd_loss(logits, labels.cpu(), ids.cpu(), tlog.cpu(), tlse.cpu(), **kw)
    (loss * grad_out).backward()
    return loss.detach(), ce.detach(), kl.detach(), [None if t is None else t.grad for t in leaves]


def check(got, want, dtype, grads_dtype):
    loss_rtol, row_atol, grad_rtol, grad_atol = TOL[dtype]
    (loss, ce, kl, grads), (loss_o, ce_o, kl_o, grads_o) = got, want
    assert loss.dtype == torch.float32
    assert_close(loss, loss_o, rtol=loss_rtol, atol=0.0, name="loss")
    assert_close(ce, ce_o, rtol=loss_rtol, atol=row_atol, name="ce per row")
    assert_close(kl, kl_o, rtol=loss_rtol, atol=row_atol, name="kl per row")
    for name, g, g_o in zip(("hidden", "weight", "bias"), grads, grads_o, strict=True):
        if g_o is None:
            continue
        assert g.dtype == grads_dtype
        assert_close(g, g_o, rtol=grad_rtol, atol=grad_atol * g_o.abs().max().item(), name=f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature, alpha, gamma", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, D, V, k", SHAPES)
def test_torch_matches_oracle(mode, temperature, alpha, gamma, dtype, N, D, V, k):
    inputs = make_inputs(N, D, V, k, dtype, temperature)
    kw = dict(temperature=temperature, alpha=alpha, gamma=gamma, mode=mode)
    got = run(*inputs, backend="torch", chunk_rows=5, chunk_vocab=128, **kw)
    check(got, run_oracle(*inputs, **kw), dtype, dtype)
    assert (got[3][0][1] == 0).all() and got[1][1] == 0 and got[2][1] == 0  # the ignored row


@pytest.mark.parametrize("rows, cols", TILES)
@pytest.mark.parametrize("mode", MODES)
def test_tile_shapes_agree(rows, cols, mode):
    inputs = make_inputs(12, 24, 1271, 8, torch.float32, 2.0, bias=False)
    kw = dict(temperature=2.0, alpha=0.7, gamma=0.4, mode=mode)
    check(run(*inputs, backend="torch", chunk_rows=rows, chunk_vocab=cols, **kw), run_oracle(*inputs, **kw),
          torch.float32, torch.float32)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_memory_budget_picks_a_tile(mode):
    # A tiny budget forces many tiles; the result must not change.
    inputs = make_inputs(12, 24, 1271, 8, torch.float32, 1.0)
    kw = dict(temperature=1.0, mode=mode)
    check(run(*inputs, backend="torch", memory_budget=1, **kw), run_oracle(*inputs, **kw), torch.float32,
          torch.float32)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_all_ignored_batch_is_zero(backend, mode):
    inputs = make_inputs(4, 16, 300, 8, torch.float32, 1.0, ignored=(0, 1, 2, 3))
    loss, ce, kl, grads = run(*inputs, backend=backend, mode=mode, chunk_rows=3)
    assert loss.item() == 0.0 and (ce == 0).all() and (kl == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("mode", MODES)
def test_confident_rows_stay_exact(mode):
    inputs = make_inputs(4, 16, 1271, 8, torch.float32, 1.0, ignored=(), bias=False)
    hidden, weight, _, labels = inputs[:4]
    labels.copy_(torch.tensor([5, 300, 301, 1200]))
    weight[labels] = 25.0 * hidden / hidden.square().sum(1, keepdim=True)  # z_y = 25: softmax at the label > 0.999
    loss, ce, _, _ = run(*inputs, backend="torch", mode=mode, chunk_rows=3, chunk_vocab=200)
    loss_o, ce_o, _, _ = run_oracle(*inputs, mode=mode)
    assert (ce_o < 1e-3).all()
    assert_close(ce, ce_o, rtol=1e-3, atol=0.0, name="tiny CE of confident rows")


def test_equals_fused_kd_loss_on_logits():
    hidden, weight, bias, labels, ids, tlog, tlse = make_inputs(9, 16, 300, 8, torch.float32, 1.0)
    a = fused_linear_kd_loss(hidden, weight, labels, ids, tlog, tlse, bias=bias, mode="tail", chunk_vocab=64)
    b = fused_kd_loss(torch.addmm(bias, hidden, weight.T), labels, ids, tlog, tlse, mode="tail", backend="torch")
    assert_close(a, b, rtol=1e-6, atol=0.0, name="loss")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_oracle(mode, dtype, monkeypatch):
    import ddk_kernels.kd_linear_triton as kd_linear_triton

    monkeypatch.setattr(kd_linear_triton, "_COLS", 128)  # grad_weight in several vocabulary slices (bf16)
    inputs = make_inputs(7, 16, 300, 8, dtype, 2.0)
    kw = dict(temperature=2.0, alpha=0.5, gamma=0.2, mode=mode)
    check(run(*inputs, backend="triton", chunk_rows=3, **kw), run_oracle(*inputs, **kw), dtype, dtype)


def test_bad_head_is_refused():
    hidden, weight, bias, labels, ids, tlog, tlse = make_inputs(4, 16, 300, 8, torch.float32, 1.0)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_kd_loss(hidden, weight[:, :8], labels, ids, tlog)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_kd_loss(hidden, weight, labels, ids, tlog, bias=bias[:5])
    with pytest.raises(ValueError, match="topk_ids"):
        fused_linear_kd_loss(hidden, weight[:100], labels.clamp(0, 99), ids, tlog)
