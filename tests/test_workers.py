"""Workers end to end: a real redis-server, real ``celery worker`` processes, the real pipeline and embedded
store; the network is the tiny thumbnail embedder of ``tests/worker_app.py`` (the real model runs in the
``slow`` test). Each test observes the worker through Redis (``test:started`` / ``test:done``), then stops
it and opens the store itself to check what was stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from search.schema import point_id, sha256_hex
from tests.redis_server import RedisServer
from tests.workerproc import REPO, Env, Worker, photo
from workers.deadletters import DeadLetters
from workers.events import BACKFILL_QUEUE, INGEST_TASK, LIVE_QUEUE, celery_message, make_event
from workers.tasks import YIELD_EVERY

pytestmark = pytest.mark.redis


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> Iterator[Env]:
    e = Env(tmp_path, redis_url)
    yield e
    e.stop()


def _tiny_vector(path: Path) -> np.ndarray:
    from tests.fakes import TinyEmbedder

    with Image.open(path) as img:
        return TinyEmbedder().embed_images([img.convert("RGB")])


# ---------------------------------------------------------------------------------------------- tests
def test_event_makes_image_searchable_with_tags(env: Env) -> None:
    from ingest.sources import ImageRef
    from workers.producer import enqueue_refs

    labelled = [ImageRef(str(photo(env.root / "red" / f"r{i}.jpg", i, base=1, noise=8)), ("red",)) for i in range(3)]
    labelled += [ImageRef(str(photo(env.root / "blue" / f"b{i}.jpg", i, base=2, noise=8)), ("blue",)) for i in range(3)]
    env.start()
    assert enqueue_refs(labelled, env.settings(), queue="backfill", chunk_size=4) == 2
    env.wait(lambda: len(env.done()) == 6, what="the labelled images")
    new = photo(env.root / "upload" / "new.jpg", 99, base=1, noise=8)
    sent = time.time()
    env.send(make_event(str(new), source="uploads", event_id="e-1", sent_at=sent))
    env.wait(lambda: len(env.done()) == 7, what="the upload")
    record = env.done()[-1]
    assert record["status"] == "indexed" and record["uri"] == str(new)
    assert record["t"] - sent < 2.0
    env.stop()

    store = env.store()
    try:
        assert store.count() == 7
        hit = store.search(_tiny_vector(new), k=1)[0][0]
        assert hit.id == point_id(sha256_hex(new.read_bytes()))
        assert hit.uris == [str(new)] and hit.payload["source"] == "uploads"
        assert [t["label"] for t in hit.tags] == ["red"]
        assert set(hit.tags[0]["neighbours"]) <= {point_id(sha256_hex(Path(r.uri).read_bytes())) for r in labelled[:3]}
    finally:
        store.close()
    assert env.dead().count() == 0


def test_killed_child_is_redelivered_and_stored_once(env: Env) -> None:
    image = photo(env.root / "slow.jpg", 5)
    worker = env.start(LOOKALIKE_TEST_TASK_DELAY="2")
    env.send(make_event(str(image)))
    env.wait(lambda: len(env.started()) == 1, what="the task to start")
    victim = env.started()[0]["pid"]
    assert victim != worker.proc.pid  # the prefork child, not the worker's main process
    os.kill(victim, signal.SIGKILL)
    env.wait(lambda: len(env.done()) == 1, timeout=40, what="the redelivered task")
    started = env.started()
    assert len(started) == 2 and started[1]["pid"] != victim
    time.sleep(0.5)  # nothing else arrives: completed once
    assert [d["status"] for d in env.done()] == ["indexed"]
    env.stop()
    store = env.store()
    try:
        assert store.count() == 1
        (point,) = store.retrieve([point_id(sha256_hex(image.read_bytes()))])
        assert point.payload["uris"] == [str(image)]
    finally:
        store.close()
    assert env.dead().count() == 0
    assert env.redis.llen(LIVE_QUEUE) == 0 and env.redis.hlen("unacked") == 0


def test_redis_restart_loses_and_doubles_nothing(env: Env, redis_server: RedisServer) -> None:
    images = [photo(env.root / f"q{i}.jpg", 100 + i) for i in range(12)]
    env.start(LOOKALIKE_TEST_TASK_DELAY="0.25")
    for p in images:
        env.send(make_event(str(p)))
    env.wait(lambda: len(env.done()) >= 3, what="a few events")
    redis_server.restart(down_for=1.0)  # the queued events live in the AOF; the worker reconnects
    env.wait(lambda: {d["uri"] for d in env.done()} >= {str(p) for p in images}, timeout=60,
             what="every event after the restart")
    # What the lost connection held is put back by the worker itself (not after the 600 s visibility
    # timeout): nothing stays unacknowledged.
    env.wait(lambda: env.redis.hlen("unacked") == env.redis.hlen("lookalike:holders") == 0, timeout=15,
             what="nothing left unacknowledged")
    time.sleep(1.0)
    done = env.done()
    indexed = [d["uri"] for d in done if d["status"] == "indexed"]
    assert sorted(indexed) == sorted(map(str, images))  # each image indexed exactly once
    assert all(d["status"] in ("indexed", "present") for d in done)  # a redelivery changes nothing
    env.stop()
    store = env.store()
    try:
        assert store.count() == len(images)
    finally:
        store.close()
    assert env.dead().count() == 0


def test_store_down_retries_then_dead_letters_and_replays(env: Env) -> None:
    first, second = photo(env.root / "a.jpg", 1), photo(env.root / "b.jpg", 2)
    # 3 injected faults, 2 retries: the first event fails 3 times (dead letter), the second then succeeds.
    env.start(LOOKALIKE_TEST_STORE_FAULTS="3", LOOKALIKE_MAX_RETRIES="2", LOOKALIKE_RETRY_BACKOFF="1")
    env.send(make_event(str(first), event_id="first"))
    env.wait(lambda: env.dead().count() == 1, what="the dead letter")
    (entry,) = env.dead().list()
    assert entry.attempts == 3 and "StoreUnavailable" in entry.reason and "3 attempts" in entry.reason
    assert entry.event["uri"] == str(first) and entry.queue == LIVE_QUEUE
    assert len(env.started()) == 3 and env.done() == []

    env.send(make_event(str(second)))
    env.wait(lambda: len(env.done()) == 1, what="the second event")
    assert env.done()[0]["status"] == "indexed"

    from workers.app import make_app

    app = make_app(env.settings())
    sent, skipped = env.dead().replay(lambda ev, q: app.send_task(INGEST_TASK, args=[ev], queue=q))
    assert (sent, skipped) == (1, [])
    env.wait(lambda: len(env.done()) == 2, what="the replayed event")
    assert env.done()[1] == {**env.done()[1], "uri": str(first), "status": "indexed"}
    assert env.dead().count() == 0


def test_transient_failures_retry_until_the_store_returns(env: Env) -> None:
    image = photo(env.root / "c.jpg", 3)
    env.start(LOOKALIKE_TEST_STORE_FAULTS="3", LOOKALIKE_RETRY_BACKOFF="1")
    t0 = time.time()
    env.send(make_event(str(image)))
    env.wait(lambda: len(env.done()) == 1, what="the event once the store is back")
    assert env.done()[0]["status"] == "indexed"
    assert len(env.started()) == 4  # three attempts met the fault, the fourth succeeded
    assert time.time() - t0 < 20
    assert env.dead().count() == 0


def test_an_image_server_that_is_briefly_down_is_retried_not_dead_lettered(env: Env) -> None:
    """HTTP 503 twice, then the image: the event is retried with backoff and indexed (a 404 would not be)."""
    import http.server
    import threading

    body = photo(env.tmp / "remote.jpg", 5).read_bytes()
    calls: list[int] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            calls.append(1)
            status, data = (503, b"busy") if len(calls) <= 2 else (200, body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env.start(LOOKALIKE_FETCH_URLS="1", LOOKALIKE_FETCH_ALLOW_NETWORKS="127.0.0.0/8", LOOKALIKE_RETRY_BACKOFF="1")
        env.send(make_event(f"http://127.0.0.1:{httpd.server_address[1]}/remote.jpg"))
        env.wait(lambda: any(d["status"] == "indexed" for d in env.done()), what="the event after the server is back")
        assert len(calls) == 3 and env.dead().count() == 0
    finally:
        httpd.shutdown()


def test_poison_events_are_dead_lettered_and_good_ones_go_through(env: Env) -> None:
    from tests import imagefactory

    outside = env.tmp / "outside"
    secret = photo(outside / "secret.jpg", 7)
    good = [photo(env.root / f"good{i}.jpg", 20 + i) for i in range(3)]
    corrupt = env.root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    missing = env.root / "later.jpg"
    escape = env.root / "escape.jpg"
    escape.symlink_to(secret)
    dotdot = f"{env.root}/../outside/secret.jpg"
    assert imagefactory  # the shared factory of broken files exists; a truncated one is added below
    truncated = env.root / "truncated.jpg"
    truncated.write_bytes(photo(env.tmp / "full.jpg", 8).read_bytes()[:300])

    env.start()
    env.send(make_event(str(good[0])))
    env.send(make_event(str(corrupt), event_id="corrupt"))
    env.send(make_event(str(missing), event_id="missing"))
    env.send('{"version": 1, "uri": ')  # invalid JSON
    env.send(make_event(str(good[1])))
    env.send(make_event(str(secret), event_id="outside"))
    env.send(make_event(str(escape), event_id="symlink"))
    env.send({"version": 1, "uri": dotdot, "event_id": "dotdot"})
    env.send({"version": 2, "uri": str(good[2])})  # unknown version
    env.send({"version": 1, "uri": str(good[2]), "colour": "red"})  # unknown field
    env.send(make_event(str(truncated), event_id="truncated"))
    # A message whose body is not even JSON (Celery cannot decode it):
    env.redis.lpush(LIVE_QUEUE, json.dumps({**json.loads(celery_message(INGEST_TASK, [], LIVE_QUEUE)),
                                            "body": "bm90IGpzb24="}))
    env.send(make_event(str(good[2])))

    env.wait(lambda: env.dead().count() == 10 and len([d for d in env.done() if d["status"] == "indexed"]) == 3,
             what="10 dead letters and 3 good images")
    indexed = sorted(d["uri"] for d in env.done() if d["status"] == "indexed")
    assert indexed == sorted(map(str, good))
    reasons = {(e.event.get("event_id") if isinstance(e.event, dict) else None) or str(e.event)[:20]: e.reason
               for e in env.dead().list()}
    assert "outside the allowed roots" in reasons["outside"]
    assert "outside the allowed roots" in reasons["symlink"]
    assert "outside the allowed roots" in reasons["dotdot"]
    assert "not found" in reasons["missing"] or "no such file" in reasons["missing"].lower()
    assert reasons["corrupt"] and reasons["truncated"]
    assert any("not valid JSON" in r for r in reasons.values())
    assert any("unsupported version 2" in r for r in reasons.values())
    assert any("unknown field 'colour'" in r for r in reasons.values())
    assert any("cannot decode the message body" in r for r in reasons.values())
    assert not any(d["uri"] == str(secret) and d["status"] != "failed" for d in env.done())

    # Fix the files, replay everything: the fixed ones are ingested, the hopeless ones stay.
    photo(corrupt, 30)
    photo(missing, 31)
    from workers.app import make_app

    app = make_app(env.settings())
    ids = [e.id for e in env.dead().list() if isinstance(e.event, dict) and e.event.get("event_id") in
           ("corrupt", "missing")]
    sent, skipped = env.dead().replay(lambda ev, q: app.send_task(INGEST_TASK, args=[ev], queue=q), ids)
    assert (sent, skipped) == (2, [])
    env.wait(lambda: len([d for d in env.done() if d["status"] == "indexed"]) == 5, what="the replayed events")
    assert env.dead().count() == 8
    env.stop()
    store = env.store()
    try:
        assert store.count() == 5
        assert store.retrieve([point_id(sha256_hex(secret.read_bytes()))]) == []
    finally:
        store.close()


class _Unpickled:
    """Unpickling this would create ``path``: the poison test checks that nothing ever unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _poison_messages(env: Env, marker: Path) -> list[tuple[str, Any, str]]:
    """(label, raw Redis list item, expected reason) for every kind of message that is not a valid task.
    The label appears in what the dead letter keeps, so each entry can be matched to its message."""
    import base64
    import pickle

    def b64(data: str | bytes) -> str:
        return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()

    def base(label: str, task: str = INGEST_TASK) -> dict[str, Any]:
        event = make_event(str(env.root / f"{label}.jpg"), event_id=label)
        message = json.loads(celery_message(task, [event], LIVE_QUEUE))
        message["headers"]["origin"] = label
        return message

    def header(label: str, key: str, value: Any) -> dict[str, Any]:
        message = base(label)
        if value is _DELETE:
            del message["headers"][key]
        else:
            message["headers"][key] = value
        return message

    def body(label: str, text: str | bytes, content_type: str = "application/json") -> dict[str, Any]:
        return {**base(label), "body": b64(text), "content-type": content_type}

    def event(label: str) -> dict[str, Any]:
        return make_event(str(env.root / f"{label}.jpg"), event_id=label)

    future = "2999-01-01T00:00:00+00:00"
    return [
        ("P01", header("P01", "id", _DELETE), "header 'id' must be a non-empty string"),
        ("P02", header("P02", "task", _DELETE), "header 'task' must be a non-empty string"),
        ("P03", header("P03", "id", 42), "header 'id' must be a non-empty string (the task id), got int"),
        ("P04", {**base("P04"), "headers": ["P04", "lookalike.ingest"]}, "'headers' must be an object"),
        ("P05", body("P05", pickle.dumps(_Unpickled(marker)) + b"P05", "application/x-python-serialize"),
         "'application/x-python-serialize' is refused"),
        ("P06", body("P06", "- P06", "application/x-yaml"), "'application/x-yaml' is refused"),
        ("P07", {**base("P07"), "body": "%%%P07 is not base64"}, "not valid base64"),
        ("P08", body("P08", json.dumps({"args": ["P08"]})), "the body must be [args, kwargs, embed], not dict"),
        ("P09", body("P09", json.dumps([[event("P09")], {}])), "not list of 2"),
        ("P10", body("P10", json.dumps([[event("P10"), event("P10")], {}, {}])), "takes one argument"),
        ("P11", header("P11", "task", "lookalike.ingset"), "unknown task 'lookalike.ingset'"),
        ("P12", b"\xffP12 is not JSON at all", "not a JSON message"),
        ("P13", {k: v for k, v in base("P13").items() if k != "properties"}, "'properties' must be an object"),
        ("P14", header("P14", "eta", "tomorrow"), "header 'eta' is not an ISO-8601 time"),
        ("P15", header("P15", "eta", future), "header 'eta' is more than"),
        ("P16", header("P16", "expires", "2000-01-01T00:00:00+00:00"), "expired at"),
        ("P17", header("P17", "timelimit", "soon"), "header 'timelimit' must be"),
        ("P18", header("P18", "retries", "3"), "header 'retries' must be"),
        ("P19", body("P19", json.dumps([[event("P19")], {}, {"chain": [{"task": INGEST_TASK}]}])),
         "chains and chords are not accepted"),
        ("P20", body("P20", "P20 {not json"), "cannot decode the message body"),
        ("P21", header("P21", "task", "celery.backend_cleanup"), "unknown task 'celery.backend_cleanup'"),
        ("P22", {**base("P22"), "headers": {"origin": "P22"}}, "header 'id' must be"),
    ]


_DELETE = object()


def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(env: Env) -> None:
    """Issue: a message whose headers lack ``id`` made the consumer raise, reconnect, get it back and loop
    until RestartFreqExceeded. Every kind of message that is not a valid task is now one dead letter with
    its reason and is acknowledged; the good events around them are all indexed, by the same worker."""
    marker = env.tmp / "unpickled"
    poison = _poison_messages(env, marker)
    good = [photo(env.root / f"ok{i}.jpg", 300 + i) for i in range(len(poison) + 1)]
    worker = env.start()
    env.send(make_event(str(good[0])))
    for (_, raw, _), image in zip(poison, good[1:], strict=True):
        env.redis.lpush(LIVE_QUEUE, raw if isinstance(raw, bytes) else json.dumps(raw))
        env.send(make_event(str(image)))
    env.wait(lambda: len(env.done()) == len(good) and env.dead().count() == len(poison), timeout=60,
             what="every good event and a dead letter per poison message")
    assert sorted(d["uri"] for d in env.done() if d["status"] == "indexed") == sorted(map(str, good))
    entries = env.dead().list(limit=None)
    for label, _, reason in poison:
        (entry,) = [e for e in entries if label in json.dumps(e.event, ensure_ascii=False)]
        assert reason in entry.reason, (label, entry.reason)
        assert entry.queue == LIVE_QUEUE and entry.attempts == 1
    assert not marker.exists()  # the pickle was never unpickled
    assert env.redis.llen(LIVE_QUEUE) == 0 and env.redis.hlen("unacked") == 0
    assert env.redis.hlen("lookalike:holders") == 0
    log = worker.text()
    assert worker.proc.poll() is None and log.count(" ready.") == 1, log[-3000:]
    assert "RestartFreqExceeded" not in log and "Traceback" not in log, log[-3000:]

    # A typo in the task name loses nothing: the kept event replays once the producer is fixed.
    (typo,) = [e for e in entries if "P11" in json.dumps(e.event)]
    from workers.app import make_app

    app = make_app(env.settings())
    photo(env.root / "P11.jpg", 9311)
    assert env.dead().replay(lambda ev, q: app.send_task(INGEST_TASK, args=[ev], queue=q), [typo.id]) == (1, [])
    env.wait(lambda: any(d["uri"] == str(env.root / "P11.jpg") and d["status"] == "indexed" for d in env.done()),
             what="the replayed event")


def _indexed_once(env: Env, images: list[Path], *data_dirs: Path) -> None:
    """Each image indexed exactly once (no second 'indexed', no duplicate point, no duplicate uri) across
    the given stores."""
    indexed = [d["uri"] for d in env.done() if d["status"] == "indexed"]
    assert sorted(indexed) == sorted(map(str, images)), indexed
    points = [p for data in data_dirs for p in env.points(data)]
    assert sorted(p.id for p in points) == sorted(point_id(sha256_hex(i.read_bytes())) for i in images)
    assert all(len(p.payload["uris"]) == len(set(p.payload["uris"])) == 1 for p in points)
    assert env.dead().count() == 0
    assert env.redis.llen(LIVE_QUEUE) == 0 and env.redis.hlen("unacked") == 0
    assert env.redis.hlen("lookalike:holders") == 0


def test_whole_worker_killed_its_event_is_taken_by_another_worker_within_seconds(env: Env) -> None:
    """Issue: a whole worker killed (OOM killer, kill -9) kept its message invisible for the 600 s visibility
    timeout. With the default settings a live worker now takes it over within 15 s of the kill."""
    slow = photo(env.root / "held.jpg", 400)
    others = [photo(env.root / f"other{i}.jpg", 401 + i) for i in range(3)]
    second = env.tmp / "data-b"  # each worker owns an embedded store of its own
    victim = env.start(LOOKALIKE_TEST_TASK_DELAY="60")
    env.send(make_event(str(slow)))
    env.wait(lambda: len(env.started()) == 1, what="the victim to start the event")
    env.start(LOOKALIKE_DATA_DIR=str(second))
    for image in others:
        env.send(make_event(str(image)))
    env.wait(lambda: len(env.done()) == 3, what="the other events, on the live worker")
    time.sleep(4.5)  # longer than the heartbeat TTL and grace: a live holder's message is never taken
    assert [s["uris"] for s in env.started()].count([str(slow)]) == 1
    killed = victim.kill_all()
    env.wait(lambda: any(d["uri"] == str(slow) for d in env.done()), timeout=30, what="the held event")
    took = next(d["t"] for d in env.done() if d["uri"] == str(slow)) - killed
    print(f"\nwhole-worker kill → event indexed by another worker in {took:.2f} s")
    assert took < 15, took
    time.sleep(1.0)
    env.stop()
    _indexed_once(env, [slow, *others], env.data, second)


def test_whole_worker_killed_on_the_embedded_store_its_replacement_takes_over(env: Env) -> None:
    """The embedded store allows one worker: the killed worker's lock dies with it, its replacement starts
    and ingests the held event (first) and the queued ones, each exactly once, within 15 s of being ready."""
    images = [photo(env.root / f"e{i}.jpg", 500 + i) for i in range(4)]
    victim = env.start(LOOKALIKE_TEST_TASK_DELAY="60")
    for image in images:
        env.send(make_event(str(image)))
    env.wait(lambda: len(env.started()) == 1, what="the victim to start an event")
    held = env.started()[0]["uris"]
    victim.kill_all()
    replacement = env.start()  # the embedded store's lock was released with the killed processes
    assert replacement.ready_at is not None
    env.wait(lambda: len(env.done()) == len(images), timeout=30, what="every event on the replacement")
    done = env.done()
    took = next(d["t"] for d in done if [d["uri"]] == held) - replacement.ready_at
    print(f"\nwhole-worker kill → held event indexed {took:.2f} s after the replacement was ready")
    assert took < 15, took
    time.sleep(1.0)
    env.stop()
    _indexed_once(env, images, env.data)


def test_uploads_overtake_a_backfill(env: Env) -> None:
    from ingest.sources import ImageRef
    from workers.producer import enqueue_refs

    bulk = [ImageRef(str(photo(env.root / "bulk" / f"{i}.jpg", 200 + i))) for i in range(96)]
    upload = photo(env.root / "upload.jpg", 999)
    env.start(LOOKALIKE_TEST_TASK_DELAY="0.4")  # every ingest call (a sub-batch, or one upload) +0.4 s
    assert enqueue_refs(bulk, env.settings(), queue="backfill", chunk_size=48) == 2  # 2 chunks of 48
    env.wait(lambda: len(env.started()) >= 1, what="the backfill to start")
    sent = time.time()
    env.send(make_event(str(upload), sent_at=sent))
    env.wait(lambda: any(d["uri"] == str(upload) for d in env.done()), what="the upload")
    order = [d["uri"] for d in env.done()]
    live = next(d for d in env.done() if d["uri"] == str(upload))
    latency = live["t"] - sent
    env.wait(lambda: len(env.done()) == 97, timeout=60, what="the rest of the backfill")
    before = env.done()[:order.index(str(upload))]
    # Without priority the upload would wait for both chunks (96 images); it waited for the sub-batch in
    # progress only (YIELD_EVERY images, or two sub-batches if it arrived just as the next one began).
    assert len(before) <= 2 * YIELD_EVERY, len(before)
    assert latency < 3.0, latency
    assert sorted(d["uri"] for d in env.done() if d["status"] == "indexed") == sorted(
        [r.uri for r in bulk] + [str(upload)])


def test_second_worker_on_one_embedded_store_is_refused(env: Env) -> None:
    env.start()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "lookalike"), "worker"] if (REPO / ".venv").exists()
                          else [sys.executable, "-m", "search.cli", "worker"],
                          env=env.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "in use by PID" in proc.stderr and "LOOKALIKE_QDRANT_URL" in proc.stderr
    assert proc.stderr.count("\n") <= 2  # one clear line, no traceback


def test_threads_pool_worker_owns_the_embedded_store_in_one_process(env: Env) -> None:
    images = [photo(env.root / f"t{i}.jpg", 40 + i) for i in range(4)]
    worker = env.start(pool="threads", concurrency=2)
    for p in images:
        env.send(make_event(str(p)))
    env.wait(lambda: len(env.done()) == 4, what="4 events")
    assert {d["pid"] for d in env.done()} == {worker.proc.pid}  # no child process: the worker itself
    assert sorted(d["uri"] for d in env.done() if d["status"] == "indexed") == sorted(map(str, images))


def test_worker_that_cannot_load_its_model_stops_and_leaves_events_queued(env: Env) -> None:
    image = photo(env.root / "a.jpg", 1)
    env.send(make_event(str(image)))
    worker = Worker(env.env(LOOKALIKE_TEST_REAL_MODEL="1", LOOKALIKE_MODEL=str(env.tmp / "no-such-model")),
                    env.tmp / "broken.log")
    env.workers.append(worker)
    worker.proc.wait(60)
    assert "cannot ingest" in worker.text() and "no-such-model" in worker.text()
    assert env.dead().count() == 0 and env.done() == []
    assert env.redis.llen(LIVE_QUEUE) + env.redis.hlen("unacked") == 1  # still there for a fixed worker


@pytest.mark.slow
def test_real_model_event_to_search(env: Env) -> None:
    """The same flow with efficientnet-lite0 (ONNX): labelled neighbours first, then an upload."""
    from ingest.sources import ImageRef
    from search.models import get_embedder
    from workers.producer import enqueue_refs

    labelled = [ImageRef(str(photo(env.root / "red" / f"r{i}.jpg", i, base=1, noise=6)), ("red",)) for i in range(3)]
    labelled += [ImageRef(str(photo(env.root / "blue" / f"b{i}.jpg", i, base=2, noise=6)), ("blue",)) for i in range(3)]
    env.start(LOOKALIKE_TEST_REAL_MODEL="1", LOOKALIKE_MODEL="efficientnet-lite0")
    settings = env.settings(model="efficientnet-lite0")
    enqueue_refs(labelled, settings, queue="backfill")
    env.wait(lambda: len(env.done()) == 6, timeout=120, what="the labelled images")
    new = photo(env.root / "new.jpg", 99, base=1, noise=6)
    env.send(make_event(str(new)))
    env.wait(lambda: len(env.done()) == 7, timeout=60, what="the upload")
    env.stop()
    from search.store import open_store

    store = open_store(settings)
    try:
        with Image.open(new) as img:
            vec = get_embedder("efficientnet-lite0", settings).embed_images([img.convert("RGB")])
        hit = store.search(vec, k=1)[0][0]
        assert hit.uris == [str(new)]
        assert [t["label"] for t in hit.tags] == ["red"]
    finally:
        store.close()


def test_dead_letter_store(redis_url: str) -> None:
    import redis

    store = DeadLetters(redis.Redis.from_url(redis_url), max_entries=3)
    event_a = {"version": 1, "uri": "/x/a.jpg", "sent_at": 1.0}
    a = store.add(event_a, "file not found", attempts=1, id="t1:0:0", queue=LIVE_QUEUE)
    assert a.id.startswith("t1:0:0:")
    store.add(dict(event_a), "file not found", attempts=1, id="t1:0:0")  # the same failure again
    assert store.count() == 1 and store.get(a.id).reason == "file not found"
    b = store.add("{broken", "not valid JSON", id="t2:0:0", queue=BACKFILL_QUEUE)
    c = store.add({"version": 1, "uri": "/x/b.jpg"}, "cannot decode\nsecond line", attempts=3, id="t3:0:0")
    assert [e.id for e in store.list()] == [a.id, b.id, c.id]
    assert store.get(c.id).reason == "cannot decode" and store.get(c.id).attempts == 3
    assert a.to_dict()["at_iso"].endswith("Z")
    d = store.add({"version": 1, "uri": "/x/c.jpg"}, "r", id="t4:0:0")  # over max_entries: the oldest goes
    assert [e.id for e in store.list()] == [b.id, c.id, d.id]

    sent: list[tuple[dict, str | None]] = []
    n, skipped = store.replay(lambda ev, q: sent.append((ev, q)))
    assert n == 2 and [s[0]["uri"] for s in sent] == ["/x/b.jpg", "/x/c.jpg"]
    assert skipped == [(b.id, skipped[0][1])] and "not valid JSON" in skipped[0][1]
    assert store.count() == 1  # the unreplayable one stays until purged
    assert store.replay(lambda ev, q: None, ["nope"]) == (0, [("nope", "no such dead letter")])
    assert store.purge() == 1 and store.count() == 0


def test_cli_status_and_dead_letters(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis
    from click.testing import CliRunner

    from search.cli import main

    monkeypatch.setenv("LOOKALIKE_BROKER_URL", redis_url)
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))
    client = redis.Redis.from_url(redis_url)
    photo(tmp_path / "imgs" / "cat" / "a.jpg", 1)
    photo(tmp_path / "imgs" / "dog" / "b.jpg", 2)
    runner = CliRunner()
    result = runner.invoke(main, ["enqueue", "--queue", "backfill", "--labels-from-dirs", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert "queued 2 events in 1 tasks" in result.output
    result = runner.invoke(main, ["enqueue", str(tmp_path / "imgs" / "cat" / "a.jpg")])
    assert result.exit_code == 0, result.output

    result = runner.invoke(main, ["status", "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["queues"] == {LIVE_QUEUE: 1, BACKFILL_QUEUE: 1} and status["workers"] == []
    assert status["dead_letters"] == 0 and status["points"] == 0

    entry = DeadLetters(client).add({"version": 1, "uri": "/x/a.jpg"}, "file not found", id="t1:0:0",
                                    queue="not.ours\x1b[2J")
    result = runner.invoke(main, ["dead-letters", "list"])
    assert entry.id in result.output and "file not found" in result.output
    assert json.loads(runner.invoke(main, ["dead-letters", "list", "--json"]).output)["total"] == 1
    result = runner.invoke(main, ["dead-letters", "replay", entry.id])
    assert result.exit_code == 0 and "replayed 1 events" in result.output
    assert client.llen(LIVE_QUEUE) == 2 and DeadLetters(client).count() == 0  # to lookalike.live, not not.ours
    assert not [k for k in client.keys("not.ours*")]
    DeadLetters(client).add("junk", "not valid JSON", id="t2:0:0")
    result = runner.invoke(main, ["dead-letters", "purge", "--all", "--yes"])
    assert "purged 1" in result.output and DeadLetters(client).count() == 0


def test_watch_via_broker_sends_events_with_the_given_source_and_labels(redis_url: str, tmp_path: Path) -> None:
    """`watch --via-broker --source cam --labels-from-dirs` puts one live event per new file on the queue,
    carrying the source and label the user gave (the broker path used to hard-code "watch")."""
    import base64

    inbox = tmp_path / "inbox" / "cats"
    inbox.mkdir(parents=True)
    env = {**os.environ, "LOOKALIKE_BROKER_URL": redis_url, "LOOKALIKE_DATA_DIR": str(tmp_path / "data")}
    cli = [sys.executable, "-c", "from search.cli import main; main()"]
    proc = subprocess.Popen([*cli, "watch", str(tmp_path / "inbox"), "--via-broker", "--source", "cam",
                             "--labels-from-dirs", "--interval", "0.05"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = __import__("redis").Redis.from_url(redis_url)
    try:
        assert proc.stderr is not None and b"watching" in proc.stderr.readline()
        time.sleep(0.5)  # the watcher's first scan records what is already there: the file must come after
        photo(inbox / "a.jpg", 1)
        deadline = time.monotonic() + 20
        while not client.llen(LIVE_QUEUE) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        raw = client.lrange(LIVE_QUEUE, 0, -1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert len(raw) == 1, err.decode()
    message = json.loads(raw[0])
    (event,), _, _ = json.loads(base64.b64decode(message["body"]))
    assert message["headers"]["task"] == INGEST_TASK
    assert event["uri"] == str(inbox / "a.jpg") and event["source"] == "cam" and event["labels"] == ["cats"]
