"""The ingestion pipeline against the real embedded store and real files (good and broken).

The network is replaced by ``TinyEmbedder`` (an 8×8 colour thumbnail, normalised): these tests are about
what the pipeline stores, skips and reports, and must stay fast. The real model runs in test_end_to_end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.pipeline import Pipeline
from ingest.sources import ImageRef, iter_refs
from search.config import get_settings
from search.errors import CollectionMismatch
from search.schema import Filter, point_id, sha256_hex
from search.store import open_store
from tests import imagefactory
from tests.fakes import TinyEmbedder
from tests.imagefactory import photo as _photo


@pytest.fixture
def settings(tmp_path: Path):
    return get_settings(data_dir=tmp_path / "data", batch_size=4)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for cls, seeds in {"red": range(0, 5), "blue": range(5, 9)}.items():
        (root / cls).mkdir(parents=True)
        for s in seeds:
            _photo(root / cls / f"img{s}.jpg", s)
    return root


def _pipeline(settings, embedder: TinyEmbedder | None = None) -> Pipeline:
    return Pipeline(settings, embedder=embedder or TinyEmbedder(), tagger=False)


def test_backfill_indexes_each_image_once_with_the_contract_payload(settings, photos: Path) -> None:
    refs = list(iter_refs([photos], labels_from_dirs=True))
    with _pipeline(settings) as p:
        stats = p.run(refs)
        assert (stats.indexed, stats.present, stats.failed) == (9, 0, 0)
        assert p.store.count() == 9
        img = photos / "red" / "img0.jpg"
        pid = point_id(sha256_hex(img.read_bytes()))
        [rec] = p.store.retrieve([pid])
        pl = rec.payload
        assert pl["uris"] == [str(img)] and pl["labels"] == ["red"] and pl["sha256"] == sha256_hex(img.read_bytes())
        assert (pl["width"], pl["height"], pl["format"], pl["bytes"]) == (96, 64, "JPEG", img.stat().st_size)
        assert pl["model"] == "tiny" and pl["source"] == "backfill" and pl["ingested_at"].endswith("Z")
        assert p.store.count(Filter.parse(["label=blue"])) == 4


def test_rerun_is_a_no_op_that_never_decodes_or_embeds(settings, photos: Path) -> None:
    refs = list(iter_refs([photos], labels_from_dirs=True))
    with _pipeline(settings) as p:
        p.run(refs)
    emb = TinyEmbedder()
    with _pipeline(settings, emb) as p:
        stats = p.run(refs)
        assert (stats.indexed, stats.present, stats.updated) == (0, 9, 0)
        assert p.store.count() == 9
    assert emb.calls == 0


def test_same_bytes_from_new_paths_add_uris_and_labels_not_points(settings, photos: Path, tmp_path: Path) -> None:
    original = photos / "red" / "img1.jpg"
    copy = tmp_path / "elsewhere" / "copy.jpg"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    with _pipeline(settings) as p:
        p.run(iter_refs([photos], labels_from_dirs=True))
        [out] = p.ingest([ImageRef(str(copy), labels=("favourite",))])
        assert out.status == "updated"
        [rec] = p.store.retrieve([out.id])
        assert rec.payload["uris"] == [str(original), str(copy)]
        assert rec.payload["labels"] == ["red", "favourite"]
        assert p.store.count() == 9
        [again] = p.ingest([ImageRef(str(copy), labels=("favourite",))])
        assert again.status == "present"


def test_duplicates_inside_one_run_become_one_point_with_every_uri(settings, tmp_path: Path) -> None:
    root = tmp_path / "dups"
    root.mkdir()
    data = _photo(tmp_path / "orig.jpg", 42).read_bytes()
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]  # batch_size=4: copies span two batches
    for n in names:
        (root / n).write_bytes(data)
    with _pipeline(settings) as p:
        stats = p.run(iter_refs([root]))
        assert (stats.indexed, stats.updated) == (1, 5)
        [rec] = list(p.store.scroll())
        assert sorted(rec.payload["uris"]) == [str(root / n) for n in names]


def test_broken_files_are_reported_one_line_each_and_the_batch_goes_on(settings, photos: Path,
                                                                      tmp_path: Path) -> None:
    bad = photos / "bad"
    bad.mkdir()
    broken = imagefactory.write_broken_set(bad)
    report = tmp_path / "report.tsv"
    with _pipeline(settings) as p:
        stats = p.run(iter_refs([photos]), report=report)
        assert stats.indexed == 9
        assert stats.failed == len(broken)
        assert p.store.count() == 9
    lines = report.read_text().splitlines()
    assert lines[0] == "uri\treason" and len(lines) == 1 + len(broken)
    reported = {line.split("\t")[0] for line in lines[1:]}
    assert reported == {str(path) for path in broken}
    assert all(line.split("\t")[1] for line in lines[1:])


def test_interrupted_run_keeps_what_was_written_and_the_next_run_resumes(settings, photos: Path) -> None:
    refs = list(iter_refs([photos], labels_from_dirs=True))

    def interrupted() -> Iterator[ImageRef]:
        for i, ref in enumerate(refs):
            if i == 8:  # batch 1 is written by then, batch 2 is in flight
                raise KeyboardInterrupt
            yield ref

    with _pipeline(settings) as p, pytest.raises(KeyboardInterrupt):
        p.run(interrupted())
    with _pipeline(settings) as p:
        done = p.store.count()
        assert 0 < done < 9
        stats = p.run(refs)
        assert stats.present == done and stats.indexed == 9 - done
        assert p.store.count() == 9


def test_a_collection_built_with_another_model_is_refused_before_any_work(settings, photos: Path) -> None:
    with _pipeline(settings, TinyEmbedder("tiny")) as p:
        p.run(iter_refs([photos]))
    with _pipeline(settings, TinyEmbedder("other")) as p, pytest.raises(CollectionMismatch, match="other"):
        p.run(iter_refs([photos]))


def test_ingest_reports_outcomes_in_order_with_permanent_failures(settings, photos: Path, tmp_path: Path) -> None:
    good = photos / "red" / "img2.jpg"
    missing = tmp_path / "nope.jpg"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with _pipeline(settings) as p:
        outs = p.ingest([ImageRef(str(good)), ImageRef(str(missing)), ImageRef(str(empty))])
    assert [o.status for o in outs] == ["indexed", "failed", "failed"]
    assert outs[1].permanent and outs[1].reason and outs[2].reason
    assert set(outs[0].timings) >= {"read", "decode", "embed", "upsert"}


def test_store_handle_is_released_on_close(settings, photos: Path) -> None:
    with _pipeline(settings) as p:
        p.run(iter_refs([photos]))
    store = open_store(settings)  # would raise StoreLocked if the pipeline leaked its handle
    try:
        assert store.count() == 9
    finally:
        store.close()


def test_a_batch_of_only_broken_files_never_loads_the_model(settings, tmp_path: Path) -> None:
    bad = imagefactory.write_broken_set(tmp_path / "bad")
    with Pipeline(settings, tagger=False) as p:  # no embedder given: it would be loaded on demand
        stats = p.run(iter_refs([tmp_path / "bad"]))
        assert stats.failed == len(bad)
        assert p._embedder is None  # a re-run over known-bad files stays fast: the model never loads


# --------------------------------------------------------------------------------------------- hostile input


def test_copies_of_undecodable_bytes_all_fail_with_the_reason(settings, tmp_path: Path) -> None:
    """The second copy used to be reported "updated" (merged into a point that was never stored)."""
    bad = imagefactory.truncated_png(tmp_path / "a.png").read_bytes()
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]  # batch_size=4: copies span two batches
    for n in names[1:]:
        (tmp_path / n).write_bytes(bad)
    good = _photo(tmp_path / "good.jpg", 1)
    with _pipeline(settings) as p:
        outs = p.ingest([ImageRef(str(tmp_path / "a.png")), ImageRef(str(good)), ImageRef(str(tmp_path / "b.png"))])
        assert [o.status for o in outs] == ["failed", "indexed", "failed"]
        assert outs[0].reason == outs[2].reason and outs[0].reason.startswith("truncated or corrupt image")
        stats = p.run(ImageRef(str(tmp_path / n)) for n in names)
        assert (stats.failed, stats.updated, stats.indexed, stats.present) == (6, 0, 0, 0)
        assert {o.reason for o in stats.failures} == {outs[0].reason}
        assert p.store.count() == 1


def test_hostile_refs_fail_one_by_one_and_the_batch_goes_on(settings, tmp_path: Path) -> None:
    good = [_photo(tmp_path / f"good{i}.jpg", i) for i in range(3)]
    undecodable_name = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    _photo(undecodable_name, 7)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    hostile = {
        "file:///tmp/a%00b.jpg": "the path contains a NUL byte",
        "/tmp/\ud800.jpg": "uri is not UTF-8 text (undecodable bytes or a lone surrogate); it cannot be stored",
        str(undecodable_name): "uri is not UTF-8 text (undecodable bytes or a lone surrogate); it cannot be stored",
        str(fifo): "not a regular file",
        "~no-such-user-here/x.jpg": "cannot expand '~' (no such user, or no home folder)",
    }
    refs = [ImageRef(str(good[0]))] + [ImageRef(u) for u in hostile] + [
        ImageRef(str(good[1]), labels=("\udcff",)),
        ImageRef(str(good[1]), labels=tuple(f"l{i}" for i in range(65))),
        ImageRef(str(good[1]), source="s" * 300),
        ImageRef(str(good[2]), labels=("ok",)),
    ]
    with _pipeline(settings) as p:
        outs = p.ingest(refs)  # nothing raises: every input is judged on its own
        assert [o.status for o in outs] == ["indexed"] + ["failed"] * 8 + ["indexed"]
        assert [o.reason for o in outs[1:6]] == list(hostile.values())
        assert outs[6].reason.startswith("label is not UTF-8 text")
        assert outs[7].reason == "more than 64 labels (65)" and outs[8].reason.startswith("source is longer")
        assert p.store.count() == 2
        stats = p.run(refs)  # the same through the batched path
        assert (stats.present, stats.failed) == (2, 8)


def test_the_report_and_the_log_line_stay_one_line_per_failure(settings, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    forged = imagefactory.garbage(tmp_path / "x.jpg\n\x1b[31mfake\tcolumn.jpg")
    report = tmp_path / "report.tsv"
    with _pipeline(settings) as p, caplog.at_level("WARNING", logger="ingest.pipeline"):
        stats = p.run([ImageRef(str(forged))], report=report)
    assert stats.failed == 1
    lines = report.read_text().splitlines()
    assert len(lines) == 2 and lines[1].count("\t") == 1
    assert lines[1].split("\t")[0] == str(tmp_path) + "/x.jpg\\n\\x1b[31mfake\\tcolumn.jpg"
    [record] = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()


def test_the_decode_memory_limit_is_a_setting(settings, tmp_path: Path) -> None:
    big = imagefactory.float_tiff(tmp_path / "f.tif", block=400)  # 1600 x 400 floats: ~5 MB to decode
    with _pipeline(settings.replace(max_decode_mb=1)) as p:
        [out] = p.ingest([ImageRef(str(big))])
    assert out.status == "failed" and "LOOKALIKE_MAX_DECODE_MB" in (out.reason or "")
