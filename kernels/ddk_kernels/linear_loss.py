"""Public entry point ``fused_linear_kd_loss``: the KD loss from hidden states and the output head (input checks,
tile sizing, backend dispatch). The logits never exist whole; see ``kd_linear`` and ``kd_linear_triton``.
"""

from __future__ import annotations

import torch

from ddk_kernels.kd_linear import DEFAULT_MEMORY_BUDGET, TorchLinearKDLoss, tile_shape
from ddk_kernels.loss import _check_targets, _check_values, _use_triton
from ddk_kernels.spec import KD_MODES, KDSpec


def _fail(field: str, problem: str, fix: str) -> None:
    raise ValueError(f"ddk_kernels.fused_linear_kd_loss: `{field}` {problem}; {fix}.")


def _check_head(hidden, weight, bias) -> None:
    if hidden.dim() != 2 or not hidden.is_floating_point():
        _fail("hidden", f"has shape {tuple(hidden.shape)} / dtype {hidden.dtype}", "pass a float [N, D] tensor "
              "(flatten batch and sequence with hidden.reshape(-1, D))")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        _fail("weight", f"has shape {tuple(weight.shape)}", f"pass the output head's [V, {hidden.shape[1]}] weight")
    if weight.dtype != hidden.dtype:
        _fail("weight", f"is {weight.dtype} but hidden is {hidden.dtype}", "cast both to one dtype")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        _fail("bias", f"has shape {tuple(bias.shape)} / dtype {bias.dtype}", f"pass [{weight.shape[0]}] {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            _fail(name, f"is on {t.device} but hidden on {hidden.device}", "move all inputs to one device")


def fused_linear_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    mode: str = "renorm",
    ignore_index: int = -100,
    backend: str = "auto",
    return_per_row: bool = False,
    memory_budget: int | None = None,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
):
    """:func:`ddk_kernels.fused_kd_loss` of ``logits = hidden @ weight.T + bias``, never holding the [N, V] logits.

    Args:
        hidden: [N, D] fp32/bf16/fp16 final hidden states (after the last norm). Differentiable.
        weight: [V, D] the output head's weight (a tied embedding is fine), same dtype. Differentiable.
        labels, topk_ids, topk_logits, teacher_lse: as :func:`ddk_kernels.fused_kd_loss`.
        bias: optional [V] output-head bias, same dtype. Differentiable.
        temperature, alpha, gamma, mode, ignore_index, return_per_row: as :func:`ddk_kernels.fused_kd_loss`.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"`` (tiled, fp32 sums).
        memory_budget: bytes the logits tiles' temporaries may take (default 64 MiB); sets the tile shape.
        chunk_rows, chunk_vocab: explicit tile shape (rows x vocabulary columns), overriding the budget.

    Returns:
        The scalar fp32 loss, or ``(loss, ce [N], kl [N])`` when ``return_per_row`` (as ``fused_kd_loss``).
        Gradients flow to ``hidden``, ``weight`` and ``bias`` in their own dtypes.
    """
    _check_head(hidden, weight, bias)
    _check_targets(hidden.shape[0], "hidden", hidden.device, labels, topk_ids, topk_logits, teacher_lse, temperature,
                   mode, backend)  # fmt: skip
    _check_values(hidden, labels, topk_ids, ignore_index, V=weight.shape[0])
    spec = KDSpec(float(temperature), float(alpha), float(gamma), KD_MODES.index(mode), int(ignore_index))
    tlse = teacher_lse.float().contiguous() if spec.uses_lse else None
    args = (hidden, weight, bias, labels.contiguous(), topk_ids.contiguous(), topk_logits.contiguous(), tlse, spec)
    N, V = hidden.shape[0], weight.shape[0]
    if _use_triton(hidden, backend):
        from ddk_kernels.kd_linear_triton import TritonLinearKDLoss  # lazy, as fused_kd_loss

        rows = chunk_rows or max(1, min(N, (memory_budget or DEFAULT_MEMORY_BUDGET) // (4 * V)))  # whole-row chunks
        loss, ce, kl = TritonLinearKDLoss.apply(*args, int(rows))
    else:
        loss, ce, kl = TorchLinearKDLoss.apply(*args, tile_shape(N, V, memory_budget, chunk_rows, chunk_vocab))
    return (loss, ce, kl) if return_per_row else loss
