"""Corpus reading: every accepted layout gives the same per-domain documents; bad input names file and fix."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddk_offline.dump.corpus import CorpusError, open_corpus


def _by_domain(corpus) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for doc in corpus.documents():
        out.setdefault(doc.domain, []).append(doc.text)
    return out


def _expected(rows) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["domain"], []).append(r["text"])
    return out


def test_jsonl_and_domain_folders_agree(corpus_jsonl, corpus_folders, corpus_rows):
    a = open_corpus(str(corpus_jsonl))
    b = open_corpus(str(corpus_folders))
    assert a.layout == "files" and b.layout == "domain-folders"
    assert _by_domain(a) == _by_domain(b) == _expected(corpus_rows)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "json-array", "saved-dataset", "glob"])
def test_other_formats_agree(tmp_path, corpus_rows, fmt):
    if fmt == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(corpus_rows), path, row_group_size=7)
    elif fmt in ("csv", "tsv"):
        path = tmp_path / f"c.{fmt}"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "domain", "id"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(corpus_rows)
    elif fmt == "json-array":
        path = tmp_path / "c.json"
        path.write_text(json.dumps(corpus_rows), encoding="utf-8")
    elif fmt == "saved-dataset":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(corpus_rows).save_to_disk(str(path))
    else:
        for i in range(3):  # rows split over files whose sorted order is the corpus order
            part = corpus_rows[i * 30 : (i + 1) * 30]
            (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        path = tmp_path / "part-*.jsonl"
    assert _by_domain(open_corpus(str(path))) == _expected(corpus_rows)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json-array", "txt"])
def test_a_leading_utf8_byte_order_mark_is_not_text(tmp_path, corpus_rows, fmt):
    """Excel's "CSV UTF-8" and Notepad start files with a BOM; it must not hide the first column or join the text."""
    rows = corpus_rows[:6]
    if fmt == "csv":
        path = tmp_path / "c.csv"
        with open(path, "w", newline="", encoding="utf-8-sig") as f:
            w = csv.DictWriter(f, fieldnames=["text", "domain", "id"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "txt":
        for n, r in enumerate(rows):
            (tmp_path / "c" / r["domain"]).mkdir(parents=True, exist_ok=True)
            (tmp_path / "c" / r["domain"] / f"{n}.txt").write_text(r["text"], encoding="utf-8-sig")
        path = tmp_path / "c"
    else:
        path = tmp_path / ("c.jsonl" if fmt == "jsonl" else "c.json")
        body = "".join(json.dumps(r) + "\n" for r in rows) if fmt == "jsonl" else json.dumps(rows)
        path.write_text(body, encoding="utf-8-sig")
    assert _by_domain(open_corpus(str(path))) == _expected(rows)


def test_missing_text_column_names_file_and_flag(corpus_jsonl):
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:1: no field 'body'.*--text-column"):
        list(open_corpus(str(corpus_jsonl), text_column="body").documents())


def test_missing_domain_column_names_file_and_flag(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a b c"]}), path)
    with pytest.raises(CorpusError, match=r"c\.parquet: no column 'domain'.*--domain-column"):
        list(open_corpus(str(path)).documents())


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": 7, "domain": "a"}, r"c\.jsonl:1: field 'text' must be a string, got int; .*--text-column"),
        ({"text": "x", "domain": None}, r"c\.jsonl:1: field 'domain' must be a non-empty string.*--domain-column"),
        ({"text": "x", "domain": "  "}, r"c\.jsonl:1: field 'domain' must be a non-empty string.*give every row"),
    ],
)
def test_bad_field_values_name_the_row_and_the_fix(tmp_path, row, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        list(open_corpus(str(path)).documents())


def test_non_utf8_file_is_named(tmp_path, corpus_rows):
    (tmp_path / "c" / "prose").mkdir(parents=True)
    (tmp_path / "c" / "prose" / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "c" / "prose" / "b.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"b\.txt: not valid UTF-8.*re-encode"):
        list(open_corpus(str(tmp_path / "c")).documents())


def test_files_beside_domain_folders_are_refused(corpus_folders):
    # Reading either half would silently drop the other: here the README would become the whole corpus.
    (corpus_folders / "README.md").write_text("three domains, one sub-folder each", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"both files \(README\.md\) and sub-folders \(code, numbers, prose\).*glob"):
        open_corpus(str(corpus_folders))


def test_bad_sources(tmp_path):
    with pytest.raises(CorpusError, match="not a file, folder or glob that exists"):
        open_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no data files"):
        open_corpus(str(tmp_path / "empty"))
    (tmp_path / "x.docx").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"x\.docx: unsupported file type"):
        open_corpus(str(tmp_path / "x.docx"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "domain": "d"}\n{oops\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        list(open_corpus(str(bad)).documents())
