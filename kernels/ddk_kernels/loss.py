"""Public entry points: ``fused_kd_loss`` and ``fused_kd_loss_per_row`` (input checks, backend dispatch)."""

from __future__ import annotations

import os

import torch

from ddk_kernels.kd_torch import TorchKDLoss
from ddk_kernels.spec import KD_MODES, KDSpec

_BACKENDS = ("auto", "triton", "torch")


def _fail(field: str, problem: str, fix: str) -> None:
    raise ValueError(f"ddk_kernels.fused_kd_loss: `{field}` {problem}; {fix}.")


def _check(logits, labels, topk_ids, topk_logits, teacher_lse, temperature, mode, backend) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        _fail("logits", f"has shape {tuple(logits.shape)} / dtype {logits.dtype}", "pass a float [N, V] tensor "
              "(flatten batch and sequence with logits.view(-1, V))")  # fmt: skip
    if logits.stride(-1) != 1:
        _fail("logits", "has a non-unit stride along the vocabulary", "pass logits.contiguous()")
    _check_targets(logits.shape[0], "logits", logits.device, labels, topk_ids, topk_logits, teacher_lse, temperature,
                   mode, backend)  # fmt: skip


def _check_targets(N, what, device, labels, topk_ids, topk_logits, teacher_lse, temperature, mode, backend) -> None:
    """Checks shared by both entry points: options, and labels / teacher targets for ``N`` rows on ``device``."""
    if mode not in KD_MODES:
        _fail("mode", f"is {mode!r}", f"use one of {KD_MODES}")
    if backend not in _BACKENDS:
        _fail("backend", f"is {backend!r}", f"use one of {_BACKENDS}")
    if not temperature > 0:
        _fail("temperature", f"is {temperature!r}", "pass a positive float")
    if labels.shape != (N,) or labels.dtype != torch.int64:
        _fail("labels", f"has shape {tuple(labels.shape)} / dtype {labels.dtype}", f"pass int64 [{N}]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_ids.dtype not in (torch.int32, torch.int64):
        _fail("topk_ids", f"has shape {tuple(topk_ids.shape)} / dtype {topk_ids.dtype}", f"pass int32/int64 [{N}, k]")
    if topk_logits.shape != topk_ids.shape or not topk_logits.is_floating_point():
        _fail("topk_logits", f"has shape {tuple(topk_logits.shape)}", f"pass float {tuple(topk_ids.shape)}")
    if mode == "tail":
        if teacher_lse is None:
            _fail("teacher_lse", "is None in mode='tail'", "pass the teacher's logsumexp(logits / T) per row")
        if teacher_lse.shape != (N,) or not teacher_lse.is_floating_point():
            _fail("teacher_lse", f"has shape {tuple(teacher_lse.shape)}", f"pass float [{N}]")
    for name, t in (
        ("labels", labels),
        ("topk_ids", topk_ids),
        ("topk_logits", topk_logits),
        ("teacher_lse", teacher_lse),
    ):
        if t is not None and t.device != device:
            _fail(name, f"is on {t.device} but {what} on {device}", "move all inputs to one device")


def _check_values(logits, labels, topk_ids, ignore_index, V=None) -> None:
    # Out-of-range ids would read outside the row; on GPU check asynchronously (no host sync per step).
    V = logits.shape[1] if V is None else V
    labels_ok = ((labels == ignore_index) | ((labels >= 0) & (labels < V))).all()
    ids_ok = (topk_ids < V).all()
    if logits.device.type == "cuda":
        torch._assert_async(labels_ok & ids_ok, "ddk_kernels.fused_kd_loss: labels or topk_ids out of range [0, V)")
        return
    if not bool(labels_ok):
        _fail("labels", f"holds values outside [0, {V}) other than ignore_index={ignore_index}", "fix the labels")
    if not bool(ids_ok):
        _fail("topk_ids", f"holds ids >= V = {V}", "check the dump's vocabulary matches the student's")


def _use_triton(logits: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return logits.device.type == "cuda"
    if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        _fail("backend", "is 'triton' but the tensors are on CPU", "set TRITON_INTERPRET=1 before importing triton, "
              "or use backend='torch'")  # fmt: skip
    return True


def _apply(logits, labels, topk_ids, topk_logits, teacher_lse, temperature, alpha, gamma, mode, ignore_index,
           backend, inplace_grad, chunk_rows):  # fmt: skip
    _check(logits, labels, topk_ids, topk_logits, teacher_lse, temperature, mode, backend)
    _check_values(logits, labels, topk_ids, ignore_index)
    spec = KDSpec(float(temperature), float(alpha), float(gamma), KD_MODES.index(mode), int(ignore_index),
                  bool(inplace_grad))  # fmt: skip
    tlse = teacher_lse.float().contiguous() if spec.uses_lse else None
    args = (logits, labels.contiguous(), topk_ids.contiguous(), topk_logits.contiguous(), tlse, spec)
    if _use_triton(logits, backend):
        from ddk_kernels.kd_triton import TritonKDLoss  # lazy: triton decides interpret vs compile at import

        return TritonKDLoss.apply(*args)
    return TorchKDLoss.apply(*args, chunk_rows)


def fused_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    mode: str = "renorm",
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_grad: bool = False,
    return_per_row: bool = False,
    chunk_rows: int | None = None,
):
    """Mean over non-ignored rows of ``alpha·CE + gamma·T²·KL(teacher top-k || student)``.

    Args:
        logits: [N, V] fp32/bf16/fp16 student logits (unit stride along V). Differentiable.
        labels: [N] int64 next-token ids; ``ignore_index`` masks the whole row (CE and KL).
        topk_ids: [N, k] int32/int64 teacher top-k ids; id < 0 marks a padded slot (skipped);
            duplicates count as given (each adds its own p, as a scatter-add).
        topk_logits: [N, k] float teacher logits at T = 1 for those ids.
        teacher_lse: [N] float logsumexp(teacher_full_row / T) at the temperature in use; required for
            ``mode="tail"``, ignored for ``"renorm"``.
        temperature: T > 0; the KL compares softmax(z/T) with the teacher at T and is scaled by T².
        alpha: weight of the CE term.
        gamma: weight of the KL term.
        mode: ``"renorm"`` (p = softmax(topk_logits/T) over the k ids) or ``"tail"`` (exact teacher
            probabilities, the missing mass 1 - Σp matched against the student's mass outside the set
            of ids, taken from the complement logsumexp).
        ignore_index: label value of rows that contribute nothing.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` (CUDA, or CPU under
            TRITON_INTERPRET=1) or ``"torch"`` (row-chunked, fp32 accumulation).
        inplace_grad: the backward writes the gradient over the ``logits`` buffer (no [N, V] allocation).
            Only when nothing else reads ``logits`` after the forward (e.g. the output of ``lm_head``).
        return_per_row: also return per-row (ce [N], kl [N]) fp32 from the same pass (not differentiable).
        chunk_rows: rows per chunk for the torch backend (default: ~1M elements per chunk).

    Returns:
        The scalar fp32 loss (0 with zero gradient when every row is ignored), or ``(loss, ce, kl)``
        when ``return_per_row``; ce and kl are 0 on ignored rows.
    """
    loss, ce, kl = _apply(logits, labels, topk_ids, topk_logits, teacher_lse, temperature, alpha, gamma, mode,
                          ignore_index, backend, inplace_grad, chunk_rows)  # fmt: skip
    return (loss, ce, kl) if return_per_row else loss


def fused_kd_loss_per_row(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    mode: str = "renorm",
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce [N], kl [N])`` fp32, forward only (no autograd graph, not differentiable).

    KL is unscaled (no gamma, no T²); ignored rows hold 0. Same arguments as :func:`fused_kd_loss`
    (alpha and gamma are accepted for symmetry and do not change the outputs). To get the loss and
    these values from one pass while training, use ``fused_kd_loss(..., return_per_row=True)``.
    """
    with torch.no_grad():
        _, ce, kl = _apply(logits, labels, topk_ids, topk_logits, teacher_lse, temperature, alpha, gamma, mode,
                           ignore_index, backend, False, chunk_rows)  # fmt: skip
    return ce, kl
