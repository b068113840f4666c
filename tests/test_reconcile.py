"""Keeping the index in step with the disk: delete by uri/id, and ``reconcile`` (gone, moved, found, changed,
new) — with the tiny fake model over the real embedded store and real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ingest.pipeline import Pipeline
from ingest.reconcile import reconcile
from ingest.sources import ImageRef, iter_refs
from search.config import Settings, get_settings
from tests.clirun import run_cli
from tests.fakes import TinyEmbedder
from tests.imagefactory import photo


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "photos"
    for i in range(6):
        photo(_mk(root / ("cats" if i < 3 else "dogs") / f"{i}.jpg"), seed=i)
    settings = get_settings(data_dir=tmp_path / "data", model="tiny")
    return {"root": root, "settings": settings}


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _pipeline(settings: Settings) -> Pipeline:
    return Pipeline(settings, embedder=TinyEmbedder(), tagger=False)


def _index(settings: Settings, *paths: Path) -> dict[str, str]:
    """Backfill; uri → point id."""
    with _pipeline(settings) as p:
        outcomes = p.ingest(list(iter_refs([str(x) for x in paths], labels_from_dirs=True)))
    return {o.uri: o.id for o in outcomes if o.id}


def _payloads(settings: Settings) -> dict[str, dict[str, Any]]:
    with _pipeline(settings) as p:
        return {pt.id: pt.payload for pt in p.store.scroll()}


def _run(settings: Settings, root: Path, dry_run: bool = False) -> Any:
    with _pipeline(settings) as p:
        def ingest(paths: list[str]) -> dict[str, int]:
            stats = p.run([ImageRef(x) for x in paths])
            return {"indexed": stats.indexed, "updated": stats.updated, "present": stats.present}

        return reconcile(p.store, [root], settings, dry_run=dry_run, ingest=ingest)


def test_delete_by_uri_and_by_id(world: dict[str, Any]) -> None:
    settings, root = world["settings"], world["root"]
    ids = _index(settings, root)
    copy = root / "cats" / "copy-of-0.jpg"
    shutil.copy(root / "cats" / "0.jpg", copy)
    _index(settings, copy)  # same bytes: one point with two uris
    with _pipeline(settings) as p:
        first = p.forget([str(copy)])
        assert [(r.status, r.ids) for r in first] == [("removed", [ids[str(root / "cats" / "0.jpg")]])]
        second = p.forget([str(root / "cats" / "0.jpg")])
        assert second[0].status == "deleted"  # no uri left: the point goes
        assert p.forget(["/nowhere.jpg"])[0].status == "absent"
        victim = ids[str(root / "dogs" / "3.jpg")]
        assert [r.status for r in p.delete_ids([victim, victim.replace("a", "b", 1)])] == ["deleted", "absent"]
        assert p.store.count() == 4

    result = run_cli(["--model", "tiny", "delete", "--id", "not-a-uuid"], settings.data_dir,
                     catch_exceptions=True)
    assert result.exit_code == 2 and "is not a point id" in result.output


def test_reconcile_finds_gone_moved_found_changed_and_new(world: dict[str, Any]) -> None:
    settings, root = world["settings"], world["root"]
    ids = _index(settings, root)
    os.remove(root / "cats" / "1.jpg")                                         # gone
    (root / "moved").mkdir()
    os.rename(root / "cats" / "2.jpg", root / "moved" / "2.jpg")               # moved
    shutil.copy(root / "dogs" / "3.jpg", root / "dogs" / "3-copy.jpg")         # found (a copy)
    photo(root / "dogs" / "4.jpg", seed=99)                                    # changed in place
    photo(_mk(root / "new" / "9.jpg"), seed=9)                                 # new
    before = _payloads(settings)

    dry = _run(settings, root, dry_run=True)
    assert {k: dry.counts[k] for k in dry.counts} == {"gone": 1, "moved": 1, "found": 1, "changed": 1, "new": 2}
    assert dry.deleted == 2 and _payloads(settings) == before  # a dry run changes nothing

    report = _run(settings, root)
    assert report.counts == dry.counts and report.deleted == 2 and report.ingested["indexed"] == 2
    assert report.hashed == 0  # every file's hash came from the state table of the dry run
    after = _payloads(settings)
    assert ids[str(root / "cats" / "1.jpg")] not in after
    moved = after[ids[str(root / "cats" / "2.jpg")]]  # the same point: nothing was re-embedded
    assert moved["uris"] == [str(root / "moved" / "2.jpg")] and moved["labels"] == ["cats"]
    assert after[ids[str(root / "dogs" / "3.jpg")]]["uris"] == [str(root / "dogs" / "3.jpg"),
                                                                 str(root / "dogs" / "3-copy.jpg")]
    assert ids[str(root / "dogs" / "4.jpg")] not in after  # old bytes gone with their only uri
    by_uri = {u: pid for pid, p in after.items() for u in p["uris"]}
    assert str(root / "dogs" / "4.jpg") in by_uri and str(root / "new" / "9.jpg") in by_uri

    again = _run(settings, root)  # idempotent: a second run finds nothing to do
    assert again.counts == dict.fromkeys(again.counts, 0) and again.deleted == 0
    assert _payloads(settings) == after


def test_reconcile_leaves_uris_outside_its_roots_and_unreadable_files_alone(world: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    settings, root = world["settings"], world["root"]
    elsewhere = photo(_mk(tmp_path / "elsewhere" / "x.jpg"), seed=42)
    big = photo(root / "dogs" / "5.jpg", seed=5, size=(900, 600))
    ids = _index(settings, root, elsewhere)
    assert big.stat().st_size > 10_000 > max(p.stat().st_size for p in root.rglob("*.jpg") if p != big)
    small = settings.replace(max_bytes=10_000)  # the big file exists but cannot be read now
    with _pipeline(small) as p:
        report = reconcile(p.store, [root], small)
    assert report.unreadable == 1 and report.counts == dict.fromkeys(report.counts, 0)
    after = _payloads(settings)
    assert ids[str(elsewhere)] in after and ids[str(big)] in after


def test_reconcile_command_json(world: dict[str, Any]) -> None:
    settings, root = world["settings"], world["root"]
    _index(settings, root)
    os.remove(root / "cats" / "0.jpg")
    result = run_cli(["--model", "tiny", "reconcile", str(root), "--dry-run", "--json"], settings.data_dir,
                     catch_exceptions=True)
    # The tiny model is not loadable by name from the CLI, but a dry run needs no model at all.
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["gone"] == 1 and data["dry_run"] is True and data["examples"]["gone"][0]["uri"].endswith("0.jpg")
