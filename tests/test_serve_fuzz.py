"""``lookalike serve`` under hostile input: Schemathesis against the app's own OpenAPI document, then the
inputs a schema-driven fuzzer does not think of.

The contract: every refusal is a 4xx with one JSON line ``{"error": "…"}``; a query that cannot be served gets
an ``error`` inside its answer; nothing a client sends ever answers 5xx (503 only for a model still loading,
a timeout or a store that is down), and the server answers a normal request after any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests import imagefactory as f
from tests.fakes import TinyEmbedder
from workers.serve.api import create_app
from workers.serve.service import Service
from workers.serve.settings import ServeSettings, serve_settings

BOGUS_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=95)
    return out.getvalue()


@dataclass
class Served:
    client: TestClient
    service: Service
    settings: ServeSettings
    ids: list[str]


def _serve(tmp_path: Path, points: int = 3, **overrides: Any) -> Iterator[Served]:
    cfg = serve_settings(data_dir=tmp_path / "data", model="tiny", **overrides)
    service = Service(cfg, embedder=TinyEmbedder())
    with TestClient(create_app(cfg, service=service)) as client:
        assert service._ready.wait(10)
        ids = []
        for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)][:points]):
            response = client.post("/v1/images", files={"image": (f"{i}.jpg", jpeg(colour), "image/jpeg")},
                                   data={"labels": f"c{i},all"})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        yield Served(client, service, cfg, ids)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path)


def assert_refusal(response: Any, *statuses: int) -> str:
    """A 4xx (one of ``statuses`` when given) whose body is exactly ``{"error": "<one printable line>"}``."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if statuses:
        assert response.status_code in statuses, (response.status_code, response.text[:500])
    content_type = response.headers.get("content-type")
    content_type = content_type[0] if isinstance(content_type, list) else content_type  # schemathesis: lists
    assert (content_type or "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in body["error"]), body
    return body["error"]


def assert_still_serving(served: Served) -> None:
    client = served.client
    if not served.ids:  # an empty store: the query is served, with no results
        answer = client.post("/v1/search", files={"image": ("q.jpg", jpeg((1, 2, 3)), "image/jpeg")})
        assert answer.status_code == 200 and answer.json()[0]["results"] == [], answer.text
        return
    answer = client.post("/v1/search", json={"ids": [served.ids[0]], "k": 2})
    assert answer.status_code == 200, answer.text
    assert [h["id"] for h in answer.json()[0]["results"]] and "error" not in answer.json()[0]
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- schemathesis
OPERATIONS = [("POST", "/v1/search"), ("POST", "/v1/images"), ("GET", "/v1/points/{point_id}"),
              ("GET", "/v1/points/{point_id}/thumbnail"), ("GET", "/v1/collections"), ("GET", "/healthz"),
              ("GET", "/readyz"), ("GET", "/metrics")]
EXAMPLES = 40  # per operation and generation mode; derandomized, so every run sends the same requests


def _schema(served: Served) -> Any:
    schema = schemathesis.openapi.from_dict(served.client.get("/openapi.json").json(), config=schemathesis.Config())
    schema.app = served.client.app
    return schema


def _fuzz(served: Served, operation: Any, mode: GenerationMode) -> dict[int, int]:
    """Run ``EXAMPLES`` generated requests against ``operation``; the status codes seen, counted."""
    session = get_client(served.client.app)  # not entered: the fixture's client owns the app's lifespan
    known = [*served.ids, served.ids[0].upper(), f"urn:uuid:{served.ids[1]}", BOGUS_ID]
    steer = mode is GenerationMode.POSITIVE and operation.method.upper() in ("GET", "POST")  # never delete them
    seen: dict[int, int] = {}
    media: set[str | None] = set()

    @given(case=operation.as_strategy(mode), data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any, data: Any) -> None:
        if steer:  # some cases name stored points, so the id routes answer 200 too
            if case.path_parameters and "point_id" in case.path_parameters and data.draw(st.booleans()):
                case.path_parameters["point_id"] = data.draw(st.sampled_from(known))
            if isinstance(case.body, dict) and isinstance(case.body.get("ids"), list) and data.draw(st.booleans()):
                case.body["ids"] = [*case.body["ids"][:3], data.draw(st.sampled_from(known))]
        response = case.call(session=session)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        media.add(case.media_type)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert_refusal(response)
        # Semantic limits the document cannot state (a decodable image, a UUID, the filter grammar, a model that
        # embeds texts) refuse schema-valid data with a documented 4xx; multipart fields are all text on the wire,
        # so a "negated" field type is the same request as a valid one.
        excluded = [positive_data_acceptance]
        if case.media_type == "multipart/form-data":
            excluded.append(negative_data_rejection)
        case.validate_response(response, excluded_checks=excluded)

    run()
    if operation.path == "/v1/search":  # both bodies declared through openapi_extra are generated
        assert {"application/json", "multipart/form-data"} <= media, media
    assert_still_serving(served)
    return seen


def _negatable(operation: Any) -> bool:
    return any(len(group) for group in (operation.path_parameters, operation.query, operation.body))


@pytest.mark.parametrize(("method", "path", "mode"), [
    (method, path, mode) for method, path in OPERATIONS for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or (path.startswith("/v1/") and path != "/v1/collections")])
def test_generated_requests_never_break_the_contract(served: Served, method: str, path: str,
                                                     mode: GenerationMode) -> None:
    seen = _fuzz(served, _schema(served)[path][method], mode)
    if mode is GenerationMode.POSITIVE:
        assert any(200 <= status < 300 for status in seen), seen  # the happy path was reached, not only refusals


def test_operations_added_to_the_document_are_fuzzed_too(served: Served) -> None:
    schema = _schema(served)
    spec = served.client.get("/openapi.json").json()
    listed = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert set(OPERATIONS) <= listed
    for method, path in sorted(listed - set(OPERATIONS)):
        operation = schema[path][method]
        for mode in GenerationMode:
            if mode is GenerationMode.POSITIVE or _negatable(operation):
                _fuzz(served, operation, mode)


# ---------------------------------------------------------------------------------------------- hostile forms
def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"fuzzb0undary") -> tuple[bytes, dict[str, str]]:
    """A multipart body built by hand from ``(Content-Disposition tail, content)`` parts: no client library
    quotes or escapes the filename on the way."""
    body = b"".join(b"--" + boundary + b"\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + content + b"\r\n"
                    for head, content in parts) + b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def files_outside_the_store(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "qdrant" not in p.relative_to(root).parts}


def test_forms_with_hundreds_of_fields_or_files_are_refused(served: Served) -> None:
    client, image = served.client, jpeg((90, 90, 90))
    many_fields = {f"f{i}": "x" for i in range(300)}
    assert "Too many fields" in assert_refusal(client.post(
        "/v1/search", files={"image": ("q.jpg", image, "image/jpeg")}, data=many_fields), 400)
    assert "Too many files" in assert_refusal(client.post(
        "/v1/search", files=[("image", (f"q{i}.jpg", image, "image/jpeg")) for i in range(300)]), 400)
    assert "Too many files" in assert_refusal(client.post(
        "/v1/images", files=[("image", (f"q{i}.jpg", image, "image/jpeg")) for i in range(300)]), 400)
    assert "Too many fields" in assert_refusal(client.post(
        "/v1/images", files={"image": ("a.jpg", image, "image/jpeg")}, data={"labels": [f"l{i}" for i in range(300)]}),
        400)
    assert "labels" in assert_refusal(client.post(  # under the field cap, over the label cap
        "/v1/images", files={"image": ("a.jpg", image, "image/jpeg")}, data={"labels": [f"l{i}" for i in range(70)]}),
        422)
    assert_still_serving(served)


def test_a_file_part_without_a_filename_is_not_an_image_file(served: Served) -> None:
    body, headers = multipart([(b'name="image"', jpeg((80, 10, 10)))])
    for route in ("/v1/search", "/v1/images"):
        assert "no 'image' file" in assert_refusal(served.client.post(route, content=body, headers=headers), 422)
    garbage, headers = multipart([(b'name="image"; filename="x.jpg"', b"\xff" * 40), (b"garbage", b"")])
    assert_refusal(served.client.post("/v1/images", content=garbage, headers=headers), 400, 422)
    no_boundary = served.client.post("/v1/search", content=b"--x--", headers={"content-type": "multipart/form-data"})
    assert "boundary" in assert_refusal(no_boundary, 400)
    assert_still_serving(served)


HOSTILE_NAMES = [b"../../escaped.jpg", b"/etc/passwd", b"..\\..\\escaped.jpg", b"a\x00b.jpg", b"\x1b[31mred\x1b[0m.jpg",
                 b"line\nbreak.jpg", "r\u202egpj.exe".encode(), b"%2e%2e%2fescaped.jpg"]


def test_hostile_filenames_are_only_names(served: Served, tmp_path: Path) -> None:
    """A filename never becomes a path: uploads are content-addressed inside the uploads folder, nothing is
    written anywhere else, and a refusal that quotes the name stays one printable line."""
    client = served.client
    broken = [f.truncated_jpeg(tmp_path / "broken" / "t.jpg"), f.garbage(tmp_path / "broken" / "g.jpg"),
              f.text_file(tmp_path / "broken" / "t.png"), f.empty(tmp_path / "broken" / "e.jpg")]
    before = files_outside_the_store(tmp_path)
    stored: set[Path] = set()
    for i, name in enumerate(HOSTILE_NAMES):
        body, headers = multipart([(b'name="image"; filename="' + name + b'"', broken[i % len(broken)].read_bytes())])
        message = assert_refusal(client.post("/v1/images", content=body, headers=headers), 422)
        assert message.endswith(("unrecognised format)", "empty file")) or "truncated" in message, message
        body, headers = multipart([(b'name="image"; filename="' + name + b'"', jpeg((i * 20, 100, 50)))])
        response = client.post("/v1/images", content=body, headers=headers)
        assert response.status_code == 200, (name, response.text)
        path = Path(response.json()["uri"])
        stored.add(path)
        data = path.read_bytes()
        assert path.parent.parent == served.settings.uploads and path.name.startswith(hashlib.sha256(data).hexdigest())
        answer = client.post("/v1/search", content=body, headers=headers).json()[0]  # the name is data, echoed
        assert answer["query"] == name.decode() and answer["results"][0]["id"] == response.json()["id"]
    assert files_outside_the_store(tmp_path) - before == stored
    for root in (tmp_path, tmp_path.parent, Path.cwd()):
        assert not (root / "escaped.jpg").exists()
    assert_still_serving(served)


def test_labels_and_sources_with_control_characters_or_10_kb_are_refused(served: Served) -> None:
    cases = [(field, value) for field in ("labels", "source")
             for value in ("a\x00b", "\x1b[31mred", "two\nlines", "del\x7f", "ne\x85l", "csi\x9b31m", "x" * 10_000)]
    for i, (field, value) in enumerate(cases):
        before = files_outside_the_store(served.settings.data_dir)
        image = jpeg((3, 140, 7 + 10 * i))  # new bytes each time: a refusal must not keep them
        response = served.client.post("/v1/images", files={"image": ("a.jpg", image, "image/jpeg")},
                                      data={field: value})
        assert assert_refusal(response, 422).startswith(f"{field.rstrip('s')} "), (field, value[:20])
        assert files_outside_the_store(served.settings.data_dir) == before, value[:20]  # nothing kept
        assert_still_serving(served)
    blank = served.client.post("/v1/images", files={"image": ("a.jpg", jpeg((3, 3, 3)), "image/jpeg")},
                               data={"labels": "  ,  ", "source": "   "})
    assert blank.status_code == 200, blank.text  # blank: no label, the default source


# ---------------------------------------------------------------------------------------------- hostile JSON
JSON_REFUSALS = [
    (b'{"ids":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "recursion limit"),
    (b"[" * 10_000 + b"]" * 10_000, "recursion limit"),
    (b'{"texts":["\\ud800"]}', "JSON"),
    (b'{"texts":["\\udc00 tail"]}', "JSON"),
    (b'{"ids":["\\ud83d"], "k": 3}', "JSON"),
    (b'{"ids":["%(id)s"],"min_score":NaN}', "min_score"),
    (b'{"ids":["%(id)s"],"min_score":Infinity}', "min_score"),
    (b'{"ids":["%(id)s"],"min_score":-Infinity}', "min_score"),
    (b'{"ids":["%(id)s"],"min_score":1e999}', "min_score"),
    (b'{"ids":["%(id)s"],"k":' + b"9" * 100 + b"}", "k:"),
    (b'{"ids":["%(id)s"],"k":' + b"9" * 5000 + b"}", "JSON"),
    (b'{"ids":["%(id)s"],"k":1e400}', "k:"),
    (b'{"ids":["%(id)s"],"k":-1}', "k:"),
    (b'{"ids":["%(id)s"],"two\\nlines\\u001b[2J":1}', "two\\nlines\\x1b[2J"),  # an unknown key, on one line
    (b'{"ids":["%(id)s"],"filter":["width=' + b"9" * 30 + b'"]}', "between"),
    (b'{"ids":["%(id)s"],"filter":["height=-9223372036854775809"]}', "between"),
    (b'{"ids":["%(id)s"],"filter":["lab\\nel=x"]}', "unknown field 'lab\\nel'"),
    (b'{"ids":[null]}', "ids.0"),
    (b"null", "object"),
    (b"\xff\xfe{}", "JSON"),
]


def test_json_bodies_parsers_choke_on_are_refused(served: Served) -> None:
    for raw, needle in JSON_REFUSALS:
        response = served.client.post("/v1/search", content=raw.replace(b"%(id)s", served.ids[0].encode()),
                                      headers={"content-type": "application/json"})
        assert needle in assert_refusal(response, 422), raw[:60]
        assert_still_serving(served)


def test_query_parameters_out_of_range_are_refused(served: Served) -> None:
    image = {"image": ("q.jpg", jpeg((200, 0, 0)), "image/jpeg")}
    for params, needle in [
        ({"k": "9" * 5000}, "query.k"), ({"k": "1e3"}, "query.k"), ({"min_score": "nan"}, "query.min_score"),
        ({"min_score": "inf"}, "query.min_score"), ({"min_score": "-Infinity"}, "query.min_score"),
        ({"filter": f"width={2**63}"}, "between"), ({"filter": "bytes=-" + "9" * 40}, "between"),
    ]:
        assert needle in assert_refusal(served.client.post("/v1/search", files=image, params=params), 422), params
        if "k" in params:
            assert needle in assert_refusal(served.client.post("/v1/images", files=image, params=params), 422)
        assert_still_serving(served)
    edge = served.client.post("/v1/search", files=image, params={"filter": f"width={2**63 - 1}"})
    assert edge.status_code == 200 and edge.json()[0]["results"] == []  # the largest int64 still filters


def test_the_neighbours_of_an_upload_are_capped_by_max_k(tmp_path: Path) -> None:
    for served in _serve(tmp_path, max_k=5):
        for i in range(5):
            served.client.post("/v1/images", files={"image": (f"{i}.jpg", jpeg((i * 50, 50, 50)), "image/jpeg")})
        image = {"image": ("q.jpg", jpeg((9, 9, 9)), "image/jpeg")}
        assert "LOOKALIKE_MAX_K" in assert_refusal(served.client.post("/v1/search", files=image, params={"k": 6}))
        response = served.client.post("/v1/images", files=image, params={"k": 1000})
        assert response.status_code == 200 and len(response.json()["neighbours"]) == 5


# ---------------------------------------------------------------------------------------------- ids and paths
def test_unknown_ids_and_path_tricks_get_404_or_400(served: Served) -> None:
    client = served.client
    for pid in ("00000000-0000-0000-0000-000000000000", BOGUS_ID, BOGUS_ID.upper(), f"{{{BOGUS_ID}}}"):
        assert "no point with id" in assert_refusal(client.get(f"/v1/points/{pid}"), 404)
        assert "no point with id" in assert_refusal(client.get(f"/v1/points/{pid}/thumbnail"), 404)
    answer = client.post("/v1/search", json={"ids": [BOGUS_ID, served.ids[0]], "k": 1}).json()
    assert answer[0] == {"query": BOGUS_ID, "kind": "id", "results": [], "error": f"no point with id {BOGUS_ID}"}
    assert len(answer[1]["results"]) == 1
    for path in ["/v1/points/%2e%2e/thumbnail", "/v1/points/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumbnail",
                 "/v1/points/..%2F..%2Fapi.py/thumbnail", "/v1/points/%00/thumbnail", "/v1/points/%0a/thumbnail",
                 f"/v1/points/{served.ids[0]}%2f..%2f/thumbnail", "/static/%2e%2e/api.py", "/static/..%2f..%2fapi.py",
                 "/static/%2e%2e%2f%2e%2e%2fsettings.py", "/v1/points/" + "%2e" * 70]:
        response = client.get(path)
        assert_refusal(response, 400, 404, 422)
        assert b"ServeSettings" not in response.content and b"def " not in response.content
    assert client.get(f"/v1/points/urn:uuid:{served.ids[0]}/thumbnail").status_code == 200  # a UUID spelling
    assert_still_serving(served)


def test_a_thumbnail_whose_file_is_gone_or_replaced_is_a_404(served: Served) -> None:
    point = served.client.get(f"/v1/points/{served.ids[2]}").json()
    stored = Path(point["payload"]["uris"][0])
    stored.unlink()
    stored.mkdir()
    assert "none of this point's files" in assert_refusal(served.client.get(f"/v1/points/{served.ids[2]}/thumbnail"),
                                                         404)
    stored.rmdir()
    os.mkfifo(stored)  # a reader must not hang on it
    assert_refusal(served.client.get(f"/v1/points/{served.ids[2]}/thumbnail", params={"size": 17}), 404)
    stored.unlink()
    assert_still_serving(served)


# ---------------------------------------------------------------------------------------------- bodies that lie
def asgi(app: Any, path: str, headers: dict[str, str], chunks: list[bytes], *, then: str = "wait",
         delay: float = 0.0) -> tuple[int, bytes]:
    """One request straight through the ASGI app, its body in ``chunks`` (each after ``delay`` s): what a server
    would pass on for a chunked body, or for a Content-Length it does not check. ``then="disconnect"``: the
    client goes away after the last chunk without ending the body. Any exception escaping the app fails."""

    async def call() -> tuple[int, bytes]:
        pending, out, done = list(chunks), {"status": 0, "body": b""}, asyncio.Event()

        async def receive() -> dict[str, Any]:
            if pending:
                await asyncio.sleep(delay)
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending) or then == "disconnect"}
            if then == "wait":
                await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                out["status"] = message["status"]
            elif message["type"] == "http.response.body":
                out["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    done.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {}}
        await app(scope, receive, send)
        return out["status"], out["body"]

    return asyncio.run(call())


def test_bodies_that_lie_about_their_length_are_refused(tmp_path: Path) -> None:
    for served in _serve(tmp_path, max_bytes=10_000):
        app, cap = served.client.app, served.settings.max_bytes + (1 << 20)
        as_json = {"content-type": "application/json"}
        ok = json.dumps({"ids": [served.ids[0]]}).encode()
        big = [b" " * 65_536] * (cap // 65_536 + 2)  # whitespace: valid JSON padding, over the cap
        form = {"content-type": "multipart/form-data; boundary=b"}
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        cases = [
            ("/v1/search", {**as_json, "content-length": "12abc"}, [ok], 400, "Content-Length is not a number"),
            ("/v1/search", {**as_json, "content-length": "-1"}, [ok], 400, "Content-Length is not a number"),
            ("/v1/search", {**as_json, "content-length": str(cap + 1)}, [ok], 413, "LOOKALIKE_MAX_BYTES"),
            ("/v1/search", {**as_json, "content-length": "10"}, [ok, *big], 413, "LOOKALIKE_MAX_BYTES"),  # smaller
            ("/v1/search", {**as_json, "transfer-encoding": "chunked"}, big, 413, "LOOKALIKE_MAX_BYTES"),
            ("/v1/images", {**form, "transfer-encoding": "chunked"}, [part, *big], 413, "LOOKALIKE_MAX_BYTES"),
            ("/v1/search", {**form, "transfer-encoding": "chunked"}, [part.replace(b"x.jpg", b"q.jpg"), *big], 413,
             "LOOKALIKE_MAX_BYTES"),
        ]
        for path, headers, chunks, status, needle in cases:
            got, body = asgi(app, path, headers, chunks)
            assert got == status and needle in json.loads(body)["error"], (path, headers, got, body[:300])
        # Bigger than the body: the client gives up before the rest arrives.
        got, body = asgi(app, "/v1/search", {**as_json, "content-length": str(len(ok) + 100)}, [ok],
                         then="disconnect")
        assert got == 400 and "went away" in json.loads(body)["error"]
        assert_still_serving(served)
        metrics = served.client.get("/metrics").text
        assert not [line for line in metrics.splitlines() if line.startswith("lookalike_http_requests_total")
                    and 'status="5' in line]


def test_a_slow_body_times_out_with_503_and_the_server_goes_on(tmp_path: Path) -> None:
    for served in _serve(tmp_path, points=0, request_timeout=1.0):  # (a first upload may take a second)
        body = json.dumps({"ids": [BOGUS_ID]}).encode()
        started = time.perf_counter()
        status, answer = asgi(served.client.app, "/v1/search", {"content-type": "application/json"},
                              [body[:5], body[5:]], delay=1.3)
        assert status == 503 and "LOOKALIKE_REQUEST_TIMEOUT" in json.loads(answer)["error"]
        assert time.perf_counter() - started < 10
        assert_still_serving(served)


def exchange(address: tuple[str, int], data: bytes, *, pause: float = 0.0, rest: bytes = b"",
             give_up: bool = False) -> bytes:
    """Send raw bytes (``rest`` after ``pause`` s), then read until the server closes; ``give_up``: close first."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
            with contextlib.suppress(OSError):
                sock.sendall(rest)
        if give_up:
            time.sleep(0.2)
            return b""
        received = b""
        while chunk := sock.recv(65_536):
            received += chunk
        return received


def head(extra: str, close: bool = True) -> bytes:
    return (f"POST /v1/search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}"
            f"{'Connection: close' if close else 'X-Keep: alive'}\r\n\r\n").encode()


def test_over_a_real_socket_lying_lengths_and_slow_bodies_get_an_answer(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn (h11) frames the body: the app sees what a real server passes on, and logs no exception."""
    import uvicorn

    for served in _serve(tmp_path, points=0, max_bytes=10_000, request_timeout=1.0):
        config = uvicorn.Config(served.client.app, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                                log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            for _ in range(250):
                if server.started:
                    break
                time.sleep(0.02)
            address = ("127.0.0.1", server.servers[0].sockets[0].getsockname()[1])
            ok = json.dumps({"ids": [BOGUS_ID]}).encode()
            # Smaller than the body: the app reads 5 bytes (not JSON); the rest would be a next request.
            smaller = exchange(address, head("Content-Length: 5\r\n", close=False) + ok + b"\r\n\r\n")
            assert smaller.startswith(b"HTTP/1.1 422") and b"Invalid JSON" in smaller, smaller[:300]
            assert b"HTTP/1.1 400" in smaller[20:], smaller  # the rest is uvicorn's to refuse, and it does
            # Bigger than the body: the client gives up waiting (the app is told it went away).
            exchange(address, head(f"Content-Length: {len(ok) + 100}\r\n") + ok, give_up=True)
            chunk = b" " * 65_536
            chunked = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
            over = exchange(address, head("Transfer-Encoding: chunked\r\n") + chunked)
            assert over.startswith(b"HTTP/1.1 413") and b"LOOKALIKE_MAX_BYTES" in over, over[:300]
            slow = exchange(address, head(f"Content-Length: {len(ok)}\r\n") + ok[:5], pause=1.6, rest=ok[5:])
            assert slow.startswith(b"HTTP/1.1 503") and b"LOOKALIKE_REQUEST_TIMEOUT" in slow, slow[:300]
            assert exchange(address, head(f"Content-Length: {len(ok)}\r\n") + ok).startswith(b"HTTP/1.1 200")
        finally:
            server.should_exit = True
            thread.join(10)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
        assert_still_serving(served)
