"""dump-teacher under torchrun: 2 gloo CPU processes write the same dump as one process, and a dump whose rank
died resumes keeping every durable shard (the dead rank's journalled ones included)."""

from __future__ import annotations

import json
import subprocess
import sys

import distworkers
import pytest
import tiny
import torch.multiprocessing as mp

from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.format.reader import open_dump

pytestmark = pytest.mark.slow

SEQ, K, B = 32, 8, 2
ARGS = dict(seq_len=SEQ, top_k=K, batch_size=B, val_fraction=0.2, max_tokens_per_domain=10 * SEQ, shard_tokens=3 * SEQ)


def _cli_args(teacher, data, out) -> list[str]:
    args = ["dump-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--quiet"]
    for key, value in ARGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return tiny.write_jsonl(tiny.make_corpus(30), tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def single(teacher_dir, corpus_file, tmp_path_factory):
    """The reference: one process, through the CLI, one thread (like each torchrun rank)."""
    out = tmp_path_factory.mktemp("single") / "dump"
    proc = subprocess.run(
        [sys.executable, "-m", "ddk_offline", *_cli_args(teacher_dir, corpus_file, out)],
        capture_output=True, text=True, env=distworkers.env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_torchrun_dump_equals_the_single_process_dump(single, teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "dump"
    proc = subprocess.run(distworkers.torchrun(2, *_cli_args(teacher_dir, corpus_file, out)),
                          capture_output=True, text=True, env=distworkers.env(), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _manifest(out) == _manifest(single)  # every field, shard list and sha256 included (and the checksum)
    assert open_dump(out).manifest.complete
    assert not list((out / ".tmp").iterdir())  # rank 1's journal was merged and removed
    last = json.loads((out / "dump_config.json").read_text())["last_run"]
    assert last["world"] == 2 and last["shards_written"] == 12


def test_resume_after_a_rank_dies(single, teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "dump"
    config = DumpConfig(teacher=str(teacher_dir), data=str(corpus_file), out=str(out), **ARGS)
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(distworkers.dump_rank_dies, args=(2, distworkers.free_port(), config, 1), nprocs=2, join=True)
    journal = sorted((out / ".tmp" / "journal").glob("*.json"))
    assert journal, "rank 1 journals its shard before it dies"
    durable = {json.loads(p.read_text())["shard"]["file"] for p in journal}
    durable |= {s["file"] for d in _manifest(out)["domains"].values() for sp in d["splits"].values()
                for s in sp["shards"]}  # fmt: skip
    stamps = {f: (out / f).stat().st_mtime_ns for f in durable}

    resumed = run_dump(config)  # one process finishes what the two started
    assert resumed.stats.shards_kept == len(durable) and resumed.stats.shards_written == 12 - len(durable)
    assert {f: (out / f).stat().st_mtime_ns for f in durable} == stamps  # kept, not recomputed
    assert _manifest(out) == _manifest(single)
