"""Shared fixtures: tiny teacher, tokenizer and corpora built on the fly (never a download)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402
from synthdump import write_synth_dump  # noqa: E402

# Nothing may come from a hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The KD kernels' autotuner (GPU only) keeps its choices in-process: tests write nothing under ~/.cache.
os.environ.setdefault("DDK_KD_AUTOTUNE_CACHE", "off")


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A saved tiny teacher (tokenizer + random-init Llama) in a temp directory."""
    return tiny.save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def corpus_rows() -> list[dict[str, str]]:
    return tiny.make_corpus(30)


@pytest.fixture()
def corpus_jsonl(tmp_path, corpus_rows) -> Path:
    return tiny.write_jsonl(corpus_rows, tmp_path / "corpus.jsonl")


@pytest.fixture()
def corpus_folders(tmp_path, corpus_rows) -> Path:
    return tiny.write_domain_folders(corpus_rows, tmp_path / "corpus")


def run_cli(
    *args: str, check: bool = True, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m ddk_offline ARGS` in a subprocess against this checkout's sources."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "ddk_offline", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ddk-offline {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture()
def cli():
    return run_cli


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny BPE tokenizer (128 ids) of the synthetic dumps; a module may define its own."""
    return tiny.train_tokenizer(128)


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tokenizer):
    """A synthetic dump in the real format (one temperature, T = 2), once per module; a module may define its own."""
    return write_synth_dump(tmp_path_factory.mktemp("dump"), tokenizer, temps=(2.0,))
