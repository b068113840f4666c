"""Near-duplicate groups: re-encoded, resized, cropped or lightly edited copies of one picture.

Two images are near-duplicates when the cosine similarity of their vectors is at least a threshold. The
threshold belongs to the model that made the vectors, so it is measured per model (``MEASURED_THRESHOLDS``,
chosen by ``benchmarks/bench_duplicates.py`` for ≥ 99 % pair precision on altered copies of Caltech101; see
``benchmarks/results/duplicates.md``). A model without a measured threshold gets none: the command asks for
``--threshold`` and ingestion leaves ``duplicate_of`` unset.

* ``find_groups`` scans a collection: it pages through the points with their vectors, asks the store for
  each page's neighbours above the threshold (one batched search per page; a point whose k neighbours all
  pass asks again for more, so every pair above the threshold is seen: with a fixed k, a big cluster of
  copies can fall apart into several groups) and joins the pairs with union-find, so a group is a connected
  component of the "near-duplicate of" graph. Per point it keeps only the id, pixel count and ingestion
  time; payloads are read again for the members of groups only.
* The keeper of a group is the member with the most pixels, then the earliest ingested, then the
  smallest id (``keeper_key``). Nothing is ever deleted here.
* At ingestion (``ingest.pipeline``), ``flag_duplicates`` gives a new image ``duplicate_of`` = the id of its
  most similar point at or above the threshold: its nearest stored point, which the tagger's batched search
  already returns (``Tagger.tag_with_nearest``), or an image earlier in the same batch (not stored yet, so no
  search can see it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from search.schema import Hit

if TYPE_CHECKING:
    from search.schema import CollectionMeta
    from search.store import Store

# (model, preprocessing) -> cosine similarity at or above which two images are near-duplicates.
MEASURED_THRESHOLDS: dict[tuple[str, str], float] = {
    ("efficientnet-lite0", "resize224-relu-cgem3-v1"): 0.96,  # precision 100 %, recall 36.9 % (duplicates.md)
}
DEFAULT_K = 10  # neighbours asked per point at first while grouping ...
MAX_K = 1000  # ... and at most, for points whose k neighbours all passed the threshold (asked again, ×4)
_LATEST = datetime.max.replace(tzinfo=UTC)


def default_threshold(model: str, preprocessing: str) -> float | None:
    """The threshold measured for this model version, or None when it was never measured."""
    return MEASURED_THRESHOLDS.get((model, preprocessing))


def threshold_for(meta: CollectionMeta, threshold: float | None) -> float:
    """``threshold`` if given, else the one measured for the collection's model; ConfigError if neither."""
    from search.errors import ConfigError

    if threshold is None:
        threshold = default_threshold(meta.model, meta.preprocessing)
    if threshold is None:
        raise ConfigError(f"no near-duplicate threshold was measured for model {meta.model} ({meta.preprocessing});"
                          f" pass --threshold (measure one with benchmarks/bench_duplicates.py)")
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold} is not a cosine similarity (between -1 and 1)")
    return threshold


# -- at ingestion ----------------------------------------------------------------------------------------
def flag_duplicates(vectors: np.ndarray, ids: Sequence[str], nearest: Sequence[Hit | None],
                    threshold: float | None) -> list[str | None]:
    """Per new vector (in ingestion order): the id of the point it near-duplicates, or None.

    ``nearest[i]`` is vector i's nearest *stored* point (not itself); the vectors before it in the batch are
    candidates too. The most similar candidate at or above ``threshold`` wins; ``threshold=None`` flags
    nothing."""
    if threshold is None:
        return [None] * len(ids)
    vectors = np.asarray(vectors, dtype=np.float32)
    sims = vectors @ vectors.T
    out: list[str | None] = []
    for i, hit in enumerate(nearest):
        best_id, best = (hit.id, hit.score) if hit is not None and hit.score >= threshold else (None, -np.inf)
        if i:
            j = int(np.argmax(sims[i, :i]))
            if sims[i, j] >= threshold and sims[i, j] > best:
                best_id = ids[j]
        out.append(best_id)
    return out


def nearest_stored(store: Store, vectors: np.ndarray, ids: Sequence[str]) -> list[Hit | None]:
    """Each vector's nearest stored point other than itself, for when no tagger searches anyway."""
    results = store.search(vectors, k=2)
    return [next((h for h in hits if h.id != own), None) for hits, own in zip(results, ids, strict=True)]


# -- grouping a collection ---------------------------------------------------------------------------------
class UnionFind:
    """Disjoint sets over 0..n-1, growing on demand (path halving, union by size)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self.size.append(1)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def groups(self, members: Sequence[int] | None = None) -> list[list[int]]:
        """Sets with at least two elements (among ``members`` when given), each sorted."""
        by_root: dict[int, list[int]] = {}
        for i in range(len(self.parent)) if members is None else members:
            by_root.setdefault(self.find(i), []).append(i)
        return [sorted(g) for g in by_root.values() if len(g) > 1]


def _when(ingested_at: Any) -> datetime:
    try:
        when = datetime.fromisoformat(str(ingested_at).replace("Z", "+00:00"))
    except ValueError:
        return _LATEST
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def keeper_key(pixels: int, ingested_at: Any, point_id: str) -> tuple[int, datetime, str]:
    """Sort key whose smallest member is the keeper: most pixels, then earliest ingested, then smallest id."""
    return -pixels, _when(ingested_at), point_id


@dataclass
class Scan:
    """What a pass over the collection keeps: per point its id, pixels and ingestion time, and the groups
    (lists of row numbers, keeper first)."""

    ids: list[str] = field(default_factory=list)
    pixels: list[int] = field(default_factory=list)  # -1: only seen as somebody's neighbour so far
    ingested_at: list[str | None] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    points: int = 0
    seconds: float = 0.0

    def row(self, point_id: str, index: dict[str, int], uf: UnionFind) -> int:
        i = index.get(point_id)
        if i is None:
            i = index[point_id] = uf.add()
            self.ids.append(point_id)
            self.pixels.append(-1)
            self.ingested_at.append(None)
        return i

    def note(self, i: int, payload: dict[str, Any]) -> None:
        width, height = payload.get("width"), payload.get("height")
        self.pixels[i] = width * height if isinstance(width, int) and isinstance(height, int) else 0
        self.ingested_at[i] = payload.get("ingested_at")


def find_groups(store: Store, threshold: float, *, k: int = DEFAULT_K, batch: int = 256,
                on_batch: Callable[[int], None] | None = None) -> Scan:
    """Groups of near-duplicates among all points of ``store`` (see the module docstring).

    ``on_batch(n)`` is called after each page of ``n`` points (progress). Groups come largest first, each
    with its keeper first and the rest in keeper order."""
    start = time.perf_counter()
    scan, uf, index = Scan(), UnionFind(), {}
    linked: set[int] = set()
    page: list[Any] = []

    def search(records: list[Any]) -> None:
        rows = [scan.row(r.id, index, uf) for r in records]
        for i, r in zip(rows, records, strict=True):
            scan.note(i, r.payload)
        vectors = np.stack([np.asarray(r.vector, dtype=np.float32) for r in records])
        for i, hits in zip(rows, _neighbours(store, vectors, threshold, k), strict=True):
            for hit in hits:
                if hit.id != scan.ids[i]:
                    j = scan.row(hit.id, index, uf)
                    uf.union(i, j)
                    linked.update((i, j))
        scan.points += len(records)
        if on_batch is not None:
            on_batch(len(records))

    for record in store.scroll(with_vectors=True, batch=batch):
        if record.vector is None:
            continue
        page.append(record)
        if len(page) >= batch:
            search(page)
            page = []
    if page:
        search(page)
    _complete(store, scan, linked)
    groups = uf.groups(sorted(linked))
    groups = [sorted((i for i in g if scan.pixels[i] >= 0),
                     key=lambda i: keeper_key(scan.pixels[i], scan.ingested_at[i], scan.ids[i])) for g in groups]
    scan.groups = sorted((g for g in groups if len(g) > 1), key=lambda g: (-len(g), scan.ids[g[0]]))
    scan.seconds = time.perf_counter() - start
    return scan


def _neighbours(store: Store, vectors: np.ndarray, threshold: float, k: int) -> list[list[Hit]]:
    """Every stored point at or above ``threshold`` for each vector (itself included), up to ``MAX_K``: rows
    whose ``k`` (+ itself) answers all passed are asked again with four times the k."""
    results = store.search(vectors, k=k + 1, min_score=threshold)
    full = [row for row, hits in enumerate(results) if len(hits) >= k + 1]
    while full and k < MAX_K:
        k = min(4 * k, MAX_K)
        for row, hits in zip(full, store.search(vectors[full], k=k + 1, min_score=threshold), strict=True):
            results[row] = hits
        full = [row for row in full if len(results[row]) >= k + 1]
    return results


def _complete(store: Store, scan: Scan, linked: set[int]) -> None:
    """Points seen only as neighbours (added during the scan, on a server) get their pixels and time;
    those gone since stay at -1 and leave their groups."""
    missing = [i for i in linked if scan.pixels[i] < 0]
    for start in range(0, len(missing), 256):
        part = missing[start:start + 256]
        found = {r.id: r.payload for r in store.retrieve([scan.ids[i] for i in part])}
        for i in part:
            if scan.ids[i] in found:
                scan.note(i, found[scan.ids[i]])


# -- what the command shows --------------------------------------------------------------------------------
@dataclass
class Member:
    id: str
    similarity: float  # cosine similarity to the keeper (1.0 for the keeper itself)
    payload: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        p = self.payload
        return {"id": self.id, "similarity": round(self.similarity, 4), "uris": list(p.get("uris") or []),
                "width": p.get("width"), "height": p.get("height"), "bytes": p.get("bytes"),
                "ingested_at": p.get("ingested_at"), "labels": list(p.get("labels") or [])}


@dataclass
class Group:
    keeper: Member
    others: list[Member]  # most similar to the keeper first

    def to_dict(self) -> dict[str, Any]:
        return {"size": 1 + len(self.others), "keeper": self.keeper.to_dict(),
                "duplicates": [m.to_dict() for m in self.others]}


def describe(store: Store, scan: Scan, *, batch: int = 512) -> Iterator[Group]:
    """The groups of ``scan`` with their members' payloads and similarity to the keeper, read from the
    store a few hundred points at a time (never the whole collection's payloads at once)."""
    chunk: list[list[int]] = []
    size = 0
    for group in scan.groups:
        chunk.append(group)
        size += len(group)
        if size >= batch:
            yield from _read_groups(store, scan, chunk)
            chunk, size = [], 0
    if chunk:
        yield from _read_groups(store, scan, chunk)


def _read_groups(store: Store, scan: Scan, groups: list[list[int]]) -> Iterator[Group]:
    records = {r.id: r for r in store.retrieve([scan.ids[i] for g in groups for i in g], with_vectors=True)}
    for group in groups:
        present = [records[scan.ids[i]] for i in group if scan.ids[i] in records]
        if len(present) < 2:  # deleted since the scan
            continue
        keeper = present[0]
        sims = [float(np.dot(keeper.vector, r.vector)) for r in present[1:]]
        others = sorted((Member(r.id, s, r.payload) for r, s in zip(present[1:], sims, strict=True)),
                        key=lambda m: (-m.similarity, m.id))
        yield Group(Member(keeper.id, 1.0, keeper.payload), others)


SHEET_MAX = 15  # duplicates drawn beside the keeper on one group's sheet


def draw_group_sheet(group: Group, path: Any, load: Callable[[dict[str, Any]], Any]) -> Any:
    """One PNG row: the keeper (framed), then its duplicates with their similarity (at most ``SHEET_MAX``)."""
    from search.sheet import draw_sheet

    keeper = group.keeper.payload
    more = len(group.others) - SHEET_MAX
    title = f"keep {keeper.get('width')}x{keeper.get('height')}" + (f" +{more} more" if more > 0 else "")
    hits = [Hit(m.id, m.similarity, m.payload) for m in group.others[:SHEET_MAX]]
    return draw_sheet([(title, load(keeper))], [hits], lambda h: load(h.payload), path, prefix="")


__all__ = ["DEFAULT_K", "MAX_K", "MEASURED_THRESHOLDS", "Group", "Member", "Scan", "UnionFind", "default_threshold",
           "describe", "draw_group_sheet", "find_groups", "flag_duplicates", "keeper_key", "nearest_stored",
           "threshold_for"]
