"""Samplers with a fixed mix: ``uniform`` (the paper's "equal sampling"), ``proportional`` (to the train tokens) and
``fixed:NAME=W,...`` (weights given by the user). They never reweight, but log the same gap series as DDK.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddk_offline.distillation.samplers.base import DomainSampler, SamplerOptions, register


@register
class UniformSampler(DomainSampler):
    """Equal weight on every domain ("equal sampling" in the paper's ablation)."""

    name = "uniform"
    spec_form = "uniform"

    def __init__(self, domains: Sequence[str], **kwargs: Any) -> None:
        super().__init__(domains, np.ones(len(domains)), **kwargs)


@register
class FixedSampler(DomainSampler):
    """Static weights given by the user (``fixed:a=0.5,b=0.5``)."""

    name = "fixed"
    spec_form = "fixed:NAME=W,NAME=W,..."

    def __init__(self, domains: Sequence[str], weights: Mapping[str, float], **kw: Any):
        name = self.name
        missing = [d for d in domains if d not in weights]
        unknown = [d for d in weights if d not in domains]
        if missing or unknown:
            raise ValueError(
                f"{name} sampler: weights must name every domain exactly; missing {missing}, unknown {unknown}; "
                f"domains are {list(domains)}"
            )
        w = np.array([float(weights[d]) for d in domains], dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(
                f"{name} sampler: weights must be finite and >= 0, got {dict(zip(domains, w.tolist(), strict=True))}"
            )
        if w.sum() <= 0:
            raise ValueError(f"{name} sampler: weights sum to {w.sum()}; at least one domain needs a positive weight")
        super().__init__(domains, w, **kw)

    @classmethod
    def from_spec(cls, spec, pairs, domains, options: SamplerOptions) -> FixedSampler:
        if not pairs:
            raise ValueError(f"sampler spec {spec!r}: 'fixed' needs weights, e.g. fixed:{domains[0]}=1.0")
        weights: dict[str, float] = {}
        for name, value in pairs:
            if name in weights:
                raise ValueError(f"sampler spec {spec!r}: domain {name!r} given twice")
            try:
                weights[name] = float(value)
            except ValueError:
                raise ValueError(f"sampler spec {spec!r}: weight of {name!r} is not a number: {value!r}") from None
        return cls(domains, weights, signal=options.signal, update_every=options.update_every)


@register
class ProportionalSampler(FixedSampler):
    """Weights proportional to each domain's train tokens in the dump (the corpus's natural mix)."""

    name = "proportional"
    spec_form = "proportional"

    @classmethod
    def from_spec(cls, spec, pairs, domains, options: SamplerOptions) -> ProportionalSampler:
        if pairs:
            raise ValueError(f"sampler spec {spec!r}: 'proportional' takes no arguments")
        if options.train_tokens is None:
            raise ValueError("sampler 'proportional' needs train_tokens per domain (from the dump manifest)")
        return cls(domains, options.train_tokens, signal=options.signal, update_every=options.update_every)
