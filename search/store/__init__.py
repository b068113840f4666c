"""One ``Store`` over Qdrant, with two backends behind the same contract.

* ``EdgeStore`` (default, embedded): ``qdrant-edge-py`` runs the Qdrant engine in this process, one
  shard folder per collection under ``<data_dir>/qdrant/<collection>``; the collection metadata lives in
  ``lookalike.json`` inside that folder. One process at a time: an ``fcntl.flock`` on
  ``<data_dir>/qdrant/.lock`` (holding the owner's PID) is taken *before* the shard is opened, because a
  second opener that fails on the WAL lock breaks the first handle's next ``flush()``. Within one
  process ``open_store`` hands out one shared, ref-counted handle per collection folder.
* ``ClientStore``: ``qdrant_client.QdrantClient`` — a Qdrant server (``LOOKALIKE_QDRANT_URL``) for
  several processes, or any client a caller builds (tests use local mode ``:memory:``). Metadata goes into
  the collection's own ``metadata``. Unreachable servers raise ``StoreUnavailable`` (transient).

Durability (edge, measured): ``update()`` appends to the WAL through the page cache without fsync, which
already survives SIGKILL of this process; ``flush()`` msyncs the WAL and segments so points also survive
an OS crash. Writes therefore flush before they return: 3.5-11 ms per call on an idle machine, but the flush
waits on engine threads, so under heavy CPU contention it took ~300 ms. ``with store.bulk():`` skips the
per-call flush for re-runnable bulk work (backfill, tagging, a worker's chunk) and makes the block durable
once at the end (a WAL fsync; the shard's full flush once 4,096 points wait for one).

Search (edge): exact until HNSW is built: in the background once ``hnsw_threshold`` points are unindexed (a
copy of the shard optimized by a child process, then swapped in; writes and searches go on, points written
meanwhile are carried over; see ``edge``), or by ``optimize()`` (blocking; the end of a backfill). At 1M
256-d int8 points: p50 2.1 ms, recall@10 0.966 (benchmarks/results/million.md).
After that, a *selective* filter (few matching points) is searched exactly: filtered HNSW lost recall at
1M points, and scoring a few thousand vectors exactly is cheap (see benchmarks/results/search.md).

Modules, each importing only those before it (the qdrant libraries are imported inside functions, so
importing this package stays cheap):

* ``base``    the ``Store`` contract, tuning constants, point-id/vector checks, the mismatch message
* ``lock``    the data-dir lock (``_DirLock``), its PID file, the registry of open embedded stores, fork/exit
              handling (it names ``EdgeStore`` for type checking only)
* ``filters`` the one translation of ``search.schema.Filter`` into either backend's Qdrant filter
* ``build``   background index builds (``BackgroundBuilds``, names ``EdgeStore`` for type checking only)
* ``edge``    ``EdgeStore`` and ``_open_edge``
* ``client``  ``ClientStore``
* here        ``open_store`` and ``StoreUser``
"""

from __future__ import annotations

import sys
import types
from typing import Any

import search.store.base as base
from search.config import Settings
from search.errors import CollectionMismatch, ConfigError
from search.schema import CollectionMeta
from search.store.aliases import Aliases, AliasState, FileAliases, ServerAliases
from search.store.base import NAME_RE, Store, _mismatch_message
from search.store.client import ClientStore
from search.store.edge import META_FILE, EdgeStore, _open_edge
from search.store.lock import LOCK_FILE
from search.store.lock import _DirLock as _DirLock  # probed by workers.app
from search.store.lock import _locked_message as _locked_message  # used by tests

__all__ = ["LOCK_FILE", "META_FILE", "AliasState", "Aliases", "ClientStore", "EdgeStore", "Store", "StoreUser",
           "open_aliases", "open_store", "resolve"]


class StoreUser:
    """Base for things that work on one collection (the pipeline, the searcher): the store is opened from
    ``settings`` on first use unless one was handed in, and ``close()`` closes only a store opened here."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.requested = settings  # before the alias was resolved (follow_alias resolves it again)
        self._store = store
        self._own_store = store is None

    @property
    def store(self) -> Store:
        if self._store is None:
            self.settings = resolve(self.settings)  # the alias names the collection (and its model)
            self._store = open_store(self.settings)
        return self._store

    def check_model(self, model: str) -> CollectionMeta | None:
        """The collection's metadata (None if it does not exist yet); refuses a collection built with another
        model by name alone, so the check costs no model load."""
        meta = self.store.meta()
        if meta is not None and meta.model != model:
            want = CollectionMeta(model=model, dim=meta.dim, preprocessing=meta.preprocessing)
            raise CollectionMismatch(_mismatch_message(self.store.collection, meta, want))
        return meta

    def close(self) -> None:
        if self._store is not None and self._own_store:
            self._store.close()
            self._store = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_aliases(settings: Settings) -> Aliases:
    """The aliases of the store ``settings`` name (no collection is opened)."""
    if settings.qdrant_url:
        return ServerAliases(ClientStore.from_settings(settings, settings.collection_name).client, owns_client=True)
    return FileAliases((settings.data_dir.expanduser() / "qdrant").resolve())


def resolve(settings: Settings) -> Settings:
    """The collection (and model) to use: an explicit ``LOOKALIKE_COLLECTION`` wins; otherwise the alias
    (``LOOKALIKE_ALIAS``) names the collection, and its model is used unless a model was asked for — a model
    asked for that differs from the alias's uses its own collection (``lookalike_<model>``). Without an alias
    (a store from before aliases, or an empty one), the model's own collection."""
    if settings.collection or not settings.alias:
        return settings
    aliases = open_aliases(settings)
    try:
        state = aliases.get(settings.alias)
        meta = aliases.meta_of(state.target) if state is not None else None
    finally:
        aliases.close()
    if state is None:
        return settings
    if meta is not None and "model" in settings.model_fields_set and meta.model != settings.model:
        return settings
    return settings.replace(collection=state.target, model=meta.model if meta is not None else settings.model)


def open_store(settings: Settings, collection: str | None = None) -> Store:
    """The store for ``collection`` (default ``settings.collection_name``): a Qdrant server when
    ``settings.qdrant_url`` is set, else the embedded store under ``settings.data_dir / "qdrant"``.
    Embedded: one shared handle per collection in this process (close() is ref-counted); another process
    holding the data dir raises StoreLocked."""
    name = collection or settings.collection_name
    if not NAME_RE.match(name):
        raise ConfigError(f"collection name {name!r} is not valid: use letters, digits, '_', '-', '.' "
                          f"(--collection/LOOKALIKE_COLLECTION)")
    if settings.qdrant_url:
        return ClientStore.from_settings(settings, name)
    return _open_edge(settings, name)


class _Package(types.ModuleType):
    """``search.store.HNSW_EF`` (and the other ``base.TUNABLES``) read and write ``base``'s value, which is
    the one the backends use: a benchmark that sets it here still changes what the stores do."""

    def __getattr__(self, name: str) -> Any:
        if name in base.TUNABLES:
            return getattr(base, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in base.TUNABLES:
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *base.TUNABLES})


sys.modules[__name__].__class__ = _Package
