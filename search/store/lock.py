"""One process per embedded data dir: the ``fcntl`` lock file, and the process-wide registry of open
embedded stores with its fork and exit handling.

The lock (``<data_dir>/qdrant/.lock``, holding the owner's PID) is taken *before* a shard is opened: a second
opener that fails on the engine's WAL lock breaks the first handle's next ``flush()``.

The lock file is written (truncated, then our PID), so it is opened without following a symlink and must be
a regular file with one link: a link planted in its place would otherwise have its target truncated.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from search.errors import StoreError, StoreLocked, printable

if TYPE_CHECKING:
    from search.store.base import Store

LOCK_FILE = ".lock"


class _DirLock:
    """An exclusive flock on ``<root>/.lock`` shared (ref-counted) by every store of this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.refs = 0
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                pid = _read_pid(fd)
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise StoreLocked(_locked_message(self.path.parent, pid)) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
        self.refs += 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor: created if missing, never through a symlink, never truncated here (the
    owner's PID must stay readable to a second opener), and only a regular file with one link."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO planted there must not hang the open
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        reason = "it is a symbolic link" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise StoreError(f"cannot use the lock file {printable(path)}: {reason}; remove it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
        raise StoreError(f"cannot use the lock file {printable(path)}: it {what}; remove it")
    return fd


def _read_pid(fd: int) -> str:
    """The PID the owner wrote, read through our own descriptor (not the path, which may have changed)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _locked_message(root: Path, pid: str) -> str:
    return (f"the store at {printable(root)} is in use by PID {pid}; stop that process or use a Qdrant server "
            f"(LOOKALIKE_QDRANT_URL) for concurrent access")


class _Registry:
    """This process's open embedded stores (one per collection folder) and data-dir locks. An object rather
    than module globals so that the fork handler can replace the mutex for every module that holds it."""

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.locks: dict[Path, _DirLock] = {}
        self.stores: dict[Path, Store] = {}
        self.orphans: list[Store] = []  # a forked child's copies of the parent's stores, kept alive: see below

    def release(self, lock: _DirLock) -> None:
        """Drop one reference to ``lock``; forget it once nobody holds it."""
        lock.release()
        if lock.refs <= 0:
            self.locks.pop(lock.path, None)


REGISTRY = _Registry()


def _forget_after_fork() -> None:
    """In a forked child the parent's handles are not ours: unregister them without closing the shards
    (closing, or letting them be freed, could write to files the parent still uses) and close our copy of
    the lock descriptor (the parent keeps the lock). Using such a handle raises StoreError."""
    REGISTRY.mutex = threading.RLock()  # another thread may have held it at the fork
    for lock in REGISTRY.locks.values():
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None
    REGISTRY.orphans.extend(REGISTRY.stores.values())
    REGISTRY.locks.clear()
    REGISTRY.stores.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_all() -> None:
    for store in list(REGISTRY.stores.values()):
        with contextlib.suppress(Exception):
            store._refs = 1
            store.close()
