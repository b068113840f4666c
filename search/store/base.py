"""The ``Store`` contract both backends implement, and what they share: tuning constants, point-id and
vector checks, record conversion and the model-mismatch message.

The tuning constants are read as ``base.NAME`` when used, never imported by value, so that one assignment
(a benchmark's ``search.store.HNSW_EF = 64``, which the package forwards here) reaches both backends.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import StoreError
from search.schema import CollectionMeta, Filter, Hit, PointRecord

if TYPE_CHECKING:
    from search.store.aliases import Aliases

# HNSW parameters (both backends). Chosen in benchmarks/bench_search.py: recall@10 >= 0.98 at 100k 1280-d.
HNSW_M = 16
HNSW_EF_CONSTRUCT = 128
HNSW_EF = 128  # search-time beam width; raised to k when k is larger
# Segments (or filtered candidate sets) below this size in KB are scored exactly by the engine.
FULL_SCAN_THRESHOLD_KB = 10_000
# Edge: a filter matching at most this many points is searched exactly (with the payload index).
EXACT_FILTER_MAX = 20_000
CLIENT_TIMEOUT_S = 30
TUNABLES = frozenset({"HNSW_M", "HNSW_EF_CONSTRUCT", "HNSW_EF", "FULL_SCAN_THRESHOLD_KB", "EXACT_FILTER_MAX",
                      "CLIENT_TIMEOUT_S"})
# Quantized search fetches this many times k candidates and re-scores them with the full vectors.
# int8 at 2x lost recall at 1M (0.88; 4x: 0.97, p50 1.4 ms; benchmarks/results/million.md).
OVERSAMPLING = {"int8": 4.0, "binary": 3.0}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


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


def _record(r: Any, with_vectors: bool) -> PointRecord:
    """A backend's point (``id``, ``vector``, ``payload``) as a ``PointRecord``."""
    return PointRecord(_point_id(r.id), _to_array(r.vector) if with_vectors else None, r.payload or {})


def _payload(selected: bool | tuple[str, ...]) -> bool | list[str]:
    """``SearchRequest.payload`` as both engines' ``with_payload`` (an empty selection is none)."""
    return list(selected) if isinstance(selected, tuple) and selected else bool(selected)


def _hit(p: Any) -> Hit:
    """A backend's scored point (``id``, ``score``, ``payload``) as a ``Hit``."""
    return Hit(_point_id(p.id), float(p.score), p.payload or {})


@dataclass(frozen=True)
class SearchRequest:
    """One search of ``Store.search_many``: the arguments of ``Store.search``."""

    vectors: Any  # (n, dim), or one vector
    k: int = 10
    filter: Filter | None = None
    min_score: float | None = None
    exact: bool = False
    # Payload fields the hits carry: all (True), none (False) or these keys. Ingestion's tagging search asks
    # only for the neighbours' labels: turning whole payloads into dicts cost ~0.2 ms per image.
    payload: bool | tuple[str, ...] = True


def _split(rows: list[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """``rows`` cut into consecutive runs of ``sizes``: one engine batch's answers back to their requests."""
    out, start = [], 0
    for n in sizes:
        out.append(rows[start:start + n])
        start += n
    return out


def _quantization_kind(settings: Settings | None) -> str:
    return (settings.quantization if settings is not None else "none") or "none"


class Store(ABC):
    """A collection of image vectors with payloads. See the ``search.store`` docstring for the two backends."""

    collection: str
    embedded: bool
    sync_writes: bool = True  # edge: fsync before a write returns (see the package docstring)
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

    def search(self, vectors: np.ndarray, k: int = 10, filter: Filter | None = None,
               min_score: float | None = None, exact: bool = False) -> list[list[Hit]]:
        """Nearest points for each row of ``vectors`` (n, dim), best first, one list per query."""
        return self.search_many([SearchRequest(vectors, k, filter, min_score, exact)])[0]

    @abstractmethod
    def search_many(self, requests: Sequence[SearchRequest]) -> list[list[list[Hit]]]:
        """Several searches, each with its own k, filter and threshold, in one engine call (one round trip
        to a server): per request, what ``search`` would answer. The tagger asks this way for labelled
        neighbours and for the nearest point of any kind at once."""

    @abstractmethod
    def count(self, filter: Filter | None = None) -> int: ...

    @abstractmethod
    def scroll(self, filter: Filter | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[PointRecord]: ...

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None: ...

    def aliases(self) -> Aliases:
        """The aliases of the store this collection lives in (see ``search.store.aliases``)."""
        raise NotImplementedError

    def optimize(self, force: bool = False) -> bool:
        """Build the ANN index where the backend needs to be told; returns whether it ran."""
        return False

    def flush(self) -> None:  # noqa: B027 - optional hook, a no-op where the backend persists on its own
        """Persist pending writes (writes already flush unless ``sync_writes`` is off)."""

    def end_bulk(self) -> None:
        """Make a ``bulk()`` block's writes durable (default: ``flush``)."""
        self.flush()

    @contextlib.contextmanager
    def bulk(self) -> Iterator[Store]:
        """Writes inside skip the per-call fsync and are made durable once at the end (``end_bulk``). They
        still survive a killed process (the WAL); an OS crash inside the block may lose them, so use it for
        re-runnable bulk work (backfill, tagging, a worker's chunk acknowledged after the block)."""
        self._bulk_depth += 1
        try:
            yield self
        finally:
            self._bulk_depth -= 1
            if self._bulk_depth == 0:
                self.end_bulk()

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
