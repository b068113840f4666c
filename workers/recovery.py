"""Crash recovery that does not wait for the visibility timeout: heartbeats, and who holds which message.

kombu's Redis transport keeps every delivered, unacknowledged message in the ``unacked`` hash (and its
time in ``unacked_index``) and puts it back only after ``visibility_timeout`` (600 s), on a slow sweep.
A SIGKILLed *child* is handled by Celery at once; a whole worker killed by the OOM killer or ``kill -9``
left its message invisible for ten minutes. So every worker process that consumes:

* heartbeats: ``lookalike:worker:<id>`` (JSON: host, pid, start time) with a TTL of ``ttl`` seconds
  (``LOOKALIKE_HEARTBEAT_TTL``, 3 s), refreshed every ``ttl / 3`` by a thread of the process that holds the
  messages (the consumer, i.e. the main process of a prefork worker: its children die with it);
* records which delivery tags it holds: ``lookalike:holders`` (tag → ``[id, queue, session]``), written
  and deleted in the same MULTI as kombu's own ``unacked`` bookkeeping (``workers.transport.GuardedQoS``);
  ``session`` counts the consumer's broker connections (``new_session`` on each connect);
* looks, every ``ttl / 3`` and at start-up, for tags held by workers whose heartbeat is gone — or by an
  earlier session of its own (after a Redis outage kombu cannot restore what the lost connection held; it
  would wait for the visibility timeout) — and puts those messages back at the head of their queue with
  one Lua script per tag (``RESTORE``): it checks that the tag is still held as recorded, the holder's
  heartbeat still missing (not for its own earlier session) and the message still unacknowledged, then
  removes it from ``unacked``/``unacked_index``/``lookalike:holders`` and pushes it — atomically, so a
  message is never restored twice, nor restored while its holder acks it, nor restored at the same time as
  kombu's own sweep (which WATCHes ``unacked``) restores it.

A message is never only in a process's memory either: the consumer *moves* each message from its queue to
an in-flight list of its own (``lookalike:inflight:<id>#<session>:<queue key>``, listed with its holder
record in the ``lookalike:inflight`` hash) and takes it out of that list in the same MULTI as it records it
as held (``workers.transport``). The scan puts what a gone holder, or an earlier session of this process,
left in such a list back at the head of its queue (``RESTORE_INFLIGHT``, same checks), and a monitor that
stops puts its own back (a warm shutdown drops a reply that was not read yet). Such a message goes back as it
was taken: it never reached a task, so it does not count towards ``lookalike_recovered``.

A holder counts as dead once this monitor has seen its heartbeat missing for ``grace`` (``2·ttl/3``): one
missed refresh after a Redis restart (which may drop the short-lived keys) does not make live workers
steal each other's messages. Worst case from a kill to the message being back on its queue: the TTL, plus
the grace, plus one scan — ~6 s with the defaults. Each restore increments the message's
``lookalike_recovered`` header; past ``max_retries`` the consumer dead-letters it (``workers.guard``), so a
message that kills the whole worker every time cannot crash-loop the fleet.

A worker whose heartbeat lapsed while it was alive (stopped for longer than the TTL) may find its message
restored and run again elsewhere: ingestion is idempotent (the point id is the hash of the bytes), so that
costs work, not correctness.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("workers.recovery")

HOLDERS_KEY = "lookalike:holders"
INFLIGHT_KEY = "lookalike:inflight"  # hash: in-flight list → holder record ([id, queue key, session])
HEARTBEAT_PREFIX = "lookalike:worker:"
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"  # kombu's Redis transport defaults
DEFAULT_TTL = 3.0

# KEYS: holders, unacked, unacked_index, the holder's heartbeat, the queue.
# ARGV: tag, holder record, payload, "own" (an earlier session of this process: its heartbeat is ours).
RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[4] ~= 'own' and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 or ARGV[3] == '' then return 0 end
redis.call('RPUSH', KEYS[5], ARGV[3])
return 1
"""


# KEYS: the in-flight registry, the in-flight list, the holder's heartbeat, the queue.
# ARGV: the list's holder record, "own" (an earlier session of this process).
RESTORE_INFLIGHT = """
if redis.call('HGET', KEYS[1], KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= 'own' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local n = 0
local item = redis.call('RPOP', KEYS[2])
while item do
  redis.call('RPUSH', KEYS[4], item)
  n = n + 1
  item = redis.call('RPOP', KEYS[2])
end
redis.call('HDEL', KEYS[1], KEYS[2])
return n
"""


def inflight_key(monitor: Monitor, queue_key: str) -> str:
    """The list holding what ``monitor``'s current session has taken from ``queue_key`` but not yet recorded
    as held."""
    return f"{INFLIGHT_KEY}:{monitor.id}#{monitor.session}:{queue_key}"


def heartbeat_key(worker: str) -> str:
    return HEARTBEAT_PREFIX + worker


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def marked_payload(unacked_value: bytes | str) -> str:
    """The message kombu stored as unacked (``[message, exchange, routing_key]``), marked as redelivered
    with its restore count incremented."""
    from workers.guard import RECOVERED_HEADER

    message = json.loads(unacked_value)[0]
    headers = message.get("headers") if isinstance(message, dict) else None
    if isinstance(headers, dict):
        count = headers.get(RECOVERED_HEADER)
        headers[RECOVERED_HEADER] = (count if isinstance(count, int) else 0) + 1
        headers["redelivered"] = True
        info = (message.get("properties") or {}).get("delivery_info")
        if isinstance(info, dict):
            info["redelivered"] = True
    return json.dumps(message)


class Monitor:
    """This process's heartbeat and the restorer of dead workers' messages (see the module docstring)."""

    def __init__(self, client: Any, *, ttl: float = DEFAULT_TTL, name: str | None = None) -> None:
        self.client = client
        self.ttl = float(ttl)
        self.every = self.ttl / 3
        self.grace = self.ttl * 2 / 3
        self.pid = os.getpid()
        self.id = f"{name or socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.started = time.time()
        self._restore = client.register_script(RESTORE)
        self._restore_inflight = client.register_script(RESTORE_INFLIGHT)
        self.session = 0  # this process's broker connection count (see ``new_session``)
        self._missing: dict[str, float] = {}  # holder → when this monitor first saw it gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def new_session(self) -> None:
        """The consumer (re)connects: what earlier connections held can no longer be acked or restored by
        kombu once the connection is gone, so this process's own scan treats it as a dead holder's."""
        self.session += 1

    def record(self, queue: str | None) -> str:
        """The ``lookalike:holders`` value for a message this process takes from ``queue`` now."""
        return json.dumps([self.id, queue, self.session])

    def beat(self) -> None:
        info = {"id": self.id, "host": socket.gethostname(), "pid": self.pid, "started": self.started}
        self.client.set(heartbeat_key(self.id), json.dumps(info), px=int(self.ttl * 1000))

    def scan(self, now: float | None = None) -> int:
        """Restore the messages of holders gone for at least ``grace``; returns how many were restored."""
        now = time.monotonic() if now is None else now
        holders: dict[str, list[tuple[str, str, str | None]]] = {}  # holder key → [(tag, record, queue)]
        lists: dict[str, list[tuple[str, str, str]]] = {}  # holder key → [(in-flight list, record, queue key)]
        heartbeats: dict[str, str | None] = {}  # holder key → heartbeat key to check (None: own, gone)
        for source, into in ((HOLDERS_KEY, holders), (INFLIGHT_KEY, lists)):
            for field, record in self.client.hgetall(source).items():
                try:
                    worker, queue, *rest = json.loads(record)
                    session = int(rest[0]) if rest else 0
                except (ValueError, TypeError):
                    log.error("ignoring a malformed %s entry for %s: %r", source, _text(field), record[:200])
                    continue
                if worker == self.id and session >= self.session:
                    continue  # held by this process's live connection
                key = f"{worker}#{session}" if worker == self.id else str(worker)
                heartbeats[key] = None if worker == self.id else heartbeat_key(str(worker))
                into.setdefault(key, []).append((_text(field), _text(record), queue))  # type: ignore[arg-type]
        if not heartbeats:
            self._missing.clear()
            return 0
        others = [k for k, beat in heartbeats.items() if beat is not None]
        pipe = self.client.pipeline(transaction=False)
        for key in others:
            pipe.exists(heartbeats[key])
        alive = {k for k, exists in zip(others, pipe.execute(), strict=True) if exists}
        gone = [k for k in heartbeats if k not in alive]
        self._missing = {k: self._missing.get(k, now) for k in gone}
        restored = 0
        for key in gone:
            if now - self._missing[key] >= self.grace:
                beat = heartbeats[key]
                restored += sum(self._restore_one(beat, *held) for held in holders.get(key, []))
                restored += sum(self._restore_list(beat, *taken) for taken in lists.get(key, []))
        return restored

    def _restore_list(self, beat: str | None, name: str, record: str, queue: str) -> int:
        """Put back what a gone holder (``beat``: its heartbeat key; None for this process's own earlier
        session) left in its in-flight list ``name``, and forget the list."""
        if not isinstance(queue, str) or not queue:
            return 0
        keys = [INFLIGHT_KEY, name, beat or heartbeat_key(self.id), queue]
        done = int(self._restore_inflight(keys=keys, args=[record, "" if beat else "own"]))
        if done:
            log.warning("%s had taken %d message(s) from %s: put back", f"dead worker {beat[len(HEARTBEAT_PREFIX):]}"
                        if beat else "a lost broker connection", done, queue)
        return done

    def _restore_one(self, beat: str | None, tag: str, record: str, queue: str | None) -> int:
        """Restore one tag of a gone holder (``beat``: its heartbeat key; None for this process's own
        earlier session)."""
        raw = self.client.hget(UNACKED_KEY, tag)
        payload = ""
        if raw is not None:
            try:
                payload = marked_payload(raw)
                queue = queue or json.loads(raw)[2]
            except (ValueError, TypeError, IndexError, AttributeError):
                log.error("cannot read the unacknowledged message %s; leaving it to kombu's sweep", tag)
                return 0
        if not queue:
            return 0
        keys = [HOLDERS_KEY, UNACKED_KEY, UNACKED_INDEX_KEY, beat or heartbeat_key(self.id), queue]
        done = int(self._restore(keys=keys, args=[tag, record, payload, "" if beat else "own"]))
        if done:
            log.warning("%s held message %s: put back on %s",
                        f"dead worker {beat[len(HEARTBEAT_PREFIX):]}" if beat else "a lost broker connection",
                        tag, queue)
        return done

    # ------------------------------------------------------------------------------------------ the thread
    def start(self) -> Monitor:
        """Beat once now (before this process takes any message), then beat and scan in a thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="lookalike-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while True:
            try:
                self.beat()
                self.scan()
                if failing:
                    log.info("heartbeat to Redis restored")
                failing = False
            except Exception as err:  # the thread must outlive any Redis trouble
                if not failing:
                    log.error("heartbeat/recovery scan failed (%s: %s); retrying every %.1f s",
                              type(err).__name__, err, self.every)
                failing = True
            if self._stop.wait(self.every):
                return

    def stop(self) -> None:
        """Stop beating, put back what this process took but never held (a warm shutdown drops an unread
        reply) and drop the heartbeat (only in the process that started it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.every + 5)
        if os.getpid() == self.pid:
            with contextlib.suppress(Exception):
                self.session += 1  # every session of this process is over: restore them all as its own
                for name, record in self.client.hgetall(INFLIGHT_KEY).items():
                    worker, queue, *_ = json.loads(record)
                    if worker == self.id:
                        self._restore_list(None, _text(name), _text(record), queue)
            with contextlib.suppress(Exception):
                self.client.delete(heartbeat_key(self.id))


_monitor: Monitor | None = None
_lock = threading.Lock()


def current() -> Monitor | None:
    """The running monitor of *this* process (None in a forked child or a process that does not consume):
    only messages taken while it runs are recorded as held, so only they can be restored by others."""
    monitor = _monitor
    return monitor if monitor is not None and monitor.pid == os.getpid() else None


def start(url: str, *, ttl: float = DEFAULT_TTL, name: str | None = None) -> Monitor | None:
    """This process's monitor, started on first call (None when the broker is not Redis: then only the
    visibility timeout brings a dead worker's messages back)."""
    global _monitor
    from urllib.parse import urlsplit

    import redis

    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        log.warning("crash recovery needs a Redis broker; a dead worker's messages wait for the visibility timeout")
        return None
    with _lock:
        if current() is None:
            client = redis.Redis.from_url(url, socket_timeout=max(1.0, ttl / 2), socket_connect_timeout=2)
            _monitor = Monitor(client, ttl=ttl, name=name).start()
            atexit.register(_monitor.stop)
            log.info("heartbeat %s every %.1f s (TTL %.0f s): messages of workers that die are put back",
                     _monitor.id, _monitor.every, ttl)
        assert _monitor is not None
        return _monitor


def alive(client: Any) -> list[dict[str, Any]]:
    """The heartbeats in Redis now (for ``lookalike status``)."""
    out = []
    for key in client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=200):
        value = client.get(key)
        if value is not None:
            with contextlib.suppress(ValueError):
                out.append(json.loads(value))
    return sorted(out, key=lambda x: str(x.get("id")))


__all__ = ["DEFAULT_TTL", "HEARTBEAT_PREFIX", "HOLDERS_KEY", "INFLIGHT_KEY", "Monitor", "alive", "current",
           "heartbeat_key", "inflight_key", "marked_payload", "start"]
