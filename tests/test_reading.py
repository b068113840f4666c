"""search.reading: local reads under allowed roots, and URL fetching rules.

No test sends traffic anywhere but 127.0.0.1: the ``no_network`` fixture makes any other connection, and
any DNS lookup of a name, fail the test. The fetch tests that need a server use a local http.server and
``LOOKALIKE_FETCH_ALLOW_NETWORKS`` set to the loopback network (an operator's way to allow an internal host).
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from search import fetch, reading
from search.config import Settings
from search.errors import SourceError
from search.reading import local_path, read_bytes
from tests import imagefactory as f


def _errors() -> tuple[list[tuple[str, str]], Callable[[str, str], None]]:
    seen: list[tuple[str, str]] = []
    return seen, lambda location, reason: seen.append((location, reason))


def _reason(uri: str, settings: Settings) -> str:
    with pytest.raises(SourceError) as err:
        read_bytes(uri, settings)
    assert err.value.uri == uri
    return err.value.reason


def test_local_path() -> None:
    assert local_path("/data/a.jpg") == Path("/data/a.jpg")
    assert local_path("file:///data/a%20b.jpg") == Path("/data/a b.jpg")
    assert local_path("https://example.com/a.jpg") is None
    assert local_path("http://example.com/a.jpg") is None


# -------------------------------------------------------------------------------------- local read_bytes


def test_read_local_file_and_its_errors(tmp_path: Path) -> None:
    settings = Settings(max_bytes=1000)
    small = f.solid(tmp_path / "ok.png")
    assert read_bytes(str(small), settings) == small.read_bytes()
    assert read_bytes(f"file://{small}", settings) == small.read_bytes()
    assert _reason(str(tmp_path / "missing.jpg"), settings) == "no such file"
    assert _reason(str(tmp_path), settings) == "is a directory, not an image file"
    assert _reason(str(f.empty(tmp_path / "zero.jpg")), settings) == "empty file"
    big = f.noise(tmp_path / "big.png", size=(64, 64))
    assert _reason(str(big), settings).startswith("too large: 0.0 MB exceeds the 0.001 MB limit (LOOKALIKE_MAX_BYTES)")
    assert _reason("ftp://example.com/a.jpg", settings).startswith("unsupported URI scheme 'ftp'")
    assert _reason("file://otherhost/a.jpg", settings).startswith("file:// URI names another host")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert _reason(str(fifo), Settings()) == "not a regular file"
    assert time.monotonic() - started < 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = f.solid(tmp_path / "secret.jpg")
    path.chmod(0)
    assert _reason(str(path), Settings()) == "permission denied"


@pytest.fixture
def rooted(tmp_path: Path) -> tuple[Path, Path, Settings]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    f.solid(root / "in.jpg")
    f.solid(root / "sub" / "deep.jpg")
    f.solid(outside / "secret.jpg")
    f.solid(tmp_path / "root2" / "x.jpg")  # shares a prefix with root: must still be outside
    return root, outside, Settings(allowed_roots=(root,))


OUTSIDE = "outside the allowed roots (LOOKALIKE_ALLOWED_ROOTS)"


def test_allowed_roots_accept_inside(rooted: tuple[Path, Path, Settings]) -> None:
    root, _, settings = rooted
    assert read_bytes(str(root / "in.jpg"), settings) == (root / "in.jpg").read_bytes()
    assert read_bytes(str(root / "sub" / ".." / "in.jpg"), settings)  # `..` that stays inside
    assert read_bytes(f"file://{root / 'sub' / 'deep.jpg'}", settings)


def test_allowed_roots_refuse_dotdot_absolute_and_prefix_escapes(rooted: tuple[Path, Path, Settings]) -> None:
    root, outside, settings = rooted
    assert _reason(str(root / ".." / "outside" / "secret.jpg"), settings) == OUTSIDE
    assert _reason(str(root / "sub" / ".." / ".." / "outside" / "secret.jpg"), settings) == OUTSIDE
    assert _reason(str(outside / "secret.jpg"), settings) == OUTSIDE
    assert _reason(str(root.parent / "root2" / "x.jpg"), settings) == OUTSIDE
    assert _reason(f"file://{outside / 'secret.jpg'}", settings) == OUTSIDE
    # a missing file outside is refused the same way: the roots do not leak what exists elsewhere
    assert _reason(str(outside / "nothing.jpg"), settings) == OUTSIDE
    assert _reason(str(root / "nothing.jpg"), settings) == "no such file"


def test_allowed_roots_and_symlinks(rooted: tuple[Path, Path, Settings]) -> None:
    root, outside, settings = rooted
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "alias.jpg").symlink_to(root / "sub" / "deep.jpg")
    assert _reason(str(root / "escape.jpg"), settings) == OUTSIDE
    assert _reason(str(root / "escape_dir" / "secret.jpg"), settings) == OUTSIDE
    assert read_bytes(str(root / "alias.jpg"), settings) == (root / "sub" / "deep.jpg").read_bytes()


def test_allowed_root_given_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    f.solid(real / "a.jpg")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    settings = Settings(allowed_roots=(tmp_path / "link",))
    assert read_bytes(str(real / "a.jpg"), settings)
    assert read_bytes(str(tmp_path / "link" / "a.jpg"), settings)


@pytest.fixture(params=["openat2", "walk", "walk-without-O_PATH"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way ``read_bytes`` opens beneath a root: the kernel's openat2, the per-component walk where the
    kernel (or a container's seccomp filter) has no openat2, and the walk where O_PATH/proc are missing."""
    if request.param == "openat2":
        if reading._openat2_syscall() is None:
            pytest.skip("openat2 is not available here")
    else:
        monkeypatch.setitem(reading._openat2_state, "fn", None)
    if request.param == "walk-without-O_PATH":
        monkeypatch.setattr(reading, "_pin_flags", lambda: reading._READ_FLAGS)
    return request.param


def _swap_forever(folder: Path, target: Path, stop: threading.Event) -> None:
    """Swap ``folder`` with a symlink to ``target`` and back, as fast as renames go, until ``stop``."""
    parked, link = folder.with_name(folder.name + ".real"), folder.with_name(folder.name + ".link")
    link.symlink_to(target, target_is_directory=True)
    while not stop.is_set():
        os.rename(folder, parked)
        os.rename(link, folder)  # `folder` is now a symlink to outside the root
        os.rename(folder, link)
        os.rename(parked, folder)


def test_swapping_a_parent_folder_for_a_symlink_never_reads_outside_the_roots(tmp_path: Path, resolver: str) -> None:
    """The race O_NOFOLLOW alone loses: realpath() checks root/sub/x.jpg while `sub` is a folder, then
    `sub` becomes a symlink to outside before the open, and the open follows it (O_NOFOLLOW only guards the
    last component). Every read must be the inside file or a SourceError, never the outside file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    inside_bytes = f.noise(root / "sub" / "x.jpg", seed=1).read_bytes()
    secret_bytes = f.noise(outside / "x.jpg", seed=2).read_bytes()
    settings = Settings(allowed_roots=(root,))
    uri = str(root / "sub" / "x.jpg")
    seen = {"inside": 0, "outside": 0, "refused": 0}
    reasons: set[str] = set()
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        for _ in range(1500):
            try:
                data = read_bytes(uri, settings)
            except SourceError as err:
                seen["refused"] += 1
                reasons.add(err.reason)
                continue
            except BaseException as err:  # a raw FileNotFoundError/OSError is a bug too
                unexpected.append(err)
                continue
            seen["inside" if data == inside_bytes else "outside" if data == secret_bytes else "?"] += 1

    swapper = threading.Thread(target=_swap_forever, args=(root / "sub", outside, stop), daemon=True)
    readers = [threading.Thread(target=reader) for _ in range(3)]
    swapper.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    swapper.join()
    assert unexpected == []
    assert seen["outside"] == 0, seen
    assert seen["refused"] > 0 and seen.get("?", 0) == 0, seen  # the race did happen, and was refused
    assert reasons <= {"no such file", OUTSIDE, reading._RACE, "no such file (a parent is not a folder)",
                       f"{reading._RACE} (the path led {OUTSIDE})", f"{reading._RACE} (it now lies {OUTSIDE})"}, reasons


def test_a_symlink_planted_in_place_of_the_file_is_refused(tmp_path: Path, resolver: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    f.solid(root / "a.jpg")
    f.solid(outside / "secret.jpg")
    settings = Settings(allowed_roots=(root,))
    # What the reader would meet if the file became a link between realpath() and the open: simulate by
    # resolving beneath the root a path whose last component is a link.
    (root / "b.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(SourceError) as err:
        reading._open_local(str(root / "b.jpg"), root / "b.jpg", settings)
    assert err.value.reason == OUTSIDE  # realpath saw it: refused before any open
    with pytest.raises(SourceError) as err:
        fd = reading._open_beneath("b", root, ("b.jpg",), reading._pin_flags())
        try:
            reading._check_file("b", os.fstat(fd))
        finally:
            os.close(fd)
    assert err.value.reason.startswith(reading._RACE)


def test_hard_links_under_the_roots_are_refused_unless_allowed(tmp_path: Path, resolver: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    secret = f.noise(outside / "secret.jpg", seed=3)
    os.link(secret, root.mkdir(parents=True) or root / "planted.jpg")  # same file system: tmp_path
    f.solid(root / "plain.jpg")
    settings = Settings(allowed_roots=(root,))
    reason = _reason(str(root / "planted.jpg"), settings)
    assert reason.startswith("has 2 hard links") and "LOOKALIKE_ALLOW_HARDLINKS=1" in reason
    assert read_bytes(str(root / "plain.jpg"), settings)  # one link: fine
    allowed = Settings(allowed_roots=(root,), allow_hardlinks=True)
    assert read_bytes(str(root / "planted.jpg"), allowed) == secret.read_bytes()
    assert read_bytes(str(root / "planted.jpg"), Settings()) == secret.read_bytes()  # no roots: no policy


def test_special_files_are_refused_without_being_opened_for_reading(tmp_path: Path, resolver: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock.jpg"))
        for settings in (Settings(), Settings(allowed_roots=(root,))):
            assert _reason(str(root / "pipe.jpg"), settings) == "not a regular file"
            reason = _reason(str(root / "sock.jpg"), settings)
            assert reason in ("not a regular file", "cannot read: No such device or address"), reason
    finally:
        sock.close()
    assert _reason("/dev/null", Settings()) == "not a regular file"


@pytest.mark.parametrize("uri", ["file:///tmp/a%00b.jpg", "/tmp/a\x00b.jpg", "/tmp/\ud800.jpg", "file:///%ED%A0%80",
                                 "~no-such-user-here/a.jpg", "/" + "a" * 5000 + ".jpg", "file://[::1/a.jpg"])
def test_hostile_paths_are_a_source_error(uri: str, tmp_path: Path) -> None:
    for settings in (Settings(), Settings(allowed_roots=(tmp_path,))):
        with pytest.raises(SourceError):
            read_bytes(uri, settings)
    assert local_path(uri) is None or isinstance(local_path(uri), Path)


def test_percent_escapes_name_the_bytes_of_a_file_name(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    path = f.solid(tmp_path / name)
    assert read_bytes(f"file://{tmp_path}/caf%E9.jpg", Settings()) == path.read_bytes()


# -------------------------------------------------------------------------------------------------- URLs


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Fail the test on any connection except to 127.0.0.1, and on any DNS lookup of a name."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    connects: list[tuple[str, int]] = []

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["flags"] = kwargs.get("flags", 0) | socket.AI_NUMERICHOST  # literals only: never ask DNS
        try:
            return real_getaddrinfo(host, port, *args, **kwargs)
        except socket.gaierror:
            pytest.fail(f"the code tried to resolve {host!r}")

    def connect(self, address):  # type: ignore[no-untyped-def]
        if address[0] != "127.0.0.1":
            pytest.fail(f"the code tried to connect to {address}")
        connects.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return connects


def test_urls_are_refused_when_fetching_is_off(no_network: list[tuple[str, int]]) -> None:
    assert _reason("https://example.com/a.jpg", Settings()) == "URL fetching is off; set LOOKALIKE_FETCH_URLS=1"
    assert no_network == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/a.jpg", "refused: 127.0.0.1 is a loopback address"),
        ("http://localhost/a.jpg", "refused: localhost is a loopback address"),
        ("http://img.localhost/a.jpg", "refused: img.localhost is a loopback address"),
        ("http://10.0.0.1/a.jpg", "refused: 10.0.0.1 is a private address"),
        ("http://192.168.1.20/a.jpg", "refused: 192.168.1.20 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a link-local address"),
        ("http://0.0.0.0/a.jpg", "refused: 0.0.0.0 is a unspecified address"),
        ("http://224.0.0.1/a.jpg", "refused: 224.0.0.1 is a multicast address"),
        ("http://100.64.0.1/a.jpg", "refused: 100.64.0.1 is a non-public address"),
        ("http://[::1]/a.jpg", "refused: ::1 is a loopback address"),
        ("http://[fe80::1]/a.jpg", "refused: fe80::1 is a link-local address"),
        ("http://[::ffff:10.0.0.1]/a.jpg", "refused: ::ffff:10.0.0.1 is a private address"),
        ("http://[2002:7f00:1::]/a.jpg", "refused: 2002:7f00:1:: is a loopback address"),
        ("http://2130706433/a.jpg", "refused: 2130706433 resolves to 127.0.0.1, which is a loopback address"),
    ],
)
def test_non_public_addresses_are_refused_without_connecting(
    no_network: list[tuple[str, int]], url: str, reason: str
) -> None:
    assert _reason(url, Settings(fetch_urls=True)).startswith(reason)
    assert no_network == []


def test_a_name_is_refused_if_any_of_its_addresses_is_not_public(
    no_network: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["93.184.216.34", "10.1.2.3"])
    reason = _reason("https://images.example/a.jpg", Settings(fetch_urls=True))
    assert reason.startswith("refused: images.example resolves to 10.1.2.3, which is a private address")
    assert no_network == []


def test_other_url_problems(no_network: list[tuple[str, int]]) -> None:
    on = Settings(fetch_urls=True)
    assert _reason("http://user:pw@93.184.216.34/a.jpg", on) == "credentials in URLs are not supported"
    assert _reason("http:///a.jpg", on) == "URL has no host"
    assert _reason("http://93.184.216.34:99999/a.jpg", on).startswith("invalid URL")
    assert no_network == []


def test_public_addresses_pass_the_check() -> None:
    assert fetch._refused_address("93.184.216.34") is None
    assert fetch._refused_address("2606:2800:220:1:248:1893:25c8:1946") is None


# ---------------------------------------------------------------------------- fetching from a local server


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b"pretend image bytes " * 100  # 2 KB; fetching does not look inside

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host"))  # type: ignore[attr-defined]
        port = self.server.server_address[1]
        path = self.path
        if path == "/img":
            self._send(200, self.body)
        elif path.startswith("/status/"):  # /status/N answers HTTP N
            self._send(int(path.rsplit("/", 1)[1]), b"nope")
        elif path.startswith("/hop/"):  # /hop/N redirects N more times, then to /img
            n = int(path.rsplit("/", 1)[1])
            self._redirect("/img" if n == 0 else f"/hop/{n - 1}")
        elif path == "/to-private":
            self._redirect("http://10.0.0.1/img")
        elif path == "/to-absolute":
            self._redirect(f"http://127.0.0.1:{port}/img")
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", "999999999")
            self.end_headers()
        elif path == "/big-streamed":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x" * 10_000)
            except OSError:
                pass
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):  # trickle: every byte arrives before a per-read timeout would fire
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        elif path == "/empty":
            self._send(200, b"")
        else:
            self._send(404, b"nope")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(no_network: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[str]]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.hosts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.hosts  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


LOOPBACK = ("127.0.0.0/8",)  # the test servers listen on 127.0.0.1
ON = Settings(fetch_urls=True, fetch_timeout=2.0, max_bytes=100_000, fetch_allow_networks=LOOPBACK)


def test_fetch_and_redirects(server: tuple[str, list[str]]) -> None:
    base, _ = server
    assert read_bytes(f"{base}/img", ON) == _Handler.body
    assert read_bytes(f"{base}/hop/2", ON) == _Handler.body  # 3 redirects: the limit
    assert read_bytes(f"{base}/to-absolute", ON) == _Handler.body
    assert _reason(f"{base}/hop/3", ON) == "too many redirects (more than 3)"
    assert _reason(f"{base}/missing", ON) == "HTTP 404 Not Found"
    assert _reason(f"{base}/empty", ON) == "empty file"


def test_a_closed_port_is_a_clear_failure(server: tuple[str, list[str]]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert _reason(f"http://127.0.0.1:{port}/img", ON).startswith("fetch failed: ConnectionRefusedError")


def test_a_redirect_to_a_private_address_is_refused(server: tuple[str, list[str]]) -> None:
    base, _ = server
    reason = _reason(f"{base}/to-private", ON)
    assert reason.startswith("refused: 10.0.0.1 is a private address")  # and no_network saw no connection


def test_size_cap_declared_and_streamed(server: tuple[str, list[str]]) -> None:
    base, _ = server
    assert _reason(f"{base}/big-declared", ON).startswith("too large: 1000.0 MB exceeds the 0.1 MB limit")
    assert _reason(f"{base}/big-streamed", ON).startswith("too large: 0.1 MB exceeds the 0.1 MB limit")


def test_a_trickling_server_cannot_outlast_the_timeout(server: tuple[str, list[str]]) -> None:
    base, _ = server
    started = time.monotonic()
    assert _reason(f"{base}/slow", Settings(fetch_urls=True, fetch_timeout=0.6, fetch_allow_networks=LOOPBACK)) == (
        "timed out (LOOKALIKE_FETCH_TIMEOUT)"
    )
    assert time.monotonic() - started < 2.0


def test_connects_to_the_checked_address_not_a_fresh_lookup(
    server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name is resolved once, checked, and that address is dialled with the name as Host."""
    base, hosts = server
    port = int(base.rsplit(":", 1)[1])
    lookups: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.0.0.1"]  # a second answer would be hostile

    monkeypatch.setattr(fetch, "_resolve", resolve)
    assert read_bytes(f"http://images.test:{port}/img", ON) == _Handler.body
    assert lookups == ["images.test"]
    assert hosts[-1] == f"images.test:{port}"


@pytest.fixture
def tls_server(
    tmp_path: Path, server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, str]]:
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names ``images.test``, trusted by the fetcher."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.hosts = []  # type: ignore[attr-defined]
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    real_context = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: real_context(cafile=str(cert)))
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["127.0.0.1"])
    try:
        yield httpd.server_address[1], str(cert)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_verifies_the_certificate_against_the_name_not_the_address(tls_server: tuple[int, str]) -> None:
    port, _ = tls_server
    assert read_bytes(f"https://images.test:{port}/img", ON) == _Handler.body
    reason = _reason(f"https://other.test:{port}/img", ON)  # same address, a name the certificate does not hold
    assert reason.startswith("fetch failed: SSLCertVerificationError")


# ---------------------------------------------------------------------------------------------- transient or not
@pytest.mark.parametrize(("status", "transient"), [(503, True), (502, True), (429, True), (500, True),
                                                    (404, False), (403, False), (410, False)])
def test_server_errors_are_transient_and_client_errors_are_not(server: tuple[str, list[str]], status: int,
                                                                transient: bool) -> None:
    base, _ = server
    with pytest.raises(SourceError) as err:
        read_bytes(f"{base}/status/{status}", ON)
    assert err.value.reason.startswith(f"HTTP {status}") and err.value.transient is transient


def test_timeouts_and_refused_connections_are_transient(server: tuple[str, list[str]]) -> None:
    base, _ = server
    with pytest.raises(SourceError) as err:
        read_bytes(f"{base}/slow", Settings(fetch_urls=True, fetch_timeout=0.4, fetch_allow_networks=LOOPBACK))
    assert err.value.transient
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SourceError) as err:
        read_bytes(f"http://127.0.0.1:{port}/img", ON)
    assert err.value.transient  # nobody listens now; a restarted image server will
    with pytest.raises(SourceError) as err:
        read_bytes("/no/such/file.jpg", Settings())
    assert not err.value.transient


def test_the_fetch_timeout_covers_name_resolution(no_network: list[tuple[str, int]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that hangs for 3 s cannot stretch a 0.5 s fetch timeout (getaddrinfo has no timeout)."""
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: time.sleep(3) or ["93.184.216.34"])
    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        read_bytes("https://slow-dns.example/a.jpg", Settings(fetch_urls=True, fetch_timeout=0.5))
    assert time.monotonic() - started < 1.5
    assert err.value.reason == "timed out (LOOKALIKE_FETCH_TIMEOUT)" and err.value.transient


def test_a_transient_read_error_makes_a_retryable_outcome(server: tuple[str, list[str]], tmp_path: Path) -> None:
    from ingest.pipeline import Pipeline
    from ingest.sources import ImageRef
    from tests.fakes import TinyEmbedder

    base, _ = server
    settings = ON.replace(data_dir=tmp_path / "data")
    with Pipeline(settings, embedder=TinyEmbedder(), tagger=False) as p:
        busy, gone = p.ingest([ImageRef(f"{base}/status/503"), ImageRef(f"{base}/status/404")])
    assert (busy.status, busy.permanent) == ("failed", False)  # a worker retries it with backoff
    assert (gone.status, gone.permanent) == ("failed", True)  # dead-lettered at once

