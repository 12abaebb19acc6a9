"""Several distill runs read one dump at once: two processes, started together, both finish with the results a
lone run gets, and the dump is left byte for byte as it was (readers never write to it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tiny
from conftest import ROOT
from synthdump import write_synth_dump


@pytest.mark.slow
def test_two_distill_processes_read_one_dump(tmp_path):
    tok = tiny.train_tokenizer(128)
    dump = write_synth_dump(tmp_path / "dump", tok)
    student = tmp_path / "student.json"
    student.write_text(tiny.make_model(len(tok), hidden=16, layers=1, heads=2, max_pos=64).config.to_json_string())
    before = {p: p.read_bytes() for p in sorted(dump.rglob("*")) if p.is_file()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    args = ["--dump", str(dump), "--student-config", str(student), "--max-steps", "8", "--batch-size", "2",
            "--log-every", "1", "--save-every", "4", "--device", "cpu", "-q"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ddk_offline", "distill", *args, "--out", str(tmp_path / name)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert len(rows("a")) == 8 and rows("a") == rows("b")
    after = {p: p.read_bytes() for p in sorted(dump.rglob("*")) if p.is_file()}
    assert after == before
