"""Sending ingestion events to the workers: ``enqueue_refs`` (``lookalike enqueue``, ``backfill --via-workers``
through the ``lookalike.fanout`` entry point, ``watch --via-broker``, and ``serve`` with a broker)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from search.errors import ConfigError

if TYPE_CHECKING:
    from ingest.sources import ImageRef
    from search.config import Settings

DEFAULT_CHUNK = 64


def _events(refs: Iterable[ImageRef]) -> Iterator[dict[str, Any]]:
    from workers.events import event_for

    for ref in refs:
        yield event_for(ref, sent_at=time.time())


def enqueue_refs(refs: Iterable[ImageRef], settings: Settings, queue: str = "backfill",
                 chunk_size: int = DEFAULT_CHUNK, *, app: Any = None) -> int:
    """Send ``refs`` to the workers; returns the number of tasks sent.

    ``queue="live"``: one ``lookalike.ingest`` task per image (uploads). Otherwise (``backfill`` or a queue
    name): ``lookalike.ingest_batch`` tasks of ``chunk_size`` events, so workers embed whole batches."""
    from ingest.pipeline import chunked
    from workers.app import make_app
    from workers.events import INGEST_BATCH_TASK, INGEST_TASK, LIVE_QUEUE, MAX_BATCH_EVENTS, resolve_queue

    if not 1 <= chunk_size <= MAX_BATCH_EVENTS:
        raise ConfigError(f"--chunk-size must be between 1 and {MAX_BATCH_EVENTS}")
    name = resolve_queue(queue)
    app = app or make_app(settings)
    sent = 0
    with _broker_errors(settings), app.producer_or_acquire() as producer:
        if name == LIVE_QUEUE:
            for event in _events(refs):
                app.send_task(INGEST_TASK, args=[event], queue=name, producer=producer)
                sent += 1
        else:
            for chunk in chunked(_events(refs), chunk_size):
                app.send_task(INGEST_BATCH_TASK, args=[chunk], queue=name, producer=producer)
                sent += 1
    return sent


@contextlib.contextmanager
def _broker_errors(settings: Settings) -> Iterator[None]:
    """A broker that cannot be reached becomes a one-line ConfigError naming it (password masked)."""
    try:
        yield
    except Exception as err:
        if is_connection_error(err):
            raise ConfigError(unreachable(settings, err)) from None
        raise


def is_connection_error(err: BaseException) -> bool:
    import kombu.exceptions
    import redis.exceptions

    return isinstance(err, kombu.exceptions.OperationalError | redis.exceptions.ConnectionError | ConnectionError)


def unreachable(settings: Settings, err: BaseException) -> str:
    from workers.config import as_worker_settings, mask_url

    return (f"cannot reach the broker at {mask_url(as_worker_settings(settings).broker)} ({type(err).__name__}); "
            "start Redis or set LOOKALIKE_BROKER_URL")


def enqueue_removals(uris: Iterable[str], settings: Settings, *, app: Any = None) -> int:
    """Send ``op: delete`` events (one live task each) for locations that are gone; the number sent."""
    from ingest.sources import ImageRef
    from workers.app import make_app
    from workers.events import INGEST_TASK, LIVE_QUEUE, event_for

    app = app or make_app(settings)
    sent = 0
    with _broker_errors(settings), app.producer_or_acquire() as producer:
        for uri in uris:
            event = event_for(ImageRef(uri), sent_at=time.time(), op="delete")
            app.send_task(INGEST_TASK, args=[event], queue=LIVE_QUEUE, producer=producer)
            sent += 1
    return sent


__all__ = ["DEFAULT_CHUNK", "enqueue_refs", "enqueue_removals", "is_connection_error", "unreachable"]
