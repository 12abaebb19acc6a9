"""Per-domain running sums of the student's CE and the teacher's stored NLL over the same positions.

The trainer adds every micro-batch's per-row sums; a sampler reads the means at each update. `GapStats.as_array` /
`GapStats.load_array` expose the raw sums as one float64 array [3, N] for torch.distributed all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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
