"""Phase-two data: per-domain shuffled streams (cursors, epochs, determinism, state) and the batch builder."""

from __future__ import annotations

import numpy as np
import pytest
from synthdump import write_synth_dump

from ddk_offline.distillation.data import IGNORE_INDEX, UNIT_ROWS, BatchLoader, DomainStream
from ddk_offline.format.reader import open_dump


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tokenizer):
    return open_dump(write_synth_dump(tmp_path_factory.mktemp("dump"), tokenizer, temps=(2.0,)))


def test_epoch_is_a_permutation_of_every_row():
    stream = DomainStream([70, 5, 33], seed=3, domain_index=1, window_units=2)
    first = stream.take(108)
    assert stream.state_dict() == {"epoch": 1, "pos": 0, "size": 108}
    pairs = sorted(map(tuple, first.tolist()))
    assert pairs == sorted((s, r) for s, n in enumerate([70, 5, 33]) for r in range(n))
    second = stream.take(108)
    assert sorted(map(tuple, second.tolist())) == pairs
    assert not np.array_equal(first, second), "a new epoch must reshuffle"


def test_rows_stay_inside_their_window():
    stream = DomainStream([4 * UNIT_ROWS], seed=0, domain_index=0, window_units=2)
    order = stream.order(0)
    for w in range(2):  # each window of 2 units holds exactly 2 row groups' rows
        units = set((order[w * 2 * UNIT_ROWS : (w + 1) * 2 * UNIT_ROWS, 1] // UNIT_ROWS).tolist())
        assert len(units) == 2


def test_take_across_an_epoch_boundary_and_state_round_trip():
    a = DomainStream([10, 7], seed=1, domain_index=0)
    b = DomainStream([10, 7], seed=1, domain_index=0)
    a.take(12)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.take(9), b.take(9))  # 5 from epoch 0, 4 from epoch 1
    assert a.state_dict() == b.state_dict() == {"epoch": 1, "pos": 4, "size": 17}
    with pytest.raises(ValueError, match="dump the run started with"):
        DomainStream([10], seed=1, domain_index=0).load_state_dict(a.state_dict())


def test_streams_depend_on_seed_and_domain():
    orders = [DomainStream([50], seed=s, domain_index=d).order(0) for s, d in ((0, 0), (1, 0), (0, 1))]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    np.testing.assert_array_equal(orders[0], DomainStream([50], seed=0, domain_index=0).order(0))


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_match_the_reader(dump, prefetch):
    loader = BatchLoader(dump, seed=0, temperature=2.0, prefetch=prefetch)
    draws = np.array([0, 2, 2, 1, 0])
    plan = loader.plan(draws)
    loader.submit(plan)
    batch = loader.next()
    L, k = dump.seq_len, dump.k
    assert batch.input_ids.shape == (5, L) and batch.topk_ids.shape == (5, L, k)
    assert batch.topk_logits.shape == (5, L, k) and batch.teacher_lse.shape == (5, L)
    np.testing.assert_array_equal(batch.domain.numpy(), draws)
    for i, (d, shard, row) in enumerate(plan):
        ref = dump.read_rows(dump.domains[d], "train", int(shard), [int(row)])
        np.testing.assert_array_equal(batch.input_ids[i].numpy(), ref["input_ids"][0])
        np.testing.assert_array_equal(batch.labels[i, :-1].numpy(), ref["input_ids"][0, 1:])
        assert batch.labels[i, -1] == IGNORE_INDEX and batch.teacher_nll[i, -1] == 0
        np.testing.assert_array_equal(batch.teacher_nll[i, :-1].numpy(), ref["teacher_nll"][0, :-1])
        np.testing.assert_array_equal(batch.teacher_lse[i].numpy(), ref["teacher_lse_t2"][0])  # the T = 2 column
        np.testing.assert_array_equal(batch.topk_ids[i].numpy(), ref["topk_ids"][0])
    assert batch.labelled == 5 * (L - 1)
    loader.close()


def test_undumped_temperature_falls_back_and_ce_only_skips_topk(dump):
    loader = BatchLoader(dump, seed=0, temperature=3.0, with_topk=False, prefetch=False)
    assert loader.lse_key == "teacher_lse"
    loader.submit(loader.plan(np.array([1, 1])))
    batch = loader.next()
    assert batch.topk_ids is None and batch.topk_logits is None


def test_state_round_trip_with_plans_in_flight(dump):
    """A loader restored from a state taken with prefetched plans pending yields the same batches."""

    def run(loader, draws):
        out = []
        for d in draws:
            loader.submit(loader.plan(d))
            out.append(loader.next())
        return out

    rng = np.random.default_rng(0)
    draws = [rng.integers(0, 3, size=6) for _ in range(30)]  # > one epoch of the smallest domain
    a = BatchLoader(dump, seed=7)
    first = run(a, draws[:10])
    a.submit(a.plan(draws[10]))  # prefetched, not consumed
    state = a.state_dict()
    assert len(state["pending"]) == 1
    rest_a = [a.next()] + run(a, draws[11:])
    b = BatchLoader(dump, seed=7)
    b.load_state_dict(state)
    rest_b = [b.next()] + run(b, draws[11:])
    for x, y in zip(rest_a, rest_b, strict=True):
        np.testing.assert_array_equal(x.input_ids.numpy(), y.input_ids.numpy())
        np.testing.assert_array_equal(x.topk_logits.numpy(), y.topk_logits.numpy())
    assert a.state_dict() == b.state_dict()
    assert any(s["epoch"] > 0 for s in a.state_dict()["streams"])
    # prefetching (threaded) and building inline give identical batches
    c = BatchLoader(dump, seed=7, prefetch=False)
    for x, y in zip(first, run(c, draws[:10]), strict=True):
        np.testing.assert_array_equal(x.input_ids.numpy(), y.input_ids.numpy())
    for loader in (a, b, c):
        loader.close()
