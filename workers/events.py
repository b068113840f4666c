"""The ingestion event: a versioned JSON object any producer (any language) can send through Celery.

Contract, version 1::

    {"version": 1,                  # required, int; unknown versions are refused
     "uri": "/srv/images/a.jpg",    # required: absolute local path, file:// or http(s):// URL
     "labels": ["cat"],             # optional: labels the producer knows (list of non-empty strings)
     "source": "uploads",           # optional: who sent it (stored in the payload's ``source``)
     "event_id": "42",              # optional: the producer's id, echoed in logs and dead letters
     "sent_at": 1718000000.123,     # optional: UNIX seconds when it was sent (queue-wait metrics)
     "op": "upsert"}                # optional: "upsert" (default) or "delete" — the file at uri is gone:
                                    # the uri leaves its point, and a point left without one is deleted

Unknown fields, wrong types and oversized events are refused with ``InvalidEvent`` (a reason for the dead
letter): a typo in a producer must show up, not be silently ignored. So is anything that would fail later
instead of here, for this event alone: a string that is not valid Unicode (a lone surrogate), a ``file://``
URI that cannot name a local file (``%00``), a URL that does not parse, JSON nested deeper than the parser's
stack or holding a number of thousands of digits. ``parse_event`` raises nothing but ``InvalidEvent``.
Within one version, fields are only ever added as optional ones; a breaking change gets ``"version": 2``.

Tasks and queues (both fixed names, so producers need nothing of ours):

* ``lookalike.ingest``       one event, args ``[event]``            → queue ``lookalike.live``
* ``lookalike.ingest_batch`` a chunk, args ``[[event, event, …]]``  → queue ``lookalike.backfill``

``celery_message`` builds the raw Redis message (Celery protocol v2, JSON body) that the README shows
producing from plain redis-py.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search.errors import LookalikeError

if TYPE_CHECKING:
    from ingest.sources import ImageRef

EVENT_VERSION = 1
INGEST_TASK = "lookalike.ingest"
INGEST_BATCH_TASK = "lookalike.ingest_batch"
LIVE_QUEUE = "lookalike.live"
BACKFILL_QUEUE = "lookalike.backfill"
QUEUES = {"live": LIVE_QUEUE, "backfill": BACKFILL_QUEUE}

MAX_EVENT_BYTES = 16 * 1024  # one event as JSON; a uri of a few KB is already absurd
MAX_URI_CHARS = 4096
MAX_LABELS = 64
MAX_TEXT_CHARS = 256  # one label, source or event_id
MAX_BATCH_EVENTS = 1000

_FIELDS = {"version", "uri", "labels", "source", "event_id", "sent_at", "op"}
OPS = ("upsert", "delete")


class InvalidEvent(LookalikeError):
    """An event that breaks the contract. ``reason`` is one line, stored with the dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid event: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Event:
    """A validated event (see the module docstring)."""

    uri: str
    labels: tuple[str, ...] = ()
    source: str | None = None
    event_id: str | None = None
    sent_at: float | None = None
    op: str = "upsert"
    version: int = EVENT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "uri": self.uri}
        if self.labels:
            out["labels"] = list(self.labels)
        for key in ("source", "event_id", "sent_at"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.op != "upsert":  # the default stays implicit: such events read the same as version-1 ones
            out["op"] = self.op
        return out

    def to_ref(self) -> ImageRef:
        """The event's part that describes the image: every ``ImageRef`` field is an event field of the same
        name, so a new field reaches the pipeline (and the payload) through this one path."""
        from dataclasses import fields

        from ingest.sources import ImageRef

        return ImageRef(**{f.name: getattr(self, f.name) for f in fields(ImageRef)})


def _text(data: dict[str, Any], key: str, limit: int = MAX_TEXT_CHARS) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(f"{key!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidEvent(f"{key!r} is empty")
    if len(value) > limit:
        raise InvalidEvent(f"{key!r} is longer than {limit} characters")
    if "\x00" in value:
        raise InvalidEvent(f"{key!r} contains a NUL character")
    try:
        value.encode("utf-8")  # a lone surrogate cannot be logged, stored in a payload or used as a path
    except UnicodeEncodeError:
        raise InvalidEvent(f"{key!r} is not valid Unicode text (a lone surrogate)") from None
    return value


def _load_json(raw: str | bytes | bytearray, what: str, limit: int | None = None) -> Any:
    """Decode JSON text (bytes must be UTF-8), refusing more than ``limit`` bytes before parsing any of it.

    ``what`` names the thing in the reasons ("batch is not valid JSON"); "" gives the bare single-event ones."""
    subject = f"{what} is " if what else ""
    size = len(raw) if isinstance(raw, bytes | bytearray) else len(raw.encode("utf-8", "surrogatepass"))
    if limit is not None and size > limit:
        raise InvalidEvent(f"{subject}larger than {limit} bytes")
    if isinstance(raw, bytes | bytearray):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent(f"{subject}not UTF-8") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise InvalidEvent(f"{subject}not valid JSON ({err.msg} at position {err.pos})") from None
    except RecursionError:
        raise InvalidEvent(f"{subject}not valid JSON (nested too deeply)") from None
    except ValueError as err:  # an integer over sys.get_int_max_str_digits() digits
        raise InvalidEvent(f"{subject}not valid JSON ({str(err).split(':')[0]})") from None


def parse_event(raw: Any) -> Event:
    """Validate ``raw`` (a dict, or its JSON as str/bytes) strictly; ``InvalidEvent`` says what is wrong."""
    if isinstance(raw, str | bytes | bytearray):
        raw = _load_json(raw, "", MAX_EVENT_BYTES)
    if not isinstance(raw, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(raw).__name__}")
    try:
        size = len(json.dumps(raw, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):  # RecursionError: a dict nested deeper than the stack
        raise InvalidEvent("not JSON-serialisable") from None
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(f"larger than {MAX_EVENT_BYTES} bytes")
    unknown = sorted(set(raw) - _FIELDS, key=str)
    if unknown:
        raise InvalidEvent(f"unknown field {unknown[0]!r} (version {EVENT_VERSION} has {', '.join(sorted(_FIELDS))})")
    version = raw.get("version")
    if version is None:
        raise InvalidEvent("missing 'version' (send \"version\": 1)")
    if type(version) is not int or version != EVENT_VERSION:
        raise InvalidEvent(f"unsupported version {version!r} (this worker understands {EVENT_VERSION})")
    if "uri" not in raw:
        raise InvalidEvent("missing 'uri'")
    uri = _text(raw, "uri", MAX_URI_CHARS)
    if uri is None:  # "uri": null (an assert here was an AssertionError, and nothing under python -O)
        raise InvalidEvent("'uri' must be a string, not null")
    if not (uri.startswith(("/", "file://", "http://", "https://"))):
        raise InvalidEvent("'uri' must be an absolute path, a file:// or an http(s):// URL")
    if (problem := _uri_problem(uri)) is not None:
        raise InvalidEvent(f"'uri' {problem}")
    labels_raw = raw.get("labels")
    labels: tuple[str, ...] = ()
    if labels_raw is not None:
        if not isinstance(labels_raw, list):
            raise InvalidEvent(f"'labels' must be a list of strings, not {type(labels_raw).__name__}")
        if len(labels_raw) > MAX_LABELS:
            raise InvalidEvent(f"more than {MAX_LABELS} labels")
        checked = [_text({"label": x}, "label") for x in labels_raw]
        labels = tuple(dict.fromkeys(x.strip() for x in checked if x is not None))
    sent_at = raw.get("sent_at")
    if sent_at is not None:
        try:
            seconds = float(sent_at) if type(sent_at) in (int, float) else math.nan  # an int of 400 digits overflows
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidEvent("'sent_at' must be UNIX seconds (a non-negative number)")
        sent_at = seconds
    op = raw.get("op", "upsert")
    if op not in OPS:
        raise InvalidEvent(f"'op' must be one of {', '.join(OPS)}, not {str(op)[:40]!r}")
    return Event(uri=uri, labels=labels, source=_text(raw, "source"), event_id=_text(raw, "event_id"),
                 sent_at=sent_at, op=op)


def _uri_problem(uri: str) -> str | None:
    """Why ``uri`` can name no file or URL (refused here, for this event alone), or None."""
    from urllib.parse import urlsplit

    from search.reading import to_path, uri_scheme

    try:
        if uri_scheme(uri) in ("http", "https"):
            parts = urlsplit(uri)
            _ = parts.port  # ValueError on a port that is not a number in range
            return None if parts.hostname else "is a URL without a host"
        to_path(uri)
    except ValueError as err:
        return f"is not usable: {err}"
    return None


def parse_batch(raw: Any) -> list[Any]:
    """The list of (not yet validated) events of a batch task; ``InvalidEvent`` if it is not one."""
    if isinstance(raw, str | bytes | bytearray):
        raw = _load_json(raw, "batch")
    if not isinstance(raw, list):
        raise InvalidEvent(f"a batch must be a list of events, not {type(raw).__name__}")
    if len(raw) > MAX_BATCH_EVENTS:
        raise InvalidEvent(f"a batch holds at most {MAX_BATCH_EVENTS} events, got {len(raw)}")
    return raw


def make_event(uri: str, labels: tuple[str, ...] | list[str] = (), *, source: str | None = None,
               event_id: str | None = None, sent_at: float | None = None, op: str = "upsert") -> dict[str, Any]:
    """A valid version-1 event dict (validated here, so a producer bug fails at the producer)."""
    event = Event(uri=uri, labels=tuple(labels), source=source, event_id=event_id, sent_at=sent_at,
                  op=op).to_dict()
    return parse_event(event).to_dict()


def event_for(ref: ImageRef, *, event_id: str | None = None, sent_at: float | None = None,
              op: str = "upsert") -> dict[str, Any]:
    """The event that asks a worker to ingest ``ref`` (the inverse of ``Event.to_ref``), or, with
    ``op="delete"``, to forget its uri."""
    from dataclasses import asdict

    return make_event(**asdict(ref), event_id=event_id, sent_at=sent_at, op=op)


def resolve_queue(name: str) -> str:
    """``live``/``backfill`` or a full queue name → the queue name."""
    return QUEUES.get(name, name)


def celery_message(task: str, args: list[Any], queue: str, *, task_id: str | None = None) -> str:
    """The JSON a Celery (protocol v2) producer LPUSHes onto the Redis list named ``queue``."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
                    "argsrepr": None, "kwargsrepr": None, "origin": "lookalike"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })


__all__ = ["BACKFILL_QUEUE", "EVENT_VERSION", "INGEST_BATCH_TASK", "INGEST_TASK", "LIVE_QUEUE", "MAX_BATCH_EVENTS",
           "MAX_EVENT_BYTES", "Event", "InvalidEvent", "celery_message", "make_event", "parse_batch", "parse_event",
           "resolve_queue"]
