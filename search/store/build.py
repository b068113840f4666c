"""Background index builds for the embedded store (``EdgeStore`` inherits ``BackgroundBuilds``).

qdrant-edge-py's ``optimize()`` and ``load()`` hold the GIL for the whole call (measured: a build in a thread froze
every other thread of the process), so the HNSW index is built elsewhere: once ``settings.hnsw_threshold`` points
are unindexed, a writer starts a build and returns; a thread copies the shard folder (``sendfile``: the GIL is
released) in passes while writes go on, the last pass under the write lock; a child process (nice 10) loads the
copy and optimizes it; the thread loads the result, carries over the points written since the first pass (the
last ≤ ``REPLAY_LOCKED_MAX`` under the write lock), writes ``CURRENT`` (fsynced: the commit point) and swaps the
handle. ``close()`` kills the child; it worked on a copy. Measured at 1M points: benchmarks/results/million.md.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from search.errors import StoreError
from search.store.aliases import META_FILE
from search.store.base import _point_id

log = logging.getLogger("search.store.edge")

CURRENT_FILE = "CURRENT"  # names the generation folder holding the live shard; absent: the collection folder
GEN_RE = re.compile(r"^gen-\d{6}$")
BUILDING = ".building"  # suffix of a generation folder still being built (removed when found at open)
OURS = frozenset({META_FILE, META_FILE + ".tmp", CURRENT_FILE, CURRENT_FILE + ".tmp"})  # not the engine's files
CHECK_EVERY = 256  # points written between two looks at how many are unindexed (shard.info())
COPY_PASSES = 3  # unlocked copy passes before the last one under the write lock (each copies what changed)
REPLAY_LOCKED_MAX = 256  # ids written during a build that may be left for the replay under the write lock
MTIME_SLACK_NS = 200_000_000  # file timestamps are coarse (a clock tick): this much before a flush counts as after
RETRY_AFTER_S = 60.0  # after a failed build, no new one before this
# The child that builds the index: only the engine, on a copy nobody else has open; niced so that searches and
# inference in this process keep their CPU (on 2 cores a build otherwise takes both).
_BUILD_CODE = """import os, sys
os.nice(10)
import qdrant_edge as qe
shard = qe.EdgeShard.load(sys.argv[1])
shard.optimize()
shard.flush()
shard.close()
"""


def engine_entries(folder: Path) -> list[Path]:
    """The engine's files and folders in a shard folder (for the collection folder: not ours, no generation)."""
    return sorted(e for e in folder.iterdir()
                  if e.name not in OURS and not GEN_RE.match(e.name.removesuffix(BUILDING)))


def _copy_changed(src: Path, dst: Path, seen: dict[Path, tuple[int, int, int]], flushed_ns: int,
                  stop: threading.Event) -> int:
    """Bring ``dst``, a copy of the shard at ``src``, up to date; what is gone from ``src`` goes. Returns the bytes
    copied. Call it right after the engine's ``flush()`` at ``flushed_ns``: the flush writes the mapped pages out,
    so the next write to a page faults and moves the file's mtime, while further writes to a page already
    dirty do not. A file is therefore copied again when its (size, mtime) changed since ``seen`` recorded it,
    or when that record was itself taken after the file was touched past its pass's flush. Unlocked passes
    race the engine (a file removed meanwhile is skipped); the last pass runs under the write lock."""
    copied = 0
    files: list[Path] = []  # relative to src
    dirs: set[Path] = set()
    for top in engine_entries(src):
        if top.is_dir():
            for dirpath, _, names in os.walk(top):
                rel = Path(dirpath).relative_to(src)
                dirs.add(rel)
                files += [rel / n for n in names]
        else:
            files.append(top.relative_to(src))
    for rel in sorted(dirs):
        (dst / rel).mkdir(parents=True, exist_ok=True)
    for rel in files:
        if stop.is_set():
            return copied
        try:
            st = (src / rel).stat()
            old = seen.get(rel)
            if old is None or old[:2] != (st.st_size, st.st_mtime_ns) or old[1] >= old[2] - MTIME_SLACK_NS:
                shutil.copyfile(src / rel, dst / rel)  # sendfile: the GIL is released while it copies
                seen[rel] = (st.st_size, st.st_mtime_ns, flushed_ns)
                copied += st.st_size
        except FileNotFoundError:
            continue
    keep = set(files) | dirs
    for dirpath, dnames, fnames in os.walk(dst, topdown=False):
        for name in [*fnames, *dnames]:
            path = Path(dirpath) / name
            if path.relative_to(dst) not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copied


class _Build:
    """One background index build: the thread, its child process, and how to stop them."""

    def __init__(self, store: Any) -> None:  # the EdgeStore (a BackgroundBuilds)
        self.store = store
        self.stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.committed = False  # the new shard is live: nothing of it may be removed any more
        self.thread = threading.Thread(target=self._run, name=f"lookalike-index-{store.collection}", daemon=True)

    def cancel(self) -> None:
        self.stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # it works on a copy: nothing of the live shard is lost
        self.thread.join()

    def _run(self) -> None:
        store = self.store
        try:
            store._run_build(self)
        except Exception as err:  # a failed build leaves the live shard as it was; retry later
            if not self.stop.is_set():
                log.warning("background index build of '%s' failed: %s", store.collection, err)
                store._next_build_at = time.monotonic() + RETRY_AFTER_S
        finally:
            with store._mu:
                store._dirty = None
                if store._building is self:
                    store._building = None


class BackgroundBuilds:
    """The build side of ``EdgeStore`` (its locks, shard handle and folders are the store's)."""

    _building: _Build | None
    _dirty: set[str] | None

    def building(self) -> bool:
        """Whether a background index build is running."""
        return self._building is not None

    def wait_for_build(self, timeout: float | None = None) -> bool:
        """Wait for a running background build; returns whether none is running any more."""
        build = self._building
        if build is not None:
            build.thread.join(timeout)
        return self._building is None

    def _consider_build(self, written: int) -> None:
        """Start a background build once ``settings.hnsw_threshold`` points are unindexed. Looked at every
        ``CHECK_EVERY`` written points (and when a ``bulk()`` block ends), never inside ``bulk()``: a backfill
        calls ``optimize()`` at its end, and copying the store every few thousand points would be waste."""
        self._since_check += written
        threshold = self.settings.hnsw_threshold
        if (self._bulk_depth or self._building is not None or self._closed or self._shard is None
                or (written and self._since_check < min(CHECK_EVERY, max(1, threshold // 4)))
                or time.monotonic() < self._next_build_at):
            return
        self._since_check = 0
        with self._mu:
            if self._shard is None or self._building is not None:
                return
            info = self._shard.info()
            if info.points_count - info.indexed_vectors_count < threshold:
                return
            log.info("'%s': %d of %d points are not indexed; building the index in the background",
                     self.collection, info.points_count - info.indexed_vectors_count, info.points_count)
            self._building = _Build(self)
            self._building.thread.start()

    def _cancel_build(self) -> None:
        build = self._building
        if build is not None:
            build.cancel()

    def _run_build(self, build: _Build) -> None:
        """Copy, optimize the copy in a child process, carry over what was written meanwhile, swap."""
        gen = max([int(m.group(0)[4:]) for e in self.path.iterdir() if (m := GEN_RE.match(e.name[:10]))] + [0]) + 1
        name = f"gen-{gen:06d}"
        work = self.path / (name + BUILDING)
        work.mkdir()
        started = time.perf_counter()
        try:
            seen: dict[Path, tuple[int, int, int]] = {}
            with self._mu:
                # Ids written from here on are carried over before the swap, whatever the copy caught of them.
                self._dirty = set()
            for _ in range(COPY_PASSES):  # while writes go on; each pass copies what changed since the last
                with self._mu:
                    self._check().flush()
                    flushed = time.time_ns()
                copied = _copy_changed(self._dir, work, seen, flushed, build.stop)
                if build.stop.is_set():
                    return
                if copied < 64 << 20:
                    break
            with self._writing() as shard:  # the last pass sees no write: a consistent set of files
                shard.flush()
                copied = _copy_changed(self._dir, work, seen, time.time_ns(), build.stop)
            log.info("'%s': copied the shard for the build in %.1f s (last pass %.1f MB under the write lock)",
                     self.collection, time.perf_counter() - started, copied / 1e6)
            build.proc = subprocess.Popen([sys.executable, "-c", _BUILD_CODE, str(work)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE)
            if build.stop.is_set():  # cancel() may have looked before the child existed
                build.proc.kill()
            _, err = build.proc.communicate()
            if build.stop.is_set():
                return
            if build.proc.returncode != 0:
                raise StoreError(f"the index build exited with {build.proc.returncode}: "
                                 f"{err.decode(errors='replace').strip()[-500:]}")
            final = self.path / name
            work.rename(final)
            work = final
            new = self._load(final)
            try:
                self._swap(build, new, final)
            except BaseException:
                if not build.committed:
                    new.close()
                raise
            log.info("'%s': background index build done in %.1f s", self.collection, time.perf_counter() - started)
        finally:
            if not build.committed:
                shutil.rmtree(work, ignore_errors=True)

    def _carry_over(self, new: Any, ids: set[str]) -> None:
        """Make ``ids`` in the new shard what they are in the live one (call it holding ``_mu``)."""
        import qdrant_edge as qe

        ids_list = sorted(ids)
        for start in range(0, len(ids_list), 256):
            chunk = ids_list[start:start + 256]
            records = self._check().retrieve(chunk, True, True)
            found = {_point_id(r.id) for r in records}
            points = [qe.Point(_point_id(r.id), _to_list(r.vector), r.payload or {}) for r in records]
            if points:
                new.update(qe.UpdateOperation.upsert_points(points))
            gone = [i for i in chunk if i not in found]
            if gone:
                new.update(qe.UpdateOperation.delete_points(gone))

    def _swap(self, build: _Build, new: Any, folder: Path) -> None:
        while True:  # catch up without the write lock while many ids are pending, then finish under it
            with self._mu:
                if build.stop.is_set() or self._dirty is None:
                    raise StoreError("cancelled")
                if len(self._dirty) <= REPLAY_LOCKED_MAX:
                    break
                pending, self._dirty = self._dirty, set()
                self._carry_over(new, pending)
        with self._writing() as old:
            if build.stop.is_set() or self._dirty is None:
                raise StoreError("cancelled")
            self._carry_over(new, self._dirty)
            new.flush()
            tmp = self.path / (CURRENT_FILE + ".tmp")
            with open(tmp, "w") as fh:
                fh.write(folder.name + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / CURRENT_FILE)  # the commit point: a crash after it opens the new shard
            build.committed = True
            previous, self._shard, self._dir = self._dir, new, folder
            self._dirty = None
            self._unflushed = self._pending_points = 0
            self._indexed = new.info().indexed_vectors_count > 0
        try:  # outside the locks: every engine call takes the live handle under _mu, so the old one is ours
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself
            finally:
                os.close(fd)
            old.close()
            self._remove_shard(previous)
        except Exception as err:  # the swap stands; what is left of the old shard goes at the next open
            log.warning("'%s': removing the previous shard at %s failed: %s", self.collection, previous, err)


def _to_list(vector: Any) -> list[float]:
    if isinstance(vector, dict):  # named vectors: ours is the default (unnamed) one
        vector = vector.get("", next(iter(vector.values()), None))
    return list(vector)


__all__ = ["BUILDING", "CURRENT_FILE", "GEN_RE", "OURS", "BackgroundBuilds", "engine_entries"]
