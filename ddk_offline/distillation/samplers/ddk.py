"""DDK's domain sampler (Liu et al. 2024, arXiv 2407.16154, Eq. 1-2, Algorithm 1), in log space.

With N domains and smoothing ``alpha``:

    gap         g_i (see :mod:`.base`: ppl-ratio, the paper's, or loss-ratio)
    start       uniform until every domain has been measured once, then r_0 = alpha * softmax(g) + (1 - alpha) / N
    every K     log psi_i = log r_i + g_i;   r_i <- alpha * softmax(log psi)_i + (1 - alpha) / N

Choices, and why:

- Log space. ``psi = r * exp(g)`` overflows float64 once g > ~709; ``log psi = log r + g`` followed by a stable
  softmax never does, and equals the naive form wherever that is finite.
- The initial mix is smoothed too. The paper's r_0 = softmax(g) is one update of Eq. 2 from the uniform warm-up with
  alpha = 1; we apply the configured alpha there as well, so the floor (1 - alpha) / N holds from the first mix on
  (with a fresh student softmax(g) is one-hot and would starve every other domain for K steps). Pass
  ``smooth_init=False`` for the paper's exact start.
- Which signal fits. The paper's students were pretrained: ratios PPL_S / PPL_T of 1.2-1.8, g differences of a few
  tenths, and Eq. 2 moves weight gradually: use ``ppl-ratio``. A freshly initialised student has CE near ln(V)
  (~10.8 nats for V = 49k) against a teacher NLL of 2-3, so g = exp(CE - NLL) is in the thousands and g differences
  between domains are in the hundreds: softmax(log r + g) is an argmax, and every update puts alpha on the single
  worst domain plus the floor on the others. That is still well defined here, but it oscillates; ``loss-ratio``
  (CE / NLL, ~3-5 for a fresh student) keeps differences of order one and the update gradual: use it for students
  trained from scratch or from a coarse derive, or until the ppl ratios fall below ~10.
- With the floor, each domain gets about K * B * (1 - alpha) / N samples between updates, so a domain without new
  observations (kept at its last gap) only happens with tiny K * B or an empty validation split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddk_offline.distillation.samplers.base import DomainSampler, SamplerOptions, register, softmax, typed_args


@register
class DDKSampler(DomainSampler):
    """DDK's factor smooth updating (paper Eq. 1-2) in log space; see the module docstring for the rules.

    Args:
        domains: domain names.
        alpha: smoothing in [0, 1]; every domain keeps at least (1 - alpha) / N. Paper: 0.5.
        smooth_init: apply alpha to the first mix too (default); False gives the paper's r_0 = softmax(g).
        signal, update_every: see `DomainSampler`.
    """

    name = "ddk"
    spec_form = "ddk"

    def __init__(self, domains: Sequence[str], *, alpha: float = 0.5, smooth_init: bool = True, **kwargs: Any):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"ddk sampler: ddk_alpha must be in [0, 1], got {alpha}")
        super().__init__(domains, np.ones(len(domains)), **kwargs)
        self.alpha, self.smooth_init = float(alpha), bool(smooth_init)
        self.started = False  # False while in the uniform warm-up (some domain never measured)
        self.saturated = False  # the last update gave (nearly) all the smoothed share to one domain

    @property
    def floor(self) -> float:
        return (1.0 - self.alpha) / len(self.domains)

    def _reweight(self) -> bool:
        if np.isnan(self._gaps).any():
            return False
        n = len(self.domains)
        if not self.started:
            self.started = True
            p = softmax(self._gaps)
            alpha = self.alpha if self.smooth_init else 1.0
            self._weights = alpha * p + (1.0 - alpha) / n
            return True
        with np.errstate(divide="ignore"):  # a zero weight (paper start) has log -inf: psi = 0
            log_psi = np.log(self._weights) + self._gaps
        soft = softmax(log_psi)
        self._weights = self.alpha * soft + self.floor
        # Saturated: one domain takes the whole smoothed share (argmax + floor), as with ppl-ratio gaps in the
        # thousands; the mix no longer tracks the gaps (the trainer warns once).
        self.saturated = n > 1 and self.alpha > 0 and float(soft.max()) > 0.99
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "smooth_init": self.smooth_init, "started": self.started}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha, self.smooth_init, self.started = float(state["alpha"]), bool(state["smooth_init"]), state["started"]

    def _describe_args(self) -> str:
        return f"signal={self.signal}, alpha={self.alpha}, every={self.update_every}"

    @classmethod
    def from_spec(cls, spec, pairs, domains, options: SamplerOptions) -> DDKSampler:
        typed_args(spec, pairs, {})  # alpha, signal and K come from --ddk-alpha, --ddk-signal, --ddk-interval
        return cls(
            domains,
            alpha=options.alpha,
            smooth_init=options.smooth_init,
            signal=options.signal,
            update_every=options.update_every,
        )
