"""Dumps on fsspec filesystems: dump-teacher writes to memory://, readers open memory:// and file:// URLs, a
crashed remote dump resumes, and distill trains from a URL. Local paths are the other tests' business."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
import tiny
from synthdump import write_synth_dump

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.trainer import distill
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.format.reader import open_dump
from ddk_offline.format.storage import Storage

SEQ, K = 32, 8


def _config(teacher, data, out) -> DumpConfig:
    return DumpConfig(teacher=str(teacher), data=str(data), out=str(out), seq_len=SEQ, top_k=K, batch_size=2,
                      val_fraction=0.2, max_tokens_per_domain=8 * SEQ, shard_tokens=3 * SEQ)  # fmt: skip


def _checksums(manifest) -> dict:
    return {(d, s): [(sh.file, sh.rows, sh.sha256) for sh in info.splits[s].shards]
            for d, info in sorted(manifest.domains.items()) for s in ("train", "val")}  # fmt: skip


def _same_rows(a, b) -> None:
    for domain in a.domains:
        for shard in range(len(a.shards(domain, "train"))):
            rows = list(range(a.shards(domain, "train")[shard].rows))
            x, y = a.read_rows(domain, "train", shard, rows), b.read_rows(domain, "train", shard, rows)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{domain}/{shard}/{key}")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return tiny.write_jsonl(tiny.make_corpus(20), tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def local_dump(teacher_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "dump"
    run_dump(_config(teacher_dir, corpus_file, out))
    return out


def test_dump_to_memory_and_read_it_back(local_dump, teacher_dir, corpus_file):
    url = f"memory://dumps/{uuid.uuid4().hex}"
    result = run_dump(_config(teacher_dir, corpus_file, url))
    local = open_dump(local_dump)
    assert _checksums(result.manifest) == _checksums(local.manifest)  # the same bytes as on a local disk
    remote = open_dump(url)
    assert remote.manifest.to_dict() | {"corpus": None} == local.manifest.to_dict() | {"corpus": None}
    _same_rows(remote, local)
    assert remote.tokenizer().get_vocab() == local.tokenizer().get_vocab()
    assert Storage(url).listdir(".tmp") == []  # shards were staged locally; nothing is left behind
    assert run_dump(_config(teacher_dir, corpus_file, url)).stats.shards_written == 0  # complete: nothing to redo


def test_read_a_local_dump_through_file_url(local_dump):
    reader = open_dump(f"file://{local_dump}")
    assert reader.store.local is None  # really through fsspec's local filesystem
    _same_rows(reader, open_dump(local_dump))
    assert next(reader.sequences(reader.domains[0], "val"))["input_ids"].shape == (SEQ,)


def test_a_crashed_memory_dump_resumes(local_dump, teacher_dir, corpus_file):
    url = f"memory://dumps/{uuid.uuid4().hex}"
    written = []

    def crash_after_three(domain, split, index, info):
        written.append(info.file)
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_dump(_config(teacher_dir, corpus_file, url), after_shard=crash_after_three)
    resumed = run_dump(_config(teacher_dir, corpus_file, url))
    assert resumed.stats.shards_kept == 3
    assert _checksums(resumed.manifest) == _checksums(open_dump(local_dump).manifest)


def test_distill_from_a_url(tmp_path):
    tokenizer = tiny.train_tokenizer(128)
    local = write_synth_dump(tmp_path / "dump", tokenizer)
    url = f"memory://dumps/{uuid.uuid4().hex}"
    fsspec.filesystem("memory").put(str(local), url.removeprefix("memory://"), recursive=True)
    assert Storage(url).isfile("manifest.json")
    student = tmp_path / "student.json"
    model = tiny.make_model(len(tokenizer), hidden=32, layers=2, heads=2, max_pos=64)
    student.write_text(model.config.to_json_string())
    common = dict(student_config=str(student), max_steps=3, batch_size=2, save_every=0, device="cpu", log_every=1)
    a = distill(DistillConfig(dump=url, out=str(tmp_path / "a"), **common))
    b = distill(DistillConfig(dump=str(local), out=str(tmp_path / "b"), **common))
    assert a.final_loss == b.final_loss and (tmp_path / "a" / "final" / "tokenizer.json").is_file()
