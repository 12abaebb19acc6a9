"""Knobs of the top-k codec (docs/CODEC.md), as recorded in a dump's manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CodecConfig:
    """Knobs of the top-k codec (recorded in the dump manifest via ``TopKCodec.describe``).

    Attributes:
        step_top: quantisation step (nats) of log-probabilities at the row's top entry (d = 0).
        step_max: largest step (nats), reached at d = 2 ln(step_max / step_top) below the top entry.
        mass_step: step (nats) of the per-row logit of the top-k probability mass (tail mode accuracy).
        eg_precision: Exp-Golomb mantissa bits folded into the entropy-coded symbol (0-3).
        zstd_level: zstd level of the large id-index streams (pure entropy coding: higher levels gain nothing).
        zstd_level_small: zstd level of the other, small streams (table, counts, value codes), where matches pay.
    """

    step_top: float = 0.045
    step_max: float = 0.5
    mass_step: float = 1.0 / 32
    eg_precision: int = 2
    zstd_level: int = 3
    zstd_level_small: int = 19

    def __post_init__(self) -> None:
        # The lower bounds keep every code below 2^32, which the one-byte Exp-Golomb symbols rely on.
        if not (1e-4 <= self.step_top <= self.step_max <= 10):
            raise ValueError(
                f"CodecConfig: need 1e-4 <= step_top <= step_max <= 10, got {self.step_top}, {self.step_max}"
            )
        if not 2**-10 <= self.mass_step <= 1:
            raise ValueError(f"CodecConfig: mass_step must be in [2^-10, 1], got {self.mass_step}")
        if self.eg_precision not in (0, 1, 2, 3):
            raise ValueError(f"CodecConfig: eg_precision must be 0..3, got {self.eg_precision}")
        for name in ("zstd_level", "zstd_level_small"):
            if not 1 <= getattr(self, name) <= 22:
                raise ValueError(f"CodecConfig: {name} must be 1..22, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"CodecConfig: unknown fields {sorted(unknown)} (written by a newer codec?)")
        return cls(**d)
