"""Fetching one image over ``http(s)://`` for ``search.reading.read_bytes`` (only with ``LOOKALIKE_FETCH_URLS=1``).

Every address the host name resolves to must be a public one, or inside a network the operator allowed
(``LOOKALIKE_FETCH_ALLOW_NETWORKS``, e.g. an internal image server); the connection goes to the address that
was checked (no DNS rebinding between check and connect), redirects are followed by hand (at most 3), each
target checked again, the body streamed under the size cap and the whole fetch bounded by
``LOOKALIKE_FETCH_TIMEOUT`` (DNS included). Proxy variables are ignored: the address check would be
meaningless through a proxy.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from search.errors import SourceError

if TYPE_CHECKING:
    import http.client

    from search.config import Settings

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
_USER_AGENT = "lookalike/0.1 (+image ingest)"
# HTTP statuses worth asking again: the server was busy, failing, or asked us to slow down.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def too_big(size: int, limit: int) -> str:
    return f"too large: {size / 1e6:.1f} MB exceeds the {limit / 1e6:g} MB limit (LOOKALIKE_MAX_BYTES)"




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


def _resolve_until(host: str, port: int, deadline: float) -> list[str]:
    """``_resolve`` bounded by ``deadline``: getaddrinfo has no timeout of its own (a slow resolver took 4 s
    against a 1 s LOOKALIKE_FETCH_TIMEOUT), so it runs in a thread that is abandoned at the deadline."""
    result: list[Any] = []

    def lookup() -> None:
        try:
            result.append(_resolve(host, port))
        except BaseException as err:  # handed to the caller's thread
            result.append(err)

    thread = threading.Thread(target=lookup, daemon=True, name="lookalike-resolve")
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not result:
        raise TimeoutError(f"resolving {host!r} took longer than the fetch timeout")
    if isinstance(result[0], BaseException):
        raise result[0]
    return list(result[0])


def ssl_errors() -> tuple[type[BaseException], ...]:
    import ssl

    return (ssl.SSLError, ssl.CertificateError)


def _vetted_target(uri: str, url: str, allowed: Sequence[str] = (),
                   deadline: float | None = None) -> tuple[str, str, int, str, list[str]]:
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
        addresses = _resolve(host, port) if deadline is None else _resolve_until(host, port, deadline)
    except TimeoutError:
        raise SourceError(uri, _TIMED_OUT, transient=True) from None
    except (OSError, UnicodeError) as exc:
        # EAI_AGAIN: the resolver could not answer now (a name that does not exist is EAI_NONAME: permanent)
        again = isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
        raise SourceError(uri, f"cannot resolve host {host!r}: {exc}{hop}", transient=again) from None
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


def fetch(uri: str, settings: Settings) -> bytes:
    deadline = time.monotonic() + settings.fetch_timeout
    url = uri
    for _hop in range(MAX_REDIRECTS + 1):
        scheme, host, port, target, addresses = _vetted_target(uri, url, settings.fetch_allow_networks, deadline)
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
                    raise SourceError(uri, f"HTTP {response.status} {response.reason}".rstrip(),
                                      transient=response.status in TRANSIENT_HTTP)
                return _read_body(uri, watchdog, response, settings.max_bytes)
            except SourceError:
                raise
            except Exception as exc:  # OSError, ssl.SSLError, http.client.HTTPException (IncompleteRead, ...)
                if isinstance(exc, TimeoutError) or watchdog.expired:
                    raise SourceError(uri, _TIMED_OUT, transient=True) from None
                # Refused, reset, unreachable: the host may be back soon. A TLS or protocol error will not pass.
                raise SourceError(uri, f"fetch failed: {type(exc).__name__}: {exc}",
                                  transient=isinstance(exc, ConnectionError | OSError)
                                  and not isinstance(exc, ssl_errors())) from None
    raise SourceError(uri, f"too many redirects (more than {MAX_REDIRECTS})")


def _request(
    uri: str, watchdog: _Watchdog, scheme: str, host: str, port: int, target: str, addresses: list[str]
) -> http.client.HTTPResponse:
    """GET ``target`` from the first vetted address that accepts a connection."""
    for i, address in enumerate(addresses):
        left = watchdog.deadline - time.monotonic()
        if left <= 0:
            raise SourceError(uri, _TIMED_OUT, transient=True)
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
        raise SourceError(uri, too_big(int(length), limit))
    chunks: list[bytes] = []
    total = 0
    # read1: whatever has arrived (up to a chunk), so the cap and the deadline are checked as data trickles in
    while chunk := response.read1(min(CHUNK, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            raise SourceError(uri, too_big(total, limit))
        chunks.append(chunk)
        if watchdog.expired:
            raise SourceError(uri, _TIMED_OUT, transient=True)
    if watchdog.expired:  # the watchdog shut the socket: what we have is cut short
        raise SourceError(uri, _TIMED_OUT, transient=True)
    if total == 0:
        raise SourceError(uri, "empty file")
    return b"".join(chunks)


__all__ = ["CHUNK", "MAX_REDIRECTS", "TRANSIENT_HTTP", "fetch", "too_big"]
