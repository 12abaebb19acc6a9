"""The dump manifest: what phase two needs to know about a dump, validated on every load.

The manifest is JSON, written atomically (temp file, fsync, rename). It carries a checksum of its own
canonical content, so a hand edit is detected instead of silently changing what a student trains on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddk_offline.format.schema import (
    BOS_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    SUPPORTED_VERSIONS,
)
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.runtime.files import json_bytes


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names the file, the field and the fix."""


@dataclass
class ShardInfo:
    """One complete Parquet shard of a (domain, split) stream.

    Attributes:
        file: POSIX path relative to the dump directory.
        first_seq: ``seq_index`` of the shard's first row; rows are consecutive.
        rows: sequences in the shard.
        tokens: ``rows * seq_len``.
        labelled: positions with a teacher loss (all but the last of each row and, in a BOS dump, those that
            predict a BOS).
        teacher_nll_sum: sum of the teacher's NLL over the labelled positions.
        bytes: file size.
        sha256: hex digest of the file's bytes.
    """

    file: str
    first_seq: int
    rows: int
    tokens: int
    labelled: int
    teacher_nll_sum: float
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    """The shards of one (domain, split) stream, in order."""

    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def sequences(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def teacher_loss(self) -> float:
        """Mean teacher NLL per labelled position (NaN when the split is empty)."""
        n = sum(s.labelled for s in self.shards)
        return sum(s.teacher_nll_sum for s in self.shards) / n if n else math.nan


@dataclass
class DomainInfo:
    """A domain: its folder inside the dump and its splits."""

    name: str
    dir: str
    splits: dict[str, SplitInfo] = field(default_factory=lambda: {s: SplitInfo() for s in SPLITS})


@dataclass
class Manifest:
    """Everything phase two reads from a dump (see docs/FORMAT.md for each field)."""

    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    seq_len: int
    k: int
    codec: dict[str, Any]
    corpus: dict[str, Any]
    settings: dict[str, Any]
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    domains: dict[str, DomainInfo] = field(default_factory=dict)
    complete: bool = False
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: How documents were framed with special tokens, and the start-up check's measurement (docs/FORMAT.md,
    #: "Packing"); None in dumps written before it was recorded (they were packed without BOS).
    packing: dict[str, Any] | None = None
    #: The teacher's embedding output, head and bias file (docs/FORMAT.md, "Teacher matrices"): file, bytes, sha256,
    #: dtype, shapes, tied, softcap. None when not stored; not part of :meth:`identity` (adding it to a finished dump
    #: changes no stored target, so a run resumed on that dump goes on).
    teacher_matrices: dict[str, Any] | None = None

    # --- typed accessors: readers use these, never dict paths into the JSON ------------------------
    @property
    def vocab_size(self) -> int:
        """The teacher's logit width V (the range of the stored top-k ids)."""
        return int(self.tokenizer["vocab_size"])

    @property
    def tokenizer_tokens(self) -> int:
        """``len(tokenizer)`` of the dump's tokenizer (added tokens included); V for dumps that did not record it."""
        return int(self.tokenizer.get("tokens", self.vocab_size))

    @property
    def teacher_name(self) -> str:
        """The teacher as ``--teacher`` named it (a path or a Hub name)."""
        return str(self.teacher.get("name", ""))

    @property
    def teacher_gguf_file(self) -> str | None:
        """The GGUF file inside the teacher folder, if the teacher was a GGUF."""
        return self.teacher.get("gguf_file") or None

    def identity(self) -> dict[str, Any]:
        """Everything that determines a dump's stored bytes, flat (``"field.sub": value``), paths left out.

        Two manifests with equal identities describe the same dump: a resumed dump must match the one in its folder,
        and a resumed distill run the dump it was checkpointed on (wherever either folder lives now).
        """
        flat: dict[str, Any] = {
            "format_version": self.format_version,
            "teacher.config_sha256": self.teacher.get("config_sha256"),
            "teacher.weights_sha256": self.teacher.get("weights_sha256"),
            "seq_len": self.seq_len,
            "k": self.k,
            "codec": self.codec,
            "temperatures": list(self.temperatures),
            "corpus.sha256": self.corpus.get("sha256"),
            "packing.bos_token_id": self.bos_token_id,
        }
        flat |= {f"tokenizer.{k}": v for k, v in self.tokenizer.items() if k != "class"}
        flat |= {f"settings.{k}": v for k, v in self.settings.items()}
        return flat

    def local_teacher(self) -> str | None:
        """The teacher on this machine: its folder, or the ``.gguf`` file in it; None when the path is not here."""
        path = Path(self.teacher_name).expanduser()
        if not self.teacher_name or not path.exists():
            return None
        if self.teacher_gguf_file and path.is_dir():
            path = path / self.teacher_gguf_file
        return str(path)

    @property
    def bos_token_id(self) -> int | None:
        """The BOS id the rows were packed with (each document and row starts with it); None: no BOS.

        Positions whose next token is this id carry no target: phase two masks their labels.
        """
        value = (self.packing or {}).get("bos_token_id")
        return None if value is None else int(value)

    @property
    def bos_policy(self) -> str:
        """``--bos`` as the dump was created with (``auto``, ``always``, ``never``); ``never`` for older dumps."""
        return str((self.packing or {}).get("bos") or "never")

    @property
    def packing_check(self) -> dict[str, Any] | None:
        """The start-up check (teacher bits per byte on packed rows vs standard tokenisation), if it ran."""
        return (self.packing or {}).get("check")

    @property
    def has_teacher_matrices(self) -> bool:
        """Whether the dump lists ``teacher_matrices.safetensors`` (load it with ``format.load_teacher_matrices``)."""
        return self.teacher_matrices is not None

    @property
    def hidden_states(self) -> dict[str, Any] | None:
        """``{"encoding", "dim", "zstd_level"}`` when the shards hold the teacher's last hidden states, else None."""
        return self.settings.get("hidden_states")

    @property
    def has_hidden_states(self) -> bool:
        """Whether every shard has the ``teacher_hidden`` column (``dump-teacher --store-hidden-states``)."""
        return self.hidden_states is not None

    @property
    def hidden_size(self) -> int | None:
        """The teacher's hidden width D, from the stored hidden states or matrices; None when the dump has neither."""
        if self.hidden_states is not None:
            return int(self.hidden_states["dim"])
        if self.teacher_matrices is not None:
            return int(self.teacher_matrices["head_shape"][1])
        return None

    @property
    def has_plan(self) -> bool:
        """Whether the corpus record holds the planned sequence counts (dumps written by ``dump-teacher`` do)."""
        return isinstance(self.corpus.get("domains"), dict)

    def planned_sequences(self, domain: str, split: str) -> int:
        """Sequences the dump's pre-pass planned for (domain, split): what a complete dump holds."""
        return int(self.corpus["domains"].get(domain, {}).get("sequences", {}).get(split, 0))

    def planned_hashes(self) -> dict[str, str]:
        """Content hash of each domain's documents, as the pre-pass computed it (domain -> sha256)."""
        return {name: d["sha256"] for name, d in self.corpus["domains"].items()}

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["packing"] is None:
            del d["packing"]  # a dump that never recorded it is rewritten byte for byte as it was
        if d["teacher_matrices"] is None:
            del d["teacher_matrices"]  # likewise: absent unless stored, and an older reader ignores it
        d["domains"] = {name: asdict(info) for name, info in sorted(self.domains.items())}
        d["checksum"] = _content_checksum(d)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = MANIFEST_NAME) -> Manifest:
        """Validate and build; every problem raises :class:`ManifestError` naming ``source`` and the field."""
        _check(isinstance(d, dict), source, "<root>", "must be a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(
                f"{source}: field 'format' is {d.get('format')!r}, not {FORMAT_NAME!r}; "
                "this is not a ddk-offline teacher dump"
            )
        version = d.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"{source}: format_version {version!r} is not supported by this ddk-offline "
                f"(supports {list(SUPPORTED_VERSIONS)}); upgrade ddk-offline or re-dump"
            )
        expected = _content_checksum(d)
        if d.get("checksum") != expected:
            raise ManifestError(
                f"{source}: checksum mismatch (field 'checksum'): the manifest was edited or "
                "corrupted after it was written, so no shard it lists can be trusted. Undo the edit or restore "
                "manifest.json from a backup; failing that, delete the dump folder and re-run `ddk-offline "
                "dump-teacher` (dump-teacher never writes over an untrusted manifest)"
            )
        for key, typ in (("seq_len", int), ("k", int)):
            _check(isinstance(d.get(key), typ) and d[key] > 0, source, key, "must be a positive integer")
        for key in ("teacher", "tokenizer", "codec", "corpus", "settings"):
            _check(isinstance(d.get(key), dict), source, key, "must be an object")
        _check(isinstance(d["tokenizer"].get("vocab_size"), int), source, "tokenizer.vocab_size", "must be an integer")
        _check_packing(d.get("packing"), version, source)
        _check_optional_records(d, source)
        domains: dict[str, DomainInfo] = {}
        for name, info in d.get("domains", {}).items():
            _check(isinstance(info, dict), source, f"domains.{name}", "must be an object")
            ddir = _safe_relpath(info.get("dir"), source, f"domains.{name}.dir")
            splits = {}
            for split, sinfo in info.get("splits", {}).items():
                _check(split in SPLITS, source, f"domains.{name}.splits.{split}", f"split must be one of {SPLITS}")
                shards = []
                for i, sh in enumerate(sinfo.get("shards", [])):
                    where = f"domains.{name}.splits.{split}.shards[{i}]"
                    try:
                        shard = ShardInfo(**sh)
                    except TypeError as e:
                        raise ManifestError(f"{source}: field {where} is malformed ({e})") from None
                    _safe_relpath(shard.file, source, f"{where}.file")
                    shards.append(shard)
                splits[split] = SplitInfo(shards)
            domains[name] = DomainInfo(name=name, dir=ddir, splits=splits)
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "domains"}
        return cls(**fields, domains=domains)

    def write_atomic(self, directory: str | os.PathLike | Storage) -> None:
        """Write ``directory/manifest.json`` so that a crash leaves either the old or the new file.

        ``directory`` may be a local folder or an fsspec URL / :class:`Storage` (one upload there).
        """
        as_storage(directory).write_bytes_atomic(MANIFEST_NAME, json_bytes(self.to_dict()))

    @classmethod
    def load(cls, directory: str | os.PathLike | Storage) -> Manifest:
        store = as_storage(directory)
        path = store.where(MANIFEST_NAME)
        if not store.isfile(MANIFEST_NAME):
            raise ManifestError(
                f"{path}: no manifest here; is {directory} a dump written by `ddk-offline dump-teacher`?"
            )
        try:
            d = json.loads(store.read_bytes(MANIFEST_NAME).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(
                f"{path}: not valid JSON ({e}); restore it from a backup, or delete the dump folder and re-dump"
            ) from None
        return cls.from_dict(d, source=str(path))


def _content_checksum(d: dict[str, Any]) -> str:
    body = {k: v for k, v in d.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")
    return "sha256:" + hashlib.sha256(canon).hexdigest()


def _check_packing(packing: Any, version: int, source: str) -> None:
    """A BOS id is recorded exactly when the version says so: an older reader must never see BOS rows as v2."""
    _check(packing is None or isinstance(packing, dict), source, "packing", "must be an object")
    bos = (packing or {}).get("bos_token_id")
    _check(bos is None or (isinstance(bos, int) and bos >= 0), source, "packing.bos_token_id", "must be an id or null")
    want_bos = version >= BOS_FORMAT_VERSION
    _check(
        (bos is not None) == want_bos,
        source,
        "packing.bos_token_id",
        f"must be {'an id' if want_bos else 'null'} in a format-{version} dump",
    )


def _check_optional_records(d: dict[str, Any], source: str) -> None:
    """The teacher-matrices record and ``settings.hidden_states``: objects with the fields readers rely on."""
    tm = d.get("teacher_matrices")
    _check(tm is None or isinstance(tm, dict), source, "teacher_matrices", "must be an object")
    if tm is not None:
        _safe_relpath(tm.get("file"), source, "teacher_matrices.file")
        for key in ("sha256", "dtype"):
            _check(isinstance(tm.get(key), str), source, f"teacher_matrices.{key}", "must be a string")
        _check(isinstance(tm.get("head_shape"), list), source, "teacher_matrices.head_shape", "must be [V, D]")
    hs = d["settings"].get("hidden_states")
    _check(hs is None or isinstance(hs, dict), source, "settings.hidden_states", "must be an object")
    if hs is not None:
        _check(isinstance(hs.get("dim"), int) and hs["dim"] > 0, source, "settings.hidden_states.dim", "must be > 0")
        _check(isinstance(hs.get("encoding"), str), source, "settings.hidden_states.encoding", "must be a string")


def _check(ok: bool, source: str, fieldname: str, what: str) -> None:
    if not ok:
        raise ManifestError(
            f"{source}: field '{fieldname}' {what}; restore the manifest from a backup, or delete the dump and re-dump"
        )


def _safe_relpath(p: Any, source: str, fieldname: str) -> str:
    """Paths in a manifest are relative POSIX paths that stay inside the dump directory."""
    _check(isinstance(p, str) and p != "", source, fieldname, "must be a non-empty relative path")
    norm = posixpath.normpath(p)
    if p.startswith(("/", "\\")) or ":" in p or "\\" in p or norm == ".." or norm.startswith("../"):
        raise ManifestError(
            f"{source}: field '{fieldname}' = {p!r} points outside the dump directory; "
            "refusing to read it (a manifest may only name files inside its dump)"
        )
    return norm
