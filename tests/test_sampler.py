"""Domain samplers: DDK math against hand-computed values, log-space stability, floors, baselines, specs, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddk_offline.distillation.samplers import (
    LOG_GAP_CAP,
    DDKSampler,
    GapStats,
    domain_gaps,
    largest_remainder,
    make_sampler,
)

DOMAINS = ["a", "b", "c"]


def _stats(means: dict[str, tuple[float, float]], count: float = 10.0, domains=DOMAINS) -> GapStats:
    """GapStats with the given (mean CE, mean NLL) per domain over ``count`` positions."""
    stats = GapStats(domains)
    for name, (ce, nll) in means.items():
        stats.add(name, ce * count, nll * count, count)
    return stats


# ---------------------------------------------------------------- GapStats


def test_gapstats_add_rows_means_and_allreduce_array():
    stats = GapStats(DOMAINS)
    stats.add("a", 6.0, 4.0, 2)
    stats.add(2, 1.0, 1.0, 1)
    # Per-row arrays, including a torch tensor: rows 0 and 2 belong to b, row 1 to a.
    stats.add_rows(torch.tensor([1, 0, 1]), np.array([3.0, 3.0, 1.0]), [2.0, 2.0, 2.0], np.array([1, 2, 1]))
    ce, nll, count = stats.means()
    np.testing.assert_allclose(ce, [9.0 / 4, 4.0 / 2, 1.0])
    np.testing.assert_allclose(nll, [6.0 / 4, 4.0 / 2, 1.0])
    np.testing.assert_array_equal(count, [4, 2, 1])

    # What a sum all-reduce over two identical ranks does: sums and counts double, means unchanged.
    arr = stats.as_array()
    assert arr.shape == (3, 3) and arr.dtype == np.float64
    stats.load_array(torch.from_numpy(arr * 2))
    np.testing.assert_array_equal(stats.means()[2], [8, 4, 2])
    np.testing.assert_allclose(stats.means()[0], ce)

    other = GapStats(DOMAINS)
    other.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    np.testing.assert_array_equal(other.as_array(), stats.as_array())

    stats.reset()
    ce, _, count = stats.means()
    assert np.isnan(ce).all() and (count == 0).all()


def test_gapstats_errors():
    stats = GapStats(DOMAINS)
    with pytest.raises(KeyError, match="unknown domain 'zz'"):
        stats.add("zz", 1, 1, 1)
    with pytest.raises(IndexError, match="out of range"):
        stats.add_rows([0, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="does not match"):
        stats.add_rows([0, 1], [1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="unique"):
        GapStats(["a", "a"])


# ---------------------------------------------------------------- DDK math, by hand


def test_ddk_hand_computed_two_updates():
    # Update 1, every domain measured: CE - NLL = 1.0, 0.5, 0.0 -> g = e, e^0.5, 1 = 2.71828, 1.64872, 1.0
    #   exp(g) = 15.15426, 5.20033, 2.71828, sum 23.07287 -> softmax(g) = 0.65680, 0.22539, 0.11781
    #   r_0 = 0.5 * softmax(g) + 0.5 / 3 = 0.49507, 0.27936, 0.22557
    # Update 2: a: CE 2.2 vs NLL 2.0 -> g = e^0.2 = 1.22140; b: CE = NLL -> g = 1; c not observed -> keeps g = 1
    #   psi = r_0 * exp(g) = 0.49507 * 3.39185, 0.27936 * e, 0.22557 * e = 1.67924, 0.75938, 0.61317 (sum 3.05179)
    #   r_1 = 0.5 * psi / 3.05179 + 1/6 = 0.44179, 0.29108, 0.26713
    s = make_sampler("ddk", DOMAINS, alpha=0.5, signal="ppl-ratio")
    np.testing.assert_allclose(s.weights, [1 / 3] * 3)
    assert s.update(_stats({"a": (3.0, 2.0), "b": (2.5, 2.0), "c": (2.0, 2.0)}), step=100)
    np.testing.assert_allclose(s.gaps, [2.71828, 1.64872, 1.0], atol=1e-5)
    np.testing.assert_allclose(s.weights, [0.49507, 0.27936, 0.22557], atol=1e-5)
    assert s.update(_stats({"a": (2.2, 2.0), "b": (2.0, 2.0)}), step=200)
    np.testing.assert_allclose(s.gaps, [1.22140, 1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(s.weights, [0.44179, 0.29108, 0.26713], atol=1e-5)
    assert s.history[-1]["observed"] == [True, True, False] and s.history[-1]["step"] == 200
    assert math.isclose(s.weights.sum(), 1.0, abs_tol=1e-12)


def test_loss_ratio_signal_and_paper_start():
    # CE / NLL = 3/2, 2.5/2, 2/2 = 1.5, 1.25, 1.0; paper start (alpha = 1 at init): r_0 = softmax(g) exactly.
    s = make_sampler("ddk", DOMAINS, signal="loss-ratio", smooth_init=False)
    s.update(_stats({"a": (3.0, 2.0), "b": (2.5, 2.0), "c": (2.0, 2.0)}))
    np.testing.assert_allclose(s.gaps, [1.5, 1.25, 1.0])
    e = np.exp([1.5, 1.25, 1.0])  # 4.48169, 3.49034, 2.71828, sum 10.69031 -> 0.41923, 0.32650, 0.25428
    np.testing.assert_allclose(s.weights, e / e.sum())
    np.testing.assert_allclose(s.weights, [0.41923, 0.32650, 0.25427], atol=1e-5)


def test_uniform_until_every_domain_measured():
    s = DDKSampler(DOMAINS)
    assert not s.update(_stats({"a": (5.0, 2.0), "b": (3.0, 2.0)}))
    np.testing.assert_array_equal(s.weights, [1 / 3] * 3)
    assert not s.started and np.isnan(s.gaps[2])
    assert s.update(_stats({"c": (2.0, 2.0)}))  # a and b keep their gaps, c is now measured
    assert s.started and s.weights.argmax() == 0


def test_log_space_equals_naive_where_finite():
    rng = np.random.default_rng(0)
    s = DDKSampler([f"d{i}" for i in range(5)], alpha=0.3)
    r = None
    for _ in range(20):
        ce, nll = rng.uniform(2.0, 6.0, 5), rng.uniform(1.5, 3.0, 5)
        stats = GapStats(s.domains)
        stats.add_rows(np.arange(5), ce * 7, nll * 7, np.full(5, 7))
        s.update(stats)
        g = np.exp(ce - nll)  # up to e^4.5 = 90: exp(g) still finite in float64
        if r is None:
            r = 0.3 * np.exp(g) / np.exp(g).sum() + 0.7 / 5
        else:
            psi = r * np.exp(g)
            r = 0.3 * psi / psi.sum() + 0.7 / 5
        np.testing.assert_allclose(s.weights, r, rtol=1e-12, atol=1e-15)


def test_no_overflow_at_huge_ratios():
    # Ratio 1e4 (a fresh student): exp(g) = exp(1e4) overflows, log psi does not; the update is argmax + floor.
    s = DDKSampler(DOMAINS, alpha=0.5)
    big = math.log(1e4)
    for _ in range(3):
        with np.errstate(over="raise", invalid="raise"):
            s.update(_stats({"a": (2.0 + big, 2.0), "b": (2.0 + big - 0.01, 2.0), "c": (2.0, 2.0)}))
        np.testing.assert_allclose(s.gaps[0], 1e4, rtol=1e-9)
        np.testing.assert_allclose(s.weights, [0.5 + 1 / 6, 1 / 6, 1 / 6], atol=1e-12)
    # CE - NLL beyond what float64 exp can hold: the exponent is capped, capped domains tie and share alpha.
    s.update(_stats({"a": (900.0, 2.0), "b": (2000.0, 2.0), "c": (2.0, 2.0)}))
    assert np.isfinite(s.gaps).all() and s.gaps[0] == s.gaps[1] == math.exp(LOG_GAP_CAP)
    assert np.isfinite(s.weights).all() and math.isclose(s.weights.sum(), 1.0)
    assert s.weights[2] == pytest.approx(1 / 6) and s.weights[0] == pytest.approx(s.weights[1])


def test_nan_loss_is_an_error():
    s = DDKSampler(DOMAINS)
    with pytest.raises(ValueError, match=r"NaN .* \['b'\]"):
        s.update(_stats({"a": (2.0, 2.0), "b": (float("nan"), 2.0), "c": (2.0, 2.0)}))


@pytest.mark.parametrize("signal", ["ppl-ratio", "loss-ratio"])
def test_hard_domain_gains_weight_and_floor_holds(signal):
    # Simulated student: CE on every domain falls towards the teacher's NLL at a rate that grows with that
    # domain's share of the data; on "hard" it stays 1.5 nats above. Data are drawn per sample from the weights.
    domains = ["easy1", "easy2", "hard", "easy3"]
    alpha = 0.5
    s = make_sampler("ddk", domains, alpha=alpha, signal=signal, update_every=10)
    floor = (1 - alpha) / len(domains)
    rng = np.random.default_rng(0)
    teacher = np.array([2.0, 2.5, 3.0, 1.5])
    excess = np.array([4.0, 4.0, 4.0, 4.0])
    for step in range(1, 601):
        batch = s.draw(16, rng)
        ce = teacher + excess
        excess = np.maximum(excess - 0.002 * np.bincount(batch, minlength=4), 0.0)
        excess[2] = max(excess[2], 1.5)
        if step == 1:
            stats = GapStats(domains)
        stats.add_rows(batch, ce[batch] * 64, teacher[batch] * 64, np.full(len(batch), 64))
        if s.should_update(step):
            s.update(stats, step=step)
            stats.reset()
            assert (s.weights >= floor - 1e-15).all(), s.weights
            assert math.isclose(s.weights.sum(), 1.0, abs_tol=1e-12)
    final = s.weights
    # The easy domains converge (gap -> 1 in both signals), "hard" does not: it ends as the clear argmax, above
    # both the uniform share and its own first DDK weight, while the others sit near, never below, the floor.
    assert final.argmax() == 2 and final[2] > 1 / len(domains) + 0.1, final
    assert final[2] > s.history[0]["weights"][2]
    assert np.all(np.delete(final, 2) >= floor - 1e-15)
    assert len(s.history) == 60


# ---------------------------------------------------------------- baselines and specs


def test_uniform_proportional_fixed():
    stats = _stats({"a": (3.0, 2.0), "b": (2.0, 2.0), "c": (2.0, 2.0)})
    u = make_sampler("uniform", DOMAINS)
    assert not u.update(stats)
    np.testing.assert_array_equal(u.weights, [1 / 3] * 3)
    np.testing.assert_allclose(u.history[-1]["gaps"], [math.e, 1.0, 1.0])  # gaps logged for baselines too

    p = make_sampler("proportional", DOMAINS, train_tokens={"a": 600, "b": 300, "c": 100})
    np.testing.assert_allclose(p.weights, [0.6, 0.3, 0.1])
    assert not p.update(stats) and p.describe().startswith("proportional(")

    f = make_sampler(" fixed: c=1, a=2 ,b=1", DOMAINS)
    np.testing.assert_allclose(f.weights, [0.5, 0.25, 0.25])
    assert "a=0.500" in f.describe()
    assert make_sampler("fixed:a=0,b=1,c=1", DOMAINS).weights[0] == 0.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ddkk", "unknown sampler spec"),
        ("uniform:a=1", "takes no arguments"),
        ("fixed", "needs weights"),
        ("fixed:a=1,b=1", r"missing \['c'\]"),
        ("fixed:a=1,b=1,c=1,d=1", r"unknown \['d'\]"),
        ("fixed:a=1,b=1,c", "NAME=WEIGHT"),
        ("fixed:a=1,b=x,c=1", "not a number"),
        ("fixed:a=1,a=2,b=1,c=1", "given twice"),
        ("fixed:a=0,b=0,c=0", "sum to 0"),
        ("fixed:a=-1,b=1,c=1", ">= 0"),
        ("proportional", "needs train_tokens"),
    ],
)
def test_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(spec, DOMAINS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ddk_alpha"):
        make_sampler("ddk", DOMAINS, alpha=1.5)
    with pytest.raises(ValueError, match="unknown signal"):
        make_sampler("ddk", DOMAINS, signal="kl")
    with pytest.raises(ValueError, match="update_every"):
        make_sampler("uniform", DOMAINS, update_every=0)
    with pytest.raises(ValueError, match="unknown gap signal"):
        domain_gaps(np.ones(2), np.ones(2), "ratio")
    s = make_sampler("ddk", DOMAINS, update_every=5)
    assert [s.should_update(i) for i in range(11)] == [i in (5, 10) for i in range(11)]
    with pytest.raises(ValueError, match="stats domains"):
        s.update(GapStats(["a", "b"]))


# ---------------------------------------------------------------- state and draws


def _random_stats(rng: np.random.Generator) -> GapStats:
    stats = GapStats(DOMAINS)
    stats.add_rows(np.arange(3), rng.uniform(2, 5, 3) * 9, rng.uniform(1, 3, 3) * 9, np.full(3, 9))
    return stats


def test_state_dict_round_trip_reproduces_later_weights_exactly():
    rng = np.random.default_rng(1)
    a = make_sampler("ddk", DOMAINS, alpha=0.4)
    for _ in range(3):
        a.update(_random_stats(rng))
    a.draw(5, rng, exact=True)  # leaves a non-zero quota carry-over in the state
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints may store it as JSON
    b = make_sampler("ddk", DOMAINS, alpha=0.4)
    b.load_state_dict(state)
    assert b.history == a.history and b.started
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(4):
        stats = _random_stats(rng)
        a.update(stats)
        b.update(stats)
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.draw(7, rng_a, exact=True), b.draw(7, rng_b, exact=True))
    with pytest.raises(ValueError, match="checkpoint has name='ddk'"):
        make_sampler("uniform", DOMAINS).load_state_dict(state)


def test_draws_follow_weights():
    s = make_sampler("fixed:a=0.6,b=0.3,c=0.1", DOMAINS)
    rng = np.random.default_rng(0)
    draws = s.draw(20000, rng)
    assert draws.dtype == np.int64 and draws.shape == (20000,)
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 20000, [0.6, 0.3, 0.1], atol=0.015)

    # Exact quotas: a batch of 10 is exactly 6/3/1; batches of 1 track the target within one sample.
    np.testing.assert_array_equal(np.bincount(s.draw(10, rng, exact=True), minlength=3), [6, 3, 1])
    totals = np.zeros(3)
    for n in range(1, 101):
        totals += np.bincount(s.draw(1, rng, exact=True), minlength=3)
        assert np.all(np.abs(totals - n * s.weights) <= 1.0 + 1e-9), (n, totals)


def test_largest_remainder():
    np.testing.assert_array_equal(largest_remainder(np.array([0.5, 0.3, 0.2]), 4), [2, 1, 1])
    np.testing.assert_array_equal(largest_remainder(np.array([1 / 3] * 3), 4), [2, 1, 1])  # ties: lower index
    assert largest_remainder(np.array([0.25, 0.25, 0.5]), 7).sum() == 7


def test_a_saturated_ddk_update_is_flagged_and_warned_once():
    import warnings

    import numpy as np

    from ddk_offline.distillation.config import DistillConfig
    from ddk_offline.distillation.guards import SamplerSaturationWarning, warn_if_saturated
    from ddk_offline.distillation.samplers.ddk import DDKSampler

    sampler = DDKSampler(["a", "b", "c"], alpha=0.5)
    sampler._gaps = np.array([1.2, 1.1, 1.0])  # a pretrained student: gaps near 1, a smooth mix
    sampler._reweight()
    sampler._reweight()
    assert not sampler.saturated
    sampler._gaps = np.array([3000.0, 40.0, 35.0])  # a fresh student under ppl-ratio: exp(CE - NLL) in the thousands
    sampler._reweight()
    assert sampler.saturated
    assert np.allclose(sampler.weights, [0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3])  # argmax + floor
    cfg = DistillConfig(dump="d", out="o")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_saturated(sampler, cfg, 40)
        warn_if_saturated(sampler, cfg, 80)  # once per run
    assert len(caught) == 1 and issubclass(caught[0].category, SamplerSaturationWarning)
    assert "step 40: the DDK update saturated" in str(caught[0].message)
    assert "use --ddk-signal loss-ratio" in str(caught[0].message)
