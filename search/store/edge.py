"""The embedded backend: ``qdrant-edge-py`` runs the Qdrant engine in this process, one shard folder per
collection under ``<data_dir>/qdrant/<collection>``, the collection metadata in ``lookalike.json`` inside it.

Get stores from ``open_store``: within one process it hands out one shared, ref-counted handle per collection
folder, after taking the data dir's lock (``search.store.lock``).

Background index builds. The engine builds HNSW only when told (``EdgeShard.optimize()``), and that call holds
the GIL for the whole build (measured: no other Python thread of the process runs, not even a ``sleep``
returning), so a build in a thread would stall every search and write of the process. Instead, once
``settings.hnsw_threshold`` points are unindexed, a writer starts ``_Build``: a thread copies the shard
folder (``sendfile``, GIL released; a last, short pass under the write lock), a niced child process
optimizes the copy, and the thread swaps it in — the points written meanwhile (their ids are tracked) are
copied over from the live shard first, the last few under the write lock. The swap is recorded by the
``CURRENT`` file naming the generation folder (``gen-NNNNNN``) that holds the shard; without it the shard
is the collection folder itself (every store made before this). Points written after a build sit in the
engine's appendable segment, scored exactly and without quantization, until the next build.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
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
from search.store.filters import Spelling, translate
from search.store.lock import LOCK_FILE, REGISTRY, _DirLock, _locked_message

log = logging.getLogger(__name__)

FLUSH_EVERY = 256  # single writes between two full flushes of the shard (each one is also fsynced in the WAL)
# A bulk block ending with fewer points than this written since the last full flush fsyncs the WAL instead of
# flushing the shard: a worker's chunk (or the part of it done before uploads overtook it) is acknowledged
# after its block, and a full flush (~30 ms) per chunk cost the backfill throughput while uploads arrived.
BULK_FLUSH_POINTS = 4096
CURRENT_FILE = "CURRENT"  # names the generation folder holding the live shard; absent: the collection folder
GEN_RE = re.compile(r"^gen-\d{6}$")
BUILDING = ".building"  # suffix of a generation folder still being built (removed when found at open)
OURS = frozenset({META_FILE, META_FILE + ".tmp", CURRENT_FILE, CURRENT_FILE + ".tmp"})  # not the engine's files
CHECK_EVERY = 256  # points written between two looks at how many are unindexed (shard.info())
COPY_PASSES = 3  # unlocked copy passes before the last one under the write lock (each copies what changed)
REPLAY_LOCKED_MAX = 256  # ids written during a build that may be left for the replay under the write lock
MTIME_SLACK_NS = 200_000_000  # file timestamps are coarse (a clock tick): this much before a flush counts as after
RETRY_AFTER_S = 60.0  # after a failed build, no new one before this
# The child that builds the index: only the engine, on a copy nobody else has open; niced so that searches and
# inference in this process keep their CPU (on 2 cores a build otherwise takes both).
_BUILD_CODE = """import os, sys
os.nice(10)
import qdrant_edge as qe
shard = qe.EdgeShard.load(sys.argv[1])
shard.optimize()
shard.flush()
shard.close()
"""


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


def _engine_entries(folder: Path) -> list[Path]:
    """The engine's files and folders in a shard folder (for the collection folder: not ours, no generation)."""
    return sorted(e for e in folder.iterdir()
                  if e.name not in OURS and not GEN_RE.match(e.name.removesuffix(BUILDING)))


def _copy_changed(src: Path, dst: Path, seen: dict[Path, tuple[int, int, int]], flushed_ns: int,
                  stop: threading.Event) -> int:
    """Bring ``dst``, a copy of the shard at ``src``, up to date; what is gone from ``src`` goes. Returns the bytes
    copied. Call it right after the engine's ``flush()`` at ``flushed_ns``: the flush writes the mapped pages out,
    so the next write to a page faults and moves the file's mtime, while further writes to a page already
    dirty do not. A file is therefore copied again when its (size, mtime) changed since ``seen`` recorded it,
    or when that record was itself taken after the file was touched past its pass's flush. Unlocked passes
    race the engine (a file removed meanwhile is skipped); the last pass runs under the write lock."""
    copied = 0
    files: list[Path] = []  # relative to src
    dirs: set[Path] = set()
    for top in _engine_entries(src):
        if top.is_dir():
            for dirpath, _, names in os.walk(top):
                rel = Path(dirpath).relative_to(src)
                dirs.add(rel)
                files += [rel / n for n in names]
        else:
            files.append(top.relative_to(src))
    for rel in sorted(dirs):
        (dst / rel).mkdir(parents=True, exist_ok=True)
    for rel in files:
        if stop.is_set():
            return copied
        try:
            st = (src / rel).stat()
            old = seen.get(rel)
            if old is None or old[:2] != (st.st_size, st.st_mtime_ns) or old[1] >= old[2] - MTIME_SLACK_NS:
                shutil.copyfile(src / rel, dst / rel)  # sendfile: the GIL is released while it copies
                seen[rel] = (st.st_size, st.st_mtime_ns, flushed_ns)
                copied += st.st_size
        except FileNotFoundError:
            continue
    keep = set(files) | dirs
    for dirpath, dnames, fnames in os.walk(dst, topdown=False):
        for name in [*fnames, *dnames]:
            path = Path(dirpath) / name
            if path.relative_to(dst) not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copied


class _Build:
    """One background index build: the thread, its child process, and how to stop them."""

    def __init__(self, store: EdgeStore) -> None:
        self.store = store
        self.stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.committed = False  # the new shard is live: nothing of it may be removed any more
        self.thread = threading.Thread(target=self._run, name=f"lookalike-index-{store.collection}", daemon=True)

    def cancel(self) -> None:
        self.stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # it works on a copy: nothing of the live shard is lost
        self.thread.join()

    def _run(self) -> None:
        store = self.store
        try:
            store._run_build(self)
        except Exception as err:  # a failed build leaves the live shard as it was; retry later
            if not self.stop.is_set():
                log.warning("background index build of '%s' failed: %s", store.collection, err)
                store._next_build_at = time.monotonic() + RETRY_AFTER_S
        finally:
            with store._mu:
                store._dirty = None
                if store._building is self:
                    store._building = None


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
        self._building: _Build | None = None
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
            for entry in _engine_entries(folder):
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

    # background index builds (see the module docstring)
    def building(self) -> bool:
        """Whether a background index build is running."""
        return self._building is not None

    def wait_for_build(self, timeout: float | None = None) -> bool:
        """Wait for a running background build; returns whether none is running any more."""
        build = self._building
        if build is not None:
            build.thread.join(timeout)
        return self._building is None

    def _consider_build(self, written: int) -> None:
        """Start a background build once ``settings.hnsw_threshold`` points are unindexed. Looked at every
        ``CHECK_EVERY`` written points (and when a ``bulk()`` block ends), never inside ``bulk()``: a backfill
        calls ``optimize()`` at its end, and copying the store every few thousand points would be waste."""
        self._since_check += written
        threshold = self.settings.hnsw_threshold
        if (self._bulk_depth or self._building is not None or self._closed or self._shard is None
                or (written and self._since_check < min(CHECK_EVERY, max(1, threshold // 4)))
                or time.monotonic() < self._next_build_at):
            return
        self._since_check = 0
        with self._mu:
            if self._shard is None or self._building is not None:
                return
            info = self._shard.info()
            if info.points_count - info.indexed_vectors_count < threshold:
                return
            log.info("'%s': %d of %d points are not indexed; building the index in the background",
                     self.collection, info.points_count - info.indexed_vectors_count, info.points_count)
            self._building = _Build(self)
            self._building.thread.start()

    def _cancel_build(self) -> None:
        build = self._building
        if build is not None:
            build.cancel()

    def _run_build(self, build: _Build) -> None:
        """Copy, optimize the copy in a child process, carry over what was written meanwhile, swap."""
        gen = max([int(m.group(0)[4:]) for e in self.path.iterdir() if (m := GEN_RE.match(e.name[:10]))] + [0]) + 1
        name = f"gen-{gen:06d}"
        work = self.path / (name + BUILDING)
        work.mkdir()
        started = time.perf_counter()
        try:
            seen: dict[Path, tuple[int, int, int]] = {}
            with self._mu:
                # Ids written from here on are carried over before the swap, whatever the copy caught of them.
                self._dirty = set()
            for _ in range(COPY_PASSES):  # while writes go on; each pass copies what changed since the last
                with self._mu:
                    self._check().flush()
                    flushed = time.time_ns()
                copied = _copy_changed(self._dir, work, seen, flushed, build.stop)
                if build.stop.is_set():
                    return
                if copied < 64 << 20:
                    break
            with self._writing() as shard:  # the last pass sees no write: a consistent set of files
                shard.flush()
                copied = _copy_changed(self._dir, work, seen, time.time_ns(), build.stop)
            log.info("'%s': copied the shard for the build in %.1f s (last pass %.1f MB under the write lock)",
                     self.collection, time.perf_counter() - started, copied / 1e6)
            build.proc = subprocess.Popen([sys.executable, "-c", _BUILD_CODE, str(work)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE)
            if build.stop.is_set():  # cancel() may have looked before the child existed
                build.proc.kill()
            _, err = build.proc.communicate()
            if build.stop.is_set():
                return
            if build.proc.returncode != 0:
                raise StoreError(f"the index build exited with {build.proc.returncode}: "
                                 f"{err.decode(errors='replace').strip()[-500:]}")
            final = self.path / name
            work.rename(final)
            work = final
            new = self._load(final)
            try:
                self._swap(build, new, final)
            except BaseException:
                if not build.committed:
                    new.close()
                raise
            log.info("'%s': background index build done in %.1f s", self.collection, time.perf_counter() - started)
        finally:
            if not build.committed:
                shutil.rmtree(work, ignore_errors=True)

    def _carry_over(self, new: Any, ids: set[str]) -> None:
        """Make ``ids`` in the new shard what they are in the live one (call it holding ``_mu``)."""
        import qdrant_edge as qe

        ids_list = sorted(ids)
        for start in range(0, len(ids_list), 256):
            chunk = ids_list[start:start + 256]
            records = self._check().retrieve(chunk, True, True)
            found = {_point_id(r.id) for r in records}
            points = [qe.Point(_point_id(r.id), _to_list(r.vector), r.payload or {}) for r in records]
            if points:
                new.update(qe.UpdateOperation.upsert_points(points))
            gone = [i for i in chunk if i not in found]
            if gone:
                new.update(qe.UpdateOperation.delete_points(gone))

    def _swap(self, build: _Build, new: Any, folder: Path) -> None:
        while True:  # catch up without the write lock while many ids are pending, then finish under it
            with self._mu:
                if build.stop.is_set() or self._dirty is None:
                    raise StoreError("cancelled")
                if len(self._dirty) <= REPLAY_LOCKED_MAX:
                    break
                pending, self._dirty = self._dirty, set()
                self._carry_over(new, pending)
        with self._writing() as old:
            if build.stop.is_set() or self._dirty is None:
                raise StoreError("cancelled")
            self._carry_over(new, self._dirty)
            new.flush()
            tmp = self.path / (CURRENT_FILE + ".tmp")
            with open(tmp, "w") as fh:
                fh.write(folder.name + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / CURRENT_FILE)  # the commit point: a crash after it opens the new shard
            build.committed = True
            previous, self._shard, self._dir = self._dir, new, folder
            self._dirty = None
            self._unflushed = self._pending_points = 0
            self._indexed = new.info().indexed_vectors_count > 0
        try:  # outside the locks: every engine call takes the live handle under _mu, so the old one is ours
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself
            finally:
                os.close(fd)
            old.close()
            self._remove_shard(previous)
        except Exception as err:  # the swap stands; what is left of the old shard goes at the next open
            log.warning("'%s': removing the previous shard at %s failed: %s", self.collection, previous, err)


def _to_list(vector: Any) -> list[float]:
    if isinstance(vector, dict):  # named vectors: ours is the default (unnamed) one
        vector = vector.get("", next(iter(vector.values()), None))
    return list(vector)


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
