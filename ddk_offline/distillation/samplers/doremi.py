"""Online DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining",
arXiv 2305.10429, Algorithm 1) with the teacher's stored NLL as the reference model.

At each update, with the per-domain means since the last one of the student's CE and the teacher's NLL over the
same positions:

    excess      lambda_i = max(CE_S,i - NLL_T,i, 0)                       (0 for a domain not seen since)
    ascent      log a'_i = log w_i + eta * lambda_i;   a' = softmax(log a')
    smoothing   w_i      = (1 - c) * a'_i + c / N

Defaults from the paper: step size eta = 1, smoothing c = 1e-3, start from the uniform mix. ``doremi:eta=E,c=C``
sets them; K is ``--ddk-interval`` (the paper updates every step: ``--ddk-interval 1``).

Where this differs from the paper, and why:

- The reference model is the teacher, whose NLL the dump stores per position: no second model runs. DoReMi's
  reference is a small model trained on the initial mix, and its weights are learnt on a proxy model and then
  averaged over steps to train a separate main model; here the student itself is trained on the current mix (online
  DoReMi), as the DDK paper's "CPT + DoReMi" baseline does.
- The excess loss is clipped per domain (on the domain's mean), not per token: the trainer keeps per-domain sums of
  CE and NLL, the same statistics DDK reads. Clipping per token gives a larger excess (it never lets a token the
  student predicts better than the teacher cancel one it predicts worse).
- The step is applied once per K steps on the means since the last update, instead of every step on one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddk_offline.distillation.samplers.base import DomainSampler, SamplerOptions, register, softmax, typed_args
from ddk_offline.distillation.samplers.stats import GapStats


@register
class DoReMiSampler(DomainSampler):
    """Exponentiated-gradient ascent on the per-domain excess loss over the teacher (see the module docstring).

    Args:
        domains: domain names.
        eta: step size of the ascent (paper: 1).
        smoothing: c, the share of the uniform mix kept in the weights (paper: 1e-3).
        signal, update_every: see `DomainSampler` (the signal is only logged here).
    """

    name = "doremi"
    spec_form = "doremi[:eta=1,c=0.001]"

    def __init__(self, domains: Sequence[str], *, eta: float = 1.0, smoothing: float = 1e-3, **kwargs: Any):
        if not eta > 0:
            raise ValueError(f"doremi sampler: eta must be > 0, got {eta}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"doremi sampler: c (smoothing) must be in [0, 1], got {smoothing}")
        super().__init__(domains, np.ones(len(domains)), **kwargs)
        self.eta, self.smoothing = float(eta), float(smoothing)
        self.excess = np.zeros(len(self.domains))

    def update(self, stats: GapStats, step: int | None = None) -> bool:
        ce, nll, count = stats.means()
        self.excess = np.where(count > 0, np.maximum(np.nan_to_num(ce - nll, nan=0.0), 0.0), 0.0)
        return super().update(stats, step)

    def _reweight(self) -> bool:
        with np.errstate(divide="ignore"):
            ascent = softmax(np.log(self._weights) + self.eta * self.excess)
        self._weights = (1.0 - self.smoothing) * ascent + self.smoothing / len(self.domains)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "eta": self.eta, "smoothing": self.smoothing, "excess": self.excess.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.eta, self.smoothing = float(state["eta"]), float(state["smoothing"])
        self.excess = np.asarray(state["excess"], np.float64)

    def _describe_args(self) -> str:
        return f"eta={self.eta:g}, c={self.smoothing:g}, every={self.update_every}"

    @classmethod
    def from_spec(cls, spec, pairs, domains, options: SamplerOptions) -> DoReMiSampler:
        args = typed_args(spec, pairs, {"eta": float, "c": float})
        return cls(
            domains,
            eta=args.get("eta", 1.0),
            smoothing=args.get("c", 1e-3),
            signal=options.signal,
            update_every=options.update_every,
        )
