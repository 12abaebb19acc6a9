"""Security: no pickle where user files are read, remote code stays off, manifest paths stay inside the dump."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import ROOT
from synthdump import write_synth_dump

from ddk_offline.distillation.checkpoint import load_checkpoint
from ddk_offline.dump import DumpConfig, run_dump
from ddk_offline.dump.verify import verify_dump
from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest, ManifestError
from ddk_offline.format.reader import open_dump

SOURCES = [p for d in ("ddk_offline", "kernels", "pipelines") for p in sorted((ROOT / d).rglob("*.py"))]


def test_no_unsafe_deserialisation_in_the_sources():
    """A static audit that runs in CI: any new pickle-based loader fails here."""
    unsafe = re.compile(
        r"\bimport (c?pickle|dill|cloudpickle|marshal|shelve|joblib)\b|pickle\.loads?\(|allow_pickle=True"
    )
    problems = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            if unsafe.search(line):
                problems.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
        for call in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call.group(0):
                problems.append(f"{path.relative_to(ROOT)}: {call.group(0)} without weights_only=True")
    assert SOURCES and not problems, problems


def test_trust_remote_code_is_off_by_default(tmp_path, corpus_jsonl):
    """A teacher that ships Python code (auto_map) is refused; its code never runs; nothing is written."""
    import tiny

    teacher = tmp_path / "evil-teacher"
    tiny.train_tokenizer(128).save_pretrained(teacher)  # a working tokenizer: the config is what asks for code
    marker = tmp_path / "code-ran"
    (teacher / "config.json").write_text(
        '{"model_type": "evil_llama", "architectures": ["EvilForCausalLM"], "vocab_size": 16, "auto_map": '
        '{"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}'
    )
    (teacher / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "dump"
    assert DumpConfig.__dataclass_fields__["trust_remote_code"].default is False
    with pytest.raises(
        UserError, match=r"--teacher \S+evil-teacher: the model ships its own Python code.*pass --trust-remote-code"
    ):
        run_dump(DumpConfig(teacher=str(teacher), data=str(corpus_jsonl), out=str(out), seq_len=16, top_k=4))
    assert not marker.exists() and not out.exists()


def test_checkpoint_tensors_are_never_unpickled(tmp_path):
    """A tensors.pt that would run code when unpickled is refused (torch.load weights_only=True)."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    (ckpt / "state.json").write_text('{"step": 1}')
    torch.save({"optimizer": Payload()}, ckpt / "tensors.pt")
    with pytest.raises(UserError, match=r"tensors\.pt: holds objects other than tensors.*refusing to unpickle"):
        load_checkpoint(ckpt)
    assert not marker.exists()


@pytest.fixture()
def dump(tmp_path):
    import tiny

    return write_synth_dump(tmp_path / "dump", tiny.train_tokenizer(128), counts={("a", "train"): 3, ("b", "val"): 2})


@pytest.mark.parametrize(
    "field, value",
    [
        ("file", "../../etc/passwd"),
        ("file", "/etc/passwd"),
        ("file", "a/../../outside.parquet"),
        ("file", "C:\\Windows\\x.parquet"),
        ("file", "a\\..\\..\\x.parquet"),
        ("dir", ".."),
        ("dir", "/tmp"),
    ],
)
def test_manifest_paths_cannot_point_outside_the_dump(dump, field, value):
    m = Manifest.load(dump)
    if field == "file":
        m.domains["a"].splits["train"].shards[0].file = value
    else:
        m.domains["a"].dir = value
    m.write_atomic(dump)  # correctly checksummed: the checksum is no defence against a crafted manifest
    with pytest.raises(ManifestError, match=r"points outside the dump directory; refusing to read it"):
        open_dump(dump)
    report = verify_dump(dump)
    assert report.manifest is None and "points outside the dump" in report.problems[0].what


def test_a_symlink_out_of_the_dump_is_reported(dump, tmp_path):
    shard = dump / Manifest.load(dump).domains["a"].splits["train"].shards[0].file
    outside = tmp_path / "elsewhere.parquet"
    shard.rename(outside)
    shard.symlink_to(outside)
    (problem,) = verify_dump(dump).problems
    assert problem.file == shard and "outside the dump (a symlink)" in problem.what
