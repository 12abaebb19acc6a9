"""Domain samplers for phase two: DDK (Liu et al. 2024, arXiv 2407.16154, Eq. 1-2, Algorithm 1) and baselines.

A sampler owns the domain mix ``w`` (``weights``, shape [N], sums to 1) of the data drawn in the next steps. The
trainer feeds it a `GapStats` (per-domain sums of the student's CE and the teacher's stored NLL over the same
positions since the last update) every K steps; the DDK sampler moves weight towards the domains where the student
lags the teacher most, the baselines keep their weights but log the same gap series.

DDK with N domains and smoothing ``alpha``:

    gap         g_i = exp(CE_i - NLL_i)   ("ppl-ratio", the paper's PPL_S / PPL_T)   or   CE_i / NLL_i ("loss-ratio")
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
- Overflow of g itself. With ppl-ratio, g = exp(CE - NLL) overflows float64 for CE - NLL > ~709 nats (a diverged
  student). We cap the exponent at ``LOG_GAP_CAP = 700`` (g <= e^700 ~ 1e304, finite). Below the cap nothing
  changes; at the cap the update is already an argmax, and capped domains tie, so they share the weight equally.
  A NaN CE or NLL is an error (training diverged or the stats are broken), never silently replaced.
- Loss-ratio divides by the teacher NLL, floored at ``MIN_TEACHER_NLL = 1e-6`` nats so a domain the teacher predicts
  perfectly gives a large but finite gap.
- A domain with no new observations since the last update keeps its last gap (marked ``observed: False`` in the
  history): with the floor, each domain gets about K * B * (1 - alpha) / N samples between updates, so this only
  happens with tiny K * B or an empty validation split, and dropping or zeroing the gap would move its weight for no
  reason. A domain never measured keeps the whole sampler at the uniform warm-up.

The sampler does not reset the stats; the caller does, after logging them. `GapStats.as_array` /
`GapStats.load_array` expose the raw sums as one float64 array [3, N] for torch.distributed all-reduce.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SIGNALS = ("ppl-ratio", "loss-ratio")
LOG_GAP_CAP = 700.0
MIN_TEACHER_NLL = 1e-6
SAMPLER_SPECS = "ddk | uniform | proportional | fixed:NAME=W,NAME=W,..."


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    """Accept numpy arrays, scalars, lists and (CPU or GPU) torch tensors without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class GapStats:
    """Per-domain running sums of student CE and teacher NLL over the same positions, since the last reset.

    Args:
        domains: domain names, in the order the sampler uses.
    """

    def __init__(self, domains: Sequence[str]) -> None:
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"GapStats: domains must be a non-empty list of unique names, got {self.domains}")
        self._index = {name: i for i, name in enumerate(self.domains)}
        self._sums = np.zeros((3, len(self.domains)), dtype=np.float64)  # rows: ce_sum, nll_sum, count

    def index(self, domain: int | str) -> int:
        """Domain index from an index or a name."""
        if isinstance(domain, (int, np.integer)):
            if not 0 <= int(domain) < len(self.domains):
                raise IndexError(f"GapStats: domain index {domain} out of range 0..{len(self.domains) - 1}")
            return int(domain)
        if domain not in self._index:
            raise KeyError(f"GapStats: unknown domain {domain!r}; known: {self.domains}")
        return self._index[domain]

    def add(self, domain: int | str, ce_sum: float, nll_sum: float, count: float) -> None:
        """Add the student CE sum, teacher NLL sum and position count of one domain (same positions for both)."""
        i = self.index(domain)
        self._sums[:, i] += (float(ce_sum), float(nll_sum), float(count))

    def add_rows(self, domain_idx: Any, ce_sum: Any, nll_sum: Any, count: Any) -> None:
        """Vectorised `add` from per-row arrays.

        Args:
            domain_idx: [B] int, domain index of each row.
            ce_sum: [B] student CE summed over the row's labelled positions.
            nll_sum: [B] teacher NLL summed over the same positions.
            count: [B] number of those positions.
        """
        idx = _to_numpy(domain_idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.domains)):
            raise IndexError(f"GapStats.add_rows: domain index out of range 0..{len(self.domains) - 1}")
        n = len(self.domains)
        for row, values in enumerate((ce_sum, nll_sum, count)):
            v = _to_numpy(values, np.float64).reshape(-1)
            if v.shape != idx.shape:
                raise ValueError(f"GapStats.add_rows: shape {v.shape} does not match domain_idx {idx.shape}")
            self._sums[row] += np.bincount(idx, weights=v, minlength=n)

    def reset(self) -> None:
        self._sums[:] = 0.0

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (ce_mean [N], nll_mean [N], count [N]); means are NaN where count is 0."""
        ce, nll, count = self._sums
        with np.errstate(invalid="ignore", divide="ignore"):
            seen = count > 0
            return np.where(seen, ce / count, np.nan), np.where(seen, nll / count, np.nan), count.copy()

    def as_array(self) -> np.ndarray:
        """A float64 copy [3, N] (ce_sum, nll_sum, count): all-reduce it (sum) across ranks, then `load_array`."""
        return self._sums.copy()

    def load_array(self, sums: Any) -> None:
        arr = _to_numpy(sums, np.float64)
        if arr.shape != self._sums.shape:
            raise ValueError(f"GapStats.load_array: expected shape {self._sums.shape}, got {arr.shape}")
        self._sums[:] = arr

    def state_dict(self) -> dict[str, Any]:
        return {"domains": list(self.domains), "sums": self._sums.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["domains"]) != self.domains:
            raise ValueError(f"GapStats: checkpoint domains {state['domains']} differ from {self.domains}")
        self.load_array(state["sums"])


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

    name = "base"

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


class UniformSampler(DomainSampler):
    """Equal weight on every domain ("equal sampling" in the paper's ablation)."""

    name = "uniform"

    def __init__(self, domains: Sequence[str], **kwargs: Any) -> None:
        super().__init__(domains, np.ones(len(domains)), **kwargs)


class FixedSampler(DomainSampler):
    """Static weights given by the user (``fixed:a=0.5,b=0.5``) or by token counts (``proportional``)."""

    def __init__(self, domains: Sequence[str], weights: Mapping[str, float], *, name: str = "fixed", **kw: Any):
        self.name = name
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


class DDKSampler(DomainSampler):
    """DDK's factor smooth updating (paper Eq. 1-2) in log space; see the module docstring for the rules.

    Args:
        domains: domain names.
        alpha: smoothing in [0, 1]; every domain keeps at least (1 - alpha) / N. Paper: 0.5.
        smooth_init: apply alpha to the first mix too (default); False gives the paper's r_0 = softmax(g).
        signal, update_every: see `DomainSampler`.
    """

    name = "ddk"

    def __init__(self, domains: Sequence[str], *, alpha: float = 0.5, smooth_init: bool = True, **kwargs: Any):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"ddk sampler: ddk_alpha must be in [0, 1], got {alpha}")
        super().__init__(domains, np.ones(len(domains)), **kwargs)
        self.alpha, self.smooth_init = float(alpha), bool(smooth_init)
        self.started = False  # False while in the uniform warm-up (some domain never measured)

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
        self._weights = self.alpha * softmax(log_psi) + self.floor
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "smooth_init": self.smooth_init, "started": self.started}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha, self.smooth_init, self.started = float(state["alpha"]), bool(state["smooth_init"]), state["started"]

    def _describe_args(self) -> str:
        return f"signal={self.signal}, alpha={self.alpha}, every={self.update_every}"


def _parse_fixed(spec: str, body: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in body.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"sampler spec {spec!r}: expected NAME=WEIGHT pairs separated by commas, got {part!r}")
        if name in weights:
            raise ValueError(f"sampler spec {spec!r}: domain {name!r} given twice")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"sampler spec {spec!r}: weight of {name!r} is not a number: {value!r}") from None
    return weights


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
    """Build a sampler from a spec string: ``ddk``, ``uniform``, ``proportional`` or ``fixed:a=0.5,b=0.5``.

    Args:
        spec: the sampler spec (see `SAMPLER_SPECS`).
        domains: domain names, in the order of the weight vector.
        train_tokens: train tokens per domain (the dump manifest's counts); required by ``proportional``.
        alpha: DDK smoothing (``--ddk-alpha``); ignored by the baselines.
        signal: gap signal (``--ddk-signal``), logged by every sampler and used by DDK.
        update_every: K, steps between updates.
        smooth_init: DDK only, see `DDKSampler`.
    """
    kind, colon, body = spec.strip().partition(":")
    kind = kind.strip().lower()
    common = {"signal": signal, "update_every": update_every}
    if kind != "fixed" and colon:
        raise ValueError(f"sampler spec {spec!r}: {kind!r} takes no arguments; expected one of {SAMPLER_SPECS}")
    if kind == "ddk":
        return DDKSampler(domains, alpha=alpha, smooth_init=smooth_init, **common)
    if kind == "uniform":
        return UniformSampler(domains, **common)
    if kind == "proportional":
        if train_tokens is None:
            raise ValueError("sampler 'proportional' needs train_tokens per domain (from the dump manifest)")
        return FixedSampler(domains, train_tokens, name="proportional", **common)
    if kind == "fixed":
        if not body.strip():
            raise ValueError(f"sampler spec {spec!r}: 'fixed' needs weights, e.g. fixed:{domains[0]}=1.0")
        return FixedSampler(domains, _parse_fixed(spec, body), name="fixed", **common)
    raise ValueError(f"unknown sampler spec {spec!r}; expected one of {SAMPLER_SPECS}")
