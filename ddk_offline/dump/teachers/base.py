"""The teacher seam: what phase one needs from a teacher, whatever runs it.

A backend is one class (registered in :mod:`ddk_offline.dump.teachers`) that loads a teacher lazily and turns a
batch of packed token ids into :class:`Targets`. The dump loop, the manifest and ``dumps verify --repair`` only
talk to this interface, so a second backend (an inference server, another framework) is one new file.

:func:`reduce_logits` is the shared reduction for backends that can produce full logit rows: top-k, logsumexp
(at T = 1 and extra temperatures) and the NLL of the next token, in bounded chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ddk_offline.format.teacher_matrices import TeacherMatrices


@dataclass
class Targets:
    """The teacher's stored outputs for a batch of B sequences of L tokens (numpy, on the host).

    Attributes:
        topk_ids: [B, L, K] int64, ids of the K largest logits, descending.
        topk_logits: [B, L, K] float32 raw logits at those ids (T = 1).
        lse: [B, L] float32 logsumexp of the full logit row.
        nll: [B, L] float32 loss on the next token ``input_ids[:, n + 1]``; NaN at n = L - 1.
        extra_lse: {T: [B, L] float32 logsumexp(logits / T)}.
        forward_s: seconds spent in the model's forward (device-synchronised).
        hidden: [B, L, D] float32, the teacher's last hidden state (the one its head multiplies), when asked for.
    """

    topk_ids: np.ndarray
    topk_logits: np.ndarray
    lse: np.ndarray
    nll: np.ndarray
    extra_lse: dict[float, np.ndarray] = field(default_factory=dict)
    forward_s: float = 0.0
    hidden: np.ndarray | None = None


@runtime_checkable
class TeacherBackend(Protocol):
    """A teacher as phase one sees it. Construction resolves the source and must not load weights.

    Attributes:
        name: the teacher as the user named it (recorded in the manifest).
        backend: the registry name of the implementation (recorded in the manifest; ``repair`` reopens it).
    """

    name: str
    backend: str

    def tokenizer(self) -> Any:
        """The teacher's ``transformers`` tokenizer (packing uses it; the dump saves a copy)."""

    def vocab_size(self) -> int:
        """The logit width V (the range of stored top-k ids)."""

    def max_positions(self) -> int | None:
        """The longest context the teacher was trained on, if known."""

    def identity(self) -> dict[str, Any]:
        """What identifies the weights (name, architecture, config and weight hashes), for the manifest."""

    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Load the weights; called only when shards remain to be computed."""

    def targets(
        self, input_ids: torch.Tensor, *, k: int, extra_temperatures: tuple[float, ...] = (), hidden: bool = False
    ) -> Targets:
        """The stored targets of ``input_ids`` [B, L] int64 (after :meth:`load`); with ``hidden``, also
        ``Targets.hidden`` [B, L, D]: the last hidden state, as ``outputs.hidden_states[-1]`` of transformers."""

    def hidden_size(self) -> int:
        """The width D of the teacher's last hidden state (known before :meth:`load`)."""

    def matrices(self) -> TeacherMatrices:
        """The embedding module's output for every id, the output head and its bias (after :meth:`load`)."""


def tokenizer_identity(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Vocab size (logit width), tokenizer length, vocab hash and EOS token of a ``transformers`` tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return {
        "vocab_size": vocab_size,
        "tokens": len(tokenizer),
        "vocab_sha256": sha256_json(vocab),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": int(tokenizer.eos_token_id),
        "class": type(tokenizer).__name__,
    }


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@torch.inference_mode()
def reduce_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    k: int,
    extra_temperatures: tuple[float, ...] = (),
    chunk_elements: int = 1 << 24,
) -> Targets:
    """Reduce full logits [B, L, V] of ``input_ids`` [B, L] to the stored :class:`Targets` (``forward_s`` = 0).

    The fp32 upcast, logsumexp and top-k run over ``chunk_elements // V`` rows at a time, so the extra memory
    beyond the logits themselves is bounded (64 MiB of fp32 per chunk by default) whatever B, L and V are.
    """
    device = logits.device
    ids = input_ids.to(device)
    B, L, V = logits.shape
    flat = logits.reshape(B * L, V)
    labels = torch.full((B, L), -1, dtype=torch.long, device=device)
    labels[:, :-1] = ids[:, 1:]
    labels = labels.reshape(-1)
    N = B * L
    out_ids = torch.empty((N, k), dtype=torch.long, device=device)
    out_vals = torch.empty((N, k), dtype=torch.float32, device=device)
    lse = torch.empty(N, dtype=torch.float32, device=device)
    nll = torch.empty(N, dtype=torch.float32, device=device)
    extra = {t: torch.empty(N, dtype=torch.float32, device=device) for t in extra_temperatures}
    rows = max(1, chunk_elements // V)
    for s in range(0, N, rows):
        x = flat[s : s + rows].float()
        lse[s : s + rows] = row_lse = torch.logsumexp(x, dim=-1)
        out_vals[s : s + rows], out_ids[s : s + rows] = torch.topk(x, k, dim=-1, sorted=True)
        lab = labels[s : s + rows]
        picked = x.gather(1, lab.clamp_min(0)[:, None])[:, 0]
        nll[s : s + rows] = torch.where(lab >= 0, row_lse - picked, torch.full_like(picked, float("nan")))
        for t in extra_temperatures:
            extra[t][s : s + rows] = torch.logsumexp(x / t, dim=-1)
    host = lambda t: t.cpu().numpy()
    return Targets(
        topk_ids=host(out_ids).reshape(B, L, k),
        topk_logits=host(out_vals).reshape(B, L, k),
        lse=host(lse).reshape(B, L),
        nll=host(nll).reshape(B, L),
        extra_lse={t: host(v).reshape(B, L) for t, v in extra.items()},
    )
