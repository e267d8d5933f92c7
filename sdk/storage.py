"""One writing process per index directory: an exclusive lock on `dir/LOCK`.

A server holds it for its lifetime; `HashIndex.save` holds it while it writes a generation, so a second server, or
a `latenthash index --add` while a server runs, is refused with a clear error instead of overwriting the other's
generations. The lock is the kernel's (flock): it is released when its process dies, so a crash never leaves a
stale lock behind. Within one process the lock is shared (counted), since flock would refuse a second file handle.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from latenthash.errors import StorageUnavailable, storage_error

LOCK_NAME = "LOCK"
_held: dict[str, list] = {}  # resolved directory -> [fd, count]
_guard = threading.Lock()


class DirLock:
    """The exclusive lock of an index directory, held from construction until `release` (or the `with` block's
    end); `DirLock(None)` holds nothing (an index that lives elsewhere, e.g. in Milvus)."""

    def __init__(self, root: str | os.PathLike | None):
        self.key = None if root is None else str(Path(root).resolve())
        if self.key is None:
            return
        with _guard:
            if self.key in _held:
                _held[self.key][1] += 1
                return
            _held[self.key] = [_acquire(Path(self.key)), 1]

    def release(self) -> None:
        if self.key is None:
            return
        with _guard:
            entry = _held.get(self.key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    os.close(entry[0])  # closing the only handle drops the flock
                    del _held[self.key]
        self.key = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _acquire(root: Path) -> int:
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(exc, f"cannot open the index lock {root / LOCK_NAME}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StorageUnavailable(f"the index {root} is in use by another process (pid {owner}): stop it first, or "
                                 f"write to another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
