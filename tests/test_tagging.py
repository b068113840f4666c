"""Auto-tagging: the vote rule, the Tagger against a real embedded store, resumable re-tagging, zero-shot."""

from __future__ import annotations

import numpy as np
import pytest

from ingest import tagging
from ingest.tagging import Prompt, Tagger, parse_prompts, retag, vote
from search.config import get_settings
from search.errors import ConfigError
from search.schema import PointRecord, point_id, sha256_hex
from tests.clirun import run_cli
from tests.fakes import TinyEmbedder as FakeEmbedder

# embedders are cached per process; each test starts without any (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("_fresh_embedders")


# -- the pure vote --------------------------------------------------------------------------------------
def test_vote_majority_and_threshold():
    labels = [["cat"], ["cat"], ["dog"], ["cat"]]
    scores = [0.9, 0.9, 0.9, 0.9]
    out = vote(labels, scores, threshold=0.6, temperature=None)
    assert out == [("cat", pytest.approx(0.75), [0, 1, 3])]
    # below the threshold: untagged rather than guessed
    assert vote(labels, scores, threshold=0.8, temperature=None) == []
    assert vote([], [], threshold=0.1) == []


def test_vote_similarity_weighting_and_multi_label():
    # a much nearer neighbour outweighs two far ones with a small temperature, not with a plain majority
    labels = [["dog"], ["cat"], ["cat"]]
    scores = [0.95, 0.70, 0.70]
    assert vote(labels, scores, threshold=0.5, temperature=None)[0][0] == "cat"
    weighted = vote(labels, scores, threshold=0.5, temperature=0.05)
    assert weighted[0][0] == "dog" and weighted[0][1] > 0.98
    # multi-label neighbours: every label of a neighbour gets its weight; both can pass the threshold
    both = vote([["cat", "pet"], ["cat", "pet"], ["dog", "pet"]], [0.9, 0.9, 0.9], threshold=0.6, temperature=None)
    assert [(t[0], round(t[1], 3)) for t in both] == [("pet", 1.0), ("cat", 0.667)]
    with pytest.raises(ValueError):
        vote([["a"]], [0.1, 0.2], threshold=0.5)


def test_parse_prompts():
    prompts = parse_prompts(["# comment", "", "cat", "dog: a blurry photo of a dog ", "dog:"])
    assert prompts == [Prompt("cat", "a photo of a cat"), Prompt("dog", "a blurry photo of a dog"),
                       Prompt("dog", "a photo of a dog")]
    with pytest.raises(ConfigError):
        parse_prompts([": nothing"])


# -- the Tagger against a real embedded store ------------------------------------------------------------
TEXTS = {"a photo of a cat": [1, 0, 0, 0], "a photo of a dog": [0, 1, 0, 0], "a car": [0, 0, 1, 0]}


def TinyEmbedder() -> FakeEmbedder:
    """The Tagger only needs name/dim/supports_text (and embed_texts for zero-shot)."""
    return FakeEmbedder("tiny-test", dim=4, preprocessing="test-v1")


def TinyTextEmbedder() -> FakeEmbedder:
    return FakeEmbedder("tiny-test", dim=4, preprocessing="test-v1", texts=TEXTS)


def _vec(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def _point(name: str, vector: np.ndarray, labels: list[str]) -> PointRecord:
    sha = sha256_hex(name.encode())
    return PointRecord(id=point_id(sha), vector=vector,
                       payload={"sha256": sha, "uris": [f"/x/{name}.jpg"], "labels": labels, "tags": []})


@pytest.fixture()
def store(tmp_path):
    from search.store import open_store

    settings = get_settings(data_dir=tmp_path / "data", model="tiny-test")
    s = open_store(settings)
    s.ensure_collection(TinyEmbedder().meta())
    yield s, settings
    s.close()


def _fill(store) -> dict[str, PointRecord]:
    pts = {
        "cat1": _point("cat1", _vec(1, 0.05, 0, 0), ["cat"]),
        "cat2": _point("cat2", _vec(1, 0.10, 0, 0), ["cat"]),
        "cat3": _point("cat3", _vec(1, 0.00, 0.05, 0), ["cat"]),
        "dog1": _point("dog1", _vec(0.05, 1, 0, 0), ["dog"]),
        "dog2": _point("dog2", _vec(0.10, 1, 0, 0), ["dog"]),
        "new_cat": _point("new_cat", _vec(1, 0.07, 0.02, 0), []),
        "between": _point("between", _vec(1, 1, 0, 0), []),
    }
    store.upsert(list(pts.values()))
    return pts


def test_tagger_uses_labelled_neighbours_excludes_itself_and_abstains(store):
    store, settings = store
    pts = _fill(store)
    settings = get_settings(data_dir=settings.data_dir, tag_k=3, tag_threshold=0.8)
    tagger = Tagger(store, TinyEmbedder(), settings)
    vectors = np.stack([pts["new_cat"].vector, pts["cat1"].vector, pts["between"].vector])
    out = tagger.tag(vectors, exclude_ids=[pts["new_cat"].id, pts["cat1"].id, pts["between"].id])
    assert [t["label"] for t in out[0]] == ["cat"]
    assert out[0][0]["method"] == "knn" and out[0][0]["score"] >= 0.8
    assert set(out[0][0]["neighbours"]) <= {pts[n].id for n in ("cat1", "cat2", "cat3")}
    # a labelled point never votes for itself: cat1's neighbours are cat2/cat3 (+ a dog)
    assert pts["cat1"].id not in out[1][0]["neighbours"]
    # exactly between cats and dogs with k=3 (2 cats + 1 dog, similar scores): no confident tag
    assert out[2] == []


def test_tagger_without_labelled_points_and_without_prompts_tags_nothing(tmp_path):
    from search.store import open_store

    settings = get_settings(data_dir=tmp_path / "d", model="tiny-test")
    with open_store(settings) as s:
        s.ensure_collection(TinyEmbedder().meta())
        s.upsert([_point("x", _vec(1, 0, 0, 0), [])])
        assert Tagger(s, TinyEmbedder(), settings).tag(np.stack([_vec(1, 0, 0, 0)])) == [[]]


def test_zero_shot_only_when_no_labelled_neighbours(tmp_path):
    from search.store import open_store

    settings = get_settings(data_dir=tmp_path / "d", model="tiny-test", tag_threshold=0.6)
    prompts = ["cat", "dog", "car: a car"]
    with open_store(settings) as s:
        s.ensure_collection(TinyEmbedder().meta())
        tagger = Tagger(s, TinyTextEmbedder(), settings, prompts=prompts)
        out = tagger.tag(np.stack([_vec(0.1, 1, 0, 0), _vec(1, 1, 1, 0)]))
        assert out[0] == [{"label": "dog", "score": pytest.approx(1.0, abs=1e-3), "method": "zero-shot",
                           "prompt": "a photo of a dog"}]
        assert out[1] == []  # equally close to all three prompts: below the threshold
        # once a labelled neighbour exists, kNN decides and zero-shot stays out of it
        s.upsert([_point("c", _vec(0.1, 1, 0, 0), ["cat"])])
        knn = tagger.tag(np.stack([_vec(0.1, 1, 0, 0)]))
        assert knn[0][0]["method"] == "knn" and knn[0][0]["label"] == "cat"


def test_prompts_ignored_for_a_model_without_text(tmp_path, caplog):
    settings = get_settings(data_dir=tmp_path / "d")
    tagger = Tagger(store=None, embedder=TinyEmbedder(), settings=settings, prompts=["cat", "dog"])  # type: ignore[arg-type]
    assert tagger.prompts == []
    assert "cannot embed text" in caplog.text


def test_prompts_file_from_settings(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("cat\ndog: a dog\n")
    settings = get_settings(data_dir=tmp_path / "d", tag_prompts=f)
    tagger = Tagger(store=None, embedder=TinyTextEmbedder(), settings=settings)  # type: ignore[arg-type]
    assert [p.label for p in tagger.prompts] == ["cat", "dog"]
    with pytest.raises(ConfigError, match="prompts"):
        Tagger(None, TinyTextEmbedder(), get_settings(data_dir=tmp_path, tag_prompts=tmp_path / "nope"))  # type: ignore[arg-type]


# -- re-tagging, resumable -------------------------------------------------------------------------------
def test_retag_writes_tags_and_resumes_after_interruption(tmp_path):
    from search.store import open_store

    settings = get_settings(data_dir=tmp_path / "d", model="tiny-test", tag_k=3, tag_threshold=0.6)
    rng = np.random.default_rng(0)
    with open_store(settings) as s:
        s.ensure_collection(TinyEmbedder().meta())
        labelled = [_point(f"l{i}", _vec(1, *rng.normal(0, 0.05, 3)), ["cat"]) for i in range(5)]
        unlabelled = [_point(f"u{i}", _vec(1, *rng.normal(0, 0.05, 3)), []) for i in range(7)]
        s.upsert(labelled + unlabelled)
        tagger = Tagger(s, TinyEmbedder(), settings)

        calls = []

        def stop_after_first(stats):
            calls.append(stats.tagged)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            retag(s, tagger, settings, batch=3, on_batch=stop_after_first)
        ckpt = tagging.checkpoint_path(settings, s.collection)
        assert len(ckpt.read_text().split()) == 3
        done_first = set(ckpt.read_text().split())

        stats = retag(s, tagger, settings, batch=3)
        assert stats.resumed and stats.skipped == 3 and stats.seen == 4 and stats.tagged == 4
        assert not ckpt.exists()
        for rec in s.retrieve([p.id for p in unlabelled]):
            assert [t["label"] for t in rec.payload["tags"]] == ["cat"], rec.id
        assert done_first <= {p.id for p in unlabelled}
        # labelled points are left alone by default
        assert all(r.payload["tags"] == [] for r in s.retrieve([p.id for p in labelled]))
        # a fresh run (no checkpoint) does them all again; --restart forgets a stale checkpoint
        ckpt.write_text(f"{unlabelled[0].id}\n")
        assert retag(s, tagger, settings, restart=True).seen == 7


# -- the `tag` command through the real pipeline (tiny random CLIP) ----------------------------------------
def _cli(args, data, model, **kwargs):
    return run_cli(["--model", model, *args], data, **{"catch_exceptions": True, **kwargs})


def _payloads(data, model):
    from search.store import open_store

    with open_store(get_settings(data_dir=data, model=str(model))) as s:
        return {r.id: r.payload for r in s.scroll()}


def test_tag_command_tags_unlabelled_points_and_resumes_after_a_crash(tmp_path, tiny_clip, monkeypatch):
    from tests.imagefactory import make_tree

    data = tmp_path / "data"
    labelled = make_tree(tmp_path / "labelled", per_class=4)
    fresh = make_tree(tmp_path / "fresh", per_class=2, seed=9)
    assert _cli(["backfill", labelled, "--labels-from-dirs", "--no-tag"], data, tiny_clip).exit_code == 0
    assert _cli(["backfill", fresh, "--no-tag"], data, tiny_clip).exit_code == 0
    monkeypatch.setenv("LOOKALIKE_TAG_THRESHOLD", "0")  # random CLIP: accept any vote so every point gets a tag

    calls = {"n": 0}
    real_tag = Tagger.tag

    def crash_on_second_batch(self, vectors, exclude_ids=()):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_tag(self, vectors, exclude_ids)

    monkeypatch.setattr(Tagger, "tag", crash_on_second_batch)
    crashed = _cli(["tag", "--batch", 2], data, tiny_clip)
    assert crashed.exit_code != 0 and isinstance(crashed.exception, RuntimeError)
    monkeypatch.setattr(Tagger, "tag", real_tag)
    tagged_before = [p for p in _payloads(data, tiny_clip).values() if p.get("tags")]
    assert len(tagged_before) == 2  # the first batch was written before the crash

    resumed = _cli(["tag", "--batch", 2, "--json"], data, tiny_clip)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr
    import json

    stats = json.loads(resumed.stdout)
    assert stats == {"seen": 4, "skipped": 2, "tagged": 4, "untagged": 0, "resumed": True}
    payloads = _payloads(data, tiny_clip)
    unlabelled = [p for p in payloads.values() if not p.get("labels")]
    assert len(unlabelled) == 6 and all(p["tags"] and p["tags"][0]["method"] == "knn" for p in unlabelled)
    assert all(set(t["neighbours"]) <= {pid for pid, q in payloads.items() if q.get("labels")}
               for p in unlabelled for t in p["tags"])
    # finished: the next run starts afresh
    assert json.loads(_cli(["tag", "--json"], data, tiny_clip).stdout)["resumed"] is False


def test_tag_command_zero_shot_with_clip_prompts(tmp_path, tiny_clip, monkeypatch):
    import json

    from tests.imagefactory import make_tree

    data = tmp_path / "data"
    assert _cli(["backfill", make_tree(tmp_path / "t", per_class=2), "--no-tag"], data, tiny_clip).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\ndog: a dog\ncar\n")
    monkeypatch.setenv("LOOKALIKE_TAG_THRESHOLD", "0")
    result = _cli(["tag", "--prompts", prompts, "--json"], data, tiny_clip)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tagged"] == 6
    for payload in _payloads(data, tiny_clip).values():
        (tag,) = payload["tags"]
        assert tag["method"] == "zero-shot" and tag["label"] in {"cat", "dog", "car"} and tag["prompt"]


def test_tag_command_on_an_empty_collection(tmp_path, tiny_clip):
    result = _cli(["tag"], tmp_path / "data", tiny_clip)
    assert result.exit_code == 1 and "backfill" in result.output
