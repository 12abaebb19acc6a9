"""One writer per folder: an exclusive, non-blocking ``flock`` held for a run's life.

The kernel releases the lock when the process dies, even by SIGKILL, so a crashed run never leaves a stale lock
behind; a second live writer is refused at once with the first one's pid. Phase one locks a dump folder, phase two
a run folder. Windows has no advisory locks: there a second writer is not detected.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ddk_offline.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class FolderLock:
    """``flock`` on the file ``path`` (created if missing); a context manager, and a no-op when ``path`` is None.

    Args:
        path: the lock file (None: nothing to lock, e.g. an object store).
        refusal: builds the error for a lock held by another process, from that process's pid (as text).
    """

    def __init__(self, path: Path | None, refusal: Callable[[str], UserError]):
        self.path, self.refusal = path, refusal
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ``refusal(pid of the holder)``."""
        if self.path is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise self.refusal(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go (closing the file releases the flock); a no-op when it is not held."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
