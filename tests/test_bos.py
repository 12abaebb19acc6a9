"""Teachers that expect a BOS (issue #14): packing with BOS at each document and row start, targets masked before
each BOS in phase one and two, the ``--bos`` policy in the manifest and on resume, and the start-up check."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny
import torch
from conftest import run_cli

from ddk_offline.distillation.data import IGNORE_INDEX, BatchLoader
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.bos import resolve_bos, tokenizer_adds_bos
from ddk_offline.dump.bos_check import WARN_ABOVE
from ddk_offline.dump.config import PackingMismatchWarning
from ddk_offline.dump.corpus import Document
from ddk_offline.dump.packing import Packer, take_row
from ddk_offline.dump.teachers import HFTeacher, reduce_logits
from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest, ManifestError
from ddk_offline.format.reader import open_dump
from ddk_offline.format.schema import BOS_FORMAT_VERSION, FORMAT_VERSION

SEQ = 32


@pytest.fixture(scope="module")
def bos_teacher(tmp_path_factory):
    """A tiny teacher whose tokenizer puts ``<s>`` in front of text (as Gemma's and Llama's do)."""
    return tiny.save_teacher(tmp_path_factory.mktemp("bos-teacher"), bos=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny.write_jsonl(tiny.make_corpus(30), tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


def _config(teacher, data, out, **kw) -> DumpConfig:
    base = dict(seq_len=SEQ, top_k=8, batch_size=2, val_fraction=0.2, max_tokens_per_domain=10 * SEQ)
    return DumpConfig(
        teacher=str(teacher), data=str(data), out=str(out), device="cpu", **(base | dict(shard_tokens=3 * SEQ) | kw)
    )


@pytest.fixture(scope="module")
def bos_dump(bos_teacher, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bos-dump") / "dump"
    return run_dump(_config(bos_teacher, corpus, out)), out


def _tokenizer(teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


# --- packing rules ------------------------------------------------------------------------------------------------
def test_take_row_starts_every_row_with_bos():
    assert take_row([5, 6, 7, 8, 9], 4, None) == ([5, 6, 7, 8], 4)
    assert take_row([1, 6, 7, 8, 9], 4, 1) == ([1, 6, 7, 8], 4)  # a document starts here: its own BOS
    assert take_row([6, 7, 8, 9], 4, 1) == ([1, 6, 7, 8], 3)  # mid-document: a BOS is inserted
    assert take_row([6, 7], 4, 1) is None and take_row([5, 6, 7], 4, None) is None


def test_packer_puts_bos_at_each_document_and_row_start(bos_teacher):
    tok = _tokenizer(bos_teacher)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    docs = [Document("d", r["text"], "") for r in tiny.make_corpus(6) if r["domain"] == "prose"]
    packer = Packer(tok, seq_len=SEQ, val_fraction=0.0, bos_token_id=bos)
    rows = [s.input_ids.tolist() for s in packer.pack(docs)]
    assert len(rows) > 3 and all(r[0] == bos and len(r) == SEQ for r in rows)
    # A row starts with its document's own BOS exactly when the row before ended a document; otherwise (a row
    # that begins inside a document) the BOS is inserted. Without the inserted ones, the rows are the stream.
    inserted = [i > 0 and rows[i - 1][-1] != eos for i in range(len(rows))]
    kept = [t for r, ins in zip(rows, inserted, strict=True) for t in (r[1:] if ins else r)]
    stream = [t for d in docs for t in (bos, *tok(d.text, add_special_tokens=False)["input_ids"], eos)]
    assert kept == stream[: len(kept)]
    stats = packer.stats["d"]
    assert stats.tokens == len(stream)  # BOS + text + EOS per document
    assert stats.row_bos_tokens == sum(inserted) > 0
    assert stats.dropped_tokens == len(stream) - len(kept)
    assert stats.to_dict()["row_bos_tokens"] == sum(inserted)


def test_without_bos_the_rows_are_the_plain_stream(bos_teacher):
    tok = _tokenizer(bos_teacher)
    docs = [Document("d", r["text"], "") for r in tiny.make_corpus(6) if r["domain"] == "code"]
    packer = Packer(tok, seq_len=SEQ, val_fraction=0.0)
    rows = [t for s in packer.pack(docs) for t in s.input_ids.tolist()]
    stream = [t for d in docs for t in (*tok(d.text, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    assert rows == stream[: len(rows)] and tok.bos_token_id not in rows
    assert "row_bos_tokens" not in packer.stats["d"].to_dict()  # the manifest record of such dumps is unchanged


# --- the policy ---------------------------------------------------------------------------------------------------
def test_the_policy_follows_the_tokenizer(bos_teacher, teacher_dir):
    with_bos, plain = _tokenizer(bos_teacher), _tokenizer(teacher_dir)
    assert tokenizer_adds_bos(with_bos) and not tokenizer_adds_bos(plain)
    assert resolve_bos("auto", with_bos).token_id == with_bos.bos_token_id
    assert resolve_bos("never", with_bos).token_id is None
    assert resolve_bos("auto", plain).token_id is None
    with pytest.raises(UserError, match=r"--bos always: the teacher's tokenizer has no BOS token"):
        resolve_bos("always", plain)
    plain.bos_token = plain.eos_token  # GPT-2's convention: BOS is EOS
    with pytest.raises(UserError, match=r"--bos always: the tokenizer's BOS '<\|endoftext\|>' is its EOS"):
        resolve_bos("always", plain)
    with pytest.raises(UserError, match=r"--bos 'sometimes': choose one of auto, always, never"):
        resolve_bos("sometimes", with_bos)


def test_manifest_records_the_policy_and_versions_agree(bos_dump, teacher_dir, corpus, tmp_path):
    result, out = bos_dump
    m = Manifest.load(out)
    assert m.format_version == BOS_FORMAT_VERSION and m.bos_token_id == 1 and m.bos_policy == "auto"
    assert m.packing["bos_token"] == "<s>" and m.packing["tokenizer_adds_bos"] and m.packing["row_start_bos"]
    assert all(d["row_bos_tokens"] > 0 for d in m.corpus["domains"].values())
    shard = out / m.domains["code"].splits["train"].shards[0].file
    assert pq.ParquetFile(shard).schema_arrow.metadata[b"ddk_version"] == str(BOS_FORMAT_VERSION).encode()
    plain = run_dump(_config(teacher_dir, corpus, tmp_path / "plain")).manifest  # a teacher without BOS
    assert plain.format_version == FORMAT_VERSION and plain.bos_token_id is None and plain.bos_policy == "auto"
    # A format-2 manifest naming a BOS (or a format-3 one naming none) is refused: an older reader would not mask.
    for version, bos in ((FORMAT_VERSION, 1), (BOS_FORMAT_VERSION, None)):
        bad = dataclasses.replace(m, format_version=version, packing=m.packing | {"bos_token_id": bos})
        with pytest.raises(ManifestError, match="packing.bos_token_id"):
            Manifest.from_dict(bad.to_dict())


def test_a_manifest_without_packing_reads_as_no_bos_and_rewrites_unchanged(bos_dump):
    d = dataclasses.replace(Manifest.load(bos_dump[1]), format_version=FORMAT_VERSION, packing=None).to_dict()
    assert "packing" not in d  # as dumps written before the policy was recorded
    old = Manifest.from_dict(d)
    assert old.bos_token_id is None and old.bos_policy == "never" and old.packing_check is None
    assert old.to_dict() == d


# --- phase one: targets, verify, resume ---------------------------------------------------------------------------
def test_no_target_before_a_bos_and_verify_accepts_it(bos_dump, bos_teacher):
    result, out = bos_dump
    reader = open_dump(out)
    model = _model(bos_teacher)
    inside = 0  # documents starting inside a row: their BOS is predicted by the EOS before it
    for domain in reader.domains:
        for shard in range(len(reader.shards(domain, "train"))):
            info = reader.shards(domain, "train")[shard]
            got = reader.read_rows(domain, "train", shard, list(range(info.rows)))
            ids, nll = got["input_ids"], got["teacher_nll"]
            assert (ids[:, 0] == 1).all()
            no_target = np.zeros(ids.shape, bool)
            no_target[:, -1] = True
            no_target[:, :-1] = ids[:, 1:] == 1
            inside += int(no_target[:, :-1].sum())
            assert np.isnan(nll[no_target]).all() and np.isfinite(nll[~no_target]).all()
            assert info.labelled == int((~no_target).sum())
            with torch.inference_mode():
                logits = model(input_ids=torch.from_numpy(ids)).logits.double()
            want = (
                torch.logsumexp(logits, -1)[:, :-1]
                - logits[:, :-1].gather(-1, torch.from_numpy(ids[:, 1:, None]))[..., 0]
            )
            ok = ~no_target[:, :-1]
            np.testing.assert_allclose(nll[:, :-1][ok], want.numpy()[ok], rtol=1e-5, atol=1e-5)
    assert inside > 0
    proc = run_cli("dumps", "verify", str(out))
    assert "shards match the manifest" in proc.stdout


def test_a_resume_keeps_the_policy_of_the_dump(bos_dump, bos_teacher, corpus, tmp_path):
    result, _ = bos_dump
    out = tmp_path / "dump"
    seen = []

    def crash_after_two(domain, split, index, info):
        seen.append(Manifest.load(out).packing_check)  # recorded before the first shard
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_dump(_config(bos_teacher, corpus, out), after_shard=crash_after_two)
    assert seen[0] is not None and seen[0]["relative_difference"] is not None
    with pytest.raises(UserError, match=r"--bos never: the dump in --out .* made with 'auto' \(BOS id 1\).*--bos auto"):
        run_dump(_config(bos_teacher, corpus, out, bos="never"))
    resumed = run_dump(_config(bos_teacher, corpus, out))  # auto adopts the dump's policy
    assert resumed.stats.shards_kept == 2
    assert _checksums(resumed.manifest) == _checksums(result.manifest)
    assert resumed.manifest.packing_check == seen[0]  # measured once per dump


def test_a_resume_of_a_dump_without_bos_keeps_it_without(bos_teacher, corpus, tmp_path):
    out = tmp_path / "dump"
    with pytest.raises(KeyboardInterrupt):
        run_dump(_config(bos_teacher, corpus, out, bos="never"), after_shard=_kill)
    with pytest.raises(UserError, match=r"--bos always: the dump in --out .* made with 'never' \(no BOS\)"):
        run_dump(_config(bos_teacher, corpus, out, bos="always"))
    resumed = run_dump(_config(bos_teacher, corpus, out)).manifest  # auto, although the tokenizer adds BOS
    assert resumed.bos_token_id is None and resumed.format_version == FORMAT_VERSION


def _kill(*_):
    raise KeyboardInterrupt("simulated kill")


# --- the start-up check -------------------------------------------------------------------------------------------
class BosTrainedTeacher(HFTeacher):
    """A teacher that, like Gemma, runs out of distribution without BOS: rows that lack one get noisy logits."""

    def targets(self, input_ids, *, k, extra_temperatures=()):
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids).logits
            noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)) * 4.0
            no_bos = input_ids[:, :1] != self.tokenizer().bos_token_id
            logits = torch.where(no_bos[..., None], logits + noise, logits)
            return reduce_logits(logits, input_ids, k=k, extra_temperatures=extra_temperatures)


def test_the_start_up_check_fires_on_a_mismatched_policy(bos_teacher, corpus, tmp_path):
    with pytest.warns(
        PackingMismatchWarning, match=r"packed rows \(no BOS \(--bos never\)\) is \+\d+\.\d%.*--bos auto"
    ):
        bad = run_dump(
            _config(bos_teacher, corpus, tmp_path / "never", bos="never"), teacher=BosTrainedTeacher(str(bos_teacher))
        )
    check = bad.manifest.packing_check
    assert check["relative_difference"] > WARN_ABOVE and check["documents"] >= 3 and check["bytes"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackingMismatchWarning)
        good = run_dump(_config(bos_teacher, corpus, tmp_path / "auto"), teacher=BosTrainedTeacher(str(bos_teacher)))
    assert abs(good.manifest.packing_check["relative_difference"]) < 0.02
    info = run_cli("dumps", "info", str(tmp_path / "never")).stdout
    assert "packing   no BOS (--bos never; the tokenizer adds BOS)" in info and "OFF BY MORE THAN 5%" in info
    info = json.loads(run_cli("dumps", "info", str(tmp_path / "auto"), "--json").stdout)
    assert info["packing"]["bos_token_id"] == 1 and info["packing"]["check"] == good.manifest.packing_check


# --- phase two and the CLI ----------------------------------------------------------------------------------------
def test_phase_two_masks_labels_before_bos(bos_dump):
    reader = open_dump(bos_dump[1])
    loader = BatchLoader(reader, seed=0, prefetch=False)
    loader.submit(loader.plan(np.arange(6) % len(reader.domains)))
    batch = loader.next()
    ids, labels = batch.input_ids, batch.labels
    assert (labels[:, :-1][ids[:, 1:] == 1] == IGNORE_INDEX).all()
    assert (labels != 1).all() and (labels[:, :-1][ids[:, 1:] != 1] == ids[:, 1:][ids[:, 1:] != 1]).all()
    assert torch.isfinite(batch.teacher_nll).all()  # NaN before BOS became a 0 weight, like the last position
    loader.close()


@pytest.mark.slow
def test_bos_teacher_through_dump_distill_eval_cli(bos_teacher, corpus, tmp_path):
    out = tmp_path / "dump"
    run_cli("dump-teacher", "--teacher", str(bos_teacher), "--data", str(corpus), "--out", str(out), "--seq-len", "32",
            "--top-k", "8", "--batch-size", "4", "--val-fraction", "0.2", "--shard-tokens", "256",
            "--max-tokens-per-domain", "640", "-q")  # fmt: skip
    assert Manifest.load(out).bos_token_id == 1
    info = run_cli("dumps", "info", str(out)).stdout
    assert "BOS '<s>' (id 1) at each document and row start (--bos auto; the tokenizer adds BOS)" in info
    assert "check     packed rows" in info and "OFF BY" not in info
    run_cli("distill", "--dump", str(out), "--out", str(tmp_path / "run"), "--derive-from-teacher", "layers=1",
            "--max-steps", "4", "--batch-size", "2", "--device", "cpu", "-q")  # fmt: skip
    result = json.loads(run_cli("eval", "--dump", str(out), "--model", str(bos_teacher), "--json",
                                "--device", "cpu").stdout)  # fmt: skip
    m = Manifest.load(out)
    for name, d in result[0]["domains"].items():
        # The teacher evaluated now reproduces its stored loss over exactly the stored positions (BOS ones masked).
        assert d["ratio"] == pytest.approx(1.0, abs=1e-4)
        assert d["positions"] == sum(s.labelled for s in m.domains[name].splits["val"].shards)


def test_always_without_a_bos_token_is_refused_by_the_cli(teacher_dir, corpus, tmp_path):
    proc = run_cli("dump-teacher", "--teacher", str(teacher_dir), "--data", str(corpus), "--out",
                   str(tmp_path / "dump"), "--bos", "always", "-q", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--bos always: the teacher's tokenizer has no BOS token" in proc.stderr
    assert not (tmp_path / "dump").exists()


def _model(teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()


def _checksums(manifest) -> dict:
    return {
        (d, s): [(sh.file, sh.rows, sh.sha256) for sh in info.splits[s].shards]
        for d, info in sorted(manifest.domains.items())
        for s in ("train", "val")
    }
