"""Build the demo's multi-domain corpus from real text that installed packages carry (no network).

    python pipelines/demo_corpus.py runs/demo/corpus --size quick      # ~32k teacher tokens, ~2 s
    python pipelines/demo_corpus.py runs/demo/corpus --size full       # ~390k tokens, for a GPU run

Output (feed ``train/`` to ``ddk-offline dump-teacher --data OUT/train --text-column text --domain-column
domain``; ``val/`` holds whole documents the dump never sees, for a held-out evaluation):

    OUT/train/<domain>.jsonl     one {"text", "domain", "source"} object per line
    OUT/val/<domain>.jsonl       same, held-out documents (absent when val_fraction is 0)
    OUT/manifest.json            settings, per-domain counts, provenance, licenses, file hashes

Domains, sources and licenses: ``demo_sources.DOMAIN_INFO`` and docs/DEMO_DATA.md. The same seed on the
same machine gives byte-identical files; the manifest's hashes show when two machines' sources differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:  # imported as pipelines.demo_corpus (tests, other pipelines)
    from .demo_sources import COLLECTORS, DOMAIN_INFO, STUDY_COLLECTORS, Doc, SourceMissing
except ImportError:  # run as a script: its own folder is on sys.path
    from demo_sources import COLLECTORS, DOMAIN_INFO, STUDY_COLLECTORS, Doc, SourceMissing

MANIFEST_VERSION = 1
DOMAINS = tuple(COLLECTORS)  # the demo's four (the default)
STUDY_DOMAINS = DOMAINS + tuple(STUDY_COLLECTORS)  # seven, for pipelines/study_ddk.py (--domains study)
# tokens_per_domain counts train + val text tokens (the dump adds one EOS per document on top).
SIZES = {
    "quick": {"tokens_per_domain": 8_000, "max_doc_chars": 2_000},  # 4 domains: ~32k tokens, CPU demo
    "full": {"tokens_per_domain": 100_000, "max_doc_chars": 6_000},  # docs holds ~114k: its train tops out ~84k
}
# ASCII characters per SmolLM2 token, and tokens per UTF-8 byte of non-ASCII text, fitted on 400 chunks
# per domain (docs/DEMO_DATA.md): domain totals within 2%, single documents within ~10% (median), so a
# corpus can be budgeted without loading a tokenizer. Pass a real tokenizer for exact counts.
ASCII_CHARS_PER_TOKEN = {"code": 3.9, "docs": 4.1, "legal": 4.4, "multilingual": 2.8}
TOKENS_PER_NON_ASCII_BYTE = 0.59
# A leftover budget smaller than this is not worth a scan for a document that still fits.
MIN_DOC_TOKENS = 32

_CODE_UNIT = re.compile(r"\n(?=(?:async\s+def\s|def\s|class\s|@|if __name__))")
_PARAGRAPH = re.compile(r"\n{2,}")


@dataclass(frozen=True)
class DomainSplit:
    """The documents chosen for one domain: ``train`` and ``val`` lists and their token counts."""

    train: list[Doc]
    val: list[Doc]
    train_tokens: int
    val_tokens: int


def estimate_tokens(text: str, domain: str) -> int:
    """Teacher (SmolLM2) token count of ``text`` estimated from its characters and UTF-8 bytes."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    non_ascii_bytes = len(text.encode("utf-8")) - ascii_chars
    return math.ceil(ascii_chars / ASCII_CHARS_PER_TOKEN.get(domain, 4.0) + non_ascii_bytes * TOKENS_PER_NON_ASCII_BYTE)


def load_token_counter(path: str | Path) -> Callable[[str], int]:
    """Exact token counts with a real tokenizer: a model folder or a ``.gguf`` file (as the teacher loads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _pack(units: list[str], sep: str, max_chars: int) -> list[str]:
    """Greedily join consecutive units with ``sep`` into pieces of at most ``max_chars`` characters.

    A unit longer than ``max_chars`` is cut at line ends first, and a single over-long line at
    ``max_chars`` characters, so no piece exceeds the bound.
    """
    pieces: list[str] = []
    current = ""
    for unit in units:
        if len(unit) > max_chars:
            lines = unit.split("\n")
            if len(lines) > 1:
                sub = _pack(lines, "\n", max_chars)
            else:
                sub = [unit[i : i + max_chars] for i in range(0, len(unit), max_chars)]
            if current:
                pieces.append(current)
            pieces += sub[:-1]
            current = sub[-1]
        elif not current:
            current = unit
        elif len(current) + len(sep) + len(unit) <= max_chars:
            current += sep + unit
        else:
            pieces.append(current)
            current = unit
    if current:
        pieces.append(current)
    return pieces


def chunk_doc(doc: Doc, max_chars: int) -> list[Doc]:
    """Split one document at natural boundaries into documents of at most ``max_chars`` characters.

    Boundaries: top-level ``def``/``class``/decorator lines for code, paragraphs for prose (docs, legal),
    message lines for the translated catalogs. Chunks keep the source, with ``#<i>`` appended.
    """
    if len(doc.text) <= max_chars:
        return [doc]
    if doc.domain == "code":
        units, sep = _CODE_UNIT.split(doc.text), "\n"
    elif doc.domain in ("multilingual", "manpages"):  # roff has few blank lines: cut at line ends
        units, sep = doc.text.split("\n"), "\n"
    else:
        units, sep = _PARAGRAPH.split(doc.text), "\n\n"
    pieces = [p.strip("\n") for p in _pack(units, sep, max_chars)]
    return [Doc(p, doc.domain, f"{doc.source}#{i}") for i, p in enumerate(pieces) if p.strip()]


def source_group(doc: Doc) -> str:
    """The whole file or topic a chunk came from (its source without the ``#<i>`` chunk suffix)."""
    return doc.source.split("#", 1)[0]


def _fill(order: list[Doc], budget: int, count: Callable[[str], int]) -> tuple[list[Doc], int]:
    """Take documents from ``order`` while they fit in ``budget``; one that overflows is skipped, since a
    later, shorter one may still fit. Returns (chosen, tokens used)."""
    chosen, used = [], 0
    for doc in order:
        if budget - used < MIN_DOC_TOKENS:
            break
        n = count(doc.text)
        if used + n <= budget:
            chosen.append(doc)
            used += n
    return chosen, used


def select_domain(
    docs: list[Doc], tokens: int, val_fraction: float, rng: random.Random, count: Callable[[str], int]
) -> DomainSplit:
    """Shuffle ``docs``, fill the val budget, then the train budget from the rest; neither is exceeded.

    Train never takes a chunk of a file or topic that val drew from, so held-out documents share no
    text with training ones (a long license or module would otherwise sit on both sides).
    """
    order = list(docs)
    rng.shuffle(order)
    val_budget = round(tokens * val_fraction)
    val, val_tokens = _fill(order, val_budget, count)
    held_out = {source_group(d) for d in val}
    train, train_tokens = _fill([d for d in order if source_group(d) not in held_out], tokens - val_budget, count)
    return DomainSplit(train, val, train_tokens, val_tokens)


def _write_jsonl(docs: list[Doc], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(
        json.dumps({"text": d.text, "domain": d.domain, "source": d.source}, ensure_ascii=False) + "\n" for d in docs
    ).encode("utf-8")
    path.write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


def build_demo_corpus(
    out_dir: str | Path,
    *,
    tokens_per_domain: int = SIZES["quick"]["tokens_per_domain"],
    val_fraction: float = 0.1,
    seed: int = 0,
    max_doc_chars: int = SIZES["quick"]["max_doc_chars"],
    domains: tuple[str, ...] | list[str] = DOMAINS,
    token_counter: Callable[[str], int] | None = None,
    require_all: bool = False,
    verbose: bool = True,
) -> dict:
    """Build the demo corpus under ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: output folder (created; existing domain files are overwritten).
        tokens_per_domain: teacher-token budget per domain, train + val together.
        val_fraction: share of each domain's budget given to held-out documents, in [0, 0.5].
        seed: shuffling seed; the same seed and sources give byte-identical files.
        max_doc_chars: documents longer than this are chunked at natural boundaries.
        domains: which of ``STUDY_DOMAINS`` to build (default: the demo's ``DOMAINS``).
        token_counter: exact counter (``load_token_counter``); default: ``estimate_tokens``.
        require_all: raise when a domain's source is missing instead of skipping the domain.
        verbose: print the per-domain summary table.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: a bad argument (the message names it and the accepted values).
        SourceMissing: ``require_all`` and a source is absent, or no domain could be built at all.
    """
    unknown = sorted(set(domains) - set(STUDY_DOMAINS))
    if unknown:
        raise ValueError(f"domains: unknown {unknown}; choose from {list(STUDY_DOMAINS)}")
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction: {val_fraction} is outside [0, 0.5]")
    if tokens_per_domain < MIN_DOC_TOKENS or max_doc_chars < 200:
        raise ValueError(f"tokens_per_domain must be >= {MIN_DOC_TOKENS} and max_doc_chars >= 200")
    out = Path(out_dir)
    manifest: dict = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "tokens_per_domain": tokens_per_domain,
        "val_fraction": val_fraction,
        "max_doc_chars": max_doc_chars,
        "token_count": "estimate" if token_counter is None else "tokenizer",
        "domains": {},
        "skipped": {},
    }
    for domain in sorted(domains):
        try:
            whole = {**COLLECTORS, **STUDY_COLLECTORS}[domain]()  # looked up now: tests patch COLLECTORS
        except SourceMissing as exc:
            if require_all:
                raise
            manifest["skipped"][domain] = str(exc)
            print(f"warning: skipping domain {domain!r}: {exc}", file=sys.stderr)
            continue
        chunks = [c for d in whole for c in chunk_doc(d, max_doc_chars)]
        count = token_counter or (lambda text, _d=domain: estimate_tokens(text, _d))
        split = select_domain(chunks, tokens_per_domain, val_fraction, random.Random(f"{seed}:{domain}"), count)
        entry = {**DOMAIN_INFO[domain], "available_docs": len(chunks)}
        for name, docs, tokens in (("train", split.train, split.train_tokens), ("val", split.val, split.val_tokens)):
            if not docs:
                continue
            digest = _write_jsonl(docs, out / name / f"{domain}.jsonl")
            entry[name] = {
                "file": f"{name}/{domain}.jsonl",
                "docs": len(docs),
                "chars": sum(len(d.text) for d in docs),
                "tokens": tokens,
                "sha256": digest,
            }
        manifest["domains"][domain] = entry
    if not manifest["domains"]:
        raise SourceMissing(f"no domain could be built: {manifest['skipped']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if verbose:
        print(format_summary(manifest))
    return manifest


def format_summary(manifest: dict) -> str:
    """A plain-text table of docs, characters and tokens per domain and split."""
    unit = "tokens(est)" if manifest["token_count"] == "estimate" else "tokens"
    rows = [f"{'domain':<14}{'split':<7}{'docs':>6}{'chars':>10}{unit:>13}"]
    total = 0
    for domain, entry in manifest["domains"].items():
        for split in ("train", "val"):
            if split in entry:
                e = entry[split]
                total += e["tokens"]
                rows.append(f"{domain:<14}{split:<7}{e['docs']:>6}{e['chars']:>10}{e['tokens']:>13}")
    rows.append(f"{'total':<27}{total:>23}")
    rows += [f"skipped {d}: {why}" for d, why in manifest["skipped"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line: parse, validate, call ``build_demo_corpus``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="output folder (train/, val/, manifest.json)")
    p.add_argument("--size", choices=sorted(SIZES), default="quick", help="preset budget: quick (CPU) or full (GPU)")
    p.add_argument("--tokens-per-domain", type=int, help="override the preset's token budget per domain")
    p.add_argument("--max-doc-chars", type=int, help="override the preset's maximum document length")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of each domain (0 to 0.5)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed")
    p.add_argument(
        "--domains",
        default=",".join(DOMAINS),
        help=f"comma-separated subset of {','.join(STUDY_DOMAINS)}, or 'study' for all seven (default: the demo's 4)",
    )
    p.add_argument("--tokenizer", help="count tokens exactly with this tokenizer (model folder or .gguf file)")
    p.add_argument(
        "--require-all", action="store_true", help="fail instead of skipping a domain whose source is absent"
    )
    args = p.parse_args(argv)
    preset = SIZES[args.size]
    build_demo_corpus(
        args.out_dir,
        tokens_per_domain=args.tokens_per_domain or preset["tokens_per_domain"],
        max_doc_chars=args.max_doc_chars or preset["max_doc_chars"],
        val_fraction=args.val_fraction,
        seed=args.seed,
        domains=STUDY_DOMAINS if args.domains == "study" else [d.strip() for d in args.domains.split(",") if d.strip()],
        token_counter=load_token_counter(args.tokenizer) if args.tokenizer else None,
        require_all=args.require_all,
    )


if __name__ == "__main__":
    main()
