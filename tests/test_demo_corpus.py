"""The demo corpus builder: sources, chunking, budgets, determinism, layout (pipelines/demo_corpus.py)."""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

import pytest

from pipelines import demo_corpus as dc
from pipelines import demo_sources as ds

TINY = {"tokens_per_domain": 400, "val_fraction": 0.25, "max_doc_chars": 600}
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


@functools.cache
def missing_sources() -> dict[str, str]:
    """domain -> why it is missing, for the domains whose source this machine lacks (checked once)."""
    missing = {}
    for domain, collect in ds.ALL_COLLECTORS.items():
        try:
            collect()
        except ds.SourceMissing as exc:
            missing[domain] = str(exc)
    return missing


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, dc.build_demo_corpus(out, seed=3, verbose=False, **TINY)


def _read(path: Path) -> list[dict]:
    raw = path.read_bytes()
    text = raw.decode("utf-8")  # strict: raises on invalid UTF-8
    return [json.loads(line) for line in text.split("\n") if line]


@pytest.mark.parametrize("domain", dc.STUDY_DOMAINS)
def test_each_source_gives_clean_documents(domain):
    if domain in missing_sources():
        pytest.skip(f"source absent on this machine: {missing_sources()[domain]}")
    docs = ds.ALL_COLLECTORS[domain]()
    assert len(docs) >= 5, f"{domain}: only {len(docs)} documents"
    assert {d.domain for d in docs} == {domain}
    assert len({d.source for d in docs}) == len(docs), "sources must name documents uniquely"
    for d in docs:
        assert d.text.strip() and not _BAD_CONTROL.search(d.text), d.source
    assert [d.source for d in ds.ALL_COLLECTORS[domain]()] == [d.source for d in docs], "listing must be stable"


def test_the_demo_keeps_its_four_domains_and_the_study_adds_three(tmp_path):
    assert dc.DOMAINS == ("code", "docs", "legal", "multilingual"), "the demo's corpus (and outputs) must not change"
    assert dc.STUDY_DOMAINS[:4] == dc.DOMAINS and len(dc.STUDY_DOMAINS) >= 6
    manifest = dc.build_demo_corpus(tmp_path, domains=dc.STUDY_DOMAINS, seed=1, verbose=False, **TINY)
    assert set(manifest["domains"]) == set(dc.STUDY_DOMAINS) - set(missing_sources())
    with pytest.raises(ValueError, match="unknown"):
        dc.build_demo_corpus(tmp_path, domains=["nope"], verbose=False)


def test_layout_schema_and_domains(tiny_corpus):
    out, manifest = tiny_corpus
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert set(manifest["domains"]) == set(dc.DOMAINS) - set(missing_sources())
    assert set(manifest["skipped"]) == set(missing_sources())
    for domain, entry in manifest["domains"].items():
        for split in ("train", "val"):
            rows = _read(out / entry[split]["file"])
            assert len(rows) == entry[split]["docs"] > 0
            for row in rows:
                assert set(row) == {"text", "domain", "source"}
                assert row["domain"] == domain and row["text"].strip()
                assert not _BAD_CONTROL.search(row["text"])
            assert sum(len(r["text"]) for r in rows) == entry[split]["chars"]


def test_budgets_and_document_bounds_respected(tiny_corpus):
    out, manifest = tiny_corpus
    val_budget = round(TINY["tokens_per_domain"] * TINY["val_fraction"])
    budgets = {"val": val_budget, "train": TINY["tokens_per_domain"] - val_budget}
    for domain, entry in manifest["domains"].items():
        for split, budget in budgets.items():
            rows = _read(out / entry[split]["file"])
            tokens = sum(dc.estimate_tokens(r["text"], domain) for r in rows)
            assert tokens == entry[split]["tokens"]
            # Never over budget; within one minimum document of it (the sources hold far more text).
            assert budget - dc.MIN_DOC_TOKENS <= tokens <= budget, (domain, split, tokens, budget)
            assert max(len(r["text"]) for r in rows) <= TINY["max_doc_chars"]
        # Held-out documents come from files/topics that train never touches.
        group = lambda row: dc.source_group(ds.Doc(**row))
        train = {group(r) for r in _read(out / entry["train"]["file"])}
        assert not train & {group(r) for r in _read(out / entry["val"]["file"])}, (
            f"{domain}: val shares a file with train"
        )


def test_same_seed_same_bytes_other_seed_other_docs(tiny_corpus, tmp_path):
    out, _ = tiny_corpus
    dc.build_demo_corpus(tmp_path / "again", seed=3, verbose=False, **TINY)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    dc.build_demo_corpus(tmp_path / "other", seed=4, verbose=False, **TINY)
    changed = [
        f for f in files if f.suffix == ".jsonl" and (out / f).read_bytes() != (tmp_path / "other" / f).read_bytes()
    ]
    assert changed, "a different seed must pick different documents"


def test_exact_token_counter_and_val_fraction_zero(tmp_path):
    words = lambda text: len(text.split())  # any callable counter is accepted
    manifest = dc.build_demo_corpus(
        tmp_path,
        tokens_per_domain=300,
        val_fraction=0.0,
        max_doc_chars=500,
        domains=["docs", "legal"],  # the cheap sources: the counter path is the same for every domain
        token_counter=words,
        verbose=False,
    )
    assert manifest["token_count"] == "tokenizer"
    assert not (tmp_path / "val").exists()
    for domain, entry in manifest["domains"].items():
        rows = _read(tmp_path / entry["train"]["file"])
        assert 300 - dc.MIN_DOC_TOKENS <= sum(words(r["text"]) for r in rows) <= 300, domain


def test_missing_source_is_skipped_with_reason_or_refused(tmp_path, monkeypatch):
    def absent():
        raise ds.SourceMissing("docs: pretend pydoc_data is stripped")

    monkeypatch.setitem(ds.COLLECTORS, "docs", absent)
    manifest = dc.build_demo_corpus(tmp_path, domains=["docs", "legal"], verbose=False, **TINY)
    assert manifest["skipped"] == {"docs": "docs: pretend pydoc_data is stripped"}
    assert not (tmp_path / "train" / "docs.jsonl").exists()
    with pytest.raises(ds.SourceMissing, match="pretend"):
        dc.build_demo_corpus(tmp_path, domains=["docs"], require_all=True, verbose=False, **TINY)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"domains": ["poetry"]}, "unknown"), ({"val_fraction": 0.9}, "val_fraction"), ({"max_doc_chars": 10}, "max_doc")],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dc.build_demo_corpus(tmp_path, verbose=False, **kwargs)


def test_clean_text_keeps_only_tab_and_newline():
    assert ds.clean_text("\r\nA\x0cb \r\nc\x85d\u2028e\tf \x00\n\n") == "Ab\ncd\ne\tf"


def test_chunking_keeps_boundaries_and_bounds():
    code = "import os\n\n\n" + "\n\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(10))
    chunks = dc.chunk_doc(ds.Doc(code, "code", "m.py"), 80)
    assert len(chunks) > 1 and all(len(c.text) <= 80 for c in chunks)
    # Cuts fall only before top-level statements: no chunk starts inside a function body.
    assert all(c.text.startswith(("import ", "def ")) for c in chunks), [c.text[:12] for c in chunks]
    assert sum(c.text.count(f"def f{i}(") for c in chunks for i in range(10)) == 10
    assert [c.source for c in chunks] == [f"m.py#{i}" for i in range(len(chunks))]
    prose = "First paragraph here.\n\nSecond one.\n\n" + "x" * 250
    pieces = dc.chunk_doc(ds.Doc(prose, "docs", "t"), 100)
    assert pieces[0].text == "First paragraph here.\n\nSecond one."
    assert "".join(p.text for p in pieces[1:]) == "x" * 250 and all(len(p.text) <= 100 for p in pieces)
    assert dc.chunk_doc(ds.Doc("short", "legal", "s"), 100) == [ds.Doc("short", "legal", "s")]


def _write_mo(path: Path, entries: dict[str, str]) -> None:
    """A minimal little-endian .mo file (no hash table), entries sorted by msgid as msgfmt does."""
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n, at = len(keys), 28 + 16 * len(keys)
    table_o, table_t, blob = b"", b"", b""
    for raw in ids:
        table_o += struct.pack("<2I", len(raw), at + len(blob))
        blob += raw + b"\0"
    for raw in strs:
        table_t += struct.pack("<2I", len(raw), at + len(blob))
        blob += raw + b"\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0) + table_o + table_t + blob)


def test_mo_reader_and_postgresql_filter(tmp_path):
    header = "Project-Id-Version: PostgreSQL 15\nContent-Type: text/plain; charset=UTF-8\n"
    _write_mo(
        tmp_path / "de/LC_MESSAGES/psql-15.mo",
        {
            "": header,
            "could not open file": "konnte Datei nicht öffnen",
            "same": "same",
            "%d row\0%d rows": "%d Zeile\0%d Zeilen",
        },
    )
    _write_mo(tmp_path / "de/LC_MESSAGES/other.mo", {"": "Project-Id-Version: other 1\n", "hello": "hallo"})
    (tmp_path / "fr/LC_MESSAGES").mkdir(parents=True)
    (tmp_path / "fr/LC_MESSAGES/broken.mo").write_bytes(b"not a catalog at all")
    head, messages = ds.read_mo(tmp_path / "de/LC_MESSAGES/psql-15.mo")
    assert head["project-id-version"] == "PostgreSQL 15" and len(messages) == 3
    docs = ds.collect_multilingual(tmp_path)
    assert [d.source for d in docs] == ["postgresql-nls:de:psql-15"]
    # Untranslated entries dropped, plural forms one per line, English msgids never included.
    assert docs[0].text == "%d Zeile\n%d Zeilen\nkonnte Datei nicht öffnen"
    with pytest.raises(ValueError, match="not a gettext"):
        ds.read_mo(tmp_path / "fr/LC_MESSAGES/broken.mo")
    with pytest.raises(ds.SourceMissing, match="postgresql-client"):
        ds.collect_multilingual(tmp_path / "nowhere")


def test_cli_and_datasets_loads_the_output(tmp_path):
    datasets = pytest.importorskip("datasets")
    dc.main([str(tmp_path / "c"), "--tokens-per-domain", "300", "--max-doc-chars", "500", "--domains", "docs,legal"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert set(manifest["domains"]) <= {"docs", "legal"} and manifest["max_doc_chars"] == 500
    # The dump reads `--data OUT/train` through `datasets`' json loader: columns text and domain.
    ds_train = datasets.load_dataset(
        "json", data_files=str(tmp_path / "c" / "train" / "*.jsonl"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert set(ds_train.column_names) == {"text", "domain", "source"}
    assert set(ds_train["domain"]) == set(manifest["domains"])
