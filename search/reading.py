"""Reading one image's bytes safely: local paths and ``file://`` URIs, and (when allowed) ``http(s)://``.

``read_bytes`` is the only place that touches an image file or the network — for ingestion and for
queries alike — so the safety rules live here:

* local files: size cap (``LOOKALIKE_MAX_BYTES``); with ``LOOKALIKE_ALLOWED_ROOTS`` set, the real path
  (symlinks resolved) must lie under a root, and the file opened is that real path, never a FIFO or device;
* ``http(s)://`` (only with ``LOOKALIKE_FETCH_URLS=1``): every address the host name resolves to must be
  a public one, or inside a network the operator allowed (``LOOKALIKE_FETCH_ALLOW_NETWORKS``, e.g. an
  internal image server); the connection goes to the address that was checked (no DNS rebinding between
  check and connect), redirects are followed by hand (at most 3), each target checked again, the body
  streamed under the size cap and the whole fetch bounded by ``LOOKALIKE_FETCH_TIMEOUT``. Proxy variables
  are ignored: the address check would be meaningless through a proxy.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from search.errors import SourceError

if TYPE_CHECKING:
    import http.client

    from search.config import Settings

__all__ = ["SourceError", "local_path", "read_bytes", "uri_scheme"]

MAX_REDIRECTS = 3

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CHUNK = 64 * 1024
_USER_AGENT = "lookalike/0.1 (+image ingest)"


# ---------------------------------------------------------------------------------------------- paths


def uri_scheme(uri: str) -> str | None:
    """The lower-cased scheme of ``uri`` (``"file"``, ``"https"``, …), or None for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def to_path(uri: str, base: Path | None = None) -> Path:
    """An absolute local path for a plain path or a ``file://`` URI (``..`` normalised, symlinks kept)."""
    if uri_scheme(uri) == "file":
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
    scheme = uri_scheme(uri)
    if scheme is not None and scheme != "file":
        return None
    try:
        return to_path(uri)
    except ValueError:
        return None


def _check_roots(uri: str, real: Path, settings: Settings) -> None:
    roots = [Path(r).expanduser().resolve() for r in settings.allowed_roots]
    if roots and not any(real == root or real.is_relative_to(root) for root in roots):
        raise SourceError(uri, "outside the allowed roots (LOOKALIKE_ALLOWED_ROOTS)")


# ---------------------------------------------------------------------------------------------- read


def read_bytes(uri: str, settings: Settings) -> bytes:
    """The bytes of one image, local or (when allowed) over http(s); ``SourceError`` says why not."""
    scheme = uri_scheme(uri)
    if scheme in ("http", "https"):
        if not settings.fetch_urls:
            raise SourceError(uri, "URL fetching is off; set LOOKALIKE_FETCH_URLS=1")
        return _fetch(uri, settings)
    if scheme is not None and scheme != "file":
        raise SourceError(uri, f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)")
    try:
        path = to_path(uri)
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


def _refused_address(address: str, allowed: Sequence[str] = ()) -> str | None:
    """Why ``address`` may not be fetched from, or None when it is a public (global) address or lies in
    one of the ``allowed`` networks (CIDR strings the operator named in LOOKALIKE_FETCH_ALLOW_NETWORKS)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "unparseable"
    if any(ip in ipaddress.ip_network(net, strict=False) for net in allowed):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address wrapped in IPv6 (mapped, 6to4, Teredo, NAT64) is judged as that IPv4 address.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and (reason := _refused_address(str(embedded), allowed)):
            return reason
    if ip.is_loopback:
        return "loopback"
    for kind in ("unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")  # e.g. "private", "link-local"
    if not ip.is_global:
        return "non-public"
    return None


def _vetted_target(uri: str, url: str, allowed: Sequence[str] = ()) -> tuple[str, str, int, str, list[str]]:
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
    # RFC 6761: these names are loopback by definition; refuse without asking a resolver (unless allowed).
    if (host.lower() == "localhost" or host.lower().endswith(".localhost")) and _refused_address("127.0.0.1", allowed):
        raise SourceError(uri, f"refused: {host} is a loopback address{hop}")
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise SourceError(uri, f"cannot resolve host {host!r}: {exc}{hop}") from None
    if not addresses:
        raise SourceError(uri, f"cannot resolve host {host!r}{hop}")
    for address in addresses:
        if reason := _refused_address(address, allowed):
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
        scheme, host, port, target, addresses = _vetted_target(uri, url, settings.fetch_allow_networks)
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
