"""Phase two's safety (issue #15): --out is ours or empty and locked, nothing non-finite is saved, a resume stays on
its dump; the dump's domain names and --out placement. One test per row of docs/RELIABILITY.md's matrix."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import tiny
import torch
from synthdump import write_synth_dump

from ddk_offline.distillation.checkpoint import latest_checkpoint
from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.guards import NonFiniteError
from ddk_offline.distillation.rundir import MARKER
from ddk_offline.distillation.trainer import Trainer, distill
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.outdir import DumpDirError, domain_dirs
from ddk_offline.errors import UserError
from ddk_offline.format.reader import open_dump


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tokenizer):
    return write_synth_dump(tmp_path_factory.mktemp("dump"), tokenizer)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    return tiny.write_student_config(tmp_path_factory.mktemp("student") / "student.json", len(tokenizer))


def _config(dump, student_config, out, **kw) -> DistillConfig:
    student = student_config and str(student_config)
    base = dict(dump=str(dump), out=str(out), student_config=student, max_steps=4, batch_size=2, log_every=1,
                save_every=2, ddk_interval=2, lr=3e-3, device="cpu", data_workers=0)  # fmt: skip
    return DistillConfig(**(base | kw))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- --out --------------------------------------------------------------------------------------------------------
def test_out_that_is_someone_elses_folder_is_refused_and_untouched(dump, student, tmp_path, tokenizer):
    model = tmp_path / "model"
    tiny.make_model(len(tokenizer), hidden=16, layers=1, heads=2, max_pos=64).save_pretrained(model)
    before = _snapshot(model)
    with pytest.raises(UserError, match="not a ddk-offline run"):
        distill(_config(dump, student, model))
    assert _snapshot(model) == before  # config.json was not overwritten, nothing added, nothing removed


@pytest.mark.parametrize("where", ["the dump", "the --student checkpoint"])
def test_out_inside_the_dump_or_the_student_is_refused(dump, tmp_path, tokenizer, where):
    model = tmp_path / "model"
    tiny.make_model(len(tokenizer), hidden=16, layers=1, heads=2, max_pos=64).save_pretrained(model)
    out = dump / "run" if where == "the dump" else model / "run"
    with pytest.raises(UserError, match=f"lies in {where}"):
        distill(_config(dump, None, out, student=str(model)))
    assert not out.exists()


def test_out_that_is_a_file_is_one_clear_error(dump, student, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        distill(_config(dump, student, out))
    assert out.read_text() == "x"


def test_an_empty_folder_is_used_and_marked(dump, student, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    distill(_config(dump, student, out))
    assert (out / MARKER).is_file() and (out / "final").is_dir()


def test_a_second_run_on_the_same_out_is_refused_and_deletes_nothing(dump, student, tmp_path):
    out = tmp_path / "run"
    first = Trainer(_config(dump, student, out))  # holds the lock, like a live run
    try:
        first.train_step()
        with pytest.raises(UserError, match="another distill .* is writing to this folder"):
            Trainer(_config(dump, student, out))
        assert (out / "config.json").is_file() and (out / MARKER).is_file()  # the live run's folder is intact
        first.train_step()
        first._save()
        assert latest_checkpoint(out) is not None
    finally:
        first.close()
    # The lock goes with the run: a --resume afterwards works.
    distill(_config(dump, student, out, resume=True))


def test_a_refused_start_removes_only_a_folder_it_made(dump, student, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserError, match="--sampler"):
        distill(_config(dump, student, out, sampler="fixed:nonexistent=1"))
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError):
        distill(_config(dump, student, out))
    assert (out / "keep.txt").read_text() == "mine"


# --- non-finite -------------------------------------------------------------------------------------------------
def test_a_nan_step_stops_with_the_last_good_checkpoint_kept(dump, student, tmp_path):
    out = tmp_path / "nan"
    trainer = Trainer(_config(dump, student, out, max_steps=8, save_every=2))
    try:
        for _ in range(4):
            trainer.train_step()  # checkpoints of steps 2 and 4
        good = latest_checkpoint(out)
        with torch.no_grad():
            next(trainer.module.parameters()).fill_(math.nan)  # what a diverging run does to its weights
        with pytest.raises(NonFiniteError, match=r"step 4: the loss nan is not finite.*--lr.*last good checkpoint"):
            trainer.train_step()
        with pytest.raises(NonFiniteError, match="weights hold NaN or inf, so the checkpoint of step 4 was not"):
            trainer._save()
    finally:
        trainer.close()
    assert latest_checkpoint(out) == good
    assert all(torch.isfinite(t).all() for t in _weights(good).values())
    assert not (out / "final").exists()


def _weights(checkpoint):
    from safetensors.torch import load_file

    return load_file(str(next(checkpoint.glob("*.safetensors"))))


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", math.inf, "--lr must be in"),
        ("lr", 1e9, "--lr must be in"),
        ("kd_weight", math.inf, "--kd-weight must be a finite number"),
        ("ce_weight", math.nan, "--ce-weight must be a finite number"),
        ("temperature", 1e-4, "--temperature must be in"),
        ("temperature", math.inf, "--temperature must be in"),
    ],
)
def test_options_beyond_sane_bounds_are_refused(dump, student, tmp_path, option, value, message):
    with pytest.raises(UserError, match=message):
        distill(_config(dump, student, tmp_path / "run", **{option: value}))
    assert not (tmp_path / "run").exists()


# --- resume identity -----------------------------------------------------------------------------------------------
def test_resume_on_another_dump_is_refused_naming_the_difference(dump, student, tmp_path, tokenizer):
    copy = tmp_path / "dump"
    shutil.copytree(dump, copy)
    out = tmp_path / "run"
    trainer = Trainer(_config(copy, student, out, max_steps=4, save_every=2))
    for _ in range(2):
        trainer.train_step()
    trainer.close()
    shutil.rmtree(copy)
    write_synth_dump(copy, tokenizer, k=4)  # same path, same domains and counts, another k
    with pytest.raises(UserError, match=r"--resume on another dump.*k: 8 then vs 4 now"):
        distill(_config(copy, student, out, max_steps=4, resume=True))


def test_resume_of_a_moved_run_on_a_moved_dump_works(dump, student, tmp_path, monkeypatch):
    a_dump, a_run = tmp_path / "a" / "dump", tmp_path / "a" / "run"
    shutil.copytree(dump, a_dump)
    trainer = Trainer(_config(a_dump, student, a_run, max_steps=4, save_every=2))
    for _ in range(2):
        trainer.train_step()  # the checkpoint of step 2; the run stops here (a crash, a preemption)
    trainer.close()
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)  # and spelled relative this time
    summary = distill(_config("b/dump", student, "b/run", max_steps=4, save_every=2, resume=True))
    assert summary.steps == 4 and math.isfinite(summary.final_loss)
    # Speed counts this process's steps over this process's time (2 steps x 2 rows x 16 tokens), not the run's.
    assert summary.tokens_per_s * summary.seconds == pytest.approx(2 * 2 * 16)


# --- phase one: domain names and --out placement ----------------------------------------------------------------
def test_domain_folders_never_collide_with_the_dumps_own_files():
    names = ["manifest.json", "Tokenizer", ".tmp", ".lock", "dump_config.json", "x" * 300, "code", "CODE"]
    dirs = domain_dirs(names)
    assert dirs["code"] == "code"
    reserved = {"manifest.json", "tokenizer", "tmp", ".tmp", ".lock", "dump_config.json"}
    assert all(d.lower() not in reserved and len(d) <= 73 and not d.startswith(".") for d in dirs.values())
    assert len({d.lower() for d in dirs.values()}) == len(names)


def test_a_domain_named_like_the_manifest_dumps_and_resumes(teacher_dir, tmp_path):
    rows = [dict(r, domain="manifest.json" if r["domain"] == "code" else "y" * 300) for r in tiny.make_corpus(12)]
    corpus = tiny.write_jsonl(rows, tmp_path / "corpus.jsonl")
    config = DumpConfig(teacher=str(teacher_dir), data=str(corpus), out=str(tmp_path / "dump"), seq_len=16, top_k=4,
                        batch_size=4, val_fraction=0.2, dtype="float32", device="cpu", shard_tokens=64)  # fmt: skip
    run_dump(config)
    manifest = (tmp_path / "dump" / "manifest.json").read_bytes()
    assert set(open_dump(tmp_path / "dump").domains) == {"manifest.json", "y" * 300}
    run_dump(config)  # a rerun finds the finished dump and changes nothing
    assert (tmp_path / "dump" / "manifest.json").read_bytes() == manifest


def test_dump_out_inside_the_corpus_folder_is_refused(teacher_dir, tmp_path):
    folder = tiny.write_domain_folders(tiny.make_corpus(12), tmp_path / "corpus")
    config = DumpConfig(teacher=str(teacher_dir), data=str(folder), out=str(folder / "dumpX"), seq_len=16, top_k=4,
                        device="cpu", dtype="float32")  # fmt: skip
    with pytest.raises(DumpDirError, match="inside the corpus folder"):
        run_dump(config)
    assert not (folder / "dumpX").exists()
    glob_config = dataclasses.replace(config, data=str(folder / "**" / "*"))
    with pytest.raises(DumpDirError, match="inside the corpus folder"):
        run_dump(glob_config)


# --- one red line instead of a traceback ------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["model.safetensors", "state.json", "tensors.pt", "model-tail"])
def test_a_damaged_checkpoint_is_one_clear_error(dump, student, tmp_path, damaged):
    out = tmp_path / "run"
    distill(_config(dump, student, out))
    path = latest_checkpoint(out)
    name = "model.safetensors" if damaged == "model-tail" else damaged
    size = (path / name).stat().st_size
    os.truncate(path / name, size - 50 if damaged == "model-tail" else 40)
    with pytest.raises(UserError, match=f"{name}: damaged .* cannot be resumed"):
        distill(_config(dump, student, out, resume=True))


def test_an_unknown_url_scheme_is_one_clear_error(teacher_dir, student, tmp_path):
    with pytest.raises(UserError, match="no filesystem for the scheme 'foo://'"):
        run_dump(DumpConfig(teacher=str(teacher_dir), data=str(tmp_path), out="foo://bucket/dump"))
    with pytest.raises(UserError, match="no filesystem for the scheme 'foo://'"):
        distill(_config("foo://bucket/dump", student, tmp_path / "run"))


def test_a_teacher_producing_nan_stops_the_dump_before_it_is_stored(teacher_dir, tmp_path):
    from ddk_offline.dump.teachers import open_teacher
    from ddk_offline.dump.verify import verify_dump

    corpus = tiny.write_jsonl(tiny.make_corpus(12), tmp_path / "corpus.jsonl")
    config = DumpConfig(teacher=str(teacher_dir), data=str(corpus), out=str(tmp_path / "dump"), seq_len=16, top_k=4,
                        batch_size=4, val_fraction=0.2, dtype="float32", device="cpu", shard_tokens=64)  # fmt: skip
    teacher = open_teacher("hf", str(teacher_dir))
    real, calls = teacher.targets, [0]

    def targets(input_ids, **kwargs):  # what an fp16 overflow looks like, on the dump loop's third batch
        t = real(input_ids, **kwargs)
        calls[0] += tuple(input_ids.shape) == (4, 16)  # the loop's batches (the start-up check scores documents)
        if calls[0] == 3:
            t.lse[0, 5] = math.inf
        return t

    teacher.targets = targets
    with pytest.raises(UserError, match=r"logits hold NaN or inf .* Rerun with --dtype float32"):
        run_dump(config, teacher=teacher)
    assert not verify_dump(tmp_path / "dump", sample_rows=0).broken_shards
    run_dump(config)  # the rerun resumes and finishes
    assert verify_dump(tmp_path / "dump").ok


def test_a_finished_run_is_extended_with_extend(dump, student, tmp_path):
    from ddk_offline.distillation.setup import lr_factor

    out = tmp_path / "run"
    first = distill(_config(dump, student, out, max_steps=4, save_every=2, warmup_steps=1))
    assert first.steps == 4
    with pytest.raises(UserError, match=r"max_steps: checkpoint 4 vs now 6.*--extend with the new --max-steps"):
        distill(_config(dump, student, out, max_steps=6, save_every=2, resume=True))
    with pytest.raises(UserError, match="--extend trains an existing run longer: pass it with --resume"):
        distill(_config(dump, student, tmp_path / "new", max_steps=6, extend=True))
    with pytest.raises(UserError, match="--extend to 3 steps, but the checkpoint is at step 4"):
        distill(_config(dump, student, out, max_steps=3, resume=True, extend=True))
    longer = distill(_config(dump, student, out, max_steps=6, resume=True, extend=True))
    assert longer.steps == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    # The schedule is recomputed for the new length: the warm-up stays the run's own, the cosine spans 6 steps.
    assert rows[4]["lr"] == pytest.approx(3e-3 * lr_factor(4, 1, 6))
    assert json.loads((out / "config.json").read_text())["max_steps"] == 6


@pytest.mark.parametrize("lost", ["summary.json", "final"])
def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(dump, student, tmp_path, lost):
    out = tmp_path / "run"
    first = distill(_config(dump, student, out))
    # A kill after the last checkpoint but before the summary (or the final model) was written.
    path = out / lost
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = distill(_config(dump, student, out, resume=True))
    assert again.steps == first.steps == 4
    assert (out / "summary.json").is_file() and (out / "final").is_dir()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
