"""Build a small real multi-domain corpus from files every Python install has, in the domain-folder layout.

    python pipelines/dump_demo_corpus.py OUT_DIR [--docs-per-domain 40]

Domains (one sub-folder each, one .txt file per document):
  code      Python standard-library modules (sorted by path)
  docs      the language reference topics of `pydoc_data.topics`
  licenses  license texts from installed packages' *.dist-info folders

Deterministic for a given Python install. Takes about a second and well under 10 MB.
"""

from __future__ import annotations

import argparse
import site
import sysconfig
from pathlib import Path


def _code(n: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files[:n]]


def _docs(n: int) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:n]]


def _licenses(n: int) -> list[str]:
    texts, seen = [], set()
    for root in site.getsitepackages():
        for p in sorted(Path(root).glob("*.dist-info/**/*")):
            if p.is_file() and ("LICENSE" in p.name.upper() or "COPYING" in p.name.upper()):
                text = p.read_text(encoding="utf-8", errors="replace")
                if text.strip() and text not in seen:  # many packages ship the same license verbatim
                    seen.add(text)
                    texts.append(text)
    return texts[:n]


def build(out: Path, docs_per_domain: int = 40) -> Path:
    """Write ``out/<domain>/<n>.txt`` and return ``out``."""
    for domain, make in (("code", _code), ("docs", _docs), ("licenses", _licenses)):
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(make(docs_per_domain)):
            (folder / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--docs-per-domain", type=int, default=40)
    args = parser.parse_args()
    print(build(args.out, args.docs_per_domain))
