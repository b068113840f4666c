"""The server's work without HTTP: load the model, answer queries, ingest uploads, report readiness.

``Service`` owns one ``Searcher`` and, on the embedded store or without a broker, one ``Pipeline`` sharing
the searcher's store and model (the store admits one process; this is it). Queries are embedded through
``MicroBatcher``s, so concurrent requests share model calls. Writes (uploads, watched folders) take turns
under one lock: the pipeline merges a point's ``uris``/``labels`` by read-modify-write.

Every method is synchronous and may block (the API calls them from worker threads). A query that cannot
be served becomes an answer with an ``error``; only a request that is wrong as a whole raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.metrics import STORED
from search.errors import ImageError, LookalikeError, ModelError, StoreError
from search.images import decode_for
from search.reading import read_bytes
from search.schema import Filter, point_id, sha256_hex
from workers.serve.batching import MicroBatcher
from workers.serve.metrics import Metrics
from workers.serve.thumbs import Thumbnails

if TYPE_CHECKING:
    from ingest.pipeline import Outcome, Pipeline
    from search.models import Embedder
    from search.query import Searcher
    from search.store import Store
    from workers.serve.settings import ServeSettings

log = logging.getLogger("workers.serve")

EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
              "TIFF": ".tif"}
MAX_LABELS, MAX_TEXT = 64, 256


class RequestError(LookalikeError):
    """A request that is wrong as a whole: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    """One query of a search request. ``data``: the bytes of an uploaded image."""

    kind: str  # image | url | text | id
    query: str
    data: bytes | None = None


def clean_text(value: str, what: str) -> str:
    """A label or source: stripped, non-empty, at most 256 characters, no control characters."""
    text = value.strip()
    if not text or len(text) > MAX_TEXT or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):  # C0, DEL, C1
        raise RequestError(422, f"{what} {value[:40]!r} must be 1-{MAX_TEXT} printable characters")
    return text


def valid_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise RequestError(400, f"{value[:64]!r} is not a point id (a UUID such as "
                                "'0f8fad5b-d9cb-469f-a165-70867728950e')") from None


class Service:
    def __init__(self, settings: ServeSettings, *, embedder: Embedder | None = None, store: Store | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self._given_embedder, self._given_store = embedder, store
        self.metrics = metrics or Metrics(self._count_points)
        self.thumbs = Thumbnails(settings, settings.thumbnail_cache)
        self.searcher: Searcher | None = None
        self._model: Embedder | None = None
        self.pipeline: Pipeline | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._write_lock = threading.Lock()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="lookalike-upload")
        self._batchers: dict[str, MicroBatcher] = {}
        self._celery: Any = None
        self._exists = False

    # -- start-up -------------------------------------------------------------------------------------
    def start(self, *, wait: bool = False) -> None:
        """Load the model and open the store in the background (``/healthz`` answers meanwhile)."""
        thread = threading.Thread(target=self._load, name="lookalike-serve-load", daemon=True)
        thread.start()
        if wait:
            thread.join()

    def _load(self) -> None:
        from search.models import get_embedder
        from search.query import Searcher
        from search.store import resolve

        try:
            t0 = time.perf_counter()
            # The alias names the collection and its model (after `lookalike migrate`, the new one).
            settings = self.settings if self._given_store is not None else resolve(self.settings)
            embedder = self._given_embedder or get_embedder(settings.model, settings)
            searcher = Searcher(settings, store=self._given_store, embedder=embedder)
            searcher.requested = self.settings
            searcher.check_model(embedder.name)  # a collection of another model is refused now, not per query
            self._exists = searcher.store.meta() is not None
            self._serve_with(searcher, embedder)
            log.info("serving %s (%d-d) from %s in %.1f s", embedder.name, embedder.dim,
                     self.settings.qdrant_url or "the embedded store", time.perf_counter() - t0)
            if self._given_store is None:
                threading.Thread(target=self._follow, name="lookalike-serve-alias", daemon=True).start()
        except LookalikeError as err:
            self.error = str(err)
            log.error("cannot serve: %s", err)
        except Exception as err:  # a model or store bug: /readyz says so instead of a dead thread
            self.error = f"{type(err).__name__}: {err}"
            log.exception("cannot serve")
        finally:
            self._ready.set()

    def _serve_with(self, searcher: Searcher, embedder: Embedder) -> None:
        """Batchers and the upload pipeline for this searcher's collection and model (swapped as a whole)."""
        wait = self.settings.batch_wait_ms / 1000
        old = self._batchers
        self._batchers = {
            "image": MicroBatcher(embedder.embed_prepared, max_batch=self.settings.batch_size, wait=wait,
                                  name="image", observe=self._observer("image")),
            "text": MicroBatcher(embedder.embed_texts, max_batch=self.settings.batch_size, wait=wait,
                                 name="text", observe=self._observer("text")),
            # No wait of its own: what arrives while one store call runs goes into the next (8 queries in
            # one call took 9.9 ms here, in 8 calls 21 ms).
            "search": MicroBatcher(self._search_batch(searcher), max_batch=64, wait=0.0, name="search"),
        }
        if not self.settings.publishes_events:
            from ingest.pipeline import Pipeline

            with self._write_lock:
                previous, self.pipeline = self.pipeline, Pipeline(searcher.settings, store=searcher.store,
                                                                  embedder=embedder, source="upload")
            if previous is not None:
                previous.close()
        self._model, self.searcher = embedder, searcher
        for batcher in old.values():
            batcher.close()

    def _search_batch(self, searcher: Searcher) -> Any:
        """The search batcher's function: items ``(vector, k, filter, min_score)``, grouped by their parameters
        so each group is one store call; one list of hits per item, in order."""
        def run(items: Sequence[tuple[np.ndarray, int, Filter | None, float | None]]) -> list[Any]:
            groups: dict[tuple[int, Filter | None, float | None], list[int]] = {}
            for n, (_, k, flt, min_score) in enumerate(items):
                groups.setdefault((k, flt, min_score), []).append(n)
            out: list[Any] = [None] * len(items)
            for (k, flt, min_score), members in groups.items():
                hits = self._timed("search", searcher.by_vectors, np.stack([items[n][0] for n in members]), k=k,
                                   filter=flt, min_score=min_score)
                for n, found in zip(members, hits, strict=True):
                    out[n] = found
            return out

        return run

    def _follow(self, every: float = 2.0) -> None:
        """Follow the alias: after `lookalike migrate` switches it, serve the new collection and model."""
        while not self._closed.wait(every):
            searcher = self.searcher
            try:
                if searcher is not None and searcher.follow_alias():
                    assert searcher._embedder is not None
                    self._serve_with(searcher, searcher._embedder)
                    self._exists = True
                    log.info("the alias now names %s (%s): serving it", searcher.store.collection,
                             searcher.settings.model)
            except LookalikeError as err:
                log.warning("cannot follow the alias yet: %s", err)

    def _observer(self, kind: str) -> Any:
        def observe(size: int, seconds: float) -> None:
            self.metrics.batch.labels(kind).observe(size)
            self.metrics.embed.labels(kind).observe(seconds)

        return observe

    def _searcher(self) -> Searcher:
        if not self._ready.wait(self.settings.request_timeout):
            raise RequestError(503, "the model is still loading; try again in a moment (GET /readyz)")
        if self.searcher is None:
            raise RequestError(503, f"cannot serve: {self.error}")
        return self.searcher

    @property
    def model(self) -> Embedder:
        """The loaded model (waits for the start-up load; 503 while it is still loading)."""
        self._searcher()
        assert self._model is not None
        return self._model

    def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"model": "loading" if not self._ready.is_set() else (self.error or "ok")}
        if self.searcher is not None:
            try:
                self._timed("meta", self.searcher.store.meta)  # answers on an empty store too
                checks["store"] = "ok"
            except LookalikeError as err:
                checks["store"] = str(err)
        if self.settings.broker_url:
            checks["broker"] = self._ping_broker()
        checks["ready"] = all(v == "ok" for k, v in checks.items())
        return checks

    def _ping_broker(self) -> str:
        try:
            import redis

            redis.Redis.from_url(self.settings.broker, socket_timeout=2, socket_connect_timeout=2).ping()
            return "ok"
        except Exception as err:
            return f"unreachable ({type(err).__name__})"

    def _count_points(self) -> tuple[str, float] | None:
        if self.searcher is None:
            return None
        store = self.searcher.store
        try:
            return store.collection, (float(store.count()) if self._collection_exists() else 0.0)
        except LookalikeError:
            return None

    def _collection_exists(self) -> bool:
        if not self._exists and self.searcher is not None:
            self._exists = self.searcher.store.meta() is not None
        return self._exists

    # -- queries ---------------------------------------------------------------------------------------
    def search(self, queries: Sequence[Query], *, k: int, filter: Filter | None, min_score: float | None) \
            -> list[dict[str, Any]]:
        """One answer per query, in order: ``{"query", "kind", "results": [...]}`` plus ``"error"`` when that
        query could not be served (unreadable image, unknown id, text on an image-only model…)."""
        searcher = self._searcher()
        answers: list[dict[str, Any]] = [{"query": q.query, "kind": q.kind} for q in queries]
        if not self._collection_exists():
            reason = (f"collection '{searcher.store.collection}' is empty; run `lookalike backfill` or upload "
                      "images first")
            return [{**a, "error": reason, "results": []} for a in answers]
        pending = [(i, self._embed_one(q)) for i, q in enumerate(queries) if q.kind != "id"]
        vectors: list[tuple[int, np.ndarray]] = []
        for i, item in pending:
            try:
                vectors.append((i, _result(item)))
            except (ImageError, ModelError) as err:
                answers[i]["error"] = err.reason if isinstance(err, ImageError) else str(err)
        if vectors:  # through the search batcher: queries of concurrent requests share one store call
            batcher = self._batchers["search"]
            pending = [(i, batcher.submit((v, k, filter, min_score))) for i, v in vectors]
            for i, found in pending:
                answers[i]["results"] = [h.to_dict() for h in found.result()]
        ids = [(i, q.query) for i, q in enumerate(queries) if q.kind == "id"]
        if ids:
            self._by_ids(searcher, ids, answers, k=k, filter=filter, min_score=min_score)
        for a in answers:
            a.setdefault("results", [])
        return answers

    def _embed_one(self, q: Query) -> Any:
        """A future of the query's vector, or the ImageError/ModelError that stops it (raised by ``_result``)."""
        embedder = self.model
        try:
            if q.kind == "text":
                if not embedder.supports_text:
                    embedder.embed_texts([q.query])  # raises the model's own "images only" message
                return self._batchers["text"].submit(q.query)
            data = q.data if q.data is not None else read_bytes(q.query, self.settings)
            image = decode_for(self.settings, data, q.query, draft=embedder.draft_size).image
            return self._batchers["image"].submit(embedder.prepare(image))
        except (ImageError, ModelError) as err:
            return err

    def _by_ids(self, searcher: Searcher, ids: list[tuple[int, str]], answers: list[dict[str, Any]], *, k: int,
                filter: Filter | None, min_score: float | None) -> None:
        found = {p.id: p for p in self._timed("retrieve", searcher.store.retrieve, [q for _, q in ids],
                                                with_vectors=True)}
        base = filter or Filter()
        for i, pid in ids:
            point = found.get(pid)
            if point is None or point.vector is None:
                answers[i]["error"] = f"no point with id {pid}"
                continue
            flt = Filter(must=base.must, must_not=base.must_not, non_empty=base.non_empty,
                         exclude_ids=(*base.exclude_ids, pid))
            hits = self._timed("search", searcher.by_vectors, np.asarray([point.vector]), k=k, filter=flt,
                               min_score=min_score)
            answers[i]["results"] = [h.to_dict() for h in hits[0]]

    def _timed(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.metrics.store.labels(op).observe(time.perf_counter() - t0)

    def point(self, pid: str) -> dict[str, Any] | None:
        searcher = self._searcher()
        if not self._collection_exists():
            return None
        points = self._timed("retrieve", searcher.store.retrieve, [valid_id(pid)])
        return {"id": points[0].id, "payload": points[0].payload} if points else None

    def thumbnail(self, pid: str, size: int) -> bytes | None:
        point = self.point(pid)
        return self.thumbs.get(point["payload"], size) if point is not None else None

    def collection(self) -> dict[str, Any]:
        searcher, embedder = self._searcher(), self.model
        return {"collection": searcher.store.collection, "model": embedder.name, "dim": embedder.dim,
                "preprocessing": embedder.preprocessing, "points": int((self._count_points() or ("", 0))[1]),
                "supports_text": bool(embedder.supports_text), "fetch_urls": self.settings.fetch_urls,
                "store": "server" if self.settings.qdrant_url else "embedded",
                "uploads": "events" if self.settings.publishes_events else "in-process"}

    # -- uploads ---------------------------------------------------------------------------------------
    def upload(self, data: bytes, filename: str, *, labels: Sequence[str] = (), source: str | None = None,
               wait: bool = True, k: int = 10) -> tuple[int, dict[str, Any]]:
        """Store the upload under the uploads folder and ingest it; (HTTP status, body)."""
        from ingest.sources import ImageRef

        t0 = time.perf_counter()
        self._searcher()
        clean = tuple(dict.fromkeys(clean_text(x, "label") for x in labels))
        if len(clean) > MAX_LABELS:
            raise RequestError(422, f"at most {MAX_LABELS} labels per image")
        origin = clean_text(source, "source") if source else "upload"  # checked before anything is kept
        try:
            decoded = decode_for(self.settings, data, filename)
        except ImageError as err:
            self.metrics.uploads.labels("failed").inc()
            raise RequestError(422, f"{filename}: {err.reason}") from None
        sha = sha256_hex(data)
        path = self._keep(data, sha, decoded.format)
        ref = ImageRef(uri=str(path), labels=clean, source=origin)
        pid = point_id(sha)
        if self.settings.publishes_events:
            self._publish(ref)
            self.metrics.uploads.labels("queued").inc()
            return 202, {"id": pid, "status": "queued", "uri": ref.uri}
        if not wait:
            self._background.submit(self._ingest_logged, ref, time.time())
            return 202, {"id": pid, "status": "accepted", "uri": ref.uri}
        outcome = self._ingest(ref, time.time() - (time.perf_counter() - t0))
        if outcome.status == "failed":
            raise RequestError(422, f"{filename}: {outcome.reason}")
        self._exists = True
        neighbours = self.search([Query("id", pid)], k=k, filter=None, min_score=None)[0]["results"]
        return 200, {"id": pid, "status": outcome.status, "uri": ref.uri, "tags": outcome.tags,
                     "neighbours": neighbours, "seconds": round(time.perf_counter() - t0, 4)}

    def _keep(self, data: bytes, sha: str, fmt: str) -> Path:
        """Write the upload once, content-addressed (``ab/abcd….jpg``), atomically: a reader never sees half."""
        folder = self.settings.uploads / sha[:2]
        path = folder / f"{sha}{EXTENSIONS.get(fmt, '.img')}"
        if path.is_file():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def ingest(self, refs: Sequence[Any]) -> list[Outcome]:
        """Ingest refs in this process (uploads, watched folders), one writer at a time."""
        if self.pipeline is None:
            raise StoreError("this server sends uploads to the workers; it does not ingest in-process")
        with self._write_lock:
            outcomes = self.pipeline.ingest(list(refs))
        self.metrics.ingest.observe_batch(outcomes)
        for o in outcomes:
            self.metrics.uploads.labels(o.status).inc()
            self.metrics.ingest.count("serve", o.status)
            if "embed" in o.timings:  # the pipeline's share of its batch's model call, per image
                self.metrics.embed.labels("upload").observe(o.timings["embed"])
        if any(o.status != "failed" for o in outcomes):
            self._exists = True
        return outcomes

    def _ingest(self, ref: Any, received: float) -> Outcome:
        """Ingest one upload received at ``received`` (UNIX seconds): its freshness is from then to durable."""
        self._searcher()
        outcome = self.ingest([ref])[0]
        if outcome.status in STORED:
            self.metrics.ingest.durable("serve", [received])
        return outcome

    def _ingest_logged(self, ref: Any, received: float) -> None:
        try:
            outcome = self._ingest(ref, received)
            log.info("upload %s: %s %s", ref.uri, outcome.status, outcome.reason or outcome.id)
        except Exception as err:
            log.error("upload %s failed: %s", ref.uri, err)

    def _publish(self, ref: Any) -> None:
        from workers.app import make_app
        from workers.events import INGEST_TASK, LIVE_QUEUE, event_for

        if self._celery is None:
            self._celery = make_app(self.settings)
        try:
            self._celery.send_task(INGEST_TASK, args=[event_for(ref, sent_at=time.time())], queue=LIVE_QUEUE)
        except Exception as err:
            raise RequestError(503, f"cannot reach the broker ({type(err).__name__}); the upload was kept at "
                                    f"{ref.uri} and can be sent again") from None

    # -- removals --------------------------------------------------------------------------------------
    def forget(self, uris: Sequence[str]) -> list[dict[str, Any]]:
        """Remove locations from the index (a point left without one is deleted); one answer per uri."""
        return self._remove("forget", list(uris))

    def delete(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Delete points by id; one answer per id."""
        return self._remove("delete_ids", [valid_id(i) for i in ids])

    def _remove(self, how: str, targets: list[str]) -> list[dict[str, Any]]:
        searcher = self._searcher()
        if self.pipeline is not None:
            with self._write_lock:
                done = getattr(self.pipeline, how)(targets)
        else:  # uploads go to the workers: removals are applied here, under the workers' content lock
            from ingest.pipeline import Pipeline
            from workers.runtime import RedisContentLock, redis_for

            lock = RedisContentLock(redis_for(self.settings.broker))
            with Pipeline(searcher.settings, store=searcher.store, embedder=self._model, content_lock=lock) as p:
                done = getattr(p, how)(targets)
        return [{"target": r.target, "status": r.status, "ids": r.ids} for r in done]

    def close(self) -> None:
        self._closed.set()
        for batcher in self._batchers.values():
            batcher.close()
        self._background.shutdown(wait=True)
        if self.pipeline is not None:
            self.pipeline.close()
        if self.searcher is not None:
            self.searcher.close()


def _result(item: Any) -> np.ndarray:
    if isinstance(item, BaseException):
        raise item
    return item.result()


__all__ = ["Query", "RequestError", "Service", "clean_text", "valid_id"]
