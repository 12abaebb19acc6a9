"""The fused-linear KD loss on CUDA: row chunks of logits from a torch matmul, scored by the fused KD Triton kernel.

A simple design, not a fused matmul kernel: per chunk of R rows, ``z = hidden[rows] @ weight.T (+ bias)`` ([R, V], the
inputs' dtype) goes through ``kd_forward`` (per-row stats kept, z dropped); the backward recomputes z, lets
``kd_backward`` write the gradient over it in place, then ``grad_hidden[rows] = g @ W`` and
``grad_weight += g.T @ hidden[rows]`` (fp32 accumulator). Memory: one [R, V] chunk plus the fp32 [V, D] accumulator
(instead of the [N, V] logits and their gradient); time: one extra logits matmul. Unlike the torch backend's tiles,
the chunk spans the whole vocabulary (the kernel needs full rows), and ``grad_weight`` is re-read once per chunk.
"""

from __future__ import annotations

import torch

from ddk_kernels.kd_triton import kd_backward, kd_forward, sort_targets
from ddk_kernels.spec import KDSpec


def _logits(hidden, weight, bias, rs, re):
    h = hidden[rs:re]
    return (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).contiguous()


_COLS = 8192  # vocabulary slice of one half-precision grad_weight product (its [C, D] temporary)


def _add_outer(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V, D] fp32 += g.T @ h, the product in g's dtype (bf16 tensor cores) a vocabulary slice at a time, so the
    half-precision temporary is [C, D], not [V, D]."""
    if g.dtype == torch.float32:
        acc.addmm_(g.T, h)
        return
    for cs in range(0, acc.shape[0], _COLS):
        acc[cs : cs + _COLS].add_((g[:, cs : cs + _COLS].T @ h).float())


class TritonLinearKDLoss(torch.autograd.Function):
    """``TritonKDLoss`` of ``hidden @ weight.T + bias``, R rows at a time; gradients as ``TorchLinearKDLoss``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk_ids, topk_logits, teacher_lse, spec: KDSpec, rows: int):
        ids, tlog = sort_targets(topk_ids, topk_logits)
        N = hidden.shape[0]
        dev = hidden.device
        ce = torch.zeros(N, dtype=torch.float32, device=dev)
        kl = torch.zeros_like(ce)
        stats = torch.zeros(N, 8, dtype=torch.float32, device=dev)
        with torch.no_grad():
            for rs in range(0, N, rows):
                re = min(N, rs + rows)
                tl_ = teacher_lse[rs:re] if spec.uses_lse else None
                ce[rs:re], kl[rs:re], stats[rs:re] = kd_forward(
                    _logits(hidden, weight, bias, rs, re), labels[rs:re], ids[rs:re], tlog[rs:re], tl_, spec
                )
        n_valid = (labels != spec.ignore_index).sum().clamp_min(1).to(torch.float32)
        loss = (spec.alpha * ce + (spec.gamma * spec.temperature * spec.temperature) * kl).sum() / n_valid
        tlse = teacher_lse if spec.uses_lse else stats
        ctx.save_for_backward(hidden, weight, bias, labels, ids, tlog, tlse, stats, n_valid)
        ctx.spec, ctx.rows = spec, rows
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        hidden, weight, bias, labels, ids, tlog, tlse, stats, n_valid = ctx.saved_tensors
        spec, rows = ctx.spec, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_loss.to(torch.float32) / n_valid
        scale = torch.stack([g * spec.alpha, g * (spec.gamma * spec.temperature)]).contiguous()
        N, V = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None
        with torch.no_grad():
            for rs in range(0, N, rows):
                re = min(N, rs + rows)
                z = _logits(hidden, weight, bias, rs, re)
                kd_backward(z, z, labels[rs:re], ids[rs:re], tlog[rs:re], tlse[rs:re], stats[rs:re], scale, spec)
                if need_h:
                    torch.mm(z, weight, out=grad_h[rs:re])
                if need_w:
                    _add_outer(grad_w, z, hidden[rs:re])
                if need_b:
                    grad_b += z.float().sum(dim=0)
                del z
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None
