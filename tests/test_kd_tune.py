"""The KD kernels' autotuner (kernels/ddk_kernels/kd_tune.py) on CPU: its choices from a fake measure function.

On a GPU the measure function compiles and times each candidate on scratch buffers; here a table stands in for it,
so the logic is tested without one: the key, the cache file round trip, an unreadable cache, the environment
switches, the tie rule that keeps the static default, and the candidates dropped for spills, registers or failure.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ddk_kernels import kd_tune  # noqa: E402

DEFAULT = {"BLOCK_V": 2048, "num_warps": 8}
BIG = {"BLOCK_V": 4096, "num_warps": 8}
WIDE = {"BLOCK_V": 4096, "num_warps": 16}
CONFIGS = [DEFAULT, BIG, WIDE]


def fake(table: dict):
    """measure(config) from {(BLOCK_V, num_warps): (seconds, registers, spills) or an exception}; counts calls."""
    calls = []

    def measure(cfg):
        calls.append(cfg)
        value = table[(cfg["BLOCK_V"], cfg["num_warps"])]
        if isinstance(value, Exception):
            raise value
        return value

    measure.calls = calls
    return measure


def key(**kw):
    args = dict(pass_="forward", V=50257, K=128, dtype=torch.bfloat16, mode=0, t_one=True, gpu="NVIDIA H100 80GB HBM3",
                triton_version="3.9.0", src_hash="abc")  # fmt: skip
    args.update(kw)
    return kd_tune.tune_key(**args)


def test_key_names_every_field_it_depends_on():
    k = key()
    for part in ("forward", "V=50257", "K=128", "bfloat16", "mode=0", "t1=1", "H100", "triton=3.9.0", "src=abc"):
        assert part in k
    variants = [key(pass_="backward"), key(V=32000), key(K=64), key(dtype=torch.float32), key(mode=1),
                key(t_one=False), key(gpu="NVIDIA H200"), key(triton_version="3.10"), key(src_hash="d")]  # fmt: skip
    assert len({k, *variants}) == 1 + len(variants)


def test_source_hash_follows_the_kernels_source():
    assert kd_tune.source_hash() == kd_tune.source_hash() and len(kd_tune.source_hash()) == 16


def test_fastest_candidate_wins_and_the_cache_file_round_trips(tmp_path):
    path = tmp_path / "sub" / "kd_autotune.json"
    measure = fake({(2048, 8): (1.00e-3, 40, 0), (4096, 8): (0.90e-3, 48, 0), (4096, 16): (0.95e-3, 40, 0)})
    assert kd_tune.Tuner(path).choose(key(), DEFAULT, CONFIGS, measure) == BIG
    entry = json.loads(path.read_text())["entries"][key()]
    assert entry["BLOCK_V"] == 4096 and entry["num_warps"] == 8 and len(entry["timings_s"]) == 3
    assert not list(path.parent.glob(".kd_autotune.*"))  # the temporary file was renamed, not left behind
    # A new process (a new tuner) reads the file and measures nothing.
    again = fake({})
    assert kd_tune.Tuner(path).choose(key(), DEFAULT, CONFIGS, again) == BIG and again.calls == []
    # In-process memory: the same tuner never measures a key twice; another key is measured and added to the file.
    tuner = kd_tune.Tuner(path)
    other = fake({(2048, 8): (1e-3, 40, 0), (4096, 8): (2e-3, 40, 0), (4096, 16): (2e-3, 40, 0)})
    assert tuner.choose(key(K=64), DEFAULT, CONFIGS, other) == DEFAULT
    assert tuner.choose(key(K=64), DEFAULT, CONFIGS, other) == DEFAULT and len(other.calls) == 3
    assert set(json.loads(path.read_text())["entries"]) == {key(), key(K=64)}


def test_the_static_default_wins_ties_within_three_percent(tmp_path):
    close = fake({(2048, 8): (1.00e-3, 40, 0), (4096, 8): (0.98e-3, 40, 0), (4096, 16): (0.975e-3, 40, 0)})
    assert kd_tune.Tuner(None).choose(key(), DEFAULT, CONFIGS, close) == DEFAULT
    clear = fake({(2048, 8): (1.00e-3, 40, 0), (4096, 8): (0.96e-3, 40, 0), (4096, 16): (0.99e-3, 40, 0)})
    assert kd_tune.Tuner(None).choose(key(), DEFAULT, CONFIGS, clear) == BIG


def test_spilling_register_hungry_and_failing_candidates_are_dropped(tmp_path):
    path = tmp_path / "t.json"
    measure = fake({(2048, 8): (1.0e-3, 40, 0), (4096, 8): (0.5e-3, 40, 16), (4096, 16): (0.6e-3, 168, 0)})
    assert kd_tune.Tuner(path).choose(key(), DEFAULT, CONFIGS, measure) == DEFAULT
    timings = json.loads(path.read_text())["entries"][key()]["timings_s"]
    assert "spilled" in timings["BLOCK_V=4096,num_warps=8"] and "168 registers" in timings["BLOCK_V=4096,num_warps=16"]
    # the default itself fails to compile: the fastest survivor is taken; nothing survives: the default
    broken = fake({(2048, 8): RuntimeError("ptxas"), (4096, 8): (2e-3, 40, 0), (4096, 16): (1e-3, 40, 0)})
    assert kd_tune.Tuner(None).choose(key(), DEFAULT, CONFIGS, broken) == WIDE
    none = fake({(2048, 8): RuntimeError("x"), (4096, 8): (1e-3, 40, 8), (4096, 16): ValueError("y")})
    assert kd_tune.Tuner(None).choose(key(), DEFAULT, CONFIGS, none) == DEFAULT


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": {"k": {"BLOCK_V": "big"}}}', "[1, 2]"])
def test_an_unreadable_cache_file_is_ignored_with_a_warning_and_rewritten(tmp_path, content):
    path = tmp_path / "kd_autotune.json"
    path.write_text(content)
    measure = fake({(2048, 8): (1e-3, 40, 0), (4096, 8): (0.5e-3, 40, 0), (4096, 16): (2e-3, 40, 0)})
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        assert kd_tune.Tuner(path).choose(key(), DEFAULT, CONFIGS, measure) == BIG
    assert json.loads(path.read_text())["entries"][key()]["BLOCK_V"] == 4096


def test_environment_switches(tmp_path):
    assert kd_tune.autotune_enabled({}) and kd_tune.autotune_enabled({"DDK_KD_AUTOTUNE": "1"})
    assert not kd_tune.autotune_enabled({"DDK_KD_AUTOTUNE": "0"})
    assert not kd_tune.autotune_enabled({"DDK_KD_AUTOTUNE": "off"})
    assert kd_tune.cache_path({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "ddk_kernels" / "kd_autotune.json"
    assert kd_tune.cache_path({"DDK_KD_AUTOTUNE_CACHE": str(tmp_path / "x.json")}) == tmp_path / "x.json"
    assert kd_tune.cache_path({"DDK_KD_AUTOTUNE_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path)}) is None
    home = kd_tune.cache_path({"HOME": os.environ.get("HOME", "/root")})
    assert home is not None and home.name == "kd_autotune.json" and home.parent.name == "ddk_kernels"


def test_candidates_keep_128_bit_accesses_and_start_with_the_default():
    for V, eb in ((50257, 2), (151936, 4), (300, 2)):
        cands = kd_tune.candidates(V, eb)
        assert cands[0] == kd_tune.static_config(V)
        assert len({(c["BLOCK_V"], c["num_warps"]) for c in cands}) == len(cands)
        for c in cands[1:]:
            assert c["BLOCK_V"] // (32 * c["num_warps"]) >= 16 // eb


def test_off_cuda_the_launcher_uses_the_static_config_and_accepts_an_override(monkeypatch):
    # CPU tensors never reach the tuner: one that would fail proves it is not called.
    from ddk_kernels import kd_triton
    from ddk_kernels.spec import KDSpec

    monkeypatch.setattr(kd_tune, "tuned", lambda *a, **k: pytest.fail("the tuner ran off CUDA"))
    spec = KDSpec(1.0, 1.0, 1.0, 0, -100, False)
    logits = torch.randn(2, 300)
    assert kd_triton._choose("forward", logits, 8, spec, None)["constexprs"]["BLOCK_V"] == 512
    cfg = kd_triton._choose("forward", logits, 8, spec, {"BLOCK_V": 128, "num_warps": 2})
    assert cfg["constexprs"]["BLOCK_V"] == 128 and cfg["num_warps"] == 2
    if torch.cuda.is_available():
        return  # the kernels below run interpreted on CPU tensors
    labels = torch.tensor([3, -100])
    ids, tlog = kd_triton.sort_targets(torch.randint(0, 300, (2, 8)), torch.randn(2, 8))
    ce_a, kl_a, _ = kd_triton.kd_forward(logits, labels, ids, tlog, None, spec)
    ce_b, kl_b, _ = kd_triton.kd_forward(logits, labels, ids, tlog, None, spec, config={"BLOCK_V": 128, "num_warps": 2})
    torch.testing.assert_close(ce_a, ce_b)
    torch.testing.assert_close(kl_a, kl_b)


def test_the_process_tuner_follows_the_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DDK_KD_AUTOTUNE_CACHE", str(tmp_path / "a.json"))
    first = kd_tune.tuner()
    assert first.path == tmp_path / "a.json" and kd_tune.tuner() is first
    monkeypatch.setenv("DDK_KD_AUTOTUNE_CACHE", "off")
    assert kd_tune.tuner().path is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuner times kernels on CUDA only")
def test_on_cuda_the_first_call_tunes_both_passes_and_writes_the_cache(tmp_path, monkeypatch):
    from ddk_kernels import fused_kd_loss

    path = tmp_path / "kd_autotune.json"
    monkeypatch.setenv("DDK_KD_AUTOTUNE_CACHE", str(path))
    V, K = 50257, 64
    logits = torch.randn(64, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (64,), device="cuda")
    ids = torch.randint(0, V, (64, K), device="cuda")
    before = logits.detach().clone()
    fused_kd_loss(logits, labels, ids, torch.randn(64, K, device="cuda")).backward()
    assert torch.equal(logits.detach(), before)  # timed on scratch buffers
    entries = json.loads(path.read_text())["entries"]
    assert {k.split("|")[0] for k in entries} == {"forward", "backward"}
    for entry in entries.values():
        assert entry["BLOCK_V"] in (1024, 2048, 4096, 8192) and len(entry["timings_s"]) >= 2
