"""Find new, completely written image files under some folders by polling.

Polling (``os.scandir``) instead of inotify: no extra dependency, works on network and bind-mounted
folders where inotify is silent, and costs ~1 ms per thousand files per scan. A file is handed over once
its (size, mtime) is the same in two consecutive scans and it is not empty — a writer that is still
appending changes one of them. Names writers use while writing (dot-files, ``*.part``, ``*.tmp``,
``*.crdownload``, ``*~``) are ignored until they are renamed to their final name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("workers.watch")

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
        if not existing:
            for root in roots:
                self._done.update(_scan(root, self.exts))

    def poll(self) -> list[Path]:
        """One scan; the files that are complete now (each version of a file is handed over once)."""
        ready: list[Path] = []
        current: dict[Path, tuple[int, int]] = {}
        for root in self.roots:
            current.update(_scan(root, self.exts))
        for path, state in current.items():
            if self._done.get(path) == state:
                continue
            if self._seen.get(path) == state and state[0] > 0:
                ready.append(path)
                self._done[path] = state
                self._seen.pop(path, None)
            else:
                self._seen[path] = state
        for gone in set(self._seen) - set(current):
            del self._seen[gone]
        for gone in set(self._done) - set(current):
            del self._done[gone]
        return sorted(ready)

    def run(self, handle: Callable[[list[Path]], None], *, stop: Callable[[], bool] = lambda: False,
            fatal: tuple[type[BaseException], ...] = ()) -> None:
        """Scan until ``stop()``; a failing ``handle`` is retried with the same files, except ``fatal`` errors."""
        while not stop():
            started = time.monotonic()
            ready = self.poll()
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
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))


__all__ = ["PARTIAL_SUFFIXES", "Watcher"]
