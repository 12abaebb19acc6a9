"""Offline sources of real, permissively licensed text for the demo corpus, one collector per domain.

Every collector reads only what is already on the machine (the running interpreter, its installed
distributions, Debian's base files and the PostgreSQL client's message catalogs), lists files in sorted
order so the result is deterministic, and returns whole documents as ``Doc``; chunking to a bounded size
and budgeting happen in ``demo_corpus``. A collector whose source is absent raises ``SourceMissing``
with the reason, so the caller can skip that domain and say why.

Provenance and licenses are summarised in ``DOMAIN_INFO`` and explained in docs/DEMO_DATA.md.
"""

from __future__ import annotations

import gzip
import importlib.metadata as metadata
import re
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

COMMON_LICENSES = Path("/usr/share/common-licenses")
LOCALE_DIR = Path("/usr/share/locale")
INCLUDE_DIR = Path("/usr/include")
PERL_DIR = Path("/usr/share/perl")
MAN_DIR = Path("/usr/share/man")

DOMAIN_INFO: dict[str, dict[str, str]] = {
    "code": {
        "source": "Python standard library *.py of the running interpreter (tests, encodings, pydoc_data excluded)",
        "license": "PSF-2.0 (Python Software Foundation License)",
    },
    "docs": {
        "source": "Python documentation topics shipped in the standard library (pydoc_data.topics)",
        "license": "PSF-2.0 (Python documentation is under the PSF License)",
    },
    "legal": {
        "source": "license texts: Debian /usr/share/common-licenses, the interpreter's LICENSE.txt, "
        "license files of the project's dependencies (dist-info)",
        "license": "each text under its own terms; all permit verbatim copying (used unmodified, only chunked)",
    },
    "multilingual": {
        "source": "translated messages of PostgreSQL's gettext catalogs (/usr/share/locale/*/LC_MESSAGES, "
        "Debian postgresql-client / libpq5)",
        "license": "PostgreSQL License (permissive, BSD/MIT-like)",
    },
    # The study's extra domains (STUDY_COLLECTORS): read locally, never redistributed by this project.
    "c": {
        "source": "C headers at the top of /usr/include (Debian libc6-dev and other -dev packages)",
        "license": "each file under its package's terms (glibc: LGPL-2.1+); used unmodified, only chunked",
    },
    "perl": {
        "source": "Perl core modules *.pm of one version under /usr/share/perl (Debian perl-modules)",
        "license": "Perl's terms: GPL-1+ or the Artistic License; used unmodified, only chunked",
    },
    "manpages": {
        "source": "English manual pages in roff, /usr/share/man/man[1-8]/*.gz of the installed packages",
        "license": "each page under its package's terms (see /usr/share/doc/PACKAGE/copyright); used unmodified",
    },
}

# Standard-library folders that are not hand-written library code: tests, generated tables
# (encodings' charmaps), the docs domain's own source (pydoc_data) and anything third-party.
_STDLIB_SKIP = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",
    "encodings",
}
# The project's own dependency closure: a fixed list, so the legal domain does not depend on whatever
# else happens to be installed (missing ones are skipped).
_LICENSED_DISTS = (
    "torch", "transformers", "datasets", "pyarrow", "numpy", "tokenizers", "huggingface_hub", "safetensors",
    "zstandard", "typer", "rich", "click", "pandas", "fsspec", "regex", "requests", "tqdm", "pyyaml",
    "filelock", "jinja2", "sympy", "networkx", "triton",
)  # fmt: skip
_LICENSE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)
# C0/C1 controls except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Unicode line/paragraph separators: str.splitlines() would break a JSONL record at them.
_LINE_SEPARATORS = re.compile(r"[\u2028\u2029]")


class SourceMissing(RuntimeError):
    """A domain's source is not on this machine; the message says what was looked for."""


@dataclass(frozen=True)
class Doc:
    """One document: ``text`` (clean UTF-8), its ``domain`` and ``source`` (where it came from)."""

    text: str
    domain: str
    source: str


def clean_text(text: str) -> str:
    """Normalise newlines (CR, CRLF, U+2028/9), drop control characters (form feeds, NULs) and trailing blanks.

    Args:
        text: decoded text.

    Returns:
        The cleaned text: only tab and newline remain of the C0 controls, which keeps every JSONL line
        printable and the tokenizer away from bytes that never occur in its training data.
    """
    text = _LINE_SEPARATORS.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _read_utf8(path: Path) -> str | None:
    """The file's text, or None where it is not valid UTF-8 (binary or a legacy encoding: skipped)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def collect_code(stdlib: Path | None = None) -> list[Doc]:
    """Python standard-library modules, one document per file (chunked later at top-level statements).

    Files are kept verbatim: the stdlib carries almost no license boilerplate (the PSF license lives in
    LICENSE.txt), and its comments and docstrings are part of what a code model must predict.

    Args:
        stdlib: the standard-library folder; default: the running interpreter's.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SourceMissing(f"code: no standard-library folder at {root}")
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        text = _read_utf8(path)
        if text:
            docs.append(Doc(clean_text(text), "code", f"python-stdlib:{path.relative_to(root).as_posix()}"))
    if not docs:
        raise SourceMissing(f"code: no *.py files under {root}")
    return docs


def collect_docs() -> list[Doc]:
    """Python documentation topics (``pydoc_data.topics``), one document per topic, sorted by name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it out of minimal Python builds
        raise SourceMissing(f"docs: pydoc_data.topics is not importable ({exc})") from exc
    return [Doc(clean_text(topics[key]), "docs", f"pydoc_data.topics:{key}") for key in sorted(topics)]


def _license_files() -> list[tuple[str, Path]]:
    """(source label, path) of every license text this module knows, in a fixed order."""
    found: list[tuple[str, Path]] = []
    if COMMON_LICENSES.is_dir():
        # GPL -> GPL-3 and friends are symlinks: list each real file once, under its own name.
        real = sorted(p for p in COMMON_LICENSES.iterdir() if p.is_file() and not p.is_symlink())
        found += [(f"debian-common-licenses:{p.name}", p) for p in real]
    stdlib_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if stdlib_license.is_file():
        found.append(("python:LICENSE.txt", stdlib_license))
    for name in _LICENSED_DISTS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        files = sorted(str(f) for f in (dist.files or []) if _LICENSE_NAME.match(Path(str(f)).name))
        found += [(f"pypi:{name}:{f}", Path(str(dist.locate_file(f)))) for f in files]
    return found


def collect_legal() -> list[Doc]:
    """License texts, one document per distinct text (symlinks and repeated copies counted once)."""
    docs, seen = [], set()
    for label, path in _license_files():
        text = _read_utf8(path)
        if not text:
            continue
        text = clean_text(text)
        # Many dependencies ship the identical Apache-2.0 text: compare whitespace-insensitively.
        key = " ".join(text.split())
        if len(key) < 200 or key in seen:
            continue
        seen.add(key)
        docs.append(Doc(text, "legal", label))
    if not docs:
        raise SourceMissing(f"legal: no license texts in {COMMON_LICENSES} nor in the dependencies' dist-info")
    return docs


def read_mo(path: Path, *, header_only: bool = False) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Parse a GNU gettext ``.mo`` catalog.

    Args:
        path: the ``.mo`` file.
        header_only: parse only the header entry (the empty msgid, which sorts first) and return no
            messages: a cheap look at who wrote the catalog before parsing thousands of strings.

    Returns:
        (header fields with lower-case keys, [(msgid, msgstr), ...] in file order, header excluded).
        Plural forms stay NUL-separated, as stored; strings are decoded with the header's charset.

    Raises:
        ValueError: the file is not a .mo catalog (bad magic number) or is truncated.
    """
    data = path.read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short for a .mo catalog")
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise ValueError(f"{path}: not a gettext .mo file (magic {magic:#x})")
    _, count, orig_at, trans_at = struct.unpack(order + "4I", data[4:20])

    def raw(table: int, i: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i : table + 8 * i + 8])
        if offset + length > len(data):
            raise ValueError(f"{path}: string {i} runs past the end of the file (truncated catalog)")
        return data[offset : offset + length]

    pairs = [(raw(orig_at, i), raw(trans_at, i)) for i in range(min(count, 1) if header_only else count)]
    header: dict[str, str] = {}
    for msgid, msgstr in pairs:
        if msgid == b"":
            for line in msgstr.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition(":")
                header[key.strip().lower()] = value.strip()
    charset = re.search(r"charset=([\w-]+)", header.get("content-type", "")) or None
    encoding = charset.group(1) if charset and charset.group(1).upper() != "CHARSET" else "utf-8"
    messages = [(i.decode(encoding, "replace"), s.decode(encoding, "replace")) for i, s in pairs if i != b""]
    return header, messages


def _is_postgresql(header: dict[str, str]) -> bool:
    return "postgresql" in header.get("project-id-version", "").lower() or "pgsql" in header.get(
        "report-msgid-bugs-to", ""
    )


def collect_multilingual(locale_dir: Path = LOCALE_DIR) -> list[Doc]:
    """Translated PostgreSQL messages, one document per (language, catalog); English msgids are dropped.

    Only catalogs whose header names PostgreSQL are read, so every text here is under the PostgreSQL
    License whatever else ``locale_dir`` holds. Untranslated entries (msgstr empty or equal to the
    msgid) are skipped; plural forms each become a line.
    """
    paths = sorted(locale_dir.glob("*/LC_MESSAGES/*.mo")) if locale_dir.is_dir() else []
    docs = []
    for path in paths:
        try:
            if not _is_postgresql(read_mo(path, header_only=True)[0]):
                continue
            _, messages = read_mo(path)
        except (ValueError, OSError):
            continue
        lines = []
        for msgid, msgstr in messages:
            lines += [s for s in msgstr.split("\x00") if s.strip() and s not in msgid.split("\x00")]
        text = clean_text("\n".join(lines))
        if text:
            lang = path.parent.parent.name
            docs.append(Doc(text, "multilingual", f"postgresql-nls:{lang}:{path.stem}"))
    if not docs:
        raise SourceMissing(
            f"multilingual: no PostgreSQL .mo catalogs under {locale_dir} "
            "(install them with `apt-get install postgresql-client`)"
        )
    return docs


def collect_c(include_dir: Path = INCLUDE_DIR) -> list[Doc]:
    """C headers at the top of ``/usr/include`` (mostly glibc's, Debian libc6-dev), one document per file."""
    docs = []
    for path in sorted(include_dir.glob("*.h")) if include_dir.is_dir() else []:
        text = _read_utf8(path)
        if text and text.strip():
            docs.append(Doc(clean_text(text), "c", f"usr-include:{path.name}"))
    if not docs:
        raise SourceMissing(f"c: no *.h files in {include_dir} (install them with `apt-get install libc6-dev`)")
    return docs


def collect_perl(perl_dir: Path = PERL_DIR) -> list[Doc]:
    """Perl core modules (``*.pm``, code with its POD documentation), Debian perl-modules, one per file."""
    versions = sorted(p for p in perl_dir.iterdir() if p.is_dir() and not p.is_symlink()) if perl_dir.is_dir() else []
    docs = []
    for root in versions[-1:]:  # one version's tree: 5.36 and 5.36.0 are often the same files twice
        for path in sorted(root.rglob("*.pm")):
            text = _read_utf8(path)
            if text and text.strip():
                docs.append(Doc(clean_text(text), "perl", f"perl:{path.relative_to(perl_dir).as_posix()}"))
    if not docs:
        raise SourceMissing(f"perl: no *.pm modules under {perl_dir} (Debian perl-modules)")
    return docs


def collect_manpages(man_dir: Path = MAN_DIR) -> list[Doc]:
    """English manual pages in roff source (``man1``-``man8``, gzip), one document per page."""
    paths = sorted(p for p in man_dir.glob("man[1-8]/*.gz") if p.is_file() and not p.is_symlink())
    docs = []
    for path in paths:
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        text = clean_text(text)
        if len(text) >= 200 and not text.startswith(".so "):  # skip `.so` redirects to another page
            docs.append(Doc(text, "manpages", f"man:{path.relative_to(man_dir).as_posix()}"))
    if not docs:
        raise SourceMissing(f"manpages: no gzip'd pages under {man_dir}/man[1-8]")
    return docs


COLLECTORS = {"code": collect_code, "docs": collect_docs, "legal": collect_legal, "multilingual": collect_multilingual}
# Domains beyond the demo's four, for the DDK study (pipelines/study_ddk.py): more domains whose gaps differ, so
# reweighting has room to matter. Kept out of COLLECTORS so the demo's corpus and outputs stay as they were.
STUDY_COLLECTORS = {"c": collect_c, "perl": collect_perl, "manpages": collect_manpages}
ALL_COLLECTORS = {**COLLECTORS, **STUDY_COLLECTORS}
