"""Forgetting locations and points: the other half of keeping an index in step with an image store.

A point is content (its id is the hash of the bytes) seen at one or more locations (``uris``). Forgetting a
uri removes it from every point that lists it; a point left with no uri is deleted, since nothing on disk
stands behind it any more. Explicit deletion by id removes a point whatever its uris say.

Both run under the same content lock as ingestion (``Pipeline(content_lock=…)``), so a concurrent writer
merging a uri into the same point cannot interleave its read-merge-write with ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from search.schema import Filter, Match

if TYPE_CHECKING:
    from search.store import Store

ContentLock = Callable[[Sequence[str]], AbstractContextManager[Any]]


@dataclass
class Removal:
    """What forgetting one uri (or deleting one id) did."""

    target: str  # the uri, or the id
    status: str  # removed (uri dropped, point kept) | deleted (point deleted) | absent (nothing had it)
    ids: list[str] = field(default_factory=list)


def _locked(lock: ContentLock | None, ids: Sequence[str]) -> AbstractContextManager[Any]:
    return lock(ids) if lock is not None and ids else contextlib.nullcontext()


def forget_uris(store: Store, uris: Iterable[str], *, lock: ContentLock | None = None) -> list[Removal]:
    """Remove each uri from the points that list it; delete points left without a uri."""
    out = []
    for uri in uris:
        holders = [p.id for p in store.scroll(Filter(must=(Match("uris", (uri,)),)), batch=64)]
        if not holders:
            out.append(Removal(uri, "absent"))
            continue
        deleted = False
        with _locked(lock, holders):
            for point in store.retrieve(holders):  # re-read under the lock: another writer may have merged
                uris_left = [u for u in point.payload.get("uris") or [] if u != uri]
                if uris_left:
                    store.set_payload(point.id, {"uris": uris_left})
                else:
                    store.delete([point.id])
                    deleted = True
        out.append(Removal(uri, "deleted" if deleted else "removed", holders))
    return out


def delete_ids(store: Store, ids: Sequence[str], *, lock: ContentLock | None = None) -> list[Removal]:
    """Delete points by id (``absent`` for ids that are not stored)."""
    with _locked(lock, list(ids)):
        present = {p.id for p in store.retrieve(list(ids))}
        if present:
            store.delete(sorted(present))
    return [Removal(i, "deleted" if i in present else "absent", [i] if i in present else []) for i in ids]


def edit_uris(store: Store, pid: str, *, remove: Iterable[str] = (), add: Iterable[str] = (),
              lock: ContentLock | None = None) -> str:
    """Apply a change to one point's uris, re-read under the lock so a concurrent merge is kept; the point
    is deleted when no uri is left. ``updated`` / ``deleted`` / ``unchanged`` / ``absent``."""
    gone, new = set(remove), list(add)
    with _locked(lock, [pid]):
        found = store.retrieve([pid])
        if not found:
            return "absent"
        before = list(found[0].payload.get("uris") or [])
        after = [u for u in before if u not in gone]
        after += [u for u in dict.fromkeys(new) if u not in after]
        if after == before:
            return "unchanged"
        if not after:
            store.delete([pid])
            return "deleted"
        store.set_payload(pid, {"uris": after})
        return "updated"


__all__ = ["ContentLock", "Removal", "delete_ids", "edit_uris", "forget_uris"]
