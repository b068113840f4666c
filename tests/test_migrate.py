"""Model changes without downtime: aliases, ``migrate`` (build, dual writes, gate, switch, rollback, resume
after a kill) — two tiny fake models registered as a model family, over the real embedded store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest import migrate as mig
from ingest.pipeline import Pipeline
from ingest.sources import ImageRef, iter_refs
from search.config import Settings, get_settings
from search.models import registry
from search.query import Searcher
from search.store import open_aliases, open_store, resolve
from tests.fakes import TinyEmbedder
from tests.imagefactory import make_tree, photo

REPO = Path(__file__).resolve().parents[1]


class Blind(TinyEmbedder):
    """A useless model: every image gets (almost) the same vector, so its kNN vote is no better than chance."""

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        rng = np.random.default_rng(len(items))
        x = np.ones((len(items), self.dim), np.float32) + 0.01 * rng.standard_normal((len(items), self.dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


MODELS = {"tiny-a": lambda: TinyEmbedder("tiny-a"), "tiny-b": lambda: TinyEmbedder("tiny-b", dim=64),
          "tiny-twin": lambda: TinyEmbedder("tiny-twin", preprocessing="twin-v1"),  # tiny-a's vectors again
          "tiny-blind": lambda: Blind("tiny-blind", dim=32, preprocessing="blind-v1")}


def family() -> registry.ModelFamily:
    cache: dict[str, Any] = {}
    return registry.ModelFamily("tiny-test", load=lambda name, settings: cache.setdefault(name, MODELS[name]()),
                                describe=lambda settings: [registry.ModelRow(n, "tiny-test", None, None)
                                                           for n in MODELS])


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(registry, "_registered", [])
    monkeypatch.setattr(registry, "_families", None)
    registry.register_family(family())
    yield
    registry.clear_embedders()


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    root = make_tree(tmp_path / "photos", per_class=8)  # 3 visually distinct classes × 8
    settings = get_settings(data_dir=tmp_path / "data", model="tiny-a")
    with Pipeline(settings, tagger=False) as p:
        p.run(iter_refs([str(root)], labels_from_dirs=True))
    return {"root": root, "settings": get_settings(data_dir=tmp_path / "data"), "tmp": tmp_path}


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _state(settings: Settings) -> Any:
    aliases = open_aliases(settings)
    try:
        return aliases.get(settings.alias)
    finally:
        aliases.close()


def test_the_first_backfill_creates_the_alias_and_clients_follow_it(world: dict[str, Any]) -> None:
    settings = world["settings"]
    assert _state(settings).target == "lookalike_tiny_a"
    resolved = resolve(settings)  # no model asked for: the alias's collection and its model
    assert (resolved.collection, resolved.model) == ("lookalike_tiny_a", "tiny-a")
    asked = resolve(settings.replace(model="tiny-b"))  # a model asked for gets its own collection
    assert asked.collection is None and asked.collection_name == "lookalike_tiny_b"


def test_migrate_builds_switches_and_rolls_back(world: dict[str, Any]) -> None:
    settings = world["settings"]
    out = mig.migrate(settings, "tiny-b")
    assert (out.copied, out.skipped, out.failed, out.switched) == (24, 0, [], True)
    state = _state(settings)
    assert (state.target, state.previous, state.migration) == ("lookalike_tiny_b", "lookalike_tiny_a", None)
    with Searcher(settings) as s:
        assert s.embedder.name == "tiny-b" and s.store.collection == "lookalike_tiny_b"
        old = {p.id: p.payload for p in open_store(settings.replace(collection="lookalike_tiny_a")).scroll()}
        new = {p.id: p.payload for p in s.store.scroll()}
    assert set(new) == set(old)  # same ids: other services' references stay valid
    assert all(new[i]["labels"] == old[i]["labels"] and new[i]["model"] == "tiny-b" for i in new)
    mig.rollback(settings)
    assert _state(settings).target == "lookalike_tiny_a"
    with pytest.raises(Exception, match="already names"):
        mig.migrate(settings, "tiny-a")


def test_writers_write_to_both_collections_while_a_migration_runs(world: dict[str, Any]) -> None:
    settings, root = world["settings"], world["root"]
    with Pipeline(settings, tagger=False) as p:
        p.store.aliases().begin_migration(settings.alias, "lookalike_tiny_b", "tiny-b")
        new = photo(_mk(root / "red_disc" / "new.jpg"), seed=77)
        (outcome,) = p.ingest([ImageRef(str(new), ("red_disc",))])
        target = open_store(settings.replace(collection="lookalike_tiny_b", model="tiny-b"))
        try:
            mirrored = target.retrieve([outcome.id], with_vectors=True)
            assert len(mirrored) == 1 and mirrored[0].payload["model"] == "tiny-b"
            assert len(mirrored[0].vector) == 64  # embedded with the new model, not copied
            p.ingest([ImageRef(str(new), ("apple",))])  # a label merged later reaches the copy too
            assert target.retrieve([outcome.id])[0].payload["labels"] == ["red_disc", "apple"]
            p.forget([str(new)])
            assert target.retrieve([outcome.id]) == []
        finally:
            target.close()


def test_the_gate_refuses_a_worse_model(world: dict[str, Any]) -> None:
    settings = world["settings"]
    out = mig.migrate(settings, "tiny-blind", use_gate=True)
    assert out.gate is not None and out.gate["queries"] == 24
    assert out.gate["new"] < out.gate["old"] and not out.switched
    state = _state(settings)
    assert state.target == "lookalike_tiny_a" and state.migration is None  # no switch, dual writes stopped
    assert out.gate["old"] > 0.9  # the classes are easy for the real (tiny) model
    twin = mig.migrate(settings, "tiny-twin", use_gate=True)  # as good as the old one: the switch goes ahead
    assert twin.switched and twin.gate is not None and twin.gate["new"] == twin.gate["old"]


def test_no_query_fails_while_the_alias_switches(world: dict[str, Any]) -> None:
    settings = world["settings"]
    errors: list[BaseException] = []
    served: list[str] = []
    stop = threading.Event()
    with Searcher(settings) as searcher:
        query = next(iter(searcher.store.scroll())).id

        def loop() -> None:
            while not stop.is_set():
                try:
                    searcher.follow_alias()
                    hits = searcher.by_ids([query], k=3)[0]
                    assert len(hits) == 3
                    served.append(searcher.store.collection)
                except BaseException as err:  # counted, not raised: the test asserts there were none
                    errors.append(err)

        thread = threading.Thread(target=loop)
        thread.start()
        try:
            time.sleep(0.2)
            assert mig.migrate(settings, "tiny-b").switched
            deadline = time.monotonic() + 10
            while (not served or served[-1] != "lookalike_tiny_b") and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(10)
    assert errors == [] and len(served) > 10
    assert served[0] == "lookalike_tiny_a" and served[-1] == "lookalike_tiny_b"


def test_a_killed_migration_resumes_where_it_stopped(world: dict[str, Any]) -> None:
    settings = world["settings"]
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from search.models import registry
        from tests.test_migrate import family
        from ingest import migrate as mig
        from search.config import get_settings
        registry.register_family(family())
        def slow(done):
            print(done, flush=True)
            time.sleep(0.3)
        mig.migrate(get_settings(data_dir={str(settings.data_dir)!r}), "tiny-b", batch=4, on_batch=slow)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None
    progress = [int(child.stdout.readline() or 0) for _ in range(3)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert progress == [4, 8, 12], child.stderr.read().decode() if child.stderr else ""
    assert _state(settings).migration == {"to": "lookalike_tiny_b", "model": "tiny-b"}  # still running
    out = mig.migrate(settings, "tiny-b", batch=4)
    assert out.skipped >= 12 and out.copied + out.skipped == 24 and out.switched
    with Searcher(settings) as s:
        assert s.store.count() == 24
