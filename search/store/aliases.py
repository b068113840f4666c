"""Aliases: clients query a name (``lookalike`` by default) that points at one model's collection, so a model
change builds the new collection beside the old one and moves the name atomically.

An alias's state is ``AliasState(target, previous, migration)``: the collection it names now, the one it
named before the last switch (what ``migrate --rollback`` returns to — that collection is kept), and, while a
migration runs, ``{"to": collection, "model": name}`` so that every writer also writes new images there.

* Embedded store: ``<data_dir>/qdrant/aliases.json``, replaced atomically (write, fsync, rename); the data
  dir's lock already makes this process its only writer.
* Qdrant server: the alias itself is Qdrant's (``update_collection_aliases`` deletes and creates in one
  atomic request, so other services querying the alias see the old collection or the new one, never
  neither); ``previous`` and ``migration`` live in the lookalike metadata of the collections involved.

``resolve(settings)`` (in ``search.store``) turns the alias into the collection and model to use.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from search.errors import StoreError
from search.schema import CollectionMeta

ALIASES_FILE = "aliases.json"
META_FILE = "lookalike.json"  # an embedded collection's metadata, beside its shard (written by search.store.edge)


@dataclass(frozen=True)
class AliasState:
    target: str
    previous: str | None = None
    migration: dict[str, str] | None = None  # {"to": collection, "model": model name} while migrating


class Aliases(ABC):
    """Read and move aliases; ``meta_of`` reads a collection's lookalike metadata without opening it."""

    @abstractmethod
    def get(self, alias: str) -> AliasState | None: ...

    @abstractmethod
    def _write(self, alias: str, state: AliasState) -> None: ...

    @abstractmethod
    def meta_of(self, collection: str) -> CollectionMeta | None: ...

    def close(self) -> None:  # noqa: B027 - only the server's aliases hold a connection
        """Release what reading the aliases opened."""

    def ensure(self, alias: str, collection: str) -> AliasState:
        """The alias, created to name ``collection`` when it does not exist yet."""
        state = self.get(alias)
        if state is None:
            state = AliasState(collection)
            self._write(alias, state)
        return state

    def begin_migration(self, alias: str, to: str, model: str) -> AliasState:
        state = self._require(alias)
        if state.migration is not None and state.migration.get("to") != to:
            raise StoreError(f"alias '{alias}' is already migrating to '{state.migration.get('to')}'; finish or "
                             "abandon that first (lookalike migrate --abandon)")
        new = AliasState(state.target, state.previous, {"to": to, "model": model})
        self._write(alias, new)
        return new

    def end_migration(self, alias: str) -> AliasState:
        state = self._require(alias)
        new = AliasState(state.target, state.previous, None)
        self._write(alias, new)
        return new

    def switch(self, alias: str, to: str) -> AliasState:
        """Point ``alias`` at ``to`` (atomically); the old target becomes ``previous``; no migration is left."""
        state = self._require(alias)
        new = AliasState(to, state.target if state.target != to else state.previous, None)
        self._write(alias, new)
        return new

    def _require(self, alias: str) -> AliasState:
        state = self.get(alias)
        if state is None:
            raise StoreError(f"alias '{alias}' does not exist yet: ingest images first (lookalike backfill)")
        return state


class FileAliases(Aliases):
    """The embedded store's aliases, in one JSON file beside the collections."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / ALIASES_FILE

    def _all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise StoreError(f"cannot read {self.path}: {err}; restore it or delete it to use the default "
                             "collection") from None
        return data if isinstance(data, dict) else {}

    def get(self, alias: str) -> AliasState | None:
        raw = self._all().get(alias)
        if not isinstance(raw, dict) or not isinstance(raw.get("target"), str):
            return None
        return AliasState(raw["target"], raw.get("previous"), raw.get("migration"))

    def _write(self, alias: str, state: AliasState) -> None:
        data = self._all()
        data[alias] = asdict(state)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def meta_of(self, collection: str) -> CollectionMeta | None:
        try:
            return CollectionMeta.from_dict(json.loads((self.root / collection / META_FILE).read_text("utf-8")))
        except (OSError, ValueError):
            return None


class ServerAliases(Aliases):
    """Qdrant's own aliases; ``previous``/``migration`` in the lookalike metadata of the target collection."""

    KEY = "lookalike_alias"

    def __init__(self, client: Any, *, owns_client: bool = False) -> None:
        self.client, self._owns = client, owns_client

    def close(self) -> None:
        if self._owns:
            self.client.close()

    def _target(self, alias: str) -> str | None:
        for a in self.client.get_aliases().aliases:
            if a.alias_name == alias:
                return str(a.collection_name)
        return None

    def _metadata(self, collection: str) -> dict[str, Any]:
        try:
            info = self.client.get_collection(collection)
        except Exception:  # a missing collection: no metadata
            return {}
        return dict(getattr(info.config, "metadata", None) or {})

    def get(self, alias: str) -> AliasState | None:
        target = self._target(alias)
        if target is None:
            return None
        extra = self._metadata(target).get(self.KEY) or {}
        return AliasState(target, extra.get("previous"), extra.get("migration"))

    def _write(self, alias: str, state: AliasState) -> None:
        from qdrant_client import models

        self.client.update_collection(state.target, metadata={
            self.KEY: {"alias": alias, "previous": state.previous, "migration": state.migration}})
        ops: list[Any] = []
        if self._target(alias) not in (None, state.target):
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        if self._target(alias) != state.target:
            ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
                collection_name=state.target, alias_name=alias)))
        if ops:  # one request: Qdrant applies the delete and the create atomically
            self.client.update_collection_aliases(change_aliases_operations=ops)

    def meta_of(self, collection: str) -> CollectionMeta | None:
        return CollectionMeta.from_dict(self._metadata(collection))


__all__ = ["ALIASES_FILE", "AliasState", "Aliases", "FileAliases", "ServerAliases"]
