"""``dumps verify --repair``: recompute only the broken shards of a dump, from its own corpus and teacher.

The dump's options are rebuilt from its manifest (seq_len, k, temperatures, every ``settings`` field, the corpus
columns, the BOS policy), so a repair cannot change what the other shards mean. The corpus and the teacher are the
ones the manifest names, or ``--data`` / ``--teacher`` when they moved; either way
:func:`ddk_offline.dump.run_dump` re-hashes them (corpus content, teacher config and weights, tokenizer) and a
mismatch is refused before any file is touched. The
broken shards are then unlisted and deleted under the writer lock and recomputed; a repaired shard has the same
bytes as the original (the dump is deterministic per shard). Finally the dump is verified again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ddk_offline.dump.config import DumpConfig, DumpProgress, DumpStats
from ddk_offline.dump.outdir import DumpMismatchError
from ddk_offline.dump.run import run_dump
from ddk_offline.dump.verify import VerifyReport, verify_dump
from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest
from ddk_offline.format.schema import MANIFEST_NAME


class RepairError(UserError):
    """A dump that cannot be repaired with the inputs given; the message says why and what to pass."""


@dataclass
class RepairResult:
    """Before and after: the first verification, the shards recomputed, the final verification."""

    before: VerifyReport
    redone: list[str]
    after: VerifyReport
    stats: DumpStats | None = None


def config_from_manifest(
    manifest: Manifest,
    path: str | Path,
    *,
    data: str | None = None,
    teacher: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> DumpConfig:
    """The :class:`DumpConfig` that wrote ``manifest``, with the corpus and teacher optionally relocated.

    Raises:
        RepairError: the recorded corpus or teacher is not on this machine and no override was given.
    """
    where = Path(path) / MANIFEST_NAME
    corpus, settings = manifest.corpus, manifest.settings
    if data is None:
        data = corpus.get("data")
        if not data or (corpus.get("layout") != "hub" and not _exists(str(data))):
            raise RepairError(
                f"{where}: field 'corpus.data' = {data!r} is not on this machine; pass --data PATH "
                "(the same corpus: its content hash is checked)"
            )
    name = teacher
    if name is None:
        name = manifest.teacher_name
        if manifest.local_teacher() is None:
            raise RepairError(
                f"{where}: field 'teacher.name' = {name!r} is not a path on this machine; pass --teacher PATH or "
                "Hub name (the same teacher: its config and weight hashes are checked)"
            )
    if gguf_file is None and (teacher is None or Path(teacher).expanduser().is_dir()):
        gguf_file = manifest.teacher_gguf_file  # a moved folder still holds the same .gguf file
    return DumpConfig(
        teacher=str(name),
        data=str(data),
        out=str(path),
        text_column=corpus.get("text_column") or "text",
        domain_column=corpus.get("domain_column") or "domain",
        seq_len=manifest.seq_len,
        top_k=manifest.k,
        batch_size=int(settings["batch_size"]),
        val_fraction=float(settings["val_fraction"]),
        max_tokens_per_domain=settings.get("max_tokens_per_domain"),
        dtype=str(settings["dtype"]),
        device=str(settings["device_type"]),
        shard_tokens=int(settings["rows_per_shard"]) * manifest.seq_len,
        extra_temperatures=tuple(manifest.temperatures[1:]),
        trust_remote_code=trust_remote_code,
        gguf_file=gguf_file,
        teacher_backend=str(manifest.teacher.get("backend", "hf")),
        bos=manifest.bos_policy,
        store_hidden_states=manifest.has_hidden_states,
        hidden_encoding=(manifest.hidden_states or {}).get("encoding", DumpConfig.hidden_encoding),
        # A dump that lists teacher matrices gets them rewritten when their file fails verification.
        store_teacher_matrices=manifest.has_teacher_matrices,
        matrices_dtype=(manifest.teacher_matrices or {}).get("dtype", DumpConfig.matrices_dtype),
    )


def repair_dump(
    path: str | Path,
    *,
    data: str | None = None,
    teacher: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    sample_rows: int = 4,
    progress: DumpProgress | None = None,
) -> RepairResult:
    """Verify the dump at ``path``, recompute its broken (and missing) shards, and verify it again.

    Args:
        path: the dump directory.
        data: the corpus, when it is no longer where the manifest says (``corpus.data``).
        teacher: the teacher, when it is no longer where the manifest says (``teacher.name``).
        gguf_file: the GGUF file inside ``teacher`` (default: the manifest's).
        trust_remote_code: allow the teacher's own modelling code.
        sample_rows: rows decoded per shard by the verifications.
        progress: optional progress sink for the recomputation.

    Returns:
        A :class:`RepairResult`; ``result.after.ok`` is true when the dump is whole again.

    Raises:
        RepairError: the manifest itself is broken, the corpus or teacher cannot be found, or they are not the
            ones the dump was made with (nothing is changed in that case).
    """
    root = Path(path)
    before = verify_dump(root, sample_rows=sample_rows)
    if before.manifest is None:
        raise RepairError(
            f"{before.problems[0]}. --repair recomputes shards but needs a trustworthy manifest to know what they are"
        )
    if before.ok:
        return RepairResult(before, [], before)
    redo = sorted(before.broken_shards)
    config = config_from_manifest(
        before.manifest, root, data=data, teacher=teacher, gguf_file=gguf_file, trust_remote_code=trust_remote_code
    )
    try:
        with warnings.catch_warnings():  # "listed but missing or truncated": the report already names them
            warnings.filterwarnings("ignore", message=".*missing or truncated", category=UserWarning)
            result = run_dump(config, progress=progress, redo=frozenset(redo))
    except DumpMismatchError as e:
        raise RepairError(
            f"{root / MANIFEST_NAME}: refusing to repair with inputs the dump was not made with ("
            + "; ".join(e.differences)
            + f"). {_hint(e.differences)} Nothing was changed"
        ) from None
    after = verify_dump(root, sample_rows=sample_rows)
    return RepairResult(before, redo, after, result.stats)


def _hint(differences: list[str]) -> str:
    keys = {d.split(":", 1)[0] for d in differences}
    hints = []
    if any(k.startswith("corpus.") for k in keys):
        hints.append("pass --data with the corpus the dump was made from")
    if any(k.startswith(("teacher.", "tokenizer.")) for k in keys):
        hints.append("pass --teacher with the teacher the dump was made with")
    if any(k.startswith("settings.") for k in keys):
        hints.append("repair on a machine of the recorded device type (settings.device_type)")
    return ("Fix: " + "; ".join(hints) + ".") if hints else ""


def _exists(data: str) -> bool:
    if any(ch in data for ch in "*?["):
        import glob

        return bool(glob.glob(str(Path(data).expanduser())))
    return Path(data).expanduser().exists()
