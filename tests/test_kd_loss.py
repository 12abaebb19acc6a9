"""fused_kd_loss against the float64 oracle: both backends, both modes, fp32/bf16, forward and gradients.

The Triton backend runs compiled on a GPU and under TRITON_INTERPRET=1 on CPU (set below, before
ddk_kernels imports triton; the import is lazy, so other test modules are unaffected).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asserts import assert_close  # noqa: E402
from ddk_kernels import fused_kd_loss, fused_kd_loss_per_row  # noqa: E402
from ddk_kernels.reference import eager_kd_loss  # noqa: E402
from kd_oracle import oracle_kd_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
# (N, V, k): V = 1271 is irregular (not a multiple of any block); the second shape has k > V / 20.
SHAPES = [(12, 1271, 8), (6, 300, 32)]
DTYPES = [torch.float32, torch.bfloat16]
# dtype -> (loss rtol, per-row atol, grad rtol, grad atol as a fraction of max |grad|)
TOL = {torch.float32: (1e-5, 1e-5, 1e-4, 1e-5), torch.bfloat16: (1e-2, 1e-2, 1e-2, 1e-2)}
# (temperature, alpha, gamma)
CONFIGS = [(1.0, 1.0, 1.0), (2.0, 0.5, 0.2), (2.0, 0.0, 1.0), (1.0, 1.0, 0.0)]
MODES = ["renorm", "tail"]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # Several vocabulary blocks per row even at V = 300, so the cross-block merge is exercised.
    import ddk_kernels.kd_triton as kd_triton

    monkeypatch.setattr(kd_triton, "MAX_BLOCK_V", 128)
    monkeypatch.setenv("DDK_KD_AUTOTUNE", "0")  # on a GPU the tuner would choose its own (larger) blocks


def make_inputs(N, V, k, dtype, temperature, *, seed=0, ignored=(1,), scale=3.0):
    """Random student logits and a consistent teacher (top-k of a full random row, its lse at T)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    for r in ignored:
        labels[r] = -100
    teacher = torch.randn(N, V, generator=g) * scale
    topk_logits, topk_ids = teacher.topk(k, dim=1)
    teacher_lse = torch.logsumexp(teacher / temperature, dim=1)
    # legal but awkward input: a duplicated id and a padded slot
    topk_ids[0, 2] = topk_ids[0, 1]
    topk_logits[0, 2] = topk_logits[0, 1]
    topk_ids[N - 1, k - 1] = -1
    return [t.to(DEVICE) for t in (logits, labels, topk_ids, topk_logits, teacher_lse)]


def run(backend, logits, labels, ids, tlog, tlse, *, grad_out=2.5, **kw):
    x = logits.clone().requires_grad_(True)
    loss, ce, kl = fused_kd_loss(x, labels, ids, tlog, tlse, backend=backend, return_per_row=True, **kw)
    (loss * grad_out).backward()
    return loss.detach(), ce, kl, x.grad


def run_oracle(logits, labels, ids, tlog, tlse, *, grad_out=2.5, **kw):
    x = logits.detach().double().cpu().requires_grad_(True)
    loss, ce, kl = oracle_kd_loss(x, labels.cpu(), ids.cpu(), tlog.cpu(), tlse.cpu(), **kw)
    (loss * grad_out).backward()
    return loss.detach(), ce.detach(), kl.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature, alpha, gamma", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V, k", SHAPES)
def test_matches_oracle(backend, mode, temperature, alpha, gamma, dtype, N, V, k):
    inputs = make_inputs(N, V, k, dtype, temperature)
    kw = dict(temperature=temperature, alpha=alpha, gamma=gamma, mode=mode)
    loss, ce, kl, grad = run(backend, *inputs, **kw)
    loss_o, ce_o, kl_o, grad_o = run_oracle(*inputs, **kw)
    loss_rtol, row_atol, grad_rtol, grad_atol = TOL[dtype]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, loss_o, rtol=loss_rtol, atol=0.0, name="loss")
    assert_close(ce, ce_o, rtol=loss_rtol, atol=row_atol, name="ce per row")
    assert_close(kl, kl_o, rtol=loss_rtol, atol=row_atol, name="kl per row")
    assert_close(grad, grad_o, rtol=grad_rtol, atol=grad_atol * grad_o.abs().max().item(), name="grad")
    assert (grad[1] == 0).all() and ce[1] == 0 and kl[1] == 0  # the ignored row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_all_ignored_batch_is_zero(backend, mode):
    logits, labels, ids, tlog, tlse = make_inputs(4, 300, 8, torch.float32, 1.0, ignored=(0, 1, 2, 3))
    loss, ce, kl, grad = run(backend, logits, labels, ids, tlog, tlse, mode=mode)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert (grad == 0).all() and (ce == 0).all() and (kl == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_confident_rows_label_gradient(backend, mode):
    # softmax(z)_y > 0.999: the label gradient (q_y - 1)/n must keep its relative accuracy.
    logits, labels, ids, tlog, tlse = make_inputs(4, 1271, 8, torch.float32, 1.0, ignored=(), scale=1.0)
    rows = torch.arange(4, device=DEVICE)
    logits[rows, labels] = 16.0 + torch.arange(4, device=DEVICE, dtype=torch.float32)
    assert (torch.softmax(logits.double(), 1)[rows, labels] > 0.999).all()
    loss, ce, _, grad = run(backend, logits, labels, ids, tlog, tlse, mode=mode)
    loss_o, ce_o, _, grad_o = run_oracle(logits, labels, ids, tlog, tlse, mode=mode)
    assert_close(grad[rows, labels], grad_o[rows.cpu(), labels.cpu()], rtol=1e-4, atol=0.0, name="label grad")
    assert_close(ce, ce_o, rtol=1e-4, atol=0.0, name="tiny CE of confident rows")
    assert_close(loss, loss_o, rtol=1e-5, atol=0.0, name="loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_mode_student_mass_all_on_topk(backend, temperature):
    # The student puts ~1e-14 outside the teacher's ids (label among them); the teacher keeps ~5% there.
    # 1 - Σq would be pure rounding; the complement logsumexp keeps KL and the tail gradient exact.
    N, V, k = 4, 1271, 8
    logits, labels, ids, tlog, _ = make_inputs(N, V, k, torch.float32, temperature, ignored=(), scale=1.0)
    ids = torch.randperm(V)[: N * k].view(N, k).to(DEVICE)  # distinct ids, no padded slot
    rows = torch.arange(N, device=DEVICE)[:, None]
    logits[rows, ids] += 38.0 * temperature
    labels = ids[:, 0].clone()
    tlog = torch.linspace(3.0, 0.0, k, device=DEVICE).repeat(N, 1)
    p = torch.softmax(tlog / temperature, 1) * 0.95  # teacher keeps 5% outside its top-k
    tlse = (tlog / temperature - p.log())[:, 0]
    q = torch.softmax(logits.double() / temperature, 1)
    tail_q = 1.0 - q.gather(1, ids.long()).sum(1)
    assert (tail_q.abs() < 1e-12).all()
    loss, _, kl, grad = run(backend, logits, labels, ids, tlog, tlse, temperature=temperature, mode="tail")
    loss_o, _, kl_o, grad_o = run_oracle(logits, labels, ids, tlog, tlse, temperature=temperature, mode="tail")
    assert_close(kl, kl_o, rtol=1e-5, atol=0.0, name="kl")
    assert_close(loss, loss_o, rtol=1e-5, atol=0.0, name="loss")
    outside = torch.ones(N, V, dtype=torch.bool)
    outside[torch.arange(N)[:, None], ids.cpu().long()] = False
    assert_close(grad.cpu()[outside], grad_o[outside], rtol=1e-4, atol=0.0, name="tail gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_are_scatter_adds_and_padding_is_skipped(backend):
    # renorm: duplicating a slot equals giving that id the summed probability; a padded slot changes nothing.
    logits, labels, ids, tlog, tlse = make_inputs(3, 300, 4, torch.float32, 1.0, ignored=())
    ids[:, 1] = ids[:, 0]
    tlog[:, 1] = tlog[:, 0]
    loss, _, _, grad = run(backend, logits, labels, ids, tlog, tlse)
    merged_ids = torch.cat([ids[:, :1], ids[:, 2:], torch.full_like(ids[:, :1], -1)], 1)
    merged_log = torch.cat([tlog[:, :1] + torch.log(torch.tensor(2.0)), tlog[:, 2:], torch.zeros_like(tlog[:, :1])], 1)
    loss_m, _, _, grad_m = run(backend, logits, labels, merged_ids, merged_log, tlse)
    # KL differs by the constant Σ p log p split; gradients agree.
    assert_close(grad, grad_m, rtol=1e-5, atol=1e-8, name="grad (duplicate vs merged)")
    assert torch.isfinite(loss) and torch.isfinite(loss_m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_per_row_api_and_inplace_grad(backend, mode):
    logits, labels, ids, tlog, tlse = make_inputs(5, 300, 8, torch.bfloat16, 2.0)
    kw = dict(temperature=2.0, alpha=0.7, gamma=0.3, mode=mode)
    loss, ce, kl, grad = run(backend, logits, labels, ids, tlog, tlse, **kw)
    ce2, kl2 = fused_kd_loss_per_row(logits, labels, ids, tlog, tlse, backend=backend, **kw)
    assert not ce2.requires_grad and ce2.dtype == torch.float32
    assert torch.equal(ce, ce2) and torch.equal(kl, kl2)
    leaf = logits.clone().requires_grad_(True)
    buf = leaf * 1.0  # a non-leaf the loss may overwrite, as lm_head's output would be
    out = fused_kd_loss(buf, labels, ids, tlog, tlse, backend=backend, inplace_grad=True, **kw)
    (out * 2.5).backward()
    assert torch.equal(leaf.grad, grad)
    assert torch.equal(buf.detach(), grad)  # the logits buffer now holds the gradient
    again = fused_kd_loss(leaf * 1.0, labels, ids, tlog, tlse, backend=backend, inplace_grad=True, **kw)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_grad"):
        again.backward()  # the saved logits are gone: refuse instead of returning garbage


def test_torch_backend_chunking_is_invisible():
    logits, labels, ids, tlog, tlse = make_inputs(11, 300, 8, torch.float32, 2.0)
    whole = run("torch", logits, labels, ids, tlog, tlse, mode="tail", temperature=2.0)
    x = logits.clone().requires_grad_(True)
    loss = fused_kd_loss(x, labels, ids, tlog, tlse, backend="torch", mode="tail", temperature=2.0, chunk_rows=3)
    (loss * 2.5).backward()
    assert_close(loss.detach(), whole[0], rtol=1e-6, atol=0.0, name="loss")
    assert_close(x.grad, whole[3], rtol=1e-6, atol=1e-9, name="grad")


@pytest.mark.parametrize("mode", MODES)
def test_eager_reference_matches_oracle(mode):
    # The benchmark's baseline must compute the same function.
    inputs = make_inputs(6, 300, 8, torch.float32, 2.0)
    kw = dict(temperature=2.0, alpha=0.5, gamma=0.5, mode=mode)
    x = inputs[0].clone().requires_grad_(True)
    loss, _, _ = eager_kd_loss(x, *inputs[1:], **kw)
    loss.backward()
    loss_o, _, _, grad_o = run_oracle(*inputs, grad_out=1.0, **kw)
    assert_close(loss.detach(), loss_o, rtol=1e-5, atol=0.0, name="loss")
    assert_close(x.grad, grad_o, rtol=1e-4, atol=1e-9, name="grad")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mode="both"), "`mode`"),
        (dict(mode="tail", teacher_lse=None), "`teacher_lse`"),
        (dict(labels=torch.tensor([0, 1, 999])), "`labels`"),
        (dict(topk_ids=torch.full((3, 4), 300)), "`topk_ids`"),
        (dict(temperature=0.0), "`temperature`"),
        (dict(logits=torch.zeros(3, 2, 300)), "`logits`"),
    ],
)
def test_bad_input_names_the_field(change, message):
    args = dict(
        logits=torch.zeros(3, 300),
        labels=torch.tensor([0, 1, 2]),
        topk_ids=torch.zeros(3, 4, dtype=torch.long),
        topk_logits=torch.zeros(3, 4),
        teacher_lse=torch.zeros(3),
        backend="torch",
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_kd_loss(**args)
