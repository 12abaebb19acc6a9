"""--config FILE for distill and dump-teacher (issue #21): a run from a file equals a run from the same flags,
command-line options override the file, a run's saved config is a valid file, bad files are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import yaml
from synthdump import write_synth_dump

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.dump.config import DumpConfig
from ddk_offline.errors import UserError
from ddk_offline.runtime.configfile import read_config_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    tokenizer = tiny.train_tokenizer(128)
    dump = write_synth_dump(root / "dump", tokenizer)
    return root, dump, tiny.write_student_config(root / "student.json", len(tokenizer))


def _flags(dump, student):
    return ["--dump", str(dump), "--student-config", str(student), "--max-steps", "4", "--batch-size", "2",
            "--log-every", "1", "--save-every", "2", "--ddk-interval", "2", "--lr", "3e-3", "--device", "cpu",
            "--data-workers", "0", "-q"]  # fmt: skip


def _result(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s", None)
    return rows, (out / "final" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_run_from_a_file_equals_the_run_from_flags(cli, setup):
    root, dump, student = setup
    cli("distill", *_flags(dump, student), "--out", str(root / "flags"))
    # The run's own resolved config is a valid --config file: the same run again, bit-identical on CPU.
    cli("distill", "--config", str(root / "flags" / "config.json"), "--out", str(root / "again"), "-q")
    assert _result(root / "again") == _result(root / "flags")
    # A hand-written YAML with dashed keys, and a command-line option that overrides the file.
    spec = {"dump": str(dump), "out": str(root / "yaml"), "student-config": str(student), "max-steps": 4,
            "batch-size": 2, "log-every": 1, "save-every": 2, "ddk-interval": 2, "lr": 1.0, "device": "cpu",
            "data-workers": 0}  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(spec))
    cli("distill", "--config", str(root / "run.yaml"), "--lr", "3e-3", "-q")
    assert json.loads((root / "yaml" / "config.json").read_text())["lr"] == 3e-3  # the command line won
    assert _result(root / "yaml") == _result(root / "flags")


@pytest.mark.parametrize(
    "content, message",
    [
        ("dump: d\nout: o\nbatch_sise: 4\n", "unknown key 'batch_sise'; did you mean 'batch-size'"),
        ("dump: d\nout: o\nbatch-size: four\n", "'batch-size' must be int, got \"four\""),
        ("dump: d\nout: o\nlr: true\n", "'lr' must be float, got true"),
        ("- dump\n- out\n", "must hold one mapping"),
        ("dump: [unclosed\n", "not valid YAML/JSON"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_config_file(path, DistillConfig)


def test_bad_files_and_missing_options_through_the_cli(cli, tmp_path):
    (tmp_path / "bad.yaml").write_text("dump: d\nout: o\nseq-len: 64\n")
    proc = cli("distill", "--config", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode == 2 and "unknown key 'seq-len'" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("distill", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "missing --dump: give them on the command line" in proc.stderr
    proc = cli("dump-teacher", "--config", str(tmp_path / "nope.yaml"), check=False)
    assert proc.returncode == 2 and "cannot read it" in proc.stderr


def test_dump_config_files_round_trip(tmp_path):
    saved = {"config": {"teacher": "t", "data": "d", "out": "o", "extra_temperatures": [2.0], "seq_len": 64},
             "last_run": {"loop_s": 1.0}}  # fmt: skip
    (tmp_path / "dump_config.json").write_text(json.dumps(saved))
    got = read_config_file(tmp_path / "dump_config.json", DumpConfig)
    assert got == {"teacher": "t", "data": "d", "out": "o", "extra_temperatures": (2.0,), "seq_len": 64}
    (tmp_path / "c.yaml").write_text("extra-temperatures: '2.0,4.0'\n")
    assert read_config_file(tmp_path / "c.yaml", DumpConfig) == {"extra_temperatures": (2.0, 4.0)}


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(example):
    cls = DumpConfig if example.name.startswith("dump") else DistillConfig
    assert read_config_file(example, cls)
