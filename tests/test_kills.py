"""SIGKILL at chosen points inside dump-teacher and inside a distill checkpoint save, then resume.

Each case runs the job in a subprocess (tests/killdriver.py) that SIGKILLs itself at the N-th time it reaches a
point inside the library; N comes from a seeded RNG. Afterwards: nothing listed is broken, the previous checkpoint
loads, and the resumed result equals an uninterrupted run (same shard sha256s; same metrics rows and weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import tiny
import torch
from conftest import ROOT
from synthdump import write_synth_dump

from ddk_offline.distillation.checkpoint import latest_checkpoint, load_checkpoint
from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.trainer import distill
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.verify import verify_dump

DRIVER = ROOT / "tests" / "killdriver.py"
SEQ = 32


def _kill(job: str, point: str, n: int, config: dict) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    spec = json.dumps({"job": job, "point": point, "n": n, "config": config})
    proc = subprocess.run([sys.executable, str(DRIVER), spec], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point} #{n}:\n{proc.stdout}\n{proc.stderr}"


# --- dump-teacher ----------------------------------------------------------------------------------------------
def _dump_config(teacher, data, out) -> DumpConfig:
    # 10 sequences per domain (2 val), 3 rows per shard, 2 per forward: 12 shards, 18 forwards, 14 manifest writes.
    return DumpConfig(teacher=str(teacher), data=str(data), out=str(out), seq_len=SEQ, top_k=8, batch_size=2,
                      val_fraction=0.2, max_tokens_per_domain=10 * SEQ, shard_tokens=3 * SEQ)  # fmt: skip


def _shas(manifest) -> dict:
    return {
        (d, s): [(x.file, x.sha256) for x in i.splits[s].shards] for d, i in manifest.domains.items() for s in i.splits
    }


@pytest.fixture(scope="module")
def dump_reference(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-dump")
    corpus = tiny.write_jsonl(tiny.make_corpus(30), root / "corpus.jsonl")
    return corpus, run_dump(_dump_config(teacher_dir, corpus, root / "ref")).manifest


# (point, highest N): N is drawn per seed. manifest-tmp N = 1 is the very first manifest write, before any shard.
DUMP_POINTS = {"forward": 18, "shard-written": 12, "shard-renamed": 12, "manifest-tmp": 13, "after-shard": 11}
DUMP_CASES = [(p, random.Random(seed).randint(1, hi), 0) for seed, (p, hi) in enumerate(DUMP_POINTS.items())]
DUMP_CASES += [("manifest-tmp", 1, 0), ("forward", random.Random(100).randint(1, 18), 0)]
# With the codec in worker processes (--encode-workers 2): the kill takes the workers with it.
DUMP_CASES += [
    ("forward", random.Random(200).randint(1, 18), 2),
    ("shard-written", random.Random(201).randint(1, 12), 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("point, n, workers", DUMP_CASES, ids=[f"{p}-{n}-w{w}" for p, n, w in DUMP_CASES])
def test_dump_killed_then_resumed_equals_uninterrupted(teacher_dir, dump_reference, tmp_path, point, n, workers):
    corpus, reference = dump_reference
    config = dataclasses.replace(_dump_config(teacher_dir, corpus, tmp_path / "dump"), encode_workers=workers)
    _kill("dump", point, n, {k: v for k, v in dataclasses.asdict(config).items() if k != "extra_temperatures"})
    out = tmp_path / "dump"
    if (out / "manifest.json").exists():
        report = verify_dump(out, sample_rows=0)
        assert not report.broken_shards, [str(p) for p in report.problems]  # a kill never breaks a listed shard
    result = run_dump(config)
    assert result.manifest.complete and _shas(result.manifest) == _shas(reference)
    assert verify_dump(out).ok
    assert not list((out / ".tmp").iterdir()) and not list(out.glob(".manifest.json.tmp-*"))


# --- distill: killed inside a checkpoint save ------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-distill")
    tok = tiny.train_tokenizer(128)
    dump = write_synth_dump(root / "dump", tok)
    student = root / "student.json"
    student.write_text(tiny.make_model(len(tok), hidden=16, layers=1, heads=2, max_pos=64).config.to_json_string())
    base = DistillConfig(dump=str(dump), out=str(root / "straight"), student_config=str(student), max_steps=12,
                         batch_size=2, log_every=1, save_every=4, ddk_interval=3, lr=3e-3, device="cpu")  # fmt: skip
    distill(base)
    return base, root / "straight", len(tok)


def _rows(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def _weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


# Every point is inside the second save (step 8); the first (step 4) completed.
# The last case decodes in 2 worker processes (--data-workers 2): the batches, and so the result, are the same.
SAVE_POINTS = [("save-weights-written", 2, 0), ("save-before-rename", 2, 0), ("save-before-latest", 2, 0),
               ("save-before-cleanup", 1, 0), ("save-before-rename", 2, 2)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("point, n, workers", SAVE_POINTS, ids=[f"{p}-w{w}" for p, _, w in SAVE_POINTS])
def test_distill_killed_during_a_checkpoint_save(distill_setup, tmp_path, point, n, workers):
    base, straight, vocab = distill_setup
    config = dataclasses.replace(base, out=str(tmp_path / "run"), data_workers=workers)
    _kill("distill", point, n, dataclasses.asdict(config))
    path = latest_checkpoint(tmp_path / "run")
    expected = 8 if point == "save-before-cleanup" else 4  # the save had (not) yet pointed `latest` at itself
    assert path is not None and path.name == f"step-{expected:08d}"
    ck = load_checkpoint(path)  # the checkpoint that survived loads, weights included
    model = tiny.make_model(vocab, hidden=16, layers=1, heads=2, max_pos=64, seed=3)
    ck.load_model(model)
    assert ck.step == expected
    distill(dataclasses.replace(config, resume=True))
    assert _rows(tmp_path / "run") == _rows(straight)
    got, want = _weights(tmp_path / "run"), _weights(straight)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-00000012"]
