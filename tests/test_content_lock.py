"""Workers sharing a Qdrant server: concurrent events for the same bytes must merge, not overwrite.

Two pipelines (as two worker processes would) share one qdrant-client store and a real Redis; each
ingests the same image bytes from a different path at the same moment. The Redis content lock makes the
second one see the first one's point and add its uri; without it, both embed and the last upsert wins.
"""

from __future__ import annotations

import contextlib
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
    return _together(store, *[lambda p=p, path=path: p.ingest([ImageRef(str(path))])
                              for p, path in zip(pipelines, paths, strict=True)])


def _together(store: Any, *jobs: Any) -> list[str]:
    """Run ``jobs`` at the same moment (one thread each, behind a barrier); the one stored point's uris."""
    start = threading.Barrier(len(jobs))
    threads = [threading.Thread(target=lambda job=job: (start.wait(), job())) for job in jobs]
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


def _backfill_race(tmp_path: Path, lock: Any) -> list[str]:
    """A backfill (Pipeline.run) and a worker-style ingest write the same new bytes at the same moment."""
    data = _photo(tmp_path / "orig.jpg", 11).read_bytes()
    (tmp_path / "bulk").mkdir()
    a, b = tmp_path / "bulk" / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(data)
    b.write_bytes(data)
    settings = get_settings(data_dir=tmp_path / "data", qdrant_url="http://unused.invalid")
    store = ClientStore(QdrantClient(location=":memory:"), "race", settings=settings)
    backfill = Pipeline(settings, store=store, embedder=SlowEmbedder(), tagger=False, content_lock=lock)
    worker = Pipeline(settings, store=store, embedder=SlowEmbedder(), tagger=False, content_lock=lock)
    return _together(store, lambda: backfill.run([ImageRef(str(a))]), lambda: worker.ingest([ImageRef(str(b))]))


def test_a_backfill_takes_the_same_lock_as_the_workers(tmp_path: Path, redis_client: Any) -> None:
    uris = _backfill_race(tmp_path, RedisContentLock(redis_client))
    assert uris == [str(tmp_path / "b.jpg"), str(tmp_path / "bulk" / "a.jpg")]


def test_without_the_lock_a_backfill_races_too(tmp_path: Path) -> None:
    assert len(_backfill_race(tmp_path, None)) == 1  # the control: the race above is real


def test_the_lock_is_extended_while_held_and_its_loss_is_detected(redis_client: Any) -> None:
    from search.errors import ContentLockLost

    lock = RedisContentLock(redis_client, ttl=0.6)
    with lock(["slow"]):
        time.sleep(1.5)  # longer than the ttl: the keeper extends it
        assert redis_client.exists("lookalike:lock:slow")
    with pytest.raises(ContentLockLost, match="expired during the write"), lock(["p2"]):
        redis_client.delete("lookalike:lock:p2")  # expired, as after a Redis restart or a long freeze
        redis_client.set("lookalike:lock:p2", b"someone-else")


def test_a_batch_whose_lock_was_lost_is_written_again(tmp_path: Path, redis_client: Any) -> None:
    from search.errors import ContentLockLost

    real = RedisContentLock(redis_client)
    lost_once: list[bool] = []

    @contextlib.contextmanager
    def flaky(ids: Sequence[str]) -> Iterator[None]:
        with real(ids):
            yield
        if not lost_once:
            lost_once.append(True)
            raise ContentLockLost("the content lock expired during the write (injected)")

    path = _photo(tmp_path / "p.jpg", 3)
    settings = get_settings(data_dir=tmp_path / "data", qdrant_url="http://unused.invalid")
    store = ClientStore(QdrantClient(location=":memory:"), "retry", settings=settings)
    pipeline = Pipeline(settings, store=store, embedder=TinyEmbedder(), tagger=False, content_lock=flaky)
    [outcome] = pipeline.ingest([ImageRef(str(path), ("cat",))])
    assert lost_once == [True] and outcome.status == "present"  # the second attempt found the first one's write
    [record] = list(store.scroll())
    assert record.payload["uris"] == [str(path)] and record.payload["labels"] == ["cat"]


def test_every_writer_on_a_server_gets_the_redis_lock_by_default(tmp_path: Path, redis_client: Any) -> None:
    url = f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"
    with_broker = get_settings(data_dir=tmp_path, qdrant_url="http://unused.invalid")
    import os

    os.environ["LOOKALIKE_BROKER_URL"] = url
    try:
        assert isinstance(Pipeline(with_broker, embedder=TinyEmbedder()).content_lock, RedisContentLock)
    finally:
        del os.environ["LOOKALIKE_BROKER_URL"]
    assert Pipeline(with_broker, embedder=TinyEmbedder()).content_lock is None  # no Redis named: warned, none
    assert Pipeline(get_settings(data_dir=tmp_path), embedder=TinyEmbedder()).content_lock is None  # embedded
