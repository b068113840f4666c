"""The Celery app the worker tests run (``celery -A tests.worker_app worker``): the real app and tasks, with
the pipeline built by a test factory handed to ``make_app``. Production code has no test hooks; these live here:

* the embedder is ``TinyEmbedder`` (an 8×8 thumbnail), unless ``LOOKALIKE_TEST_REAL_MODEL=1``;
* ``LOOKALIKE_TEST_TASK_DELAY`` (seconds): every ``Pipeline.ingest`` call sleeps first (a slow task to kill);
* ``LOOKALIKE_TEST_STORE_FAULTS`` (n): the first n store calls of each worker process raise
  ``StoreUnavailable`` — a store that is briefly down (there is no Qdrant server binary to stop here);
* each ingest call is recorded in Redis (``test:started``: pid + uris before; ``test:done``: one JSON
  outcome per image after), so tests observe the worker without opening its store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from search.errors import StoreUnavailable
from tests.fakes import TinyEmbedder
from workers.app import make_app

FLAKY_METHODS = {"retrieve", "upsert", "set_payload", "search", "count", "scroll"}


class FlakyStore:
    """Wraps a store; the first ``faults`` data calls raise StoreUnavailable."""

    def __init__(self, store: Any, faults: int) -> None:
        self._store, self._faults = store, faults

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in FLAKY_METHODS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._faults > 0:
                self._faults -= 1
                raise StoreUnavailable("Qdrant server at http://test:6333 is unreachable (injected fault)")
            return attr(*args, **kwargs)

        return call


class Recording:
    """The pipeline, with each ingest call recorded in Redis (and optionally slowed down)."""

    def __init__(self, pipeline: Any, redis_url: str) -> None:
        import redis

        self._pipeline = pipeline
        self._redis = redis.Redis.from_url(redis_url)
        self._delay = float(os.environ.get("LOOKALIKE_TEST_TASK_DELAY") or 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def _record(self, key: str, value: dict[str, Any]) -> None:
        """RPUSH, waiting out a Redis restart: the recording must not change what the task does."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self._redis.rpush(key, json.dumps(value))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def ingest(self, refs: Sequence[Any]) -> list[Any]:
        self._record("test:started", {"pid": os.getpid(), "uris": [r.uri for r in refs], "t": time.time()})
        if self._delay:
            time.sleep(self._delay)
        outcomes = self._pipeline.ingest(refs)
        for o in outcomes:
            self._record("test:done", {"uri": o.uri, "status": o.status, "id": o.id, "reason": o.reason,
                                       "tags": o.tags, "pid": os.getpid(), "t": time.time()})
        return outcomes


def _factory(settings: Any) -> Any:
    from ingest.pipeline import Pipeline
    from search.store import open_store

    faults = int(os.environ.get("LOOKALIKE_TEST_STORE_FAULTS") or 0)
    store = FlakyStore(open_store(settings), faults) if faults else None
    embedder = None if os.environ.get("LOOKALIKE_TEST_REAL_MODEL") == "1" else TinyEmbedder()
    pipeline = Pipeline(settings, store=store, embedder=embedder, source="worker")
    return Recording(pipeline, settings.broker)


app = make_app(pipeline_factory=_factory)
