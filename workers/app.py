"""The Celery app, built from Settings: ``make_app(settings)``; ``celery -A workers.app worker`` uses ``app``.

Delivery guarantees, and the settings that give them:

* JSON only (``accept_content=["json"]``): a message can never make a worker unpickle code.
* At-least-once: ``task_acks_late`` (ack after the task), ``task_reject_on_worker_lost`` and
  ``task_retry_on_worker_lost`` (a killed child's message is sent again — bounded by ``max_retries``, so a
  file that crashes the decoder cannot loop forever), prefetch 1 (a crash strands at most one message per
  process). Exactly-once *effect* comes from the pipeline: the point id is the hash of the bytes, so a
  redelivered event finds its point and changes nothing.
* A whole worker that dies (OOM killer, ``kill -9``) is noticed through its heartbeat: another worker — or
  its replacement, at start-up — puts the messages it held back on their queue within seconds
  (``workers.recovery``; ~6 s worst case with the default 3 s ``LOOKALIKE_HEARTBEAT_TTL``).
* Redis also redelivers an unacknowledged message after ``visibility_timeout`` (the backstop if recovery
  cannot run); a task may legitimately hold one for its hard time limit plus a retry countdown, so start-up
  refuses a visibility timeout shorter than that (the message would run twice at once).
* No message can stop a worker: one that is not a valid lookalike task (bad or missing headers, a refused
  content type, an undecodable body, the wrong body shape, an unknown task) is dead-lettered with the reason
  and acknowledged (``workers.guard``, checked by ``DeadLetteringConsumer`` and ``workers.transport``).
* Nothing is dropped silently: invalid events, permanent failures, exhausted retries, hard time limits
  and refused messages all land in the dead-letter store (``workers.deadletters``).
* Live before backfill: the worker consumes ``lookalike.live`` first (``queue_order_strategy=priority``)
  and a backfill chunk hands the rest of its events back whenever uploads are waiting (``workers.tasks``).

Settings: ``workers.config.WorkerSettings`` (broker, task limits, the retry policy); per-process state and
clients: ``workers.runtime``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from search.config import Settings
from search.errors import CollectionMismatch, ConfigError, LookalikeError, ModelError, StoreLocked
from workers import runtime
from workers.config import WorkerSettings, as_worker_settings, mask_url, worker_settings
from workers.events import BACKFILL_QUEUE, INGEST_BATCH_TASK, INGEST_TASK, LIVE_QUEUE
from workers.runtime import RUNTIME, PipelineFactory, app_settings, pool_name, threads_per_process

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("workers")


# ---------------------------------------------------------------------------------------------- the app
def make_app(settings: Settings | None = None, *, pipeline_factory: PipelineFactory | None = None) -> Celery:
    """A Celery app for lookalike ingestion, configured from ``settings`` (default: the environment; plain
    core Settings get the worker fields from the environment). ``pipeline_factory`` builds each process's
    pipeline (default ``runtime.default_pipeline``)."""
    from celery import Celery
    from kombu import Queue

    config = as_worker_settings(settings) if settings is not None else worker_settings()
    config.check()
    app = Celery("lookalike", broker=config.broker, set_as_current=False)
    restore_every = max(1, min(10, int(config.visibility_timeout // 4)))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # every failure path dead-letters first (see tasks.py)
        worker_prefetch_multiplier=1,
        task_soft_time_limit=config.task_soft_time_limit,
        task_time_limit=config.task_time_limit,
        task_ignore_result=config.result_backend is None,
        result_backend=config.result_backend,
        result_expires=3600,
        task_queues=(Queue(LIVE_QUEUE, routing_key=LIVE_QUEUE), Queue(BACKFILL_QUEUE, routing_key=BACKFILL_QUEUE)),
        task_default_queue=LIVE_QUEUE,
        task_routes={INGEST_TASK: {"queue": LIVE_QUEUE}, INGEST_BATCH_TASK: {"queue": BACKFILL_QUEUE}},
        broker_transport_options={
            "visibility_timeout": config.visibility_timeout,
            "queue_order_strategy": "priority",  # BRPOP lists live first: uploads never wait behind backfill
            # kombu scans for abandoned messages every interval × throttle seconds (100 s by default);
            # scan every few seconds so a crashed worker's messages come back soon after the timeout.
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "health_check_interval": 25,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a Redis restart of any length
        worker_consumer="workers.app:DeadLetteringConsumer",
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    app.lookalike_settings = config  # type: ignore[attr-defined]
    app.lookalike_pipeline_factory = pipeline_factory  # type: ignore[attr-defined]
    from workers import tasks

    tasks.register(app, config.retry)
    _connect_signals()
    return app


# ---------------------------------------------------------------------------------------------- worker start
def preflight(settings: WorkerSettings, *, pool: str, concurrency: int, probe_lock: bool = True) -> None:
    """Refuse to start a worker that would be unsafe or could not work; ConfigError/StoreLocked say why."""
    settings.check()
    if not settings.allowed_roots and not settings.allow_any_path:
        raise ConfigError("a worker reads only files under LOOKALIKE_ALLOWED_ROOTS (paths separated by "
                          f"'{os.pathsep}'); set it, or set LOOKALIKE_ALLOW_ANY_PATH=1 to accept any path events name")
    for root in settings.allowed_roots:
        if not root.is_dir():
            log.warning("allowed root %s does not exist (yet)", root)
    if settings.embedded:
        if pool == "prefork" and concurrency > 1:
            raise ConfigError(
                f"the embedded store allows one process, but the worker would start {concurrency}: use "
                f"--concurrency 1 (or --pool threads), or a Qdrant server (LOOKALIKE_QDRANT_URL) for more")
        if pool in ("eventlet", "gevent"):
            raise ConfigError(f"pool {pool!r} is not supported: use prefork (default), threads or solo")
        if probe_lock:
            probe_store_lock(settings)


def probe_store_lock(settings: Settings) -> None:
    """Fail now (StoreLocked) if another process owns the embedded store, without opening the shard here:
    the parent of a prefork pool must not start the engine's threads before it forks."""
    from search import store as store_mod

    lock = store_mod._DirLock(
        (settings.data_dir.expanduser() / "qdrant").resolve() / store_mod.LOCK_FILE)
    lock.acquire()
    lock.release()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or not hasattr(app, "lookalike_settings"):
        return
    settings = app_settings(app)
    pool = pool_name(getattr(sender, "pool_cls", "prefork"))
    concurrency = int(sender.concurrency) if str(sender.concurrency).isdigit() else (os.cpu_count() or 1)
    try:
        preflight(settings, pool=pool, concurrency=concurrency)
    except LookalikeError as err:
        # Signal handlers' exceptions are only logged by Celery; SystemExit stops the start-up.
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    RUNTIME.app, RUNTIME.pool, RUNTIME.concurrency = app, pool, concurrency
    _start_metrics(settings, str(getattr(sender, "hostname", "") or f"lookalike@{os.getpid()}"))
    RUNTIME.threads = threads_per_process(settings, 1 if pool == "threads" else concurrency)
    log.info("lookalike worker: broker %s, store %s, pool %s × %d, %d inference threads per process",
             mask_url(settings.broker), mask_url(settings.qdrant_url) or f"embedded ({settings.data_dir})",
             pool, concurrency, RUNTIME.threads)
    if pool != "prefork":  # one process: warm the model now, before the first event arrives
        _warm()


_METRICS: Any = None


def _start_metrics(settings: WorkerSettings, name: str) -> None:
    """Multiprocess metrics before the pool forks, served and published by this (the main) process."""
    global _METRICS
    from workers import metrics

    metrics.enable_multiprocess()
    _METRICS = metrics.WorkerMetrics(settings, name)
    _METRICS.serve()
    _METRICS.start_publishing()


def _stop_metrics(**_: Any) -> None:
    if _METRICS is not None:
        _METRICS.stop()


def _warm(**_: Any) -> None:
    if RUNTIME.app is None:
        return
    try:
        runtime.warm(RUNTIME.app)
    except (ModelError, ConfigError, CollectionMismatch, StoreLocked) as err:
        # Every event would fail the same way: stop consuming rather than dead-letter the whole queue.
        log.critical("cannot ingest: %s — stopping the worker; queued events stay queued", err)
        if RUNTIME.pool == "prefork" and os.getppid() > 1:
            os.kill(os.getppid(), signal.SIGTERM)
        else:
            raise SystemExit(1) from None
    except LookalikeError as err:  # e.g. the store server is down: the tasks retry until it returns
        log.error("cannot prepare the ingestion pipeline yet: %s", err)


def __getattr__(name: str) -> Any:
    """``app`` (for ``celery -A workers.app``) and ``DeadLetteringConsumer`` are built on first access."""
    if name == "app":
        value: Any = make_app()
    elif name == "DeadLetteringConsumer":
        value = _consumer_class()
    else:
        raise AttributeError(name)
    globals()[name] = value
    return value


def _consumer_class() -> type:
    from celery.worker.consumer import Consumer

    from workers import guard, recovery
    from workers.transport import use_guarded_transport

    class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
        """Celery's consumer, except that no message can stop it and a dead worker's messages come back soon.

        * Its connection uses ``workers.transport.GuardedTransport`` (envelope checks, holders recorded).
        * Every task message is checked by ``workers.guard.task_problem`` before Celery's strategy sees it;
          one that fails — or that Celery still raises on, or that Celery would only log (decode errors,
          unknown tasks, refused content types, invalid tasks) — is dead-lettered with the reason and acked.
        * ``start`` starts this process's heartbeat and recovery thread (``workers.recovery``) before the
          first message is taken."""

        def connection_for_read(self, heartbeat: Any = None) -> Any:
            return self.ensure_connected(use_guarded_transport(self.app.connection_for_read(heartbeat=heartbeat)))

        def start(self) -> Any:
            settings = app_settings(self.app)
            recovery.start(settings.broker, ttl=settings.heartbeat_ttl, name=self.hostname)
            return super().start()

        def connect(self) -> Any:
            monitor = recovery.current()
            if monitor is not None:  # what the previous connection held is now an orphan (workers.recovery)
                monitor.new_session()
            return super().connect()

        def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
            handle = super().create_task_handler(*args, **kwargs)
            settings = app_settings(self.app)
            limits = {"max_recovered": settings.max_retries,
                      "max_eta_ahead": settings.visibility_timeout - settings.task_time_limit}
            connection_errors = tuple(self.connection_errors)

            def on_task_received(message: Any) -> Any:
                problem = guard.task_problem(message, **limits)
                if problem is not None:
                    return self._refuse(message, problem)
                try:
                    return handle(message)
                except connection_errors:
                    raise  # the connection is gone: the message goes back to its queue on reconnect
                except Exception as err:  # Celery choked on this message: keep it, ack it, go on
                    log.exception("cannot accept message %s", message.delivery_tag)
                    return self._refuse(message, f"Celery cannot accept it: {type(err).__name__}: {err}")

            return on_task_received

        def on_decode_error(self, message: Any, exc: Exception) -> None:
            self._refuse(message, f"cannot decode the message body ({message.content_type}): {exc}")

        def on_unknown_message(self, body: Any, message: Any) -> None:
            self._refuse(message, "not a Celery task message (protocol 2 headers required)")

        def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
            self._refuse(message, f"unknown task {guard.task_of(message.headers)!r}")

        def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
            self._refuse(message, f"invalid task message: {type(exc).__name__}: {exc}")

        def _refuse(self, message: Any, reason: str) -> None:
            """Dead-letter ``message`` with ``reason``, then ack it (it never runs). If Redis cannot be
            reached the error propagates: the consumer reconnects and the message comes back to be refused
            again, rather than being acked unrecorded."""
            import redis.exceptions

            headers = message.headers if isinstance(message.headers, dict) else None
            try:
                runtime.dead_letters(self.app).add(
                    guard.kept_event(message), reason, attempts=1,
                    id=guard.letter_key(headers, str(message.delivery_tag)), queue=guard.queue_of(message),
                    task=guard.task_of(headers))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                raise
            except Exception as err:  # never let hostile input stop the consumer
                log.critical("cannot dead-letter a refused message (%s): %s — its body: %r", reason, err,
                             message.body[:2000] if message.body else None)
            if not message.acknowledged:
                message.ack_log_error(log, self.connection_errors)
            from workers.metrics import ingest_metrics, lane_of

            ingest_metrics().count(lane_of(guard.queue_of(message), False), "dead_lettered")

    return DeadLetteringConsumer


_CONNECTED = False


def _connect_signals() -> None:
    global _CONNECTED
    if _CONNECTED:
        return
    from celery import signals

    from workers import tasks

    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_init.connect(_warm, weak=False)
    signals.worker_shutdown.connect(_stop_metrics, weak=False)
    signals.task_failure.connect(tasks.on_task_failure, weak=False)
    _CONNECTED = True


__all__ = ["make_app", "preflight", "probe_store_lock"]
