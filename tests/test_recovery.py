"""Crash recovery's bookkeeping against a real redis-server: the guarded transport records which process holds
which message in step with kombu's ``unacked`` entries, and a monitor restores a dead holder's messages once,
never a live holder's, never one that was acked meanwhile, never twice with kombu's own sweep.

The end-to-end measurements (real workers SIGKILLed as a whole) are in ``tests/test_workers.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest

from tests.redis_server import RedisServer
from workers import recovery
from workers.deadletters import DeadLetters
from workers.events import INGEST_TASK, LIVE_QUEUE, celery_message, make_event
from workers.recovery import HOLDERS_KEY, Monitor, heartbeat_key

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_server: RedisServer) -> Any:
    redis_server.client().flushall()
    return redis_server.client()


@pytest.fixture
def monitor(client: Any, monkeypatch: pytest.MonkeyPatch) -> Monitor:
    """This process's monitor, as a worker's consumer starts it (without the thread: the test drives it)."""
    me = Monitor(client, name="me")
    me.beat()
    monkeypatch.setattr(recovery, "_monitor", me)
    return me


def push(client: Any, uri: str, *, routing_key: str = LIVE_QUEUE) -> dict[str, Any]:
    raw = json.loads(celery_message(INGEST_TASK, [make_event(uri)], LIVE_QUEUE))
    raw["properties"]["delivery_info"]["routing_key"] = routing_key
    client.lpush(LIVE_QUEUE, json.dumps(raw))
    return raw


def consume(url: str, n: int, *, ack: int = 0, timeout: float = 5.0) -> tuple[list[Any], dict[bytes, bytes]]:
    """Take ``n`` messages from lookalike.live through the guarded transport, ack the first ``ack``, and
    close the connection (kombu restores the rest); returns the messages and the holders seen meanwhile."""
    from kombu import Connection, Queue

    from workers.transport import GuardedTransport

    got: list[Any] = []
    with Connection(url, transport=GuardedTransport) as conn:
        queue = Queue(LIVE_QUEUE, routing_key=LIVE_QUEUE)
        with conn.Consumer(queue, callbacks=[lambda body, m: got.append(m)], accept=["json"]):
            deadline = time.monotonic() + timeout
            while len(got) < n and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
            held = conn.default_channel.client.hgetall(HOLDERS_KEY)
            assert len(held) == len(got)
            for m in got[:ack]:
                m.ack()
    return got, held


def test_holders_follow_kombus_unacked_bookkeeping(client: Any, redis_server: RedisServer, monitor: Monitor) -> None:
    sent = [push(client, "/a.jpg", routing_key="attacker.queue"), push(client, "/b.jpg")]
    got, held = consume(redis_server.url, 2, ack=1)
    assert sorted(held) == sorted(m.delivery_tag.encode() for m in got)
    assert {json.loads(v)[0] for v in held.values()} == {monitor.id}
    assert {json.loads(v)[1] for v in held.values()} == {LIVE_QUEUE}  # the queue it came from, not the claim
    assert not {m.delivery_tag for m in got} & {s["properties"]["delivery_tag"] for s in sent}  # fresh tags
    assert all(m.delivery_info["routing_key"] == LIVE_QUEUE for m in got)
    # One acked, one restored by kombu when the connection closed: both forgotten with their unacked entry.
    assert client.hlen(HOLDERS_KEY) == 0 and client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert client.llen(LIVE_QUEUE) == 1


def test_the_transport_dead_letters_what_kombu_cannot_read(client: Any, redis_server: RedisServer,
                                                           monitor: Monitor) -> None:
    client.lpush(LIVE_QUEUE, b"\xff not JSON")
    client.lpush(LIVE_QUEUE, json.dumps({"body": "", "headers": {"id": "x"}}))
    client.lpush(LIVE_QUEUE, json.dumps({**json.loads(celery_message(INGEST_TASK, [], LIVE_QUEUE)), "body": "abc"}))
    good = push(client, "/good.jpg")
    (message,), _ = consume(redis_server.url, 1, ack=1)
    assert message.headers["id"] == good["headers"]["id"]
    reasons = sorted(e.reason for e in DeadLetters(client).list())
    assert len(reasons) == 3 and all(e.queue == LIVE_QUEUE for e in DeadLetters(client).list())
    assert "'properties' must be an object" in reasons[0] and "not a JSON message" in reasons[1]
    assert "not valid base64" in reasons[2]
    assert client.llen(LIVE_QUEUE) == 0 and client.hlen("unacked") == 0


def held_by(client: Any, worker: str, uri: str, tag: str) -> dict[str, Any]:
    """Write what GuardedQoS writes when ``worker`` takes a message: unacked, its index, the holder."""
    raw = json.loads(celery_message(INGEST_TASK, [make_event(uri)], LIVE_QUEUE))
    raw["properties"]["delivery_tag"] = tag
    pipe = client.pipeline()
    pipe.zadd("unacked_index", {tag: time.time()})
    pipe.hset("unacked", tag, json.dumps([raw, "", LIVE_QUEUE]))
    pipe.hset(HOLDERS_KEY, tag, json.dumps([worker, LIVE_QUEUE]))
    pipe.execute()
    return raw


def test_a_dead_holders_messages_are_restored_once(client: Any, monitor: Monitor) -> None:
    raw = held_by(client, "dead:1:aaaa", "/a.jpg", "tag-1")
    other = Monitor(client, name="other")
    assert monitor.scan(now=100.0) == 0  # first seen missing: wait out the grace
    assert monitor.scan(now=100.0 + monitor.grace) == 1
    assert other.scan(now=0.0) == 0 and other.scan(now=10.0) == 0  # nothing left for anyone else
    assert monitor.scan(now=200.0) == 0
    (back,) = [json.loads(x) for x in client.lrange(LIVE_QUEUE, 0, -1)]
    assert back["headers"]["id"] == raw["headers"]["id"] and back["headers"]["lookalike_recovered"] == 1
    assert back["headers"]["redelivered"] is True and back["body"] == raw["body"]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0 and client.hlen(HOLDERS_KEY) == 0


def test_live_and_own_holders_keep_their_messages(client: Any, monitor: Monitor) -> None:
    alive = Monitor(client, name="alive")
    alive.beat()
    held_by(client, alive.id, "/a.jpg", "tag-live")
    held_by(client, monitor.id, "/b.jpg", "tag-own")
    client.delete(heartbeat_key(monitor.id))  # even when its own heartbeat lapsed
    for now in (0.0, 5.0, 50.0):
        assert monitor.scan(now=now) == 0
    assert client.hlen("unacked") == 2 and client.llen(LIVE_QUEUE) == 0


def test_what_a_lost_connection_held_is_restored_by_its_own_process(client: Any, monitor: Monitor) -> None:
    """After a Redis outage kombu cannot restore what the lost connection held (it would wait for the
    visibility timeout): the process's own monitor treats its earlier session as a dead holder."""
    held_by(client, monitor.id, "/a.jpg", "tag-old")
    client.hset(HOLDERS_KEY, "tag-old", monitor.record(LIVE_QUEUE))  # as GuardedQoS records it, session 0
    monitor.new_session()  # the consumer reconnected
    client.hset(HOLDERS_KEY, "tag-new", monitor.record(LIVE_QUEUE))
    client.hset("unacked", "tag-new", client.hget("unacked", "tag-old"))
    assert monitor.scan(now=0.0) == 0 and monitor.scan(now=monitor.grace) == 1  # its heartbeat is alive
    assert client.hkeys(HOLDERS_KEY) == [b"tag-new"] and client.hkeys("unacked") == [b"tag-new"]
    assert client.llen(LIVE_QUEUE) == 1


def test_a_holder_that_comes_back_keeps_its_message(client: Any, monitor: Monitor) -> None:
    back = Monitor(client, name="back")
    held_by(client, back.id, "/a.jpg", "tag-1")
    assert monitor.scan(now=0.0) == 0
    back.beat()  # e.g. after a Redis restart dropped its key for a moment
    assert monitor.scan(now=10.0) == 0
    client.delete(heartbeat_key(back.id))
    assert monitor.scan(now=11.0) == 0  # missing again: the grace starts over
    assert monitor.scan(now=11.0 + monitor.grace) == 1


def test_a_message_acked_before_the_restore_is_not_restored(client: Any, monitor: Monitor) -> None:
    held_by(client, "dead:1:aaaa", "/a.jpg", "tag-1")
    record = client.hget(HOLDERS_KEY, "tag-1").decode()
    client.hdel("unacked", "tag-1")  # the holder acked it just before it died
    client.zrem("unacked_index", "tag-1")
    assert monitor._restore_one(heartbeat_key("dead:1:aaaa"), "tag-1", record, LIVE_QUEUE) == 0
    assert client.llen(LIVE_QUEUE) == 0 and client.hlen(HOLDERS_KEY) == 0


def test_a_stale_read_cannot_push_twice(client: Any, monitor: Monitor) -> None:
    """The payload is read before the script runs; if the message is restored meanwhile (by another monitor
    or by kombu's sweep), the script finds the holder entry gone and pushes nothing."""
    held_by(client, "dead:1:aaaa", "/a.jpg", "tag-1")
    record = client.hget(HOLDERS_KEY, "tag-1").decode()
    assert monitor._restore_one(heartbeat_key("dead:1:aaaa"), "tag-1", record, LIVE_QUEUE) == 1
    payload = client.lrange(LIVE_QUEUE, 0, -1)[0].decode()
    script = client.register_script(recovery.RESTORE)
    keys = [HOLDERS_KEY, "unacked", "unacked_index", heartbeat_key("dead:1:aaaa"), LIVE_QUEUE]
    assert script(keys=keys, args=["tag-1", record, payload, ""]) == 0
    assert client.llen(LIVE_QUEUE) == 1


def test_kombus_sweep_after_a_restore_pushes_nothing(client: Any, redis_server: RedisServer, monitor: Monitor) -> None:
    from kombu import Connection

    from workers.transport import GuardedTransport

    held_by(client, "dead:1:aaaa", "/a.jpg", "tag-1")
    assert monitor.scan(now=0.0) == 0 and monitor.scan(now=monitor.grace) == 1
    with Connection(redis_server.url, transport=GuardedTransport) as conn:
        conn.default_channel.qos.restore_by_tag("tag-1")  # what restore_visible does per expired tag
    assert client.llen(LIVE_QUEUE) == 1


def test_the_monitor_thread_beats_and_stops(client: Any, redis_server: RedisServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "_monitor", None)
    started = recovery.start(redis_server.url, ttl=1.5, name="thread")
    try:
        assert recovery.current() is started and recovery.start(redis_server.url) is started
        time.sleep(2.0)  # past the TTL: refreshed meanwhile
        assert [beat["id"] for beat in recovery.alive(client)] == [started.id]
        held_by(client, "dead:1:aaaa", "/a.jpg", "tag-1")
        deadline = time.monotonic() + 5
        while not client.llen(LIVE_QUEUE) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.llen(LIVE_QUEUE) == 1  # restored by the thread within the grace plus one scan
    finally:
        started.stop()
    assert recovery.alive(client) == []


def test_no_monitor_without_a_redis_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "_monitor", None)
    assert recovery.start("memory://") is None and recovery.current() is None
