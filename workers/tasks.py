"""Thin tasks: parse the event → ``Pipeline.ingest`` → ack. Failures are retried or dead-lettered, never dropped.

* ``lookalike.ingest(event)``           one upload (queue ``lookalike.live``);
* ``lookalike.ingest_batch([events])``  a backfill chunk (queue ``lookalike.backfill``), embedded as one
  batch. Between sub-batches it checks whether uploads are waiting; if so it hands the rest of its
  chunk back to the backfill queue and finishes, so the next message this worker takes is the upload.

What happens to an event:

=====================================================  ==================================================
indexed / present / updated                            ack (a redelivered event is "present": no change)
``op: delete`` — removed / deleted / absent            ack (the uri left its point; the point went too when
                                                       it had no other uri; nothing had it)
invalid event, unreadable or undecodable file, path    dead letter (reason, attempt count), ack
outside the allowed roots (permanent)
store unreachable, Redis connection error (transient)  retry: exponential backoff with jitter, at most
                                                       ``max_retries`` times, then dead letter
worker process killed mid-task                         sent again (``retry_on_worker_lost``), bounded the
                                                       same way
whole worker killed mid-task (main process too)        put back on its queue by a live worker within
                                                       seconds (``workers.recovery``); dead letter after
                                                       ``max_retries`` such restores
soft/hard time limit, unexpected error                 dead letter
message that is not a valid task (``workers.guard``)   dead letter, ack — never reaches a task
=====================================================  ==================================================

Both kinds of retry follow one ``workers.config.RetryPolicy``. The pipeline is built once per worker
process, lazily (``workers.runtime.get_pipeline``), by the factory given to ``make_app``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingest.metrics import STORED
from search.errors import StoreLocked, StoreUnavailable, printable
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
from workers.metrics import ingest_metrics, lane_of
from workers.runtime import dead_letters, get_pipeline, redis_client, serial

if TYPE_CHECKING:
    from celery import Celery

    from ingest.pipeline import Outcome
    from workers.config import RetryPolicy

log = logging.getLogger("workers.tasks")

# A backfill chunk checks for waiting uploads this often (images). Measured with uploads at 4/s during a
# backfill (benchmarks/results/load.md): 16 gave upload freshness p99 246-284 ms, 8 gave 133-190 ms with the
# backfill at 0.70-0.86x its solo rate; alone, batches of 8 cost Lite0 no measurable throughput.
YIELD_EVERY = 8
POINTS_EVERY = 5.0  # seconds between two counts of the collection for lookalike_points


def _transient() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: the store or the broker is briefly away, or the store lock is busy."""
    import kombu.exceptions
    import redis.exceptions

    return (StoreUnavailable, StoreLocked, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            kombu.exceptions.OperationalError, ConnectionError, TimeoutError)


# ---------------------------------------------------------------------------------------------- queues
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


# The rest of a chunk handed back (``BatchRun._hand_back``) names the chunk it came from (its first task id).
CHUNK_HEADER = "lookalike_chunk"


def _chunk_of(task: Any) -> str:
    """The id of the chunk this task's events were first sent in: its own task id, unless it is the rest of
    a chunk handed back."""
    value = getattr(task.request, CHUNK_HEADER, None)
    return value if isinstance(value, str) and value else str(task.request.id)


def _letter_id(task: Any) -> str:
    """The key of an event's dead letter (``DeadLetters.add`` appends a digest of the event): the chunk it
    was first sent in. The same failure handled again therefore overwrites its entry, however it comes back:
    redelivered after a crash (same task id), retried after its child was killed (same id, ``retries`` + 1:
    the attempt was part of the key, and the soak test found such chunks' invalid events dead-lettered
    twice), or both handed back to the queue and retried whole (the rest runs as a new task, whose header
    names the chunk)."""
    return _chunk_of(task)


def _dead_letter(task: Any, event: Any, reason: str, attempts: int | None = None) -> None:
    dead_letters(task.app).add(event, reason, attempts=attempts or (task.request.retries or 0) + 1,
                               id=_letter_id(task), queue=_queue_of(task) or LIVE_QUEUE, task=task.name)


def _log_outcome(event: Event, outcome: Outcome, queue_wait: float | None) -> None:
    parts = ", ".join(f"{k} {v * 1000:.0f}" for k, v in outcome.timings.items())
    wait = f"; queued {queue_wait * 1000:.0f} ms" if queue_wait is not None else ""
    log.info("%s %s (%s) [ms: %s]%s%s", outcome.status, printable(event.uri), outcome.id, parts, wait,
             f" event {printable(event.event_id)}" if event.event_id else "")


def _summary(event: Event, outcome: Outcome, received: float) -> dict[str, Any]:
    return {"uri": event.uri, "event_id": event.event_id, "status": outcome.status, "id": outcome.id,
            "reason": outcome.reason, "tags": outcome.tags, "timings": outcome.timings,
            "queue_wait": (received - event.sent_at) if event.sent_at else None,
            "received_at": received, "done_at": time.time(), "pid": os.getpid()}


@dataclass
class BatchRun:
    """One task's events on their way through the pipeline: what became of each, and what to retry.

    ``run`` ingests the parsed events in sub-batches; a backfill chunk (``may_yield``) checks between
    them whether uploads are waiting and, if so, hands the rest back to its queue and stops."""

    task: Any
    batch: bool
    received: float = field(default_factory=time.time)
    lane: str = ""  # live | backfill (ingest.metrics), from the queue the message came by
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("indexed", "present", "updated", "removed", "deleted", "absent", "failed", "handed_back"), 0))
    results: list[dict[str, Any]] = field(default_factory=list)  # per event (uploads only)
    transient: list[tuple[int, Event, str]] = field(default_factory=list)  # (index, event, reason)
    done: int = 0  # events handled so far (the rest are handed back or timed out)
    stored_sent_at: list[float] = field(default_factory=list)  # sent_at of events whose points were written
    metrics: Any = field(init=False, repr=False)  # ingest.metrics.IngestMetrics of this process

    def __post_init__(self) -> None:
        self.lane = self.lane or lane_of(_queue_of(self.task), self.batch)
        self.metrics = ingest_metrics()

    def dead_letter(self, event: Any, reason: str) -> None:
        self.counts["failed"] += 1
        _dead_letter(self.task, event, reason)
        self.metrics.count(self.lane, "dead_lettered")

    def run(self, pipeline: Any, parsed: list[tuple[int, Event]], may_yield: bool) -> None:
        while self.done < len(parsed):
            if may_yield and self.done > 0 and uploads_waiting(self.task.app):
                self._hand_back(parsed[self.done:])
                return
            part = parsed[self.done:self.done + (YIELD_EVERY if may_yield else len(parsed))]
            # Upserts before deletes: a move (delete of the old path, upsert of the new one) in one batch then
            # finds its point by hash and keeps it, instead of deleting it and embedding the bytes again.
            upserts = [(i, ev) for i, ev in part if ev.op == "upsert"]
            deletes = [(i, ev) for i, ev in part if ev.op == "delete"]
            if upserts:
                _ = pipeline.embedder  # model loaded and collection ensured (a no-op after the first time)
                outcomes = pipeline.ingest([ev.to_ref() for _, ev in upserts])
                self.metrics.observe_batch(outcomes)
                for (i, ev), outcome in zip(upserts, outcomes, strict=True):
                    self._record(i, ev, outcome)
            if deletes:
                from ingest.pipeline import Outcome

                for (i, ev), removal in zip(deletes, pipeline.forget([ev.uri for _, ev in deletes]), strict=True):
                    self._record(i, ev, Outcome(uri=ev.uri, status=removal.status,
                                                id=removal.ids[0] if removal.ids else None))
            self.done += len(part)

    def _record(self, index: int, event: Event, outcome: Outcome) -> None:
        wait = (self.received - event.sent_at) if event.sent_at is not None else None
        _log_outcome(event, outcome, wait)
        if wait is not None:
            self.metrics.queue_wait.labels(self.lane).observe(max(0.0, wait))
        if outcome.status != "failed":
            self.counts[outcome.status] += 1
            self.metrics.count(self.lane, outcome.status)
            if outcome.status in STORED and event.sent_at is not None:
                self.stored_sent_at.append(event.sent_at)
        elif outcome.permanent:
            self.dead_letter(event.to_dict(), outcome.reason or "failed")
        else:
            self.transient.append((index, event, outcome.reason or "failed"))
        if not self.batch:
            self.results.append(_summary(event, outcome, self.received))

    def _hand_back(self, rest: list[tuple[int, Event]]) -> None:
        events = [ev.to_dict() for _, ev in rest]
        self.task.app.send_task(INGEST_BATCH_TASK, args=[events], queue=_queue_of(self.task) or BACKFILL_QUEUE,
                                headers={CHUNK_HEADER: _chunk_of(self.task)})
        self.counts["handed_back"] = len(events)
        log.info("uploads waiting: handed %d backfill events back to the queue", len(events))

    def retry_transient(self, policy: RetryPolicy) -> None:
        """Retry the transient failures as one task (raises ``Retry``), or dead-letter them once the
        policy is exhausted."""
        if not self.transient:
            return
        retries = self.task.request.retries or 0
        if policy.exhausted(retries):
            for _, ev, reason in self.transient:
                self.dead_letter(ev.to_dict(), f"{reason} (gave up after {retries + 1} attempts)")
            return
        events = [ev.to_dict() for _, ev, _ in self.transient]
        self.metrics.count(self.lane, "retried", len(events))
        countdown = policy.countdown(retries)
        log.warning("retrying %d event(s) in %d s: %s", len(events), countdown, self.transient[0][2])
        raise self.task.retry(args=[events] if self.batch else [events[0]], countdown=countdown)


def handle(task: Any, raw_events: Sequence[Any], *, batch: bool) -> dict[str, Any]:
    """Ingest ``raw_events`` for ``task``; return a summary (stored only when a result backend is set)."""
    from celery.exceptions import SoftTimeLimitExceeded

    run = BatchRun(task, batch)
    parsed: list[tuple[int, Event]] = []
    for i, raw in enumerate(raw_events):
        try:
            parsed.append((i, parse_event(raw)))
        except InvalidEvent as err:
            run.dead_letter(raw, err.reason)
    pipeline = get_pipeline(task.app) if parsed else None
    may_yield = batch and _queue_of(task) != LIVE_QUEUE
    # A chunk is written without a per-call fsync and flushed once when the block ends — before the ack,
    # so a crash before the flush means a redelivery, not a loss. An upload flushes on its own write.
    bulk = pipeline.store.bulk if (batch and pipeline is not None) else contextlib.nullcontext
    try:
        with serial(), bulk():
            run.run(pipeline, parsed, may_yield)
    except SoftTimeLimitExceeded:
        limit = task.soft_time_limit or task.app.conf.task_soft_time_limit
        for _, ev in parsed[run.done:]:
            run.dead_letter(ev.to_dict(), f"took longer than the task time limit ({limit:g} s)")
        return {"counts": run.counts, "timed_out": True}
    _durable(run, pipeline)
    run.retry_transient(task.lookalike_retry)
    if not batch:
        return run.results[0] if run.results else {"counts": run.counts}
    return {"counts": run.counts, "done_at": time.time()}


def _durable(run: BatchRun, pipeline: Any) -> None:
    """The run's points are durable now (its bulk block flushed): their freshness, and the store's size."""
    run.metrics.durable(run.lane, run.stored_sent_at)
    if pipeline is not None and run.done:  # upserts and deletes both change the count
        store = pipeline.store
        with contextlib.suppress(Exception):  # a gauge is not worth failing a task over
            # the embedded store counts in memory; a server's count is a round trip
            run.metrics.set_points(store.collection, store.count,
                                   every=0.0 if pipeline.settings.embedded else POINTS_EVERY)


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


def register(app: Celery, policy: RetryPolicy) -> None:
    """Define the tasks on ``app``; exceptions and transient outcomes both retry by ``policy``."""
    options: dict[str, Any] = {
        "base": _task_base(),
        "bind": True,
        "shared": False,  # each app gets its own tasks: a shared one would keep the first app's retry policy
        "autoretry_for": _transient(),
        **policy.celery_options(),
        "lookalike_retry": policy,
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
            _dead_letter(self, events, err.reason)
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
        ingest_metrics().count(lane_of(queue, sender.name == INGEST_BATCH_TASK), "dead_lettered", len(events))
    except Exception as err:
        log.critical("cannot dead-letter task %s (%s): %s — its events: %r", task_id, reason, err, events)


__all__ = ["YIELD_EVERY", "BatchRun", "handle", "on_task_failure", "register", "uploads_waiting"]
