"""What DSKD needs from the teacher besides its top-k: the hidden-state column and the teacher matrices file.

Hidden states round-trip within the encoding's rounding and are byte-identical for any number of encode workers;
matrices equal the teacher's; a corrupted matrices file is caught; ``dumps add-teacher-matrices`` adds them to an
existing dump, refuses another teacher and is a no-op the second time; a dump without either still reads as before.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny
import torch
from asserts import assert_close

from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.outdir import DumpDirError
from ddk_offline.dump.teacher_extras import add_teacher_matrices
from ddk_offline.errors import UserError
from ddk_offline.format import (  # the public path phase two uses
    TeacherMatricesError,
    hidden_codec,
    load_teacher_matrices,
)
from ddk_offline.format.manifest import Manifest, ManifestError
from ddk_offline.format.reader import open_dump
from ddk_offline.format.schema import TEACHER_HIDDEN, TEACHER_MATRICES_NAME

SEQ, K = 32, 8
# Per encoding: the largest error allowed relative to each value (fp16, bf16) or to the position's absmax (int8).
ROUNDING = {"fp16-bss-zstd": 2.0**-11, "bf16-bss-zstd": 2.0**-8, "int8-absmax-zstd": 0.5 / 127}


def _config(teacher, data, out, **kw) -> DumpConfig:
    base = dict(seq_len=SEQ, top_k=K, batch_size=2, val_fraction=0.2, max_tokens_per_domain=6 * SEQ)
    return DumpConfig(teacher=str(teacher), data=str(data), out=str(out), shard_tokens=2 * SEQ, **(base | kw))


def _checksums(manifest) -> dict:
    return {
        (d, s): [sh.sha256 for sh in i.splits[s].shards] for d, i in sorted(manifest.domains.items()) for s in i.splits
    }


def _model(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return tiny.write_jsonl(tiny.make_corpus(20), tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def plain(teacher_dir, corpus_file, tmp_path_factory):
    """A default dump: neither hidden states nor matrices."""
    out = tmp_path_factory.mktemp("plain") / "dump"
    return run_dump(_config(teacher_dir, corpus_file, out, encode_workers=0)).manifest, out


@pytest.fixture(scope="module")
def extras(teacher_dir, corpus_file, tmp_path_factory):
    """The same dump with hidden states and teacher matrices."""
    out = tmp_path_factory.mktemp("extras") / "dump"
    cfg = _config(
        teacher_dir, corpus_file, out, encode_workers=0, store_hidden_states=True, store_teacher_matrices=True
    )
    return run_dump(cfg).manifest, out


@pytest.mark.parametrize("encoding", hidden_codec.ENCODINGS)
def test_hidden_codec_round_trip_within_its_rounding(encoding):
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((17, 40)) * np.exp(rng.standard_normal((1, 40)))).astype(np.float32)
    h[3] = 0.0  # an all-zero position (int8: scale 0)
    blob = hidden_codec.encode(h, encoding)
    back = hidden_codec.decode(blob, 17, 40, encoding)
    assert back.dtype == np.float32 and back.shape == h.shape
    ref = np.abs(h).max(axis=1, keepdims=True) if encoding.startswith("int8") else np.abs(h)
    assert (np.abs(back - h) <= ROUNDING[encoding] * ref + 1e-7).all()  # 1e-7: fp16 subnormals
    assert hidden_codec.encode(h, encoding) == blob  # a pure function: the same bytes in any process
    with pytest.raises(hidden_codec.HiddenCodecError, match="expected"):
        hidden_codec.decode(blob, 17, 41, encoding)
    with pytest.raises(hidden_codec.HiddenCodecError, match="not valid zstd"):
        hidden_codec.decode(b"garbage", 17, 40, encoding)


def test_a_hidden_state_beyond_float16_is_refused_not_stored_as_inf():
    h = np.ones((2, 4), np.float32)
    h[1, 2] = 1e5
    assert "--hidden-encoding bf16-bss-zstd" in hidden_codec.range_problem(h, "fp16-bss-zstd")
    with pytest.raises(ValueError, match="beyond float16's range"):
        hidden_codec.encode(h, "fp16-bss-zstd")
    assert hidden_codec.range_problem(h, "bf16-bss-zstd") is None
    h[0, 0] = np.nan
    assert "NaN or inf" in hidden_codec.range_problem(h, "bf16-bss-zstd")


def test_hidden_states_equal_the_teachers_last_hidden_state(extras, teacher_dir):
    manifest, out = extras
    assert manifest.has_hidden_states and manifest.hidden_size == 48
    assert manifest.hidden_states == hidden_codec.describe(hidden_codec.DEFAULT_ENCODING, 48)
    reader = open_dump(out)
    model = _model(teacher_dir)
    head = model.get_output_embeddings().weight.detach()
    for domain in reader.domains:
        got = reader.read_rows(domain, "train", 0, [0, 1], hidden=True)
        with torch.inference_mode():
            want = model(input_ids=torch.from_numpy(got["input_ids"]), output_hidden_states=True)
        h = want.hidden_states[-1]
        assert got[TEACHER_HIDDEN].shape == (2, SEQ, 48) and got[TEACHER_HIDDEN].dtype == np.float32
        assert_close(got[TEACHER_HIDDEN], h, rtol=ROUNDING[hidden_codec.DEFAULT_ENCODING], atol=1e-6, name="hidden")
        # The stored state is the one the head multiplies (after the final norm): it reproduces the logits.
        assert_close(torch.from_numpy(got[TEACHER_HIDDEN]) @ head.T, want.logits, rtol=1e-2, atol=2e-2, name="logits")
    seq = next(reader.sequences(reader.domains[0], hidden=True))
    assert seq[TEACHER_HIDDEN].shape == (SEQ, 48)


def test_extras_leave_the_top_k_and_a_default_dump_unchanged(plain, extras):
    (pm, pout), (_, eout) = plain, extras
    raw = json.loads((pout / "manifest.json").read_text())
    assert "teacher_matrices" not in raw and "hidden_states" not in raw["settings"]
    assert not pm.has_teacher_matrices and not pm.has_hidden_states and pm.hidden_size is None
    assert not (pout / TEACHER_MATRICES_NAME).exists()
    a, b = open_dump(pout), open_dump(eout)
    for domain in a.domains:
        x, y = a.read_rows(domain, "train", 0, [0]), b.read_rows(domain, "train", 0, [0])
        assert TEACHER_HIDDEN not in y  # not asked for: not read, not decoded
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ManifestError, match="no teacher hidden states.*--store-hidden-states"):
        a.read_rows(a.domains[0], "train", 0, [0], hidden=True)


def test_hidden_states_are_byte_identical_for_any_encode_workers(extras, teacher_dir, corpus_file, tmp_path):
    manifest, _ = extras
    cfg = _config(teacher_dir, corpus_file, tmp_path / "w2", encode_workers=2, store_hidden_states=True)
    assert _checksums(run_dump(cfg).manifest) == _checksums(manifest)


def test_matrices_equal_the_teachers(extras, teacher_dir):
    manifest, out = extras
    rec = manifest.teacher_matrices
    assert rec["dtype"] == "float16" and rec["head_shape"] == [384, 48] and rec["embed_shape"] == [384, 48]
    assert rec["tied"] is False and rec["softcap"] is None and rec["head_bias"] is False
    assert "teacher_matrices" not in " ".join(manifest.identity())  # adding them never breaks a distill --resume
    m = load_teacher_matrices(out)
    model = _model(teacher_dir)
    want_embed = model.get_input_embeddings()(torch.arange(384)).detach()
    assert m.embed.dtype == torch.float16 and m.head_bias is None and not m.tied and m.hidden_size == 48
    assert torch.equal(m.embed, want_embed.half())
    assert torch.equal(m.head, model.get_output_embeddings().weight.detach().half())


def test_tied_teacher_stores_the_head_once(tmp_path, corpus_file):
    teacher = tiny.save_teacher(tmp_path / "tied", seed=2, tie_word_embeddings=True)
    out = tmp_path / "dump"
    manifest = run_dump(_config(teacher, corpus_file, out, store_teacher_matrices=True, matrices_dtype="float32"))
    rec = manifest.manifest.teacher_matrices
    assert rec["tied"] is True and rec["embed_scale"] == 1.0
    from safetensors import safe_open

    with safe_open(str(out / TEACHER_MATRICES_NAME), "pt") as f:
        assert sorted(f.keys()) == ["head"]
    m = load_teacher_matrices(out)
    assert m.tied and torch.equal(m.embed, m.head) and m.dtype == "float32"


def test_verify_catches_a_corrupted_matrices_file(extras, tmp_path, cli):
    _, src = extras
    out = tmp_path / "dump"
    shutil.copytree(src, out)
    data = bytearray((out / TEACHER_MATRICES_NAME).read_bytes())
    data[-5] ^= 0x40
    (out / TEACHER_MATRICES_NAME).write_bytes(bytes(data))
    proc = cli("dumps", "verify", str(out), check=False)
    assert proc.returncode == 1
    assert f"{TEACHER_MATRICES_NAME}: size or sha256 differs" in proc.stderr and "add-teacher-matrices" in proc.stderr
    with pytest.raises(TeacherMatricesError, match="sha256 differs"):
        load_teacher_matrices(out)
    proc = cli("dumps", "verify", str(out), "--repair")  # rewrites the file from the teacher, the same bytes
    assert "shards match the manifest" in proc.stdout
    assert (out / TEACHER_MATRICES_NAME).read_bytes() == (src / TEACHER_MATRICES_NAME).read_bytes()
    (out / TEACHER_MATRICES_NAME).unlink()
    with pytest.raises(TeacherMatricesError, match="missing"):
        load_teacher_matrices(out)


def test_verify_decodes_the_hidden_states(extras, cli):
    _, out = extras
    proc = cli("dumps", "verify", str(out), "--sample-rows", "0")
    assert "shards match the manifest" in proc.stdout


def test_a_dump_without_matrices_says_how_to_add_them(plain):
    _, out = plain
    with pytest.raises(TeacherMatricesError, match=r"no teacher matrices.*dumps add-teacher-matrices"):
        load_teacher_matrices(out)


def test_add_teacher_matrices_to_an_existing_dump(plain, teacher_dir, tmp_path, cli):
    manifest, src = plain
    out = tmp_path / "dump"
    shutil.copytree(src, out)
    shards = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    proc = cli("dumps", "add-teacher-matrices", str(out))  # the teacher comes from the manifest
    assert "wrote head [384, 48]" in proc.stdout
    after = Manifest.load(out)
    assert after.has_teacher_matrices and after.identity() == manifest.identity()
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == shards
    assert torch.equal(load_teacher_matrices(out).head, _model(teacher_dir).lm_head.weight.detach().half())
    before = (out / "manifest.json").read_bytes()
    again = cli("dumps", "add-teacher-matrices", str(out))
    assert "nothing to do" in again.stdout and (out / "manifest.json").read_bytes() == before
    assert cli("dumps", "verify", str(out)).returncode == 0


def test_add_teacher_matrices_refuses_another_teacher(plain, tmp_path, cli):
    _, src = plain
    out = tmp_path / "dump"
    shutil.copytree(src, out)
    before = (out / "manifest.json").read_bytes()
    other = tiny.save_teacher(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match=r"not the teacher the dump .*teacher\.weights_sha256.*Nothing was changed"):
        add_teacher_matrices(out, teacher=str(other))
    proc = cli("dumps", "add-teacher-matrices", str(out), "--teacher", str(other), check=False)
    assert proc.returncode == 2 and "weights_sha256" in proc.stderr
    assert (out / "manifest.json").read_bytes() == before and not (out / TEACHER_MATRICES_NAME).exists()


def test_dump_teacher_cli_stores_both_and_info_shows_them(cli, teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "dump"
    args = ["--teacher", str(teacher_dir), "--data", str(corpus_file), "--out", str(out), "--seq-len", str(SEQ)]
    args += ["--top-k", str(K), "--max-tokens-per-domain", str(4 * SEQ), "--encode-workers", "0", "--quiet"]
    cli(
        "dump-teacher",
        *args,
        "--store-hidden-states",
        "--hidden-encoding",
        "int8-absmax-zstd",
        "--store-teacher-matrices",
    )
    info = json.loads(cli("dumps", "info", str(out), "--json").stdout)
    assert info["hidden_states"]["encoding"] == "int8-absmax-zstd" and info["hidden_states"]["dim"] == 48
    assert info["teacher_matrices"]["dtype"] == "float16" and info["teacher_matrices"]["file"] == TEACHER_MATRICES_NAME
    text = cli("dumps", "info", str(out)).stdout
    assert "hidden    teacher's last hidden state stored, D = 48, int8-absmax-zstd" in text and "matrices  " in text
    reader = open_dump(out)
    assert reader.read_rows("code", "train", 0, [0], hidden=True)[TEACHER_HIDDEN].shape == (1, SEQ, 48)
    # A rerun keeps the dump's own setting, as it keeps its BOS policy: nothing to do, the hidden states stay.
    cli("dump-teacher", *args)
    assert Manifest.load(out).hidden_states == info["hidden_states"]


def test_asking_for_hidden_states_on_a_dump_without_them_is_refused(plain, teacher_dir, corpus_file, tmp_path):
    _, src = plain
    out = tmp_path / "dump"
    shutil.copytree(src, out)
    with pytest.raises(DumpDirError, match=r"different dump \(settings\.hidden_states: None in the dump"):
        run_dump(_config(teacher_dir, corpus_file, out, encode_workers=0, store_hidden_states=True))


def test_a_killed_dump_with_hidden_states_resumes_to_the_same_bytes(extras, teacher_dir, corpus_file, tmp_path):
    manifest, _ = extras
    out, written = tmp_path / "dump", []

    def crash_after_two(domain, split, index, info):
        written.append(info.file)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")

    cfg = _config(teacher_dir, corpus_file, out, encode_workers=0, store_hidden_states=True)
    with pytest.raises(KeyboardInterrupt):
        run_dump(cfg, after_shard=crash_after_two)
    resumed = run_dump(cfg)
    assert resumed.stats.shards_kept == 2 and _checksums(resumed.manifest) == _checksums(manifest)
