"""``lookalike serve``: the real FastAPI app over the embedded store, with the tiny fake model.

Every request goes through the whole app (middleware, auth, limits, error handlers) with Starlette's
TestClient; uploads land in a real uploads folder and are ingested by the real pipeline.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from search.errors import ConfigError
from tests import imagefactory as f
from tests.fakes import TinyEmbedder
from workers.serve.api import create_app
from workers.serve.batching import MicroBatcher
from workers.serve.service import Service
from workers.serve.settings import ServeSettings, serve_settings

KEY = "s3cret-key"
BOGUS_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=95)
    return out.getvalue()


def _client(settings: ServeSettings, embedder: Any = None) -> Iterator[TestClient]:
    service = Service(settings, embedder=embedder or TinyEmbedder())
    with TestClient(create_app(settings, service=service)) as client:
        service._ready.wait(10)
        yield client


@pytest.fixture
def settings(tmp_path: Path) -> ServeSettings:
    return serve_settings(data_dir=tmp_path / "data", model="tiny")


@pytest.fixture
def client(settings: ServeSettings) -> Iterator[TestClient]:
    yield from _client(settings)


def upload(client: TestClient, data: bytes, name: str = "a.jpg", **form: Any) -> Any:
    return client.post("/v1/images", files={"image": (name, data, "image/jpeg")}, data=form)


# ---------------------------------------------------------------------------------------------- the happy path
def test_an_upload_is_searchable_when_the_answer_comes(client: TestClient, settings: ServeSettings) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    first = upload(client, jpeg((200, 0, 0)), labels="red,apple")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["status"] == "indexed" and body["neighbours"] == []
    stored = Path(body["uri"])
    assert stored.is_file() and stored.is_relative_to(settings.uploads) and stored.suffix == ".jpg"

    second = upload(client, jpeg((190, 10, 0)), "b.jpg").json()
    assert second["neighbours"][0]["id"] == body["id"]  # found at once, by its own upload's answer
    assert {t["label"] for t in second["tags"]} == {"red", "apple"}  # tagged from its labelled neighbour

    hits = client.post("/v1/search", files={"image": ("q.jpg", jpeg((195, 5, 0)), "image/jpeg")},
                       params={"k": 5}).json()
    assert [h["id"] for h in hits[0]["results"]] == [second["id"], body["id"]]
    assert set(hits[0]) == {"query", "kind", "results"} and hits[0]["kind"] == "image"

    again = upload(client, jpeg((200, 0, 0)), "copy.jpg", labels="fruit").json()
    assert again["id"] == body["id"] and again["status"] == "updated"  # same bytes: one point, labels merged
    point = client.get(f"/v1/points/{body['id']}").json()
    assert point["payload"]["labels"] == ["red", "apple", "fruit"] and point["payload"]["source"] == "upload"
    assert client.get("/readyz").json()["ready"] is True
    info = client.get("/v1/collections").json()
    assert info["points"] == 2 and info["model"] == "tiny" and info["supports_text"] is False


def test_answers_come_in_query_order_and_bad_queries_get_errors(client: TestClient) -> None:
    a = upload(client, jpeg((0, 200, 0)), labels="green").json()["id"]
    b = upload(client, jpeg((0, 0, 200)), labels="blue").json()["id"]
    files = [("image", ("q.jpg", jpeg((0, 190, 10)), "image/jpeg")),
             ("image", ("broken.jpg", b"not an image at all", "image/jpeg"))]
    answers = client.post("/v1/search", files=files, params={"k": 1}).json()
    assert [x["query"] for x in answers] == ["q.jpg", "broken.jpg"]
    assert answers[0]["results"][0]["id"] == a and "error" not in answers[0]
    assert answers[1]["results"] == [] and answers[1]["error"] == "not an image (unrecognised format)"

    answers = client.post("/v1/search", json={"ids": [a, BOGUS_ID], "texts": ["a cat"], "k": 3}).json()
    assert [x["kind"] for x in answers] == ["text", "id", "id"]
    assert "embeds images only" in answers[0]["error"]
    assert [h["id"] for h in answers[1]["results"]] == [b]  # the query point itself is left out
    assert answers[2]["error"] == f"no point with id {BOGUS_ID}"

    only_blue = client.post("/v1/search", json={"ids": [a], "filter": ["label=green"]}).json()
    assert only_blue[0]["results"] == []
    filtered = client.post("/v1/search", files={"image": ("q.jpg", jpeg((0, 190, 10)), "image/jpeg")},
                           params={"filter": "label=blue"}).json()
    assert [h["id"] for h in filtered[0]["results"]] == [b]


def test_text_queries_on_a_model_that_embeds_texts(settings: ServeSettings) -> None:
    texts = {"green things": [0.0] * 191 + [1.0]}
    for client in _client(settings, TinyEmbedder(texts=texts)):
        upload(client, jpeg((0, 200, 0)))
        answer = client.post("/v1/search", json={"texts": ["green things"], "k": 1}).json()[0]
        assert answer["kind"] == "text" and "error" not in answer and len(answer["results"]) == 1
        assert client.get("/v1/collections").json()["supports_text"] is True


def test_an_empty_store_answers_with_errors_not_500(client: TestClient) -> None:
    answer = client.post("/v1/search", files={"image": ("q.jpg", jpeg((1, 2, 3)), "image/jpeg")}).json()[0]
    assert "is empty" in answer["error"] and answer["results"] == []
    assert client.get(f"/v1/points/{BOGUS_ID}").status_code == 404
    assert client.get("/readyz").status_code == 200  # an empty store is ready to take uploads


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("request_kw", "status", "needle"), [
    ({"json": {"ids": ["nope"]}}, 400, "is not a point id"),
    ({"json": {"ids": [BOGUS_ID], "filter": ["colour=red"]}}, 422, "unknown field 'colour'"),
    ({"json": {"ids": [BOGUS_ID], "filter": ["width=big"]}}, 422, "whole number"),
    ({"json": {"ids": [BOGUS_ID], "k": 1001}}, 422, "k:"),
    ({"json": {"ids": [BOGUS_ID], "k": 0}}, 422, "k:"),
    ({"json": {}}, 422, "at least one of"),
    ({"json": {"ids": [BOGUS_ID], "extra": 1}}, 422, "extra"),
    ({"json": {"urls": ["https://example.com/a.jpg"]}}, 422, "LOOKALIKE_FETCH_URLS"),
    ({"json": {"ids": [BOGUS_ID] * 65}}, 422, "at most 64 queries"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ({"files": {"other": ("x.txt", b"x", "text/plain")}}, 422, "no 'image' file"),
])
def test_bad_search_requests_get_a_4xx_with_the_reason(client: TestClient, request_kw: dict[str, Any],
                                                       status: int, needle: str) -> None:
    response = client.post("/v1/search", **request_kw)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and needle in response.json()["error"]


def test_hostile_uploads_are_refused_and_the_server_keeps_serving(client: TestClient, tmp_path: Path) -> None:
    good = upload(client, jpeg((10, 20, 30))).json()["id"]
    broken = f.write_broken_set(tmp_path / "broken")
    for path in broken:
        response = upload(client, path.read_bytes(), path.name)
        assert response.status_code == 422, (path.name, response.text)
        assert response.json()["error"].startswith(f"{path.name}: "), response.json()
    assert client.post("/v1/images", content=b"x", headers={"content-type": "image/jpeg"}).status_code == 415
    assert client.post("/v1/images", files={"file": ("a.jpg", b"x", "image/jpeg")}).status_code == 422
    assert upload(client, jpeg((1, 1, 1)), labels="\x1b[31mred").status_code == 422  # no terminal escapes
    assert upload(client, jpeg((1, 1, 1)), labels=",".join(f"l{i}" for i in range(65))).status_code == 422
    # Nothing broken was kept in the uploads folder, and the store still answers.
    kept = [p for p in (tmp_path / "data" / "uploads").rglob("*") if p.is_file()]
    assert len(kept) == 1
    assert client.get(f"/v1/points/{good}").status_code == 200
    assert client.get("/v1/collections").json()["points"] == 1


def test_bodies_over_the_cap_are_refused_before_they_are_read(tmp_path: Path) -> None:
    settings = serve_settings(data_dir=tmp_path / "data", model="tiny", max_bytes=20_000)
    for client in _client(settings):
        big = f.noise(tmp_path / "big.png", size=(1500, 1500)).read_bytes()
        assert len(big) > 20_000 + (1 << 20)
        response = upload(client, big, "big.png")
        assert response.status_code == 413 and "LOOKALIKE_MAX_BYTES" in response.json()["error"]
        # Just under the request cap but over the per-image cap: the reader's own limit names it.
        mid = f.noise(tmp_path / "mid.png", size=(120, 120)).read_bytes()
        response = upload(client, mid, "mid.png")
        assert response.status_code in (200, 422)
        assert client.get("/healthz").status_code == 200


def test_pixel_bombs_are_refused(tmp_path: Path) -> None:
    settings = serve_settings(data_dir=tmp_path / "data", model="tiny", max_pixels=1_000_000)
    for client in _client(settings):
        bomb = f.png_bomb(tmp_path / "bomb.png").read_bytes()
        response = upload(client, bomb, "bomb.png")
        assert response.status_code == 422 and "LOOKALIKE_MAX_PIXELS" in response.json()["error"]


# ---------------------------------------------------------------------------------------------- keys, CORS, bind
def test_an_api_key_guards_writes_and_optionally_reads(tmp_path: Path) -> None:
    settings = serve_settings(data_dir=tmp_path / "data", model="tiny", api_key=KEY)
    for client in _client(settings):
        refused = upload(client, jpeg((5, 5, 5)))
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/images", files={"image": ("a.jpg", jpeg((5, 5, 5)), "image/jpeg")},
                            headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/v1/images", files={"image": ("a.jpg", jpeg((5, 5, 5)), "image/jpeg")},
                         headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert client.post("/v1/search", json={"ids": [ok.json()["id"]]}).status_code == 200  # reads stay open
    settings = serve_settings(data_dir=tmp_path / "data2", model="tiny", api_key=KEY, protect_reads=True)
    for client in _client(settings):
        assert client.post("/v1/search", json={"ids": [BOGUS_ID]}).status_code == 401
        assert client.get(f"/v1/points/{BOGUS_ID}").status_code == 401
        assert client.post("/v1/search", json={"ids": [BOGUS_ID]},
                           headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no key
    assert KEY not in repr(settings) and KEY not in str(settings)


def test_cors_is_off_unless_configured(client: TestClient, tmp_path: Path) -> None:
    asked = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/search", headers=asked).headers
    settings = serve_settings(data_dir=tmp_path / "d2", model="tiny", cors_origins="https://app.example")
    for other in _client(settings):
        response = other.options("/v1/search", headers=asked)
        assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_listening_beyond_loopback_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LOOKALIKE_API_KEY"):
        serve_settings(host="0.0.0.0").check_bind()
    serve_settings(host="0.0.0.0", api_key=KEY).check_bind()
    serve_settings(host="0.0.0.0", allow_public=True).check_bind()
    serve_settings(host="::1").check_bind()
    from search.cli import main

    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "without an API key" in result.output


def test_an_uploads_folder_outside_the_allowed_roots_is_refused(tmp_path: Path) -> None:
    settings = serve_settings(data_dir=tmp_path / "data", allowed_roots=(tmp_path / "photos",))
    with pytest.raises(ConfigError, match="LOOKALIKE_UPLOADS_DIR"):
        create_app(settings, start=False)


# ---------------------------------------------------------------------------------------------- thumbnails
def test_thumbnails_come_from_stored_files_inside_the_roots(tmp_path: Path) -> None:
    from ingest.pipeline import Pipeline
    from ingest.sources import ImageRef

    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    inside = f.solid(photos / "in.jpg", size=(400, 300), color=(200, 100, 0))
    outside = f.solid(elsewhere / "out.jpg", size=(400, 300), color=(0, 100, 200))
    changed = f.solid(photos / "changed.jpg", size=(400, 300), color=(0, 200, 0))
    base = serve_settings(data_dir=tmp_path / "data", model="tiny")
    with Pipeline(base, embedder=TinyEmbedder(), tagger=False) as pipeline:  # indexed before the roots were set
        ids = [o.id for o in pipeline.ingest([ImageRef(str(p)) for p in (inside, outside, changed)])]
    f.solid(changed, size=(400, 300), color=(1, 2, 3))  # edited since: its bytes no longer match the point
    settings = base.replace(allowed_roots=(photos, tmp_path / "data"))
    for client in _client(settings):
        thumb = client.get(f"/v1/points/{ids[0]}/thumbnail", params={"size": 64})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert "immutable" in thumb.headers["cache-control"]
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
        for pid in ids[1:]:
            refused = client.get(f"/v1/points/{pid}/thumbnail")
            assert refused.status_code == 404 and "none of this point's files" in refused.json()["error"]
        assert client.get(f"/v1/points/{ids[0]}/thumbnail", params={"size": 5000}).status_code == 422
        assert client.get("/v1/points/..%2F..%2Fetc%2Fpasswd/thumbnail").status_code in (400, 404)


# ---------------------------------------------------------------------------------------------- batching, metrics
def test_queries_arriving_together_share_one_model_call() -> None:
    calls: list[int] = []

    def embed(items: list[Any]) -> np.ndarray:
        calls.append(len(items))
        time.sleep(0.05)
        return np.asarray(items, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)

    batcher = MicroBatcher(embed, max_batch=16, wait=0.2)
    results: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: batcher.submit(i).result(5)}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.close()
    assert sum(calls) == 8 and len(calls) <= 2  # 8 concurrent queries, one (at most two) model calls
    assert all(results[i].tolist() == [i, i, i] for i in range(8))  # each got its own row


def test_a_failing_model_call_fails_its_requests_not_the_batcher() -> None:
    def embed(items: list[Any]) -> np.ndarray:
        if "bad" in items:
            raise RuntimeError("boom")
        return np.ones((len(items), 2), np.float32)

    batcher = MicroBatcher(embed, wait=0.0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit("bad").result(5)
    assert batcher.submit("good").result(5).tolist() == [1.0, 1.0]
    batcher.close()


def test_metrics_count_requests_uploads_and_points(client: TestClient) -> None:
    upload(client, jpeg((9, 9, 9)))
    client.post("/v1/search", json={"ids": ["bad"]})
    client.post("/v1/search", files={"image": ("q.jpg", jpeg((8, 8, 8)), "image/jpeg")})
    text = client.get("/metrics").text
    assert 'lookalike_http_requests_total{method="POST",route="/v1/images",status="200"} 1.0' in text
    assert 'lookalike_http_requests_total{method="POST",route="/v1/search",status="400"} 1.0' in text
    assert 'lookalike_uploads_total{outcome="indexed"} 1.0' in text
    assert 'lookalike_points{collection="lookalike_tiny"} 1.0' in text
    assert 'lookalike_ingest_events_total{lane="serve",outcome="indexed"} 1.0' in text
    assert 'lookalike_ingest_freshness_seconds_count{lane="serve"} 1.0' in text
    assert 'lookalike_ingest_stage_seconds_count{stage="embed"} 1.0' in text
    assert 'lookalike_http_request_duration_seconds_count{method="POST",route="/v1/images"} 1.0' in text
    assert 'lookalike_embed_batch_size_count{kind="image"} 1.0' in text
    assert 'lookalike_embed_duration_seconds_count{kind="upload"} 1.0' in text


def test_the_page_and_the_openapi_document_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "lookalike" in page.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/images", "/v1/points/{point_id}", "/v1/collections"} <= set(spec["paths"])
    content = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)


def test_delete_and_forget_over_http(tmp_path: Path) -> None:
    settings = serve_settings(data_dir=tmp_path / "data", model="tiny", api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    for client in _client(settings):
        a = client.post("/v1/images", files={"image": ("a.jpg", jpeg((200, 0, 0)), "image/jpeg")}, headers=auth)
        b = client.post("/v1/images", files={"image": ("b.jpg", jpeg((0, 0, 200)), "image/jpeg")}, headers=auth)
        a_id, b_uri = a.json()["id"], b.json()["uri"]
        assert client.delete(f"/v1/points/{a_id}").status_code == 401  # a write: the key is needed
        assert client.delete(f"/v1/points/{a_id}", headers=auth).json()["status"] == "deleted"
        assert client.delete(f"/v1/points/{a_id}", headers=auth).status_code == 404
        assert client.delete("/v1/points/nope", headers=auth).status_code == 400
        gone = client.post("/v1/forget", json={"uris": [b_uri, "/not/indexed.jpg"]}, headers=auth).json()
        assert [(g["status"], g["ids"]) for g in gone] == [("deleted", [b.json()["id"]]), ("absent", [])]
        assert client.post("/v1/forget", json={"uris": []}, headers=auth).status_code == 422
        assert client.get("/v1/collections").json()["points"] == 0


def test_a_server_on_a_store_without_an_alias_stays_on_its_collection(settings: ServeSettings) -> None:
    """follow_alias compares the model's own collection when no alias exists yet (it used to swap every 2 s,
    and a query caught in the swap waited forever on the closed batcher)."""
    service = Service(settings, embedder=TinyEmbedder())
    service.start(wait=True)
    try:
        assert service.searcher is not None and service.searcher.follow_alias() is False
    finally:
        service.close()


def test_a_closed_batcher_fails_what_it_still_holds() -> None:
    release = threading.Event()

    def slow(items: list[Any]) -> np.ndarray:
        release.wait(5)
        return np.ones((len(items), 2), np.float32)

    batcher = MicroBatcher(slow, wait=0.0)
    first = batcher.submit(1)  # taken by the thread, which now waits in `slow`
    time.sleep(0.1)
    queued = batcher.submit(2)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    release.set()
    closer.join(10)
    assert first.result(5).tolist() == [1.0, 1.0]
    queued.exception(5)  # run before the stop, or failed by close: either way it does not wait forever
    assert queued.done()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3).result(1)
