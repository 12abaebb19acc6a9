"""`assert_close` that reports max and mean absolute/relative difference on failure."""

from __future__ import annotations

import torch


def assert_close(actual, expected, *, rtol: float, atol: float, name: str = "value") -> None:
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{name}: non-finite values differ"
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((diff <= bound).all()):
        rel = diff / expected.abs().clamp_min(1e-30)
        worst = int(torch.argmax(diff - bound))
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
            f"max rel diff {rel.max().item():.3e} (rtol={rtol}, atol={atol}); "
            f"worst at flat index {worst}: {actual.flatten()[worst].item()!r} vs {expected.flatten()[worst].item()!r}"
        )
