"""dumps verify and --repair: every broken file is named, only broken shards are recomputed, the repaired dump
equals an uninterrupted one, and a repair with another corpus or teacher is refused without touching anything."""

from __future__ import annotations

import json
import shutil

import pytest
import tiny

from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.repair import RepairError, repair_dump
from ddk_offline.dump.verify import verify_dump
from ddk_offline.format.manifest import Manifest

SEQ = 32


def _config(teacher, data, out, **kw) -> DumpConfig:
    # 10 sequences per domain (2 val), 3 rows per shard: 12 shards, some short, in about a second.
    base = dict(seq_len=SEQ, top_k=8, batch_size=2, val_fraction=0.2, max_tokens_per_domain=10 * SEQ)
    base |= dict(shard_tokens=3 * SEQ, extra_temperatures=(2.0,))
    return DumpConfig(teacher=str(teacher), data=str(data), out=str(out), **(base | kw))


def _checksums(manifest) -> dict:
    return {
        (d, s): [(x.file, x.sha256) for x in i.splits[s].shards] for d, i in manifest.domains.items() for s in i.splits
    }


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return tiny.write_jsonl(tiny.make_corpus(30), tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def reference(teacher_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "dump"
    return run_dump(_config(teacher_dir, corpus_file, out)).manifest, out


@pytest.fixture()
def dump(reference, tmp_path):
    """A fresh copy of the reference dump (tests break it)."""
    manifest, ref = reference
    shutil.copytree(ref, tmp_path / "dump")
    return manifest, tmp_path / "dump"


def _shard(manifest, domain, split, j):
    return manifest.domains[domain].splits[split].shards[j].file


def _flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_good_dump_verifies(reference):
    manifest, out = reference
    report = verify_dump(out)
    assert report.ok, [str(p) for p in report.problems]
    assert report.shards == 12 and report.rows_decoded == 30  # 4 sampled rows cap at the shards' 3, 2 or 1 rows


def test_every_broken_file_is_named(dump):
    manifest, out = dump
    flipped, truncated, gone, swapped = (
        _shard(manifest, "code", "train", 0),
        _shard(manifest, "numbers", "train", 1),
        _shard(manifest, "prose", "val", 0),
        _shard(manifest, "prose", "train", 0),
    )
    _flip_byte(out / flipped)
    (out / truncated).write_bytes((out / truncated).read_bytes()[:-100])
    (out / gone).unlink()
    shutil.copy(out / _shard(manifest, "prose", "train", 1), out / swapped)  # a valid shard in the wrong place
    report = verify_dump(out)
    assert report.broken_shards == {flipped, truncated, gone, swapped}
    why = {p.shard.file: p.what for p in report.problems if p.shard is not None}
    assert "sha256 differs" in why[flipped]
    assert (
        "size" in why[truncated] and "truncated" in why[truncated] and "cannot be opened as Parquet" in why[truncated]
    )
    assert why[gone].startswith("missing")
    assert "seq_index is not 0..2" in why[swapped] and "teacher_nll sums to" in why[swapped]
    assert all(str(p).startswith(str(out)) for p in report.problems)  # each line names the file


def test_the_cli_lists_every_broken_file_and_exits_1(cli, dump):
    manifest, out = dump
    broken = [_shard(manifest, "code", "val", 0), _shard(manifest, "numbers", "train", 2)]
    for rel in broken:
        _flip_byte(out / rel)
    proc = cli("dumps", "verify", str(out), check=False)
    assert proc.returncode == 1
    for rel in broken:
        assert f"{out / rel}: sha256 differs from the manifest" in proc.stderr
    assert "2 of 12 shards broken" in proc.stderr and "--repair" in proc.stderr
    proc = cli("dumps", "verify", str(out), "--repair")  # the recorded corpus and teacher are still in place
    assert "recomputed 2 shard(s)" in proc.stdout and "all 12 shards match" in proc.stdout
    assert _checksums(Manifest.load(out)) == _checksums(manifest)


def test_repair_recomputes_only_the_broken_shards(dump):
    manifest, out = dump
    broken = {_shard(manifest, "code", "train", 1), _shard(manifest, "prose", "val", 0)}
    for rel in broken:
        _flip_byte(out / rel)
    untouched = {
        s.file: (out / s.file).stat().st_ino
        for d in manifest.domains.values()
        for sp in d.splits.values()
        for s in sp.shards
        if s.file not in broken
    }
    result = repair_dump(out)
    assert set(result.redone) == broken and result.stats.shards_written == 2 and result.after.ok
    assert _checksums(Manifest.load(out)) == _checksums(manifest)  # byte-identical to the uninterrupted dump
    assert {f: (out / f).stat().st_ino for f in untouched} == untouched  # the good files were not rewritten
    assert repair_dump(out).redone == []  # a whole dump: nothing to do


def test_repair_finishes_an_incomplete_dump(reference, teacher_dir, corpus_file, tmp_path):
    manifest, _ = reference
    out = tmp_path / "dump"

    def stop_after_five(domain, split, index, info, count=[0]):  # noqa: B006 - a call counter
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dump(_config(teacher_dir, corpus_file, out), after_shard=stop_after_five)
    report = verify_dump(out)
    assert not report.ok and not report.broken_shards  # nothing broken, just unfinished
    assert any("planned sequences are in listed shards (incomplete dump)" in p.what for p in report.problems)
    result = repair_dump(out)
    assert result.after.ok and result.stats.shards_written == 12 - 5
    assert _checksums(Manifest.load(out)) == _checksums(manifest)


def test_repair_with_moved_inputs_needs_overrides(dump, teacher_dir, corpus_file, tmp_path):
    manifest, out = dump
    _flip_byte(out / _shard(manifest, "code", "train", 0))
    # Simulate a manifest recorded on another machine: paths that do not exist here.
    m = Manifest.load(out)
    m.corpus["data"] = str(tmp_path / "gone" / "corpus.jsonl")
    m.write_atomic(out)
    with pytest.raises(RepairError, match=r"manifest\.json: field 'corpus\.data' = .*gone.*pass --data PATH"):
        repair_dump(out)
    m.corpus["data"], m.teacher["name"] = str(corpus_file), str(tmp_path / "gone" / "teacher")
    m.write_atomic(out)
    with pytest.raises(RepairError, match=r"field 'teacher\.name' = .*gone.*pass --teacher PATH"):
        repair_dump(out)
    moved = shutil.copytree(teacher_dir, tmp_path / "moved-teacher")
    result = repair_dump(out, teacher=str(moved))
    assert result.after.ok and result.redone == [_shard(manifest, "code", "train", 0)]
    assert Manifest.load(out).teacher["name"] == str(moved)  # the manifest now points where the teacher is


@pytest.mark.parametrize("wrong", ["corpus", "teacher"])
def test_repair_refuses_other_inputs_and_changes_nothing(dump, corpus_rows, tmp_path, wrong):
    manifest, out = dump
    rel = _shard(manifest, "numbers", "train", 0)
    _flip_byte(out / rel)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".lock" not in p.name}
    if wrong == "corpus":
        other = tiny.write_jsonl(tiny.make_corpus(30, seed=7), tmp_path / "other.jsonl")
        kw, field, fix = {"data": str(other)}, r"corpus\.sha256", "pass --data with the corpus"
    else:
        other = tiny.save_teacher(tmp_path / "other-teacher", seed=1)
        kw, field, fix = {"teacher": str(other)}, r"teacher\.weights_sha256", "pass --teacher with the teacher"
    with pytest.raises(
        RepairError, match=rf"refusing to repair with inputs the dump was not made with \({field}.*{fix}"
    ):
        repair_dump(out, **kw)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".lock" not in p.name}
    assert after == before


def test_an_untrusted_manifest_is_reported_and_not_repaired(dump):
    _, out = dump
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    d["seq_len"] = 16  # a hand edit: the checksum no longer matches
    path.write_text(json.dumps(d))
    report = verify_dump(out)
    assert report.manifest is None and len(report.problems) == 1
    assert str(report.problems[0]).startswith(f"{path}: checksum mismatch")
    assert "Undo the edit or restore manifest.json from a backup" in report.problems[0].what
    with pytest.raises(RepairError, match="needs a trustworthy manifest"):
        repair_dump(out)


def test_the_cli_never_suggests_rerunning_over_an_untrusted_manifest(cli, dump):
    _, out = dump
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    d["k"] = 4
    path.write_text(json.dumps(d))
    for repair in ([], ["--repair"]):
        proc = cli("dumps", "verify", str(out), *repair, check=False)
        assert proc.returncode != 0 and "checksum mismatch" in proc.stderr
        # the manifest's own problem says how to fix it; the summary must not contradict it
        assert "rerun dump-teacher" not in proc.stderr and "repairing:" not in proc.stdout
