"""Dead letters: events that could not be ingested, kept in Redis with why, until replayed or purged.

Layout (two keys in the broker's Redis, so they share its AOF durability):

* ``lookalike:deadletters``        hash  entry id → JSON ``{"id", "event", "reason", "attempts", "at",
  "queue", "task"}``; ``event`` is the event as received (a dict, or the raw text when it was not JSON);
* ``lookalike:deadletters:index``  sorted set  entry id → time (oldest first).

An entry's id is derived from the Celery task id and the event's position in the task, so a failure
handled twice (a redelivery after a crash) overwrites its own entry instead of adding another.
Replay sends the event again, then deletes the entry; sending twice is harmless (ingestion is idempotent).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

HASH_KEY = "lookalike:deadletters"
INDEX_KEY = "lookalike:deadletters:index"
MAX_ENTRIES = 100_000  # a flood of poison must not fill Redis (it runs with noeviction)
MAX_RAW_CHARS = 8192  # raw, unparseable messages are kept truncated


@dataclass
class DeadLetter:
    id: str
    event: Any  # dict when the event was JSON, else the (truncated) raw text
    reason: str
    attempts: int
    at: float  # UNIX seconds
    queue: str | None = None
    task: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        return out


def _clip(event: Any) -> Any:
    if isinstance(event, bytes | bytearray):
        event = bytes(event).decode("utf-8", "replace")
    if isinstance(event, str):
        return event[:MAX_RAW_CHARS]
    try:
        text = json.dumps(event)
    except (TypeError, ValueError):
        return repr(event)[:MAX_RAW_CHARS]
    return event if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS]


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
        entry = DeadLetter(id=id, event=_clip(event), reason=reason.splitlines()[0][:1000] if reason else "unknown",
                           attempts=int(attempts), at=time.time(), queue=queue, task=task)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(HASH_KEY, id, json.dumps(asdict(entry)))
        pipe.zadd(INDEX_KEY, {id: entry.at})
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
        data = json.loads(raw)
        return DeadLetter(**{k: data.get(k) for k in DeadLetter.__dataclass_fields__})

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

    def replay(self, send: Callable[[dict[str, Any], str | None], None], ids: Iterable[str] | None = None
               ) -> tuple[int, list[tuple[str, str]]]:
        """Send the entries' events again (``send(event, queue)``) and delete those sent.

        Returns (number sent, [(id, why not)] for entries that cannot be replayed: unknown id, or an
        event that is still not valid — fix the producer and purge those)."""
        from workers.events import InvalidEvent, parse_event

        sent, skipped = 0, []
        for id in list(ids) if ids is not None else self.ids():
            entry = self.get(id)
            if entry is None:
                skipped.append((id, "no such dead letter"))
                continue
            try:
                event = parse_event(entry.event).to_dict()
                event.pop("sent_at", None)  # a replay is a new send: its queue wait starts now
            except InvalidEvent as err:
                skipped.append((id, err.reason))
                continue
            send(event, entry.queue)
            self.remove([id])
            sent += 1
        return sent, skipped


def _describe(event: Any) -> str:
    if isinstance(event, dict) and isinstance(event.get("uri"), str):
        return event["uri"]
    return repr(event)[:120]


__all__ = ["HASH_KEY", "INDEX_KEY", "DeadLetter", "DeadLetters"]
