"""The Celery app, built from Settings: ``make_app(settings)``; ``celery -A workers.app worker`` uses ``app``.

Delivery guarantees, and the settings that give them:

* JSON only (``accept_content=["json"]``): a message can never make a worker unpickle code.
* At-least-once: ``task_acks_late`` (ack after the task), ``task_reject_on_worker_lost`` and
  ``task_retry_on_worker_lost`` (a killed child's message is sent again — bounded by ``max_retries``, so a
  file that crashes the decoder cannot loop forever), prefetch 1 (a crash strands at most one message per
  process). Exactly-once *effect* comes from the pipeline: the point id is the hash of the bytes, so a
  redelivered event finds its point and changes nothing.
* Redis redelivers an unacknowledged message after ``visibility_timeout``; a task may legitimately hold
  one for its hard time limit plus a retry countdown, so start-up refuses a visibility timeout shorter
  than that (the message would run twice at once).
* Nothing is dropped silently: invalid events, permanent failures, exhausted retries, hard time limits
  and undecodable messages all land in the dead-letter store (``workers.deadletters``).
* Live before backfill: the worker consumes ``lookalike.live`` first (``queue_order_strategy=priority``)
  and a backfill chunk hands the rest of its events back whenever uploads are waiting (``workers.tasks``).

Environment variables (besides the ``LOOKALIKE_*`` Settings):
``LOOKALIKE_TASK_SOFT_TIME_LIMIT`` (120 s), ``LOOKALIKE_TASK_TIME_LIMIT`` (180 s),
``LOOKALIKE_VISIBILITY_TIMEOUT`` (600 s), ``LOOKALIKE_MAX_RETRIES`` (8), ``LOOKALIKE_RETRY_BACKOFF``
(1 s, doubled per attempt), ``LOOKALIKE_RETRY_BACKOFF_MAX`` (60 s), ``LOOKALIKE_RESULT_BACKEND`` (unset:
results are not stored — the state lives in Qdrant), ``LOOKALIKE_ALLOW_ANY_PATH`` (1: run a worker without
``LOOKALIKE_ALLOWED_ROOTS``; off by default).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from search.config import DEFAULT_BROKER_URL, Settings, get_settings
from search.errors import CollectionMismatch, ConfigError, LookalikeError, ModelError, StoreLocked
from workers.events import BACKFILL_QUEUE, INGEST_BATCH_TASK, INGEST_TASK, LIVE_QUEUE

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("workers")


# ---------------------------------------------------------------------------------------------- config
def _env_number(name: str, default: float, kind: type = float) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WorkerConfig:
    """Limits and retry policy of the tasks (seconds), from ``LOOKALIKE_*`` variables."""

    soft_time_limit: float = 120.0
    time_limit: float = 180.0
    visibility_timeout: float = 600.0
    max_retries: int = 8
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    result_backend: str | None = None
    allow_any_path: bool = False

    @classmethod
    def from_env(cls) -> WorkerConfig:
        return cls(
            soft_time_limit=_env_number("LOOKALIKE_TASK_SOFT_TIME_LIMIT", cls.soft_time_limit),
            time_limit=_env_number("LOOKALIKE_TASK_TIME_LIMIT", cls.time_limit),
            visibility_timeout=_env_number("LOOKALIKE_VISIBILITY_TIMEOUT", cls.visibility_timeout),
            max_retries=_env_number("LOOKALIKE_MAX_RETRIES", cls.max_retries, int),
            retry_backoff=_env_number("LOOKALIKE_RETRY_BACKOFF", cls.retry_backoff),
            retry_backoff_max=_env_number("LOOKALIKE_RETRY_BACKOFF_MAX", cls.retry_backoff_max),
            result_backend=os.environ.get("LOOKALIKE_RESULT_BACKEND") or None,
            allow_any_path=_env_flag("LOOKALIKE_ALLOW_ANY_PATH"),
        )

    def check(self) -> None:
        """Refuse limits that would break the delivery guarantees (see the module docstring)."""
        if not 0 < self.soft_time_limit < self.time_limit:
            raise ConfigError(f"LOOKALIKE_TASK_SOFT_TIME_LIMIT ({self.soft_time_limit:g} s) must be positive and "
                              f"below LOOKALIKE_TASK_TIME_LIMIT ({self.time_limit:g} s)")
        needed = self.time_limit + self.retry_backoff_max
        if self.visibility_timeout <= needed:
            raise ConfigError(
                f"LOOKALIKE_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) must exceed the task hard time limit "
                f"plus the longest retry delay ({self.time_limit:g} + {self.retry_backoff_max:g} s), or Redis "
                f"redelivers messages that are still being worked on; raise it or lower LOOKALIKE_TASK_TIME_LIMIT")


def mask_url(url: str | None) -> str:
    """``redis://:secret@host:6379/0`` → ``redis://:****@host:6379/0`` (for logs and status output)."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:****@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def broker_url(settings: Settings) -> str:
    return settings.broker_url or DEFAULT_BROKER_URL


# ---------------------------------------------------------------------------------------------- the app
def make_app(settings: Settings | None = None, config: WorkerConfig | None = None) -> Celery:
    """A Celery app for lookalike ingestion, configured from ``settings`` (default: the environment)."""
    from celery import Celery
    from kombu import Queue

    settings = settings or get_settings()
    config = config or WorkerConfig.from_env()
    config.check()
    url = broker_url(settings)
    app = Celery("lookalike", broker=url, set_as_current=False)
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
        task_soft_time_limit=config.soft_time_limit,
        task_time_limit=config.time_limit,
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
    app.lookalike_settings = settings  # type: ignore[attr-defined]
    app.lookalike_config = config  # type: ignore[attr-defined]
    from workers import tasks

    tasks.register(app, config)
    _connect_signals()
    return app


def app_settings(app: Any) -> Settings:
    return getattr(app, "lookalike_settings", None) or get_settings()


def app_config(app: Any) -> WorkerConfig:
    return getattr(app, "lookalike_config", None) or WorkerConfig.from_env()


# ---------------------------------------------------------------------------------------------- worker start
@dataclass
class Runtime:
    """What this worker process learned at start-up (inherited by forked children)."""

    app: Any = None
    pool: str = "prefork"
    concurrency: int = 1
    threads: int = 0


RUNTIME = Runtime()


def pool_name(pool: Any) -> str:
    text = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}"
    text = text.lower()
    for name in ("solo", "threads", "thread", "eventlet", "gevent", "custom"):
        if name in text:
            return "threads" if name == "thread" else name
    return "prefork"


def threads_per_process(settings: Settings, concurrency: int) -> int:
    """Inference threads per worker process so that threads × concurrency ≤ cores."""
    cores = os.cpu_count() or 1
    fair = max(1, cores // max(1, concurrency))
    if settings.threads and settings.threads <= fair:
        return settings.threads
    if settings.threads:
        log.warning("LOOKALIKE_THREADS=%d × concurrency %d exceeds %d cores: using %d threads per process",
                    settings.threads, concurrency, cores, fair)
    return fair


def preflight(settings: Settings, config: WorkerConfig, *, pool: str, concurrency: int,
              probe_lock: bool = True) -> None:
    """Refuse to start a worker that would be unsafe or could not work; ConfigError/StoreLocked say why."""
    config.check()
    if not settings.allowed_roots and not config.allow_any_path:
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
    settings, config = app_settings(app), app_config(app)
    pool = pool_name(getattr(sender, "pool_cls", "prefork"))
    concurrency = int(sender.concurrency) if str(sender.concurrency).isdigit() else (os.cpu_count() or 1)
    try:
        preflight(settings, config, pool=pool, concurrency=concurrency)
    except LookalikeError as err:
        # Signal handlers' exceptions are only logged by Celery; SystemExit stops the start-up.
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    RUNTIME.app, RUNTIME.pool, RUNTIME.concurrency = app, pool, concurrency
    RUNTIME.threads = threads_per_process(settings, 1 if pool == "threads" else concurrency)
    log.info("lookalike worker: broker %s, store %s, pool %s × %d, %d inference threads per process",
             mask_url(broker_url(settings)), mask_url(settings.qdrant_url) or f"embedded ({settings.data_dir})",
             pool, concurrency, RUNTIME.threads)
    if pool != "prefork":  # one process: warm the model now, before the first event arrives
        _warm()


def _warm(**_: Any) -> None:
    if RUNTIME.app is None:
        return
    from workers import tasks

    try:
        tasks.warm(RUNTIME.app)
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

    class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
        """Celery's consumer, except that a message whose body cannot be decoded is dead-lettered
        (with its raw text) before it is acknowledged, instead of only being logged."""

        def on_decode_error(self, message: Any, exc: Exception) -> None:
            try:
                body = message.body
                from workers import tasks

                tasks.dead_letters(self.app).add(
                    body, f"cannot decode the message body ({message.content_type}): {exc}", attempts=1,
                    id=f"decode:{message.headers.get('id') or message.delivery_tag}",
                    queue=(message.delivery_info or {}).get("routing_key"), task=message.headers.get("task"))
            except Exception as err:  # never let the consumer die on hostile input
                log.error("cannot dead-letter an undecodable message: %s", err)
            super().on_decode_error(message, exc)

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
    signals.task_failure.connect(tasks.on_task_failure, weak=False)
    signals.task_unknown.connect(tasks.on_task_unknown, weak=False)
    _CONNECTED = True


def worker_settings(app: Any) -> Settings:
    """The Settings a worker process runs the pipeline with (inference threads set for the pool)."""
    settings = app_settings(app)
    threads = RUNTIME.threads or threads_per_process(settings, 1)
    return replace(settings, threads=threads)


__all__ = ["RUNTIME", "WorkerConfig", "app_config", "app_settings", "broker_url", "make_app", "mask_url",
           "pool_name", "preflight", "probe_store_lock", "threads_per_process", "worker_settings"]
