"""The lab's embedding cache (evaluate, finetune), so a re-run over the same files costs no inference.

One SQLite file per model *version* under ``settings.data_dir/"cache"/"embeddings"``: the file name carries a
hash of the model name, its preprocessing string, dimension and JPEG draft size. For a model saved as a
folder the preprocessing string includes a digest of the folder's content (search.models), so re-training
a named model never serves stale vectors. Inside, vectors are keyed by the SHA-256 of the image bytes; a
second table maps (path, size, mtime) to that hash so an unchanged file is not even read again. Files that
fail to decode are remembered the same way (their one-line reason is printed again, nothing is re-decoded).

Decoding is the ingestion path's own: ``search.reading.read_bytes`` + ``search.images.decode`` +
``embedder.prepare`` in a thread pool, overlapped with ``embedder.embed_prepared``. Composite models reuse
their components' caches: a combination (``search.models.ConcatEmbedder``, ``a+b``) joins its parts' cached
vectors, and a saved head (``search.models.HeadEmbedder``) is applied to its base's cached vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import ImageError
from search.models import ConcatEmbedder, HeadEmbedder
from search.schema import sha256_hex

if TYPE_CHECKING:
    from PIL import Image

    from ingest.sources import ImageRef
    from search.models import Embedder

CACHE_VERSION = 1


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def draft_size(embedder: Embedder) -> tuple[int, int]:
    from ingest.pipeline import DEFAULT_DRAFT

    return tuple(embedder.draft_size or DEFAULT_DRAFT)  # type: ignore[return-value]


def cache_key(embedder: Embedder) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "model": embedder.name,
        "preprocessing": embedder.preprocessing,
        "dim": int(embedder.dim),
        "draft": list(draft_size(embedder)),
    }


class EmbeddingCache:
    """Vectors of one model version, keyed by image SHA-256 (and file path + size + mtime)."""

    def __init__(self, path: Path, key: dict[str, Any], dim: int) -> None:
        self.path = Path(path)
        self.dim = dim
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        with self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors (sha256 TEXT PRIMARY KEY, vector BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                             " sha256 TEXT, failure TEXT)")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('key', ?)", (json.dumps(key, sort_keys=True),))

    @classmethod
    def for_embedder(cls, embedder: Embedder, settings: Settings) -> EmbeddingCache:
        key = cache_key(embedder)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", embedder.name)[-60:]
        return cls(Path(settings.data_dir) / "cache" / "embeddings" / f"{slug}-{digest}.sqlite", key, int(embedder.dim))

    def close(self) -> None:
        self._db.close()

    # -- lookups -------------------------------------------------------------------------------------
    def file(self, path: str, size: int, mtime_ns: int) -> tuple[str | None, str | None] | None:
        """(sha256, failure) recorded for this exact file version, or None."""
        with self._lock:
            row = self._db.execute("SELECT sha256, failure FROM files WHERE path=? AND size=? AND mtime_ns=?",
                                   (path, size, mtime_ns)).fetchone()
        return (row[0], row[1]) if row else None

    def vectors(self, shas: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(shas))
        with self._lock:
            for start in range(0, len(unique), 500):
                part = unique[start:start + 500]
                marks = ",".join("?" * len(part))
                for sha, blob in self._db.execute(f"SELECT sha256, vector FROM vectors WHERE sha256 IN ({marks})",
                                                  part):
                    out[sha] = np.frombuffer(blob, dtype=np.float32)
        return out

    # -- writes ---------------------------------------------------------------------------------------
    def put_vectors(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        rows = [(sha, np.asarray(v, dtype=np.float32).tobytes()) for sha, v in items]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)

    def put_files(self, rows: Iterable[tuple[str, int, int, str | None, str | None]]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", list(rows))

    def prefill(self, uris: Sequence[str], shas: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors computed elsewhere (e.g. a new head applied to cached base vectors) for these files."""
        self.put_vectors(zip(shas, vectors, strict=True))
        self.put_files([(*st, sha, None) for uri, sha in zip(uris, shas, strict=True)
                        if (st := _stat(uri)) is not None])


def open_cache(embedder: Embedder, settings: Settings, enabled: bool) -> EmbeddingCache | None:
    """The embedder's cache, or None when caching is off (``--no-cache``)."""
    return EmbeddingCache.for_embedder(embedder, settings) if enabled else None


@dataclass
class Embedded:
    """The images of a dataset that could be embedded, in input order, with their vectors."""

    uris: list[str]
    labels: list[tuple[str, ...]]
    sha256: list[str]
    vectors: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    computed: int = 0  # vectors computed in this call (the rest came from the cache)
    seconds: float = 0.0


def _stat(uri: str) -> tuple[str, int, int] | None:
    from search.reading import local_path

    path = local_path(uri)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), st.st_size, st.st_mtime_ns


def embed_refs(refs: Iterable[ImageRef], embedder: Embedder, settings: Settings, *, cache: EmbeddingCache | None,
               progress: bool = False, warn: Callable[[str], None] = _say) -> Embedded:
    """Embed every readable image of ``refs`` (cached vectors first); bad files are skipped with one line
    ``skipping <uri>: <reason>`` through ``warn``."""
    start = time.perf_counter()
    refs = list(refs)
    if cache is not None and isinstance(embedder, ConcatEmbedder):
        return _embed_concatenation(refs, embedder.parts, settings, progress=progress, warn=warn, start=start)
    if cache is not None and isinstance(embedder, HeadEmbedder):
        return _embed_head(refs, embedder, settings, progress=progress, warn=warn)
    return _embed_files(refs, embedder, settings, cache=cache, progress=progress, warn=warn, start=start)


def _embed_head(refs: list[ImageRef], embedder: HeadEmbedder, settings: Settings, *, progress: bool,
                warn: Callable[[str], None]) -> Embedded:
    """A saved head on a base: the base's vectors (from the base's own cache) through the head."""
    base_cache = EmbeddingCache.for_embedder(embedder.base, settings)
    try:
        out = embed_refs(refs, embedder.base, settings, cache=base_cache, progress=progress, warn=warn)
    finally:
        base_cache.close()
    out.vectors = embedder.apply_head(out.vectors)
    return out


@dataclass
class _Progress:
    """Per-ref state of one ``_embed_files`` call: hashes, failures and the vectors known or computed."""

    shas: list[str | None]
    failures: dict[int, str]
    have: dict[str, np.ndarray]  # from the cache
    computed: dict[str, np.ndarray] = field(default_factory=dict)  # by this call
    new_files: list[tuple[str, int, int, str | None, str | None]] = field(default_factory=list)


def _embed_files(refs: list[ImageRef], embedder: Embedder, settings: Settings, *, cache: EmbeddingCache | None,
                 progress: bool, warn: Callable[[str], None], start: float) -> Embedded:
    stats = [_stat(r.uri) for r in refs]
    state = _known(stats, cache)
    todo = [i for i in range(len(refs))
            if i not in state.failures and (state.shas[i] is None or state.shas[i] not in state.have)]
    if todo:
        _compute(refs, todo, stats, state, embedder, settings, cache, progress)
        if cache is not None and state.new_files:
            # failures are recorded without a hash; successes only once their vector is stored
            cache.put_files([row for row in state.new_files
                             if row[4] is not None or row[3] in state.computed or row[3] in state.have])

    failures = state.failures
    keep = [i for i in range(len(refs)) if i not in failures]
    for i in sorted(failures):
        warn(f"skipping {refs[i].uri}: {failures[i]}")
    vectors_by_sha = {**state.have, **state.computed}
    vectors = (np.stack([vectors_by_sha[state.shas[i]] for i in keep]).astype(np.float32) if keep
               else np.zeros((0, int(embedder.dim)), dtype=np.float32))
    return Embedded(uris=[refs[i].uri for i in keep], labels=[tuple(refs[i].labels) for i in keep],
                    sha256=[state.shas[i] for i in keep],  # type: ignore[misc]
                    vectors=vectors, skipped=[(refs[i].uri, failures[i]) for i in sorted(failures)],
                    computed=len(state.computed), seconds=time.perf_counter() - start)


def _known(stats: Sequence[tuple[str, int, int] | None], cache: EmbeddingCache | None) -> _Progress:
    """What the cache already knows: each unchanged file's hash or failure, and the vectors of those hashes."""
    state = _Progress(shas=[None] * len(stats), failures={}, have={})
    if cache is None:
        return state
    for i, st in enumerate(stats):
        if st is not None and (known := cache.file(*st)) is not None:
            state.shas[i], failure = known
            if failure:
                state.failures[i] = failure
    state.have = cache.vectors([s for s in state.shas if s])
    return state


def _compute(refs: list[ImageRef], todo: list[int], stats: Sequence[tuple[str, int, int] | None], state: _Progress,
             embedder: Embedder, settings: Settings, cache: EmbeddingCache | None, progress: bool) -> None:
    """Read, hash, decode and prepare the ``todo`` refs in a thread pool, embedding full batches as they come."""
    from tqdm import tqdm

    from search.reading import read_bytes

    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               desc=f"embedding with {embedder.name}")

    def load(i: int) -> tuple[int, Any]:
        """Read, hash, decode, prepare one image; (i, prepared | None when the hash is already cached)."""
        ref = refs[i]
        try:
            data = read_bytes(ref.uri, settings)
        except ImageError as err:
            return i, err
        sha = sha256_hex(data)
        state.shas[i] = sha
        if sha in state.have or sha in state.computed:
            return i, None
        return i, _prepare(data, ref.uri, embedder, settings)

    threads = max(1, min(4, os.cpu_count() or 2))
    batch: list[tuple[int, Any]] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lookalike-eval-decode") as pool:
        for i, prepared in pool.map(load, todo):
            st = stats[i]
            if isinstance(prepared, ImageError):
                state.failures[i] = prepared.reason
                if st is not None:
                    state.new_files.append((*st, None, prepared.reason))
                bar.update(1)
                continue
            if st is not None:
                state.new_files.append((*st, state.shas[i], None))
            if prepared is None:
                bar.update(1)
                continue
            batch.append((i, prepared))
            if len(batch) >= settings.batch_size:
                _flush(batch, embedder, state.shas, state.computed, cache, bar)
        _flush(batch, embedder, state.shas, state.computed, cache, bar)
    bar.close()


def _embed_concatenation(refs: list[ImageRef], parts: Sequence[Embedder], settings: Settings, *, progress: bool,
                         warn: Callable[[str], None], start: float) -> Embedded:
    """``a+b`` from each part's own cache: the parts' unit vectors concatenated and renormalised, exactly what
    the combined embedder computes — so combinations cost no inference once their parts are cached."""
    results = []
    for part in parts:
        part_cache = EmbeddingCache.for_embedder(part, settings)
        try:
            results.append(embed_refs(refs, part, settings, cache=part_cache, progress=progress,
                                      warn=lambda _message: None))
        finally:
            part_cache.close()
    rows = [{uri: i for i, uri in enumerate(r.uris)} for r in results]
    keep = [i for i, uri in enumerate(results[0].uris) if all(uri in row for row in rows)]
    failures = {uri: reason for r in results for uri, reason in r.skipped}
    for uri, reason in failures.items():
        warn(f"skipping {uri}: {reason}")
    uris = [results[0].uris[i] for i in keep]
    blocks = [r.vectors[[row[u] for u in uris]] for r, row in zip(results, rows, strict=True)]
    joined = np.concatenate(blocks, axis=1) if uris else np.zeros((0, sum(b.shape[1] for b in blocks)), np.float32)
    joined /= np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
    first = results[0]
    return Embedded(uris=uris, labels=[first.labels[i] for i in keep], sha256=[first.sha256[i] for i in keep],
                    vectors=joined.astype(np.float32), skipped=sorted(failures.items()),
                    computed=sum(r.computed for r in results), seconds=time.perf_counter() - start)


def _prepare(data: bytes, uri: str, embedder: Embedder, settings: Settings) -> Any:
    from search.images import decode_for

    try:
        decoded = decode_for(settings, data, uri, draft=draft_size(embedder))
        return embedder.prepare(decoded.image)
    except ImageError as err:
        return err
    except Exception as err:  # a decoder bug is this file's failure, not the run's
        return ImageError(uri, f"cannot decode: {type(err).__name__}: {err}")


def _flush(batch: list[tuple[int, Any]], embedder: Embedder, shas: list[str | None], computed: dict[str, np.ndarray],
           cache: EmbeddingCache | None, bar: Any) -> None:
    if not batch:
        return
    vectors = np.asarray(embedder.embed_prepared([p for _, p in batch]), dtype=np.float32)
    rows = []
    for (i, _), v in zip(batch, vectors, strict=True):
        sha = shas[i]
        assert sha is not None
        computed[sha] = v
        rows.append((sha, v))
    if cache is not None:
        cache.put_vectors(rows)
    bar.update(len(batch))
    batch.clear()


def embed_images(images: Sequence[tuple[str, Image.Image]], embedder: Embedder, *,
                 cache: EmbeddingCache | None) -> tuple[np.ndarray, int]:
    """Embed in-memory images keyed by a content hash (e.g. generated copies); (vectors, computed count)."""
    have = cache.vectors([k for k, _ in images]) if cache is not None else {}
    todo = [(k, im) for k, im in images if k not in have]
    computed: dict[str, np.ndarray] = {}
    for start in range(0, len(todo), 32):
        part = todo[start:start + 32]
        vectors = np.asarray(embedder.embed_prepared([embedder.prepare(im) for _, im in part]), dtype=np.float32)
        computed.update({k: v for (k, _), v in zip(part, vectors, strict=True)})
    if cache is not None and computed:
        cache.put_vectors(computed.items())
    merged = {**have, **computed}
    dim = int(embedder.dim)
    out = np.stack([merged[k] for k, _ in images]) if images else np.zeros((0, dim), dtype=np.float32)
    return out.astype(np.float32), len(computed)


__all__ = ["Embedded", "EmbeddingCache", "cache_key", "embed_images", "embed_refs", "open_cache"]
