"""The bad-input matrix (docs/RELIABILITY.md): each case fails with a message naming what is wrong, where, and the
fix, and leaves no partial output. Also: the disk filling up mid-dump fails cleanly and the rerun resumes."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny
from synthdump import write_synth_dump

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.trainer import distill
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.outdir import DiskFullError
from ddk_offline.dump.verify import verify_dump
from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest, ManifestError
from ddk_offline.format.reader import ShardError, open_dump

SEQ = 32


def _config(teacher, data, out, **kw) -> DumpConfig:
    base = dict(seq_len=SEQ, top_k=8, batch_size=2, val_fraction=0.2, max_tokens_per_domain=10 * SEQ)
    return DumpConfig(teacher=str(teacher), data=str(data), out=str(out), **(base | dict(shard_tokens=3 * SEQ) | kw))


def _snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# --- phase one: corpus and options ------------------------------------------------------------------------------
def _corpus(case: str, root, rows):
    """Build the bad corpus of ``case`` under ``root``; returns (data path, extra DumpConfig options)."""
    data = root / "corpus.jsonl"
    if case == "missing-corpus":
        return root / "nope.jsonl", {}
    if case == "empty-folder":
        (root / "c").mkdir()
        return root / "c", {}
    if case == "empty-file":
        data.write_text("")
        return data, {}
    if case == "missing-text-column":
        return tiny.write_jsonl([{"body": r["text"], "domain": r["domain"]} for r in rows], data), {}
    if case == "missing-domain-column":
        return tiny.write_jsonl([{"text": r["text"]} for r in rows], data), {}
    if case == "non-utf8":
        tiny.write_jsonl(rows[:3], data)
        data.write_bytes(data.read_bytes() + b'{"text": "caf\xe9", "domain": "prose"}\n')
        return data, {}
    if case in ("binary-file", "binary-ascii-file", "unsupported-file"):
        folder = tiny.write_domain_folders(rows, root / "c")
        name, blob = {
            "binary-file": ("blob.txt", bytes(range(128, 256)) * 4),  # high bytes, no NUL
            "binary-ascii-file": ("blob.txt", b"\x00\x01\x02ELF\x00" * 100),  # valid UTF-8, still binary
            "unsupported-file": ("photo.png", b"\x89PNG\r\n\x1a\n"),
        }[case]
        (folder / "prose" / name).write_bytes(blob)
        return folder, {}
    if case == "all-documents-empty":
        return tiny.write_jsonl([{"text": "  ", "domain": "a"}] * 3, data), {}
    if case == "short-domain":
        return tiny.write_jsonl([*rows, {"text": "hi", "domain": "tiny"}], data), {}
    if case == "seq-len-above-max-positions":
        return tiny.write_jsonl(rows, data), {"seq_len": 1024, "max_tokens_per_domain": None}
    if case == "top-k-above-vocab":
        return tiny.write_jsonl(rows, data), {"top_k": 385}
    if case == "missing-teacher":
        return tiny.write_jsonl(rows, data), {"teacher": str(root / "no-teacher")}
    if case == "teacher-without-tokenizer":
        # A GPT-2 config and no tokenizer files: transformers builds an empty GPT2Tokenizer instead of failing, so
        # every document would tokenise to nothing and the dump would hold only EOS tokens.
        from transformers import GPT2Config

        GPT2Config(vocab_size=384, n_embd=16, n_layer=1, n_head=2).save_pretrained(root / "teacher")
        return tiny.write_jsonl(rows, data), {"teacher": str(root / "teacher")}
    if case == "out-below-a-file":
        (root / "taken").write_text("a file, not a folder")
        return tiny.write_jsonl(rows, data), {"out": str(root / "taken" / "dump")}
    raise AssertionError(case)


# case -> (what, where, fix): three regexes the message must match.
DUMP_CASES = {
    "missing-corpus": ("not a file, folder or glob that exists", r"--data \S*nope\.jsonl", "check the path"),
    "empty-folder": ("holds no data files", r"--data \S*/c\b", "point --data at the corpus files"),
    "empty-file": ("holds no documents", r"--data \S*corpus\.jsonl", "check the path and the files"),
    "missing-text-column": ("no field 'text'", r"corpus\.jsonl:1", "pass --text-column NAME"),
    "missing-domain-column": ("no field 'domain'", r"corpus\.jsonl:1", "pass --domain-column NAME"),
    "non-utf8": ("not valid UTF-8", r"corpus\.jsonl:4", "re-encode the file as UTF-8"),
    "binary-file": ("not valid UTF-8", r"prose/blob\.txt", "re-encode"),
    "binary-ascii-file": ("looks like a binary file", r"prose/blob\.txt", "remove it from the corpus"),
    "unsupported-file": ("unsupported file type '.png'", r"prose/photo\.png", "move the file out of the corpus"),
    "all-documents-empty": ("all 3 documents are empty", r"--data \S*corpus\.jsonl", "check --text-column"),
    "short-domain": ("fewer than one sequence", "domain 'tiny'", "lower --seq-len"),
    "seq-len-above-max-positions": ("above the teacher's max_position_embeddings", "--seq-len 1024", "lower --seq-len"),
    "top-k-above-vocab": (r"above the teacher's vocabulary \(384", "--top-k 385", "lower --top-k"),
    "missing-teacher": ("no such file or folder", r"--teacher \S*no-teacher", "check the path"),
    "teacher-without-tokenizer": ("no tokens besides special ones", r"--teacher \S*teacher", "save_pretrained"),
    "out-below-a-file": ("cannot create the folder", r"--out \S*taken/dump", "choose another --out"),
}


@pytest.mark.parametrize("case", list(DUMP_CASES))
def test_dump_bad_input(teacher_dir, corpus_rows, tmp_path, case):
    data, kw = _corpus(case, tmp_path, corpus_rows[:30])
    out = Path(kw.pop("out", tmp_path / "dump"))
    with pytest.raises(UserError) as info:
        run_dump(_config(kw.pop("teacher", teacher_dir), data, out, **kw))
    message = " ".join(str(info.value).split())
    for part in DUMP_CASES[case]:
        assert re.search(part, message), f"{part!r} not in {message!r}"
    assert not out.exists()  # nothing written: validation runs before --out is created


def test_empty_documents_are_skipped_and_counted(teacher_dir, corpus_rows, tmp_path):
    rows = [*corpus_rows[:30], {"text": "", "domain": "prose"}, {"text": " \n", "domain": "code"}]
    data = tiny.write_jsonl(rows, tmp_path / "c.jsonl")
    m = run_dump(_config(teacher_dir, data, tmp_path / "dump")).manifest
    assert m.corpus["domains"]["prose"]["empty_documents"] == 1 and m.corpus["domains"]["code"]["empty_documents"] == 1


# --- phase one: the output directory ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_dump(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    corpus = tiny.write_jsonl(tiny.make_corpus(30), root / "corpus.jsonl")
    config = _config(teacher_dir, corpus, root / "ref")
    return config, run_dump(config).manifest


def test_a_dump_from_another_teacher_in_out_is_refused_untouched(small_dump, tmp_path):
    config, _ = small_dump
    before = _snapshot(Path(config.out))
    other = tiny.save_teacher(tmp_path / "other", seed=1)
    with pytest.raises(UserError) as info:
        run_dump(_config(other, config.data, config.out))
    msg = str(info.value)
    assert "manifest.json: this folder holds a different dump" in msg and "teacher.weights_sha256" in msg
    assert "Use another --out" in msg
    assert _snapshot(Path(config.out)) == before


# --- the disk fills up mid-dump ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where, n", [("shard", 5), ("manifest", 6), ("manifest", 1)])
def test_disk_full_fails_cleanly_and_the_rerun_resumes(small_dump, tmp_path, monkeypatch, where, n):
    import ddk_offline.format.writer as writer_mod
    import ddk_offline.runtime.files as files_mod

    config, reference = small_dump
    out = tmp_path / "dump"
    calls = [0]

    def full(path):
        calls[0] += 1
        if calls[0] == n:
            with open(path, "wb") as f:
                f.write(b"PAR1 partial")  # what a full disk leaves: a short file
            raise OSError(errno.ENOSPC, "No space left on device")

    if where == "shard":
        real = writer_mod.pq.write_table
        monkeypatch.setattr(writer_mod.pq, "write_table", lambda t, p, **kw: full(p) or real(t, p, **kw))
    else:

        def fake_open(path, mode="r", *a, **kw):
            if "manifest.json.tmp" in str(path):
                full(path)
            return open(path, mode, *a, **kw)

        monkeypatch.setattr(files_mod, "open", fake_open, raising=False)  # write_bytes_atomic (the manifest)
    with pytest.raises(DiskFullError) as info:
        run_dump(_config(config.teacher, config.data, out))
    msg = str(info.value)
    assert f"--out {out}: the disk is full (No space left on device)" in msg
    assert "Free space on that disk (or use another --out) and rerun the same command" in msg
    monkeypatch.undo()
    if where == "manifest" and n == 1:  # failed before anything was worth keeping: no folder left
        assert "nothing was kept" in msg and not out.exists()
    else:
        assert "complete shard(s) are kept" in msg
        assert not list((out / ".tmp").iterdir()) and not list(out.glob(".manifest.json.tmp-*"))  # no partial file
        report = verify_dump(out, sample_rows=0)
        assert not report.broken_shards  # every listed shard is whole; the missing ones are merely unlisted
    resumed = run_dump(_config(config.teacher, config.data, out))
    shas = lambda m: {(d, s): [x.sha256 for x in i.splits[s].shards] for d, i in m.domains.items() for s in i.splits}
    assert shas(resumed.manifest) == shas(reference) and verify_dump(out).ok


# --- phase two: reading a dump ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    tok = tiny.train_tokenizer(128)
    dump = write_synth_dump(root / "dump", tok, counts={("a", "train"): 6, ("a", "val"): 2, ("b", "train"): 6})
    student = root / "student.json"
    student.write_text(tiny.make_model(len(tok), hidden=16, layers=1, heads=2, max_pos=64).config.to_json_string())
    return dump, student


def _distill(dump, student, out, **kw):
    return distill(DistillConfig(dump=str(dump), out=str(out), student_config=str(student), max_steps=2, batch_size=2,
                                 device="cpu", **kw))  # fmt: skip


def test_student_teacher_vocab_mismatch_is_refused_without_output(synth, tmp_path):
    dump, _ = synth
    wrong = tmp_path / "wrong.json"
    wrong.write_text(tiny.make_model(100, hidden=16, layers=1, heads=2).config.to_json_string())
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        _distill(dump, wrong, out)
    msg = str(info.value)
    assert "Student vocabulary does not match the teacher dump" in msg and str(dump) in msg
    assert "it has 100 embedding rows" in msg and "Fix:" in msg and "vocab_size=" in msg
    assert not out.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_shard_is_never_trained_on(synth, tmp_path, damage):
    src, student = synth
    dump = shutil.copytree(src, tmp_path / "dump")
    shard = dump / Manifest.load(dump).domains["b"].splits["train"].shards[0].file
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit: the size is unchanged, Parquet pages carry no checksum
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    with pytest.raises(ShardError) as info:
        reader = open_dump(dump)
        for _ in reader.sequences("b"):
            pass
    msg = str(info.value)
    assert msg.startswith(f"{shard}: missing, or its sha256 differs from the manifest") and "--repair" in msg
    with pytest.raises(ShardError, match=r"sha256 differs.*dumps verify"):
        _distill(dump, student, tmp_path / "run", sampler="uniform")


def test_a_hand_edited_manifest_is_refused(synth, tmp_path):
    src, student = synth
    dump = shutil.copytree(src, tmp_path / "dump")
    path = dump / "manifest.json"
    d = json.loads(path.read_text())
    d["domains"]["a"]["splits"]["train"]["shards"][0]["teacher_nll_sum"] *= 0.5  # a "small fix" by hand
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError) as info:
        _distill(dump, student, tmp_path / "run")
    msg = str(info.value)
    assert msg.startswith(f"{path}: checksum mismatch (field 'checksum')") and "restore manifest.json" in msg
    assert not (tmp_path / "run").exists()


def test_reader_and_verify_agree_on_a_good_dump(synth):
    dump, _ = synth
    reader = open_dump(dump)
    rows = [s["input_ids"] for s in reader.sequences("a")]
    assert len(rows) == 6 and all(r.dtype == np.int64 for r in rows)
    assert verify_dump(dump).ok


def test_a_corpus_changed_mid_dump_is_detected(small_dump, tmp_path):
    from ddk_offline.dump.teachers import HFTeacher

    config, reference = small_dump
    data = tmp_path / "corpus.jsonl"
    shutil.copy(config.data, data)
    original = data.read_text(encoding="utf-8")

    class EditingTeacher(HFTeacher):
        def load(self, **kwargs):  # between the pre-pass and the dump loop, someone edits a prose document
            data.write_text(original.replace("Of his winter", "Of her winter", 1), encoding="utf-8")
            super().load(**kwargs)

    out = tmp_path / "dump"
    with pytest.raises(UserError, match=r"the corpus changed while the dump was running \(domains \['prose'\]\)"):
        run_dump(_config(config.teacher, data, out), teacher=EditingTeacher(str(config.teacher)))
    m = Manifest.load(out)
    assert not m.domains["prose"].splits["train"].shards and m.domains["code"].splits["train"].shards
    assert not verify_dump(out, sample_rows=0).broken_shards
    data.write_text(original, encoding="utf-8")  # restored: the rerun finishes the dump with the old content
    shas = lambda m: {(d, s): [x.sha256 for x in i.splits[s].shards] for d, i in m.domains.items() for s in i.splits}
    assert shas(run_dump(_config(config.teacher, data, out)).manifest) == shas(reference)
