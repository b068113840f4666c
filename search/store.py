"""One ``Store`` over Qdrant, with two backends behind the same contract.

* ``EdgeStore`` (default, embedded): ``qdrant-edge-py`` runs the Qdrant engine in this process, one
  shard folder per collection under ``<data_dir>/qdrant/<collection>``; the collection metadata lives in
  ``lookalike.json`` inside that folder. One process at a time: an ``fcntl.flock`` on
  ``<data_dir>/qdrant/.lock`` (holding the owner's PID) is taken *before* the shard is opened, because a
  second opener that fails on the WAL lock breaks the first handle's next ``flush()``. Within one
  process ``open_store`` hands out one shared, ref-counted handle per collection folder.
* ``ClientStore``: ``qdrant_client.QdrantClient`` — a Qdrant server (``LOOKALIKE_QDRANT_URL``) for
  several processes, or any client a caller builds (tests use local mode ``:memory:``). Metadata goes into
  the collection's own ``metadata``. Unreachable servers raise ``StoreUnavailable`` (transient).

Durability (edge, measured): ``update()`` appends to the WAL through the page cache without fsync, which
already survives SIGKILL of this process; ``flush()`` msyncs the WAL and segments so points also survive
an OS crash. Writes therefore flush before they return: 3.5-11 ms per call on an idle machine, but the flush
waits on engine threads, so under heavy CPU contention it took ~300 ms. ``with store.bulk():`` skips the
per-call flush for re-runnable bulk work (backfill, tagging) and flushes once at the end.

Search (edge): exact until ``optimize()`` builds HNSW (blocking; ~130 s per 100k 1280-d points on 2 cores;
exact p50 ~40 ms there, HNSW ~1 ms at recall@10 >= 0.996).
After that, a *selective* filter (few matching points) is searched exactly: filtered HNSW lost recall at
1M points, and scoring a few thousand vectors exactly is cheap (see benchmarks/results/search.md).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from search.config import Settings
from search.errors import CollectionMismatch, ConfigError, StoreError, StoreLocked, StoreUnavailable
from search.schema import PAYLOAD_INDEXES, CollectionMeta, Filter, Hit, Match, PointRecord

log = logging.getLogger(__name__)

# HNSW parameters (both backends). Chosen in benchmarks/bench_search.py: recall@10 >= 0.98 at 100k 1280-d.
HNSW_M = 16
HNSW_EF_CONSTRUCT = 128
HNSW_EF = 128  # search-time beam width; raised to k when k is larger
# Segments (or filtered candidate sets) below this size in KB are scored exactly by the engine.
FULL_SCAN_THRESHOLD_KB = 10_000
# Edge: a filter matching at most this many points is searched exactly (with the payload index).
EXACT_FILTER_MAX = 20_000
CLIENT_TIMEOUT_S = 30
META_FILE = "lookalike.json"
LOCK_FILE = ".lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


def _mismatch_message(collection: str, have: CollectionMeta, want: CollectionMeta) -> str:
    run = f"model {want.model}"
    if want.model == have.model:  # same model name: say what else differs
        run += f" (dim {want.dim}, preprocessing {want.preprocessing}, distance {want.distance})"
    return (f"collection '{collection}' holds vectors of model {have.model} (dim {have.dim}, preprocessing "
            f"{have.preprocessing}); this run uses {run}. Use --collection/LOOKALIKE_COLLECTION for a separate "
            f"collection, or --model {have.model}")


def _point_id(value: Any) -> str:
    """Canonical UUID string; both backends accept and return UUIDs, we always hand out this form."""
    try:
        return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))
    except ValueError:
        raise StoreError(f"point id {value!r} is not a full point id (a UUID, as `search --json` prints it)") from None


def _vector_list(vector: Any, dim: int, pid: str) -> list[float]:
    arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    if arr.shape[0] != dim:
        raise StoreError(f"point {pid}: vector has {arr.shape[0]} dimensions, the collection holds {dim}")
    if not np.all(np.isfinite(arr)):
        raise StoreError(f"point {pid}: vector contains NaN or infinity")
    return arr.tolist()


def _to_array(vector: Any) -> np.ndarray | None:
    if vector is None:
        return None
    if isinstance(vector, dict):  # named vectors: ours is the default (unnamed) one
        vector = vector.get("", next(iter(vector.values()), None))
    return None if vector is None else np.asarray(vector, dtype=np.float32)


def _quantization_kind(settings: Settings | None) -> str:
    return (settings.quantization if settings is not None else "none") or "none"


class Store(ABC):
    """A collection of image vectors with payloads. See the module docstring for the two backends."""

    collection: str
    embedded: bool
    sync_writes: bool = True  # edge: fsync before a write returns (see the module docstring)
    _bulk_depth: int = 0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def ensure_collection(self, meta: CollectionMeta) -> CollectionMeta:
        """Create the collection on first use; refuse (CollectionMismatch) one built with another model."""

    @abstractmethod
    def meta(self) -> CollectionMeta | None:
        """The collection's metadata, or None if it does not exist yet."""

    @abstractmethod
    def upsert(self, points: Sequence[PointRecord]) -> None:
        """Insert or replace points (same id = one point). Durable once it returns."""

    @abstractmethod
    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[PointRecord]:
        """The points among ``ids`` that exist, in any order."""

    @abstractmethod
    def set_payload(self, id: str, payload: dict) -> None:
        """Overwrite the given payload keys of one point; other keys stay. StoreError if it does not exist."""

    @abstractmethod
    def search(self, vectors: np.ndarray, k: int = 10, filter: Filter | None = None,
               min_score: float | None = None, exact: bool = False) -> list[list[Hit]]:
        """Nearest points for each row of ``vectors`` (n, dim), best first, one list per query."""

    @abstractmethod
    def count(self, filter: Filter | None = None) -> int: ...

    @abstractmethod
    def scroll(self, filter: Filter | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[PointRecord]: ...

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None: ...

    def optimize(self, force: bool = False) -> bool:
        """Build the ANN index where the backend needs to be told; returns whether it ran."""
        return False

    def flush(self) -> None:  # noqa: B027 - optional hook, a no-op where the backend persists on its own
        """Persist pending writes (writes already flush unless ``sync_writes`` is off)."""

    @contextlib.contextmanager
    def bulk(self) -> Iterator[Store]:
        """Writes inside skip the per-call fsync and are flushed once at the end. They still survive a
        killed process (the WAL); an OS crash inside the block may lose them, so use it for re-runnable
        bulk work (backfill, tagging), not for acknowledging events one by one."""
        self._bulk_depth += 1
        try:
            yield self
        finally:
            self._bulk_depth -= 1
            if self._bulk_depth == 0:
                self.flush()

    @abstractmethod
    def close(self) -> None: ...

    # shared helpers
    def _query_matrix(self, vectors: Any, dim: int, k: int) -> np.ndarray:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise StoreError(f"query vectors have shape {arr.shape}; collection '{self.collection}' holds "
                             f"{dim}-d vectors")
        return arr


# --------------------------------------------------------------------------------------------------
# Embedded: qdrant-edge
# --------------------------------------------------------------------------------------------------

class _DirLock:
    """An exclusive flock on ``<root>/.lock`` shared (ref-counted) by every store of this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.refs = 0
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise StoreLocked(_locked_message(self.path.parent, _read_pid(self.path))) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
        self.refs += 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _locked_message(root: Path, pid: str) -> str:
    return (f"the store at {root} is in use by PID {pid}; stop that process or use a Qdrant server "
            f"(LOOKALIKE_QDRANT_URL) for concurrent access")


_REGISTRY_LOCK = threading.RLock()
_LOCKS: dict[Path, _DirLock] = {}
_STORES: dict[Path, EdgeStore] = {}
_ORPHANS: list[EdgeStore] = []  # a forked child's copies of the parent's stores, kept alive: see below


def _forget_after_fork() -> None:
    """In a forked child the parent's handles are not ours: unregister them without closing the shards
    (closing, or letting them be freed, could write to files the parent still uses) and close our copy of
    the lock descriptor (the parent keeps the lock). Using such a handle raises StoreError."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.RLock()
    for lock in _LOCKS.values():
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None
    _ORPHANS.extend(_STORES.values())
    _LOCKS.clear()
    _STORES.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_all() -> None:
    for store in list(_STORES.values()):
        with contextlib.suppress(Exception):
            store._refs = 1
            store.close()


def _edge_filter(flt: Filter | None) -> Any:
    if flt is None:
        return None
    import qdrant_edge as qe

    def cond(m: Match) -> Any:
        values = list(m.values)
        if len(values) == 1 and isinstance(values[0], bool):
            return qe.FieldCondition(key=m.field, match=qe.MatchValue(values[0]))
        return qe.FieldCondition(key=m.field, match=qe.MatchAny(values))

    must = [cond(m) for m in flt.must]
    must_not: list[Any] = [cond(m) for m in flt.must_not]
    must_not += [qe.IsEmptyCondition(key) for key in flt.non_empty]
    if flt.exclude_ids:
        must_not.append(qe.HasIdCondition({_point_id(i) for i in flt.exclude_ids}))
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


class EdgeStore(Store):
    """The embedded store. Get it from ``open_store``: it owns the process-wide lock and sharing."""

    embedded = True

    def __init__(self, settings: Settings, collection: str, root: Path, lock: _DirLock) -> None:
        self.settings = settings
        self.collection = collection
        self.root = root
        self.path = root / collection
        self._lock = lock
        self._refs = 1
        self._pid = os.getpid()
        self._closed = False
        self._shard: Any = None
        self._meta: CollectionMeta | None = None
        self._indexed = False
        self._read_meta()
        if (self.path / "edge_config.json").exists():
            self._shard = self._load()

    def __repr__(self) -> str:
        return f"EdgeStore({str(self.path)!r})"

    # lifecycle
    def _load(self) -> Any:
        import qdrant_edge as qe

        try:
            shard = qe.EdgeShard.load(str(self.path))
        except Exception as err:
            if "WouldBlock" in str(err):  # someone opened it without our lock file
                raise StoreLocked(_locked_message(self.root, "unknown")) from None
            raise StoreError(f"cannot open the store at {self.path}: {err}") from None
        self._indexed = shard.info().indexed_vectors_count > 0
        return shard

    def _alive(self) -> None:
        if self._closed:
            raise StoreError(f"the store at {self.path} is closed; open it again with open_store")
        if self._pid != os.getpid():
            raise StoreError(f"the store at {self.path} was opened by PID {self._pid} before a fork; open it in "
                             f"this process, or use a Qdrant server (LOOKALIKE_QDRANT_URL) for several processes")

    def _check(self) -> Any:
        self._alive()
        if self._shard is None:
            raise StoreError(f"collection '{self.collection}' does not exist in {self.root}; ingest images first "
                             f"(lookalike backfill) or choose another with --collection/LOOKALIKE_COLLECTION")
        return self._shard

    def close(self) -> None:
        with _REGISTRY_LOCK:
            if self._closed:
                return
            if self._pid != os.getpid():  # the parent's handle in a forked child: leave its files alone
                self._closed = True
                return
            self._refs -= 1
            if self._refs > 0:
                return
            self._closed = True
            if _STORES.get(self.path) is self:
                del _STORES[self.path]
            try:
                if self._shard is not None:
                    self._shard.flush()
                    self._shard.close()
            finally:
                self._shard = None
                self._lock.release()
                if self._lock.refs <= 0:
                    _LOCKS.pop(self._lock.path, None)

    def flush(self) -> None:
        self._alive()
        if self._shard is not None:  # nothing was ever written: nothing to flush
            self._shard.flush()

    def _written(self) -> None:
        if self.sync_writes and not self._bulk_depth:
            self._shard.flush()

    # metadata
    def _read_meta(self) -> None:
        path = self.path / META_FILE
        try:
            self._meta = CollectionMeta.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            self._meta = None
        except (OSError, ValueError, TypeError) as err:
            raise StoreError(f"cannot read {path}: {err}; restore it or move the folder away") from None

    def _write_meta(self, meta: CollectionMeta) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (META_FILE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(meta.to_dict(), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / META_FILE)
        self._meta = meta

    def meta(self) -> CollectionMeta | None:
        return self._meta

    def ensure_collection(self, meta: CollectionMeta) -> CollectionMeta:
        import qdrant_edge as qe

        with _REGISTRY_LOCK:
            self._alive()
            have = self._meta
            if have is not None:
                if have.mismatch(meta):
                    raise CollectionMismatch(_mismatch_message(self.collection, have, meta))
            elif self._shard is not None and self._shard.info().points_count > 0:
                raise CollectionMismatch(f"collection '{self.collection}' at {self.path} holds points but no "
                                         f"{META_FILE}; use --collection/LOOKALIKE_COLLECTION for a separate "
                                         f"collection")
            else:
                self._write_meta(meta)  # before the shard: a crash in between leaves a recoverable state
            if self._shard is None:
                self._shard = self._create(self._meta or meta)
            self._ensure_indexes(qe)
            return self._meta or meta

    def _create(self, meta: CollectionMeta) -> Any:
        import qdrant_edge as qe

        quant = {"int8": lambda: qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True),
                 "binary": lambda: qe.BinaryQuantizationConfig(always_ram=True)}.get(_quantization_kind(self.settings))
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=meta.dim, distance=getattr(qe.Distance, meta.distance)),
            hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT,
                                           full_scan_threshold=FULL_SCAN_THRESHOLD_KB),
            quantization_config=quant() if quant else None,
            # The edge shard never optimizes on its own; a tiny threshold lets optimize(force=True) index any size.
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
        )
        try:
            shard = qe.EdgeShard.create(str(self.path), config)
        except Exception as err:
            raise StoreError(f"cannot create the store at {self.path}: {err}") from None
        log.info("created collection %s at %s (dim %d)", self.collection, self.path, meta.dim)
        return shard

    def _ensure_indexes(self, qe: Any) -> None:
        kinds = {"keyword": qe.PayloadSchemaType.Keyword, "datetime": qe.PayloadSchemaType.Datetime,
                 "integer": qe.PayloadSchemaType.Integer, "float": qe.PayloadSchemaType.Float,
                 "bool": qe.PayloadSchemaType.Bool, "uuid": qe.PayloadSchemaType.Uuid}
        present = set(self._shard.info().payload_schema)
        missing = [(f, kinds[k]) for f, k in PAYLOAD_INDEXES.items() if f not in present]
        for field_name, kind in missing:
            self._shard.update(qe.UpdateOperation.create_field_index(field_name, kind))
        if missing:
            self._shard.flush()

    # data
    def upsert(self, points: Sequence[PointRecord]) -> None:
        import qdrant_edge as qe

        shard = self._check()
        if not points:
            return
        dim = self._dim()
        batch = []
        for p in points:
            pid = _point_id(p.id)
            batch.append(qe.Point(pid, _vector_list(p.vector, dim, pid), dict(p.payload or {})))
        try:
            shard.update(qe.UpdateOperation.upsert_points(batch))
        except Exception as err:
            raise StoreError(f"upsert into '{self.collection}' failed: {err}") from None
        self._written()

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[PointRecord]:
        shard = self._check()
        if not ids:
            return []
        records = shard.retrieve([_point_id(i) for i in ids], True, bool(with_vectors))
        return [PointRecord(_point_id(r.id), _to_array(r.vector) if with_vectors else None, r.payload or {})
                for r in records]

    def set_payload(self, id: str, payload: dict) -> None:
        import qdrant_edge as qe

        shard = self._check()
        pid = _point_id(id)
        try:
            shard.update(qe.UpdateOperation.set_payload([pid], dict(payload)))
        except Exception as err:
            if "No point with id" in str(err):
                raise StoreError(f"no point {pid} in collection '{self.collection}'") from None
            raise StoreError(f"set_payload on '{self.collection}' failed: {err}") from None
        self._written()

    def delete(self, ids: Sequence[str]) -> None:
        import qdrant_edge as qe

        shard = self._check()
        if not ids:
            return
        shard.update(qe.UpdateOperation.delete_points([_point_id(i) for i in ids]))
        self._written()

    def count(self, filter: Filter | None = None) -> int:
        import qdrant_edge as qe

        return int(self._check().count(qe.CountRequest(exact=True, filter=_edge_filter(filter))))

    def scroll(self, filter: Filter | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[PointRecord]:
        import qdrant_edge as qe

        flt = _edge_filter(filter)
        offset: Any = None
        while True:
            records, offset = self._check().scroll(qe.ScrollRequest(
                offset=offset, limit=batch, filter=flt, with_payload=True, with_vector=bool(with_vectors)))
            for r in records:
                yield PointRecord(_point_id(r.id), _to_array(r.vector) if with_vectors else None, r.payload or {})
            if offset is None or not records:
                return

    def _dim(self) -> int:
        if self._meta is None:
            raise StoreError(f"collection '{self.collection}' has no {META_FILE}; call ensure_collection first")
        return self._meta.dim

    def _selective(self, flt: Any) -> bool:
        """Whether a filter matches few enough points to score them all (filtered HNSW lost recall at 1M)."""
        import qdrant_edge as qe

        return self._shard.count(qe.CountRequest(exact=False, filter=flt)) <= EXACT_FILTER_MAX

    def search(self, vectors: np.ndarray, k: int = 10, filter: Filter | None = None,
               min_score: float | None = None, exact: bool = False) -> list[list[Hit]]:
        import qdrant_edge as qe

        shard = self._check()
        queries = self._query_matrix(vectors, self._dim(), k)
        if len(queries) == 0:
            return []
        flt = _edge_filter(filter)
        exact = exact or (self._indexed and flt is not None and filter is not None and bool(filter.must)
                          and self._selective(flt))
        quant = _quantization_kind(self.settings)
        params = qe.SearchParams(
            hnsw_ef=max(HNSW_EF, k), exact=exact,
            quantization=None if quant == "none" else qe.QuantizationSearchParams(
                rescore=True, oversampling=3.0 if quant == "binary" else 2.0))
        requests = [qe.QueryRequest(limit=k, query=qe.Query.Nearest(q.tolist()), filter=flt,
                                    score_threshold=min_score, with_payload=True, params=params) for q in queries]
        results = shard.query_batch(qe.QueryBatchRequest(requests))
        return [[Hit(_point_id(p.id), float(p.score), p.payload or {}) for p in hits] for hits in results]

    def optimize(self, force: bool = False) -> bool:
        shard = self._check()
        n = shard.info().points_count
        if not force and n < self.settings.hnsw_threshold:
            return False
        log.info("building the HNSW index of '%s' over %d points (blocking; ~2 min per 100k on 2 cores)",
                 self.collection, n)
        ran = bool(shard.optimize())
        shard.flush()
        self._indexed = shard.info().indexed_vectors_count > 0
        return ran


def _open_edge(settings: Settings, collection: str) -> EdgeStore:
    root = (Path(settings.data_dir).expanduser() / "qdrant").resolve()
    path = root / collection
    with _REGISTRY_LOCK:
        store = _STORES.get(path)
        if store is not None and not store._closed:
            store._refs += 1
            return store
        lock_path = root / LOCK_FILE
        lock = _LOCKS.get(lock_path) or _DirLock(lock_path)
        try:
            lock.acquire()
        except PermissionError as err:
            raise StoreError(f"cannot create {lock_path}: {err.strerror}; set LOOKALIKE_DATA_DIR to a writable "
                             f"folder") from None
        _LOCKS[lock_path] = lock
        try:
            store = EdgeStore(settings, collection, root, lock)
        except BaseException:
            lock.release()
            if lock.refs <= 0:
                _LOCKS.pop(lock_path, None)
            raise
        _STORES[path] = store
        return store


# --------------------------------------------------------------------------------------------------
# Client: a Qdrant server (or qdrant-client local mode)
# --------------------------------------------------------------------------------------------------

def _redact(url: str) -> str:
    """The URL without credentials or query, safe for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<invalid url>"


class ClientStore(Store):
    """A store over ``qdrant_client.QdrantClient``: a server, or local mode in tests.

    ``ClientStore(QdrantClient(location=":memory:"), "name")`` or ``ClientStore.from_settings(settings)``.
    """

    embedded = False

    def __init__(self, client: Any, collection: str, *, settings: Settings | None = None,
                 url: str | None = None, owns_client: bool = False) -> None:
        self.client = client
        self.collection = collection
        self.settings = settings
        self.where = _redact(url) if url else "the Qdrant client"
        self._owns_client = owns_client
        self._meta: CollectionMeta | None = None
        self._closed = False
        # local mode (tests) warns that payload indexes and search params do nothing there: skip them
        self._local = type(getattr(client, "_client", None)).__name__ == "QdrantLocal"

    @classmethod
    def from_settings(cls, settings: Settings, collection: str | None = None) -> ClientStore:
        from qdrant_client import QdrantClient

        if not settings.qdrant_url:
            raise ConfigError("LOOKALIKE_QDRANT_URL is not set")
        url = settings.qdrant_url
        try:
            client = QdrantClient(url=url, api_key=settings.qdrant_api_key, timeout=CLIENT_TIMEOUT_S,
                                  check_compatibility=False)
        except Exception as err:
            raise ConfigError(f"LOOKALIKE_QDRANT_URL={_redact(url)!r} is not usable: {type(err).__name__}") from None
        return cls(client, collection or settings.collection_name, settings=settings, url=url, owns_client=True)

    def __repr__(self) -> str:
        return f"ClientStore({self.where!r}, {self.collection!r})"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate client/transport exceptions; the API key is never part of what we print."""
        if self._closed:
            raise StoreError(f"the store for '{self.collection}' is closed; open it again with open_store")
        try:
            yield
        except StoreError:
            raise
        except Exception as err:
            raise self._translate(err, what) from None

    def _translate(self, err: Exception, what: str) -> StoreError:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        where, name = self.where, self.collection
        unreachable = f"Qdrant at {where} is unreachable ({what}: {{}}); is the server running? (LOOKALIKE_QDRANT_URL)"
        if isinstance(err, ResponseHandlingException):
            source = getattr(err, "source", None) or err
            return StoreUnavailable(unreachable.format(f"{type(source).__name__}: {source}"))
        if isinstance(err, UnexpectedResponse):
            status = err.status_code
            if status in (401, 403):
                return StoreError(f"Qdrant at {where} refused the request ({status}); check LOOKALIKE_QDRANT_API_KEY")
            if status == 404:
                return StoreError(f"collection '{name}' does not exist at {where}; ingest images first or choose "
                                  f"another with --collection/LOOKALIKE_COLLECTION")
            text = (err.content or b"")[:200].decode("utf-8", "replace")
            if status in (429, 502, 503, 504) or status >= 500:
                return StoreUnavailable(f"Qdrant at {where} answered {status} to {what}: {text}")
            return StoreError(f"Qdrant at {where} rejected {what} ({status}): {text}")
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__.startswith(("httpx", "httpcore")):
            return StoreUnavailable(unreachable.format(f"{type(err).__name__}: {err}"))
        try:
            import grpc
        except ImportError:  # pragma: no cover - grpc ships with qdrant-client
            grpc = None
        if grpc is not None and isinstance(err, grpc.RpcError):
            code = err.code() if hasattr(err, "code") else None
            transient = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED}
            if code in transient:
                return StoreUnavailable(unreachable.format(code))
            if code == grpc.StatusCode.NOT_FOUND:
                return StoreError(f"collection '{name}' does not exist at {where}; ingest images first")
            return StoreError(f"Qdrant at {where} rejected {what}: {code}")
        if isinstance(err, ValueError) and "not found" in str(err):  # local mode
            return StoreError(f"collection '{name}' does not exist; ingest images first or choose another "
                              f"with --collection/LOOKALIKE_COLLECTION")
        return StoreError(f"{what} on '{name}' failed: {type(err).__name__}: {err}")

    @staticmethod
    def _filter(flt: Filter | None) -> Any:
        if flt is None:
            return None
        from qdrant_client import models

        def cond(m: Match) -> Any:
            values = list(m.values)
            if len(values) == 1:
                return models.FieldCondition(key=m.field, match=models.MatchValue(value=values[0]))
            return models.FieldCondition(key=m.field, match=models.MatchAny(any=values))

        must = [cond(m) for m in flt.must]
        must_not: list[Any] = [cond(m) for m in flt.must_not]
        must_not += [models.IsEmptyCondition(is_empty=models.PayloadField(key=k)) for k in flt.non_empty]
        if flt.exclude_ids:
            must_not.append(models.HasIdCondition(has_id=[_point_id(i) for i in flt.exclude_ids]))
        if not must and not must_not:
            return None
        return models.Filter(must=must or None, must_not=must_not or None)

    def meta(self) -> CollectionMeta | None:
        with self._errors("reading the collection"):
            if not self.client.collection_exists(self.collection):
                return None
            info = self.client.get_collection(self.collection)
        self._meta = CollectionMeta.from_dict(getattr(info.config, "metadata", None))
        return self._meta

    def ensure_collection(self, meta: CollectionMeta) -> CollectionMeta:
        from qdrant_client import models

        have = self.meta()
        with self._errors("creating the collection"):
            if have is None and not self.client.collection_exists(self.collection):
                quant = {
                    "int8": lambda: models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, quantile=0.99, always_ram=True)),
                    "binary": lambda: models.BinaryQuantization(
                        binary=models.BinaryQuantizationConfig(always_ram=True)),
                }.get(_quantization_kind(self.settings))
                try:
                    self.client.create_collection(
                        self.collection,
                        vectors_config=models.VectorParams(size=meta.dim, distance=models.Distance(meta.distance)),
                        hnsw_config=models.HnswConfigDiff(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT,
                                                          full_scan_threshold=FULL_SCAN_THRESHOLD_KB),
                        quantization_config=quant() if quant else None,
                        metadata=meta.to_dict(),
                    )
                    have = meta
                except Exception as err:  # lost a creation race with another worker: read theirs
                    if not self.client.collection_exists(self.collection):
                        raise err from None
                    have = self.meta()
            elif have is None:
                if self.client.count(self.collection, exact=True).count > 0:
                    raise CollectionMismatch(
                        f"collection '{self.collection}' at {self.where} holds points but no lookalike metadata; "
                        f"use --collection/LOOKALIKE_COLLECTION for a separate collection")
                self.client.update_collection(self.collection, metadata=meta.to_dict())
                have = meta
            if have is None:
                raise StoreError(f"collection '{self.collection}' at {self.where} has no lookalike metadata")
            if have.mismatch(meta):
                raise CollectionMismatch(_mismatch_message(self.collection, have, meta))
            self._ensure_indexes()
        self._meta = have
        return have

    def _ensure_indexes(self) -> None:
        from qdrant_client import models

        if self._local:
            return
        present = set(self.client.get_collection(self.collection).payload_schema or {})
        for field_name, kind in PAYLOAD_INDEXES.items():
            if field_name not in present:
                self.client.create_payload_index(self.collection, field_name,
                                                 field_schema=models.PayloadSchemaType(kind), wait=True)

    def _dim(self) -> int:
        meta = self._meta or self.meta()
        if meta is None:
            raise StoreError(f"collection '{self.collection}' does not exist at {self.where}; ingest images first "
                             f"or choose another with --collection/LOOKALIKE_COLLECTION")
        return meta.dim

    def upsert(self, points: Sequence[PointRecord]) -> None:
        from qdrant_client import models

        if not points:
            return
        dim = self._dim()
        structs = []
        for p in points:
            pid = _point_id(p.id)
            structs.append(models.PointStruct(id=pid, vector=_vector_list(p.vector, dim, pid),
                                              payload=dict(p.payload or {})))
        with self._errors("upsert"):
            self.client.upsert(self.collection, points=structs, wait=True)

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[PointRecord]:
        if not ids:
            return []
        with self._errors("retrieve"):
            records = self.client.retrieve(self.collection, [_point_id(i) for i in ids], with_payload=True,
                                           with_vectors=bool(with_vectors))
        return [PointRecord(_point_id(r.id), _to_array(r.vector) if with_vectors else None, r.payload or {})
                for r in records]

    def set_payload(self, id: str, payload: dict) -> None:
        pid = _point_id(id)
        with self._errors("set_payload"):
            if not self.client.retrieve(self.collection, [pid], with_payload=False, with_vectors=False):
                raise StoreError(f"no point {pid} in collection '{self.collection}'")
            self.client.set_payload(self.collection, payload=dict(payload), points=[pid], wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids:
            return
        with self._errors("delete"):
            self.client.delete(self.collection, points_selector=models.PointIdsList(
                points=[_point_id(i) for i in ids]), wait=True)

    def count(self, filter: Filter | None = None) -> int:
        with self._errors("count"):
            return int(self.client.count(self.collection, count_filter=self._filter(filter), exact=True).count)

    def scroll(self, filter: Filter | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[PointRecord]:
        flt = self._filter(filter)
        offset: Any = None
        while True:
            with self._errors("scroll"):
                records, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=batch, offset=offset,
                                                     with_payload=True, with_vectors=bool(with_vectors))
            for r in records:
                yield PointRecord(_point_id(r.id), _to_array(r.vector) if with_vectors else None, r.payload or {})
            if offset is None or not records:
                return

    def search(self, vectors: np.ndarray, k: int = 10, filter: Filter | None = None,
               min_score: float | None = None, exact: bool = False) -> list[list[Hit]]:
        from qdrant_client import models

        queries = self._query_matrix(vectors, self._dim(), k)
        if len(queries) == 0:
            return []
        quant = _quantization_kind(self.settings)
        params = None if self._local else models.SearchParams(
            hnsw_ef=max(HNSW_EF, k), exact=exact,
            quantization=None if quant == "none" else models.QuantizationSearchParams(
                rescore=True, oversampling=3.0 if quant == "binary" else 2.0))
        flt = self._filter(filter)
        requests = [models.QueryRequest(query=q.tolist(), limit=k, filter=flt, score_threshold=min_score,
                                        with_payload=True, params=params) for q in queries]
        with self._errors("search"):
            responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[Hit(_point_id(p.id), float(p.score), p.payload or {}) for p in r.points] for r in responses]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with contextlib.suppress(Exception):
                self.client.close()


# --------------------------------------------------------------------------------------------------

class StoreUser:
    """Base for things that work on one collection (the pipeline, the searcher): the store is opened from
    ``settings`` on first use unless one was handed in, and ``close()`` closes only a store opened here."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self._store = store
        self._own_store = store is None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    def check_model(self, model: str) -> CollectionMeta | None:
        """The collection's metadata (None if it does not exist yet); refuses a collection built with another
        model by name alone, so the check costs no model load."""
        meta = self.store.meta()
        if meta is not None and meta.model != model:
            want = CollectionMeta(model=model, dim=meta.dim, preprocessing=meta.preprocessing)
            raise CollectionMismatch(_mismatch_message(self.store.collection, meta, want))
        return meta

    def close(self) -> None:
        if self._store is not None and self._own_store:
            self._store.close()
            self._store = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(settings: Settings, collection: str | None = None) -> Store:
    """The store for ``collection`` (default ``settings.collection_name``): a Qdrant server when
    ``settings.qdrant_url`` is set, else the embedded store under ``settings.data_dir / "qdrant"``.
    Embedded: one shared handle per collection in this process (close() is ref-counted); another process
    holding the data dir raises StoreLocked."""
    name = collection or settings.collection_name
    if not _NAME_RE.match(name):
        raise ConfigError(f"collection name {name!r} is not valid: use letters, digits, '_', '-', '.' "
                          f"(--collection/LOOKALIKE_COLLECTION)")
    if settings.qdrant_url:
        return ClientStore.from_settings(settings, name)
    return _open_edge(settings, name)


__all__ = ["ClientStore", "EdgeStore", "Store", "open_store"]
