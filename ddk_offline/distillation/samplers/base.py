"""The domain-sampler interface, its shared maths, and the spec syntax ``NAME[:KEY=VALUE,...]``.

A sampler owns the domain mix ``w`` (``weights``, shape [N], sums to 1) of the data drawn in the next steps. The
trainer feeds it a :class:`~.stats.GapStats` (per-domain sums of the student's CE and the teacher's stored NLL over
the same positions since the last update) every K steps; a sampler may move its weights then (DDK, DoReMi), the
fixed baselines keep theirs but log the same gap series.

Gap signals (``--ddk-signal``), logged by every sampler and used by DDK:

    ppl-ratio    g_i = exp(min(CE_i - NLL_i, LOG_GAP_CAP))    the paper's PPL_S / PPL_T
    loss-ratio   g_i = CE_i / max(NLL_i, MIN_TEACHER_NLL)

- Overflow of g. With ppl-ratio, exp(CE - NLL) overflows float64 for CE - NLL > ~709 nats (a diverged student). The
  exponent is capped at ``LOG_GAP_CAP = 700`` (g <= e^700 ~ 1e304, finite): below the cap nothing changes; at the cap
  an update is already an argmax and capped domains tie. A NaN CE or NLL is an error (training diverged or the stats
  are broken), never silently replaced.
- Loss-ratio divides by the teacher NLL, floored at ``MIN_TEACHER_NLL = 1e-6`` nats so a domain the teacher predicts
  perfectly gives a large but finite gap.
- A domain with no new observations since the last update keeps its last gap (``observed: False`` in the history).

The sampler does not reset the stats; the caller does, after logging them.

Adding a sampler: one class (a subclass of :class:`DomainSampler` with a unique ``name`` and a ``from_spec``
classmethod that parses and validates its own ``KEY=VALUE`` arguments) in a module of this package, decorated with
:func:`register`; ``--sampler NAME:KEY=VALUE`` then reaches it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ddk_offline.distillation.samplers.stats import GapStats

SIGNALS = ("ppl-ratio", "loss-ratio")
LOG_GAP_CAP = 700.0
MIN_TEACHER_NLL = 1e-6

#: name -> sampler class, filled by :func:`register` (see the package's ``__init__`` for the import that does it).
REGISTRY: dict[str, type[DomainSampler]] = {}


def register(cls: type[DomainSampler]) -> type[DomainSampler]:
    """Class decorator: make ``cls`` reachable as ``--sampler cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"sampler name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class SamplerOptions:
    """Run-wide settings every sampler receives (from the CLI flags; a sampler uses the ones it needs).

    Attributes:
        signal: gap signal (``--ddk-signal``), logged by every sampler.
        update_every: K, steps between updates (``--ddk-interval``).
        alpha: DDK smoothing (``--ddk-alpha``).
        smooth_init: DDK: smooth the first mix too (Python API only).
        train_tokens: train tokens per domain from the dump manifest (``proportional``).
    """

    signal: str = "ppl-ratio"
    update_every: int = 1000
    alpha: float = 0.5
    smooth_init: bool = True
    train_tokens: Mapping[str, float] | None = None


def parse_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``NAME[:KEY=VALUE,...]`` -> (lower-case name, [(key, value), ...]); names are checked against the registry.

    Raises:
        ValueError: an unknown name, or arguments that are not ``KEY=VALUE`` pairs.
    """
    kind, _, body = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in REGISTRY:
        raise ValueError(f"unknown sampler spec {spec!r}; expected one of {spec_help()}")
    pairs: list[tuple[str, str]] = []
    if body.strip():
        for part in body.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(
                    f"sampler spec {spec!r}: expected KEY=VALUE pairs (NAME=WEIGHT for fixed) separated by commas, "
                    f"got {part!r}"
                )
            pairs.append((key.strip(), value.strip()))
    return kind, pairs


def spec_help() -> str:
    """The accepted spec forms, for messages and ``--help``."""
    return " | ".join(REGISTRY[name].spec_form for name in REGISTRY)


def typed_args(spec: str, pairs: list[tuple[str, str]], params: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Convert a sampler's ``KEY=VALUE`` pairs with ``params`` (key -> converter); unknown or repeated keys refused."""
    out: dict[str, Any] = {}
    if pairs and not params:
        raise ValueError(f"sampler spec {spec!r}: this sampler takes no arguments; expected one of {spec_help()}")
    for key, value in pairs:
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            raise ValueError(f"sampler spec {spec!r}: unknown argument {key!r} (arguments: {known})")
        if key in out:
            raise ValueError(f"sampler spec {spec!r}: {key!r} given twice")
        try:
            out[key] = params[key](value)
        except ValueError:
            raise ValueError(f"sampler spec {spec!r}: {key}={value!r} is not a valid value") from None
    return out


def domain_gaps(ce_mean: np.ndarray, nll_mean: np.ndarray, signal: str) -> np.ndarray:
    """The gap signal g [N] from per-domain means (NaN where a domain has no observations).

    ``ppl-ratio``: exp(min(CE - NLL, LOG_GAP_CAP)); ``loss-ratio``: CE / max(NLL, MIN_TEACHER_NLL).
    """
    if signal not in SIGNALS:
        raise ValueError(f"unknown gap signal {signal!r}; choose one of {SIGNALS}")
    ce, nll = np.asarray(ce_mean, np.float64), np.asarray(nll_mean, np.float64)
    if signal == "ppl-ratio":
        return np.exp(np.minimum(ce - nll, LOG_GAP_CAP))
    return ce / np.maximum(nll, MIN_TEACHER_NLL)


def softmax(x: np.ndarray) -> np.ndarray:
    """Stable softmax of a float64 vector; -inf entries get 0."""
    z = np.asarray(x, np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Counts [N] summing to ``total``: floor(total * w), plus one for the largest remainders (ties: lower index)."""
    target = np.asarray(weights, np.float64) * total
    counts = np.floor(target).astype(np.int64)
    short = int(total - counts.sum())
    if short > 0:
        order = np.argsort(-(target - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


class DomainSampler:
    """Common interface: ``weights`` [N], ``update(stats)``, ``should_update(step)``, draws, state, history.

    Args:
        domains: domain names (order fixes the weight vector's order).
        weights: initial weights [N] (normalised here).
        signal: gap signal recorded in the history (and used by DDK): ``ppl-ratio`` or ``loss-ratio``.
        update_every: K, the number of steps between updates.
    """

    name: ClassVar[str] = "base"
    #: How the spec is written, for help texts (e.g. ``fixed:NAME=W,...``).
    spec_form: ClassVar[str] = "base"

    @classmethod
    def from_spec(
        cls, spec: str, pairs: list[tuple[str, str]], domains: Sequence[str], options: SamplerOptions
    ) -> DomainSampler:
        """Build from a parsed spec (see :func:`parse_spec`); the default takes no arguments."""
        typed_args(spec, pairs, {})
        return cls(domains, signal=options.signal, update_every=options.update_every)

    def __init__(self, domains: Sequence[str], weights: Any, *, signal: str = "ppl-ratio", update_every: int = 1000):
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"{self.name} sampler: domains must be a non-empty list of unique names, got {domains}")
        if signal not in SIGNALS:
            raise ValueError(f"{self.name} sampler: unknown signal {signal!r}; choose one of {SIGNALS}")
        if int(update_every) < 1:
            raise ValueError(f"{self.name} sampler: update_every (K) must be >= 1, got {update_every}")
        self.signal, self.update_every = signal, int(update_every)
        w = np.asarray(weights, np.float64)
        self._weights = w / w.sum()
        self._gaps = np.full(len(self.domains), np.nan)
        self._credit = np.zeros(len(self.domains))  # exact-quota carry-over between batches
        self.history: list[dict[str, Any]] = []

    @property
    def weights(self) -> np.ndarray:
        """Current domain mix [N] float64, sums to 1 (a copy)."""
        return self._weights.copy()

    @property
    def gaps(self) -> np.ndarray:
        """Last gap per domain [N] (NaN until the domain is first measured)."""
        return self._gaps.copy()

    def should_update(self, step: int) -> bool:
        """True every K steps (step counts optimiser steps from 0; never at step 0)."""
        return step > 0 and step % self.update_every == 0

    def update(self, stats: GapStats, step: int | None = None) -> bool:
        """Read the stats since the last update, record gaps, maybe reweight. Returns True if the weights changed."""
        if stats.domains != self.domains:
            raise ValueError(f"{self.name} sampler: stats domains {stats.domains} differ from {self.domains}")
        ce, nll, count = stats.means()
        observed = count > 0
        bad = [self.domains[i] for i in np.flatnonzero(observed & (np.isnan(ce) | np.isnan(nll)))]
        if bad:
            raise ValueError(f"{self.name} sampler: NaN student CE or teacher NLL for domains {bad}; training diverged")
        self._gaps[observed] = domain_gaps(ce, nll, self.signal)[observed]
        changed = self._reweight()
        self.history.append(
            {
                "step": step,
                "weights": self._weights.tolist(),
                "gaps": self._gaps.tolist(),
                "ce": ce.tolist(),
                "nll": nll.tolist(),
                "tokens": count.tolist(),
                "observed": observed.tolist(),
                "changed": changed,
            }
        )
        return changed

    def _reweight(self) -> bool:
        return False

    def draw(self, batch_size: int, rng: np.random.Generator, exact: bool = False) -> np.ndarray:
        """Domain index of each of ``batch_size`` samples [B] int64.

        ``exact=False``: independent draws from ``weights``. ``exact=True``: quotas by largest remainder of
        ``credit + B * w``, where ``credit`` carries each domain's rounding deficit to the next batch, so cumulative
        counts stay within about one sample of the target even for B = 1; the order is shuffled with ``rng``.
        """
        if batch_size < 1:
            raise ValueError(f"draw: batch_size must be >= 1, got {batch_size}")
        if not exact:
            return rng.choice(len(self.domains), size=batch_size, p=self._weights).astype(np.int64)
        want = self._credit + batch_size * self._weights
        target = np.maximum(want, 0.0)
        counts = largest_remainder(target / target.sum(), batch_size)
        self._credit = want - counts
        return rng.permutation(np.repeat(np.arange(len(self.domains), dtype=np.int64), counts))

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "domains": list(self.domains),
            "signal": self.signal,
            "update_every": self.update_every,
            "weights": self._weights.tolist(),
            "gaps": self._gaps.tolist(),
            "credit": self._credit.tolist(),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore weights, gaps, quota carry-over and history; K comes from the checkpoint (a resume continues it)."""
        for key, mine in (("name", self.name), ("domains", self.domains), ("signal", self.signal)):
            if state[key] != mine:
                raise ValueError(f"{self.name} sampler: checkpoint has {key}={state[key]!r}, this run {mine!r}")
        self.update_every = int(state["update_every"])
        self._weights = np.asarray(state["weights"], np.float64)
        self._gaps = np.asarray(state["gaps"], np.float64)
        self._credit = np.asarray(state["credit"], np.float64)
        self.history = copy.deepcopy(list(state["history"]))

    def describe(self) -> str:
        mix = " ".join(f"{d}={w:.3f}" for d, w in zip(self.domains, self._weights, strict=True))
        return f"{self.name}({self._describe_args()}): {mix}"

    def _describe_args(self) -> str:
        return f"signal={self.signal}, every={self.update_every}"
