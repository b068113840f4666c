"""Near-duplicate groups (``ingest.duplicates``, ``lookalike duplicates``) and ``duplicate_of`` at ingestion.

Images are generated (smooth colour fields; their copies resized, re-encoded, cropped) and embedded by
``TinyEmbedder``: a copy is at cosine ≥ 0.97 of its original, two different fields at most ~0.3, so the
tests use threshold 0.95. The real threshold is measured in benchmarks/bench_duplicates.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.duplicates import UnionFind, default_threshold, find_groups, flag_duplicates, keeper_key
from ingest.pipeline import Pipeline
from ingest.sources import ImageRef
from ingest.tagging import LABELLED, Tagger, vote
from search.config import get_settings
from search.schema import PAYLOAD_FIELDS, Filter, Hit, PointRecord, build_payload, point_id, sha256_hex
from search.store import open_store
from search.store.base import SearchRequest
from tests.clirun import run_cli
from tests.fakes import TinyEmbedder
from tests.imagefactory import photo

T = 0.95


@pytest.fixture
def settings(tmp_path: Path):
    return get_settings(data_dir=tmp_path / "data", batch_size=4)


def _copies(root: Path, seeds: range) -> dict[str, list[Path]]:
    """Per seed: the original (96×64), then a half-size copy, a JPEG q30 copy and a 90 % crop."""
    out: dict[str, list[Path]] = {}
    root.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        original = photo(root / f"p{s}.jpg", s)
        image = Image.open(original)
        paths = [original, root / f"p{s}-half.png", root / f"p{s}-q30.jpg", root / f"p{s}-crop.jpg"]
        image.resize((48, 32)).save(paths[1])
        image.save(paths[2], quality=30)
        image.crop((4, 3, 92, 61)).save(paths[3], quality=92)
        out[f"p{s}"] = paths
    return out


def _id(path: Path) -> str:
    return point_id(sha256_hex(path.read_bytes()))


def _point(n: int, vector, *, width=64, height=64, at="2026-01-01T00:00:00.000Z", labels=(), dup=None) -> PointRecord:
    sha = sha256_hex(f"point-{n}".encode())
    return PointRecord(point_id(sha), np.asarray(vector, dtype=np.float32), build_payload(
        sha256=sha, uris=[f"/x/{n}.jpg"], source="test", width=width, height=height, format="JPEG", size=1,
        ingested_at=at, labels=list(labels), tags=[], model="tiny", duplicate_of=dup))


def _unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def _at(deg: float) -> np.ndarray:
    """A unit vector in the (x, y) plane, ``deg`` degrees from the x axis: cos between two = cos of the angle."""
    r = np.radians(deg)
    return _unit(np.cos(r), np.sin(r), 0, 0)


@pytest.fixture
def store4(settings):
    s = open_store(settings)
    s.ensure_collection(TinyEmbedder("tiny", dim=4).meta())
    yield s
    s.close()


# -- grouping -------------------------------------------------------------------------------------------
def test_keeper_is_most_pixels_then_earliest_ingested(store4) -> None:
    small_early = _point(1, _at(0), width=100, height=100, at="2026-01-01T00:00:00.000Z")
    big_late = _point(2, _at(1), width=200, height=100, at="2026-03-01T00:00:00.000Z")
    same_late = _point(3, _at(90), width=50, height=50, at="2026-02-01T10:00:00.000Z")
    same_early = _point(4, _at(91), width=50, height=50, at="2026-02-01T09:00:00+00:00")  # another spelling of UTC
    store4.upsert([small_early, big_late, same_late, same_early])
    scan = find_groups(store4, T)
    groups = [[scan.ids[i] for i in g] for g in scan.groups]
    assert sorted(groups) == sorted([[big_late.id, small_early.id], [same_early.id, same_late.id]])
    assert keeper_key(1, "not a time", "a") > keeper_key(1, "2026-01-01T00:00:00Z", "b")  # unknown time: last


def test_threshold_is_respected_and_groups_join_through_members(store4) -> None:
    # cos(17°) = 0.956 ≥ T, cos(19°) = 0.946 < T; the chain 240°-255°-270° is one group although cos(30°) < T
    points = [_point(1, _at(0)), _point(2, _at(17)), _point(3, _at(120)), _point(4, _at(139)),
              _point(5, _at(240)), _point(6, _at(255)), _point(7, _at(270))]
    store4.upsert(points)
    scan = find_groups(store4, T)
    found = sorted(sorted(scan.ids[i] for i in g) for g in scan.groups)
    assert found == sorted([sorted([points[0].id, points[1].id]), sorted(p.id for p in points[4:])])
    assert scan.points == 7
    assert find_groups(store4, 0.99).groups == []


def test_groups_larger_than_k_are_found_whole(store4) -> None:
    rng = np.random.default_rng(0)
    points = [_point(n, _at(float(rng.uniform(0, 5)))) for n in range(15)]
    store4.upsert(points)
    scan = find_groups(store4, T, k=2, batch=4)
    assert [len(g) for g in scan.groups] == [15]


def test_union_find() -> None:
    uf = UnionFind()
    for _ in range(6):
        uf.add()
    uf.union(0, 1)
    uf.union(2, 3)
    uf.union(1, 3)
    assert uf.groups() == [[0, 1, 2, 3]]
    assert uf.groups([4, 5]) == []


def test_the_command_lists_groups_draws_sheets_and_deletes_nothing(settings, tmp_path: Path) -> None:
    sets = _copies(tmp_path / "photos", range(3))
    singles = [photo(tmp_path / "photos" / f"single{s}.jpg", s) for s in range(10, 13)]
    with Pipeline(settings, embedder=TinyEmbedder(), tagger=False) as p:
        p.run([ImageRef(str(x)) for x in [*singles, *(paths[0] for paths in sets.values())]])
        p.run([ImageRef(str(x)) for paths in sets.values() for x in paths[1:]])  # ingested later
    with open_store(settings) as store:
        before = {r.id: r.payload for r in store.scroll()}
    data = settings.data_dir

    refused = run_cli(["duplicates"], data, catch_exceptions=True)  # no threshold measured for "tiny"
    assert refused.exit_code == 1 and "pass --threshold" in refused.output

    result = run_cli(["duplicates", "--threshold", T, "--json", "--sheet", tmp_path / "sheets"], data)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["groups"] == 3 and answer["duplicates"] == 9 and answer["points"] == 15
    for group in answer["results"]:
        name = Path(group["keeper"]["uris"][0]).stem  # the 96×64 original: most pixels, ingested first
        assert name in sets and group["keeper"]["id"] == _id(sets[name][0])
        assert {d["id"] for d in group["duplicates"]} == {_id(p) for p in sets[name][1:]}
        assert all(T <= d["similarity"] <= 1.0 for d in group["duplicates"])
    assert not {_id(p) for p in singles} & {m["id"] for g in answer["results"] for m in [g["keeper"], *g["duplicates"]]}
    sheets = sorted((tmp_path / "sheets").glob("group-*.png"))
    assert len(sheets) == 3 and Image.open(sheets[0]).width > 4 * 160

    table = run_cli(["duplicates", "--threshold", T], data)
    assert table.stdout.count("  keep  ") == 3 and table.stdout.count("  dup   ") == 9
    assert "3 groups; 9 images could go" in table.stdout
    with open_store(settings) as store:  # nothing deleted, nothing changed
        assert {r.id: r.payload for r in store.scroll()} == before


def test_the_command_on_a_missing_collection(tmp_path: Path) -> None:
    result = run_cli(["duplicates", "--threshold", T], tmp_path / "empty", catch_exceptions=True)
    assert result.exit_code == 1 and "backfill" in result.output


# -- at ingestion ------------------------------------------------------------------------------------------
def test_flag_duplicates_prefers_the_most_similar_candidate() -> None:
    v = np.stack([_at(0), _at(5), _at(60), _at(61)])
    ids = ["a", "b", "c", "d"]
    stored = [None, Hit("s", 0.97, {}), Hit("s2", 0.99, {}), Hit("s3", 0.90, {})]
    # a: nothing; b: a (cos 5° = 0.996) beats the stored 0.97; c: stored 0.99 beats a/b (cos 55°);
    # d: c (cos 1°) — the stored neighbour is under the threshold
    assert flag_duplicates(v, ids, stored, T) == [None, "a", "s2", "c"]
    assert flag_duplicates(v, ids, stored, None) == [None] * 4


def test_duplicate_of_at_ingest_from_the_store_and_from_the_same_batch(settings, tmp_path: Path) -> None:
    sets = _copies(tmp_path / "photos", range(3))
    originals = [ImageRef(str(paths[0])) for paths in sets.values()]
    with Pipeline(settings, embedder=TinyEmbedder(), tagger=False, duplicate_threshold=T) as p:
        first = p.ingest(originals)
        assert [o.duplicate_of for o in first] == [None] * 3
        later = p.ingest([ImageRef(str(sets["p0"][1]))])  # its nearest stored point, from the search
        assert [o.duplicate_of for o in later] == [_id(sets["p0"][0])]
        # p1's copy and a brand-new photo with its own copy, in one batch: the copy points to the one before it
        fresh = photo(tmp_path / "fresh.jpg", 42)
        half = tmp_path / "fresh-half.png"
        Image.open(fresh).resize((48, 32)).save(half)
        mixed = p.ingest([ImageRef(str(sets["p1"][1])), ImageRef(str(fresh)), ImageRef(str(half))])
        assert [o.duplicate_of for o in mixed] == [_id(sets["p1"][0]), None, _id(fresh)]
        [stored] = p.store.retrieve([_id(half)])
        assert stored.payload["duplicate_of"] == _id(fresh) and set(stored.payload) == set(PAYLOAD_FIELDS)
        assert p.store.count(Filter.parse([f"duplicate_of={_id(sets['p0'][0])}"])) == 1


def test_no_flag_without_a_measured_threshold(settings, tmp_path: Path) -> None:
    sets = _copies(tmp_path / "photos", range(1))
    assert default_threshold("tiny", "thumb8-v1") is None
    assert default_threshold("efficientnet-lite0", "resize224-relu-cgem3-v1") is not None
    with Pipeline(settings, embedder=TinyEmbedder(), tagger=False) as p:
        assert [o.duplicate_of for o in p.ingest([ImageRef(str(x)) for x in sets["p0"]])] == [None] * 4


def _count_searches(store, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = store.search_many

    def spy(requests):
        calls.append(len(requests))
        return real(requests)

    monkeypatch.setattr(store, "search_many", spy)
    return calls


def test_tags_are_unchanged_and_no_query_is_added(store4, settings, monkeypatch) -> None:
    # an unlabelled point is the nearest of every query: widening the labelled search would change the tags
    labelled = [_point(n, _at(deg), labels=[label]) for n, (deg, label) in
                enumerate([(3, "cat"), (6, "cat"), (9, "dog"), (40, "dog"), (45, "dog"), (80, "cat")])]
    unlabelled = _point(100, _at(1))
    store4.upsert([*labelled, unlabelled])
    queries = np.stack([_at(0.5), _at(20), _at(60)])
    tagger = Tagger(store4, TinyEmbedder("tiny", dim=4), settings.replace(tag_k=3, tag_threshold=0.5))
    calls = _count_searches(store4, monkeypatch)

    plain = tagger.tag(queries)
    tags, nearest = tagger.tag_with_nearest(queries)
    assert calls == [1, 2]  # one store call each; the second carries two requests
    assert tags == plain
    reference = []
    for hits in store4.search(queries, k=3, filter=LABELLED):
        voted = vote([h.labels for h in hits], [h.score for h in hits], threshold=0.5)
        reference.append([{"label": lab, "score": round(conf, 4), "method": "knn",
                           "neighbours": [hits[i].id for i in idx]} for lab, conf, idx in voted])
    assert tags == reference and tags[0][0]["label"] == "cat"
    assert [h.id for h in nearest] == [unlabelled.id, labelled[2].id, labelled[4].id]
    # its own id never comes back as its nearest point
    _, own = tagger.tag_with_nearest(np.stack([unlabelled.vector]), exclude_ids=[unlabelled.id])
    assert own[0].id == labelled[0].id


def test_pipeline_tags_match_with_and_without_the_flag(tmp_path: Path, monkeypatch) -> None:
    sets = _copies(tmp_path / "photos", range(4))
    labelled = [ImageRef(str(paths[0]), (f"class{n}",)) for n, paths in enumerate(sets.values())]
    copies = [ImageRef(str(p)) for paths in sets.values() for p in paths[1:]]
    runs = {}
    for name, threshold in (("off", None), ("on", T)):  # None: no threshold was measured for TinyEmbedder
        settings = get_settings(data_dir=tmp_path / name, batch_size=4)
        with Pipeline(settings, embedder=TinyEmbedder(), duplicate_threshold=threshold) as p:
            p.run(labelled)
            calls = _count_searches(p.store, monkeypatch)
            outcomes = p.run(copies)
            assert outcomes.indexed == 12
            runs[name] = ({r.id: r.payload for r in p.store.scroll()}, calls)
    (off, calls_off), (on, calls_on) = runs["off"], runs["on"]
    assert calls_off == [1, 1, 1] and calls_on == [2, 2, 2]  # one store call per batch of 4, either way
    assert {k: v["tags"] for k, v in on.items()} == {k: v["tags"] for k, v in off.items()}
    assert any(v["tags"] for v in on.values())
    flagged = {k: v["duplicate_of"] for k, v in on.items() if v["duplicate_of"]}
    family = {_id(p): name for name, paths in sets.items() for p in paths}
    assert set(flagged) == {_id(p) for paths in sets.values() for p in paths[1:]}  # every copy, no original
    assert all(family[copy] == family[of] for copy, of in flagged.items())  # its original or a sibling copy
    assert not any(v["duplicate_of"] for v in off.values())


# -- the store call that carries both requests ----------------------------------------------------------
@pytest.mark.parametrize("backend", ["edge", "client-local"])
def test_search_many_answers_each_request_as_search_would(backend, settings) -> None:
    from qdrant_client import QdrantClient

    from search.store import ClientStore

    store = open_store(settings) if backend == "edge" else ClientStore(QdrantClient(location=":memory:"), "t")
    try:
        store.ensure_collection(TinyEmbedder("tiny", dim=4).meta())
        store.upsert([_point(n, _at(10 * n), labels=["x"] if n % 2 else []) for n in range(8)])
        q = np.stack([_at(12), _at(44)])
        many = store.search_many([SearchRequest(q, 3, LABELLED), SearchRequest(q[:1], 1, min_score=0.9999),
                                  SearchRequest(q, 2)])
        single = [store.search(q, 3, LABELLED), store.search(q[:1], 1, min_score=0.9999), store.search(q, 2)]
        as_ids = [[[h.id for h in hits] for hits in answer] for answer in many]
        assert as_ids == [[[h.id for h in hits] for hits in answer] for answer in single]
        assert [len(a) for a in many] == [2, 1, 2] and many[1] == [[]]
    finally:
        store.close()
