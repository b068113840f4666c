"""Retrieval metrics on hand-made vectors with known answers, and the ``evaluate`` command on a tiny tree."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.lab import metrics as ev
from ingest.lab.datasets import stratified_split
from tests.clirun import run_cli as _run
from tests.imagefactory import make_tree

# embedders are cached per process; each test starts without any (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("_fresh_embedders")


def _unit(angles_deg: list[float]) -> np.ndarray:
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# Points on the unit circle: class 0 around 0°, class 1 around 90°; the 5th point (class 0) sits at 80°,
# among class 1, so its neighbours are mostly class 1.
ANGLES = [0, 5, 10, 15, 80, 85, 90, 95, 100]
LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])


def test_nearest_excludes_self_and_orders_by_similarity():
    x = _unit(ANGLES)
    ids, sims = ev.nearest(x, x, k=3, exclude_self=True)
    assert ids[0].tolist() == [1, 2, 3]
    assert ids[4].tolist() == [5, 6, 7]
    assert np.all(np.diff(sims, axis=1) <= 1e-7)
    assert not np.any(ids == np.arange(len(x))[:, None])
    # k larger than the index (minus self) is clipped
    ids, _ = ev.nearest(x, x, k=50, exclude_self=True)
    assert ids.shape == (9, 8)


def test_nearest_chunks_give_the_same_answer():
    rng = np.random.default_rng(0)
    x = ev.l2_normalize(rng.normal(size=(50, 8)))
    a = ev.nearest(x, x, k=5, exclude_self=True, chunk=7)
    b = ev.nearest(x, x, k=5, exclude_self=True, chunk=1000)
    assert np.array_equal(a[0], b[0])


def test_book_precision_and_class_balanced_mean():
    x = _unit(ANGLES)
    ids, _ = ev.nearest(x, x, k=4, exclude_self=True)
    p = ev.precision_at_k(LABELS, LABELS[ids], k=4)
    # point 0: neighbours 1,2,3 (class 0) and 4 (class 0, at 80°? no: 80° is farther than 85°... check by hand)
    # 0°: nearest others 5°,10°,15°, then 80° (distance 80) vs 85° → 80° → all class 0 → 1.0
    assert p[0] == 1.0
    # 80°: 85, 90, 95 (class 1) then 100 or 15? 100 is 20 away, 15 is 65 → 100 → 0 of 4 correct
    assert p[4] == 0.0
    # 100°: 95, 90, 85, 80 → three of class 1, one class 0
    assert p[8] == 0.75
    assert ev.precision_at_k(np.array([1]), np.array([[1, 1, 0, 0, 1, 1]]), k=4)[0] == 0.5
    # class-balanced: class 0 has values (1,1,1,1,0) → 0.8, class 1 → mean of its four
    values = np.array([1, 1, 1, 1, 0, 1, 1, 0.5, 0.5])
    assert ev.class_mean(values, LABELS) == pytest.approx((0.8 + 0.75) / 2)
    assert ev.per_class(values, LABELS) == {0: pytest.approx(0.8), 1: pytest.approx(0.75)}


def test_knn_topk_weighted_vote():
    # one query, neighbours: class 2 (very close), then three of class 1 (farther)
    labels = np.array([[2, 1, 1, 1]])
    sims = np.array([[0.99, 0.80, 0.79, 0.78]])
    # majority vote → class 1 wins; top-1 for truth=1 is a hit, truth=2 is top-2
    maj = dict(k=4, temperature=None, n_classes=3)
    assert ev.knn_topk_hits(np.array([1]), labels, sims, topk=1, **maj)[0] == 1.0
    assert ev.knn_topk_hits(np.array([2]), labels, sims, topk=1, **maj)[0] == 0.0
    assert ev.knn_topk_hits(np.array([2]), labels, sims, topk=2, **maj)[0] == 1.0
    # a sharp similarity weighting trusts the much nearer neighbour
    sharp = dict(k=4, temperature=0.02, n_classes=3)
    assert ev.knn_topk_hits(np.array([2]), labels, sims, topk=1, **sharp)[0] == 1.0
    assert ev.knn_topk_hits(np.array([0]), labels, sims, topk=2, **sharp)[0] == 0.0
    # a tie is broken towards the nearest neighbour's class
    tie = ev.knn_topk_hits(np.array([0]), np.array([[0, 1]]), np.array([[0.9, 0.9]]), topk=1, k=2,
                           temperature=None, n_classes=2)
    assert tie[0] == 1.0
    shares = ev.vote_scores(labels, sims, 3, k=4, temperature=None)
    assert shares[0].tolist() == pytest.approx([0, 0.75, 0.25])


def test_map_at_10_known_values():
    q = np.array([1, 1, 1])
    nl = np.array([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0],   # hits at ranks 1 and 3: (1 + 2/3) / min(R=2, 10)
                   [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],   # hit at rank 2, R=5: (1/2) / 5
                   [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # no hit
    ap = ev.average_precision_at_k(q, nl, np.array([2, 5, 0]), k=10)
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.5 / 5, 0.0])
    # relevant counts, with and without the query being part of the index
    assert ev.relevant_counts(np.array([0, 1]), np.array([0, 0, 1]), exclude_self=False).tolist() == [2, 1]
    assert ev.relevant_counts(np.array([0, 1]), np.array([0, 0, 1]), exclude_self=True).tolist() == [1, 0]


def test_pca_recovers_a_plane_and_matches_dense_form():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(6, 2)))[0].T  # 2 orthonormal directions in 6-d
    x = rng.normal(size=(200, 2)) * [5.0, 2.0] @ basis + 3.0
    mean, comps = ev.pca_fit(x, 2)
    assert comps.shape == (2, 6)
    assert np.allclose(comps @ comps.T, np.eye(2), atol=1e-5)
    # the components span the plane: projecting the basis onto them keeps its length
    assert np.allclose(np.linalg.norm(basis @ comps.T, axis=1), 1.0, atol=1e-4)
    assert np.allclose(mean, x.mean(axis=0), atol=1e-4)
    # (x - mean) C^T == x W^T + b with W = C, b = -mean C^T: the Dense layer form
    y = ev.pca_apply(x, mean, comps, normalize=False)
    assert np.allclose(y, x @ comps.T - mean @ comps.T, atol=1e-3)
    assert np.allclose(np.linalg.norm(ev.pca_apply(x, mean, comps), axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        ev.pca_fit(x, 7)


def test_recall_at_k():
    assert ev.recall_at_k([[1, 2, 3]], [[1, 2, 4]], k=3) == pytest.approx(2 / 3)
    assert ev.recall_at_k([["a", "b"], ["c", "d"]], [["b", "a"], ["c", "d"]], k=2) == 1.0


def test_stratified_split_is_stratified_deterministic_and_stable():
    labels = ["a"] * 9 + ["b"] * 3 + ["c"] * 1
    keys = [f"{lab}/{i}.jpg" for i, lab in enumerate(labels)]
    train, held = stratified_split(labels, keys, 1 / 3, seed=0)
    assert sorted(train.tolist() + held.tolist()) == list(range(13))
    held_labels = [labels[i] for i in held]
    assert held_labels.count("a") == 3 and held_labels.count("b") == 1 and held_labels.count("c") == 0
    again = stratified_split(labels, keys, 1 / 3, seed=0)
    assert np.array_equal(again[1], held)
    other = stratified_split(labels, keys, 1 / 3, seed=1)
    assert not np.array_equal(other[1], held)
    # adding a file to class a does not move the others between sides... beyond that class's quota
    labels2, keys2 = [*labels, "b"], [*keys, "b/new.jpg"]
    _, held2 = stratified_split(labels2, keys2, 1 / 3, seed=0)
    assert {keys2[i] for i in held2 if labels2[i] == "a"} == {keys[i] for i in held if labels[i] == "a"}
    with pytest.raises(ValueError):
        stratified_split(labels, keys, 1.5)


def test_encode_labels():
    codes, classes = ev.encode_labels(["dog", "cat", "dog"])
    assert classes == ["cat", "dog"] and codes.tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------------------------- the command
REQUIRED = {"model", "images", "book_precision_at_4", "class_balanced_precision_at_4", "top1", "top5", "map_at_10",
            "tag_accuracy", "tag_coverage"}


def test_evaluate_cli_json_report_and_cached_rerun(tmp_path, tiny_clip):
    import json

    tree = make_tree(tmp_path / "tree", broken=True)
    data = tmp_path / "data"
    out = tmp_path / "report"
    first = _run(["evaluate", tree, "-m", tiny_clip, "--json", "--out", out, "--pca", "2,4", "--near-duplicates", 3],
                 data)
    assert first.exit_code == 0, first.output
    rows = json.loads(first.stdout)
    assert len(rows) == 1 and set(rows[0]) >= REQUIRED
    row = rows[0]
    assert row["images"] == 18 and row["skipped"] == 1 and row["embedded_now"] == 18
    assert "skipping" in first.stderr and "broken.jpg" in first.stderr
    assert all(0 <= row[k] <= 100 for k in REQUIRED - {"model", "images"})
    assert [p["dim"] for p in row["pca"]] == [2, 4, row["dim"]]
    assert row["store"][0]["quantization"] == "none" and 0 <= row["store"][0]["recall_at_10_hnsw"] <= 1
    assert row["near_duplicates"]["copies"] == 3
    assert {"report.md", "pca.png"} <= {p.name for p in out.iterdir()}
    assert any(p.name.startswith("worst-") for p in out.iterdir())
    assert "| model |" in (out / "report.md").read_text()

    again = _run(["evaluate", tree, "-m", tiny_clip, "--json", "--no-ann", "--pca", ""], data)
    row2 = json.loads(again.stdout)[0]
    assert row2["embedded_now"] == 0  # every vector came from the cache
    assert row2["book_precision_at_4"] == row["book_precision_at_4"]
    assert "broken.jpg" in again.stderr  # the bad file is still reported on every run


def test_evaluate_cli_held_out_modes(tmp_path, tiny_clip):
    import json

    tree = make_tree(tmp_path / "tree", per_class=6)
    queries = make_tree(tmp_path / "queries", per_class=2, seed=5)
    data = tmp_path / "data"
    split = json.loads(_run(["evaluate", tree, "-m", tiny_clip, "--split", 0.34, "--json", "--no-ann"], data).stdout)[0]
    assert split["queries"] == 6 and split["index"] == 12 and "held-out" in split["mode"]
    assert split["images"] == 18  # JSON `images`: every image loaded; the text table counts the queries
    text = _run(["evaluate", tree, "-m", tiny_clip, "--split", 0.34, "--no-ann", "--pca", ""], data).stdout
    head, first = text.splitlines()[:2]
    assert head.split()[1] == "queries" and first.split()[1] == "6"
    assert "None" not in text and "{" not in text and "seconds: embed " in text
    sep = json.loads(_run(["evaluate", tree, "-m", tiny_clip, "--queries", queries, "--json", "--no-ann"], data).stdout)
    assert sep[0]["queries"] == 6 and sep[0]["index"] == 18
    both = _run(["evaluate", tree, "--split", 0.3, "--queries", queries], data)
    assert both.exit_code != 0 and "either --split or --queries" in both.output


def test_evaluate_cli_on_a_folder_without_classes_says_so(tmp_path, tiny_clip):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "a.png")
    result = _run(["evaluate", flat, "-m", tiny_clip], tmp_path / "data")
    assert result.exit_code == 1 and "no images found" in result.output


def test_combined_model_vectors_come_from_the_parts_caches(tmp_path, tiny_clip):
    from ingest.lab.datasets import image_folder_refs
    from ingest.lab.embedcache import EmbeddingCache, embed_refs
    from search.config import get_settings
    from search.models import get_embedder
    from tests.clip_fixture import build_tiny_clip

    tree = make_tree(tmp_path / "tree", per_class=2, broken=True)
    settings = get_settings(data_dir=tmp_path / "data")
    other = build_tiny_clip(tmp_path / "other", seed=3)
    combo = get_embedder(f"{tiny_clip}+{other}", settings)
    refs = image_folder_refs(tree)
    messages: list[str] = []
    first = embed_refs(refs, combo, settings, cache=EmbeddingCache.for_embedder(combo, settings), warn=messages.append)
    assert first.computed == 12 and len(first.uris) == 6 and len(first.skipped) == 1
    assert len(messages) == 1 and "broken.jpg" in messages[0]
    # exactly what the combined embedder computes itself
    direct = embed_refs(refs, combo, settings, cache=None, warn=lambda m: None)
    assert direct.uris == first.uris
    assert np.allclose(direct.vectors, first.vectors, atol=1e-5)
    again = embed_refs(refs, combo, settings, cache=EmbeddingCache.for_embedder(combo, settings), warn=lambda m: None)
    assert again.computed == 0 and np.array_equal(again.vectors, first.vectors)


@pytest.mark.slow
def test_evaluate_real_lite0_separates_the_shapes(tmp_path):
    import json

    tree = make_tree(tmp_path / "tree", per_class=8)
    result = _run(["evaluate", tree, "-m", "efficientnet-lite0", "--split", 0.25, "--json", "--pca", "4"],
                  tmp_path / "data")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["top1"] >= 80 and row["book_precision_at_4"] >= 70
    assert row["store"][0]["recall_at_10_hnsw"] == 1.0
