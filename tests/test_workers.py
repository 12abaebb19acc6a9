"""The codec in worker processes: every worker count gives the same batches, sums and shard bytes; a worker that dies
is a clear error, leaves nothing half-written, and the run resumes to the result of an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import tiny
import torch

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.data import BatchLoader
from ddk_offline.distillation.evaluation import domain_sums
from ddk_offline.distillation.trainer import Trainer, distill
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.teachers import open_teacher
from ddk_offline.dump.verify import verify_dump
from ddk_offline.format.reader import open_dump
from ddk_offline.format.workers import WorkerDiedError, auto_workers


def _children() -> list[int]:
    """Process ids whose parent is this process (the fork-started workers)."""
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _batches(loader: BatchLoader, draws) -> list:
    out = []
    for d in draws:
        loader.submit(loader.plan(d))
        out.append(loader.next())
    return out


def _same(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), f.name


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_and_resume_state_do_not_depend_on_the_worker_count(dump, workers):
    reader = open_dump(dump)
    rng = np.random.default_rng(1)
    draws = [rng.integers(0, 3, size=5) for _ in range(24)]  # past one epoch of the smallest domain
    base = BatchLoader(reader, seed=4, temperature=2.0)
    pooled = BatchLoader(reader, seed=4, temperature=2.0, workers=workers)
    for x, y in zip(_batches(base, draws[:12]), _batches(pooled, draws[:12]), strict=True):
        _same(x, y)
    pooled.submit(pooled.plan(draws[12]))  # in flight when the state is taken, as in a checkpoint
    state = pooled.state_dict()
    rest = [pooled.next(), *_batches(pooled, draws[13:])]
    restored = BatchLoader(reader, seed=4, temperature=2.0, workers=0)  # a resume may change the worker count
    restored.load_state_dict(state)
    base.submit(base.plan(draws[12]))
    for x, y, z in zip(
        rest,
        [restored.next(), *_batches(restored, draws[13:])],
        [base.next(), *_batches(base, draws[13:])],
        strict=True,
    ):  # noqa: E501
        _same(x, y)
        _same(x, z)
    ce_only = BatchLoader(reader, seed=4, with_topk=False, workers=workers)
    batch = _batches(ce_only, draws[:1])[0]
    assert batch.topk_ids is None and batch.topk_logits is None
    for loader in (base, pooled, restored, ce_only):
        loader.close()


def test_evaluation_sums_do_not_depend_on_the_worker_count(dump, tokenizer):
    reader = open_dump(dump)
    model = tiny.make_model(len(tokenizer), hidden=16, layers=1, heads=2, max_pos=64)
    want = domain_sums(model, reader, batch_size=3, data_workers=0)
    for workers, limit in ((2, None), (1, 2)):
        got = domain_sums(model, reader, batch_size=3, data_workers=workers, max_sequences=limit)
        ref = want if limit is None else domain_sums(model, reader, batch_size=3, max_sequences=limit)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_auto_workers_shares_the_cores_between_torchrun_ranks(monkeypatch):
    monkeypatch.setattr("ddk_offline.format.workers.usable_cores", lambda: 32)
    assert auto_workers() == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_workers() == 2  # 32 cores / 8 ranks, 2 kept by each rank
    monkeypatch.setattr("ddk_offline.format.workers.usable_cores", lambda: 2)
    assert auto_workers() == 0


def _dump_config(teacher, data, out, workers) -> DumpConfig:
    return DumpConfig(
        teacher=str(teacher), data=str(data), out=str(out), seq_len=32, top_k=8, batch_size=2, val_fraction=0.2,
        max_tokens_per_domain=10 * 32, shard_tokens=3 * 32, encode_workers=workers,
    )  # fmt: skip


def _shas(manifest) -> dict:
    return {(d, s): [x.sha256 for x in i.splits[s].shards] for d, i in manifest.domains.items() for s in i.splits}


def test_dump_shards_are_byte_identical_for_every_encode_worker_count(teacher_dir, tmp_path):
    corpus = tiny.write_jsonl(tiny.make_corpus(30), tmp_path / "corpus.jsonl")
    ref = run_dump(_dump_config(teacher_dir, corpus, tmp_path / "w0", 0)).manifest
    assert _shas(run_dump(_dump_config(teacher_dir, corpus, tmp_path / "w2", 2)).manifest) == _shas(ref)

    # An encode worker killed mid-dump: a clear error, every listed shard intact, and the rerun finishes the dump.
    teacher = open_teacher("hf", str(teacher_dir))
    calls = [0]
    real = teacher.targets

    before = set(_children())  # processes other tests left behind are not this dump's workers

    def targets(*args, **kwargs):
        kids = sorted(set(_children()) - before)  # the pool exists from the dump loop's first blob on
        calls[0] += bool(kids)
        if calls[0] == 1:  # the first forward after the pool started: most of the dump is still ahead
            for pid in kids:
                os.kill(pid, signal.SIGKILL)
        return real(*args, **kwargs)

    teacher.targets = targets
    out = tmp_path / "killed"
    with pytest.raises(WorkerDiedError, match="encode worker process died.*rerun the same command"):
        run_dump(_dump_config(teacher_dir, corpus, out, 1), teacher=teacher)
    assert not verify_dump(out, sample_rows=0).broken_shards
    assert not list((out / ".tmp").glob("*.tmp"))  # no half-written shard
    resumed = run_dump(_dump_config(teacher_dir, corpus, out, 0)).manifest
    assert _shas(resumed) == _shas(ref) and verify_dump(out).ok


def test_a_dead_data_worker_stops_the_run_and_resume_equals_an_uninterrupted_run(dump, tokenizer, tmp_path):
    student = tiny.write_student_config(tmp_path / "student.json", len(tokenizer))
    base = DistillConfig(
        dump=str(dump), out=str(tmp_path / "straight"), student_config=str(student), max_steps=8, batch_size=2,
        log_every=1, save_every=4, ddk_interval=3, lr=3e-3, device="cpu", data_workers=0,
    )  # fmt: skip
    distill(base)
    config = dataclasses.replace(base, out=str(tmp_path / "run"), data_workers=1)
    trainer = Trainer(config)
    for _ in range(5):  # the checkpoint of step 4 is written
        trainer.train_step()
    for pid in _children():
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match="data worker process died.*--resume"):
        for _ in range(3):
            trainer.train_step()
    trainer.log.close()
    trainer.close()  # what the dead run's exit does: the loader stops and --out's lock goes
    distill(dataclasses.replace(config, resume=True, data_workers=2))
    rows = lambda out: [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(tmp_path / "run") == rows(tmp_path / "straight")
    from safetensors.torch import load_file

    got, want = (load_file(str(p / "final" / "model.safetensors")) for p in (tmp_path / "run", tmp_path / "straight"))
    assert all(torch.equal(got[k], want[k]) for k in want)
