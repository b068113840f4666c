"""What a broker message must be before Celery sees it, so that no message can stop a worker.

The README invites any producer to LPUSH raw Celery messages. Celery and kombu trust those messages: a
missing ``id`` header makes the consumer raise, reconnect, get the same message back and loop until
``RestartFreqExceeded``; a refused content type is dropped without a trace; a body kombu cannot decode is
lost after ``BRPOP``. Every message is therefore checked twice, and one that fails either check is
dead-lettered (``workers.deadletters``) with the reason, then acknowledged — the worker goes on:

=============================================================  ===========================  ===================
what is wrong                                                  checked by                   then
=============================================================  ===========================  ===================
not JSON, not an object, no ``properties``, ``headers`` not an   ``envelope_problem``         dead letter (the
object, a body its ``body_encoding`` cannot decode (bad          (``workers.transport``,      raw text, capped),
base64), anything else kombu cannot build a message from        right after ``BRPOP``)       dropped: it never
                                                                                             became unacked
missing/empty/non-string ``id`` or ``task``; wrong types of      ``task_problem``             dead letter, ack
``retries``, ``eta``, ``expires``, ``timelimit`` and the other   (``workers.app``'s
headers Celery reads; an ``eta`` further ahead than the          consumer, before Celery's
visibility timeout allows; already expired                      strategy)
content type other than JSON (pickle, yaml, …)                  ``task_problem``             dead letter, ack
undecodable body; body not ``[args, kwargs, embed]``; not       ``task_problem``             dead letter, ack
exactly one argument; callbacks, chains or chords
a task other than ``lookalike.ingest`` / ``ingest_batch``       ``task_problem``             dead letter, ack
held by a whole worker that died more than ``max_retries``     ``task_problem``             dead letter, ack
times (``workers.recovery`` counts it)
anything Celery still raises on while accepting the message     the consumer's backstop      dead letter, ack
=============================================================  ===========================  ===================

A message that passes is also *normalised* (``normalise``): its delivery tag is replaced by a fresh one
(a producer reusing a tag would make kombu's unacked bookkeeping lose one of two messages) and its
``delivery_info`` names the queue it was actually taken from, so retries, restores and dead letters go
back to that queue and never to a name the producer made up.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
from datetime import UTC, datetime
from typing import Any

from workers.events import INGEST_BATCH_TASK, INGEST_TASK

#: The tasks a lookalike worker runs, and the name of each one's single parameter.
TASK_PARAMS = {INGEST_TASK: "event", INGEST_BATCH_TASK: "events"}
#: Header ``workers.recovery`` increments each time it restores a message held by a dead worker.
RECOVERED_HEADER = "lookalike_recovered"
MAX_HEADER_CHARS = 255
JSON = "application/json"

_TEXT_HEADERS = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin", "lang")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- transport level
def envelope_problem(raw: Any) -> str | None:
    """Why kombu could not turn the decoded Redis list item ``raw`` into a message, or None."""
    if not isinstance(raw, dict):
        return f"not a Celery message: a JSON {_kind(raw)}, not an object"
    properties = raw.get("properties")
    if not isinstance(properties, dict):
        return f"'properties' must be an object, not {_kind(properties)}"
    headers = raw.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"'headers' must be an object, not {_kind(headers)} (Celery message protocol 2)"
    for key in ("content-type", "content-encoding"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"{key!r} must be a string, not {_kind(raw[key])}"
    body, encoding = raw.get("body"), properties.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return f"'body' must be a string, not {_kind(body)}"
    if encoding not in (None, "base64"):
        return f"unknown body_encoding {encoding!r} (base64 or none)"
    if body and encoding == "base64":
        try:
            base64.b64decode(body.encode("utf-8"))  # as kombu decodes it
        except (binascii.Error, ValueError) as err:
            return f"the body is not valid base64 ({err})"
    delivery_info = properties.get("delivery_info")
    if delivery_info is not None and not isinstance(delivery_info, dict):
        return f"'properties.delivery_info' must be an object, not {_kind(delivery_info)}"
    return None


def normalise(raw: dict[str, Any], queue: str) -> None:
    """Give ``raw`` a fresh delivery tag and the queue it came from (see the module docstring)."""
    properties = raw["properties"]
    info = properties.get("delivery_info") or {}
    properties["delivery_tag"] = str(uuid.uuid4())
    properties["delivery_info"] = {"exchange": "", "routing_key": queue, "redelivered": info.get("redelivered") is True}


# ---------------------------------------------------------------------------------------------- consumer level
def _header_problem(headers: dict[str, Any], *, max_recovered: int, max_eta_ahead: float,
                    now: datetime) -> str | None:
    for key in ("id", "task"):
        value = headers.get(key)
        if not isinstance(value, str) or not value.strip():
            what = "the task id" if key == "id" else f"{INGEST_TASK} or {INGEST_BATCH_TASK}"
            return (f"header {key!r} must be a non-empty string ({what}), "
                    f"got {'nothing' if key not in headers else _kind(value)}")
        if len(value) > MAX_HEADER_CHARS or not value.isprintable():
            return f"header {key!r} is longer than {MAX_HEADER_CHARS} characters or holds control characters"
    if headers["task"] not in TASK_PARAMS:
        return f"unknown task {headers['task']!r} (send {INGEST_TASK} or {INGEST_BATCH_TASK})"
    for key in _TEXT_HEADERS:
        if headers.get(key) is not None and not isinstance(headers[key], str):
            return f"header {key!r} must be a string or null, not {_kind(headers[key])}"
    retries = headers.get("retries")
    if retries is not None and not (_is_int(retries) and retries >= 0):
        return f"header 'retries' must be a non-negative integer, not {retries!r}"
    if headers.get("ignore_result") is not None and not isinstance(headers["ignore_result"], bool):
        return "header 'ignore_result' must be true, false or null"
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, list | tuple) and len(limits) == 2 and all(
            x is None or (_is_number(x) and x >= 0) for x in limits)):
        return f"header 'timelimit' must be [soft, hard] (seconds or null), not {limits!r}"[:300]
    stamped = headers.get("stamped_headers")
    if stamped is not None and not (isinstance(stamped, list) and all(isinstance(x, str) for x in stamped)):
        return "header 'stamped_headers' must be a list of strings or null"
    if headers.get("stamps") is not None and not isinstance(headers["stamps"], dict):
        return "header 'stamps' must be an object or null"
    recovered = headers.get(RECOVERED_HEADER, 0)
    if not _is_int(recovered):
        return f"header {RECOVERED_HEADER!r} must be an integer"
    if recovered > max_recovered:
        return (f"the whole worker died {recovered} times while holding it (crash or out of memory?); "
                f"gave up after {max_recovered} restores")
    return _time_problem(headers, max_eta_ahead, now)


def _time_problem(headers: dict[str, Any], max_eta_ahead: float, now: datetime) -> str | None:
    from celery.utils.time import maybe_iso8601

    times: dict[str, datetime] = {}
    for key in ("eta", "expires"):
        value = headers.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"header {key!r} must be an ISO-8601 string or null, not {_kind(value)}"
        try:
            parsed = maybe_iso8601(value)
        except (ValueError, TypeError, OverflowError) as err:
            return f"header {key!r} is not an ISO-8601 time ({err})"[:300]
        if parsed is not None:
            times[key] = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    if "eta" in times and (times["eta"] - now).total_seconds() > max_eta_ahead:
        # The worker holds a message with an eta unacknowledged until then: longer than the visibility
        # timeout allows, Redis would hand it to another worker meanwhile.
        return f"header 'eta' is more than {max_eta_ahead:.0f} s ahead ({headers['eta']})"
    if "expires" in times and times["expires"] <= now:
        return f"expired at {headers['expires']} before a worker took it"
    return None


def _body_problem(task: str, body: Any) -> str | None:
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return f"the body must be [args, kwargs, embed], not {_kind(body)}" + (
            f" of {len(body)}" if isinstance(body, list | tuple) else "")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return f"the body's args must be a list and kwargs an object, not {_kind(args)} and {_kind(kwargs)}"
    param = TASK_PARAMS[task]
    if len(args) + len(kwargs) != 1 or set(kwargs) - {param}:
        return f"{task} takes one argument ({param}), got {len(args)} positional and {sorted(kwargs)!r}"[:300]
    if embed is not None and not isinstance(embed, dict):
        return f"the body's embed must be an object or null, not {_kind(embed)}"
    if any((embed or {}).get(key) for key in ("callbacks", "errbacks", "chain", "chord")):
        return "callbacks, errbacks, chains and chords are not accepted"
    return None


def task_problem(message: Any, *, max_recovered: int, max_eta_ahead: float,
                 now: datetime | None = None) -> str | None:
    """Why the kombu ``message`` is not a lookalike task Celery can run safely, or None.

    Decodes a JSON body (kombu caches it, so Celery does not decode it again); any other content type is
    refused *before* decoding, so nothing but JSON is ever parsed."""
    headers = message.headers
    if not isinstance(headers, dict) or not headers:
        return "no headers: not a Celery task message (protocol 2)"
    problem = _header_problem(headers, max_recovered=max_recovered, max_eta_ahead=max_eta_ahead,
                              now=now or datetime.now(UTC))
    if problem:
        return problem
    if message.content_type != JSON:
        return f"content type {message.content_type!r} is refused: lookalike accepts {JSON} only"
    try:
        body = message.decode()
    except Exception as err:  # whatever kombu raises for this body
        return f"cannot decode the message body ({message.content_type}): {type(err).__name__}: {err}"[:500]
    return _body_problem(headers["task"], body)


# ---------------------------------------------------------------------------------------------- dead letters
def kept_event(message: Any) -> Any:
    """What to keep of a refused message: its event(s) when a JSON body holds them (so a typo in a header
    can be replayed), else the body as text. Never decodes anything but JSON."""
    body: Any = None
    if getattr(message, "content_type", None) == JSON:
        try:
            body = message.decode()
        except Exception:
            body = None
    if isinstance(body, list | tuple) and body and isinstance(body[0], list | tuple) and len(body[0]) == 1:
        return body[0][0]
    if isinstance(body, list | tuple) and len(body) > 1 and isinstance(body[1], dict) and len(body[1]) == 1:
        return next(iter(body[1].values()))
    raw = message.body
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else raw


def queue_of(message: Any) -> str | None:
    info = getattr(message, "delivery_info", None)
    return info.get("routing_key") if isinstance(info, dict) else None


def task_of(headers: Any) -> str | None:
    task = headers.get("task") if isinstance(headers, dict) else None
    return task if isinstance(task, str) else None


def letter_key(headers: Any, fallback: str) -> str:
    """The producer-supplied part of a refused message's dead-letter id (``DeadLetters.add`` bounds and
    sanitises it and adds a digest of the content)."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return f"message:{task_id if isinstance(task_id, str) and task_id else fallback}"


__all__ = ["RECOVERED_HEADER", "TASK_PARAMS", "envelope_problem", "kept_event",
           "letter_key", "normalise", "queue_of", "task_of", "task_problem"]
