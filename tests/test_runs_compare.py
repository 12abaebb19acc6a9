"""`ddk-offline runs compare` (issue #21): runs of one dump side by side; runs of different dumps refused."""

from __future__ import annotations

import json

import pytest
import tiny
from synthdump import write_synth_dump

from ddk_offline.distillation.compare import compare_runs
from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.trainer import distill
from ddk_offline.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tokenizer = tiny.train_tokenizer(128)
    student = tiny.write_student_config(root / "student.json", len(tokenizer))
    dumps = {"a": write_synth_dump(root / "dump", tokenizer), "b": write_synth_dump(root / "dump_k4", tokenizer, k=4)}
    out = {}
    for name, dump, sampler in (("ddk", "a", "ddk"), ("uniform", "a", "uniform"), ("other", "b", "ddk")):
        out[name] = root / name
        distill(DistillConfig(dump=str(dumps[dump]), out=str(out[name]), student_config=str(student), max_steps=4,
                              batch_size=2, log_every=1, save_every=2, ddk_interval=2, lr=3e-3, device="cpu",
                              data_workers=0, sampler=sampler))  # fmt: skip
    return out


def test_runs_of_one_dump_side_by_side(cli, runs, tmp_path):
    result = compare_runs([runs["ddk"], runs["uniform"]])
    assert result["settings_that_differ"] == ["sampler"]
    assert [r["settings"]["sampler"] for r in result["runs"]] == ["ddk", "uniform"]
    for r in result["runs"]:
        assert r["steps"] == 4 and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert set(r["ratios"]) == set(result["domains"]) and r["worst_ratio"] >= r["mean_ratio"] > 0
    proc = cli("runs", "compare", str(runs["ddk"]), str(runs["uniform"]), "--plots", str(tmp_path / "plots"))
    assert "sampler" in proc.stdout and "mean ratio" in proc.stdout and "worst ratio" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["compare_ratio.png", "compare_weights.png"]
    as_json = json.loads(cli("runs", "compare", str(runs["ddk"]), str(runs["uniform"]), "--json").stdout)
    assert as_json["runs"][1]["run"] == str(runs["uniform"])


def test_runs_of_different_dumps_are_refused(cli, runs, tmp_path):
    with pytest.raises(UserError, match=r"trained on another dump than .* \(k: 4 vs 8\); compare runs of one dump"):
        compare_runs([runs["ddk"], runs["other"]])
    proc = cli("runs", "compare", str(runs["ddk"]), str(runs["other"]), check=False)
    assert proc.returncode == 2 and "compare runs of one dump" in proc.stderr
    with pytest.raises(UserError, match="no config.json; runs compare reads finished runs"):
        compare_runs([runs["ddk"], tmp_path])
