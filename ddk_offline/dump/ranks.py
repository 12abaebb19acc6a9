"""How the ranks of a ``torchrun`` dump cooperate: preparing ``--out``, the shard journal, the shared manifest,
the summed stats.

Shard journal: how ranks other than 0 report finished shards, crash-safely.

Under ``torchrun`` only rank 0 writes ``manifest.json``. Every other rank, after a shard is durable under its final
name, writes one small JSON entry ``.tmp/journal/<shard>.json`` (atomically). Rank 0 merges the entries into the
manifest after the final barrier, and every run merges leftover entries before it cleans ``.tmp/``, so the shards
of a rank that died (or of a job killed before its end) are kept by the rerun instead of being recomputed. An
entry is accepted only under the rule that keeps manifest-listed shards: the file exists with the recorded size.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

from ddk_offline.dump import outdir
from ddk_offline.format.manifest import Manifest, ShardInfo
from ddk_offline.format.schema import TMP_DIR
from ddk_offline.format.storage import Storage, as_storage
from ddk_offline.runtime import distributed
from ddk_offline.runtime.files import json_bytes

JOURNAL_DIR = f"{TMP_DIR}/journal"


def record(out: Path | Storage, domain: str, split: str, info: ShardInfo) -> None:
    """Note a durable shard for rank 0 (called on the writer thread of a rank other than 0)."""
    store = as_storage(out)
    store.makedirs(JOURNAL_DIR)
    entry = {"domain": domain, "split": split, "shard": asdict(info)}
    store.write_bytes_atomic(f"{JOURNAL_DIR}/{info.file.replace('/', '__')}.json", json_bytes(entry))


def merge(manifest: Manifest, out: Path | Storage) -> list[str]:
    """Add journalled shards that the manifest does not list yet and whose file is intact; returns their files.

    Entries are left in place (the caller's ``clean_tmp`` removes them once the manifest is written).
    """
    store = as_storage(out)
    added = []
    for name in store.listdir(JOURNAL_DIR):
        try:
            entry = json.loads(store.read_bytes(f"{JOURNAL_DIR}/{name}").decode("utf-8"))
            info = ShardInfo(**entry["shard"])
            split = manifest.domains[entry["domain"]].splits[entry["split"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn or foreign entry: its shard is simply recomputed
        if any(s.first_seq == info.first_seq for s in split.shards):
            continue
        if store.isfile(info.file) and store.size(info.file) == info.bytes:
            split.shards.append(info)
            split.shards.sort(key=lambda s: s.first_seq)
            added.append(info.file)
    return added


def share_manifest(
    env: distributed.DistEnv, manifest: Manifest | None, out: Storage, error: type[Exception]
) -> Manifest:
    """Rank 0's manifest on every rank (rank 0 sends it; a failure on rank 0 was sent as an error instead)."""
    if not env.active:
        return manifest
    if env.is_main:
        distributed.broadcast_object(env, ("ok", manifest.to_dict()))
        return manifest
    kind, body = distributed.broadcast_object(env)
    if kind == "error":
        raise error(body)
    return Manifest.from_dict(body, source=str(out / "manifest.json"))


def sum_stats(per_rank: list):
    """One :class:`DumpStats` for the whole job: counts and forward seconds summed, wall times of the slowest rank."""
    if len(per_rank) == 1:
        return per_rank[0]
    total = type(per_rank[0])(world=len(per_rank))
    for s in per_rank:
        total.forward_s += s.forward_s
        total.shards_written += s.shards_written
        for name, n in s.tokens.items():
            total.tokens[name] = total.tokens.get(name, 0) + n
    for key in ("prepass_s", "load_s", "check_s", "loop_s"):
        setattr(total, key, max(getattr(s, key) for s in per_rank))
    total.shards_kept = per_rank[0].shards_kept
    return total


def _unusable_out(out: Storage, e: OSError) -> outdir.DumpDirError:
    return outdir.DumpDirError(
        f"--out {out}: cannot create the folder ({e.strerror}: {e.filename}); choose another --out"
    )


def prepare_out(
    out: Storage, wanted: Manifest, tokenizer, held: contextlib.ExitStack, redo: frozenset[str] = frozenset()
) -> tuple[Manifest, bool]:
    """Rank 0 (or the only process): check or create ``out``, take its lock (held until ``held`` closes), and write
    the manifest to continue. Listed shards named in ``redo`` are unlisted and deleted, so the run recomputes them.

    Returns:
        The manifest (earlier shards kept, journalled shards merged) and whether this run created ``out``.
    """
    existing = outdir.existing_manifest(out)
    if existing is not None:
        outdir.compare(existing, wanted, out)
    if out.local is not None:
        try:
            out.local.parent.mkdir(parents=True, exist_ok=True)
            out.local.mkdir()
            created = True
        except FileExistsError as e:
            if e.filename != str(out.local):  # a file where one of the parent folders should be
                raise _unusable_out(out, e) from None
            created = False
        except (NotADirectoryError, PermissionError) as e:
            raise _unusable_out(out, e) from None
    else:
        created = not out.exists()
        out.makedirs()
    try:
        held.enter_context(outdir.DumpLock(out))  # a refused second writer never touches the folder
        manifest = outdir.open_manifest(out, wanted)
        merge(manifest, out)  # shards of ranks of an earlier run that stopped before its end
        outdir.forget_shards(manifest, out, set(redo))
        manifest.complete = False
        manifest.write_atomic(out)
        outdir.clean_tmp(out)
        outdir.save_tokenizer(tokenizer, out)
    except BaseException:
        if created:
            out.remove("")
        raise
    return manifest, created
