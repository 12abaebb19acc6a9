"""Where a dump lives: a local folder (plain ``os`` calls) or any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).

Every read and write of a dump (manifest, shards, tokenizer, journal) goes through a :class:`Storage`, so the format
code never asks which one it has. Local paths keep the strongest guarantees: temp file, fsync, ``rename``, fsync of
the folder. On an fsspec filesystem a file is written with one ``put``/``pipe`` call: object stores make a single
object visible all at once (a reader sees the old object or the new one, never half of one), but there is no
rename and no fsync, so the dump relies on *ordering* instead: a shard is uploaded completely before the manifest
that lists it is uploaded. A crash therefore never leaves a listed shard missing; at worst an unlisted shard is
uploaded again by the resumed run.

A string containing ``://`` is a URL (``file://`` included: that goes through fsspec's local filesystem); anything
else is a local path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from ddk_offline.errors import UserError
from ddk_offline.runtime.files import fsync_dir, write_bytes_atomic


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location


class Storage:
    """A dump directory addressed by a local path or an fsspec URL.

    Args:
        location: a local folder, a ``file://`` / ``s3://`` / ``memory://`` ... URL, or a :class:`Storage`.
        storage_options: passed to fsspec (credentials, endpoint, ...) for URLs.
    """

    def __init__(self, location: str | os.PathLike | Storage, **storage_options: Any):
        if isinstance(location, Storage):
            self.fs, self.root, self.local, self.url = location.fs, location.root, location.local, location.url
            return
        if is_url(location):
            import fsspec

            try:
                self.fs, root = fsspec.core.url_to_fs(str(location), **storage_options)
            except (ValueError, ImportError) as e:  # an unknown scheme, or its package is not installed
                scheme = str(location).split("://", 1)[0]
                raise UserError(
                    f"{location}: no filesystem for the scheme '{scheme}://' ({e}). Check the URL; for cloud storage "
                    "install its fsspec package (s3fs for s3://, gcsfs for gs://, adlfs for az://)"
                ) from None
            self.root = root.rstrip("/") or root
            self.local: Path | None = None
            self.url = str(location).rstrip("/")
        else:
            self.fs, self.local = None, Path(location).expanduser()
            self.root = str(self.local)
            self.url = str(self.local)

    # --- names -----------------------------------------------------------------------------------------------
    def where(self, rel: str = "") -> str:
        """The full path or URL of ``rel`` (for messages and for callers that need a name)."""
        if not rel:
            return self.url
        return str(self.local / rel) if self.local is not None else f"{self.url}/{rel}"

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def __truediv__(self, rel: str) -> str:
        return self.where(rel)

    def __str__(self) -> str:
        return self.url

    # --- queries ---------------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return (self.local / rel).exists() if self.local is not None else self.fs.exists(self._p(rel))

    def isfile(self, rel: str) -> bool:
        return (self.local / rel).is_file() if self.local is not None else self.fs.isfile(self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return (self.local / rel).is_dir() if self.local is not None else self.fs.isdir(self._p(rel))

    def size(self, rel: str) -> int:
        return os.path.getsize(self.local / rel) if self.local is not None else int(self.fs.size(self._p(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) in a folder; empty when it does not exist."""
        if self.local is not None:
            folder = self.local / rel
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if not self.fs.isdir(self._p(rel)):
            return []
        return sorted(posix_name(p) for p in self.fs.ls(self._p(rel), detail=False))

    # --- reads -----------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        if self.local is not None:
            return (self.local / rel).read_bytes()
        return self.fs.cat_file(self._p(rel))

    def open_input(self, rel: str) -> str | IO[bytes]:
        """What pyarrow should open: a local path, or a seekable fsspec file object."""
        if self.local is not None:
            return str(self.local / rel)
        return self.fs.open(self._p(rel), "rb")

    def get_dir(self, rel: str, dest: Path) -> Path:
        """A local copy of folder ``rel`` (the folder itself when local): for libraries that read local files."""
        if self.local is not None:
            return self.local / rel
        dest.mkdir(parents=True, exist_ok=True)
        for name in self.listdir(rel):
            (dest / name).write_bytes(self.read_bytes(f"{rel}/{name}"))
        return dest

    # --- writes ----------------------------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        if self.local is not None:
            (self.local / rel).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self._p(rel), exist_ok=True)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` so that readers see the old or the new content (temp + fsync + rename locally)."""
        if self.local is None:
            parent = rel.rpartition("/")[0]
            if parent:
                self.makedirs(parent)
            self.fs.pipe_file(self._p(rel), data)
            return
        write_bytes_atomic(self.local / rel, data)

    def scratch(self) -> Path:
        """A local folder for files being built before :meth:`commit` (inside the dump when it is local)."""
        from ddk_offline.format.schema import TMP_DIR

        if self.local is not None:
            folder = self.local / TMP_DIR
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        return Path(tempfile.mkdtemp(prefix="ddk-offline-"))

    def commit(self, local_file: Path, rel: str) -> None:
        """Move a complete, fsynced local file into place as ``rel`` (rename locally, one upload otherwise)."""
        parent = rel.rpartition("/")[0]
        if parent:
            self.makedirs(parent)
        if self.local is not None:
            os.replace(local_file, self.local / rel)
            fsync_dir((self.local / rel).parent)
            return
        self.fs.put_file(str(local_file), self._p(rel))
        os.unlink(local_file)

    def put_dir(self, local_dir: Path, rel: str) -> None:
        """Upload (or rename, locally) a complete local folder as ``rel``."""
        if self.local is not None:
            os.replace(local_dir, self.local / rel)
            fsync_dir(self.local)
            return
        for p in sorted(local_dir.iterdir()):
            self.commit(p, f"{rel}/{p.name}")
        shutil.rmtree(local_dir, ignore_errors=True)

    def remove(self, rel: str) -> None:
        """Remove a file or a folder tree (missing is fine)."""
        if self.local is not None:
            path = self.local / rel
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
            return
        if self.fs.exists(self._p(rel)):
            self.fs.rm(self._p(rel), recursive=True)


def posix_name(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def as_storage(location: str | os.PathLike | Storage) -> Storage:
    return location if isinstance(location, Storage) else Storage(location)
