#!/usr/bin/env bash
# The test suite from a fresh clone, in one command (what CI runs, and the README's test command):
#
#     pipelines/test.sh                  # install what the tests need if it is missing, then `python -m pytest -q`
#     pipelines/test.sh -m "not slow"    # arguments go to pytest (default: -q)
#
# Set-up, only for what is missing: the CPU torch wheel first (a plain `torch` requirement pulls several GB of
# CUDA packages on a bare machine; a machine with torch keeps its own build), then `pip install -e ".[dev]"`.
# Expected time on 2 CPU cores without a GPU: ~13-16 min for the suite, plus ~2 min of installs on a bare machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
# Every dev dependency and the package's own metadata (the editable install): install when any is missing.
if ! "$PY" - <<'PROBE' 2>/dev/null; then
import importlib.metadata as md
import datasets, fsspec, matplotlib, pyarrow, pytest, pytest_timeout, rich, safetensors, tensorboard, tokenizers, transformers, typer, yaml, zstandard
md.version("ddk-offline")
PROBE
  "$PY" -m pip install -q -e ".[dev]"
fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|datasets|pyarrow|zstandard) " || true
if [[ $# -eq 0 ]]; then set -- -q; fi
exec "$PY" -m pytest "$@"
