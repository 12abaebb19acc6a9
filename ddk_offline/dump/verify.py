"""``dumps verify``: check a teacher dump against its manifest, file by file, and name every broken file.

Per listed shard: the file exists inside the dump (no symlink out of it), its size and sha256 equal the manifest's,
it opens as Parquet with this format's schema and version, it holds ``rows`` rows whose ``seq_index`` runs from
``first_seq``, every list column has ``seq_len`` values per row, the teacher NLL sums to the manifest's
``teacher_nll_sum``, and a sample of rows decodes (top-k codec) to in-range ids and finite numbers, with a NaN
teacher NLL exactly where no target is (each row's last position; in a BOS dump, the positions before a BOS). Per
dump: the manifest loads (checksum, paths), every planned sequence is in a listed shard (``complete``), and the saved
tokenizer is the one the manifest names; the teacher matrices file, when listed, has the recorded size and sha256, and
a dump with hidden states has their column in every shard and decodes them (finite, [L, D]). The checks never stop
at the first problem: the report lists them all.

The sha256 alone proves the bytes are the ones written; the structural and decode checks say *what* is wrong with
a file that fails it, and catch a dump written by a codec this version cannot read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ddk_offline.format.manifest import Manifest, ManifestError, ShardInfo
from ddk_offline.format.reader import DumpReader
from ddk_offline.format.schema import (
    FORMAT_NAME,
    INPUT_IDS,
    MANIFEST_NAME,
    SEQ_INDEX,
    SPLITS,
    TEACHER_HIDDEN,
    TEACHER_LSE,
    TEACHER_NLL,
    TOKENIZER_DIR,
    TOPK_IDS,
    TOPK_LOGITS,
    shard_schema,
)
from ddk_offline.format.teacher_matrices import check_teacher_matrices
from ddk_offline.runtime.files import sha256_file


@dataclass
class Problem:
    """One broken file (or dump-level fault).

    Attributes:
        file: the file's path (the dump directory itself for dump-level faults).
        what: every reason found, joined with "; ".
        domain, split, shard: the shard's place in the dump (None for non-shard files).
    """

    file: Path
    what: str
    domain: str | None = None
    split: str | None = None
    shard: ShardInfo | None = None

    def __str__(self) -> str:
        where = f" ({self.domain}/{self.split})" if self.domain is not None else ""
        return f"{self.file}: {self.what}{where}"


@dataclass
class VerifyReport:
    """What :func:`verify_dump` found.

    Attributes:
        path: the dump directory.
        manifest: the loaded manifest (None when it cannot be loaded: then ``problems`` says why).
        problems: every broken file and dump-level fault, in manifest order.
        shards: shards checked.
        rows_decoded: rows decoded through the top-k codec.
    """

    path: Path
    manifest: Manifest | None
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    rows_decoded: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken_shards(self) -> set[str]:
        """Manifest ``file`` entries of the shards that failed (what ``--repair`` recomputes)."""
        return {p.shard.file for p in self.problems if p.shard is not None}


def verify_dump(path: str | Path, *, sample_rows: int = 4, check_tokenizer: bool = True) -> VerifyReport:
    """Check every shard of the dump at ``path`` against its manifest (see the module docstring).

    Args:
        path: the dump directory.
        sample_rows: rows decoded per shard, spread from first to last (0: every row).
        check_tokenizer: load ``tokenizer/`` and compare its vocabulary hash with the manifest's.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is true when nothing is wrong.
    """
    root = Path(path)
    try:
        manifest = Manifest.load(root)
    except ManifestError as e:
        return VerifyReport(
            root, None, [Problem(root / MANIFEST_NAME, str(e).removeprefix(f"{root / MANIFEST_NAME}: "))]
        )
    report = VerifyReport(root, manifest)
    reader = DumpReader(root, manifest, verify_checksums=False)  # hashed here already, once
    for name, info in sorted(manifest.domains.items()):
        for split in SPLITS:
            for j, shard in enumerate(info.splits.get(split, _NO_SHARDS).shards):
                reasons, decoded = _check_shard(reader, name, split, j, shard, sample_rows)
                report.shards += 1
                report.rows_decoded += decoded
                if reasons:
                    report.problems.append(Problem(root / shard.file, "; ".join(reasons), name, split, shard))
    report.problems += _check_coverage(manifest, root)
    if (problem := check_teacher_matrices(root, manifest)) is not None:
        report.problems.append(Problem(root / manifest.teacher_matrices["file"], problem))
    if check_tokenizer:
        report.problems += _check_tokenizer(manifest, root)
    return report


_NO_SHARDS = type("_NoShards", (), {"shards": []})()


def _check_shard(
    reader: DumpReader, domain: str, split: str, index: int, shard: ShardInfo, sample_rows: int
) -> tuple[list[str], int]:
    """The reasons one shard is broken (empty when it is fine) and the rows decoded."""
    root, m = reader.path, reader.manifest
    file = root / shard.file
    if not file.is_file():
        return ["missing (listed in the manifest, not on disk)"], 0
    if not file.resolve().is_relative_to(root.resolve()):
        return [f"resolves to {file.resolve()}, outside the dump (a symlink); refusing to read it"], 0
    reasons = []
    size = file.stat().st_size
    if size != shard.bytes:
        reasons.append(f"size {size} bytes, the manifest says {shard.bytes} (truncated or overwritten)")
    if sha256_file(file)[0] != shard.sha256:
        reasons.append("sha256 differs from the manifest")
    try:
        pf = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as e:
        return [*reasons, f"cannot be opened as Parquet ({e})"], 0
    meta = pf.schema_arrow.metadata or {}
    version = m.format_version
    if meta.get(b"ddk_format") != FORMAT_NAME.encode() or meta.get(b"ddk_version") != str(version).encode():
        reasons.append(f"not a format-{version} {FORMAT_NAME} shard like its manifest (schema metadata {meta})")
    want = shard_schema(tuple(m.temperatures[1:]), hidden=m.has_hidden_states).remove_metadata()
    if not pf.schema_arrow.remove_metadata().equals(want):
        return [*reasons, f"schema differs from the format's ({pf.schema_arrow.names} vs {want.names})"], 0
    if pf.metadata.num_rows != shard.rows:
        return [*reasons, f"holds {pf.metadata.num_rows} rows, the manifest says {shard.rows}"], 0
    try:
        reasons += _check_columns(pf, shard, m.seq_len)
        rows = _sample(shard.rows, sample_rows)
        got = reader.read_rows(domain, split, index, rows, hidden=m.has_hidden_states)
        reasons += _check_values(got, m.vocab_size, rows, m.bos_token_id)
        if m.has_hidden_states and not np.isfinite(got[TEACHER_HIDDEN]).all():
            reasons.append(f"sampled rows {rows}: non-finite {TEACHER_HIDDEN}")
    except Exception as e:  # noqa: BLE001 - any failure to read or decode is the finding itself
        reasons.append(f"cannot be decoded ({type(e).__name__}: {e})")
        return reasons, 0
    return reasons, len(rows)


def _check_columns(pf: pq.ParquetFile, shard: ShardInfo, seq_len: int) -> list[str]:
    """Cheap whole-shard checks on the small columns: seq_index run, list lengths, the NLL sum."""
    reasons = []
    table = pf.read(columns=[SEQ_INDEX, INPUT_IDS, TEACHER_NLL])
    seq = table.column(SEQ_INDEX).to_numpy()
    if not np.array_equal(seq, np.arange(shard.first_seq, shard.first_seq + shard.rows)):
        reasons.append(f"seq_index is not {shard.first_seq}..{shard.first_seq + shard.rows - 1} in order")
    for col in (INPUT_IDS, TEACHER_NLL):
        lengths = pc.list_value_length(table.column(col)).to_numpy()
        if (lengths != seq_len).any():
            reasons.append(f"column {col!r} has rows of {sorted(set(lengths.tolist()))} values, not {seq_len}")
            return reasons
    nll = table.column(TEACHER_NLL).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    finite = np.isfinite(nll)
    total = float(nll[finite].astype(np.float64).sum())
    if int(finite.sum()) != shard.labelled or not math.isclose(
        total, shard.teacher_nll_sum, rel_tol=1e-9, abs_tol=1e-6
    ):
        reasons.append(
            f"teacher_nll sums to {total:.6g} over {int(finite.sum())} positions, the manifest says "
            f"{shard.teacher_nll_sum:.6g} over {shard.labelled}"
        )
    return reasons


def _sample(rows: int, n: int) -> list[int]:
    if n <= 0 or n >= rows:
        return list(range(rows))
    return sorted({round(i * (rows - 1) / max(1, n - 1)) for i in range(n)})


def _check_values(got: dict[str, np.ndarray], vocab: int, rows: list[int], bos: int | None) -> list[str]:
    """Decoded rows: ids in [0, V), finite logits and lse, NaN NLL exactly where no target is (last, before BOS)."""
    reasons = []
    for key in (INPUT_IDS, TOPK_IDS):
        a = got[key]
        if a.size and (a.min() < 0 or a.max() >= vocab):
            reasons.append(f"sampled rows {rows}: {key} outside [0, {vocab})")
    for key in (TOPK_LOGITS, TEACHER_LSE):
        if not np.isfinite(got[key]).all():
            reasons.append(f"sampled rows {rows}: non-finite {key}")
    nll, ids = got[TEACHER_NLL], got[INPUT_IDS]
    no_target = np.zeros(nll.shape, bool)
    no_target[:, -1] = True
    if bos is not None:
        no_target[:, :-1] = ids[:, 1:] == bos
    if not (np.isfinite(nll[~no_target]).all() and np.isnan(nll[no_target]).all()):
        where = "each row's last position" + ("" if bos is None else f" and before each BOS (id {bos})")
        reasons.append(f"sampled rows {rows}: teacher_nll must be finite except NaN at {where}")
    return reasons


def _check_coverage(m: Manifest, root: Path) -> list[Problem]:
    """Every planned sequence in a listed shard, shards consecutive (only with a dump-teacher corpus record)."""
    if not m.has_plan:
        return []  # a dump written by other tools (e.g. tests' synthetic dumps) records no plan
    problems = []
    for name, info in sorted(m.domains.items()):
        for split in SPLITS:
            want = m.planned_sequences(name, split)
            shards = info.splits.get(split, _NO_SHARDS).shards
            starts = [s.first_seq for s in shards]
            ends = [s.first_seq + s.rows for s in shards]
            if starts and (starts[0] != 0 or starts[1:] != ends[:-1]):
                problems.append(Problem(root / MANIFEST_NAME, f"{name}/{split}: shards are not consecutive"))
            have = sum(s.rows for s in shards)
            if have != want:
                problems.append(
                    Problem(
                        root / MANIFEST_NAME,
                        f"{name}/{split}: {have} of {want} planned sequences are in listed shards (incomplete dump); "
                        "rerun dump-teacher with the same arguments, or `dumps verify --repair`",
                    )
                )
    if not m.complete and not problems:
        problems.append(Problem(root / MANIFEST_NAME, "field 'complete' is false; rerun dump-teacher to finish it"))
    return problems


def _check_tokenizer(m: Manifest, root: Path) -> list[Problem]:
    folder = root / TOKENIZER_DIR
    if not folder.is_dir():
        return [Problem(folder, "missing: phase two needs the dump's tokenizer; rerun dump-teacher to save it")]
    want = m.tokenizer.get("vocab_sha256")
    if want is None:
        return []
    from transformers import AutoTokenizer

    from ddk_offline.dump.teachers.base import tokenizer_identity

    try:
        have = tokenizer_identity(AutoTokenizer.from_pretrained(folder), m.vocab_size)["vocab_sha256"]
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return [Problem(folder, f"cannot be loaded ({type(e).__name__}: {e})")]
    if have != want:
        return [Problem(folder, "its vocabulary hash differs from the manifest's tokenizer.vocab_sha256")]
    return []
