"""ingest.sources: folder walks, manifests, local reads under allowed roots, and URL fetching rules.

No test sends traffic anywhere but 127.0.0.1: the ``no_network`` fixture makes any other connection, and
any DNS lookup of a name, fail the test. The fetch tests that need a server use a local http.server and
the module's test-only ``_allow_loopback_for_tests`` switch (only loopback is unlocked by it).
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

from ingest import sources
from ingest.sources import IMAGE_EXTENSIONS, ImageRef, iter_refs, local_path, read_bytes
from search.config import Settings
from search.errors import SourceError
from tests import imagefactory as f


def _errors() -> tuple[list[tuple[str, str]], Callable[[str, str], None]]:
    seen: list[tuple[str, str]] = []
    return seen, lambda location, reason: seen.append((location, reason))


def _reason(uri: str, settings: Settings) -> str:
    with pytest.raises(SourceError) as err:
        read_bytes(uri, settings)
    assert err.value.uri == uri
    return err.value.reason


# ------------------------------------------------------------------------------------------ folder walk


def test_extensions_constant() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


def test_folder_walk_is_recursive_sorted_case_insensitive_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    f.solid(root / "b.jpg")
    f.solid(root / "A.JPG", format="JPEG")
    f.solid(root / "c.Png", format="PNG")
    f.solid(root / "sub" / "deeper" / "x.TIFF", format="TIFF")
    f.solid(root / "sub" / "y.webp")
    f.solid(root / ".hidden.jpg")
    f.solid(root / ".cache" / "z.jpg")
    f.text_file(root / "notes.txt")
    f.text_file(root / "sub" / "manifest.csv", "uri\nb.jpg\n")  # inside a walk a CSV is just a non-image
    f.text_file(root / "README")
    refs = list(iter_refs([root]))
    rel = [Path(r.uri).relative_to(root).as_posix() for r in refs]
    assert rel == ["A.JPG", "b.jpg", "c.Png", "sub/deeper/x.TIFF", "sub/y.webp"]
    assert all(Path(r.uri).is_absolute() and r.labels == () and r.source is None for r in refs)
    assert list(iter_refs([root])) == refs  # deterministic


def test_relative_folder_gives_absolute_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f.solid(tmp_path / "imgs" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    [ref] = iter_refs(["imgs"])
    assert ref.uri == str(tmp_path / "imgs" / "a.jpg")


def test_labels_from_dirs_uses_the_parent_folder(tmp_path: Path) -> None:
    root = tmp_path / "caltech"
    f.solid(root / "airplanes" / "image_0001.jpg")
    f.solid(root / "airplanes" / "image_0002.jpg")
    f.solid(root / "faces" / "image_0001.jpg")
    refs = list(iter_refs([root], labels_from_dirs=True, source="bench"))
    assert [(Path(r.uri).parent.name, r.labels, r.source) for r in refs] == [
        ("airplanes", ("airplanes",), "bench"),
        ("airplanes", ("airplanes",), "bench"),
        ("faces", ("faces",), "bench"),
    ]
    assert all(r.labels == () for r in iter_refs([root]))


def test_symlink_loops_are_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    f.solid(root / "a" / "1.jpg")
    f.solid(root / "b" / "2.jpg")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "b" / "self").symlink_to(root / "b", target_is_directory=True)
    outside = tmp_path / "elsewhere"
    f.solid(outside / "3.jpg")
    (root / "c").symlink_to(outside, target_is_directory=True)
    refs = list(iter_refs([root]))
    names = sorted(Path(r.uri).name for r in refs)
    assert names == ["1.jpg", "2.jpg", "3.jpg"]  # each real folder once; a linked folder is followed


def test_single_files_urls_and_missing_paths(tmp_path: Path) -> None:
    img = f.solid(tmp_path / "one.jpg")
    odd = f.solid(tmp_path / "no-extension", format="PNG")  # named explicitly: decode decides
    errors, on_error = _errors()
    refs = list(
        iter_refs(
            [img, str(odd), "https://example.com/a.jpg", tmp_path / "missing.jpg", "ftp://host/x.jpg"],
            on_error=on_error,
        )
    )
    assert [r.uri for r in refs] == [str(img), str(odd), "https://example.com/a.jpg"]
    assert errors == [
        (str(tmp_path / "missing.jpg"), "no such file or directory"),
        ("ftp://host/x.jpg", "unsupported URI scheme 'ftp' (use a local path or an http(s) URL)"),
    ]


def test_without_on_error_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        list(iter_refs([tmp_path / "missing"]))
    assert err.value.reason == "no such file or directory"


def test_broken_symlink_in_a_folder_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    f.solid(root / "ok.jpg")
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    errors, on_error = _errors()
    assert [Path(r.uri).name for r in iter_refs([root], on_error=on_error)] == ["ok.jpg"]
    assert errors == [(str(root / "gone.jpg"), "broken symbolic link")]


# -------------------------------------------------------------------------------------------- manifests


def test_csv_manifest_relative_paths_labels_and_a_bad_row(tmp_path: Path) -> None:
    data = tmp_path / "data"
    f.solid(data / "imgs" / "a.jpg")
    f.solid(data / "imgs" / "b.jpg")
    absolute = f.solid(tmp_path / "elsewhere" / "c.jpg")
    manifest = data / "manifest.csv"
    manifest.write_text(
        "\ufeffid,URI,labels\n"  # BOM and a capitalised header, as spreadsheets write them
        "1,imgs/a.jpg,cat|pet| cat \n"
        "2,,dog\n"
        f"3,{absolute},\n"
        "\n"
        "4,https://example.com/d.jpg,remote\n"
        "5,ftp://example.com/e.jpg,x\n"
        "6,./imgs/../imgs/b.jpg,dog\n",
        encoding="utf-8",
    )
    errors, on_error = _errors()
    refs = list(iter_refs([manifest], source="m", on_error=on_error))
    assert refs == [
        ImageRef(str(data / "imgs" / "a.jpg"), ("cat", "pet"), "m"),
        ImageRef(str(absolute), (), "m"),
        ImageRef("https://example.com/d.jpg", ("remote",), "m"),
        ImageRef(str(data / "imgs" / "b.jpg"), ("dog",), "m"),
    ]
    assert errors == [
        (f"{manifest}:3", "empty `uri`"),
        (f"{manifest}:7", "unsupported URI scheme 'ftp' (use a local path or an http(s) URL)"),
    ]


def test_csv_manifest_without_a_uri_column(tmp_path: Path) -> None:
    manifest = f.text_file(tmp_path / "m.csv", "path,labels\na.jpg,cat\n")
    errors, on_error = _errors()
    assert list(iter_refs([manifest], on_error=on_error)) == []
    assert errors == [(str(manifest), "no `uri` column in the CSV header")]
    with pytest.raises(SourceError, match="no `uri` column"):
        list(iter_refs([manifest]))


def test_csv_source_column_overrides_the_default(tmp_path: Path) -> None:
    manifest = f.text_file(tmp_path / "m.csv", "uri,source\na.jpg,camera\nb.jpg,\n")
    refs = list(iter_refs([manifest], source="default"))
    assert [(Path(r.uri).name, r.source) for r in refs] == [("a.jpg", "camera"), ("b.jpg", "default")]


def test_jsonl_manifest_and_bad_lines(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    manifest = f.text_file(
        sub / "m.jsonl",
        '{"uri": "x/a.png", "labels": ["cat", "cat", " pet"]}\n'
        "{not json\n"
        '["a list"]\n'
        '{"uri": "b.png", "labels": "dog|pet"}\n'
        '{"labels": ["orphan"]}\n'
        '{"uri": "c.png", "labels": [1, 2]}\n'
        "\n"
        '{"uri": "https://example.com/e.jpg"}\n'
        '{"uri": "file://' + str(tmp_path / "f.png") + '", "source": "disk"}\n',
    )
    errors, on_error = _errors()
    refs = list(iter_refs([manifest], labels_from_dirs=False, on_error=on_error))
    assert refs == [
        ImageRef(str(sub / "x" / "a.png"), ("cat", "pet")),
        ImageRef(str(sub / "b.png"), ("dog", "pet")),
        ImageRef("https://example.com/e.jpg", ()),
        ImageRef(str(tmp_path / "f.png"), (), "disk"),
    ]
    locations = [loc for loc, _ in errors]
    assert locations == [f"{manifest}:2", f"{manifest}:3", f"{manifest}:5", f"{manifest}:6"]
    assert errors[0][1].startswith("invalid JSON")
    assert errors[3][1] == "`labels` must be a list of strings"


def test_manifest_that_is_not_utf8(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"uri\n\xff\xfe.jpg\n")
    errors, on_error = _errors()
    assert list(iter_refs([manifest], on_error=on_error)) == []
    assert errors and errors[0][0] == str(manifest) and errors[0][1].startswith("not UTF-8 text")


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
    monkeypatch.setattr(sources, "_resolve", lambda host, port: ["93.184.216.34", "10.1.2.3"])
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
    assert sources._refused_address("93.184.216.34") is None
    assert sources._refused_address("2606:2800:220:1:248:1893:25c8:1946") is None


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
    monkeypatch.setattr(sources, "_allow_loopback_for_tests", True)
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


ON = Settings(fetch_urls=True, fetch_timeout=2.0, max_bytes=100_000)


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
    assert _reason(f"{base}/slow", Settings(fetch_urls=True, fetch_timeout=0.6)) == (
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

    monkeypatch.setattr(sources, "_resolve", resolve)
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
    monkeypatch.setattr(sources, "_resolve", lambda host, port: ["127.0.0.1"])
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
