"""The training loss of one micro-batch: the student's forward, CE + γ·T²·KL against the sparse teacher, backward.

The KL goes through :func:`ddk_kernels.fused_kd_loss` (Triton on CUDA, the chunked torch path on CPU), which also
returns the per-row CE and KL from the same pass; the per-domain statistics DDK needs come from those rows. With
``kd_weight = 0`` (plain continued pre-training) no top-k tensor is read and only the CE is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ddk_offline.distillation.data import IGNORE_INDEX, Batch
from ddk_offline.runtime.device import autocast

#: The teacher-target modes (``--kd-mode``): how the mass outside the stored top-k is treated (DESIGN.md §3).


@dataclass(frozen=True)
class LossSpec:
    """``alpha·CE + gamma·T²·KL`` with teacher targets in ``mode`` (see :func:`ddk_kernels.fused_kd_loss`)."""

    alpha: float = 1.0
    gamma: float = 0.2
    temperature: float = 1.0
    mode: str = "renorm"

    @property
    def uses_teacher(self) -> bool:
        """False for CE-only training: the top-k targets are then neither read nor used."""
        return self.gamma > 0


@dataclass
class KDTargets:
    """The sparse teacher of N = B·L positions (rows flattened), in the run's target mode.

    Attributes:
        ids: [N, k] int64 top-k ids.
        logits: [N, k] float32 raw logits at those ids (T = 1).
        lse: [N] float32 logsumexp of the full teacher row at the run's temperature.
        mode: ``renorm`` or ``tail`` (one of ``ddk_kernels.KD_MODES``).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    mode: str

    @classmethod
    def from_batch(cls, batch: Batch, mode: str) -> KDTargets:
        k = batch.topk_ids.shape[-1]
        return cls(batch.topk_ids.reshape(-1, k), batch.topk_logits.reshape(-1, k), batch.teacher_lse.reshape(-1), mode)


def kd_loss(
    logits: torch.Tensor, labels: torch.Tensor, targets: KDTargets | None, spec: LossSpec, positions: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The mean loss over labelled rows, per-row CE [N] and the KL sum, from flat logits [N, V] and labels [N].

    ``targets`` is None exactly when ``spec.uses_teacher`` is False (CE only). ``positions`` is the number of
    labelled rows, counted on the host (no device sync).

    On CUDA the backward writes the gradient over ``logits`` (``inplace_grad``: no second [N, V] buffer). That is
    safe when the logits are an intermediate nothing else reads after the forward, as the output of ``lm_head`` is:
    a linear layer saves its input and weight, not its output. Should another autograd node have saved them (a
    soft-cap's tanh returning them directly, an auxiliary loss on the same tensor), the kernel's version-counter
    bump makes that node's backward raise instead of reading the gradient as logits.
    """
    if targets is not None:
        from ddk_kernels import fused_kd_loss

        loss, ce, kl = fused_kd_loss(
            logits,
            labels,
            targets.ids,
            targets.logits,
            targets.lse,
            temperature=spec.temperature,
            alpha=spec.alpha,
            gamma=spec.gamma,
            mode=targets.mode,
            ignore_index=IGNORE_INDEX,
            return_per_row=True,
            inplace_grad=logits.is_cuda and logits.grad_fn is not None,  # never a leaf (its .data is a parameter)
        )
        return loss, ce, float(kl.sum())
    # CE only (continued pre-training): no top-k tensors, no KL pass.
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return spec.alpha * ce.sum() / max(positions, 1), ce, 0.0


class FusedLinearLoss(torch.nn.Module):
    """The student with its loss computed in its forward from the final hidden states and the output head's weight
    (:func:`ddk_kernels.fused_linear_kd_loss`): the [N, V] logits and their gradient never exist.

    The whole loss runs inside ``forward`` so that DistributedDataParallel, which wraps this module, sees every
    parameter (the head's included) used by one forward. ``decoder`` and ``head`` come from
    :func:`ddk_offline.distillation.head.linear_head`; the student is registered, they are views into it.
    """

    def __init__(self, student: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.student = student
        self._parts = (decoder, head)  # a tuple: not registered twice

    def forward(self, batch: Batch, spec: LossSpec, positions: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mean loss, per-row CE [N], KL sum) of one micro-batch, as :func:`kd_loss`."""
        decoder, head = self._parts
        device = batch.input_ids.device
        with autocast(device):
            hidden = decoder(input_ids=batch.input_ids).last_hidden_state
        dtype = torch.get_autocast_dtype(device.type) if device.type == "cuda" else hidden.dtype  # as lm_head would
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        bias = None if head.bias is None else head.bias.to(dtype)
        labels = batch.labels.reshape(-1)
        from ddk_kernels import fused_linear_kd_loss

        targets = KDTargets.from_batch(batch, spec.mode) if spec.uses_teacher else None
        k = 1 if targets is None else targets.ids.shape[1]
        none = torch.full((labels.shape[0], k), -1, dtype=torch.int64, device=device)  # CE only: every slot padded
        loss, ce, kl = fused_linear_kd_loss(
            hidden,
            head.weight.to(dtype),
            labels,
            none if targets is None else targets.ids,
            none.float() if targets is None else targets.logits,
            None if targets is None else targets.lse,
            bias=bias,
            temperature=spec.temperature,
            alpha=spec.alpha,
            gamma=spec.gamma,
            mode="renorm" if targets is None else targets.mode,
            ignore_index=IGNORE_INDEX,
            return_per_row=True,
        )
        return loss, ce, float(kl.sum())


def fused_linear_step(model, batch: Batch, spec: LossSpec, positions: int, total: int) -> dict[str, Any]:
    """:func:`loss_step` for a :class:`FusedLinearLoss` (or DistributedDataParallel around one)."""
    loss, ce, kl_sum = model(batch, spec, positions)
    return _backward(loss, ce, kl_sum, batch, positions, total)


def loss_step(model: torch.nn.Module, batch: Batch, spec: LossSpec, positions: int, total: int) -> dict[str, Any]:
    """Forward + backward of one micro-batch holding ``positions`` labelled positions of the step's ``total``.

    The micro-batch loss (a mean over its positions) is scaled by ``positions / total``, so the accumulated gradient
    is that of the mean over every position of the step, however the positions are split into micro-batches.

    Returns:
        Sums over the micro-batch's labelled positions (``loss``, ``ce``, ``kl``) and per-sequence CE / teacher NLL
        sums and counts ([B] each, same positions) for the per-domain statistics.
    """
    with autocast(batch.input_ids.device):
        logits = model(input_ids=batch.input_ids).logits
    B, L, V = logits.shape
    flat, labels = logits.reshape(B * L, V), batch.labels.reshape(-1)
    targets = KDTargets.from_batch(batch, spec.mode) if spec.uses_teacher else None
    loss, ce, kl_sum = kd_loss(flat, labels, targets, spec, positions)
    return _backward(loss, ce, kl_sum, batch, positions, total)


def _backward(loss, ce, kl_sum: float, batch: Batch, positions: int, total: int) -> dict[str, Any]:
    n = positions
    mask = batch.labels != IGNORE_INDEX
    (loss * (n / max(total, 1))).backward()
    ce = ce.detach().float().reshape(mask.shape)
    return {
        "loss": float(loss.detach()) * n,
        "ce": float(ce.sum()),
        "kl": kl_sum,
        "positions": n,
        "row_ce": (ce * mask).sum(1),
        "row_nll": batch.teacher_nll.double().sum(1),
        "row_n": mask.sum(1),
    }
