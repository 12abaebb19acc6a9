"""`--sampler doremi` (issue #17): online DoReMi with the teacher's stored NLL as the reference, against hand
computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddk_offline.distillation.samplers import GapStats, make_sampler


def _stats(ce, nll, count):
    s = GapStats(["a", "b", "c"])
    for i, (c, n, k) in enumerate(zip(ce, nll, count, strict=True)):
        if k:
            s.add(i, c * k, n * k, k)
    return s


def test_one_update_by_hand():
    sampler = make_sampler("doremi", ["a", "b", "c"], update_every=1)
    assert sampler.weights.tolist() == pytest.approx([1 / 3] * 3)
    # Excess losses: a 0.5 nats over the teacher, b below the teacher (clipped to 0), c 1.0.
    sampler.update(_stats([2.5, 1.0, 3.0], [2.0, 1.5, 2.0], [10, 10, 10]), step=1)
    e = np.exp([0.5, 0.0, 1.0])
    want = (1 - 1e-3) * e / e.sum() + 1e-3 / 3
    assert sampler.weights == pytest.approx(want)
    assert sampler.excess.tolist() == [0.5, 0.0, 1.0]


def test_updates_compound_and_spec_arguments_apply():
    sampler = make_sampler("doremi:eta=0.5,c=0.1", ["a", "b", "c"], update_every=2)
    w = np.full(3, 1 / 3)
    for excess in ([1.0, 0.0, 0.0], [0.0, 2.0, 0.0]):
        sampler.update(_stats([2.0 + x for x in excess], [2.0] * 3, [5] * 3), step=2)
        a = w * np.exp(0.5 * np.array(excess))
        w = 0.9 * a / a.sum() + 0.1 / 3
    assert sampler.weights == pytest.approx(w)
    assert "eta=0.5, c=0.1, every=2" in sampler.describe()


def test_an_unseen_domain_gets_no_excess_and_state_round_trips():
    sampler = make_sampler("doremi", ["a", "b", "c"])
    sampler.update(_stats([3.0, 3.0, 0.0], [2.0, 2.0, 0.0], [4, 4, 0]), step=1)
    assert sampler.excess.tolist() == [1.0, 1.0, 0.0]
    again = make_sampler("doremi", ["a", "b", "c"])
    again.load_state_dict(sampler.state_dict())
    assert again.weights.tolist() == sampler.weights.tolist() and again.excess.tolist() == [1.0, 1.0, 0.0]
    assert math.isclose(float(sampler.weights.sum()), 1.0)


@pytest.mark.parametrize("spec, message", [("doremi:eta=0", "eta must be > 0"), ("doremi:c=2", "must be in")])
def test_bad_arguments_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(spec, ["a", "b"])


def test_a_run_with_doremi_moves_the_mix(tmp_path):
    import json

    import tiny
    from synthdump import write_synth_dump

    from ddk_offline.distillation import DistillConfig, distill

    tok = tiny.train_tokenizer(128)
    dump = write_synth_dump(tmp_path / "dump", tok)
    student = tiny.write_student_config(tmp_path / "student.json", len(tok))
    out = tmp_path / "run"
    distill(DistillConfig(dump=str(dump), out=str(out), student_config=str(student), sampler="doremi:eta=5",
                          kd_weight=0.0, max_steps=6, batch_size=2, ddk_interval=2, log_every=1, device="cpu",
                          lr=3e-3, data_workers=0))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["weights"] == pytest.approx({d: 1 / len(rows[0]["weights"]) for d in rows[0]["weights"]})
    assert rows[-1]["weights"] != rows[0]["weights"]  # a fresh student is far above the teacher: excess > 0
