"""Reading one image's bytes safely: local paths and ``file://`` URIs, and (when allowed) ``http(s)://``.

``read_bytes`` is the only place that touches an image file or the network — for ingestion and for
queries alike — so the safety rules live here:

* local files: size cap (``LOOKALIKE_MAX_BYTES``); only regular files are read, and they are opened first
  with ``O_PATH`` (no side effects: a device's or FIFO's open routine never runs) and checked, then reopened
  through ``/proc/self/fd`` for reading;
* with ``LOOKALIKE_ALLOWED_ROOTS`` set, the real path (symlinks resolved) must lie under a root, and it is
  opened *beneath that root* so that no symlink swapped in since the check (for the file or any parent
  folder) is followed: ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` where the kernel allows it, else
  a walk from the root's descriptor with ``O_NOFOLLOW`` per component; the opened descriptor's real path
  (``/proc/self/fd/N``) is checked against the roots again. A race is refused with a reason, never a raw
  ``OSError``;
* hard links: with roots set, a regular file with more than one link is refused unless
  ``LOOKALIKE_ALLOW_HARDLINKS=1``. A hard link is the same file under another name, so a link planted
  inside a root can name a file outside it and no path check can tell: the other names are not knowable.
  Trees built with hard links (``cp -al``, ``rsync --link-dest``, dedup tools) need the opt-in;
* a path must be text a file system can take: a NUL byte (``file:///a%00b``) or a lone surrogate is refused
  with ``SourceError``, as is anything ``to_path`` cannot turn into a path;
* ``http(s)://`` (only with ``LOOKALIKE_FETCH_URLS=1``): ``search.fetch``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import re
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes, urlsplit

from search.errors import SourceError
from search.fetch import CHUNK, TRANSIENT_HTTP, fetch, too_big

if TYPE_CHECKING:

    from search.config import Settings

__all__ = ["TRANSIENT_ERRNOS", "TRANSIENT_HTTP", "SourceError", "local_path", "read_bytes", "uri_scheme"]


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


# ---------------------------------------------------------------------------------------------- paths


def uri_scheme(uri: str) -> str | None:
    """The lower-cased scheme of ``uri`` (``"file"``, ``"https"``, …), or None for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def to_path(uri: str, base: Path | None = None) -> Path:
    """An absolute local path for a plain path or a ``file://`` URI (``..`` normalised, symlinks kept).

    ``ValueError`` (one line, the reason) for anything that cannot name a local file: another host, a NUL
    byte, a lone surrogate, an unknown ``~user``."""
    if uri_scheme(uri) == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI names another host ({parts.netloc!r}); only local files can be read")
        _check_path_text(parts.path)
        # POSIX paths: percent-decoding is all url2pathname would do; %FF stays the byte 0xFF of the name
        text = os.fsdecode(unquote_to_bytes(parts.path))
    else:
        text = uri
    _check_path_text(text)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~nosuchuser/a.jpg"
        raise ValueError("cannot expand '~' (no such user, or no home folder)") from None
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def _check_path_text(text: str) -> None:
    if "\x00" in text:
        raise ValueError("the path contains a NUL byte")
    try:
        os.fsencode(text)  # what every system call does with it; a lone surrogate fails here
    except UnicodeError:
        raise ValueError("the path is not valid text (a lone surrogate)") from None


def local_path(uri: str) -> Path | None:
    """The local ``Path`` for a path or ``file://`` URI; ``None`` for URLs (http, https or other schemes)."""
    scheme = uri_scheme(uri)
    if scheme is not None and scheme != "file":
        return None
    try:
        return to_path(uri)
    except ValueError:
        return None


OUTSIDE_ROOTS = "outside the allowed roots (LOOKALIKE_ALLOWED_ROOTS)"
_RACE = "symbolic link changed while being read, or a link loop"


def _roots(settings: Settings) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in settings.allowed_roots]


def _root_of(real: Path, roots: Sequence[Path]) -> Path | None:
    return next((root for root in roots if real == root or real.is_relative_to(root)), None)


# ---------------------------------------------------------------------------------------------- read


def read_bytes(uri: str, settings: Settings) -> bytes:
    """The bytes of one image, local or (when allowed) over http(s); ``SourceError`` says why not."""
    scheme = uri_scheme(uri)
    if scheme in ("http", "https"):
        if not settings.fetch_urls:
            raise SourceError(uri, "URL fetching is off; set LOOKALIKE_FETCH_URLS=1")
        return fetch(uri, settings)
    if scheme is not None and scheme != "file":
        raise SourceError(uri, f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)")
    try:
        path = to_path(uri)
    except ValueError as exc:
        raise SourceError(uri, str(exc)) from None
    return _read_local(uri, path, settings)


def _read_local(uri: str, path: Path, settings: Settings) -> bytes:
    fd = _open_local(uri, path, settings)
    chunks: list[bytes] = []
    total = 0
    try:
        st = os.fstat(fd)  # a regular file (checked by _open_local); its size now
        limit = settings.max_bytes
        if st.st_size > limit:
            raise SourceError(uri, too_big(st.st_size, limit))
        # One read of the whole file (+1 byte to notice growth since fstat), then small reads if it grew.
        while chunk := os.read(fd, min(limit + 1 - total, max(CHUNK, st.st_size + 1 - total))):
            total += len(chunk)
            if total > limit:
                raise SourceError(uri, too_big(total, limit))
            chunks.append(chunk)
    except OSError as exc:
        raise os_error(uri, exc) from None
    finally:
        os.close(fd)
    if total == 0:
        raise SourceError(uri, "empty file")
    return b"".join(chunks)


_O_PATH = getattr(os, "O_PATH", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: a FIFO must not hang us; O_NOCTTY: a terminal must not become ours (where O_PATH is missing)
_READ_FLAGS = os.O_RDONLY | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def _pin_flags() -> int:
    """Flags for the first, checking open: O_PATH when the descriptor can be reopened through /proc."""
    return (_O_PATH | _O_CLOEXEC) if _O_PATH and os.path.isdir("/proc/self/fd") else _READ_FLAGS


def _open_local(uri: str, path: Path, settings: Settings) -> int:
    """A descriptor opened for reading on the regular file ``path`` names, under the roots if any are set."""
    roots = _roots(settings)
    pin = _pin_flags()
    if not roots:
        try:
            fd = os.open(path, pin)
        except OSError as exc:
            raise os_error(uri, exc) from None
    else:
        try:
            real = Path(os.path.realpath(path))
        except OSError:  # realpath raises when a link it met is replaced while it reads it
            raise SourceError(uri, _RACE) from None
        root = _root_of(real, roots)
        if root is None:  # before any existence check: say nothing about files outside
            raise SourceError(uri, OUTSIDE_ROOTS)
        fd = _open_beneath(uri, root, real.relative_to(root).parts, pin)
    try:
        if roots and (where := _fd_path(fd)) is not None and _root_of(where, roots) is None:
            raise SourceError(uri, f"{_RACE} (it now lies {OUTSIDE_ROOTS})")
        st = os.fstat(fd)
        _check_file(uri, st)
        if roots and st.st_nlink > 1 and not settings.allow_hardlinks:
            raise SourceError(uri, f"has {st.st_nlink} hard links, and another name may lie outside the allowed "
                                   "roots (set LOOKALIKE_ALLOW_HARDLINKS=1 to read such files)")
        if pin == _READ_FLAGS:
            return fd
        readable = os.open(f"/proc/self/fd/{fd}", _READ_FLAGS)  # the same inode, whatever the path is now
    except OSError as exc:
        os.close(fd)
        raise os_error(uri, exc) from None
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return readable


def _check_file(uri: str, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(uri, "is a directory, not an image file")
    if stat.S_ISLNK(st.st_mode):  # only an O_PATH|O_NOFOLLOW walk opens a link itself: one appeared since
        raise SourceError(uri, _RACE)
    raise SourceError(uri, "not a regular file")


def _fd_path(fd: int) -> Path | None:
    """The real path the kernel holds for ``fd``, or None without /proc."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _open_beneath(uri: str, root: Path, parts: tuple[str, ...], flags: int) -> int:
    """Open ``root/parts…`` (symlink-free components of a real path) with no symlink followed on the way,
    so a folder swapped for a link since ``realpath`` cannot lead out of ``root``."""
    try:
        root_fd = os.open(root, (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | _O_CLOEXEC | _O_NOFOLLOW)
    except OSError as exc:
        raise SourceError(uri, f"the allowed root {root} cannot be opened: {_os_reason(exc)}") from None
    relative = os.path.join(*parts) if parts else "."
    try:
        fd = _openat2(root_fd, relative, flags, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
        if fd is None:  # no openat2 here: walk one component at a time, refusing links
            fd = _walk_beneath(root_fd, parts, flags)
        return fd
    except OSError as exc:
        raise os_error(uri, exc) from None
    finally:
        os.close(root_fd)


def _walk_beneath(root_fd: int, parts: tuple[str, ...], flags: int) -> int:
    current = root_fd
    try:
        for name in parts[:-1]:  # no "..": the parts come from a real path
            step = os.open(name, (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC,
                           dir_fd=current)
            if current != root_fd:
                os.close(current)
            current = step
        return os.open(parts[-1] if parts else ".", flags | _O_NOFOLLOW, dir_fd=current)
    finally:
        if current != root_fd:
            os.close(current)


# openat2(2) (Linux 5.6): resolution confined to a directory, done by the kernel in one call.
_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64 (the new-syscall table is shared)
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_openat2_state: dict[str, object] = {}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2_syscall() -> object | None:
    """libc's ``syscall`` when openat2 works here, else None (another OS or arch, an old kernel, or a
    container whose seccomp filter answers ENOSYS/EPERM). Probed once per process."""
    if "fn" not in _openat2_state:
        fn = None
        if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                candidate = libc.syscall
                candidate.restype = ctypes.c_long
                how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC, 0, 0)
                fd = candidate(_SYS_OPENAT2, -100, b"/", ctypes.byref(how), ctypes.sizeof(how))  # AT_FDCWD
                if fd >= 0:
                    os.close(fd)
                    fn = candidate
        _openat2_state["fn"] = fn
    return _openat2_state["fn"]


def _openat2(dir_fd: int, relative: str, flags: int, resolve: int) -> int | None:
    """``openat2(dir_fd, relative, flags, resolve)``: a descriptor, None when openat2 is unavailable, or
    ``OSError`` (ELOOP when a symlink was met, EXDEV when the path tried to leave ``dir_fd``)."""
    fn = _openat2_syscall()
    if fn is None:
        return None
    how = _OpenHow(flags, 0, resolve)
    name = os.fsencode(relative)
    for _attempt in range(8):
        fd = fn(_SYS_OPENAT2, dir_fd, name, ctypes.byref(how), ctypes.sizeof(how))  # type: ignore[operator]
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:  # EAGAIN: the kernel saw a concurrent rename and asks for a retry
            break
    raise OSError(err, os.strerror(err))


# Local read errors that may pass: the device or network file system hiccuped, the process ran out of
# descriptors or memory for a moment. Everything else (no such file, permission denied…) is permanent.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE,
                              errno.ENFILE, errno.ENOMEM, errno.EBUSY, errno.ENOLCK})


def os_error(uri: str, exc: OSError) -> SourceError:
    """The SourceError for an OSError while reading ``uri`` (transient for the errnos that may pass)."""
    return SourceError(uri, _os_reason(exc), transient=exc.errno in TRANSIENT_ERRNOS)


def _os_reason(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such file",
        errno.EISDIR: "is a directory, not an image file",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: _RACE,
        errno.EXDEV: f"{_RACE} (the path led {OUTSIDE_ROOTS})",
        errno.ENOTDIR: "no such file (a parent is not a folder)",
        errno.ENAMETOOLONG: "the path is too long",
    }
    return reasons.get(exc.errno or -1, f"cannot read: {exc.strerror or exc}")
