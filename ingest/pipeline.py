"""The one ingestion pipeline: read → hash → (skip known) → decode → embed → tag → upsert.

The CLI backfill runs it in-process in batches (``Pipeline.run``), a Celery worker runs it per event or per
small batch of events (``Pipeline.ingest``), the watcher feeds it new files. Nothing here knows which.

Why this shape:
* Content is recognised by the SHA-256 of its bytes *before* decoding or embedding, so re-running a
  backfill costs one read and one store lookup per file, and a known image arriving from a new path only
  adds that path to ``uris`` (the point ID is derived from the hash: same bytes, same point).
* In ``run`` the decode of batch *i+1* runs in a thread pool while batch *i* is embedded, so decoding and
  upserting hide behind inference (the network releases the GIL).
* Input problems become ``Outcome(status="failed")`` with a one-line reason and the batch goes on; a store
  that cannot be reached raises ``StoreUnavailable`` so callers (workers) can retry the whole batch —
  retrying is safe because every write is keyed by content. Nothing one input holds may fail the others:
  a ref whose strings cannot be stored (``ingest.sources.check_ref``) fails before it is read, any error
  while reading or decoding is that input's, and copies of bytes that fail to decode fail with them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ingest.duplicates import default_threshold, flag_duplicates, nearest_stored
from search.config import Settings, get_settings
from search.errors import ContentLockLost, ImageError, printable
from search.schema import PointRecord, build_payload, point_id, sha256_hex
from search.store import StoreUser

if TYPE_CHECKING:
    from ingest.metrics import IngestMetrics
    from ingest.migrate import Mirror
    from ingest.progress import Progress
    from ingest.removal import Removal
    from ingest.sources import ImageRef
    from search.models import Embedder
    from search.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DRAFT = (448, 448)  # JPEG DCT-domain downscale target: ≥ 2× any input size we use
LOCK_ATTEMPTS = 3  # a batch whose content lock expired mid-write is done again, at most this often


@dataclass
class Outcome:
    """What happened to one input."""

    uri: str
    status: str  # indexed | present | updated | failed
    id: str | None = None
    reason: str | None = None
    permanent: bool = True  # a failure caused by the input itself; retrying will not help
    tags: list[dict[str, Any]] = field(default_factory=list)
    duplicate_of: str | None = None  # the stored point this new image near-duplicates (ingest.duplicates)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Stats:
    indexed: int = 0
    present: int = 0
    updated: int = 0
    failed: int = 0
    failures: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None

    @property
    def total(self) -> int:
        return self.indexed + self.present + self.updated + self.failed

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def add(self, outcome: Outcome) -> None:
        setattr(self, outcome.status, getattr(self, outcome.status) + 1)
        if outcome.status == "failed":
            self.failures.append(outcome)

    def to_dict(self) -> dict[str, Any]:
        return {"indexed": self.indexed, "present": self.present, "updated": self.updated, "failed": self.failed,
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 1),
                "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
                "report": str(self.report) if self.report else None}


@dataclass
class _Item:
    """One input on its way through a batch."""

    ref: ImageRef
    outcome: Outcome
    sha: str | None = None
    size: int = 0
    data: bytes | None = None
    prepared: Future[Any] | None = None


def default_content_lock(settings: Settings) -> Callable[[Sequence[str]], AbstractContextManager[Any]] | None:
    """The content lock every writer of a Qdrant server takes, from the ``lookalike.locks`` entry point (the
    workers component: Redis at LOOKALIKE_BROKER_URL); None on the embedded store, which admits one process."""
    if settings.embedded:
        return None
    from importlib.metadata import entry_points

    for ep in entry_points(group="lookalike.locks"):
        lock = ep.load()(settings)
        if lock is not None:
            return lock  # type: ignore[no-any-return]
    log.warning("several writers on one Qdrant server need LOOKALIKE_BROKER_URL (Redis) for the content lock; "
                "without it, concurrent writes of the same image can lose a uri or label")
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _merge(existing: Sequence[str] | None, new: Iterable[str]) -> list[str]:
    out = list(existing or [])
    out.extend(x for x in new if x not in out)
    return out


class Pipeline(StoreUser):
    """Ingest images into the store. Open once, feed many batches, ``close()`` at the end."""

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 embedder: Embedder | None = None, source: str = "backfill", tagger: Any = True,
                 content_lock: Callable[[Sequence[str]], AbstractContextManager[Any]] | None = None,
                 duplicate_threshold: float | None = None, metrics: IngestMetrics | None = None) -> None:
        """``content_lock(point_ids)`` guards read-merge-write of those points against other *processes*
        (workers sharing a Qdrant server); ``ingest`` holds it from the lookup to the upsert. The embedded
        store needs none: it admits one process. ``duplicate_threshold``: cosine at or above which a new image
        gets ``duplicate_of`` (default: the one measured for the model, see ``ingest.duplicates``; none
        measured, no flag). ``metrics`` (``ingest.metrics``): where ``run`` records stage times, batch sizes and
        outcomes, and where the model's load time goes; callers of ``ingest`` record their own (they know
        the lane, and when the points became durable)."""
        super().__init__(settings or get_settings(), store)
        self.metrics = metrics
        self.source = source
        self._duplicate_threshold = duplicate_threshold
        # Every writer of a Qdrant server takes the same lock (entry point lookalike.locks: Redis), not only
        # the workers: backfill, watch and serve merge uris into the same points.
        self._content_lock = content_lock if content_lock is not None else default_content_lock(self.settings)
        self._holding = False  # this call already holds the lock for its ids (ingest): inner sections skip it
        self._embedder = embedder
        self._tagger_opt = tagger
        self._tagger: Any = None
        self._checked = False
        self._exists: bool | None = None  # does the collection exist yet? (nothing to look up if not)
        threads = max(1, min(4, (os.cpu_count() or 2)))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lookalike-decode")
        self._mirror: Mirror | None = None

    # -- lazily opened parts -------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        """The model loads only when an image actually needs embedding (re-runs never pay for it)."""
        if self._embedder is None:
            from search.models import get_embedder

            store = self.store  # opening it resolves the alias: its collection's model is the one to load
            t0 = time.perf_counter()
            self._embedder = get_embedder(self.settings.model, self.settings)
            if self.metrics is not None:
                self.metrics.model_load.observe(time.perf_counter() - t0)
        else:
            store = self.store
        if not self._checked:
            store.ensure_collection(self._embedder.meta())
            if self.settings.alias:  # a new store's collection becomes what the alias names
                store.aliases().ensure(self.settings.alias, store.collection)
            self._checked = self._exists = True
        return self._embedder

    def _check_cheap(self) -> None:
        """Refuse a collection built with another model before reading anything, without loading the model.
        Once the full check has passed (``embedder``), it is not repeated: on a server it costs round trips
        per call, and workers call ``ingest`` per event."""
        if self._checked:
            return
        _ = self.store  # resolves the alias first
        model = self._embedder.name if self._embedder is not None else self.settings.model
        self._exists = self._exists or self.check_model(model) is not None

    @property
    def tagger(self) -> Any:
        if self._tagger is None and self._tagger_opt:
            if self._tagger_opt is True:
                from ingest.tagging import Tagger

                self._tagger = Tagger(self.store, self.embedder, self.settings)
            else:
                self._tagger = self._tagger_opt
        return self._tagger

    # -- stages ------------------------------------------------------------------------------------
    def _read(self, ref: ImageRef) -> _Item:
        from ingest.sources import check_ref
        from search.reading import TRANSIENT_ERRNOS, read_bytes

        item = _Item(ref=ref, outcome=Outcome(uri=ref.uri, status="failed"))
        t0 = time.perf_counter()
        try:
            if (problem := check_ref(ref)) is not None:  # the store would refuse its payload, and the batch's
                raise ImageError(ref.uri, problem)
            data = read_bytes(ref.uri, self.settings)
        except ImageError as err:
            item.outcome.reason = err.reason
            item.outcome.permanent = not err.transient  # a server error or timeout is retried by workers
        except OSError as err:  # anything read_bytes did not classify
            item.outcome.reason = printable(f"cannot read: {err.strerror or err}")
            item.outcome.permanent = err.errno not in TRANSIENT_ERRNOS
        except Exception as err:  # a reader bug must not fail the other inputs of the batch
            item.outcome.reason = printable(f"cannot read: {type(err).__name__}: {err}")
        else:
            item.data, item.size, item.sha = data, len(data), sha256_hex(data)
            item.outcome.id = point_id(item.sha)
        item.outcome.timings["read"] = time.perf_counter() - t0
        return item

    def _decode(self, item: _Item) -> tuple[Any, bool, dict[str, Any]]:
        """Decode (and prepare, once the model is loaded) one image; runs in the decode threads."""
        from search.images import decode_for

        t0 = time.perf_counter()
        assert item.data is not None
        embedder = self._embedder
        decoded = decode_for(self.settings, item.data, item.ref.uri,
                             draft=(embedder.draft_size if embedder is not None else None) or DEFAULT_DRAFT)
        t1 = time.perf_counter()
        prepared = embedder.prepare(decoded.image) if embedder is not None else decoded.image
        item.outcome.timings["decode"] = time.perf_counter() - t0
        item.outcome.timings["prepare"] = time.perf_counter() - t1
        item.data = None  # bytes are no longer needed: keep memory flat on long runs
        info = {"width": decoded.width, "height": decoded.height, "format": decoded.format}
        return prepared, embedder is not None, info

    def _classify(self, items: list[_Item], pending: dict[str, dict[str, Any]]) -> list[_Item]:
        """Mark known content present/updated (merging uris and labels); return the items to embed."""
        readable = [it for it in items if it.sha is not None]
        ids = list(dict.fromkeys(it.outcome.id for it in readable if it.outcome.id not in pending))
        t0 = time.perf_counter()
        if ids and not self._exists:  # another process may have created the collection since we looked
            self._exists = self.store.meta() is not None
        with self._guard(ids):  # read-merge-write of known points (the lookup, then the merges below)
            new = self._merge_known(readable, ids, pending)
        elapsed = time.perf_counter() - t0
        for it in readable:
            it.outcome.timings["lookup"] = elapsed / max(1, len(readable))
        return new

    def _merge_known(self, readable: list[_Item], ids: list[str], pending: dict[str, dict[str, Any]]) -> list[_Item]:
        known = {p.id: p.payload for p in self.store.retrieve(ids)} if ids and self._exists else {}
        merges: dict[str, dict[str, Any]] = {}
        new: list[_Item] = []
        for it in readable:
            pid = it.outcome.id
            assert pid is not None
            payload = pending.get(pid) or merges.get(pid) or known.get(pid)
            if payload is None:  # first sight of these bytes: embed it, and let later copies merge into it
                payload = {"uris": [it.ref.uri], "labels": list(dict.fromkeys(it.ref.labels))}
                pending[pid] = payload
                it.outcome.status = "indexed"
                new.append(it)
                continue
            if pid in pending:  # a copy of bytes not stored yet: it shares their fate if they fail to decode
                pending[pid].setdefault("followers", []).append(it)
            uris = _merge(payload.get("uris"), [it.ref.uri])
            labels = _merge(payload.get("labels"), it.ref.labels)
            if uris != list(payload.get("uris") or []) or labels != list(payload.get("labels") or []):
                payload["uris"], payload["labels"] = uris, labels
                if pid not in pending:
                    merges[pid] = payload
                it.outcome.status = "updated"
            else:
                it.outcome.status = "present"
        for pid, payload in merges.items():
            self.store.set_payload(pid, {"uris": payload["uris"], "labels": payload["labels"]})
            self.mirror.set_payload(pid, {"uris": payload["uris"], "labels": payload["labels"]})
        return new

    def _embed_and_store(self, new: list[_Item], pending: dict[str, dict[str, Any]]) -> None:
        """Wait for decodes, embed the good ones in one batch, tag, upsert."""
        decoded: list[tuple[_Item, Any, bool, dict[str, Any]]] = []
        for it in new:
            assert it.prepared is not None
            try:
                prepared, is_prepared, info = it.prepared.result()
            except Exception as err:  # ImageError, or a decoder bug: this file's failure, never the batch's
                reason = err.reason if isinstance(err, ImageError) else f"cannot decode: {type(err).__name__}: {err}"
                it.outcome.status, it.outcome.reason = "failed", printable(reason)
                # Other copies of these bytes (this call or a later batch) merged into this point: they fail
                # too, with the same reason, rather than report an "updated" point that was never stored.
                for follower in pending.pop(it.outcome.id or "", {}).get("followers", []):
                    follower.outcome.status, follower.outcome.reason = "failed", it.outcome.reason
                continue
            decoded.append((it, prepared, is_prepared, info))
        if not decoded:
            return
        embedder = self.embedder  # loads the model on the first batch that has something to embed
        good = [(it, p if ready else embedder.prepare(p), info) for it, p, ready, info in decoded]
        t0 = time.perf_counter()
        vectors = embedder.embed_prepared([p for _, p, _ in good])
        t_embed = (time.perf_counter() - t0) / len(good)
        ids = [it.outcome.id for it, _, _ in good]
        tags: list[list[dict[str, Any]]] = [[] for _ in good]
        nearest: list[Any] = [None] * len(good)
        threshold = self._duplicate_threshold
        if threshold is None:
            threshold = default_threshold(embedder.name, embedder.preprocessing)
        t0 = time.perf_counter()
        # the near-duplicate check rides on the tagger's one batched search (no query of its own)
        if self.tagger is not None and threshold is not None:
            tags, nearest = self.tagger.tag_with_nearest(vectors, exclude_ids=ids)
        elif self.tagger is not None:
            tags = self.tagger.tag(vectors, exclude_ids=ids)
        elif threshold is not None:
            nearest = nearest_stored(self.store, vectors, ids)
        duplicate_of = flag_duplicates(vectors, ids, nearest, threshold)
        t_tag = (time.perf_counter() - t0) / len(good)
        now = _now()
        points = []
        for (it, _, info), vector, tag, dup in zip(good, vectors, tags, duplicate_of, strict=True):
            pid = it.outcome.id
            assert pid is not None
            shared = pending.pop(pid)  # later copies in this run merged their uris/labels here
            payload = build_payload(sha256=it.sha or "", uris=shared["uris"], source=it.ref.source or self.source,
                                    **info, size=it.size, ingested_at=now, labels=shared["labels"], tags=tag,
                                    model=embedder.name, duplicate_of=dup)
            points.append(PointRecord(id=pid, vector=vector, payload=payload))
            it.outcome.tags, it.outcome.duplicate_of = tag, dup
            it.outcome.timings.update(embed=t_embed, tag=t_tag)
        t0 = time.perf_counter()
        with self._guard([p.id for p in points]) as locked:
            if locked:  # another writer may have stored these bytes since our lookup: keep its uris and labels
                self._keep_concurrent(points)
            self.store.upsert(points)
        self.mirror.upsert(points)
        t_up = (time.perf_counter() - t0) / len(points)
        for it, _, _ in good:
            it.outcome.timings["upsert"] = t_up

    def _submit_decodes(self, new: list[_Item]) -> None:
        # The model is not loaded here: a batch whose files all fail to decode (a re-run over known-bad
        # files) never pays for it. The first batch is prepared on this thread; later ones in the pool.
        for it in new:
            it.prepared = self._pool.submit(self._decode, it)

    # -- entry points ------------------------------------------------------------------------------
    def ingest(self, refs: Sequence[ImageRef]) -> list[Outcome]:
        """Ingest one small batch synchronously; outcomes in input order."""
        self._check_cheap()
        for attempt in range(LOCK_ATTEMPTS):
            items = list(self._pool.map(self._read, refs))
            ids = sorted({it.outcome.id for it in items if it.outcome.id})
            try:
                with self._guard(ids):  # held from the lookup to the upsert: one critical section per batch
                    pending: dict[str, dict[str, Any]] = {}
                    new = self._classify(items, pending)
                    self._submit_decodes(new)
                    self._embed_and_store(new, pending)
                break
            except ContentLockLost as err:  # redo it: merging the same uris again changes nothing else
                if attempt == LOCK_ATTEMPTS - 1:
                    raise
                log.warning("%s (attempt %d)", err, attempt + 1)
        return [it.outcome for it in items]

    def run(self, refs: Iterable[ImageRef], *, progress: bool = False, report: Path | None = None,
            total: int | None = None, lane: str = "cli") -> Stats:
        """Ingest everything in ``refs`` in batches, overlapping decode with inference. Outcomes are counted
        under ``lane`` when the pipeline has metrics."""
        from ingest.progress import Progress

        self._check_cheap()
        stats = Stats()
        start = time.perf_counter()
        bar = Progress(total, enabled=progress)
        pending: dict[str, dict[str, Any]] = {}
        in_flight: deque[tuple[list[_Item], list[_Item]]] = deque()
        report_file = None
        bulk = self.store.bulk()  # one flush at the end, not per batch: a re-run redoes anything unflushed
        bulk.__enter__()
        try:
            for chunk in chunked(refs, self.settings.batch_size):
                items = list(self._pool.map(self._read, chunk))
                new = self._classify(items, pending)
                self._submit_decodes(new)
                in_flight.append((items, new))
                if len(in_flight) > 1:  # keep one batch decoding while the previous one is embedded
                    report_file = self._finish(*in_flight.popleft(), pending, stats, bar, report, report_file, lane)
            while in_flight:
                report_file = self._finish(*in_flight.popleft(), pending, stats, bar, report, report_file, lane)
        finally:
            bar.close()
            if report_file is not None:
                report_file.close()
            bulk.__exit__(None, None, None)
            stats.seconds = time.perf_counter() - start
        if stats.indexed and self.store.optimize():
            log.info("built the HNSW index for %d points", self.store.count())
        stats.report = report if stats.failed else None
        return stats

    def _finish(self, items: list[_Item], new: list[_Item], pending: dict[str, dict[str, Any]], stats: Stats,
                bar: Progress, report: Path | None, report_file: Any, lane: str) -> Any:
        self._embed_and_store(new, pending)
        if self.metrics is not None:
            self.metrics.observe_batch([it.outcome for it in items])
            for it in items:
                self.metrics.count(lane, it.outcome.status)
        for it in items:
            stats.add(it.outcome)
            for stage, secs in it.outcome.timings.items():
                stats.stage_seconds[stage] = stats.stage_seconds.get(stage, 0.0) + secs
            if it.outcome.status == "failed":
                line = f"skipping {printable(it.ref.uri)}: {printable(it.outcome.reason)}"
                if bar.disable:
                    log.warning(line)
                else:
                    bar.write(line)
                if report is not None:
                    if report_file is None:
                        report.parent.mkdir(parents=True, exist_ok=True)
                        report_file = report.open("w", encoding="utf-8")
                        report_file.write("uri\treason\n")
                    # printable escapes tabs and newlines: a name cannot add a column or a row
                    report_file.write(f"{printable(it.ref.uri)}\t{printable(it.outcome.reason)}\n")
                    report_file.flush()
        bar.update(len(items), failed=sum(it.outcome.status == "failed" for it in items))
        return report_file

    @contextlib.contextmanager
    def _guard(self, ids: Sequence[str]) -> Iterator[bool]:
        """The content lock for ``ids`` unless this call already holds it; yields whether it was taken here."""
        if self._content_lock is None or not ids or self._holding:
            yield False
            return
        with self._content_lock(ids):
            self._holding = True
            try:
                yield True
            finally:
                self._holding = False

    def _keep_concurrent(self, points: list[PointRecord]) -> None:
        """Merge into new points the uris and labels a concurrent writer stored for the same bytes meanwhile."""
        for other in self.store.retrieve([p.id for p in points]):
            mine = next(p for p in points if p.id == other.id)
            mine.payload["uris"] = _merge(other.payload.get("uris"), mine.payload["uris"])
            mine.payload["labels"] = _merge(other.payload.get("labels"), mine.payload["labels"])

    @property
    def mirror(self) -> Mirror:
        """Repeats this pipeline's writes into a new model's collection while a migration runs."""
        if self._mirror is None:
            from ingest.migrate import Mirror

            self._mirror = Mirror(self.settings, self.store)
        return self._mirror

    @property
    def content_lock(self) -> Callable[[Sequence[str]], AbstractContextManager[Any]] | None:
        """The lock every writer of this pipeline's store takes around read-merge-write of point ids."""
        return self._content_lock

    def forget(self, uris: Sequence[str]) -> list[Removal]:
        """Remove these locations from the index (a point left without one is deleted): ``op: delete``."""
        from ingest.removal import forget_uris

        return self._remove(forget_uris, uris)

    def delete_ids(self, ids: Sequence[str]) -> list[Removal]:
        """Delete points by id, whatever their uris."""
        from ingest.removal import delete_ids

        return self._remove(delete_ids, ids)

    def _remove(self, how: Callable[..., list[Removal]], targets: Sequence[str]) -> list[Removal]:
        """``how(store, targets, lock=…)`` under the content lock, repeated in a migration's new collection."""
        from ingest.removal import Removal

        if not targets or not self._collection_exists():
            return [Removal(t, "absent") for t in targets]
        removals = how(self.store, targets, lock=self._content_lock)
        self.mirror.forget(removals)
        return removals

    def _collection_exists(self) -> bool:
        self._exists = self._exists or self.store.meta() is not None
        return bool(self._exists)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._mirror is not None:
            self._mirror.close()
        super().close()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items (the last one shorter) from any iterable, lazily."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


__all__ = ["Outcome", "Pipeline", "Stats", "chunked"]
