"""Dead letters keep every accepted event whole and replayable, bound what producers name, never overwrite a
different event, replay only to lookalike's queues; the message guard refuses what Celery cannot run.

The guard and the helpers are fast tests; the store itself runs against a real redis-server (``-m redis``).
"""

from __future__ import annotations

import base64
import json
import pickle
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import RedisServer
from workers import guard
from workers.deadletters import (
    MAX_KEPT_BYTES,
    DeadLetter,
    DeadLetters,
    digest,
    keep,
    replay_queue,
    safe_key,
    safe_name,
)
from workers.events import (
    BACKFILL_QUEUE,
    INGEST_BATCH_TASK,
    INGEST_TASK,
    LIVE_QUEUE,
    MAX_EVENT_BYTES,
    celery_message,
    make_event,
    parse_event,
)

LIMITS = {"max_recovered": 8, "max_eta_ahead": 400.0}


def big_event() -> dict[str, Any]:
    """A valid event of almost 16 KiB of UTF-8 whose ASCII-escaped JSON is ~31 KB (the old store cut at 8,192)."""
    labels = [f"{i:02d}" + "猫" * 250 for i in range(21)]
    event = make_event("/srv/images/写真/猫.jpg", labels, source="上传")
    size = len(json.dumps(event, ensure_ascii=False).encode())
    assert MAX_EVENT_BYTES - 1024 < size <= MAX_EVENT_BYTES and len(json.dumps(event)) > 30_000
    return event


# ---------------------------------------------------------------------------------------------- fast
def test_valid_events_are_kept_whole_and_only_oversized_raw_payloads_are_cut() -> None:
    event = big_event()
    assert keep(event) == (event, False)
    raw = "x" * 10 + "é" * MAX_KEPT_BYTES
    kept, truncated = keep(raw)
    assert truncated and len(kept.encode()) <= MAX_KEPT_BYTES and kept.startswith("x" * 10)
    assert keep(b"\xffraw") == ("\ufffdraw", False)
    assert keep({"version": 1, "uri": "/a.jpg", "x": "\ud800"})[1] is False  # a lone surrogate is still kept


def test_producer_supplied_names_are_bounded_and_sanitised() -> None:
    assert safe_key("abc-123:0:1") == "abc-123:0:1"
    assert safe_key("a b\n\x1b[2J;rm -rf /" + "x" * 500) == ("a_b___2J_rm_-rf__" + "x" * 500)[:64]
    assert safe_name("lookalike.live\r\n\x1b[31m") == "lookalike.live\ufffd\ufffd\ufffd[31m"
    assert len(safe_name("q" * 5000) or "") == 200 and safe_name(None) is None
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1}) != digest({"a": 1, "b": 3})


def test_replay_goes_only_to_lookalikes_queues() -> None:
    def entry(queue: str | None, task: str | None) -> DeadLetter:
        return DeadLetter(id="x", event={}, reason="r", attempts=1, at=0.0, queue=queue, task=task)

    assert replay_queue(entry(LIVE_QUEUE, INGEST_BATCH_TASK)) == LIVE_QUEUE
    assert replay_queue(entry(BACKFILL_QUEUE, INGEST_TASK)) == BACKFILL_QUEUE
    assert replay_queue(entry("celery", INGEST_TASK)) == LIVE_QUEUE
    assert replay_queue(entry("victim.queue", INGEST_BATCH_TASK)) == BACKFILL_QUEUE
    assert replay_queue(entry(None, None)) == LIVE_QUEUE


class Msg:
    """The parts of a kombu message the guard reads."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.headers = raw.get("headers")
        self.content_type = raw.get("content-type")
        self.body = base64.b64decode(raw["body"])
        self.delivery_info = raw["properties"]["delivery_info"]
        self.decoded = 0

    def decode(self) -> Any:
        self.decoded += 1
        if self.content_type != "application/json":
            raise AssertionError("the guard must never decode anything but JSON")
        return json.loads(self.body)


def message(**headers: Any) -> dict[str, Any]:
    raw = json.loads(celery_message(INGEST_TASK, [make_event("/a.jpg", event_id="e1")], LIVE_QUEUE, task_id="t1"))
    raw["headers"].update(headers)
    return raw


def with_body(body: Any, content_type: str = "application/json", **headers: Any) -> Msg:
    raw = message(**headers)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw.update({"body": base64.b64encode(data).decode(), "content-type": content_type})
    return Msg(raw)


def test_the_guard_accepts_what_producers_send() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert guard.task_problem(Msg(message()), **LIMITS, now=now) is None
    ok = message(eta="2030-01-01T00:05:00+00:00", expires="2030-01-02T00:00:00Z", retries=3, timelimit=[10, 20],
                 **{guard.RECOVERED_HEADER: 8})
    assert guard.task_problem(Msg(ok), **LIMITS, now=now) is None
    batch = json.loads(celery_message(INGEST_BATCH_TASK, [[{"version": 1, "uri": "/a.jpg"}]], BACKFILL_QUEUE))
    assert guard.task_problem(Msg(batch), **LIMITS, now=now) is None
    assert guard.task_problem(with_body([[], {"event": {}}, None]), **LIMITS, now=now) is None


@pytest.mark.parametrize(("msg", "reason"), [
    (Msg({**message(), "headers": None}), "no headers"),
    (Msg(message(id=None)), "header 'id' must be a non-empty string (the task id), got null"),
    (Msg(message(id="  ")), "header 'id' must be a non-empty string"),
    (Msg(message(id="x\ny")), "control characters"),
    (Msg(message(task=["lookalike.ingest"])), "header 'task' must be a non-empty string"),
    (Msg(message(task="lookalike.ingset")), "unknown task 'lookalike.ingset'"),
    (Msg(message(task="celery.chord_unlock")), "unknown task 'celery.chord_unlock'"),
    (Msg(message(retries=-1)), "header 'retries' must be a non-negative integer"),
    (Msg(message(retries=True)), "header 'retries'"),
    (Msg(message(timelimit=[1, 2, 3])), "header 'timelimit'"),
    (Msg(message(timelimit=[float("nan"), None])), "header 'timelimit'"),
    (Msg(message(eta=1700000000)), "header 'eta' must be an ISO-8601 string"),
    (Msg(message(eta="2030-01-01T00:07:00+00:00")), "header 'eta' is more than 400 s ahead"),
    (Msg(message(expires="2029-12-31T23:59:59+00:00")), "expired at"),
    (Msg(message(shadow=5)), "header 'shadow' must be a string or null"),
    (Msg(message(ignore_result="no")), "header 'ignore_result'"),
    (Msg(message(stamped_headers="x")), "header 'stamped_headers'"),
    (Msg(message(**{guard.RECOVERED_HEADER: 9})), "the whole worker died 9 times"),
    (with_body(pickle.dumps(("x",)), "application/x-python-serialize"), "is refused"),
    (with_body(b"{", "application/json"), "cannot decode the message body"),
    (with_body({"args": []}), "the body must be [args, kwargs, embed], not dict"),
    (with_body([[], {}]), "not list of 2"),
    (with_body([{}, {}, {}]), "args must be a list and kwargs an object"),
    (with_body([[], {}, {}]), "takes one argument (event), got 0 positional"),
    (with_body([[{}], {"x": 1}, {}]), "takes one argument"),
    (with_body([[{}], {}, []]), "embed must be an object or null"),
    (with_body([[{}], {}, {"callbacks": [{"task": "x"}]}]), "callbacks, errbacks, chains and chords"),
])
def test_the_guard_refuses_what_celery_cannot_run(msg: Msg, reason: str) -> None:
    problem = guard.task_problem(msg, **LIMITS, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert problem is not None and reason in problem, problem


@pytest.mark.parametrize(("raw", "reason"), [
    ([1, 2], "a JSON list, not an object"),
    ({"body": "", "headers": {}}, "'properties' must be an object, not null"),
    ({**message(), "headers": "lookalike.ingest"}, "'headers' must be an object, not str"),
    ({**message(), "body": 5}, "'body' must be a string"),
    ({**message(), "body": "abc"}, "not valid base64"),
    ({**message(), "content-type": 1}, "'content-type' must be a string"),
    ({**message(), "properties": {"body_encoding": "rot13"}}, "unknown body_encoding"),
    ({**message(), "properties": {"body_encoding": "base64", "delivery_info": []}}, "delivery_info"),
])
def test_the_envelope_check_refuses_what_kombu_cannot_read(raw: Any, reason: str) -> None:
    problem = guard.envelope_problem(raw)
    assert problem is not None and reason in problem, problem


def test_normalise_gives_a_fresh_tag_and_the_real_queue() -> None:
    raw = message()
    raw["properties"]["delivery_info"] = {"exchange": "amq.evil", "routing_key": "elsewhere", "redelivered": True}
    tag = raw["properties"]["delivery_tag"]
    assert guard.envelope_problem(raw) is None
    guard.normalise(raw, LIVE_QUEUE)
    assert raw["properties"]["delivery_tag"] != tag
    assert raw["properties"]["delivery_info"] == {"exchange": "", "routing_key": LIVE_QUEUE, "redelivered": True}


def test_a_refused_message_keeps_its_event_and_never_unpickles() -> None:
    assert guard.kept_event(Msg(message(task="lookalike.typo"))) == make_event("/a.jpg", event_id="e1")
    pickled = with_body(pickle.dumps(("secret",)), "application/x-python-serialize")
    kept = guard.kept_event(pickled)
    assert isinstance(kept, str) and "secret" in kept and pickled.decoded == 0
    assert guard.kept_event(with_body({"args": 1})) == '{"args": 1}'


# ---------------------------------------------------------------------------------------------- with Redis
@pytest.fixture
def store(redis_server: RedisServer) -> DeadLetters:
    redis_server.client().flushall()
    return DeadLetters(redis_server.client())


@pytest.mark.redis
def test_a_16_kib_utf8_event_is_kept_whole_and_replays(store: DeadLetters) -> None:
    """Issue: events were stored cut at 8,192 characters of ASCII-escaped JSON; a valid 16 KiB UTF-8 event
    came back as "not valid JSON" and was lost."""
    event = big_event()
    entry = store.add(event, "file not found", id="t1:0:0", queue=LIVE_QUEUE, task=INGEST_TASK)
    stored = store.get(entry.id)
    assert stored is not None and stored.event == event and not stored.truncated
    sent: list[tuple[dict[str, Any], str]] = []
    assert store.replay(lambda ev, q: sent.append((ev, q))) == (1, [])
    assert sent == [(parse_event(event).to_dict(), LIVE_QUEUE)] and store.count() == 0


@pytest.mark.redis
def test_truncated_payloads_say_so(store: DeadLetters) -> None:
    entry = store.add("{" + "x" * (2 * MAX_KEPT_BYTES), "not valid JSON", id="raw")
    stored = store.get(entry.id)
    assert stored is not None and stored.truncated and len(stored.event.encode()) == MAX_KEPT_BYTES
    sent, skipped = store.replay(lambda ev, q: None)
    assert sent == 0 and skipped == [(entry.id, skipped[0][1])] and "truncated" in skipped[0][1]
    assert store.count() == 1


@pytest.mark.redis
def test_a_reused_task_id_never_overwrites_another_event(store: DeadLetters) -> None:
    a = store.add({"version": 1, "uri": "/a.jpg"}, "file not found", id="same-id:0:0")
    b = store.add({"version": 1, "uri": "/b.jpg"}, "file not found", id="same-id:0:0")
    again = store.add({"version": 1, "uri": "/a.jpg"}, "decoder error", id="same-id:0:0")  # a redelivery
    assert a.id != b.id and again.id == a.id and store.count() == 2
    assert store.get(a.id).reason == "decoder error"  # type: ignore[union-attr]
    assert {e.event["uri"] for e in store.list()} == {"/a.jpg", "/b.jpg"}


@pytest.mark.redis
def test_hostile_names_are_bounded_and_replay_stays_on_our_queues(store: DeadLetters) -> None:
    entry = store.add({"version": 1, "uri": "/a.jpg"}, "r\nsecond line", id="x" * 10_000 + "\n\x1b[2J",
                      queue="attacker.queue\x00" + "q" * 10_000, task=INGEST_BATCH_TASK)
    stored = store.get(entry.id)
    assert stored is not None and len(entry.id) <= 64 + 13 and entry.id.isprintable() and " " not in entry.id
    assert len(stored.queue or "") == 200 and (stored.queue or "").isprintable() and stored.reason == "r"
    odd = store.add("raw", "r", id="t", task="\x1b]0;pwned\x07" + "t" * 1000)
    assert (odd.task or "").isprintable() and len(odd.task or "") == 200
    store.remove([odd.id])
    queues: list[str] = []
    assert store.replay(lambda ev, q: queues.append(q)) == (1, [])
    assert queues == [BACKFILL_QUEUE]  # by task: the recorded queue is not one of ours


@pytest.mark.redis
def test_a_refused_batch_replays_each_of_its_events(store: DeadLetters) -> None:
    events = [make_event(f"/x/{i}.jpg") for i in range(3)]
    entry = store.add(events, "header 'id' must be a non-empty string", id="message:raw", queue=BACKFILL_QUEUE,
                      task=INGEST_BATCH_TASK)
    sent: list[tuple[dict[str, Any], str]] = []
    assert store.replay(lambda ev, q: sent.append((ev, q)), [entry.id]) == (3, [])
    assert [e["uri"] for e, _ in sent] == [e["uri"] for e in events] and {q for _, q in sent} == {BACKFILL_QUEUE}


@pytest.mark.redis
def test_entries_written_before_this_version_still_load(store: DeadLetters, tmp_path: Path) -> None:
    old = {"id": "t1:0:0", "event": {"version": 1, "uri": "/a.jpg"}, "reason": "r", "attempts": 1, "at": 1.0,
           "queue": LIVE_QUEUE, "task": INGEST_TASK}
    store.client.hset("lookalike:deadletters", "t1:0:0", json.dumps(old))
    store.client.zadd("lookalike:deadletters:index", {"t1:0:0": 1.0})
    (entry,) = store.list()
    assert entry.id == "t1:0:0" and entry.truncated is False and entry.event["uri"] == "/a.jpg"
