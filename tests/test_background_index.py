"""The embedded store builds its HNSW index in the background (``search.store.edge``): a copy of the shard is
optimized in a child process and swapped in, while writes and searches go on against the live shard."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import search.store.build as build
import search.store.edge as edge
from search.config import Settings
from search.schema import CollectionMeta, PointRecord, point_id, sha256_hex
from search.store import EdgeStore, open_store

DIM = 16
META = CollectionMeta(model="test-model", dim=DIM, preprocessing="test-v1")
THRESHOLD = 400


def pid(i: int) -> str:
    return point_id(sha256_hex(f"p{i}".encode()))


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def records(start: int, x: np.ndarray) -> list[PointRecord]:
    return [PointRecord(pid(start + i), v, {"labels": [f"c{(start + i) % 5}"], "source": "test"})
            for i, v in enumerate(x)]


def open_bg(tmp_path: Path) -> EdgeStore:
    store = open_store(Settings(data_dir=tmp_path, hnsw_threshold=THRESHOLD, quantization="int8"), "bg")
    assert isinstance(store, EdgeStore)
    store.ensure_collection(META)
    return store


def slow_child(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Hold the build's child back, so that the test's writes certainly overlap the build."""
    monkeypatch.setattr(build, "_BUILD_CODE", f"import time\ntime.sleep({seconds})\n" + build._BUILD_CODE)


def indexed(store: EdgeStore) -> int:
    with store._using() as shard:
        return int(shard.info().indexed_vectors_count)


def own_top_hit(store: EdgeStore, x: np.ndarray, start: int) -> int:
    """How many of these points are their own vector's top hit."""
    hits = store.search(x, k=1)
    return sum(1 for i, h in enumerate(hits) if h and h[0].id == pid(start + i))


def fill(store: EdgeStore, n: int, seed: int = 0, start: int = 0, batch: int = 50) -> np.ndarray:
    x = vectors(n, seed)
    for b in range(0, n, batch):
        store.upsert(records(start + b, x[b:b + batch]))
    return x


def test_writes_and_searches_go_on_during_a_build_and_the_index_is_swapped_in(tmp_path, monkeypatch):
    slow_child(monkeypatch, 1.0)
    store = open_bg(tmp_path)
    base = fill(store, 600)
    assert store.building()  # past the threshold: a writer started it and returned
    assert indexed(store) == 0

    n, during, new = 600, 0, []
    while store.building():
        x = vectors(16, seed=n)
        store.upsert(records(n, x))  # as a worker writes: small batches, each acknowledged
        assert own_top_hit(store, x, n) == 16  # visible at once, and found
        new.append(x)
        n += 16
        during += 1
        if during == 3:
            store.delete([pid(0), pid(1)])
            store.set_payload(pid(2), {"note": "edited during the build"})
    assert during >= 3
    assert store.wait_for_build(30)

    assert indexed(store) > 0  # the copy's HNSW segment is the live shard now
    # gen-000001, or a later one when the writes made during the build were enough to start another
    current = (store.path / edge.CURRENT_FILE).read_text().strip()
    assert current.startswith("gen-") and int(current[4:]) >= 1 and (store.path / current).is_dir()
    assert not list(store.path.glob("*" + edge.BUILDING))
    assert not (store.path / "segments").exists()  # the old shard's files are gone
    assert store.count() == n - 2
    assert store.retrieve([pid(0), pid(1)]) == []
    assert store.retrieve([pid(2)])[0].payload["note"] == "edited during the build"
    assert own_top_hit(store, base[2:], 2) == 598
    assert own_top_hit(store, np.concatenate(new), 600) == n - 600

    store.close()
    store = open_bg(tmp_path)
    assert store.count() == n - 2
    assert indexed(store) > 0
    assert own_top_hit(store, np.concatenate(new), 600) == n - 600
    store.close()


def test_points_written_after_a_build_trigger_the_next_one(tmp_path):
    store = open_bg(tmp_path)
    fill(store, 500)
    assert store.wait_for_build(30)
    first = indexed(store)
    assert first >= 500
    x = fill(store, 500, seed=1, start=500)
    assert store.wait_for_build(30)
    assert indexed(store) > first
    assert (store.path / edge.CURRENT_FILE).read_text().strip() == "gen-000002"
    assert not (store.path / "gen-000001").exists()
    assert own_top_hit(store, x, 500) == 500
    store.close()


def test_close_during_a_build_stops_it_and_keeps_every_point(tmp_path, monkeypatch):
    slow_child(monkeypatch, 30.0)
    store = open_bg(tmp_path)
    x = fill(store, 600)
    assert store.building()
    while store._building is not None and store._building.proc is None:  # the copy is done, the child runs
        time.sleep(0.01)
    extra = vectors(16, seed=99)
    store.upsert(records(600, extra))
    started = time.perf_counter()
    store.close()
    assert time.perf_counter() - started < 10  # the child is killed, not waited for
    assert not list(store.path.glob("gen-*"))
    assert not (store.path / edge.CURRENT_FILE).exists()

    monkeypatch.setattr(build, "_BUILD_CODE", build._BUILD_CODE.split("\n", 2)[2])  # a normal child again
    store = open_bg(tmp_path)
    assert store.count() == 616
    assert own_top_hit(store, x, 0) == 600
    assert own_top_hit(store, extra, 600) == 16
    store.close()


def test_a_failed_build_leaves_the_store_working_and_is_retried_later(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(build, "_BUILD_CODE", "import sys\nsys.exit(3)\n")
    store = open_bg(tmp_path)
    fill(store, 600)
    assert store.wait_for_build(30)
    assert "failed" in caplog.text
    assert not list(store.path.glob("gen-*"))
    assert store._next_build_at > time.monotonic()
    fill(store, 300, seed=1, start=600)
    assert not store.building()  # backing off
    assert store.count() == 900
    assert indexed(store) == 0
    store.close()


def test_bulk_writes_start_no_build_until_the_block_ends_and_optimize_stops_a_running_one(tmp_path, monkeypatch):
    store = open_bg(tmp_path)
    with store.bulk():
        fill(store, 600)
        assert not store.building()
    assert store.building()  # the block's flush looked
    slow_child(monkeypatch, 30.0)
    assert store.optimize() is True  # blocking, in this process; the background build is cancelled
    assert not store.building()
    assert indexed(store) >= 600
    assert not list(store.path.glob("gen-*" + edge.BUILDING))
    store.close()


def test_open_removes_what_a_crash_left_behind(tmp_path):
    store = open_bg(tmp_path)
    fill(store, 500)
    assert store.wait_for_build(30)
    path = store.path
    store.close()
    (path / ("gen-000007" + edge.BUILDING)).mkdir()  # a build interrupted by a crash
    (path / "gen-000000").mkdir()  # a generation the crash left after CURRENT moved on
    (path / "wal").mkdir()  # the collection folder's own shard, not yet removed at the crash
    store = open_bg(tmp_path)
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == ["gen-000001"]
    assert store.count() == 500
    store.close()
