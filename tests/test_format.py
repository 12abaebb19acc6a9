"""The shard format: writer -> manifest -> reader round trips, random access, and manifest safety."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from ddk_offline.format.codec import TopKCodec
from ddk_offline.format.manifest import DomainInfo, Manifest, ManifestError
from ddk_offline.format.reader import DumpReader, open_dump
from ddk_offline.format.writer import SequenceRecord, ShardWriter

V, L = 1000, 16


def _record(domain: str, split: str, i: int, k: int, rng: np.random.Generator, temps=()) -> SequenceRecord:
    logits_full = rng.standard_normal((L, V)).astype(np.float32) * 3
    lse = np.log(np.exp(logits_full.astype(np.float64)).sum(1)).astype(np.float32)
    ids = np.argsort(-logits_full, axis=1)[:, :k]
    nll = rng.random(L).astype(np.float32) * 5
    nll[-1] = np.nan
    extra = {t: (np.log(np.exp(logits_full.astype(np.float64) / t).sum(1))).astype(np.float32) for t in temps}
    return SequenceRecord(
        domain, split, i, rng.integers(0, V, L), ids, np.take_along_axis(logits_full, ids, 1), lse, nll, extra
    )


def _write_dump(root, k=8, rows_per_shard=3, counts=None, temps=()):
    counts = counts or {("a", "train"): 7, ("a", "val"): 2, ("b", "train"): 3}
    rng = np.random.default_rng(0)
    codec = TopKCodec(vocab_size=V, k=k)
    manifest = Manifest(
        teacher={"name": "t"},
        tokenizer={"vocab_size": V},
        seq_len=L,
        k=k,
        codec=codec.describe(),
        corpus={},
        settings={},
        temperatures=[1.0, *temps],
        domains={d: DomainInfo(d, f"dir_{d}") for d in {d for d, _ in counts}},
    )
    records = {key: [_record(*key, i, k, rng, temps) for i in range(n)] for key, n in counts.items()}

    def on_shard(domain, split, index, info):
        shards = manifest.domains[domain].splits[split].shards
        assert len(shards) == index
        shards.append(info)

    with ShardWriter(
        root,
        codec=codec,
        rows_per_shard=rows_per_shard,
        on_shard=on_shard,
        domain_dirs={d: f"dir_{d}" for d in manifest.domains},
        extra_temperatures=temps,
    ) as w:
        for i in range(max(counts.values())):
            for _key, recs in records.items():
                if i < len(recs):
                    w.put(recs[i])
    manifest.complete = True
    manifest.write_atomic(root)
    return records


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("temps", [(), (2.0,)])
def test_round_trip_sequences(tmp_path, k, temps):
    records = _write_dump(tmp_path, k=k, temps=temps)
    reader = open_dump(tmp_path)
    assert reader.domains == ["a", "b"]
    assert [s.rows for s in reader.shards("a", "train")] == [3, 3, 1]
    for (domain, split), recs in records.items():
        got = list(reader.sequences(domain, split))
        assert len(got) == len(recs)
        for g, r in zip(got, recs, strict=False):
            np.testing.assert_array_equal(g["input_ids"], r.input_ids)
            np.testing.assert_array_equal(g["teacher_lse"], r.teacher_lse)
            np.testing.assert_array_equal(g["teacher_nll"], r.teacher_nll)
            assert set(map(tuple, np.sort(g["topk_ids"], 1))) == set(map(tuple, np.sort(r.topk_ids, 1)))
            for t in temps:
                np.testing.assert_array_equal(g["teacher_lse_t2"], r.extra_lse[t])
    a = reader.manifest.domains["a"].splits["train"]
    assert a.sequences == 7 and a.tokens == 7 * L
    expected = np.mean(np.concatenate([r.teacher_nll[:-1] for r in records[("a", "train")]]).astype(np.float64))
    assert reader.teacher_loss("a") == pytest.approx(expected, rel=1e-6)


def test_random_access_matches_sequential(tmp_path):
    _write_dump(tmp_path)
    reader = open_dump(tmp_path)
    seq = list(reader.sequences("a", "train"))
    rows = reader.read_rows("a", "train", 1, [2, 0])
    np.testing.assert_array_equal(rows["input_ids"], np.stack([seq[5]["input_ids"], seq[3]["input_ids"]]))
    assert rows["topk_ids"].shape == (2, L, 8)
    with pytest.raises(IndexError, match="rows must be in"):
        reader.read_rows("a", "train", 2, [1])


def test_no_temp_files_left(tmp_path):
    _write_dump(tmp_path)
    assert not list((tmp_path / ".tmp").iterdir())
    assert sorted(p.name for p in (tmp_path / "dir_a" / "train").iterdir()) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]


def test_hand_edited_manifest_is_refused(tmp_path):
    _write_dump(tmp_path)
    path = tmp_path / "manifest.json"
    d = json.loads(path.read_text())
    d["k"] = 4
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="checksum mismatch"):
        open_dump(tmp_path)


def test_manifest_paths_cannot_escape_the_dump(tmp_path):
    _write_dump(tmp_path)
    m = Manifest.load(tmp_path)
    m.domains["a"].splits["train"].shards[0].file = "../../etc/passwd"
    m.write_atomic(tmp_path)  # a correctly checksummed but malicious manifest
    with pytest.raises(ManifestError, match="outside the dump"):
        open_dump(tmp_path)


def test_incomplete_dump_is_refused_unless_asked(tmp_path):
    _write_dump(tmp_path)
    m = Manifest.load(tmp_path)
    m.complete = False
    m.write_atomic(tmp_path)
    with pytest.raises(ManifestError, match="incomplete"):
        open_dump(tmp_path)
    assert isinstance(open_dump(tmp_path, allow_incomplete=True), DumpReader)


def test_not_a_dump(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        open_dump(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        open_dump(tmp_path)


def test_writer_thread_error_surfaces_in_the_producer(tmp_path):
    codec = TopKCodec(vocab_size=V, k=4)
    rng = np.random.default_rng(0)

    def boom(*_):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with ShardWriter(tmp_path, codec=codec, rows_per_shard=1, on_shard=boom, domain_dirs={"a": "a"}) as w:
            for i in range(5):
                w.put(_record("a", "train", i, 4, rng))


def test_a_failed_writer_never_blocks_the_producer_on_its_full_queue(tmp_path):
    """The producer fills the queue before it sees the failure (a full disk mid-dump); leaving the context must
    still return and raise instead of waiting forever to queue its "drop" command."""
    codec = TopKCodec(vocab_size=V, k=4)
    rng = np.random.default_rng(0)
    records = [_record("a", "train", i, 4, rng) for i in range(8)]

    def boom(*_):
        time.sleep(0.2)  # the producer fills the queue meanwhile
        raise OSError(28, "No space left on device")

    raised: list[BaseException] = []

    def produce():
        try:
            with ShardWriter(
                tmp_path, codec=codec, rows_per_shard=1, on_shard=boom, domain_dirs={"a": "a"}, queue_size=2
            ) as w:
                for rec in records:
                    w.put(rec)
        except OSError as e:
            raised.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    producer.join(timeout=20)
    assert not producer.is_alive(), "leaving the ShardWriter context hung on the dead writer's full queue"
    assert raised and "No space left" in str(raised[0])
