"""Guards of a distill run: nothing non-finite is applied or saved, and a resume stays on its own dump.

- Every step checks its loss and gradient norm (which clipping computes anyway) before the optimiser applies them;
  under torchrun the ranks agree on the verdict. The first NaN or inf stops the run with the step, the likely
  cause and the last good checkpoint, which still exists: a checkpoint or ``final`` model with a non-finite weight
  is never written, so checkpoint rotation can never drop the last finite one.
- A checkpoint records its dump's identity (:meth:`Manifest.identity`); ``--resume`` on another dump is refused,
  naming what differs, while a moved dump (or another spelling of its path) resumes.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk_offline.distillation.checkpoint import latest_checkpoint
from ddk_offline.distillation.config import DistillConfig
from ddk_offline.errors import UserError
from ddk_offline.runtime import distributed


class NonFiniteError(UserError):
    """Training produced a NaN or inf: nothing non-finite was applied or saved; the last good checkpoint is named."""


def check_finite(env: distributed.DistEnv, cfg: DistillConfig, step: int, loss: float, grad_norm: float) -> None:
    """Raise :class:`NonFiniteError` when the step's loss or gradient norm is NaN/inf on any rank."""
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if env.active:
        bad = bool(distributed.all_reduce_sum(env, np.array([float(bad)]))[0])
    if bad:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        raise NonFiniteError(f"step {step}: the {what} is not finite, so the step was not applied. {_advice(cfg)}")


def check_weights(model: torch.nn.Module, cfg: DistillConfig, step: int, what: str) -> None:
    """Raise :class:`NonFiniteError` instead of writing ``what`` when a weight of ``model`` is NaN/inf."""
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    raise NonFiniteError(f"step {step}: the weights hold NaN or inf, so {what} was not written. {_advice(cfg)}")


def _advice(cfg: DistillConfig) -> str:
    path = latest_checkpoint(Path(cfg.out))
    where = (
        f"The last good checkpoint is {path}; a --resume with the same settings repeats the same steps, so start a "
        "new run (another --out) with the fix"
        if path is not None
        else "No checkpoint was written before it: start a new run with the fix"
    )
    return (
        f"Likely cause: a learning rate too high for this model (--lr {cfg.lr:g}; try 10x lower), or the loss "
        f"settings (--temperature {cfg.temperature:g}, --ce-weight {cfg.ce_weight:g}, --kd-weight "
        f"{cfg.kd_weight:g}). {where}."
    )


def check_same_dump(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: str, dump: str) -> None:
    """Refuse a resume on a dump other than the one the checkpoint was trained on, naming what differs.

    Checkpoints written before the identity was recorded (``saved`` None) resume unchecked.
    """
    if saved is None:
        return
    diffs = [f"{k}: {saved.get(k)!r} then vs {now.get(k)!r} now" for k in sorted(set(saved) | set(now))]
    diffs = [d for d, k in zip(diffs, sorted(set(saved) | set(now)), strict=True) if saved.get(k) != now.get(k)]
    if diffs:
        more = "; ..." if len(diffs) > 4 else ""
        raise UserError(
            f"{checkpoint}: --resume on another dump: {dump} is not the dump this run was trained on "
            f"({'; '.join(diffs[:4])}{more}). Fix: pass the original dump as --dump, or start a new run with "
            "another --out"
        )


class SamplerSaturationWarning(UserWarning):
    """A DDK update gave the whole smoothed share to one domain: the mix is argmax + floor."""


def warn_if_saturated(sampler: Any, cfg: DistillConfig, step: int) -> None:
    """Warn (once per run and sampler) when a DDK update saturated, naming the option that fixes it."""
    if not getattr(sampler, "saturated", False) or getattr(sampler, "_saturation_warned", False):
        return
    sampler._saturation_warned = True
    weights = ", ".join(f"{d}={w:.3f}" for d, w in zip(sampler.domains, sampler.weights, strict=True))
    fix = (
        "use --ddk-signal loss-ratio (meant for fresh or derived students, whose perplexity ratios are in the "
        "thousands)"
        if cfg.ddk_signal == "ppl-ratio"
        else "raise --ddk-alpha's floor (lower --ddk-alpha) or shorten --ddk-interval"
    )
    warnings.warn(
        f"step {step}: the DDK update saturated: one domain takes the whole smoothed share ({weights}), so the mix "
        f"follows the largest gap only, not the gaps; {fix}",
        SamplerSaturationWarning,
        stacklevel=2,
    )
