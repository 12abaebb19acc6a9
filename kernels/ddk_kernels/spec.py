"""What a KD loss call computes, as one value the autograd functions and kernels take (not a dozen arguments).

A KD target mode is an integer here (its index in :data:`KD_MODES`) and a ``tl.constexpr`` in the Triton kernels, so
a new mode is one new name in :data:`KD_MODES` and one branch per place that differs, not a new signature.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The KD target modes, the one list every caller validates against (ddk_offline imports it from here).
KD_MODES = ("renorm", "tail")
RENORM, TAIL = KD_MODES.index("renorm"), KD_MODES.index("tail")


@dataclass(frozen=True)
class KDSpec:
    """The loss's settings: ``alpha * CE + gamma * T^2 * KL`` at ``temperature``, targets as ``mode``.

    Attributes:
        temperature: T > 0.
        alpha, gamma: CE and KL weights.
        mode: an index into :data:`KD_MODES` (``RENORM`` or ``TAIL``).
        ignore_index: label of positions without a target.
        inplace: write the gradient into the logits (saves N·V·4 bytes; one backward only).
    """

    temperature: float
    alpha: float
    gamma: float
    mode: int
    ignore_index: int
    inplace: bool = False

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature

    @property
    def uses_lse(self) -> bool:
        """Whether the mode reads the teacher's stored logsumexp (tail mode: the exact probabilities)."""
        return self.mode == TAIL
