"""Where images come from: folders, manifests and single files become ``ImageRef``s; ``read_bytes`` reads one.

``iter_refs`` turns command-line paths into references, reporting bad entries through ``on_error`` and
going on. ``read_bytes`` is the only place that touches a file or the network, so the safety rules live
here:

* local files: size cap (``LOOKALIKE_MAX_BYTES``); with ``LOOKALIKE_ALLOWED_ROOTS`` set, the real path
  (symlinks resolved) must lie under a root, and the file opened is that real path, never a FIFO or device;
* ``http(s)://`` (only with ``LOOKALIKE_FETCH_URLS=1``): every address the host name resolves to must be
  a public one; the connection goes to the address that was checked (no DNS rebinding between check and
  connect), redirects are followed by hand (at most 3), each target checked again, the body streamed under
  the size cap and the whole fetch bounded by ``LOOKALIKE_FETCH_TIMEOUT``. Proxy variables are ignored: the
  address check would be meaningless through a proxy.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import ipaddress
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from search.errors import SourceError

if TYPE_CHECKING:
    import http.client

    from search.config import Settings

__all__ = ["IMAGE_EXTENSIONS", "ImageRef", "SourceError", "iter_refs", "local_path", "read_bytes"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".csv", ".jsonl", ".ndjson"})
MAX_REDIRECTS = 3

# Test-only escape hatch: lets the fetch tests talk to an http.server on 127.0.0.1. Only loopback is
# unlocked (private, link-local etc. stay refused). Never set it outside tests.
_allow_loopback_for_tests = False

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CHUNK = 64 * 1024
_USER_AGENT = "lookalike/0.1 (+image ingest)"
OnError = Callable[[str, str], None]


@dataclass(frozen=True)
class ImageRef:
    """One image to ingest: where it is, the labels the user gave it, and which source it came from."""

    uri: str  # absolute local path (str) or http(s) URL
    labels: tuple[str, ...] = ()
    source: str | None = None


# ---------------------------------------------------------------------------------------------- refs


def iter_refs(
    paths: Iterable[str | Path],
    *,
    labels_from_dirs: bool = False,
    source: str | None = None,
    on_error: OnError | None = None,
) -> Iterator[ImageRef]:
    """Yield an ``ImageRef`` for every image named by ``paths``, in a deterministic order.

    Each path is one of:

    * a folder: walked recursively, files with an image extension (any case) yielded in sorted path order;
      names starting with ``.`` are skipped, symlinked folders followed once (loops are safe);
    * a manifest, ``.csv`` with a header naming a ``uri`` column (optional ``labels``, ``|``-separated, and
      ``source``) or ``.jsonl`` lines ``{"uri": ..., "labels": [...], "source": ...}``; relative uris are
      resolved against the manifest's folder, http(s) URLs are passed through;
    * an http(s) URL or any other file: yielded as a single image (decoding decides whether it is one).

    ``labels_from_dirs`` adds the image's parent folder name as a label (ImageFolder layout: root/class/img).
    A missing path or bad manifest row calls ``on_error(location, reason)`` (location like
    ``"/data/m.csv:17"``) and iteration goes on; without ``on_error`` a ``SourceError`` is raised instead.
    """

    def report(location: str, reason: str) -> None:
        if on_error is None:
            raise SourceError(location, reason)
        on_error(location, reason)

    for raw in paths:
        text = os.fspath(raw)
        scheme = _scheme(text)
        if scheme in ("http", "https"):
            yield ImageRef(text, (), source)
            continue
        if scheme is not None and scheme != "file":
            report(text, f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)")
            continue
        try:
            path = _to_path(text)
        except ValueError as exc:
            report(text, str(exc))
            continue
        if path.is_dir():
            for file in _walk(path, report):
                yield _ref(file, (), source, labels_from_dirs)
        elif path.is_file():
            if path.suffix.lower() in MANIFEST_EXTENSIONS:
                yield from _read_manifest(path, source, labels_from_dirs, report)
            else:
                yield _ref(path, (), source, labels_from_dirs)
        elif path.is_symlink():
            report(str(path), "broken symbolic link")
        elif path.exists():
            report(str(path), "not a regular file or folder")
        else:
            report(str(path), "no such file or directory")


def _ref(path: Path, labels: Iterable[str], source: str | None, labels_from_dirs: bool) -> ImageRef:
    label_list = list(labels)
    if labels_from_dirs and path.parent.name:
        label_list.append(path.parent.name)
    return ImageRef(str(path), _clean_labels(label_list), source)


def _clean_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Strip, drop empties, de-duplicate keeping the first occurrence."""
    return tuple(dict.fromkeys(s for s in (label.strip() for label in labels) if s))


def _walk(root: Path, report: OnError) -> Iterator[Path]:
    """Image files under ``root`` in sorted order; follows symlinked folders, each real folder once."""
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:  # a symlink loop, or the same folder reached twice: walk it once
                return
            seen.add(key)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            report(str(folder), f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                report(str(path), f"cannot stat: {exc.strerror or exc}")
                continue
            if is_dir:
                yield from visit(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                if is_file:
                    yield path
                elif entry.is_symlink():
                    report(str(path), "broken symbolic link")

    yield from visit(Path(os.path.abspath(root)))


def _read_manifest(manifest: Path, source: str | None, labels_from_dirs: bool, report: OnError) -> Iterator[ImageRef]:
    base = manifest.parent.absolute()
    try:
        # utf-8-sig: spreadsheets often write a BOM before the header
        with manifest.open(encoding="utf-8-sig", newline="") as fh:
            if manifest.suffix.lower() == ".csv":
                rows = _csv_rows(manifest, fh, report)
            else:
                rows = _jsonl_rows(manifest, fh, report)
            for location, uri, labels, row_source in rows:
                ref = _manifest_ref(uri, labels, row_source or source, base, labels_from_dirs)
                if isinstance(ref, str):
                    report(location, ref)
                else:
                    yield ref
    except UnicodeDecodeError as exc:
        report(str(manifest), f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        report(str(manifest), f"cannot read manifest: {exc.strerror or exc}")


_Row = tuple[str, str, list[str], str | None]


def _csv_rows(manifest: Path, fh: Iterable[str], report: OnError) -> Iterator[_Row]:
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        report(f"{manifest}:1", f"bad CSV header: {exc}")
        return
    columns = [c.strip().lower() for c in header or []]
    if "uri" not in columns:
        report(str(manifest), "no `uri` column in the CSV header")
        return
    col_uri = columns.index("uri")
    col_labels = columns.index("labels") if "labels" in columns else None
    col_source = columns.index("source") if "source" in columns else None

    def cell(row: list[str], col: int | None) -> str:
        return row[col].strip() if col is not None and col < len(row) else ""

    while True:
        line_before = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit(), a NUL byte
            report(f"{manifest}:{reader.line_num}", f"bad CSV row: {exc}")
            if reader.line_num == line_before:
                return  # the reader cannot move past it
            continue
        location = f"{manifest}:{reader.line_num}"
        if not any(c.strip() for c in row):
            continue  # blank line
        uri = cell(row, col_uri)
        if not uri:
            report(location, "empty `uri`")
            continue
        yield location, uri, cell(row, col_labels).split("|"), cell(row, col_source) or None


def _jsonl_rows(manifest: Path, fh: Iterable[str], report: OnError) -> Iterator[_Row]:
    for number, line in enumerate(fh, start=1):
        location = f"{manifest}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report(location, f"invalid JSON: {exc.msg}")
            continue
        if not isinstance(record, dict):
            report(location, "expected a JSON object with a `uri`")
            continue
        uri, labels, row_source = record.get("uri"), record.get("labels", []), record.get("source")
        if not isinstance(uri, str) or not uri.strip():
            report(location, "missing or empty `uri` (must be a string)")
            continue
        if isinstance(labels, str):
            labels = labels.split("|")
        if labels is None:
            labels = []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            report(location, "`labels` must be a list of strings")
            continue
        if row_source is not None and not isinstance(row_source, str):
            report(location, "`source` must be a string")
            continue
        yield location, uri.strip(), labels, row_source or None


def _manifest_ref(
    uri: str, labels: list[str], source: str | None, base: Path, labels_from_dirs: bool
) -> ImageRef | str:
    """The ref for one manifest row, or the reason it is refused."""
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        return ImageRef(uri, _clean_labels(labels), source)
    if scheme is not None and scheme != "file":
        return f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)"
    try:
        path = _to_path(uri, base)
    except ValueError as exc:
        return str(exc)
    return _ref(path, labels, source, labels_from_dirs)


# ---------------------------------------------------------------------------------------------- paths


def _scheme(uri: str) -> str | None:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def _to_path(uri: str, base: Path | None = None) -> Path:
    """An absolute local path for a plain path or a ``file://`` URI (``..`` normalised, symlinks kept)."""
    if _scheme(uri) == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI names another host ({parts.netloc!r}); only local files can be read")
        text = unquote(parts.path)  # POSIX paths: percent-decoding is all url2pathname would do
    else:
        text = uri
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def local_path(uri: str) -> Path | None:
    """The local ``Path`` for a path or ``file://`` URI; ``None`` for URLs (http, https or other schemes)."""
    scheme = _scheme(uri)
    if scheme is not None and scheme != "file":
        return None
    try:
        return _to_path(uri)
    except ValueError:
        return None


def _check_roots(uri: str, real: Path, settings: Settings) -> None:
    roots = [Path(r).expanduser().resolve() for r in settings.allowed_roots]
    if roots and not any(real == root or real.is_relative_to(root) for root in roots):
        raise SourceError(uri, "outside the allowed roots (LOOKALIKE_ALLOWED_ROOTS)")


# ---------------------------------------------------------------------------------------------- read


def read_bytes(uri: str, settings: Settings) -> bytes:
    """The bytes of one image, local or (when allowed) over http(s); ``SourceError`` says why not."""
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        if not settings.fetch_urls:
            raise SourceError(uri, "URL fetching is off; set LOOKALIKE_FETCH_URLS=1")
        return _fetch(uri, settings)
    if scheme is not None and scheme != "file":
        raise SourceError(uri, f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)")
    try:
        path = _to_path(uri)
    except ValueError as exc:
        raise SourceError(uri, str(exc)) from None
    return _read_local(uri, path, settings)


def _read_local(uri: str, path: Path, settings: Settings) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not hang us
    if settings.allowed_roots:
        real = Path(os.path.realpath(path))
        _check_roots(uri, real, settings)  # before any existence check: say nothing about files outside
        # Open the checked real path, refusing a symlink swapped in since (a race with the check).
        path, flags = real, flags | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SourceError(uri, _os_reason(exc)) from None
    chunks: list[bytes] = []
    total = 0
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(uri, "is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(uri, "not a regular file")
        limit = settings.max_bytes
        if st.st_size > limit:
            raise SourceError(uri, _too_big(st.st_size, limit))
        # One read of the whole file (+1 byte to notice growth since fstat), then small reads if it grew.
        while chunk := os.read(fd, min(limit + 1 - total, max(_CHUNK, st.st_size + 1 - total))):
            total += len(chunk)
            if total > limit:
                raise SourceError(uri, _too_big(total, limit))
            chunks.append(chunk)
    except OSError as exc:
        raise SourceError(uri, _os_reason(exc)) from None
    finally:
        os.close(fd)
    if total == 0:
        raise SourceError(uri, "empty file")
    return b"".join(chunks)


def _os_reason(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such file",
        errno.EISDIR: "is a directory, not an image file",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "symbolic link changed while being read, or a link loop",
        errno.ENOTDIR: "no such file (a parent is not a folder)",
    }
    return reasons.get(exc.errno or -1, f"cannot read: {exc.strerror or exc}")


def _too_big(size: int, limit: int) -> str:
    return f"too large: {size / 1e6:.1f} MB exceeds the {limit / 1e6:g} MB limit (LOOKALIKE_MAX_BYTES)"


# ---------------------------------------------------------------------------------------------- fetch


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a seam the tests replace to stay off the network)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _refused_address(address: str) -> str | None:
    """Why ``address`` may not be fetched from, or None when it is a public (global) address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "unparseable"
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address wrapped in IPv6 (mapped, 6to4, Teredo, NAT64) is judged as that IPv4 address.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and (reason := _refused_address(str(embedded))):
            return reason
    if ip.is_loopback:
        return None if _allow_loopback_for_tests else "loopback"
    for kind in ("unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")  # e.g. "private", "link-local"
    if not ip.is_global:
        return "non-public"
    return None


def _vetted_target(uri: str, url: str) -> tuple[str, str, int, str, list[str]]:
    """(scheme, host, port, path+query, addresses) for ``url``, every resolved address public; else raise.

    ``uri`` is what the caller asked for (named in errors); ``url`` differs from it after a redirect.
    """
    hop = "" if url == uri else f" (redirected to {url})"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SourceError(uri, f"invalid URL: {exc}{hop}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceError(uri, f"unsupported URI scheme {scheme!r} (only http and https are fetched){hop}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise SourceError(uri, f"URL has no host{hop}")
    if parts.username is not None or parts.password is not None:
        raise SourceError(uri, f"credentials in URLs are not supported{hop}")
    port = port or (443 if scheme == "https" else 80)
    # RFC 6761: these names are loopback by definition; refuse without asking a resolver.
    if (host.lower() == "localhost" or host.lower().endswith(".localhost")) and not _allow_loopback_for_tests:
        raise SourceError(uri, f"refused: {host} is a loopback address{hop}")
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise SourceError(uri, f"cannot resolve host {host!r}: {exc}{hop}") from None
    if not addresses:
        raise SourceError(uri, f"cannot resolve host {host!r}{hop}")
    for address in addresses:
        if reason := _refused_address(address):
            what = host if address == host else f"{host} resolves to {address}, which"
            raise SourceError(uri, f"refused: {what} is a {reason} address; only public addresses are fetched{hop}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, target, addresses


def _connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to ``address`` (already vetted) that still speaks to ``host`` (Host, SNI, cert)."""
    import http.client
    import ssl

    class Pinned(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.create_connection((address, self.port), self.timeout)

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            self.sock = socket.create_connection((address, self.port), self.timeout)  # visible to the watchdog
            self.sock = context.wrap_socket(self.sock, server_hostname=host)  # verifies the cert against host

    if scheme == "https":
        context = ssl.create_default_context()
        return PinnedTLS(host, port, timeout=timeout, context=context)
    return Pinned(host, port, timeout=timeout)


class _Watchdog:
    """Shuts the current connection's socket down at the deadline, so no read (headers, TLS handshake,
    a trickled body) can outlast ``LOOKALIKE_FETCH_TIMEOUT``; per-read socket timeouts alone cannot do that."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conn: http.client.HTTPConnection | None = None
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        sock = self.conn.sock if self.conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self.conn is not None:
            self.conn.close()


_TIMED_OUT = "timed out (LOOKALIKE_FETCH_TIMEOUT)"
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL})


def _fetch(uri: str, settings: Settings) -> bytes:
    deadline = time.monotonic() + settings.fetch_timeout
    url = uri
    for _hop in range(MAX_REDIRECTS + 1):
        scheme, host, port, target, addresses = _vetted_target(uri, url)
        with _Watchdog(deadline) as watchdog:
            try:
                response = _request(uri, watchdog, scheme, host, port, target, addresses)
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise SourceError(uri, f"HTTP {response.status} redirect without a Location")
                    url = urljoin(url, location.strip())
                    continue
                if response.status != 200:
                    raise SourceError(uri, f"HTTP {response.status} {response.reason}".rstrip())
                return _read_body(uri, watchdog, response, settings.max_bytes)
            except SourceError:
                raise
            except Exception as exc:  # OSError, ssl.SSLError, http.client.HTTPException (IncompleteRead, ...)
                if isinstance(exc, TimeoutError) or watchdog.expired:
                    raise SourceError(uri, _TIMED_OUT) from None
                raise SourceError(uri, f"fetch failed: {type(exc).__name__}: {exc}") from None
    raise SourceError(uri, f"too many redirects (more than {MAX_REDIRECTS})")


def _request(
    uri: str, watchdog: _Watchdog, scheme: str, host: str, port: int, target: str, addresses: list[str]
) -> http.client.HTTPResponse:
    """GET ``target`` from the first vetted address that accepts a connection."""
    for i, address in enumerate(addresses):
        left = watchdog.deadline - time.monotonic()
        if left <= 0:
            raise SourceError(uri, _TIMED_OUT)
        conn = watchdog.conn = _connection(scheme, host, port, address, left)
        try:
            conn.connect()
            break
        except OSError as exc:
            conn.close()
            # Only "this address is unreachable" moves on to the next one; TLS or timeout failures do not.
            unreachable = isinstance(exc, ConnectionError) or exc.errno in _UNREACHABLE
            if not unreachable or i == len(addresses) - 1:
                raise
    conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    return conn.getresponse()


def _read_body(uri: str, watchdog: _Watchdog, response: http.client.HTTPResponse, limit: int) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > limit:
        raise SourceError(uri, _too_big(int(length), limit))
    chunks: list[bytes] = []
    total = 0
    # read1: whatever has arrived (up to a chunk), so the cap and the deadline are checked as data trickles in
    while chunk := response.read1(min(_CHUNK, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            raise SourceError(uri, _too_big(total, limit))
        chunks.append(chunk)
        if watchdog.expired:
            raise SourceError(uri, _TIMED_OUT)
    if watchdog.expired:  # the watchdog shut the socket: what we have is cut short
        raise SourceError(uri, _TIMED_OUT)
    if total == 0:
        raise SourceError(uri, "empty file")
    return b"".join(chunks)
