"""bench-kernels runs end to end on a tiny shape: rows, ratios vs eager, CSV/JSON/PNG, the CLI wiring."""

from __future__ import annotations

import csv
import json

from ddk_offline.bench.kernels import BenchConfig, run_benchmarks


def test_bench_writes_results_with_ratios(tmp_path):
    cfg = BenchConfig(
        device="cpu",
        providers=["triton-fused", "torch-chunked", "torch-chunked-inplace", "torch-eager"],
        modes=["forward", "full"],
        custom_shapes=[(64, 700, 8)],
        out_dir=tmp_path,
        cpu_reps=1,
    )
    path = run_benchmarks(cfg, log=lambda _line: None)
    rows = list(csv.DictReader(path.open()))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert by[("triton-fused", "full")]["status"].startswith("skipped")  # no GPU here: reported, not faked
    for provider in ("torch-chunked", "torch-chunked-inplace", "torch-eager"):
        for mode in ("forward", "full"):
            r = by[(provider, mode)]
            assert r["status"] == "ok", r
            assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and r["peak_mib"] != ""
    assert float(by[("torch-eager", "full")]["speedup_vs_eager"]) == 1.0
    assert by[("torch-chunked", "full")]["mem_ratio_vs_eager"] != ""
    env = json.loads((tmp_path / "kernels_cpu.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["torch"]
    assert (tmp_path / "kernels_cpu.png").stat().st_size > 0


def test_cli_lists_bench_kernels(cli):
    out = cli("bench-kernels", "--help").stdout
    for option in ("--device", "--dtype", "--shapes", "--providers", "--modes", "--out-dir"):
        assert option in out


def test_linear_shapes_compare_fused_linear_with_the_logits_path(tmp_path):
    cfg = BenchConfig(
        device="cpu",
        providers=["torch-chunked", "fused-linear"],
        modes=["full"],
        custom_shapes=[(64, 700, 8, 16), (64, 700, 8)],
        out_dir=tmp_path,
        cpu_reps=1,
    )
    rows = list(csv.DictReader(run_benchmarks(cfg, log=lambda _line: None).open()))
    by = {(r["provider"], r["D"]): r for r in rows}
    assert by[("fused-linear", "")]["status"].startswith("skipped")  # no D: nothing to fuse
    for provider in ("torch-chunked", "fused-linear"):
        r = by[(provider, "16")]
        assert r["status"] == "ok", r
        assert float(r["grads_mib"]) > 0 and r["extra_mib"] != "" and r["gbps"] == ""
    assert float(by[("fused-linear", "16")]["time_ratio_vs_logits"]) > 0
    assert float(by[("torch-chunked", "16")]["time_ratio_vs_logits"]) == 1.0


def test_an_old_csv_gets_the_new_columns(tmp_path):
    from ddk_offline.bench.report import COLUMNS, _upgrade_header

    path = tmp_path / "kernels_cpu.csv"
    path.write_text("provider,N,V,k,ms\ntorch-eager,1,2,3,4.5\n")
    _upgrade_header(path)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == COLUMNS and rows[0]["ms"] == "4.5" and rows[0]["D"] == ""
