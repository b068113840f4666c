"""The embedded backend: ``qdrant-edge-py`` runs the Qdrant engine in this process, one shard folder per
collection under ``<data_dir>/qdrant/<collection>``, the collection metadata in ``lookalike.json`` inside it.

Get stores from ``open_store``: within one process it hands out one shared, ref-counted handle per collection
folder, after taking the data dir's lock (``search.store.lock``).

Background index builds (``search.store.build``): once ``settings.hnsw_threshold`` points are unindexed, a
copy of the shard is optimized by a child process and swapped in, while writes and searches go on. The swap is
recorded by the ``CURRENT`` file naming the generation folder (``gen-NNNNNN``) that holds the shard; without it
the shard is the collection folder itself (every store made before this). Points written after a build sit in
the engine's appendable segment, scored exactly and without quantization, until the next build.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import search.store.base as base
from search.config import Settings
from search.errors import CollectionMismatch, StoreError, StoreLocked
from search.schema import PAYLOAD_INDEXES, CollectionMeta, Filter, Hit, PointRecord
from search.store.aliases import META_FILE, FileAliases
from search.store.base import (
    SearchRequest,
    Store,
    _hit,
    _mismatch_message,
    _payload,
    _point_id,
    _quantization_kind,
    _record,
    _split,
    _vector_list,
)
from search.store.build import BUILDING, CURRENT_FILE, GEN_RE, BackgroundBuilds, engine_entries
from search.store.filters import Spelling, translate
from search.store.lock import LOCK_FILE, REGISTRY, _DirLock, _locked_message

log = logging.getLogger(__name__)

FLUSH_EVERY = 256  # single writes between two full flushes of the shard (each one is also fsynced in the WAL)
# A bulk block ending with fewer points than this written since the last full flush fsyncs the WAL instead of
# flushing the shard: a worker's chunk (or the part of it done before uploads overtook it) is acknowledged
# after its block, and a full flush (~30 ms) per chunk cost the backfill throughput while uploads arrived.
BULK_FLUSH_POINTS = 4096
def sync_wal(folder: Path) -> None:
    """fsync every file of the engine's write-ahead log, and the folder (a new log segment's name)."""
    with os.scandir(folder) as entries:
        names = [e.path for e in entries if e.is_file(follow_symlinks=False)]
    for name in [*names, str(folder)]:
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:  # the engine renamed a pre-allocated segment (tmp-open-N) meanwhile
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _spelling() -> Spelling:
    import qdrant_edge as qe

    return Spelling(
        match_value=lambda key, value: qe.FieldCondition(key=key, match=qe.MatchValue(value)),
        match_any=lambda key, values: qe.FieldCondition(key=key, match=qe.MatchAny(values)),
        is_empty=qe.IsEmptyCondition,
        has_id=lambda ids: qe.HasIdCondition(set(ids)),
        filter=qe.Filter,
    )


def _edge_filter(flt: Filter | None) -> Any:
    return None if flt is None else translate(flt, _spelling())


class EdgeStore(BackgroundBuilds, Store):
    """The embedded store. Get it from ``open_store``: it owns the process-wide lock and sharing."""

    embedded = True

    def __init__(self, settings: Settings, collection: str, root: Path, lock: _DirLock) -> None:
        self.settings = settings
        self.collection = collection
        self.root = root
        self.path = root / collection
        self._lock = lock
        self._refs = 1
        self._unflushed = 0  # single writes since the last full flush (see _written)
        self._pending_points = 0  # points written since the last full flush (see end_bulk)
        self._pid = os.getpid()
        self._closed = False
        self._shard: Any = None
        self._meta: CollectionMeta | None = None
        self._indexed = False
        # _mu guards the shard handle (a swap replaces it) and is held around every engine call; _write_mu
        # is taken first by writers, and by a build's last copy pass and its swap, which must see no write.
        self._mu = threading.RLock()
        self._write_mu = threading.RLock()
        self._building = None  # the running background build (search.store.build)
        self._dirty: set[str] | None = None  # ids written while a build runs (None: no build is tracking)
        self._since_check = 0
        self._next_build_at = 0.0
        self._read_meta()
        self._dir = self._shard_dir()
        if (self._dir / "edge_config.json").exists():
            self._shard = self._load()

    def __repr__(self) -> str:
        return f"EdgeStore({str(self.path)!r})"

    # lifecycle
    def _shard_dir(self) -> Path:
        """The folder of the live shard (see the module docstring), after removing what a crash left behind:
        an unfinished build, or the previous generation of a finished swap."""
        try:
            name = (self.path / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            name = None
        except OSError as err:
            raise StoreError(f"cannot read {self.path / CURRENT_FILE}: {err}") from None
        if name is not None and not (GEN_RE.match(name) and (self.path / name / "edge_config.json").exists()):
            raise StoreError(f"{self.path / CURRENT_FILE} names {name!r}, which holds no shard; restore the "
                             f"folder or remove {CURRENT_FILE} if the shard is in {self.path} itself")
        if self.path.is_dir():
            for entry in self.path.iterdir():
                stale = ((entry.name.endswith(BUILDING) and GEN_RE.match(entry.name.removesuffix(BUILDING)))
                         or (GEN_RE.match(entry.name) and entry.name != name))
                if stale and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
            if name is not None:  # the swap wrote CURRENT, then crashed before removing the old shard
                self._remove_shard(self.path)
        return self.path if name is None else self.path / name

    def _remove_shard(self, folder: Path) -> None:
        if folder == self.path:
            for entry in engine_entries(folder):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)

    def _load(self, folder: Path | None = None) -> Any:
        import qdrant_edge as qe

        try:
            shard = qe.EdgeShard.load(str(folder or self._dir))
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

    def aliases(self) -> FileAliases:
        return FileAliases(self.root)

    @contextlib.contextmanager
    def _using(self) -> Iterator[Any]:
        """The live shard, held against a swap for the duration of one engine call."""
        with self._mu:
            yield self._check()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        with self._write_mu, self._mu:
            yield self._check()

    def close(self) -> None:
        with REGISTRY.mutex:
            if self._closed:
                return
            if self._pid != os.getpid():  # the parent's handle in a forked child: leave its files alone
                self._closed = True
                return
            self._refs -= 1
            if self._refs > 0:
                return
            self._closed = True
            if REGISTRY.stores.get(self.path) is self:
                del REGISTRY.stores[self.path]
            try:
                self._cancel_build()  # before the shard closes: the build's thread still reads it
                with self._write_mu, self._mu:
                    if self._shard is not None:
                        self._shard.flush()
                        self._shard.close()
            finally:
                self._shard = None
                REGISTRY.release(self._lock)

    def flush(self) -> None:
        self._alive()
        with self._mu:
            if self._shard is not None:  # nothing was ever written: nothing to flush
                self._shard.flush()
                self._unflushed = self._pending_points = 0
        self._consider_build(0)  # a bulk() block ends here: index what it wrote, in the background

    def end_bulk(self) -> None:
        """The block's writes made as durable as a single write: the WAL fsynced (~1 ms); the shard's full
        flush only once ``BULK_FLUSH_POINTS`` points wait for one (it bounds the log replayed at open)."""
        if not self.sync_writes or self._pending_points >= BULK_FLUSH_POINTS:
            self.flush()
            return
        self._alive()
        with self._mu:
            if self._shard is not None:
                sync_wal(self._dir / "wal")
        self._consider_build(0)

    def _written(self, ids: Sequence[str]) -> None:
        """Make a single write durable before it returns (call it holding ``_writing``). The engine writes it
        to its write-ahead log first (which already survives a killed process, and is replayed on load);
        fsyncing the log's files makes it survive an OS crash too, for ~1 ms. The engine's own ``flush()``
        also writes the segments out (~30 ms measured), so it runs only every ``FLUSH_EVERY`` writes, to
        bound replay, and when the store closes. A running build learns which ids to carry over."""
        if self._dirty is not None:
            self._dirty.update(ids)
        self._pending_points += len(ids)
        if not self.sync_writes or self._bulk_depth:
            return
        self._unflushed += 1
        if self._unflushed >= FLUSH_EVERY:
            self._shard.flush()
            self._unflushed = self._pending_points = 0
        else:
            sync_wal(self._dir / "wal")

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

        with REGISTRY.mutex, self._write_mu, self._mu:
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
            hnsw_config=qe.HnswIndexConfig(m=base.HNSW_M, ef_construct=base.HNSW_EF_CONSTRUCT,
                                           full_scan_threshold=base.FULL_SCAN_THRESHOLD_KB),
            quantization_config=quant() if quant else None,
            # The edge shard never optimizes on its own; a tiny threshold lets optimize(force=True) index any size.
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
        )
        try:
            shard = qe.EdgeShard.create(str(self._dir), config)
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

        self._check()
        if not points:
            return
        dim = self._dim()
        batch, ids = [], []
        for p in points:
            pid = _point_id(p.id)
            ids.append(pid)
            batch.append(qe.Point(pid, _vector_list(p.vector, dim, pid), dict(p.payload or {})))
        with self._writing() as shard:
            try:
                shard.update(qe.UpdateOperation.upsert_points(batch))
            except Exception as err:
                raise StoreError(f"upsert into '{self.collection}' failed: {err}") from None
            self._written(ids)
        self._consider_build(len(ids))

    def retrieve(self, ids: Sequence[str], with_vectors: bool = False) -> list[PointRecord]:
        self._check()
        if not ids:
            return []
        pids = [_point_id(i) for i in ids]
        with self._using() as shard:
            records = shard.retrieve(pids, True, bool(with_vectors))
        return [_record(r, with_vectors) for r in records]

    def set_payload(self, id: str, payload: dict) -> None:
        import qdrant_edge as qe

        pid = _point_id(id)
        with self._writing() as shard:
            try:
                shard.update(qe.UpdateOperation.set_payload([pid], dict(payload)))
            except Exception as err:
                if "No point with id" in str(err):
                    raise StoreError(f"no point {pid} in collection '{self.collection}'") from None
                raise StoreError(f"set_payload on '{self.collection}' failed: {err}") from None
            self._written([pid])

    def delete(self, ids: Sequence[str]) -> None:
        import qdrant_edge as qe

        self._check()
        if not ids:
            return
        pids = [_point_id(i) for i in ids]
        with self._writing() as shard:
            shard.update(qe.UpdateOperation.delete_points(pids))
            self._written(pids)

    def count(self, filter: Filter | None = None) -> int:
        import qdrant_edge as qe

        flt = _edge_filter(filter)
        with self._using() as shard:
            if flt is None:  # the segments' own tally: 0.01 ms, where an exact count scans (25 ms at 200k points)
                return int(shard.info().points_count)
            return int(shard.count(qe.CountRequest(exact=True, filter=flt)))

    def scroll(self, filter: Filter | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[PointRecord]:
        import qdrant_edge as qe

        flt = _edge_filter(filter)
        offset: Any = None
        while True:
            with self._using() as shard:  # per page: a swap in between keeps every point and its id order
                records, offset = shard.scroll(qe.ScrollRequest(
                    offset=offset, limit=batch, filter=flt, with_payload=True, with_vector=bool(with_vectors)))
            for r in records:
                yield _record(r, with_vectors)
            if offset is None or not records:
                return

    def _dim(self) -> int:
        if self._meta is None:
            raise StoreError(f"collection '{self.collection}' has no {META_FILE}; call ensure_collection first")
        return self._meta.dim

    def _selective(self, flt: Any) -> bool:
        """Whether a filter matches few enough points to score them all (filtered HNSW lost recall at 1M)."""
        import qdrant_edge as qe

        with self._using() as shard:
            return shard.count(qe.CountRequest(exact=False, filter=flt)) <= base.EXACT_FILTER_MAX

    def search_many(self, requests: Sequence[SearchRequest]) -> list[list[list[Hit]]]:
        import qdrant_edge as qe

        self._check()
        quant = _quantization_kind(self.settings)
        batch, sizes = [], []
        for req in requests:
            queries = self._query_matrix(req.vectors, self._dim(), req.k)
            flt = _edge_filter(req.filter)
            exact = req.exact or (self._indexed and flt is not None and req.filter is not None
                                  and bool(req.filter.must) and self._selective(flt))
            params = qe.SearchParams(
                hnsw_ef=max(base.HNSW_EF, req.k), exact=exact,
                quantization=None if quant == "none" else qe.QuantizationSearchParams(
                    rescore=True, oversampling=base.OVERSAMPLING[quant]))
            batch += [qe.QueryRequest(limit=req.k, query=qe.Query.Nearest(q.tolist()), filter=flt,
                                      score_threshold=req.min_score, with_payload=_payload(req.payload), params=params)
                      for q in queries]
            sizes.append(len(queries))
        with self._using() as shard:
            results = shard.query_batch(qe.QueryBatchRequest(batch)) if batch else []
        return _split([[_hit(p) for p in hits] for hits in results], sizes)

    def optimize(self, force: bool = False) -> bool:
        """Build the index now, in this process, blocking (the end of a backfill): a background build that
        is running is stopped first, since this one covers it."""
        self._check()
        with self._using() as shard:
            n = shard.info().points_count
        if not force and n < self.settings.hnsw_threshold:
            return False
        self._cancel_build()
        log.info("building the HNSW index of '%s' over %d points (blocking; ~2 min per 100k on 2 cores)",
                 self.collection, n)
        with self._writing() as shard:
            ran = bool(shard.optimize())
            shard.flush()
            self._indexed = shard.info().indexed_vectors_count > 0
        return ran

def _open_edge(settings: Settings, collection: str) -> EdgeStore:
    """The shared handle for ``collection`` under ``settings.data_dir``, opened (and the lock taken) if needed."""
    root = (Path(settings.data_dir).expanduser() / "qdrant").resolve()
    path = root / collection
    with REGISTRY.mutex:
        store = REGISTRY.stores.get(path)
        if store is not None and not store._closed:
            store._refs += 1
            return store
        lock_path = root / LOCK_FILE
        lock = REGISTRY.locks.get(lock_path) or _DirLock(lock_path)
        try:
            lock.acquire()
        except PermissionError as err:
            raise StoreError(f"cannot create {lock_path}: {err.strerror}; set LOOKALIKE_DATA_DIR to a writable "
                             f"folder") from None
        REGISTRY.locks[lock_path] = lock
        try:
            store = EdgeStore(settings, collection, root, lock)
        except BaseException:
            REGISTRY.release(lock)
            raise
        REGISTRY.stores[path] = store
        return store
