"""Thin tasks: parse the event → ``Pipeline.ingest`` → ack. Failures are retried or dead-lettered, never dropped.

* ``lookalike.ingest(event)``           one upload (queue ``lookalike.live``);
* ``lookalike.ingest_batch([events])``  a backfill chunk (queue ``lookalike.backfill``), embedded as one
  batch. Between sub-batches it checks whether uploads are waiting; if so it hands the rest of its
  chunk back to the backfill queue and finishes, so the next message this worker takes is the upload.

What happens to an event:

=====================================================  ==================================================
indexed / present / updated                            ack (a redelivered event is "present": no change)
invalid event, unreadable or undecodable file, path    dead letter (reason, attempt count), ack
outside the allowed roots (permanent)
store unreachable, Redis connection error (transient)  retry: exponential backoff with jitter, at most
                                                       ``max_retries`` times, then dead letter
worker process killed mid-task                         sent again (``retry_on_worker_lost``), bounded the
                                                       same way
soft/hard time limit, unexpected error                 dead letter
=====================================================  ==================================================

The pipeline is built once per worker process, lazily (``get_pipeline``); ``pipeline_factory`` is the one
seam tests replace (a tiny embedder, a store that fails on purpose).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from search.errors import StoreLocked, StoreUnavailable
from workers.events import (
    BACKFILL_QUEUE,
    INGEST_BATCH_TASK,
    INGEST_TASK,
    LIVE_QUEUE,
    Event,
    InvalidEvent,
    parse_batch,
    parse_event,
)

if TYPE_CHECKING:
    from celery import Celery

    from ingest.pipeline import Outcome, Pipeline
    from search.config import Settings
    from workers.app import WorkerConfig
    from workers.deadletters import DeadLetters

log = logging.getLogger("workers.tasks")

# A backfill chunk checks for waiting uploads this often (images). Small enough that an upload waits at
# most ~one CPU batch; large enough for batched inference to pay off.
YIELD_EVERY = 16


def _transient() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: the store or the broker is briefly away, or the store lock is busy."""
    import kombu.exceptions
    import redis.exceptions

    return (StoreUnavailable, StoreLocked, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            kombu.exceptions.OperationalError, ConnectionError, TimeoutError)


# ---------------------------------------------------------------------------------------------- per process
def default_pipeline(settings: Settings) -> Pipeline:
    from ingest.pipeline import Pipeline

    # Workers sharing a Qdrant server must not interleave read-merge-write of one point's uris/labels
    # (nor embed the same new bytes twice and overwrite each other's uris): lock the point ids in Redis.
    from workers.app import broker_url

    lock = None if settings.embedded else RedisContentLock(_redis_for(broker_url(settings)))
    return Pipeline(settings, source="worker", content_lock=lock)


class RedisContentLock:
    """``with lock(point_ids):`` — one Redis lock per point id, taken in sorted order (no deadlock between
    workers), each expiring on its own so a killed worker cannot block a point for longer than ``ttl``."""

    def __init__(self, client: Any, *, ttl: float = 120.0, wait: float = 60.0) -> None:
        self.client, self.ttl, self.wait = client, ttl, wait

    @contextlib.contextmanager
    def __call__(self, ids: Sequence[str]) -> Iterator[None]:
        import redis.exceptions

        held = []
        try:
            for pid in sorted(set(ids)):
                lock = self.client.lock(f"lookalike:lock:{pid}", timeout=self.ttl, blocking_timeout=self.wait)
                if not lock.acquire():
                    raise StoreUnavailable(f"point {pid} stayed locked by another worker for {self.wait:.0f} s")
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                with contextlib.suppress(redis.exceptions.LockError):  # expired meanwhile: nothing to release
                    lock.release()


pipeline_factory: Callable[[Settings], Pipeline] = default_pipeline

_lock = threading.Lock()
_pipeline: Pipeline | None = None
_pipeline_pid: int | None = None
_dead: dict[tuple[int, str], DeadLetters] = {}
_redis: dict[tuple[int, str], Any] = {}


_ingest_lock = threading.Lock()


def _serial() -> Any:
    """With ``--pool threads`` the tasks of one process share one pipeline and store: take turns (the
    model already uses every core it is given; parallel calls would only contend)."""
    from workers.app import RUNTIME

    return _ingest_lock if RUNTIME.pool == "threads" else contextlib.nullcontext()


def get_pipeline(app: Any) -> Pipeline:
    """This process's pipeline (the model loads once per process; a forked child builds its own)."""
    global _pipeline, _pipeline_pid
    with _lock:
        if _pipeline is None or _pipeline_pid != os.getpid():
            from workers.app import worker_settings

            _pipeline, _pipeline_pid = pipeline_factory(worker_settings(app)), os.getpid()
        return _pipeline


def warm(app: Any) -> None:
    """Load the model, open the store, run one tiny inference: the first event then pays none of it."""
    from PIL import Image

    pipeline = get_pipeline(app)
    t0 = time.perf_counter()
    embedder = pipeline.embedder  # loads the model and checks the collection
    embedder.embed_images([Image.new("RGB", (64, 64), (127, 127, 127))])
    log.info("pipeline ready in %.1f s (model %s, pid %d)", time.perf_counter() - t0, embedder.name, os.getpid())


def _broker(app: Any) -> str:
    from workers.app import app_settings, broker_url

    return broker_url(app_settings(app))


def dead_letters(app: Any) -> DeadLetters:
    from workers.deadletters import DeadLetters

    key = (os.getpid(), _broker(app))
    if key not in _dead:
        _dead[key] = DeadLetters.from_url(key[1])
    return _dead[key]


def _redis_for(url: str) -> Any:
    """One client per process and broker URL; socket timeouts make a hung Redis fail a task, not hang it."""
    import redis

    key = (os.getpid(), url)
    if key not in _redis:
        _redis[key] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return _redis[key]


def redis_client(app: Any) -> Any:
    return _redis_for(_broker(app))


def _consumes_live(app: Any) -> bool:
    consume_from = getattr(app.amqp.queues, "consume_from", None)
    return not consume_from or LIVE_QUEUE in consume_from


def uploads_waiting(app: Any) -> bool:
    """True when upload events are queued and this worker consumes them."""
    if not _consumes_live(app):
        return False
    try:
        return bool(redis_client(app).llen(LIVE_QUEUE))
    except Exception:  # the check is an optimisation; never fail a chunk for it
        return False


# ---------------------------------------------------------------------------------------------- the work
def _queue_of(task: Any) -> str | None:
    info = getattr(task.request, "delivery_info", None) or {}
    return info.get("routing_key")


def _letter_id(task: Any, index: int) -> str:
    # Same task id + attempt + position on a redelivery: the entry overwrites itself.
    return f"{task.request.id}:{task.request.retries or 0}:{index}"


def _dead_letter(task: Any, event: Any, reason: str, index: int, attempts: int | None = None) -> None:
    dead_letters(task.app).add(event, reason, attempts=attempts or (task.request.retries or 0) + 1,
                               id=_letter_id(task, index), queue=_queue_of(task) or LIVE_QUEUE,
                               task=task.name)


def _log_outcome(event: Event, outcome: Outcome, queue_wait: float | None) -> None:
    parts = ", ".join(f"{k} {v * 1000:.0f}" for k, v in outcome.timings.items())
    wait = f"; queued {queue_wait * 1000:.0f} ms" if queue_wait is not None else ""
    log.info("%s %s (%s) [ms: %s]%s%s", outcome.status, event.uri, outcome.id, parts, wait,
             f" event {event.event_id}" if event.event_id else "")


def _summary(event: Event, outcome: Outcome, received: float) -> dict[str, Any]:
    return {"uri": event.uri, "event_id": event.event_id, "status": outcome.status, "id": outcome.id,
            "reason": outcome.reason, "tags": outcome.tags, "timings": outcome.timings,
            "queue_wait": (received - event.sent_at) if event.sent_at else None,
            "received_at": received, "done_at": time.time(), "pid": os.getpid()}


class _Timeout(Exception):
    def __init__(self, start: int) -> None:
        self.start = start


def _run_parts(task: Any, pipeline: Any, parsed: list[tuple[int, Event]], received: float, may_yield: bool,
               batch: bool, counts: dict[str, int], results: list[dict[str, Any]],
               transient: list[tuple[int, Event, str]]) -> int:
    """Ingest ``parsed`` in sub-batches (a backfill chunk yields to waiting uploads between them)."""
    from celery.exceptions import SoftTimeLimitExceeded

    start = 0
    try:
        while start < len(parsed):
            if may_yield and start > 0 and uploads_waiting(task.app):
                rest = [ev.to_dict() for _, ev in parsed[start:]]
                task.app.send_task(INGEST_BATCH_TASK, args=[rest], queue=_queue_of(task) or BACKFILL_QUEUE)
                counts["handed_back"] = len(rest)
                log.info("uploads waiting: handed %d backfill events back to the queue", len(rest))
                break
            part = parsed[start:start + (YIELD_EVERY if may_yield else len(parsed))]
            _ = pipeline.embedder  # model loaded and collection ensured (a no-op after the first time)
            outcomes = pipeline.ingest([ev.to_ref() for _, ev in part])
            for (i, ev), outcome in zip(part, outcomes, strict=True):
                _log_outcome(ev, outcome, (received - ev.sent_at) if ev.sent_at else None)
                if outcome.status != "failed":
                    counts[outcome.status] += 1
                elif outcome.permanent:
                    counts["failed"] += 1
                    _dead_letter(task, ev.to_dict(), outcome.reason or "failed", i)
                else:
                    transient.append((i, ev, outcome.reason or "failed"))
                if not batch:
                    results.append(_summary(ev, outcome, received))
            start += len(part)
    except SoftTimeLimitExceeded:
        raise _Timeout(start) from None
    return start


def handle(task: Any, raw_events: Sequence[Any], *, batch: bool) -> dict[str, Any]:
    """Ingest ``raw_events`` for ``task``; return a summary (stored only when a result backend is set)."""
    received = time.time()
    parsed: list[tuple[int, Event]] = []
    counts = {"indexed": 0, "present": 0, "updated": 0, "failed": 0, "handed_back": 0}
    for i, raw in enumerate(raw_events):
        try:
            parsed.append((i, parse_event(raw)))
        except InvalidEvent as err:
            counts["failed"] += 1
            _dead_letter(task, raw, err.reason, i)
    results: list[dict[str, Any]] = []
    transient: list[tuple[int, Event, str]] = []
    pipeline = get_pipeline(task.app) if parsed else None
    may_yield = batch and _queue_of(task) != LIVE_QUEUE
    start = 0
    # A chunk is written without a per-call fsync and flushed once when the block ends — before the ack,
    # so a crash before the flush means a redelivery, not a loss. An upload flushes on its own write.
    bulk = getattr(pipeline.store, "bulk", None) if (batch and pipeline is not None) else None
    try:
        with _serial(), bulk() if bulk is not None else contextlib.nullcontext():
            start = _run_parts(task, pipeline, parsed, received, may_yield, batch, counts, results, transient)
    except _Timeout as timeout:
        start = timeout.start
        limit = task.soft_time_limit or task.app.conf.task_soft_time_limit
        for i, ev in parsed[start:]:
            counts["failed"] += 1
            _dead_letter(task, ev.to_dict(), f"took longer than the task time limit ({limit:g} s)", i)
        return {"counts": counts, "timed_out": True}
    if transient:
        if task.request.retries >= task.max_retries:
            for i, ev, reason in transient:
                counts["failed"] += 1
                _dead_letter(task, ev.to_dict(), f"{reason} (gave up after {task.request.retries + 1} attempts)", i)
        else:
            from celery.utils.time import get_exponential_backoff_interval

            events = [ev.to_dict() for _, ev, _ in transient]
            countdown = get_exponential_backoff_interval(int(max(1.0, task.retry_backoff)), task.request.retries,
                                                         task.retry_backoff_max, True)
            log.warning("retrying %d event(s) in %d s: %s", len(events), countdown, transient[0][2])
            raise task.retry(args=[events] if batch else [events[0]], countdown=countdown)
    if not batch:
        return results[0] if results else {"counts": counts}
    return {"counts": counts, "done_at": time.time()}


def _task_base() -> type:
    from celery import Task
    from celery.exceptions import Reject

    class IngestTask(Task):  # type: ignore[misc]
        """Celery's Task, except that a retry that cannot be published (the broker is down) leaves the
        message to be redelivered instead of rejecting it: Celery would drop it (``requeue=False``)."""

        def retry(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().retry(*args, **kwargs)
            except Reject as rejected:
                if not rejected.requeue and isinstance(rejected.reason, _transient()):
                    log.warning("cannot publish the retry (%s): the message goes back to the queue", rejected.reason)
                    raise Reject(rejected.reason, requeue=True) from None
                raise

    return IngestTask


def register(app: Celery, config: WorkerConfig) -> None:
    """Define the tasks on ``app`` with the retry policy of ``config``."""
    options: dict[str, Any] = {
        "base": _task_base(),
        "bind": True,
        "autoretry_for": _transient(),
        "retry_backoff": config.retry_backoff,
        "retry_backoff_max": int(config.retry_backoff_max),
        "retry_jitter": True,
        "max_retries": config.max_retries,
        "default_retry_delay": 1,  # after a killed child (retry_on_worker_lost)
        "acks_late": True,
        "reject_on_worker_lost": True,
        "retry_on_worker_lost": True,
    }

    @app.task(name=INGEST_TASK, **options)
    def ingest(self: Any, event: Any) -> dict[str, Any]:
        """One upload event (dict, or its JSON text)."""
        return handle(self, [event], batch=False)

    @app.task(name=INGEST_BATCH_TASK, **options)
    def ingest_batch(self: Any, events: Any) -> dict[str, Any]:
        """A chunk of backfill events, ingested as one batch."""
        try:
            items = parse_batch(events)
        except InvalidEvent as err:
            _dead_letter(self, events, err.reason, 0)
            return {"counts": {"failed": 1}}
        return handle(self, items, batch=True)


# ---------------------------------------------------------------------------------------------- failures
_OURS = (INGEST_TASK, INGEST_BATCH_TASK)


def _failure_reason(task: Any, exception: BaseException) -> str:
    from billiard.exceptions import WorkerLostError
    from celery.exceptions import TimeLimitExceeded

    attempts = (getattr(task.request, "retries", 0) or 0) + 1
    if isinstance(exception, TimeLimitExceeded):
        return f"killed at the hard time limit ({task.time_limit or task.app.conf.task_time_limit:g} s)"
    if isinstance(exception, WorkerLostError):
        return f"the worker process died while ingesting it, {attempts} times (crash or out of memory?)"
    if isinstance(exception, _transient()):
        return f"{type(exception).__name__}: {exception} (gave up after {attempts} attempts)"
    return f"unexpected {type(exception).__name__}: {exception}"


def on_task_failure(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
                    args: Any = None, **_: Any) -> None:
    """``task_failure`` signal (child or parent process): the task will be acked — dead-letter its events
    first. Entry ids are stable per attempt, so running this twice for one failure stores one entry."""
    if sender is None or getattr(sender, "name", None) not in _OURS or exception is None:
        return
    reason = _failure_reason(sender, exception)
    args = list(args or [])
    raw = args[0] if args else None
    events = raw if sender.name == INGEST_BATCH_TASK and isinstance(raw, list) else [raw]
    retries = getattr(sender.request, "retries", 0) or 0
    queue = _queue_of(sender) or (BACKFILL_QUEUE if sender.name == INGEST_BATCH_TASK else LIVE_QUEUE)
    try:
        store = dead_letters(sender.app)
        for i, event in enumerate(events):
            store.add(event, reason, attempts=retries + 1, id=f"{task_id}:{retries}:{i}", queue=queue,
                      task=sender.name)
    except Exception as err:
        log.critical("cannot dead-letter task %s (%s): %s — its events: %r", task_id, reason, err, events)


def on_task_unknown(sender: Any = None, message: Any = None, name: str | None = None, id: str | None = None,
                    **_: Any) -> None:
    """A message for a task name we do not have (a producer typo): keep it as a dead letter."""
    if message is None:
        return
    try:
        body = message.decode() if hasattr(message, "decode") else message.body
        event = body[0][0] if isinstance(body, list | tuple) and body and body[0] else body
        app = sender.app if sender is not None and hasattr(sender, "app") else None
        if app is None:
            return
        dead_letters(app).add(event, f"unknown task {name!r} (send {INGEST_TASK} or {INGEST_BATCH_TASK})",
                              attempts=1, id=f"unknown:{id}",
                              queue=(message.delivery_info or {}).get("routing_key"), task=name)
    except Exception as err:
        log.error("cannot dead-letter a message for unknown task %r: %s", name, err)


__all__ = ["YIELD_EVERY", "dead_letters", "default_pipeline", "get_pipeline", "handle", "on_task_failure",
           "on_task_unknown", "pipeline_factory", "register", "uploads_waiting", "warm"]
