"""The dump directory's safety rules: one writer (a lock), no mixing of dumps, resume bookkeeping.

- Lock: ``.lock`` is held with ``fcntl.flock`` for the whole run. The kernel releases it when the process dies
  (even by SIGKILL), so a crashed dump never leaves a stale lock; a second live writer is refused. Object stores
  (fsspec URLs) have no such lock: there one writer per dump is the user's rule (docs/SCALING.md).
- Every function takes the dump as a local path or a :class:`~ddk_offline.format.storage.Storage` (fsspec URLs).
- Mixing: a directory that already holds a dump is reused only when everything that determines the stored bytes
  matches (teacher and tokenizer hashes, seq_len, k, codec, corpus content hash, settings); otherwise the run is
  refused with the list of differences.
- Resume: a shard listed in the manifest is kept when its file exists with the recorded size; anything else is
  recomputed. Stale temporary files of dead writers in ``.tmp/`` are removed (only while holding the lock).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
import warnings
from pathlib import Path

from ddk_offline.errors import UserError
from ddk_offline.format.manifest import Manifest
from ddk_offline.format.schema import LOCK_NAME, MANIFEST_NAME, SPLITS, TMP_DIR, TOKENIZER_DIR
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.runtime.lock import FolderLock

# Files a run may leave before its first manifest write; a directory holding only these counts as empty.
_OWN_LEFTOVERS = {LOCK_NAME, TMP_DIR, TOKENIZER_DIR}
# Temp files of write_json_atomic (".manifest.json.tmp-<pid>") left by a writer killed mid-write.
_JSON_TMP = re.compile(r"^\.(manifest|dump_config)\.json\.tmp-\d+$")


class DumpDirError(UserError):
    """The output directory cannot be used for this dump; the message says why and what to do."""


class DumpMismatchError(DumpDirError):
    """The directory holds a dump made with other inputs; ``differences`` lists ``"field: old vs new"`` lines."""

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


class DiskFullError(UserError):
    """The disk filled up mid-dump; complete shards are kept and a rerun resumes once space is back."""


class DumpLock(FolderLock):
    """The dump folder's writer lock on ``<dir>/.lock`` (see :mod:`ddk_offline.runtime.lock`; a no-op on URLs)."""

    def __init__(self, directory: Path | Storage):
        local = as_storage(directory).local
        path = local / LOCK_NAME if local is not None else None
        super().__init__(
            path,
            lambda holder: DumpDirError(
                f"{path}: another dump-teacher (pid {holder}) is writing to {path.parent}; "
                "wait for it to finish, or use another --out"
            ),
        )


def refuse_out_in_corpus(out: Storage, corpus_folders: list[Path]) -> None:
    """Refuse an ``--out`` inside a folder the corpus reads: the next run (a resume, a repair) would read the dump's
    own shards and tokenizer as corpus text, so the dump could never be resumed or repaired."""
    if out.local is None:
        return
    target = out.local.resolve()
    for folder in corpus_folders:
        if target == folder or folder in target.parents:
            raise DumpDirError(
                f"--out {out.local}: inside the corpus folder {folder} that --data reads, so a rerun would read the "
                "dump as corpus text; put --out outside that folder"
            )


def existing_manifest(out: Path | Storage) -> Manifest | None:
    """The manifest of a dump already in ``out``, None when ``out`` is absent or holds only our leftovers.

    Raises:
        DumpDirError: ``out`` is a file, or a non-empty folder that is not a dump.
        ManifestError: ``out/manifest.json`` exists but cannot be trusted.
    """
    store = as_storage(out)
    if not store.exists():
        return None
    if not store.isdir():
        raise DumpDirError(f"--out {out}: exists and is not a folder; choose another --out")
    if store.isfile(MANIFEST_NAME):
        return Manifest.load(store)
    others = [name for name in store.listdir() if name not in _OWN_LEFTOVERS and not _JSON_TMP.match(name)]
    if others:
        raise DumpDirError(
            f"--out {out}: the folder is not empty and holds no dump (found {others[:5]}); "
            "choose another --out or an empty folder"
        )
    return None


def peek_manifest(out: Path | Storage | str) -> Manifest | None:
    """The manifest of a dump already in ``out``, read without the lock; None when there is none or it is unusable.

    Only for choices that must precede the pre-pass (the BOS policy of a resumed dump): :func:`open_manifest`
    reads it again under the lock, and refuses it there with the reason when it cannot be trusted.
    """
    try:
        return existing_manifest(as_storage(out))
    except (UserError, ValueError, OSError):
        return None


def compare(existing: Manifest, wanted: Manifest, out: Path) -> None:
    """Refuse to continue a dump made with anything that changes the stored bytes.

    Raises:
        DumpDirError: listing every difference, the file, and the fix.
    """
    have, want = existing.identity(), wanted.identity()
    diffs = [
        f"{key}: {have.get(key)!r} in the dump vs {want.get(key)!r} now" for key in want if have.get(key) != want[key]
    ]
    if diffs:
        # A changed corpus is the one difference a user can undo to resume the dump they already paid for.
        corpus_changed = any(d.startswith("corpus") for d in diffs)
        restore = " To resume it, restore the corpus it was made from." if corpus_changed else ""
        raise DumpMismatchError(
            f"{out / MANIFEST_NAME}: this folder holds a different dump ({'; '.join(diffs)}).{restore} "
            f"Use another --out, or delete {out} to start over",
            diffs,
        )


def keep_valid_shards(manifest: Manifest, out: Path | Storage) -> list[str]:
    """Drop manifest shards whose file is missing or has the wrong size; returns the dropped files."""
    store = as_storage(out)
    dropped = []
    for info in manifest.domains.values():
        for split in info.splits.values():
            kept = []
            for shard in split.shards:
                if store.isfile(shard.file) and store.size(shard.file) == shard.bytes:
                    kept.append(shard)
                else:
                    dropped.append(shard.file)
            split.shards = kept
    return dropped


def forget_shards(manifest: Manifest, out: Path | Storage, files: set[str]) -> list[str]:
    """Unlist the shards whose ``file`` is in ``files`` and delete those files, so the run recomputes them.

    ``dumps verify --repair`` passes the shards that failed verification (a flipped bit keeps the size, so
    :func:`keep_valid_shards` alone would keep them). Call only while holding the lock.

    Returns:
        The files unlisted.
    """
    store = as_storage(out)
    forgotten = []
    for info in manifest.domains.values():
        for split in info.splits.values():
            for shard in [s for s in split.shards if s.file in files]:
                split.shards.remove(shard)
                store.remove(shard.file)
                forgotten.append(shard.file)
    return forgotten


def disk_full_error(exc: BaseException, out: Path | Storage, removed: bool) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``exc`` when it is ENOSPC / EDQUOT (else None).

    Args:
        exc: what the dump raised (on the writer thread or the main thread).
        out: the dump directory.
        removed: the run created ``out`` and removed it again (nothing to resume).
    """
    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    if removed:
        state = f"nothing was kept ({out} was removed again)"
    else:
        try:
            kept = sum(len(s.shards) for d in Manifest.load(out).domains.values() for s in d.splits.values())
        except Exception:  # noqa: BLE001 - a report of the failure must not fail itself
            kept = "the complete"
        state = f"{kept} complete shard(s) are kept in {out} and no partial shard is listed"
    return DiskFullError(
        f"--out {out}: the disk is full ({exc.strerror or exc}); {state}. Free space on that disk (or use another "
        "--out) and rerun the same command: it resumes where it stopped"
    )


def clean_tmp(out: Path | Storage) -> None:
    """Remove temporary files of earlier (dead) writers (``.tmp/``, JSON temp files); call only under the lock."""
    store = as_storage(out)
    for name in store.listdir():
        if _JSON_TMP.match(name):
            store.remove(name)
    for name in store.listdir(TMP_DIR):
        store.remove(f"{TMP_DIR}/{name}")


def save_tokenizer(tokenizer, out: Path | Storage) -> None:
    """Save the teacher tokenizer to ``out/tokenizer`` once (temp folder + rename, so it is never half written)."""
    store = as_storage(out)
    if store.isdir(TOKENIZER_DIR):
        return
    scratch = store.scratch()
    tmp = scratch / f"tokenizer.{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    store.put_dir(tmp, TOKENIZER_DIR)
    if store.local is None:
        shutil.rmtree(scratch, ignore_errors=True)


def open_manifest(out: Path | Storage, wanted: Manifest) -> Manifest:
    """The manifest to continue (re-read under the lock: another run may have written since the first check)."""
    existing = existing_manifest(out)
    if existing is None:
        return wanted
    compare(existing, wanted, out)
    existing.teacher, existing.corpus = wanted.teacher, wanted.corpus  # same hashes; paths may have moved
    dropped = keep_valid_shards(existing, out)
    if dropped:
        warnings.warn(
            f"{out}: {len(dropped)} shard(s) listed but missing or truncated, recomputing: {dropped[:3]}", stacklevel=2
        )
    return existing


# The dump's own entries (a domain folder must never be one of them, in any letter case) and the longest folder
# name a domain gets (file systems allow 255 bytes; the shard names below it are short).
_RESERVED = {n.lower() for n in (MANIFEST_NAME, TOKENIZER_DIR, TMP_DIR, LOCK_NAME, "dump_config.json")}
_MAX_DIR = 64


def domain_dirs(names: list[str]) -> dict[str, str]:
    """Folder name per domain: the name with unsafe characters replaced; a hash suffix on any change or collision.

    A name that is not a safe folder name as it stands (other characters, a leading dot, longer than 64 bytes, one
    of the dump's own files such as ``manifest.json``, or equal to another domain's folder up to case) gets
    ``<safe prefix>-<8 hex of sha256(name)>``; the manifest maps names to folders, so readers never guess.
    """
    dirs: dict[str, str] = {}
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "domain"
        taken = {d.lower() for d in dirs.values()} | _RESERVED
        if slug != name or len(slug) > _MAX_DIR or slug.lower() in taken:
            slug = f"{slug[:_MAX_DIR].rstrip('.')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        dirs[name] = slug
    return dirs


def missing_shards(manifest: Manifest, rows_per_shard: int) -> dict[tuple[str, str], set[int]]:
    """Shard indices still missing per (domain, split): the work items of this run."""
    todo = {}
    for name, info in manifest.domains.items():
        for split in SPLITS:
            n_shards = math.ceil(manifest.planned_sequences(name, split) / rows_per_shard)
            have = {s.first_seq // rows_per_shard for s in info.splits[split].shards}
            todo[(name, split)] = set(range(n_shards)) - have
    return todo


def check_finished(manifest: Manifest, out: Path | Storage) -> None:
    """Every planned sequence is in a listed shard (guards the loop's bookkeeping before ``complete = true``)."""
    for name, info in manifest.domains.items():
        for split in SPLITS:
            want = manifest.planned_sequences(name, split)
            have = info.splits[split].sequences
            if have != want:
                raise RuntimeError(f"internal: {out}: {name}/{split} holds {have} sequences, planned {want}")
