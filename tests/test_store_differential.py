"""Differential test, after qdrant-client's congruence tests: the embedded ``EdgeStore`` and a ``ClientStore``
over qdrant-client's local mode (the stand-in for a server) get the same random points, payloads, filters and
edits, and must give the same answers. Both backends translate filters with one walk (search/store/filters.py),
so a disagreement here is a bug in that walk, in a backend, or in one of the two engines."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from search.config import Settings
from search.errors import StoreError
from search.schema import CollectionMeta, Filter, Hit, Match, PointRecord
from search.store import ClientStore, Store, open_store

SEEDS = range(8)
TOL = 1e-5  # score agreement: both engines score float32 cosine, in a different order of operations

LABELS = ("cat", "dog", "bird", "car", "tree", "Cat", "")
SOURCES = ("backfill", "worker", "watch", "web")
FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
MODELS = ("efficientnet-lite0", "clip-vit-b-32")
SIZES = (1, 8, 224, 640, 1024)
BYTE_SIZES = (0, 512, 40_000, 1 << 20)
METHODS = ("knn", "zero-shot")
NEVER = "never-stored"


class World:
    """One seed's random data and the values filters draw from."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.dim = self.rng.choice((8, 32))
        n = self.rng.randint(50, 300)
        self.uris = [f"file:///photos/{i}.jpg" for i in range(max(4, n // 6))]
        self.shas = [hashlib.sha256(f"{seed}/{i}".encode()).hexdigest() for i in range(n)]
        self.ids = [str(uuid.UUID(sha[:32])) for sha in self.shas]
        vectors = self.unit(n)
        for i in self.rng.sample(range(n), n // 10):  # duplicate vectors: ties in search
            vectors[i] = vectors[self.rng.randrange(n)]
        self.vectors = vectors
        self.payloads = [self.payload(i) for i in range(n)]

    def unit(self, n: int) -> np.ndarray:
        v = self.np.standard_normal((n, self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def some(self, pool: tuple | list, most: int) -> list:
        return self.rng.sample(list(pool), self.rng.randint(0, min(most, len(pool))))

    def payload(self, i: int) -> dict[str, Any]:
        """Real payload fields; each may be missing, and lists may be empty (is_empty must agree on both)."""
        r = self.rng
        full: dict[str, Any] = {
            "sha256": self.shas[i],
            "uris": self.some(self.uris, 3),
            "source": r.choice(SOURCES),
            "width": r.choice(SIZES), "height": r.choice(SIZES), "bytes": r.choice(BYTE_SIZES),
            "format": r.choice(FORMATS),
            "ingested_at": f"2024-0{r.randint(1, 9)}-1{r.randint(0, 9)}T12:00:00Z",
            "labels": self.some(LABELS, 3),
            "tags": [{"label": lab, "score": round(r.random(), 4), "method": r.choice(METHODS)}
                     for lab in self.some(LABELS, 3)],
            "model": r.choice(MODELS),
        }
        return {k: v for k, v in full.items() if r.random() < 0.85}

    # filters
    def values(self, field: str) -> list[Any]:
        pools: dict[str, Any] = {"labels": LABELS, "tags[].label": LABELS, "uris": self.uris, "source": SOURCES,
                                 "sha256": self.rng.sample(self.shas, 3), "model": MODELS, "format": FORMATS,
                                 "width": SIZES, "height": SIZES, "bytes": BYTE_SIZES}
        pool = [*pools[field], NEVER if isinstance(pools[field][0], str) else 7]
        return self.rng.sample(pool, self.rng.choice((1, 1, 1, 2, 3)))

    def match(self) -> Match:
        field = self.rng.choice(("labels", "tags[].label", "uris", "source", "sha256", "model", "format", "width",
                                 "height", "bytes"))
        values = self.values(field)
        if self.rng.random() < 0.1:  # strings and numbers in one match: any of them
            values = [*values, self.rng.choice((640, "640", "cat"))]
        return Match(field, tuple(values))

    def parsed_filter(self) -> Filter | None:
        aliases = {"labels": "label", "tags[].label": "tag", "uris": "uri"}
        exprs = []
        for _ in range(self.rng.randint(1, 3)):
            m = self.match()
            if any(isinstance(v, str) for v in m.values) and any(isinstance(v, int) for v in m.values):
                continue  # the CLI parses one type per field
            exprs += [f"{aliases.get(m.field, m.field)}={v}" for v in m.values]
        return Filter.parse(exprs)

    def built_filter(self) -> Filter:
        r = self.rng
        return Filter(must=tuple(self.match() for _ in range(r.choice((0, 0, 1, 1, 2)))),
                      must_not=tuple(self.match() for _ in range(r.choice((0, 0, 1, 2)))),
                      non_empty=tuple(self.some(("labels", "tags", "tags[].label", "uris", "model", "width"), 2)),
                      exclude_ids=tuple(r.sample(self.ids, r.randint(1, 8))) if r.random() < 0.4 else ())

    def filters(self, n: int) -> Iterator[Filter | None]:
        yield None
        yield Filter()
        for _ in range(n):
            yield self.parsed_filter() if self.rng.random() < 0.4 else self.built_filter()


# ---------------------------------------------------------------- the two backends

Backends = Callable[[World], tuple[Store, Store]]


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """Both stores, empty, for a world's dimension. The edge collections (one per dimension) are emptied and
    reused: creating one (its payload indexes, flushed) costs more than a seed's comparisons. Local mode gets
    a fresh client each time: it keeps deleted points and filters them again on every call."""
    from qdrant_client import QdrantClient

    data_dir = tmp_path_factory.mktemp("differential")
    made: list[Store] = []

    def get(world: World) -> tuple[Store, Store]:
        meta = CollectionMeta(model="diff-model", dim=world.dim, preprocessing="diff-v1")
        edge = open_store(Settings(data_dir=data_dir, hnsw_threshold=1_000_000), f"diff{world.dim}")
        edge.sync_writes = False  # durability is tested in test_store.py; here fsyncs only cost time
        client = ClientStore(QdrantClient(location=":memory:"), "diff", owns_client=True)
        made.extend((edge, client))
        for store in (edge, client):
            store.ensure_collection(meta)
        edge.delete([r.id for r in edge.scroll()])
        return edge, client

    yield get
    for store in made:
        store.close()  # the edge handle is shared and ref-counted: one close per open_store


def _points(world: World, idx: Sequence[int]) -> list[PointRecord]:
    return [PointRecord(world.ids[i], world.vectors[i], world.payloads[i]) for i in idx]


# ---------------------------------------------------------------- comparisons

def _assert_same_points(world: World, edge: Store, client: Store, filters: list[Filter | None]) -> None:
    for i, flt in enumerate(filters):
        batch = 37 if i == 0 else 512  # page without a filter: local mode filters all points again per page
        a = {r.id: r.payload for r in edge.scroll(flt, batch=batch)}
        b = {r.id: r.payload for r in client.scroll(flt, batch=batch)}
        assert a == b, f"scroll differs for {flt}: only edge {set(a) - set(b)}, only client {set(b) - set(a)}"
        assert edge.count(flt) == client.count(flt) == len(a), flt
    ids = [*world.rng.sample(world.ids, min(20, len(world.ids))), str(uuid.UUID(int=0))]
    a = {r.id: r for r in edge.retrieve(ids, with_vectors=True)}
    b = {r.id: r for r in client.retrieve(ids, with_vectors=True)}
    assert a.keys() == b.keys()
    for pid, rec in a.items():
        assert rec.payload == b[pid].payload
        assert np.allclose(rec.vector, b[pid].vector, atol=1e-6)


def _assert_same_hits(a: list[Hit], b: list[Hit], k: int, min_score: float | None, what: str) -> None:
    """Same scores rank by rank; the same ids except where a tie (or the threshold) makes the cut arbitrary."""
    sa, sb = [h.score for h in a], [h.score for h in b]
    on_threshold = min_score is not None and any(abs(s - min_score) < TOL for s in sa + sb)
    if not on_threshold:
        assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} hits"
    n = min(len(a), len(b))
    assert np.allclose(sa[:n], sb[:n], atol=TOL), f"{what}: scores {sa} vs {sb}"
    score_a, score_b = {h.id: h.score for h in a}, {h.id: h.score for h in b}
    for pid in score_a.keys() & score_b.keys():
        assert abs(score_a[pid] - score_b[pid]) < TOL, what
    assert {h.id: h.payload for h in a if h.id in score_b} == {h.id: h.payload for h in b if h.id in score_a}
    cut = min(sa[-1:] + sb[-1:], default=None)
    for pid in score_a.keys() ^ score_b.keys():
        score = score_a.get(pid, score_b.get(pid, 0.0))
        at_cut = cut is not None and abs(score - cut) < TOL and max(len(a), len(b)) == k
        at_threshold = min_score is not None and abs(score - min_score) < TOL
        assert at_cut or at_threshold, f"{what}: {pid} (score {score:.6f}) is found by one backend only"


def _assert_same_search(world: World, edge: Store, client: Store, filters: list[Filter | None]) -> None:
    r = world.rng
    for i, flt in enumerate(filters):
        # every other query is a stored vector: score 1.0, tied with its duplicates
        query = world.unit(1) if i % 2 else world.vectors[r.randrange(len(world.ids))][None, :]
        k = r.choice((1, 5, 10, 40))
        min_score = r.choice((None, None, 0.0, 0.3))
        exact = r.random() < 0.3
        (a,) = edge.search(query, k=k, filter=flt, min_score=min_score, exact=exact)
        (b,) = client.search(query, k=k, filter=flt, min_score=min_score, exact=exact)
        _assert_same_hits(a, b, k, min_score, f"query {i}, k={k}, min_score={min_score}, filter {flt}")


def _assert_agree(world: World, edge: Store, client: Store, n_filters: int = 5) -> None:
    filters = list(world.filters(n_filters))
    _assert_same_points(world, edge, client, filters)
    _assert_same_search(world, edge, client, filters)


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("seed", SEEDS)
def test_edge_and_client_agree(seed: int, backends: Backends) -> None:
    world = World(seed)
    r = world.rng
    n = len(world.ids)
    edge, client = backends(world)
    first = r.sample(range(n), n * 2 // 3)
    for store in (edge, client):
        store.upsert(_points(world, first))
    _assert_agree(world, edge, client)

    rest = [i for i in range(n) if i not in set(first)]
    again = r.sample(first, len(first) // 5)  # upserting an id again replaces the whole point
    for i in again:
        world.payloads[i] = world.payload(i)
    for store in (edge, client):
        store.upsert(_points(world, rest + again))
    _assert_agree(world, edge, client, n_filters=2)

    changes = [(world.ids[i], {k: v for k, v in world.payload(i).items() if r.random() < 0.5})
               for i in r.sample(range(n), n // 8)]
    gone = [*r.sample(world.ids, n // 6), str(uuid.UUID(int=1))]  # deleting a missing id is fine
    for store in (edge, client):
        for pid, change in changes:
            store.set_payload(pid, change)
        store.delete(gone)
    assert edge.count() == client.count() == n - len(gone) + 1
    if seed in (1, 5):  # one per dimension; later seeds reuse the indexed collection (optimize takes ~0.5 s)
        edge.optimize(force=True)  # with HNSW, the edge store searches selective filters exactly: same answers
    _assert_agree(world, edge, client)


@pytest.mark.parametrize("values", [(True,), (1.5,), (None,), ([1],), ("cat", False)])
def test_unsupported_match_values_are_refused_alike(values: tuple, backends: Backends) -> None:
    """Match values are strings or whole numbers. Booleans are refused too: qdrant-edge-py 0.9.0 turns
    ``MatchValue(True)`` into the integer 1, so the embedded store would silently match other points."""
    world = World(0)
    for store in backends(world):
        store.upsert(_points(world, range(10)))
        flt = Filter(must_not=(Match("width", values),))
        for call in (lambda s=store, f=flt: s.count(f), lambda s=store, f=flt: list(s.scroll(f)),
                     lambda s=store, f=flt: s.search(world.vectors[:1], filter=f)):
            with pytest.raises(StoreError, match="strings or whole numbers"):
                call()


def test_a_match_of_strings_and_numbers_is_any_of_them(backends: Backends) -> None:
    """Qdrant's MatchAny takes one type; the translation splits a mixed match and must keep both sides."""
    world = World(1)
    for store in backends(world):
        store.upsert(_points(world, range(len(world.ids))))
        mixed = Match("width", (640, "640", np.int64(8)))
        expected = sum(store.count(Filter(must=(Match("width", (v,)),))) for v in (640, 8))
        assert store.count(Filter(must=(Match("width", ("640",)),))) == 0  # the stored values are numbers
        assert store.count(Filter(must=(mixed,))) == expected > 0
        assert store.count(Filter(must_not=(mixed,))) == store.count() - expected
