"""Domain samplers: DDK (the paper's) and the baselines, behind one interface and a name registry.

- :mod:`.stats`  :class:`GapStats`, the per-domain CE / teacher-NLL sums every sampler reads
- :mod:`.base`   :class:`DomainSampler`, the gap signals, the spec syntax and the registry
- :mod:`.ddk`    DDK (Eq. 1-2 in log space); :mod:`.fixed` uniform, proportional, fixed weights

A new sampler is one class in one new module here, decorated with ``@register``: every module of this package is
imported below, which registers it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence

from ddk_offline.distillation.samplers.base import (
    LOG_GAP_CAP,
    MIN_TEACHER_NLL,
    REGISTRY,
    SIGNALS,
    DomainSampler,
    SamplerOptions,
    domain_gaps,
    largest_remainder,
    parse_spec,
    softmax,
    spec_help,
)
from ddk_offline.distillation.samplers.ddk import DDKSampler
from ddk_offline.distillation.samplers.fixed import FixedSampler, ProportionalSampler, UniformSampler
from ddk_offline.distillation.samplers.stats import GapStats

for _module in pkgutil.iter_modules(__path__):  # importing a module runs its @register decorators
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LOG_GAP_CAP",
    "MIN_TEACHER_NLL",
    "REGISTRY",
    "SIGNALS",
    "DDKSampler",
    "DomainSampler",
    "FixedSampler",
    "GapStats",
    "ProportionalSampler",
    "SamplerOptions",
    "UniformSampler",
    "domain_gaps",
    "largest_remainder",
    "make_sampler",
    "parse_spec",
    "softmax",
    "spec_help",
]


def make_sampler(
    spec: str,
    domains: Sequence[str],
    *,
    train_tokens: Mapping[str, float] | None = None,
    alpha: float = 0.5,
    signal: str = "ppl-ratio",
    update_every: int = 1000,
    smooth_init: bool = True,
) -> DomainSampler:
    """Build a sampler from a spec string such as ``ddk``, ``uniform``, ``proportional`` or ``fixed:a=0.5,b=0.5``.

    Args:
        spec: ``NAME[:KEY=VALUE,...]``, NAME one of :data:`REGISTRY` (see :func:`spec_help`).
        domains: domain names, in the order of the weight vector.
        train_tokens: train tokens per domain (the dump manifest's counts); required by ``proportional``.
        alpha: DDK smoothing (``--ddk-alpha``); ignored by the baselines.
        signal: gap signal (``--ddk-signal``), logged by every sampler and used by DDK.
        update_every: K, steps between updates.
        smooth_init: DDK only, see :class:`DDKSampler`.

    Raises:
        ValueError: an unknown name, bad arguments, or weights that do not fit ``domains``.
    """
    name, pairs = parse_spec(spec)
    options = SamplerOptions(
        signal=signal, update_every=update_every, alpha=alpha, smooth_init=smooth_init, train_tokens=train_tokens
    )
    return REGISTRY[name].from_spec(spec, pairs, domains, options)
