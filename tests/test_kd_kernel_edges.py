"""The Triton KD kernels where a GPU differs from the small-block interpreter tests of test_kd_loss.py.

Production block size and warps (no MAX_BLOCK_V override: 2048 lanes, several full blocks plus a masked one),
V not a multiple of 16, K in {1, 128, 256}, int32 ids, strided and offset logits, fp16 gradients in the subnormal
range, the tail complement on both sides of its exact-subtraction threshold, in-place and out-of-place giving the
same bits, and the version counter that makes an in-place write fail loudly when another node saved the logits.
Interpreted on CPU at small N; compiled on a GPU. The N·V > 2^31 tests need a GPU (marker ``gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asserts import assert_close  # noqa: E402
from ddk_kernels import fused_kd_loss  # noqa: E402
from test_kd_loss import DEVICE, make_inputs, run, run_oracle  # noqa: E402

V_ODD = 4099  # two full 2048-lane blocks and a masked block of 3; not a multiple of 16


@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k, id_dtype", [(1, torch.int64), (128, torch.int32), (256, torch.int64)])
def test_production_blocks_match_oracle(mode, temperature, k, id_dtype):
    logits, labels, ids, tlog, tlse = make_inputs(3, V_ODD, max(k, 4), torch.float32, temperature, ignored=(1,))
    ids, tlog = ids[:, :k].to(id_dtype), tlog[:, :k]  # k = 1: no room for make_inputs' duplicate and padded slot
    kw = dict(temperature=temperature, alpha=0.7, gamma=0.4, mode=mode)
    loss, ce, kl, grad = run("triton", logits, labels, ids, tlog, tlse, **kw)
    loss_o, ce_o, kl_o, grad_o = run_oracle(logits, labels, ids, tlog, tlse, **kw)
    assert_close(loss, loss_o, rtol=1e-5, atol=0.0, name="loss")
    assert_close(ce, ce_o, rtol=1e-5, atol=1e-5, name="ce")
    assert_close(kl, kl_o, rtol=1e-5, atol=1e-5, name="kl")
    assert_close(grad, grad_o, rtol=1e-4, atol=1e-5 * grad_o.abs().max().item(), name="grad")
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_and_offset_logits(backend):
    # logits[:, 5:5 + V] of a wider buffer: row stride V + 37 and a base offset, neither a multiple of 16.
    logits, labels, ids, tlog, tlse = make_inputs(3, V_ODD, 16, torch.bfloat16, 2.0)
    wide = torch.randn(3, V_ODD + 37, device=DEVICE).to(torch.bfloat16)
    wide[:, 5 : 5 + V_ODD] = logits
    view = wide[:, 5 : 5 + V_ODD]
    assert view.stride(0) == V_ODD + 37 and view.storage_offset() == 5
    kw = dict(temperature=2.0, mode="tail")
    x = view.detach().contiguous()
    base = wide.detach().clone().requires_grad_(True)
    loss = fused_kd_loss(base[:, 5 : 5 + V_ODD], labels, ids, tlog, tlse, backend=backend, **kw)
    (loss * 2.5).backward()
    loss_c, _, _, grad_c = run(backend, x, labels, ids, tlog, tlse, **kw)
    if backend == "torch":
        assert torch.equal(loss.detach(), loss_c)
        assert torch.equal(base.grad[:, 5 : 5 + V_ODD], grad_c)
    else:  # the row's 16-byte phase decides which lane sums which element: the same value up to rounding
        assert_close(loss.detach(), loss_c, rtol=1e-6, atol=0.0, name="loss")
        assert_close(base.grad[:, 5 : 5 + V_ODD], grad_c, rtol=1e-2, atol=1e-6, name="grad")
    assert (base.grad[:, :5] == 0).all() and (base.grad[:, 5 + V_ODD :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V, offset", [(5, 3), (13, 1), (2048 + 11, 3), (2 * 2048 + 7, 0)])
def test_unaligned_heads_and_tails_match_oracle(dtype, V, offset):
    # Rows of a wider buffer seen from column `offset`: each row starts in another 16-byte phase, so the kernels
    # take a masked head (cut short when V is shorter than it), aligned full blocks and a masked tail.
    logits, labels, ids, tlog, tlse = make_inputs(5, V, 4, dtype, 1.0, ignored=(2,))
    wide = torch.zeros(5, V + 2 * offset + 5, device=DEVICE, dtype=dtype)
    wide[:, offset : offset + V] = logits
    leaf = wide.clone().requires_grad_(True)
    loss = fused_kd_loss(leaf[:, offset : offset + V], labels, ids, tlog, tlse, mode="tail", backend="triton")
    (loss * 2.5).backward()
    loss_o, _, _, grad_o = run_oracle(logits, labels, ids, tlog, tlse, mode="tail")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(loss.detach(), loss_o, rtol=tol, atol=0.0, name="loss")
    assert_close(leaf.grad[:, offset : offset + V], grad_o, rtol=tol, atol=tol * grad_o.abs().max().item(),
                 name="grad")  # fmt: skip
    assert (leaf.grad[:, :offset] == 0).all() and (leaf.grad[:, offset + V :] == 0).all()


def test_out_of_place_gradient_keeps_the_logits_phase():
    # The backward's 128-bit stores need the gradient's rows in the logits' 16-byte phase (kd_triton.grad_like).
    from ddk_kernels.kd_triton import _aligned, grad_like

    wide = torch.zeros(4, 1000, dtype=torch.bfloat16, device=DEVICE)
    for view in (wide[:, 3:990], wide[1:, :997], wide[:, :]):
        grad = grad_like(view)
        assert grad.shape == view.shape and grad.dtype == view.dtype
        assert grad.stride() == view.stride() and grad.data_ptr() % 16 == view.data_ptr() % 16
        # what the kernels are handed: a 16-byte-aligned base and the column of the view's first element from it
        base, col0 = _aligned(view)
        assert base.data_ptr() % 16 == 0 and base.data_ptr() + 2 * col0 == view.data_ptr()


def test_fp16_small_gradients_are_not_flushed():
    # 64 rows: (q - onehot)/n puts many gradient entries in fp16's subnormal range [2^-24, 2^-14).
    logits, labels, ids, tlog, tlse = make_inputs(64, 300, 8, torch.float16, 1.0, ignored=(), scale=4.0)
    _, _, _, grad = run("triton", logits, labels, ids, tlog, tlse, grad_out=1.0)
    _, _, _, grad_o = run_oracle(logits, labels, ids, tlog, tlse, grad_out=1.0)
    expected = grad_o.to(torch.float16).cpu()
    subnormal = (expected.abs() >= 2.0**-24) & (expected.abs() < 2.0**-14)
    assert subnormal.sum() > 100
    got = grad.cpu()
    assert (got[subnormal] != 0).all(), "fp16 subnormal gradients flushed to zero"
    # within 2 fp16 subnormal steps of the correctly rounded value
    assert ((got[subnormal].float() - expected[subnormal].float()).abs() <= 2 * 2.0**-24).all()


@pytest.mark.parametrize("shift", [1.0, 4.0, 6.0, 8.0, 30.0])
def test_tail_complement_on_both_sides_of_the_subtraction_threshold(shift):
    # Raising the teacher's ids by `shift` moves the student's tail mass from ~1 to ~1e-12: the kernel subtracts the
    # top-k terms from the full sum while that is exact enough and takes a masked pass below 1/16.
    N, k = 4, 32
    logits, labels, ids, tlog, tlse = make_inputs(N, V_ODD, k, torch.float32, 1.0, ignored=(), scale=1.0)
    ids = torch.randperm(V_ODD)[: N * k].view(N, k).to(DEVICE)
    logits[torch.arange(N, device=DEVICE)[:, None], ids] += shift
    kw = dict(mode="tail", gamma=1.0, alpha=0.5)
    loss, _, kl, grad = run("triton", logits, labels, ids, tlog, tlse, **kw)
    loss_o, _, kl_o, grad_o = run_oracle(logits, labels, ids, tlog, tlse, **kw)
    assert_close(kl, kl_o, rtol=1e-5, atol=1e-6, name="kl")
    assert_close(grad, grad_o, rtol=1e-4, atol=1e-6 * grad_o.abs().max().item(), name="grad")


@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_inplace_and_out_of_place_give_identical_bits(mode, temperature):
    logits, labels, ids, tlog, tlse = make_inputs(4, V_ODD, 64, torch.bfloat16, temperature)
    kw = dict(temperature=temperature, mode=mode, alpha=0.5, gamma=0.5, backend="triton")
    leaf = logits.clone().requires_grad_(True)
    (fused_kd_loss(leaf, labels, ids, tlog, tlse, **kw) * 3.0).backward()
    leaf2 = logits.clone().requires_grad_(True)
    buf = leaf2 * 1.0
    version = buf._version
    (fused_kd_loss(buf, labels, ids, tlog, tlse, inplace_grad=True, **kw) * 3.0).backward()
    assert torch.equal(leaf2.grad, leaf.grad)
    assert buf._version > version  # the in-place write is visible to autograd


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reader", ["tanh saved its output", "a product saved its input"])
def test_inplace_refuses_when_another_node_saved_the_logits(reader, backend):
    # The loss overwrites its logits with the gradient; a node that saved them must raise instead of reading z'.
    logits, labels, ids, tlog, tlse = make_inputs(3, 300, 8, torch.float32, 1.0)
    leaf = logits.clone().requires_grad_(True)
    if reader.startswith("tanh"):
        buf = torch.tanh(leaf / 8.0)  # soft-capped logits (as Gemma 2's): tanh's backward reads buf
        aux = buf.sum() * 0.0
    else:
        buf = leaf * 1.0
        aux = (buf * buf).sum() * 1e-3  # mul saved buf
    loss = fused_kd_loss(buf, labels, ids, tlog, tlse, backend=backend, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (N·V > 2^31 elements)")
@pytest.mark.parametrize("mode", ["renorm", "tail"])
def test_int64_offsets_forward_and_backward_on_large_batches(mode):
    N, V, k = 33000, 65536, 16  # N·V = 2.16e9 > 2^31: the last rows sit beyond any int32 offset
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    ids = torch.randint(0, V, (N, k), device="cuda", generator=g)
    tlog = torch.randn(N, k, device="cuda", generator=g)
    tlse = torch.logsumexp(tlog, 1) + 3.0
    big = logits.requires_grad_(True)
    loss, ce, kl = fused_kd_loss(big, labels, ids, tlog, tlse, backend="triton", mode=mode, return_per_row=True)
    loss.backward()
    tail = slice(N - 3, N)
    x = logits.detach()[tail].clone().requires_grad_(True)
    loss_r, ce_r, kl_r = fused_kd_loss(x, labels[tail], ids[tail], tlog[tail], tlse[tail], backend="torch", mode=mode,
                                       return_per_row=True)  # fmt: skip
    loss_r.backward()
    assert_close(ce[tail], ce_r, rtol=1e-4, atol=1e-4, name="ce of the last rows")
    assert_close(kl[tail], kl_r, rtol=1e-4, atol=1e-4, name="kl of the last rows")
    expected = x.grad.float() * (3 / N)  # the rows' share of a mean over N rows instead of 3
    got = big.grad[tail].float()
    assert_close(got, expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item(), name="grad of the last rows")


def _trainer_loss_case(device):
    from ddk_offline.distillation.loss import KDTargets, LossSpec, kd_loss

    torch.manual_seed(0)  # everything drawn on the CPU, then moved: both devices see the same numbers
    N, D, V, k = 6, 16, 300, 8
    head = torch.nn.Linear(D, V, bias=False).to(device)
    h = torch.randn(N, D).to(device).requires_grad_(True)
    labels = torch.randint(0, V, (N,)).to(device)
    tlog, ids = torch.randn(N, V).topk(k, dim=1)
    targets = KDTargets(ids.to(device), tlog.to(device), (torch.logsumexp(tlog, 1) + 1.0).to(device), "tail")
    logits = head(h)
    before = logits.detach().clone()
    version = logits._version
    loss, _, _ = kd_loss(logits, labels, targets, LossSpec(gamma=0.5, mode="tail"), positions=N)
    loss.backward()
    return logits, before, version, h.grad


def test_trainer_loss_keeps_the_logits_on_cpu():
    logits, before, version, _ = _trainer_loss_case("cpu")
    assert torch.equal(logits.detach(), before) and logits._version == version


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the trainer writes the gradient in place on CUDA only")
def test_trainer_loss_writes_the_gradient_in_place_on_cuda():
    logits, before, version, h_grad = _trainer_loss_case("cuda")
    assert logits._version > version and not torch.equal(logits.detach(), before)
    _, _, _, h_grad_cpu = _trainer_loss_case("cpu")
    assert_close(h_grad.cpu(), h_grad_cpu, rtol=1e-4, atol=1e-6, name="input gradient through lm_head")
