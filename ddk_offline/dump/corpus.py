"""Read a corpus as a deterministic stream of documents ``(domain, text)``, never loading it whole.

Accepted ``--data`` sources (see docs/FORMAT.md, "Corpus"):

- a file, a glob, or a folder of data files: ``.jsonl``/``.ndjson``, ``.json`` (JSON Lines or one JSON array),
  ``.parquet``, ``.csv``, ``.tsv``; every row needs the text column and the domain column;
- a folder with one sub-folder per domain and no files beside them (the *domain-folder layout*): the domain is
  the sub-folder's name; each ``.txt``/``.md`` file under it (searched recursively) is ONE document, and
  structured files (jsonl, parquet, ...) inside it contribute one document per row (no domain column needed);
- a dataset saved with ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow; the ``train`` split of a
  ``DatasetDict``, or its only split);
- anything else that is not a local path is tried as a Hub dataset name (streaming; needs network, untested).

Order is deterministic: files sorted by path (domain folders by name), rows in file order. A ``.txt`` file
given directly (not in the domain-folder layout) is one document whose domain is its parent folder's name.
Text is decoded as strict UTF-8; a file that is not UTF-8 is an error naming the file and the line. A UTF-8
byte-order mark at the start of a file (Excel's "CSV UTF-8" and Notepad write one) is not part of the text.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddk_offline.errors import UserError

STRUCTURED = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
TEXT_SUFFIXES = {".txt", ".md"}
_BOM = b"\xef\xbb\xbf"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"


class CorpusError(UserError):
    """The corpus cannot be read as documents; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Document:
    """One document. ``where`` locates it for error messages (``file:line`` or ``file:row``)."""

    domain: str
    text: str
    where: str


@dataclass
class Corpus:
    """A resolved corpus source. Create with :func:`open_corpus`; iterate with :meth:`documents`.

    Attributes:
        data: the ``--data`` argument as given.
        layout: ``files`` | ``domain-folders`` | ``saved-dataset`` | ``hub``.
        files: ``(domain or None, path)`` in reading order; ``domain`` is set in the domain-folder layout.
    """

    data: str
    text_column: str
    domain_column: str
    layout: str
    files: list[tuple[str | None, Path]] = field(default_factory=list)

    def folders(self) -> list[Path]:
        """Local folders whose contents this corpus reads, now or on a rerun (a folder, or a glob's fixed prefix)."""
        data = os.path.expanduser(self.data)
        if self.layout == "hub":
            return []
        if any(ch in data for ch in "*?["):
            prefix = re.split(r"[*?\[]", data, maxsplit=1)[0]
            return [Path(prefix if prefix.endswith(os.sep) else os.path.dirname(prefix) or ".").resolve()]
        path = Path(data)
        return [path.resolve()] if path.is_dir() else []

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the source (the content hash is added by the dump's pre-pass)."""
        return {
            "data": self.data,
            "layout": self.layout,
            "files": len(self.files),
            "text_column": self.text_column,
            "domain_column": self.domain_column if self.layout != "domain-folders" else None,
        }

    def documents(self) -> Iterator[Document]:
        """Yield every document in deterministic order (empty texts included; the caller decides)."""
        if self.layout == "saved-dataset":
            yield from self._saved_dataset()
        elif self.layout == "hub":
            yield from self._hub()
        else:
            for domain, path in self.files:
                yield from self._file(domain, path)

    # --- readers --------------------------------------------------------------------------------
    def _file(self, domain: str | None, path: Path) -> Iterator[Document]:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield Document(domain or path.parent.name, _read_utf8(path), str(path))
            return
        kind = STRUCTURED[suffix]
        if kind == "json" and _first_char(path) == "[":
            rows: Iterator[tuple[str, Any]] = _json_array_rows(path)
        elif kind in ("json", "jsonl"):
            rows = _jsonl_rows(path)
        elif kind in ("csv", "tsv"):
            rows = _csv_rows(path, "\t" if kind == "tsv" else ",", self._needed(domain), self)
        else:
            rows = _parquet_rows(path, self._needed(domain), self)
        for where, row in rows:
            yield self._document(row, where, domain)

    def _needed(self, domain: str | None) -> list[str]:
        return [self.text_column] if domain is not None else [self.text_column, self.domain_column]

    def _document(self, row: Any, where: str, domain: str | None) -> Document:
        if not isinstance(row, dict):
            raise CorpusError(f"{where}: a row must be a JSON object with a {self.text_column!r} field")
        if self.text_column not in row:
            raise CorpusError(
                f"{where}: no field {self.text_column!r} (fields: {sorted(row)}); "
                "pass --text-column NAME to choose the text field"
            )
        text = row[self.text_column]
        if text is not None and not isinstance(text, str):
            raise CorpusError(
                f"{where}: field {self.text_column!r} must be a string, got {type(text).__name__}; store the text as "
                "a string, or pass --text-column NAME if another field holds it"
            )
        if domain is None:
            if self.domain_column not in row:
                raise CorpusError(
                    f"{where}: no field {self.domain_column!r} (fields: {sorted(row)}); pass --domain-column NAME, "
                    "or use the domain-folder layout (one sub-folder per domain)"
                )
            domain = row[self.domain_column]
            if isinstance(domain, int) and not isinstance(domain, bool):
                domain = str(domain)
            if not isinstance(domain, str) or not domain.strip():
                raise CorpusError(
                    f"{where}: field {self.domain_column!r} must be a non-empty string, got {domain!r}; give every "
                    "row a domain name, or pass --domain-column NAME if another field holds it"
                )
        return Document(domain, text or "", where)

    def _saved_dataset(self) -> Iterator[Document]:
        import datasets

        ds = datasets.load_from_disk(self.data)
        if isinstance(ds, datasets.DatasetDict):
            names = sorted(ds)
            if "train" not in ds and len(names) != 1:
                raise CorpusError(f"{self.data}: a DatasetDict with splits {names} and no 'train'; save one split")
            ds = ds["train" if "train" in ds else names[0]]
        self._check_columns(ds.column_names, self.data, self._needed(None))
        ds = ds.select_columns([self.text_column, self.domain_column])
        i = 0
        for batch in ds.iter(batch_size=1024):
            for text, domain in zip(batch[self.text_column], batch[self.domain_column], strict=True):
                row = {self.text_column: text, self.domain_column: domain}
                yield self._document(row, f"{self.data}:row {i}", None)
                i += 1

    def _hub(self) -> Iterator[Document]:
        import datasets

        try:
            ds = datasets.load_dataset(self.data, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a usable source"
            raise CorpusError(
                f"--data {self.data!r}: not a local file, folder or glob, and not loadable as a Hub dataset ({e}); "
                "check the path"
            ) from None
        for i, row in enumerate(ds):
            yield self._document(row, f"{self.data}:row {i}", None)

    def _check_columns(self, columns: list[str], where: str, needed: list[str]) -> None:
        for col in needed:
            flag = "--text-column" if col == self.text_column else "--domain-column"
            if col not in columns:
                raise CorpusError(f"{where}: no column {col!r} (columns: {list(columns)}); pass {flag} NAME")


def open_corpus(data: str, *, text_column: str = "text", domain_column: str = "domain") -> Corpus:
    """Resolve ``data`` (file, folder, glob, saved dataset or Hub name) without reading documents yet.

    Raises:
        CorpusError: nothing readable at ``data``, or files of an unsupported type.
    """
    corpus = Corpus(str(data), text_column, domain_column, layout="files")
    path = Path(os.path.expanduser(str(data)))
    if any(ch in str(data) for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(data)), recursive=True))
        files = [p for p in matches if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise CorpusError(f"--data {data!r}: the glob matches no files; check the pattern")
        corpus.files = [(None, _checked(p)) for p in files]
    elif path.is_file():
        corpus.files = [(None, _checked(path))]
    elif path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            corpus.layout = "saved-dataset"
            corpus.data = str(path)
            return corpus
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        top_files = [p for p in entries if p.is_file()]
        subdirs = [p for p in entries if p.is_dir()]
        if top_files and subdirs:
            # Either reading would silently drop the other half (e.g. a README beside the domain sub-folders).
            raise CorpusError(
                f"--data {data}: the folder holds both files ({_names(top_files)}) and sub-folders "
                f"({_names(subdirs)}); for one sub-folder per domain move the files out of it, otherwise point "
                "--data at the files (a glob works)"
            )
        if top_files:
            corpus.files = [(None, _checked(p)) for p in top_files]
        elif subdirs:
            corpus.layout = "domain-folders"
            for sub in subdirs:
                found = sorted(
                    p for p in sub.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)
                )
                corpus.files += [(sub.name, _checked(p)) for p in found]
        if not corpus.files:
            raise CorpusError(
                f"--data {data}: the folder holds no data files; point --data at the corpus files or their folder"
            )
    elif path.exists() or not _HUB_NAME.match(str(data)) or path.suffix.lower() in STRUCTURED:
        raise CorpusError(f"--data {data}: not a file, folder or glob that exists; check the path")
    else:
        corpus.layout = "hub"
    return corpus


def _names(paths: list[Path], most: int = 3) -> str:
    shown = ", ".join(p.name for p in paths[:most])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > most else "")


def _checked(path: Path) -> Path:
    suffix = path.suffix.lower()
    if suffix not in STRUCTURED and suffix not in TEXT_SUFFIXES:
        raise CorpusError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use one of "
            f"{sorted([*STRUCTURED, *TEXT_SUFFIXES])}, or move the file out of the corpus"
        )
    return path


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if (nul := raw.find(b"\0")) >= 0:
        # NUL never occurs in text; ASCII-range binary (images, archives' headers) would otherwise pass as UTF-8.
        raise CorpusError(
            f"{path}: looks like a binary file (NUL byte at offset {nul}), not text; remove it from the corpus"
        )
    return _decode(raw.removeprefix(_BOM), str(path))


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """A binary file's raw lines numbered from 1, without a leading byte-order mark (else it joins the first field)."""
    for n, raw in enumerate(f, start=1):
        yield n, raw.removeprefix(_BOM) if n == 1 else raw


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return chr(head[0]) if head else ""


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in _lines(f):
            where = f"{path}:{n}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None


def _json_array_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # A JSON array cannot be streamed without a streaming parser; it is one file, parsed whole. Use JSON Lines
    # for large corpora.
    try:
        rows = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    for i, row in enumerate(rows):
        yield f"{path}:row {i}", row


def _csv_rows(path: Path, delimiter: str, needed: list[str], corpus: Corpus) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, "rb") as raw:
        lines = (_decode(b, f"{path}:{n}") for n, b in _lines(raw))
        reader = csv.DictReader(lines, delimiter=delimiter)
        corpus._check_columns(reader.fieldnames or [], str(path), needed)
        for i, row in enumerate(reader):
            yield f"{path}:row {i}", row


def _parquet_rows(path: Path, needed: list[str], corpus: Corpus) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CorpusError(f"{path}: cannot read as Parquet ({e}); check the file") from None
    corpus._check_columns(pf.schema_arrow.names, str(path), needed)
    i = 0
    for batch in pf.iter_batches(batch_size=1024, columns=needed):
        for row in batch.to_pylist():
            yield f"{path}:row {i}", row
            i += 1
