"""Model changes without downtime: build the new model's collection beside the old one, then move the alias.

    lookalike migrate --to efficientnet-lite2 [--gate]    build (resumable), optionally gate, switch
    lookalike migrate --rollback                          the alias back to the previous collection
    lookalike migrate --abandon                           stop a migration (its collection is kept)

1. The alias (``LOOKALIKE_ALIAS``, default ``lookalike``) records the migration (``AliasState.migration``):
   from then on every writer — backfill, workers, watch, serve: they all go through ``Pipeline`` — also
   writes what it ingests, updates or forgets into the new collection (``Mirror``).
2. The new collection is built from the stored points: each point's first readable uri whose bytes still
   hash to the point is embedded with the new model, and the point is written with its payload (labels,
   tags, uris) and the same id. Points already there are skipped, so a killed migration resumes where it
   stopped; points with no readable file are reported like backfill failures (a TSV report).
3. ``--gate`` compares both collections on the labelled points (each queries the others: top-1 of the
   10 nearest labelled neighbours' vote, the ``evaluate`` kNN figure) and refuses to switch when the new
   model is worse.
4. The switch moves the alias in one atomic step (Qdrant's alias API; the embedded store's aliases file is
   replaced by rename); the old collection is kept for ``--rollback``. Searchers that follow the alias
   (``Searcher.follow_alias``, which ``serve`` calls) swap model and collection between two queries.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import ConfigError, ImageError, StoreError
from search.images import decode_for
from search.reading import read_bytes
from search.schema import PointRecord, collection_name, sha256_hex

if TYPE_CHECKING:
    from search.models import Embedder
    from search.store import Store
    from search.store.aliases import Aliases, AliasState

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # how stale a writer's view of "is a migration running?" may be


@dataclass
class MigrationReport:
    source: str
    target: str
    model: str
    copied: int = 0
    skipped: int = 0  # already in the new collection (a resumed run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (point id, reason)
    gate: dict[str, float] | None = None
    switched: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "model": self.model, "copied": self.copied,
                "skipped": self.skipped, "failed": len(self.failed), "gate": self.gate, "switched": self.switched,
                "seconds": round(self.seconds, 2)}


# ---------------------------------------------------------------------------------------------- embedding
def _load_image(payload: dict[str, Any], settings: Settings, embedder: Embedder) -> Any:
    """The prepared image of the first stored uri whose bytes still hash to the point; ImageError if none."""
    sha, reasons = str(payload.get("sha256") or ""), []
    for uri in payload.get("uris") or []:
        try:
            data = read_bytes(uri, settings)
            if sha and sha256_hex(data) != sha:
                reasons.append(f"{uri}: changed since it was indexed")
                continue
            return embedder.prepare(decode_for(settings, data, uri, draft=embedder.draft_size).image)
        except ImageError as err:
            reasons.append(str(err))
    raise ImageError(str(payload.get("uris") or "?"), "; ".join(reasons) or "the point has no uri")


def embed_points(points: Sequence[PointRecord], settings: Settings, embedder: Embedder,
                 pool: ThreadPoolExecutor) -> tuple[list[PointRecord], list[tuple[str, str]]]:
    """Points re-embedded with ``embedder`` (payload copied, ``model`` renamed) and (id, reason) failures."""
    def load(p: PointRecord) -> Any:
        try:
            return _load_image(p.payload, settings, embedder)
        except ImageError as err:
            return err

    prepared = list(pool.map(load, points))
    good = [(p, x) for p, x in zip(points, prepared, strict=True) if not isinstance(x, ImageError)]
    failed = [(p.id, x.reason) for p, x in zip(points, prepared, strict=True) if isinstance(x, ImageError)]
    if not good:
        return [], failed
    vectors = embedder.embed_prepared([x for _, x in good])
    return [PointRecord(p.id, v, {**p.payload, "model": embedder.name}) for (p, _), v in
            zip(good, vectors, strict=True)], failed


# ---------------------------------------------------------------------------------------------- dual writes
class Mirror:
    """While a migration runs, repeats a pipeline's writes into the new collection (new points embedded
    with the new model; payload changes and removals copied). Checks the alias at most every second."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self._checked_at = -1e9
        self._state: Any = None
        self._target: tuple[str, Store, Embedder] | None = None
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="lookalike-mirror")

    def _active(self) -> tuple[str, Store, Embedder] | None:
        if not self.settings.alias:
            return None
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY_S:
            self._checked_at = now
            try:
                self._state = self.store.aliases().get(self.settings.alias)
            except NotImplementedError:
                self._state = None
        migration = getattr(self._state, "migration", None)
        if not migration or migration.get("to") == self.store.collection or \
                self._state.target != self.store.collection:
            return None
        if self._target is None or self._target[0] != migration["to"]:
            from search.models import get_embedder
            from search.store import open_store

            target = self.settings.replace(collection=migration["to"], model=migration["model"])
            store, embedder = open_store(target), get_embedder(migration["model"], target)
            store.ensure_collection(embedder.meta())
            self._target = (migration["to"], store, embedder)
        return self._target

    def upsert(self, points: Sequence[PointRecord]) -> None:
        active = self._active()
        if active is None or not points:
            return
        _, store, embedder = active
        copies, failed = embed_points(points, self.settings, embedder, self._pool)
        for pid, reason in failed:
            log.warning("migration: cannot embed new point %s with %s: %s", pid, embedder.name, reason)
        if copies:
            store.upsert(copies)

    def set_payload(self, pid: str, payload: dict[str, Any]) -> None:
        active = self._active()
        if active is not None and active[1].retrieve([pid]):
            active[1].set_payload(pid, payload)

    def forget(self, removals: Iterable[Any]) -> None:
        active = self._active()
        if active is None:
            return
        _, store, _ = active
        for r in removals:
            for pid in r.ids:
                mine = {p.id: p for p in self.store.retrieve([pid])}
                if pid not in mine:
                    store.delete([pid])
                elif store.retrieve([pid]):
                    store.set_payload(pid, {"uris": mine[pid].payload.get("uris") or []})

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._target is not None:
            self._target[1].close()
            self._target = None


# ---------------------------------------------------------------------------------------------- the gate
def knn_accuracy(store: Store, ids: Sequence[str], k: int = 10) -> float:
    """Top-1 of the ``k`` nearest labelled neighbours' vote (leave-one-out) over the points ``ids``."""
    from ingest.tagging import LABELLED, vote

    points = [p for p in store.retrieve(list(ids), with_vectors=True) if p.vector is not None]
    right = 0
    for start in range(0, len(points), 256):
        chunk = points[start:start + 256]
        results = store.search(np.stack([p.vector for p in chunk]), k=k + 1, filter=LABELLED)
        for p, hits in zip(chunk, results, strict=True):
            hits = [h for h in hits if h.id != p.id][:k]
            tags = vote([h.labels for h in hits], [h.score for h in hits], threshold=0.0)
            right += bool(tags) and tags[0][0] in (p.payload.get("labels") or [])
    return right / max(1, len(points))


def gate(source: Store, target: Store, *, queries: int | None = None, seed: int = 0) -> dict[str, float]:
    """Both collections' kNN accuracy on the same labelled points (all of them, or ``queries`` sampled: a
    sample of 2,000 moved the figure by ±0.5 point on Caltech, as much as two good models differ)."""
    from ingest.tagging import LABELLED

    labelled = [p.id for p in source.scroll(LABELLED)]
    in_both = {p.id for p in target.retrieve(labelled)}
    ids = [i for i in labelled if i in in_both]
    random.Random(seed).shuffle(ids)
    ids = ids[:queries] if queries else ids
    return {"queries": float(len(ids)), "old": knn_accuracy(source, ids), "new": knn_accuracy(target, ids)}


# ---------------------------------------------------------------------------------------------- the command
def migrate(settings: Settings, to_model: str, *, use_gate: bool = False, batch: int = 64,
            progress: bool = False, report: Path | None = None,
            on_batch: Callable[[int], None] | None = None) -> MigrationReport:
    """Build ``to_model``'s collection from the alias's current one, gate, switch (see the module docstring)."""
    from tqdm import tqdm

    from search.models import get_embedder
    from search.store import open_store, resolve

    start = time.perf_counter()
    current = resolve(settings.replace(collection=None))
    source = open_store(current)
    try:
        if source.meta() is None:
            raise StoreError(f"collection '{source.collection}' is empty: nothing to migrate")
        aliases = source.aliases()
        state = aliases.ensure(settings.alias, source.collection)
        target_name = collection_name(to_model)
        if target_name == state.target:
            raise ConfigError(f"the alias '{settings.alias}' already names {target_name} ({to_model})")
        embedder = get_embedder(to_model, settings)
        target = open_store(settings.replace(collection=target_name, model=to_model))
        try:
            target.ensure_collection(embedder.meta())
            aliases.begin_migration(settings.alias, target_name, to_model)
            out = MigrationReport(source.collection, target_name, to_model)
            total = source.count()
            bar = tqdm(total=total, unit="pt", file=sys.stderr, disable=not progress, desc=f"migrating to {to_model}")
            with ThreadPoolExecutor(4, thread_name_prefix="lookalike-migrate") as pool, target.bulk():
                for chunk in _chunks(source.scroll(batch=batch), batch):
                    have = {p.id for p in target.retrieve([p.id for p in chunk])}
                    todo = [p for p in chunk if p.id not in have]
                    out.skipped += len(chunk) - len(todo)
                    copies, failed = embed_points(todo, current, embedder, pool)
                    if copies:  # payloads re-read just before writing: a writer may have merged a uri since
                        fresh = {p.id: p.payload for p in source.retrieve([c.id for c in copies])}
                        target.upsert([PointRecord(c.id, c.vector, {**fresh.get(c.id, c.payload), "model": to_model})
                                       for c in copies])
                    out.copied += len(copies)
                    out.failed.extend(failed)
                    bar.update(len(chunk))
                    if on_batch is not None:
                        on_batch(out.copied + out.skipped)
            bar.close()
            _write_report(report, out.failed)
            if target.count() and target.optimize():
                log.info("built the HNSW index of %s", target_name)
            if use_gate:
                out.gate = gate(source, target)
                if out.gate["new"] < out.gate["old"]:
                    aliases.end_migration(settings.alias)
                    out.seconds = time.perf_counter() - start
                    return out
            aliases.switch(settings.alias, target_name)
            out.switched = True
        finally:
            target.close()
    finally:
        source.close()
    out.seconds = time.perf_counter() - start
    return out


def _chunks(items: Iterable[PointRecord], size: int) -> Iterable[list[PointRecord]]:
    chunk: list[PointRecord] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_report(path: Path | None, failed: list[tuple[str, str]]) -> None:
    if path is None or not failed:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("id\treason\n")
        fh.writelines(f"{pid}\t{reason.replace(chr(9), ' ').replace(chr(10), ' ')}\n" for pid, reason in failed)


@contextlib.contextmanager
def _aliases(settings: Settings) -> Iterator[Aliases]:
    """The store's aliases, for writing: on the embedded store through an open store, so the data dir's lock
    is held (a running server or worker makes this a clear StoreLocked error, not a lost update)."""
    from search.store import open_aliases, open_store, resolve

    if settings.qdrant_url:
        aliases = open_aliases(settings)
        try:
            yield aliases
        finally:
            aliases.close()
        return
    store = open_store(resolve(settings))
    try:
        yield store.aliases()
    finally:
        store.close()


def rollback(settings: Settings) -> AliasState:
    """Point the alias back at the collection it named before the last switch."""
    with _aliases(settings) as aliases:
        state = aliases.get(settings.alias)
        if state is None or not state.previous:
            raise ConfigError(f"the alias '{settings.alias}' has no previous collection to go back to")
        return aliases.switch(settings.alias, state.previous)


def abandon(settings: Settings) -> AliasState:
    """Stop dual writes of an unfinished migration (its collection is kept; run migrate again to resume)."""
    with _aliases(settings) as aliases:
        return aliases.end_migration(settings.alias)


__all__ = ["MigrationReport", "Mirror", "abandon", "embed_points", "gate", "knn_accuracy", "migrate", "rollback"]
