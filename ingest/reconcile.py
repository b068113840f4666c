"""``reconcile``: compare the index with the disk under some roots, report, then apply.

What it finds, for uris under the given roots (uris elsewhere — other roots, URLs — are never touched):

=================  ==========================================================================
gone               a stored uri whose file no longer exists: the uri is removed (the point too,
                   when it has no other uri)
moved              a gone uri whose bytes exist at another path: the new path joins the point's
                   uris — found by hash, so nothing is re-embedded
found              a file whose bytes are indexed, at a path the point does not list yet (a copy)
changed            a stored uri whose file now holds other bytes: the old point loses the uri,
                   the new content is ingested
new                a file whose bytes are not indexed: ingested through the one pipeline
=================  ==========================================================================

How it scales (1M points, not held in memory): the disk side lives in a SQLite file under the data dir —
``path → (size, mtime, sha256)`` kept between runs, so a re-run hashes only files whose size or mtime
changed — and the index is read page by page (``Store.scroll``), each point checked against that table.
Every step is idempotent, so an interrupted run is safe to run again. The image store is only read.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.removal import ContentLock, edit_uris
from search.errors import ImageError
from search.reading import local_path, read_bytes
from search.schema import sha256_hex

if TYPE_CHECKING:
    from search.config import Settings
    from search.store import Store

log = logging.getLogger(__name__)

EXAMPLES = 20  # changes listed per kind in a report (the counts are always complete)
KINDS = ("gone", "moved", "found", "changed", "new")


@dataclass
class Report:
    roots: list[str]
    dry_run: bool
    files: int = 0  # image files on disk under the roots
    unreadable: int = 0  # files that exist but cannot be read (left alone in the index)
    hashed: int = 0  # files read and hashed this run (the rest came from the state table)
    points: int = 0  # points scanned
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    deleted: int = 0  # points deleted (no uri left)
    ingested: dict[str, int] = field(default_factory=dict)  # the pipeline's counts for new/changed files
    examples: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in KINDS})
    seconds: float = 0.0

    def note(self, kind: str, example: Any) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"roots": self.roots, "dry_run": self.dry_run, "files": self.files, "unreadable": self.unreadable,
                "hashed": self.hashed, "points": self.points, **self.counts, "points_deleted": self.deleted,
                "ingested": self.ingested, "examples": self.examples, "seconds": round(self.seconds, 3)}


class DiskState:
    """The files under the roots and their hashes, in SQLite (``<data dir>/cache/files.sqlite``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.executescript("""
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, sha TEXT);
            CREATE TEMP TABLE disk (path TEXT PRIMARY KEY, sha TEXT);
            CREATE INDEX temp.disk_sha ON disk(sha);
            CREATE TEMP TABLE claimed (path TEXT PRIMARY KEY);
            CREATE TEMP TABLE unreadable (path TEXT PRIMARY KEY);
            CREATE TEMP TABLE seen (sha TEXT PRIMARY KEY);
        """)

    def known(self, path: str, size: int, mtime: int) -> str | None:
        row = self.db.execute("SELECT sha FROM files WHERE path=? AND size=? AND mtime=?", (path, size, mtime))
        found = row.fetchone()
        return found[0] if found else None

    def remember(self, path: str, size: int, mtime: int, sha: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (path, size, mtime, sha))

    def on_disk(self, path: str, sha: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO disk VALUES (?, ?)", (path, sha))

    def sha_at(self, path: str) -> str | None:
        row = self.db.execute("SELECT sha FROM disk WHERE path=?", (path,)).fetchone()
        return row[0] if row else None

    def paths_of(self, sha: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM disk WHERE sha=? ORDER BY path", (sha,))]

    def mark(self, table: str, value: str) -> None:
        self.db.execute(f"INSERT OR IGNORE INTO {table} VALUES (?)", (value,))

    def has(self, table: str, column: str, value: str) -> bool:
        sql = f"SELECT 1 FROM {table} WHERE {column}=?"
        return self.db.execute(sql, (value,)).fetchone() is not None

    def unindexed(self) -> Iterator[str]:
        """Paths whose bytes no point holds (after the index pass marked every indexed hash)."""
        sql = "SELECT path FROM disk WHERE sha NOT IN (SELECT sha FROM seen) ORDER BY path"
        for (path,) in self.db.execute(sql):
            yield path

    def forget_missing(self) -> None:
        """Drop remembered files that were not seen this run (deleted since), keeping the table small."""
        self.db.execute("DELETE FROM files WHERE path NOT IN (SELECT path FROM disk) "
                        "AND path NOT IN (SELECT path FROM unreadable)")

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()


def _under(path: str, roots: Sequence[Path]) -> bool:
    p = Path(path)
    return any(p == r or p.is_relative_to(r) for r in roots)


def scan(roots: Sequence[Path], state: DiskState, settings: Settings, report: Report,
         warn: Callable[[str], None]) -> None:
    """Fill the ``disk`` table: every image file under the roots with its SHA-256 (hashing only new or
    changed files)."""
    from ingest.sources import iter_refs

    refs = iter_refs([str(r) for r in roots], on_error=lambda where, why: warn(f"skipping {where}: {why}"))
    for i, ref in enumerate(refs):
        path = ref.uri
        try:
            st = os.stat(path)
            sha = state.known(path, st.st_size, st.st_mtime_ns)
            if sha is None:
                sha = sha256_hex(read_bytes(path, settings))
                state.remember(path, st.st_size, st.st_mtime_ns, sha)
                report.hashed += 1
        except (OSError, ImageError) as err:
            report.unreadable += 1
            state.mark("unreadable", path)
            warn(f"cannot read {path}: {getattr(err, 'reason', None) or err}; its index entries are kept")
            continue
        state.on_disk(path, sha)
        report.files += 1
        if i % 5000 == 4999:
            state.commit()
    state.commit()


def check_point(point: Any, roots: Sequence[Path], state: DiskState, report: Report) -> tuple[set[str], list[str]]:
    """(uris to remove, uris to add) for one point, noting what it found in ``report``."""
    sha = str(point.payload.get("sha256") or "")
    uris = [u for u in point.payload.get("uris") or [] if isinstance(u, str)]
    state.mark("seen", sha)
    remove: set[str] = set()
    gone: list[str] = []
    for uri in uris:
        path = local_path(uri)
        if path is None or not _under(str(path), roots) or state.has("unreadable", "path", str(path)):
            continue
        now = state.sha_at(str(path))
        if now == sha:
            state.mark("claimed", str(path))
        elif now is None:
            remove.add(uri)
            gone.append(uri)
        else:
            remove.add(uri)
            report.note("changed", {"uri": uri, "id": point.id})
    listed = {str(local_path(u) or u) for u in uris}
    copies = [p for p in state.paths_of(sha) if p not in listed] if sha else []
    for path in copies:
        state.mark("claimed", path)
    for i, uri in enumerate(gone):  # a gone uri paired with a copy elsewhere is a move
        if i < len(copies):
            report.note("moved", {"from": uri, "to": copies[i], "id": point.id})
        else:
            report.note("gone", {"uri": uri, "id": point.id})
    for path in copies[len(gone):]:
        report.note("found", {"uri": path, "id": point.id})
    return remove, copies


def reconcile(store: Store, roots: Sequence[Path], settings: Settings, *, dry_run: bool = False,
              lock: ContentLock | None = None, ingest: Callable[[list[str]], dict[str, int]] | None = None,
              warn: Callable[[str], None] = log.warning) -> Report:
    """Compare and (unless ``dry_run``) apply; ``ingest(paths)`` embeds new and changed files."""
    start = time.perf_counter()
    roots = [Path(r).expanduser().resolve() for r in roots]
    report = Report([str(r) for r in roots], dry_run)
    state = DiskState(settings.data_dir / "cache" / "files.sqlite")
    try:
        scan(roots, state, settings, report, warn)
        exists = store.meta() is not None
        with store.bulk():
            for point in store.scroll(batch=256) if exists else ():
                report.points += 1
                remove, add = check_point(point, roots, state, report)
                if not (remove or add):
                    continue
                if dry_run:
                    report.deleted += not add and set(point.payload.get("uris") or []) <= remove
                elif edit_uris(store, point.id, remove=remove, add=add, lock=lock) == "deleted":
                    report.deleted += 1
        for path in state.unindexed():
            report.note("new", {"uri": path})
        if not dry_run:
            state.forget_missing()
            state.commit()
            if report.counts["new"] and ingest is not None:
                report.ingested = ingest(list(state.unindexed()))
    finally:
        state.close()
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["KINDS", "DiskState", "Report", "check_point", "reconcile"]
