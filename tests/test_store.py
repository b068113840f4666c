"""The Store contract, one body run against every backend (the qdrant-client congruence-test idea):
``edge`` (qdrant-edge in a tmp dir), ``client-local`` (QdrantClient(":memory:")) and ``server``
(a real Qdrant at LOOKALIKE_TEST_QDRANT_URL; marked ``server``)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from search.config import Settings
from search.errors import CollectionMismatch, ConfigError, StoreError, StoreUnavailable
from search.schema import CollectionMeta, Filter, Match, PointRecord, point_id, sha256_hex
from search.store import ClientStore, EdgeStore, Store, open_store

REPO = Path(__file__).resolve().parents[1]
DIM = 8
META = CollectionMeta(model="test-model", dim=DIM, preprocessing="test-v1")
SERVER_URL = os.environ.get("LOOKALIKE_TEST_QDRANT_URL")
SERVER_KEY = os.environ.get("LOOKALIKE_TEST_QDRANT_API_KEY")  # read at import: conftest clears LOOKALIKE_*


def pid_of(name: str) -> str:
    return point_id(sha256_hex(name.encode()))


def unit(angle_deg: float, axis: int = 1) -> np.ndarray:
    """A unit vector at ``angle_deg`` from e0 towards e_axis: its cosine to e0 is cos(angle)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[0] = math.cos(math.radians(angle_deg))
    v[axis] = math.sin(math.radians(angle_deg))
    return v


E0 = unit(0)
# name -> (angle from e0, payload); angles fix the expected ranking for a query along e0
POINTS = {
    "cat1": (0, {"labels": ["cat"], "tags": [{"label": "cat", "score": 0.9}], "source": "backfill"}),
    "cat2": (10, {"labels": ["cat"], "tags": [{"label": "cat", "score": 0.8}], "source": "worker"}),
    "dog1": (20, {"labels": ["dog"], "tags": [{"label": "dog", "score": 0.7}], "source": "backfill"}),
    "dog2": (40, {"labels": [], "tags": [{"label": "dog", "score": 0.6}, {"label": "wolf", "score": 0.5}],
                  "source": "watch"}),
    "bird": (60, {"labels": ["bird"], "tags": [], "source": "backfill"}),
    "none": (80, {"labels": [], "tags": [], "source": "worker"}),
}
ORDER = ["cat1", "cat2", "dog1", "dog2", "bird", "none"]
NAME_OF = {pid_of(n): n for n in POINTS}


def records() -> list[PointRecord]:
    return [PointRecord(pid_of(n), unit(a), {**p, "sha256": sha256_hex(n.encode())}) for n, (a, p) in POINTS.items()]


def names(hits) -> list[str]:
    return [NAME_OF[h.id] for h in hits]


def _make(kind: str, tmp_path: Path) -> Store:
    if kind == "edge":
        return open_store(Settings(data_dir=tmp_path, hnsw_threshold=1_000_000), "test")
    if kind == "client-local":
        from qdrant_client import QdrantClient

        return ClientStore(QdrantClient(location=":memory:"), "test", owns_client=True)
    settings = Settings(qdrant_url=SERVER_URL, qdrant_api_key=SERVER_KEY)
    return ClientStore.from_settings(settings, f"lookalike_test_{uuid.uuid4().hex[:12]}")


BACKENDS = [
    "edge",
    "client-local",
    pytest.param("server", marks=[pytest.mark.server,
                                  pytest.mark.skipif(not SERVER_URL, reason="LOOKALIKE_TEST_QDRANT_URL not set")]),
]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = _make(request.param, tmp_path)
    yield s
    if request.param == "server":
        s.client.delete_collection(s.collection)
    s.close()


@pytest.fixture
def filled(store):
    store.ensure_collection(META)
    store.upsert(records())
    return store


# ---------------------------------------------------------------- collection + metadata

def test_create_and_meta_round_trip(store):
    assert store.meta() is None
    assert store.ensure_collection(META) == META
    assert store.meta() == META
    assert store.ensure_collection(META) == META  # idempotent
    assert store.count() == 0


@pytest.mark.parametrize("other, fragment", [
    (CollectionMeta(model="other-model", dim=DIM, preprocessing="test-v1"), "this run uses model other-model."),
    (CollectionMeta(model="test-model", dim=16, preprocessing="test-v1"), "(dim 16, preprocessing test-v1"),
    (CollectionMeta(model="test-model", dim=DIM, preprocessing="test-v2"), "preprocessing test-v2"),
])
def test_other_model_is_refused_with_the_fix(store, other, fragment):
    store.ensure_collection(META)
    with pytest.raises(CollectionMismatch) as err:
        store.ensure_collection(other)
    msg = str(err.value)
    assert msg.startswith(f"collection '{store.collection}' holds vectors of model test-model (dim 8, "
                          f"preprocessing test-v1); this run uses model ")
    assert fragment in msg
    assert msg.endswith("Use --collection/LOOKALIKE_COLLECTION for a separate collection, or --model test-model")
    assert store.meta() == META  # untouched


def test_operations_before_the_collection_exists_say_so(store):
    with pytest.raises(StoreError, match="does not exist"):
        store.search(E0[None, :])


# ---------------------------------------------------------------- search

def test_search_ranks_by_cosine_in_batches(filled):
    queries = np.stack([E0, unit(90, axis=2), unit(80)])
    results = filled.search(queries, k=3)
    assert len(results) == 3
    assert names(results[0]) == ORDER[:3]
    assert [h.score for h in results[0]] == pytest.approx([1.0, math.cos(math.radians(10)),
                                                           math.cos(math.radians(20))], abs=1e-5)
    assert names(results[2])[0] == "none"
    # a query orthogonal to every point's plane scores ~0 for all: still k results, scores near 0
    assert len(results[1]) == 3 and all(abs(h.score) < 1e-5 for h in results[1])
    # payload travels with hits
    top = results[0][0]
    assert top.labels == ["cat"] and top.tags[0]["label"] == "cat" and top.payload["source"] == "backfill"


def test_search_accepts_unnormalised_and_single_vectors(filled):
    (hits,) = filled.search(E0 * 7.5, k=2)
    assert names(hits) == ["cat1", "cat2"] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_min_score_cuts_the_tail(filled):
    (hits,) = filled.search(E0[None, :], k=10, min_score=math.cos(math.radians(30)))
    assert names(hits) == ["cat1", "cat2", "dog1"]


def test_exact_search_agrees(filled):
    assert names(filled.search(E0[None, :], k=6, exact=True)[0]) == ORDER


def test_wrong_query_dimension_is_a_clear_error(filled):
    with pytest.raises(StoreError, match="holds 8-d vectors"):
        filled.search(np.ones((1, 3), dtype=np.float32))


@pytest.mark.parametrize("flt, expected", [
    (Filter(must=(Match("labels", ("cat", "bird")),)), ["cat1", "cat2", "bird"]),
    (Filter(must=(Match("tags[].label", ("wolf",)),)), ["dog2"]),
    (Filter(must=(Match("tags[].label", ("dog",)),)), ["dog1", "dog2"]),
    (Filter(must=(Match("labels", ("cat", "dog")), Match("source", ("backfill",)))), ["cat1", "dog1"]),
    (Filter(must_not=(Match("source", ("backfill", "watch")),)), ["cat2", "none"]),
    (Filter(non_empty=("labels",)), ["cat1", "cat2", "dog1", "bird"]),
    (Filter(non_empty=("tags",), must_not=(Match("labels", ("cat",)),)), ["dog1", "dog2"]),
    (Filter(exclude_ids=(pid_of("cat1"), pid_of("dog1"))), ["cat2", "dog2", "bird", "none"]),
    (Filter(must=(Match("labels", ("nothing",)),)), []),
    (Filter(), ORDER),
])
def test_filters(filled, flt, expected):
    (hits,) = filled.search(E0[None, :], k=10, filter=flt)
    assert names(hits) == expected  # ranking is preserved inside the filter
    assert filled.count(flt) == len(expected)
    assert sorted(NAME_OF[r.id] for r in filled.scroll(flt, batch=2)) == sorted(expected)
    (exact_hits,) = filled.search(E0[None, :], k=10, filter=flt, exact=True)
    assert names(exact_hits) == expected


@pytest.mark.parametrize(("expr", "message"), [
    ("width=" + "9" * 20, "width must be between -9223372036854775808 and 9223372036854775807"),
    ("bytes=-9223372036854775809", "bytes must be between"),
    ("height=" + "1" * 5000, "height takes a whole number"),  # over Python's 4300-digit int() limit
    ("label=\ud800", "the value is not valid Unicode text"),
])
def test_filter_values_no_store_can_take_are_a_config_error(expr, message):
    """`--filter width=<huge>` used to reach the store and end in a traceback (OverflowError)."""
    with pytest.raises(ConfigError, match=message):
        Filter.parse([expr])


def test_int64_bounds_reach_the_store(filled):
    for value in (2**63 - 1, -(2**63)):
        assert filled.count(Filter.parse([f"width={value}"])) == 0


# ---------------------------------------------------------------- point operations

def test_count_scroll_retrieve_delete(filled):
    assert filled.count() == len(POINTS)
    scrolled = list(filled.scroll(batch=4, with_vectors=True))
    assert sorted(NAME_OF[r.id] for r in scrolled) == sorted(POINTS)
    for r in scrolled:
        assert r.vector.dtype == np.float32 and r.vector.shape == (DIM,)
        assert np.allclose(r.vector, unit(POINTS[NAME_OF[r.id]][0]), atol=1e-6)
    assert all(r.vector is None for r in filled.scroll())

    missing = pid_of("missing")
    got = filled.retrieve([pid_of("dog2"), missing, pid_of("cat1")])
    assert sorted(NAME_OF[r.id] for r in got) == ["cat1", "dog2"]
    assert all(r.vector is None for r in got)
    assert {r.id: r.payload["labels"] for r in got} == {pid_of("dog2"): [], pid_of("cat1"): ["cat"]}
    (with_vec,) = filled.retrieve([pid_of("dog1").upper()], with_vectors=True)  # ids are canonicalised
    assert with_vec.id == pid_of("dog1") and np.allclose(with_vec.vector, unit(20), atol=1e-6)
    assert filled.retrieve([]) == []

    filled.delete([pid_of("cat1"), pid_of("bird"), missing])
    assert filled.count() == len(POINTS) - 2
    assert filled.retrieve([pid_of("cat1")]) == []
    assert names(filled.search(E0[None, :], k=2)[0]) == ["cat2", "dog1"]


def test_set_payload_overwrites_only_given_keys(filled):
    pid = pid_of("dog2")
    filled.set_payload(pid, {"labels": ["dog", "husky"], "note": "checked"})
    (rec,) = filled.retrieve([pid])
    assert rec.payload["labels"] == ["dog", "husky"] and rec.payload["note"] == "checked"
    assert rec.payload["source"] == "watch" and len(rec.payload["tags"]) == 2
    assert filled.count(Filter(must=(Match("labels", ("husky",)),))) == 1
    with pytest.raises(StoreError, match="no point"):
        filled.set_payload(pid_of("missing"), {"labels": ["x"]})


def test_same_id_upsert_leaves_one_point(filled):
    pid = pid_of("cat1")
    filled.upsert([PointRecord(pid, unit(70), {"labels": ["replaced"]})])
    filled.upsert([PointRecord(pid, unit(70), {"labels": ["replaced"]})])
    assert filled.count() == len(POINTS)
    (rec,) = filled.retrieve([pid])
    assert rec.payload == {"labels": ["replaced"]}  # upsert replaces the whole point
    assert names(filled.search(E0[None, :], k=1)[0]) == ["cat2"]


def test_bulk_writes_are_visible_and_made_durable_at_the_end(filled):
    flushes = []
    end_bulk = filled.end_bulk
    filled.end_bulk = lambda: (flushes.append(1), end_bulk())[1]
    with filled.bulk(), filled.bulk():
        filled.upsert([PointRecord(pid_of("b1"), unit(5), {"labels": ["b"]})])
        filled.set_payload(pid_of("b1"), {"note": "x"})
        assert filled.count(Filter(must=(Match("labels", ("b",)),))) == 1
        assert flushes == []
    assert flushes == [1]
    assert filled.retrieve([pid_of("b1")])[0].payload == {"labels": ["b"], "note": "x"}


def test_bad_points_are_refused(filled):
    with pytest.raises(StoreError, match="3 dimensions"):
        filled.upsert([PointRecord(pid_of("x"), np.ones(3, dtype=np.float32), {})])
    with pytest.raises(StoreError, match="not a full point id"):
        filled.upsert([PointRecord("not-a-uuid", E0, {})])
    with pytest.raises(StoreError, match="NaN"):
        filled.upsert([PointRecord(pid_of("x"), np.full(DIM, np.nan, dtype=np.float32), {})])
    assert filled.count() == len(POINTS)


def test_optimize(filled):
    rng = np.random.default_rng(1)  # filler far from e0 so the index has something to build over
    filler = rng.standard_normal((300, DIM)).astype(np.float32)
    filler[:, 0] = -np.abs(filler[:, 0]) - 1
    filled.upsert([PointRecord(pid_of(f"filler{i}"), v, {"labels": ["filler"]}) for i, v in enumerate(filler)])
    if filled.embedded:
        assert filled.optimize() is False  # below settings.hnsw_threshold
        assert filled.optimize(force=True) is True
        assert filled._indexed
        # selective filter after HNSW: answered exactly
        flt = Filter(must=(Match("tags[].label", ("dog",)),))
        assert names(filled.search(E0[None, :], k=10, filter=flt)[0]) == ["dog1", "dog2"]
    else:
        assert filled.optimize(force=True) is False
    assert names(filled.search(E0[None, :], k=6)[0]) == ORDER


@pytest.mark.parametrize("quantization", ["int8", "binary"])
def test_quantized_collections_search(tmp_path, quantization):
    from qdrant_client import QdrantClient

    settings = Settings(data_dir=tmp_path, quantization=quantization)
    for s in (open_store(settings, "q"), ClientStore(QdrantClient(":memory:"), "q", settings=settings)):
        with s:
            s.ensure_collection(META)
            s.upsert(records())
            s.optimize(force=True)
            assert names(s.search(E0[None, :], k=3)[0]) == ORDER[:3]


# ---------------------------------------------------------------- persistence, locking, durability

def test_edge_reopen_persists(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "test") as s:
        s.ensure_collection(META)
        s.upsert(records())
    assert not (tmp_path / "qdrant" / ".lock").read_text()  # released: the PID is cleared
    with open_store(settings, "test") as s:
        assert s.meta() == META and s.count() == len(POINTS)
        assert names(s.search(E0[None, :], k=6)[0]) == ORDER


def test_client_path_mode_reopen_persists(tmp_path):
    from qdrant_client import QdrantClient

    with ClientStore(QdrantClient(path=str(tmp_path / "local")), "test", owns_client=True) as s:
        s.ensure_collection(META)
        s.upsert(records())
    with ClientStore(QdrantClient(path=str(tmp_path / "local")), "test", owns_client=True) as s:
        assert s.meta() == META and s.count() == len(POINTS)


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_a_planted_lock_file_is_refused_and_its_target_left_alone(tmp_path, plant):
    """The lock file is truncated and written: a symlink (or hard link) planted in its place used to have
    its target truncated, e.g. a file of the user's that the data dir's owner can write."""
    from search.errors import StoreLocked

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = tmp_path / "data" / "qdrant" / ".lock"
    lock.parent.mkdir(parents=True)
    if plant == "symlink":
        lock.symlink_to(victim)
    elif plant == "hardlink":
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    with pytest.raises(StoreError, match=r"cannot use the lock file .*remove it") as err:
        open_store(Settings(data_dir=tmp_path / "data"), "test")
    assert not isinstance(err.value, StoreLocked)
    assert victim.read_text() == "precious\n"


def test_collections_are_separate_and_share_the_lock(tmp_path):
    settings = Settings(data_dir=tmp_path)
    a, b = open_store(settings, "a"), open_store(settings, "b")
    a.ensure_collection(META)
    b.ensure_collection(CollectionMeta(model="other", dim=4, preprocessing="x"))
    a.upsert(records())
    assert (a.count(), b.count()) == (len(POINTS), 0)
    a.close()
    assert str(os.getpid()) in (tmp_path / "qdrant" / ".lock").read_text()  # b still holds it
    b.close()


def test_same_process_double_open_shares_one_handle(tmp_path):
    settings = Settings(data_dir=tmp_path)
    first = open_store(settings, "test")
    second = open_store(Settings(data_dir=tmp_path / "." / ""), "test")
    assert first is second and isinstance(first, EdgeStore)
    first.ensure_collection(META)
    first.close()  # ref-counted: the other user keeps a working store
    second.upsert(records())
    assert second.count() == len(POINTS)
    second.close()
    with pytest.raises(StoreError, match="closed"):
        second.count()
    third = open_store(settings, "test")
    assert third is not first and third.count() == len(POINTS)
    third.close()


def _run_python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


OPEN_IN_CHILD = """
    import sys
    from search.config import Settings
    from search.errors import StoreLocked
    from search.store import open_store
    try:
        s = open_store(Settings(data_dir=sys.argv[1]), "test")
    except StoreLocked as err:
        print("LOCKED", err)
    else:
        print("OPEN", s.count())
        s.close()
"""


def test_second_process_gets_store_locked_with_pid(tmp_path):
    settings = Settings(data_dir=tmp_path)
    s = open_store(settings, "test")
    s.ensure_collection(META)
    s.upsert(records())
    out, err = _run_python(OPEN_IN_CHILD, str(tmp_path)).communicate(timeout=60)
    root = (tmp_path / "qdrant").resolve()
    assert out.strip() == (f"LOCKED the store at {root} is in use by PID {os.getpid()}; stop that process or use "
                           f"a Qdrant server (LOOKALIKE_QDRANT_URL) for concurrent access"), err
    # the failed attempt did not disturb our handle (it never touched the shard)
    s.upsert([PointRecord(pid_of("after"), unit(5), {})])
    s.flush()
    s.close()
    out, err = _run_python(OPEN_IN_CHILD, str(tmp_path)).communicate(timeout=60)
    assert out.strip() == f"OPEN {len(POINTS) + 1}", err


def test_forked_child_cannot_use_or_reopen_the_parents_store(tmp_path):
    s = open_store(Settings(data_dir=tmp_path), "test")
    s.ensure_collection(META)
    s.upsert(records())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what happens, never run pytest's teardown
        outcome = []
        try:
            s.count()
        except StoreError as err:
            outcome.append("fork" in str(err))
        try:
            open_store(Settings(data_dir=tmp_path), "test")
        except StoreError as err:
            outcome.append(f"PID {os.getppid()}" in str(err))
        s.close()  # a no-op on the parent's handle
        os.write(write, repr(outcome).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        assert fh.read() == "[True, True]"
    os.waitpid(pid, 0)
    s.upsert([PointRecord(pid_of("after-fork"), unit(3), {})])  # the parent's handle still works
    s.flush()
    assert s.count() == len(POINTS) + 1
    s.close()


@pytest.mark.parametrize("sync_writes", [True, False], ids=["synced", "bulk"])
def test_points_survive_sigkill_right_after_upsert(tmp_path, sync_writes):
    code = """
        import sys, time
        import numpy as np
        from search.config import Settings
        from search.schema import CollectionMeta, PointRecord, point_id
        from search.store import open_store
        s = open_store(Settings(data_dir=sys.argv[1]), "test")
        s.ensure_collection(CollectionMeta(model="test-model", dim=8, preprocessing="test-v1"))
        rng = np.random.default_rng(0)
        def load():
            for b in range(4):
                s.upsert([PointRecord(point_id(f"{b:02x}{i:04x}"), rng.standard_normal(8), {"b": b})
                          for i in range(300)])
            print("ACKED", flush=True)
            time.sleep(60)
        if sys.argv[2] == "1":
            load()
        else:
            with s.bulk():  # killed inside the block: no flush yet, only the WAL
                load()
    """
    with _run_python(code, str(tmp_path), "1" if sync_writes else "0") as child:
        line = child.stdout.readline()
        child.send_signal(signal.SIGKILL)
        stderr = child.stderr.read()
    assert line.strip() == "ACKED", stderr
    with open_store(Settings(data_dir=tmp_path), "test") as s:  # the dead process's flock is gone
        assert s.count() == 1200
        assert s.count(Filter(must=(Match("b", (3,)),))) == 300
        assert len(s.retrieve([point_id("030000")], with_vectors=True)) == 1


def test_a_single_write_is_fsynced_in_the_wal_before_it_returns(tmp_path, monkeypatch):
    """Durable against an OS crash without the engine's full flush (which writes every segment, ~30 ms): the
    write-ahead log's files are fsynced; the full flush runs every FLUSH_EVERY writes."""
    from search.store import edge

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(edge.os, "fsync", fsync)
    monkeypatch.setattr(edge, "FLUSH_EVERY", 3)
    with open_store(Settings(data_dir=tmp_path), "test") as s:
        s.ensure_collection(CollectionMeta(model="test-model", dim=8, preprocessing="test-v1"))
        synced.clear()
        s.upsert([PointRecord(pid_of("one"), unit(0), {})])
        wal = str(s.path / "wal")
        assert wal in synced and any(p.startswith(wal + "/") for p in synced)
        assert s._unflushed == 1
        s.upsert([PointRecord(pid_of("two"), unit(1), {})])
        assert s._unflushed == 2
        s.upsert([PointRecord(pid_of("three"), unit(2), {})])  # the third write: a full flush instead
        assert s._unflushed == 0
        with s.bulk():  # bulk writes sync nothing until the block's one flush
            synced.clear()
            s.upsert([PointRecord(pid_of("four"), unit(0), {})])
            assert synced == []


def test_bad_collection_name(tmp_path):
    with pytest.raises(ConfigError, match="LOOKALIKE_COLLECTION"):
        open_store(Settings(data_dir=tmp_path), "../escape")


# ---------------------------------------------------------------- server failures

@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_unreachable_server_is_store_unavailable_quickly():
    settings = Settings(qdrant_url="http://127.0.0.1:1", qdrant_api_key="s3cret-key")
    store = open_store(settings, "test")
    assert not store.embedded and "s3cret" not in repr(store)
    started = time.monotonic()
    for call in (store.meta, lambda: store.ensure_collection(META), lambda: store.count(),
                 lambda: store.upsert(records()), lambda: store.search(E0[None, :])):
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert "127.0.0.1:1" in str(err.value) and "LOOKALIKE_QDRANT_URL" in str(err.value)
        assert "s3cret" not in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert time.monotonic() - started < 5
    store.close()


def test_credentials_in_the_url_are_not_repeated():
    store = open_store(Settings(qdrant_url="http://user:pw@127.0.0.1:1/"), "test")
    with pytest.raises(StoreUnavailable) as err:
        store.count()
    assert "pw" not in str(err.value) and "user" not in str(err.value)
    store.close()
