"""``--cross-tokenizer dskd``: Dual-Space KD with cross-model attention (Zhang et al. 2024, songmzhang/DSKD), offline.

Equations of the reference code (``criterions/dual_space_kd_with_cross_model_attention.py``), per row, with the
student's rows (Ls positions, hidden h_S, embeddings E_S) and the teacher's (L positions, stored hidden h_T,
embedding output E_T and head W_T from the dump's teacher matrices); x the inputs, y the targets (0 where unlabelled):

    Q = query([E_S(x), E_S(y)])            Linear(2·D_s, 2·D_t); student embeddings detached
    K = [E_T(x), E_T(y)] / std             std over the batch's whole tensor
    A = Q·Kᵀ / sqrt(2·D_t)                 [Ls, L], masked to labelled pairs (offline: of the same document)
    t2s: V_T = t2s(h_T/std(h_T) + E_T(y)/std(E_T(y)))       Linear(D_t, D_s)
         z_t2s = softmax(A)·V_T · W_Sᵀ (student head, detached)
         t2s_ce = CE(z_t2s, y_S);  t2s_kl = KL(softmax(z_t2s/T) ‖ softmax(z_S/T)) where argmax z_t2s = y_S
    s2t: z_s2t = softmax(Aᵀ)·s2t(h_S) · W_Tᵀ                Linear(D_s, D_t)
         s2t_kl = KL(teacher/T ‖ softmax(z_s2t/T)) at every labelled teacher position
    loss = (1-r)·CE + r·(t2s_ce + t2s_kl + s2t_kl)          r = 0.5, T = 2, projectors at lr 1e-3

Here ``--ce-weight`` is 1-r and ``--kd-weight`` r (no T², as in the reference). Offline the teacher in s2t_kl is its
stored top-k (``tail`` mode: plus one bucket for its remaining mass against the s2t distribution's mass outside
those ids; ``renorm``: the top-k renormalised), and z_s2t [N, V_t] exists one chunk of rows at a time, its
gradient taken in the forward (V_t = 262,144 for Gemma). Without the dump's hidden states only the s2t half runs.
docs/CROSSTOK.md lists every deviation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ddk_offline.distillation.crosstok.batch import IGNORE_INDEX
from ddk_offline.distillation.crosstok.methods import CrossMethod, register
from ddk_offline.errors import UserError

#: AdamW learning rate of the projectors (the reference scripts' ``--projector-lr``).
PROJECTOR_LR = 1e-3
#: Rows of soft-capped teacher-space logits [CHUNK_ROWS, V_t] alive at once in the s2t KL (the soft-cap path).
CHUNK_ROWS = 512
_MASKED = -1e9  # an attention score that softmax turns into exactly 0 next to any unmasked score


def documents(ids: torch.Tensor, eos: int | None) -> torch.Tensor:
    """[B, L] ids -> [B, L] document index within the row: the EOS tokens before each position (EOS ends its own)."""
    if eos is None:
        return torch.zeros_like(ids)
    is_eos = (ids == eos).long()
    return is_eos.cumsum(1) - is_eos


def topk_kl(
    z: torch.Tensor, ids: torch.Tensor, t_logits: torch.Tensor, lse: torch.Tensor, T: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher ‖ softmax(z / T)) per row from the teacher's top-k, and its gradient w.r.t. z.

    Args:
        z: [N, V] logits. ids: [N, k] the teacher's top-k ids (-1 = padding). t_logits: [N, k] its raw logits.
        lse: [N] its logsumexp at T. T: temperature. mode: ``tail`` (the teacher's mass beyond its k ids is one
            bucket, matched to the student's mass outside them, taken from the complement's logsumexp, never
            1 - Σq) or ``renorm`` (the k ids' softmax at T).

    Returns:
        kl [N] and d kl / d z [N, V] (DESIGN.md §3: (q_v - p_v) / T on the ids; q_v - p_tail·c_v outside them, c the
        complement's softmax, in ``tail`` mode).
    """
    zT = z.float() / T
    lse_s = torch.logsumexp(zT, dim=1)
    valid = ids >= 0
    idx = ids.clamp_min(0).long()
    log_q = zT.gather(1, idx) - lse_s[:, None]
    tT = t_logits.float() / T
    if mode == "tail":
        log_p = tT - lse[:, None].float()
    else:
        log_p = torch.log_softmax(tT.masked_fill(~valid, float("-inf")), dim=1)
    log_p = log_p.masked_fill(~valid, 0.0)
    p = log_p.exp() * valid
    kl = (p * (log_p - log_q)).sum(1)
    grad = zT.sub_(lse_s[:, None]).exp_()  # q, in place of zT (no second [N, V] buffer)
    if mode == "tail":
        in_top = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(1, idx, valid)
        in_top[:, 0] = (idx == 0).logical_and(valid).any(1)  # padded slots (idx 0) may have written False there
        q_out = grad.masked_fill(in_top, 0.0)
        q_tail = q_out.sum(1)
        # log q_tail from the complement's own sum of probabilities, not 1 - Σq (pure rounding when Σq -> 1).
        p_tail = (1.0 - p.sum(1)).clamp_min(0.0).masked_fill(~(q_out > 0).any(1), 0.0)
        kl = kl + torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail)
        grad.sub_(q_out * (p_tail / q_tail.clamp_min(torch.finfo(torch.float32).tiny))[:, None])
    grad.scatter_add_(1, idx, -p)
    return kl, grad.div_(T)


class _S2TKL(torch.autograd.Function):
    """Σ_rows topk_kl(h @ headᵀ (+ bias, soft-cap)) over chunks of rows; the gradient w.r.t. h is computed in the
    forward, chunk by chunk ([C, V] logits, then dz @ head), so no [N, V] tensor is kept for the backward and none is
    recomputed: one matmul for the logits and one for the gradient per chunk (as a fused linear cross-entropy does)."""

    @staticmethod
    def forward(ctx, h, ids, t_logits, lse, head, bias, softcap, T, mode, chunk):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            part = slice(s, s + chunk)
            z = (h[part].to(head.dtype) @ head.T).float()
            if bias is not None:
                z = z + bias
            capped = softcap * torch.tanh(z / softcap) if softcap else z
            kl, dz = topk_kl(capped, ids[part], t_logits[part], lse[part], T, mode)
            if softcap:
                dz = dz * (1.0 - (capped / softcap) ** 2)
            total += kl.sum()
            grad_h[part] = (dz.to(head.dtype) @ head).float()
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.h_dtype), *([None] * 9)


class Projectors(torch.nn.Module):
    """The reference's three projectors: query 2·D_s -> 2·D_t, s2t D_s -> D_t, t2s D_t -> D_s (nn.Linear)."""

    def __init__(self, d_student: int, d_teacher: int) -> None:
        super().__init__()
        self.query = torch.nn.Linear(2 * d_student, 2 * d_teacher)
        self.s2t = torch.nn.Linear(d_student, d_teacher)
        self.t2s = torch.nn.Linear(d_teacher, d_student)


@register
class DSKD(CrossMethod):
    name = "dskd"
    needs_hidden = True  # the loss step hands kd() the student's last hidden state and the model

    def __init__(self, teacher, student) -> None:
        super().__init__(teacher, student)
        self.projectors: Projectors | None = None
        self.with_t2s = False
        self.chunk_rows: int | None = None  # s2t tile rows (None: fused_linear_kd_loss's memory budget)
        self._sums = torch.zeros(6, dtype=torch.float64)  # t2s_ce, t2s_kl, t2s_acc, student n, s2t_kl, teacher n

    def bind(self, reader: Any, say) -> None:
        from ddk_offline.format.teacher_matrices import load_teacher_matrices

        m = load_teacher_matrices(reader.store, reader.manifest)  # refuses a dump without them, naming the command
        if m.embed is None or m.head is None:
            raise UserError("the dump's teacher matrices lack the embedding or the head; re-add them")
        self.embed, self.head, self.bias, self.softcap = m.embed, m.head, m.head_bias, m.softcap
        self.with_t2s = bool(reader.manifest.has_hidden_states)
        if not self.with_t2s:
            say(
                "dskd: the dump holds no teacher hidden states (dump-teacher --store-hidden-states): training the "
                "student-to-teacher half only (CE + s2t KL); the teacher-to-student half (t2s CE + t2s KL) is off"
            )

    def attach(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
        """Build the projectors for this student on ``device`` and add them to ``opt`` (lr :data:`PROJECTOR_LR`)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise UserError("--cross-tokenizer dskd runs in one process (its projectors are not all-reduced)")
        d_s = int(model.get_input_embeddings().weight.shape[1])
        self.projectors = Projectors(d_s, int(self.head.shape[1])).to(device)
        # The head in float32 (Gemma's: 671 MB): the gradient dz·W_T has entries near (q - p)/T, which float16
        # would flush to zero, and CPU matmuls in float16 are slow. The embedding is only indexed: stored dtype.
        self.embed, self.head = self.embed.to(device), self.head.to(device, torch.float32)
        self.bias = self.bias.to(device, torch.float32) if self.bias is not None else None
        # The reference adds the group without its own weight decay, so AdamW's 1e-2 applies (its scripts' value too).
        opt.add_param_group({"params": list(self.projectors.parameters()), "lr": PROJECTOR_LR, "weight_decay": 0.01})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.projectors.state_dict().items()} if self.projectors else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.projectors.load_state_dict(state)

    def _s2t_kl(self, h, ids, t_logits, lse, spec) -> torch.Tensor:
        """Σ of the s2t KL over rows of h [N, D_t], through the teacher head without the [N, V_t] logits.

        :func:`ddk_kernels.fused_linear_kd_loss` (the trainer's loss: tiles of rows x vocabulary, Triton on CUDA)
        with alpha = 0 and gamma = N / T², so its mean of T²·KL over rows is the sum of the KLs. A soft-capped
        teacher head (Gemma-2's ``final_logit_softcapping``), which that loss does not take, goes through
        :class:`_S2TKL`, ``chunk_rows`` rows of capped logits at a time."""
        from ddk_kernels import fused_linear_kd_loss  # lazy, as the trainer's loss

        T, n = spec.temperature, h.shape[0]
        if self.softcap:
            return _S2TKL.apply(h, ids, t_logits, lse, self.head, self.bias, self.softcap, T, spec.mode,
                                self.chunk_rows or CHUNK_ROWS)  # fmt: skip
        if n == 0:
            return h.sum() * 0.0
        labels = torch.zeros(n, dtype=torch.long, device=h.device)  # alpha = 0: the CE is not used; no row ignored
        return fused_linear_kd_loss(h, self.head, labels, ids, t_logits, lse, bias=self.bias, temperature=T,
                                    alpha=0.0, gamma=n / T**2, mode=spec.mode, chunk_rows=self.chunk_rows)  # fmt: skip

    def kd(self, flat, batch, spec, *, hidden=None, model=None):
        model = getattr(model, "module", model)
        sb, T = batch.student, spec.temperature
        B, Ls = sb.labels.shape
        s_mask, t_mask = sb.labels != IGNORE_INDEX, batch.labels != IGNORE_INDEX
        same_doc = (
            documents(sb.input_ids, self.student.eos)[:, :, None]
            == documents(batch.input_ids, self.teacher.eos)[:, None, :]
        )
        allowed = s_mask[:, :, None] & t_mask[:, None, :] & same_doc  # [B, Ls, L]
        s_y = sb.labels.masked_fill(~s_mask, 0)
        emb = model.get_input_embeddings()
        with torch.no_grad():
            s_index = torch.cat([emb(sb.input_ids.masked_fill(~s_mask, 0)), emb(s_y)], -1).float()
            t_x = self.embed[batch.input_ids.masked_fill(~t_mask, 0)].float()
            t_y = self.embed[batch.labels.masked_fill(~t_mask, 0)].float()
            keys = torch.cat([t_x, t_y], -1)
            keys = keys / keys.std()
        d_t = t_y.shape[-1]
        align = self.projectors.query(s_index) @ keys.transpose(1, 2) / math.sqrt(2 * d_t)
        align = align.masked_fill(~allowed, _MASKED)
        s_use, t_use = allowed.any(2), allowed.any(1)  # positions with someone to attend to
        kd = flat.new_zeros((), dtype=torch.float32)
        sums = torch.zeros(6, dtype=torch.float64, device=flat.device)
        sums[3], sums[5] = s_use.sum(), t_use.sum()
        if self.with_t2s:
            h_t = sb.teacher_hidden.float()
            values = self.projectors.t2s(h_t / h_t.std() + t_y / t_y.std())
            w = torch.softmax(align, -1) * s_use[:, :, None]
            head_s = model.get_output_embeddings().weight.detach()
            z_t2s = ((w @ values).to(head_s.dtype) @ head_s.T).float()[s_use]  # [n, V_s]
            y = s_y[s_use]
            t2s_ce = F.cross_entropy(z_t2s, y, reduction="sum")
            hit = z_t2s.argmax(-1) == y
            z_s = flat.reshape(B, Ls, -1)[s_use].float()
            p = torch.softmax(z_t2s.detach() / T, -1)
            kl = (p * (torch.log_softmax(z_t2s.detach() / T, -1) - torch.log_softmax(z_s / T, -1))).sum(-1)
            t2s_kl = (kl * hit).sum()
            kd = kd + t2s_ce + t2s_kl
            sums[0], sums[1], sums[2] = t2s_ce.detach(), t2s_kl.detach(), hit.sum()
        w2 = torch.softmax(align.transpose(1, 2), -1) * t_use[:, :, None]
        h_s2t = (w2 @ self.projectors.s2t(hidden.float()))[t_use]  # [N, D_t]
        k = batch.topk_ids.shape[-1]
        s2t_kl = self._s2t_kl(
            h_s2t, batch.topk_ids[t_use].reshape(-1, k), batch.topk_logits[t_use].reshape(-1, k),
            batch.teacher_lse[t_use], spec,
        )  # fmt: skip
        sums[4] = s2t_kl.detach()
        self._sums = self._sums.to(flat.device) + sums
        kd = kd + s2t_kl
        return spec.gamma * kd, float(kd.detach())

    def log_fields(self) -> dict[str, float]:
        ce, kl, acc, n_s, s2t, n_t = self._sums.tolist()
        self._sums = torch.zeros_like(self._sums)
        out = {"s2t_kl": s2t / n_t} if n_t else {}
        if self.with_t2s and n_s:
            out |= {"t2s_ce": ce / n_s, "t2s_kl": kl / n_s, "t2s_acc": acc / n_s}
        return out
