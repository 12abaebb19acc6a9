"""Durable local files: atomic replace (temp file, fsync, rename, fsync of the folder), checksums, small JSON files.

A crash (or SIGKILL, or a full disk) at any point leaves either the old file or the new one, never half of one, and
no stray temp file where the write itself failed. Remote (fsspec) writes go through
:class:`ddk_offline.format.storage.Storage`, which uses these for its local case.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

#: Bytes read per call when hashing: large sequential reads, a few MiB of memory.
HASH_BLOCK = 1 << 22


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the old file stays, no stray temp file
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    """The JSON text of manifests and other small state files (indented, NaN allowed, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=True).encode("utf-8") + b"\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """:func:`write_bytes_atomic` of :func:`json_bytes`."""
    write_bytes_atomic(path, json_bytes(obj))


def hash_stream(h: Any, f: IO[bytes]) -> int:
    """Feed a binary file object into the hash ``h`` block by block; returns the bytes read."""
    size = 0
    for block in iter(lambda: f.read(HASH_BLOCK), b""):
        h.update(block)
        size += len(block)
    return size


def sha256_file(path: str | os.PathLike, *, fsync: bool = False) -> tuple[str, int]:
    """``(hex sha256, size)`` of a file, streamed; with ``fsync`` the file is also flushed to disk (writers)."""
    h = hashlib.sha256()
    with open(path, "rb+" if fsync else "rb") as f:
        size = hash_stream(h, f)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest(), size
