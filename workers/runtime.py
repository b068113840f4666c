"""Per-process worker state: what start-up learned, the pipeline, and the clients each process owns.

Celery forks its pool children from the main process, so everything here is keyed by (or rebuilt per)
PID: a child never reuses its parent's pipeline, Redis connection or store handle. The app (``workers.app``)
and the tasks (``workers.tasks``) both import this module; it imports neither.

* ``Runtime``/``RUNTIME``: pool kind, concurrency and inference threads, set by ``worker_init``.
* ``get_pipeline(app)``: the process's one ``Pipeline``, built by the app's ``pipeline_factory`` (injected
  through ``make_app``; tests hand in a tiny embedder or a store that fails on purpose).
* ``RedisContentLock``: workers sharing a Qdrant server lock the point ids around read-merge-write.
* ``dead_letters(app)``, ``redis_client(app)``: one client per process and broker URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search.errors import ContentLockLost, StoreUnavailable
from workers.config import WorkerSettings, worker_settings

if TYPE_CHECKING:
    from ingest.pipeline import Pipeline
    from search.config import Settings
    from workers.deadletters import DeadLetters

log = logging.getLogger("workers")

PipelineFactory = Callable[[WorkerSettings], "Pipeline"]


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


def threads_per_process(settings: WorkerSettings, concurrency: int) -> int:
    """Inference threads per worker process so that threads × concurrency ≤ cores."""
    cores = os.cpu_count() or 1
    fair = max(1, cores // max(1, concurrency))
    if settings.threads and settings.threads <= fair:
        return settings.threads
    if settings.threads:
        log.warning("LOOKALIKE_THREADS=%d × concurrency %d exceeds %d cores: using %d threads per process",
                    settings.threads, concurrency, cores, fair)
    return fair


def app_settings(app: Any) -> WorkerSettings:
    return getattr(app, "lookalike_settings", None) or worker_settings()


def process_settings(app: Any) -> WorkerSettings:
    """The settings this process runs the pipeline with (inference threads set for the pool)."""
    settings = app_settings(app)
    return settings.replace(threads=RUNTIME.threads or threads_per_process(settings, 1))


# ---------------------------------------------------------------------------------------------- the pipeline
class RedisContentLock:
    """``with lock(point_ids):`` — one Redis lock per point id, taken in sorted order (no deadlock between
    writers), each expiring on its own so a killed writer cannot block a point for longer than ``ttl``.

    While held, the locks are extended every ``ttl / 3`` seconds, so a slow batch keeps them. A lock that was
    lost anyway (Redis restarted, a process frozen past its ttl) is noticed — when extending it or at the
    end — and raises ``ContentLockLost``: another writer may have interleaved its read-merge-write, so the
    caller redoes its own (the pipeline retries the batch; merging uris again is idempotent)."""

    def __init__(self, client: Any, *, ttl: float = 120.0, wait: float = 60.0) -> None:
        self.client, self.ttl, self.wait = client, ttl, wait

    @contextlib.contextmanager
    def __call__(self, ids: Sequence[str]) -> Iterator[None]:
        import redis.exceptions

        held: list[Any] = []
        lost = threading.Event()
        done = threading.Event()
        keeper = threading.Thread(target=self._keep, args=(held, lost, done), daemon=True,
                                  name="lookalike-content-lock")
        try:
            for pid in sorted(set(ids)):
                # thread_local=False: the keeper thread extends the lock with the token this thread acquired it with
                lock = self.client.lock(f"lookalike:lock:{pid}", timeout=self.ttl, blocking_timeout=self.wait,
                                        thread_local=False)
                if not lock.acquire():
                    raise StoreUnavailable(f"point {pid} stayed locked by another writer for {self.wait:.0f} s")
                held.append(lock)
            keeper.start()
            yield
        finally:
            done.set()
            if keeper.is_alive():
                keeper.join(5)
            for lock in reversed(held):
                try:
                    lock.release()
                except redis.exceptions.LockNotOwnedError:  # expired or taken over meanwhile
                    lost.set()
                except redis.exceptions.RedisError:  # Redis itself is away: the lock expires on its own
                    lost.set()
        if lost.is_set():
            raise ContentLockLost(f"the content lock of {len(held)} point(s) expired during the write; "
                                  "another writer may have changed them, so the write is done again")

    def _keep(self, held: list[Any], lost: threading.Event, done: threading.Event) -> None:
        import redis.exceptions

        while not done.wait(self.ttl / 3):
            for lock in held:
                try:
                    lock.extend(self.ttl, replace_ttl=True)
                except (redis.exceptions.LockError, redis.exceptions.RedisError):
                    lost.set()


def content_lock_for(settings: Settings) -> RedisContentLock | None:
    """The lock every writer of a Qdrant server takes (entry point ``lookalike.locks``, used by ``Pipeline``):
    Redis at LOOKALIKE_BROKER_URL. None on the embedded store (one process owns it) or without a broker."""
    from workers.config import as_worker_settings

    if settings.embedded:
        return None
    worker = as_worker_settings(settings)
    if not worker.broker_url:
        return None
    return RedisContentLock(redis_for(worker.broker))


def default_pipeline(settings: WorkerSettings) -> Pipeline:
    from ingest.pipeline import Pipeline

    # Workers sharing a Qdrant server must not interleave read-merge-write of one point's uris/labels
    # (nor embed the same new bytes twice and overwrite each other's uris): lock the point ids in Redis.
    lock = None if settings.embedded else RedisContentLock(redis_for(settings.broker))  # the default broker too
    return Pipeline(settings, source="worker", content_lock=lock)


_lock = threading.Lock()
_pipeline: Pipeline | None = None
_pipeline_pid: int | None = None
_ingest_lock = threading.Lock()


def get_pipeline(app: Any) -> Pipeline:
    """This process's pipeline (the model loads once per process; a forked child builds its own)."""
    global _pipeline, _pipeline_pid
    with _lock:
        if _pipeline is None or _pipeline_pid != os.getpid():
            factory: PipelineFactory = getattr(app, "lookalike_pipeline_factory", None) or default_pipeline
            _pipeline, _pipeline_pid = factory(process_settings(app)), os.getpid()
        return _pipeline


def serial() -> Any:
    """With ``--pool threads`` the tasks of one process share one pipeline and store: take turns (the
    model already uses every core it is given; parallel calls would only contend)."""
    return _ingest_lock if RUNTIME.pool == "threads" else contextlib.nullcontext()


def warm(app: Any) -> None:
    """Load the model, open the store, run one tiny inference: the first event then pays none of it."""
    from PIL import Image

    from workers.metrics import ingest_metrics

    pipeline = get_pipeline(app)
    t0 = time.perf_counter()
    embedder = pipeline.embedder  # loads the model and checks the collection
    embedder.embed_images([Image.new("RGB", (64, 64), (127, 127, 127))])
    ingest_metrics().model_load.observe(time.perf_counter() - t0)
    log.info("pipeline ready in %.1f s (model %s, pid %d)", time.perf_counter() - t0, embedder.name, os.getpid())


# ---------------------------------------------------------------------------------------------- clients
_dead: dict[tuple[int, str], DeadLetters] = {}
_redis: dict[tuple[int, str], Any] = {}


def dead_letters(app: Any) -> DeadLetters:
    from workers.deadletters import DeadLetters

    key = (os.getpid(), app_settings(app).broker)
    if key not in _dead:
        _dead[key] = DeadLetters.from_url(key[1])
    return _dead[key]


def redis_for(url: str) -> Any:
    """One client per process and broker URL; socket timeouts make a hung Redis fail a task, not hang it."""
    import redis

    key = (os.getpid(), url)
    if key not in _redis:
        _redis[key] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return _redis[key]


def redis_client(app: Any) -> Any:
    return redis_for(app_settings(app).broker)


__all__ = [
    "RUNTIME",
    "PipelineFactory",
    "RedisContentLock",
    "Runtime",
    "app_settings",
    "content_lock_for",
    "dead_letters",
    "default_pipeline",
    "get_pipeline",
    "pool_name",
    "process_settings",
    "redis_client",
    "redis_for",
    "serial",
    "threads_per_process",
    "warm",
]
