"""Find new, completely written image files under some folders by polling, and hand them to a sink.

Polling (``os.scandir``) instead of inotify: no extra dependency, works on network and bind-mounted
folders where inotify is silent, and costs ~1 ms per thousand files per scan. A file is handed over once
its (size, mtime) is the same in two consecutive scans and it is not empty — a writer that is still
appending changes one of them. Names writers use while writing (dot-files, ``*.part``, ``*.tmp``,
``*.crdownload``, ``*~``) are ignored until they are renamed to their final name.

Sinks: ``InProcessSink`` ingests here with the one pipeline (the embedded default); ``BrokerSink`` sends
events to the workers. ``lookalike watch`` and ``lookalike serve --watch`` use them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from search.errors import printable

if TYPE_CHECKING:
    from ingest.sources import ImageRef
    from search.config import Settings

log = logging.getLogger("workers.watch")

MAX_REMOVAL_WAIT = 10.0  # seconds a vanished file waits for new files still being written (a slow copy)
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", "~")


def _image_extensions() -> frozenset[str]:
    try:
        from ingest.sources import IMAGE_EXTENSIONS
    except ImportError:  # pragma: no cover - ingest is part of the same distribution
        return frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
    return IMAGE_EXTENSIONS


def _scan(root: Path, exts: frozenset[str]) -> Iterator[tuple[Path, tuple[int, int]]]:
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith(".") or name.endswith(PARTIAL_SUFFIXES):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False) and os.path.splitext(name)[1].lower() in exts:
                            st = entry.stat(follow_symlinks=False)
                            yield Path(entry.path), (st.st_size, st.st_mtime_ns)
                    except OSError:  # vanished between listing and stat
                        continue
        except OSError as err:
            log.warning("cannot list %s: %s", folder, err.strerror or err)


class Watcher:
    """Calls ``handle(paths)`` with the files under ``roots`` that became complete since the last scan."""

    def __init__(self, roots: tuple[Path, ...], *, interval: float = 0.25, existing: bool = False) -> None:
        self.roots = roots
        self.interval = interval
        self.exts = _image_extensions()
        self._seen: dict[Path, tuple[int, int]] = {}  # last (size, mtime) of files not yet handed over
        self._done: dict[Path, tuple[int, int]] = {}  # handed over, with the state they had then
        self._pending_removals: list[Path] = []  # disappeared files not yet forgotten (kept across a failure)
        self._removals_since = 0.0  # when the oldest pending removal was seen
        if not existing:
            for root in roots:
                self._done.update(_scan(root, self.exts))

    def poll(self) -> list[Path]:
        """One scan; the files that are complete now (each version of a file is handed over once)."""
        return self.poll_changes()[0]

    def poll_changes(self) -> tuple[list[Path], list[Path]]:
        """One scan: (files complete now, handed-over files that have disappeared since)."""
        ready: list[Path] = []
        current: dict[Path, tuple[int, int]] = {}
        for root in self.roots:
            current.update(_scan(root, self.exts))
        # A rename keeps size and mtime: a new path in the state of a path that just vanished is complete now.
        vanished = {self._done[p] for p in set(self._done) - set(current)}
        for path, state in current.items():
            if self._done.get(path) == state:
                continue
            renamed = path not in self._done and state in vanished
            if (self._seen.get(path) == state or renamed) and state[0] > 0:
                ready.append(path)
                self._done[path] = state
                self._seen.pop(path, None)
            else:
                self._seen[path] = state
        for gone in set(self._seen) - set(current):
            del self._seen[gone]
        removed = sorted(set(self._done) - set(current))
        for gone in removed:
            del self._done[gone]
        return sorted(ready), removed

    def run(self, handle: Callable[[list[Path]], None], *, stop: Callable[[], bool] = lambda: False,
            fatal: tuple[type[BaseException], ...] = (), removed: Callable[[list[Path]], None] | None = None) -> None:
        """Scan until ``stop()``; a failing ``handle`` is retried with the same files, except ``fatal`` errors.

        ``removed(paths)`` hears of files that disappeared, after the scan's new files were handed over: a
        move (a new path, an old one gone) reaches the index as an upsert that finds the bytes' point, then a
        delete of the old path — the point never disappears in between, and nothing is re-embedded."""
        while not stop():
            started = time.monotonic()
            ready, gone = self.poll_changes()
            if gone and removed is not None:
                self._pending_removals.extend(gone)
                self._removals_since = self._removals_since or time.monotonic()
            if ready:
                try:
                    handle(ready)
                except fatal:
                    raise
                except Exception as err:
                    # Forget them, so the next scans offer them again (sending or ingesting failed).
                    for path in ready:
                        self._done.pop(path, None)
                    log.error("could not hand over %d files (will retry): %s", len(ready), err)
                    time.sleep(min(5.0, max(self.interval, 1.0)))
                    continue
            # Forget vanished files once no new file is still being written (it may be one of them, moved or
            # copied elsewhere: ingesting it first keeps its point), or after MAX_REMOVAL_WAIT seconds.
            settled = not self._seen or time.monotonic() - self._removals_since > MAX_REMOVAL_WAIT
            if self._pending_removals and removed is not None and settled:
                try:
                    removed(list(self._pending_removals))
                    self._pending_removals.clear()
                    self._removals_since = 0.0
                except fatal:
                    raise
                except Exception as err:  # kept, and offered again after the next scan
                    log.error("could not forget %d removed files (will retry): %s", len(self._pending_removals), err)
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))


__all__ = ["PARTIAL_SUFFIXES", "Watcher"]


# ---------------------------------------------------------------------------------------------- sinks
def refs_for(paths: list[Path], labels_from_dirs: bool, source: str | None) -> list[ImageRef]:
    from ingest.sources import ImageRef

    return [ImageRef(uri=str(p), labels=(p.parent.name,) if labels_from_dirs else (), source=source)
            for p in paths]


class InProcessSink:
    """Ingests handed-over files here, with the one pipeline (the embedded default of ``watch``)."""

    def __init__(self, settings: Settings, source: str, pipeline: Any = None) -> None:
        from ingest.pipeline import Pipeline

        self.source = source
        self.pipeline = pipeline or Pipeline(settings, source=source)
        # Open the store and load the model now: a store owned by a running worker fails at once
        # (StoreLocked), and the first new file pays no start-up.
        _ = self.pipeline.embedder

    def __call__(self, paths: list[Path], labels_from_dirs: bool) -> None:
        for outcome in self.pipeline.ingest(refs_for(paths, labels_from_dirs, self.source)):
            detail = outcome.reason if outcome.status == "failed" else outcome.id
            click.echo(f"{outcome.status} {printable(outcome.uri)} ({printable(str(detail))})", err=True)

    def forget(self, paths: list[Path]) -> None:
        for removal in self.pipeline.forget([str(p) for p in paths]):
            click.echo(f"{removal.status} {printable(removal.target)}", err=True)

    def close(self) -> None:
        self.pipeline.close()


class BrokerSink:
    """Sends handed-over files to the workers as events (``watch --via-broker``)."""

    def __init__(self, settings: Settings, queue: str, source: str) -> None:
        from workers.app import make_app

        self.settings, self.queue, self.source = settings, queue, source
        self.app = make_app(settings)  # one app (and connection pool) for the whole watch

    def __call__(self, paths: list[Path], labels_from_dirs: bool) -> None:
        refs = refs_for(paths, labels_from_dirs, self.source)
        from workers.producer import enqueue_refs

        enqueue_refs(refs, self.settings, queue=self.queue, app=self.app)
        for p in paths:
            click.echo(f"queued {printable(str(p))}", err=True)

    def forget(self, paths: list[Path]) -> None:
        from workers.producer import enqueue_removals

        enqueue_removals([str(p) for p in paths], self.settings, app=self.app)
        for p in paths:
            click.echo(f"queued delete {printable(str(p))}", err=True)

    def close(self) -> None:
        pass
