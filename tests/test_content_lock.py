"""Workers sharing a Qdrant server: concurrent events for the same bytes must merge, not overwrite.

Two pipelines (as two worker processes would) share one qdrant-client store and a real Redis; each
ingests the same image bytes from a different path at the same moment. The Redis content lock makes the
second one see the first one's point and add its uri; without it, both embed and the last upsert wins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from ingest.pipeline import Pipeline
from ingest.sources import ImageRef
from search.config import get_settings
from search.store import ClientStore
from tests.fakes import TinyEmbedder
from tests.imagefactory import photo as _photo
from tests.redis_server import RedisServer
from workers.runtime import RedisContentLock

pytestmark = pytest.mark.redis


class SlowEmbedder(TinyEmbedder):
    """Widens the race window between lookup and upsert, as a real model does."""

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        time.sleep(0.3)
        return super().embed_prepared(items)


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.client()
    server.stop()


def _race(tmp_path: Path, lock: Any) -> list[str]:
    data = _photo(tmp_path / "orig.jpg", 7).read_bytes()
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for p in paths:
        p.write_bytes(data)
    settings = get_settings(data_dir=tmp_path / "data", qdrant_url="http://unused.invalid")
    store = ClientStore(QdrantClient(location=":memory:"), "race", settings=settings)
    pipelines = [Pipeline(settings, store=store, embedder=SlowEmbedder(), tagger=False, content_lock=lock)
                 for _ in paths]
    start = threading.Barrier(len(paths))

    def work(p: Pipeline, path: Path) -> None:
        start.wait()
        p.ingest([ImageRef(str(path))])

    threads = [threading.Thread(target=work, args=(p, path)) for p, path in zip(pipelines, paths, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [record] = list(store.scroll())
    return sorted(record.payload["uris"])


def test_concurrent_events_for_the_same_bytes_keep_every_uri(tmp_path: Path, redis_client: Any) -> None:
    uris = _race(tmp_path, RedisContentLock(redis_client))
    assert uris == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_without_the_lock_the_race_is_real(tmp_path: Path) -> None:
    # The control: proves the test above exercises a real race rather than passing by luck.
    assert len(_race(tmp_path, None)) == 1


def test_a_lock_left_by_a_killed_worker_expires(redis_client: Any) -> None:
    stale = RedisContentLock(redis_client, ttl=0.5)
    lock = redis_client.lock("lookalike:lock:p1", timeout=0.5)
    assert lock.acquire(blocking=False)  # held by a "dead" worker that never releases it
    t0 = time.monotonic()
    with stale(["p1"]):
        waited = time.monotonic() - t0
    assert 0.2 < waited < 5
