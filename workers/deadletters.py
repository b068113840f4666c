"""Dead letters: events that could not be ingested, kept in Redis with why, until replayed or purged.

Layout (two keys in the broker's Redis, so they share its AOF durability):

* ``lookalike:deadletters``        hash  entry id → JSON ``{"id", "event", "reason", "attempts", "at",
  "queue", "task", "truncated"}``; ``event`` is the event as received (a JSON value, or the raw text when it
  was not JSON);
* ``lookalike:deadletters:index``  sorted set  entry id → time (oldest first).

What is kept, and why it can be replayed:

* An event is stored whole, as UTF-8 JSON (``ensure_ascii=False``): any valid event (≤ 16 KiB of UTF-8,
  ``workers.events.MAX_EVENT_BYTES``) fits under ``MAX_KEPT_BYTES``, so every accepted event can be replayed.
  Only something larger — never a valid event: a raw payload, an oversized batch — is cut to
  ``MAX_KEPT_BYTES`` and marked ``truncated`` (replay then says so instead of "not valid JSON").
* Producer-supplied names are bounded and sanitised: the task-id part of an entry id keeps
  ``[A-Za-z0-9._:@+=-]`` and at most ``MAX_KEY_CHARS`` characters; queue and task names lose control
  characters and are cut to ``MAX_NAME_CHARS``.
* An entry id is ``<key>:<digest of the event>``. For an event that fails on its own the key is the id of
  the chunk it was first sent in (its Celery task id; the rest of a chunk handed back keeps it), for a task
  that fails as a whole its id, attempt and position (``workers.tasks``). The same failure handled twice (a
  redelivery after a crash, a killed child's retry, a chunk handed back and then retried) overwrites its own
  entry; a different event that reuses a task id gets an entry of its own (the same event twice in one
  chunk, one).
* Replay sends each event again as ``lookalike.ingest`` to ``lookalike.live`` or ``lookalike.backfill``
  (the recorded queue when it is one of these, else by task) — never to a queue name a producer chose —
  then deletes the entry; sending twice is harmless (ingestion is idempotent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from workers.events import BACKFILL_QUEUE, INGEST_BATCH_TASK, LIVE_QUEUE, MAX_EVENT_BYTES

log = logging.getLogger(__name__)

HASH_KEY = "lookalike:deadletters"
INDEX_KEY = "lookalike:deadletters:index"
MAX_ENTRIES = 100_000  # a flood of poison must not fill Redis (it runs with noeviction)
MAX_KEPT_BYTES = 64 * 1024  # UTF-8 bytes of one kept event; more is truncated (never a valid event)
MAX_KEY_CHARS = 64  # the producer-chosen part of an entry id
MAX_NAME_CHARS = 200  # queue and task names
MAX_REASON_CHARS = 1000
assert MAX_KEPT_BYTES > MAX_EVENT_BYTES  # every valid event is kept whole

_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")


@dataclass
class DeadLetter:
    id: str
    event: Any  # a JSON value when the event was JSON, else the raw text (cut when ``truncated``)
    reason: str
    attempts: int
    at: float  # UNIX seconds
    queue: str | None = None
    task: str | None = None
    truncated: bool = False  # ``event`` is the first MAX_KEPT_BYTES of something larger: not replayable

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        return out


def safe_key(text: Any) -> str:
    """A producer-supplied id as a bounded, shell- and terminal-safe token."""
    return _UNSAFE.sub("_", str(text))[:MAX_KEY_CHARS] or "_"


def safe_name(text: Any) -> str | None:
    """A producer-supplied queue or task name without control characters, at most MAX_NAME_CHARS."""
    if text is None:
        return None
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "\ufffd" for c in str(text))[:MAX_NAME_CHARS]


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _cut(text: str, limit: int) -> str:
    return _utf8(text)[:limit].decode("utf-8", "ignore")


def keep(event: Any) -> tuple[Any, bool]:
    """(what to store of ``event``, whether it was truncated): JSON values whole when they fit, raw text
    (bytes decoded as UTF-8) as text; anything larger than MAX_KEPT_BYTES cut and flagged."""
    if isinstance(event, bytes | bytearray):
        event = bytes(event).decode("utf-8", "replace")
    if isinstance(event, str):
        text = event
    else:
        try:
            text = json.dumps(event, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(event)  # not JSON (cannot come from a JSON message); kept as text
        else:
            if len(_utf8(text)) <= MAX_KEPT_BYTES:
                return event, False
    if len(_utf8(text)) <= MAX_KEPT_BYTES:
        return text, False
    return _cut(text, MAX_KEPT_BYTES), True


def digest(event: Any) -> str:
    """12 hex digits of the SHA-256 of the event's canonical JSON (of its text when it is not JSON)."""
    if isinstance(event, bytes | bytearray):
        data = bytes(event)
    else:
        try:
            data = _utf8(json.dumps(event, sort_keys=True, ensure_ascii=False))
        except (TypeError, ValueError):
            data = _utf8(repr(event))
    return hashlib.sha256(data).hexdigest()[:12]


def replay_queue(entry: DeadLetter) -> str:
    """Where a replayed event goes: the entry's queue if it is one of lookalike's, else by task."""
    if entry.queue in (LIVE_QUEUE, BACKFILL_QUEUE):
        return entry.queue
    return BACKFILL_QUEUE if entry.task == INGEST_BATCH_TASK else LIVE_QUEUE


class DeadLetters:
    """The dead-letter store over a ``redis.Redis`` client (``from_url`` builds one)."""

    def __init__(self, client: Any, *, max_entries: int = MAX_ENTRIES) -> None:
        self.client = client
        self.max_entries = max_entries

    @classmethod
    def from_url(cls, url: str) -> DeadLetters:
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=25))

    def add(self, event: Any, reason: str, *, attempts: int = 1, id: str, queue: str | None = None,
            task: str | None = None) -> DeadLetter:
        """Store ``event`` with ``reason``; ``id`` is the stable key of this failure (see the module
        docstring), made safe and extended with a digest of the event. Returns the entry as stored."""
        kept, truncated = keep(event)
        first_line = reason.splitlines()[0] if reason and reason.strip() else "unknown"
        entry = DeadLetter(id=f"{safe_key(id)}:{digest(event)}", event=kept, reason=first_line[:MAX_REASON_CHARS],
                           attempts=int(attempts), at=time.time(), queue=safe_name(queue), task=safe_name(task),
                           truncated=truncated)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(HASH_KEY, entry.id, _utf8(json.dumps(asdict(entry), ensure_ascii=False)))
        pipe.zadd(INDEX_KEY, {entry.id: entry.at})
        pipe.execute()
        self._trim()
        log.warning("dead-lettered %s: %s", _describe(entry.event), entry.reason)
        return entry

    def _trim(self) -> None:
        excess = self.client.zcard(INDEX_KEY) - self.max_entries
        if excess > 0:
            old = [x.decode() if isinstance(x, bytes) else x for x in self.client.zrange(INDEX_KEY, 0, excess - 1)]
            log.error("dead-letter store full (%d entries): dropping the %d oldest", self.max_entries, len(old))
            self.remove(old)

    def count(self) -> int:
        return int(self.client.zcard(INDEX_KEY))

    def ids(self, limit: int | None = None, offset: int = 0) -> list[str]:
        end = -1 if limit is None else offset + limit - 1
        return [x.decode() if isinstance(x, bytes) else x for x in self.client.zrange(INDEX_KEY, offset, end)]

    def list(self, limit: int | None = 100, offset: int = 0) -> list[DeadLetter]:
        """Entries, oldest first."""
        ids = self.ids(limit, offset)
        if not ids:
            return []
        return [e for e in (self._load(raw) for raw in self.client.hmget(HASH_KEY, ids)) if e is not None]

    def get(self, id: str) -> DeadLetter | None:
        return self._load(self.client.hget(HASH_KEY, id))

    @staticmethod
    def _load(raw: Any) -> DeadLetter | None:
        if raw is None:
            return None
        data = json.loads(raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else raw)
        fields = {k: data.get(k) for k in DeadLetter.__dataclass_fields__}
        fields["truncated"] = bool(fields["truncated"])
        return DeadLetter(**fields)

    def remove(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(HASH_KEY, *ids)
        pipe.zrem(INDEX_KEY, *ids)
        removed, _ = pipe.execute()
        return int(removed)

    def purge(self, ids: Iterable[str] | None = None) -> int:
        """Delete the given entries, or all of them."""
        if ids is not None:
            return self.remove(ids)
        n = self.count()
        self.client.delete(HASH_KEY, INDEX_KEY)
        return n

    def replay(self, send: Callable[[dict[str, Any], str], None], ids: Iterable[str] | None = None
               ) -> tuple[int, list[tuple[str, str]]]:
        """Send the entries' events again (``send(event, queue)``, queue from ``replay_queue``) and delete
        the entries sent. An entry holding a list (a refused batch message) sends each of its events.

        Returns (number of events sent, [(id, why not)] for entries that cannot be replayed: unknown id,
        a truncated event, or an event that is still not valid — fix the producer and purge those)."""
        from workers.events import InvalidEvent, parse_event

        sent, skipped = 0, []
        for id in list(ids) if ids is not None else self.ids():
            entry = self.get(id)
            if entry is None:
                skipped.append((id, "no such dead letter"))
                continue
            if entry.truncated:
                skipped.append((id, f"the event was larger than {MAX_KEPT_BYTES} bytes and was stored truncated"))
                continue
            try:
                raws = entry.event if isinstance(entry.event, list) else [entry.event]
                events = [parse_event(raw).to_dict() for raw in raws]
            except InvalidEvent as err:
                skipped.append((id, err.reason))
                continue
            queue = replay_queue(entry)
            for event in events:
                event.pop("sent_at", None)  # a replay is a new send: its queue wait starts now
                send(event, queue)
            self.remove([id])
            sent += len(events)
        return sent, skipped


def _describe(event: Any) -> str:
    if isinstance(event, dict) and isinstance(event.get("uri"), str):
        return safe_name(event["uri"]) or ""
    return repr(event)[:120]


__all__ = ["HASH_KEY", "INDEX_KEY", "MAX_KEPT_BYTES", "DeadLetter", "DeadLetters", "digest", "keep", "replay_queue",
           "safe_key", "safe_name"]
