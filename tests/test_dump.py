"""dump-teacher as a library: stored targets equal the teacher's, layouts agree, resume is bit-identical,
mismatched or concurrent writers are refused, bad input leaves nothing behind."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import tiny
import torch
from asserts import assert_close

from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.outdir import DumpDirError, DumpLock
from ddk_offline.errors import UserError
from ddk_offline.format.reader import open_dump

SEQ, K, B = 32, 8, 2


def _config(teacher, data, out, **kw) -> DumpConfig:
    # 10 sequences per domain (2 of them val), 3 rows per shard, batches of 2: several shards per stream,
    # a short last shard and a short last batch, in about a second.
    base = dict(seq_len=SEQ, top_k=K, batch_size=B, val_fraction=0.2, max_tokens_per_domain=10 * SEQ)
    base |= dict(shard_tokens=3 * SEQ, extra_temperatures=(2.0,))
    return DumpConfig(teacher=str(teacher), data=str(data), out=str(out), **(base | kw))


def _checksums(manifest) -> dict:
    return {
        (d, s): [(sh.file, sh.rows, sh.sha256) for sh in info.splits[s].shards]
        for d, info in sorted(manifest.domains.items())
        for s in ("train", "val")
    }


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return tiny.write_jsonl(tiny.make_corpus(30), tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def reference(teacher_dir, corpus_file, tmp_path_factory):
    """An uninterrupted dump that other tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "dump"
    return run_dump(_config(teacher_dir, corpus_file, out)), out


def test_layout_and_manifest(reference):
    result, out = reference
    m = result.manifest
    assert m.complete and m.k == K and m.seq_len == SEQ and m.temperatures == [1.0, 2.0]
    assert sorted(m.domains) == ["code", "numbers", "prose"]
    for name, info in m.domains.items():
        assert [s.rows for s in info.splits["train"].shards] == [3, 3, 2]
        assert [s.rows for s in info.splits["val"].shards] == [2]
        assert m.corpus["domains"][name]["sequences"] == {"train": 8, "val": 2}
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not list((out / ".tmp").iterdir())
    assert json.loads((out / "dump_config.json").read_text())["config"]["top_k"] == K


def test_stored_targets_equal_the_teachers(reference, teacher_dir):
    """Recompute the teacher directly on each stored batch (same rows, same batch shape) and compare."""
    _, out = reference
    reader = open_dump(out)
    model = tiny_model(teacher_dir)
    for domain in reader.domains:
        for shard in range(len(reader.shards(domain, "train"))):
            rows = reader.shards(domain, "train")[shard].rows
            for start in range(0, rows, B):  # the dump's batches: B rows, never across a shard boundary
                got = reader.read_rows(domain, "train", shard, list(range(start, min(start + B, rows))))
                ids = torch.from_numpy(got["input_ids"])
                with torch.inference_mode():
                    logits = model(input_ids=ids).logits.double()  # [b, L, V]
                lse = torch.logsumexp(logits, -1)
                assert_close(got["teacher_lse"], lse, rtol=1e-6, atol=1e-5, name="lse")
                assert_close(got["teacher_lse_t2"], torch.logsumexp(logits / 2, -1), rtol=1e-6, atol=1e-5, name="T2")
                nll = lse[:, :-1] - logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
                assert_close(got["teacher_nll"][:, :-1], nll, rtol=1e-6, atol=1e-5, name="nll")
                assert np.isnan(got["teacher_nll"][:, -1]).all()
                _check_topk(got, logits, lse, reader.manifest.codec)


def tiny_model(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def _check_topk(got, logits, lse, codec_desc):
    top = torch.topk(logits, K + 1, dim=-1).values
    decided = (top[..., K - 1] - top[..., K]) > 1e-4  # a k-th/(k+1)-th near-tie cannot be ordered in fp32
    assert decided.float().mean() > 0.9, "the tiny teacher should rarely tie at the k-th logit"
    want_ids = torch.topk(logits, K, dim=-1).indices.numpy()
    stored = got["topk_ids"]
    for pos in zip(*np.nonzero(decided.numpy()), strict=True):
        assert set(stored[pos].tolist()) == set(want_ids[pos].tolist()), f"top-k set differs at {pos}"
    exact = np.take_along_axis(logits.numpy(), stored, -1)  # the teacher's logits at the stored ids
    err = np.abs(got["topk_logits"] - exact)
    # ddk-topk (docs/CODEC.md): each log-prob below the row's top is on a grid of step <= step_max (error <= half a
    # step), and the row's level is restored from the top-k mass to within mass_step / 2 in logit space.
    cfg = codec_desc["config"]
    rel_err = np.abs((got["topk_logits"] - got["topk_logits"][..., :1]) - (exact - exact[..., :1]))
    assert rel_err.max() <= cfg["step_max"] + 1e-4, f"relative logit error {rel_err.max():.3e}"
    assert err.max() <= cfg["step_max"] + cfg["mass_step"] + 1e-4, f"absolute logit error {err.max():.3e}"
    assert (np.diff(got["topk_logits"], axis=-1) <= 1e-6 * (1 + np.abs(exact[..., 1:]))).all(), "not descending"


def test_jsonl_and_folders_give_identical_shards(reference, teacher_dir, corpus_folders, tmp_path):
    result, _ = reference
    other = run_dump(_config(teacher_dir, corpus_folders, tmp_path / "dump"))
    assert other.manifest.corpus["sha256"] == result.manifest.corpus["sha256"]
    assert _checksums(other.manifest) == _checksums(result.manifest)


def test_resume_after_a_crash_equals_an_uninterrupted_run(reference, teacher_dir, corpus_file, tmp_path):
    result, _ = reference
    out = tmp_path / "dump"
    written = []

    def crash_after_four(domain, split, index, info):
        written.append(info.file)
        if len(written) == 4:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_dump(_config(teacher_dir, corpus_file, out), after_shard=crash_after_four)
    assert not open_dump(out, allow_incomplete=True).manifest.complete
    resumed = run_dump(_config(teacher_dir, corpus_file, out))
    assert resumed.stats.shards_kept == 4 and resumed.stats.shards_written == 12 - 4
    assert _checksums(resumed.manifest) == _checksums(result.manifest)
    again = run_dump(_config(teacher_dir, corpus_file, out))  # a finished dump: nothing to do, no model load
    assert again.stats.shards_written == 0 and again.stats.load_s == 0


def test_a_lost_shard_is_recomputed(reference, teacher_dir, corpus_file, tmp_path):
    result, ref_out = reference
    out = tmp_path / "dump"
    shutil.copytree(ref_out, out)
    (out / result.manifest.domains["prose"].splits["train"].shards[1].file).unlink()
    with pytest.warns(UserWarning, match="missing or truncated"):
        again = run_dump(_config(teacher_dir, corpus_file, out))
    assert again.stats.shards_written == 1
    assert _checksums(again.manifest) == _checksums(result.manifest)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"top_k": 4}, "k: 8"),
        ({"seq_len": 16, "max_tokens_per_domain": 160}, "seq_len: 32"),
        ({"batch_size": 1}, r"settings\.batch_size: 2"),
    ],
)
def test_a_different_dump_in_out_is_refused(reference, teacher_dir, corpus_file, change, field):
    _, out = reference
    with pytest.raises(
        DumpDirError, match=rf"manifest\.json: this folder holds a different dump \({field}.*another --out"
    ):
        run_dump(_config(teacher_dir, corpus_file, out, **change))


def test_a_different_teacher_is_refused(reference, corpus_file, tmp_path):
    _, out = reference
    other = tiny.save_teacher(tmp_path / "other", seed=1)
    with pytest.raises(DumpDirError, match=r"teacher\.weights_sha256"):
        run_dump(_config(other, corpus_file, out))


def test_a_second_writer_is_refused(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "dump"
    out.mkdir()
    with DumpLock(out):
        with pytest.raises(DumpDirError, match=r"another dump-teacher \(pid \d+\) is writing"):
            run_dump(_config(teacher_dir, corpus_file, out))


def _write(path, rows):
    return tiny.write_jsonl(rows, path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-column", r"corpus\.jsonl:1: no field 'text'.*--text-column"),
        ("all-empty", r"all 3 documents are empty"),
        ("empty-corpus", r"holds no documents"),
        ("non-utf8", r"corpus\.jsonl:2: not valid UTF-8"),
        ("short-domain", r"domain 'tiny' has \d+ tokens, fewer than one sequence"),
        ("seq-len", r"--seq-len 1024: above the teacher's max_position_embeddings \(512"),
        ("top-k", r"--top-k 385: above the teacher's vocabulary \(384"),
        ("not-a-dump", r"not empty and holds no dump"),
    ],
)
def test_bad_input_is_refused_without_output(teacher_dir, corpus_rows, tmp_path, case, message):
    data, out, kw = tmp_path / "corpus.jsonl", tmp_path / "dump", {}
    rows = corpus_rows[:9]
    if case == "missing-column":
        rows = [{"body": r["text"], "domain": r["domain"]} for r in rows]
    elif case == "all-empty":
        rows = [{"text": " ", "domain": "a"}] * 3
    elif case == "empty-corpus":
        rows = []
    elif case == "short-domain":
        rows = [*corpus_rows, {"text": "hi", "domain": "tiny"}]
    elif case == "seq-len":
        kw = {"seq_len": 1024, "max_tokens_per_domain": None}
    elif case == "top-k":
        kw = {"top_k": 385}
    elif case == "not-a-dump":
        rows = corpus_rows
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    _write(data, rows)
    if case == "non-utf8":
        data.write_bytes(data.read_bytes().split(b"\n", 1)[0] + b"\n" + b'{"text": "caf\xe9", "domain": "prose"}\n')
    with pytest.raises(UserError, match=message):
        run_dump(_config(teacher_dir, data, out, **kw))
    assert (not out.exists()) or sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_empty_documents_are_skipped_and_counted(teacher_dir, corpus_rows, tmp_path):
    rows = [*corpus_rows[:30], {"text": "", "domain": "prose"}, {"text": "\n\n", "domain": "code"}]
    result = run_dump(_config(teacher_dir, _write(tmp_path / "c.jsonl", rows), tmp_path / "dump", val_fraction=0.0))
    assert result.manifest.corpus["domains"]["prose"]["empty_documents"] == 1
    assert result.manifest.corpus["domains"]["code"]["empty_documents"] == 1
    assert math.isfinite(open_dump(tmp_path / "dump").teacher_loss("prose"))


def test_a_changed_corpus_says_how_to_resume(reference, teacher_dir, tmp_path):
    _, out = reference
    changed = tiny.write_jsonl(tiny.make_corpus(30, seed=5), tmp_path / "corpus.jsonl")
    with pytest.raises(DumpDirError, match=r"corpus\.sha256.*restore the corpus it was made from.*another --out"):
        run_dump(_config(teacher_dir, changed, out))
