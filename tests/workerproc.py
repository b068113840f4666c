"""Real worker processes for the worker tests: ``Worker`` (one ``celery -A tests.worker_app worker`` in a process
group of its own), ``Env`` (a test's folders, settings, Redis and helpers) and ``photo`` (a small real JPEG)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workers.config import worker_settings
from workers.deadletters import DeadLetters
from workers.events import BACKFILL_QUEUE, INGEST_TASK, LIVE_QUEUE, celery_message

REPO = Path(__file__).resolve().parents[1]


def photo(path: Path, seed: int, base: int | None = None, noise: float = 0.0) -> Path:
    """A real JPEG: a smooth random colour field (from ``base`` when given, plus ``noise``)."""
    rng = np.random.default_rng(base if base is not None else seed)
    small = rng.integers(0, 256, (4, 6, 3)).astype(np.float32)
    if noise:
        small += np.random.default_rng(seed + 10_000).normal(0, noise, small.shape)
    img = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((96, 64), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)
    return path


class Worker:
    """One ``celery -A tests.worker_app worker`` process (prefork, one child: the embedded store's owner)."""

    def __init__(self, env: dict[str, str], log: Path, pool: str = "prefork", concurrency: int = 1,
                 prefix: str = "t") -> None:
        self.log = log
        self.name = f"{prefix}{uuid.uuid4().hex[:8]}@localhost"
        self.ready_at: float | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker", "-Q",
             f"{LIVE_QUEUE},{BACKFILL_QUEUE}", "-c", str(concurrency), "-P", pool, "-l", "info", "-n", self.name,
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: kill_all() kills the worker and its children

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.text():
                self.ready_at = time.time()
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker did not start:\n{self.text()[-4000:]}")

    def child(self) -> int | None:
        """A pool child's PID (None while the pool is replacing it)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, IndexError, ValueError):
                continue
            if int(ppid) == self.proc.pid and state != "Z":  # a killed child not reaped yet: not worth a kill
                return int(stat.parent.name)
        return None

    def kill_all(self) -> float:
        """SIGKILL the whole worker (main process and pool children, like the OOM killer taking the group);
        returns when it happened."""
        killed = time.time()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return killed

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Env:
    """Folders, settings and helpers of one test: images under ``root`` (the only allowed root)."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.root = tmp / "images"
        self.root.mkdir()
        self.data = tmp / "data"
        self.redis_url = redis_url
        self.workers: list[Worker] = []
        import redis

        self.redis = redis.Redis.from_url(redis_url)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
        env.update({
            "LOOKALIKE_BROKER_URL": self.redis_url, "LOOKALIKE_DATA_DIR": str(self.data),
            "LOOKALIKE_ALLOWED_ROOTS": str(self.root), "LOOKALIKE_MODEL": "tiny",
            # The default visibility timeout (600 s): no test may depend on kombu's slow sweep, and a slow
            # first batch (the real model loading) must not be handed out twice.
            "LOOKALIKE_TASK_SOFT_TIME_LIMIT": "60", "LOOKALIKE_TASK_TIME_LIMIT": "90",
            "LOOKALIKE_RETRY_BACKOFF_MAX": "2",
            "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "LOOKALIKE_METRICS_PORT": "0",  # tests that scrape a worker give it a free port
        })
        env.update(extra)
        return env

    def settings(self, **kw: Any):
        kw = {"model": "tiny", "data_dir": self.data, **kw}
        return worker_settings(broker_url=self.redis_url, allowed_roots=(self.root,), **kw)

    def start(self, pool: str = "prefork", concurrency: int = 1, **extra: str) -> Worker:
        worker = Worker(self.env(**extra), self.tmp / f"worker{len(self.workers)}.log", pool, concurrency)
        self.workers.append(worker)
        return worker.wait_ready()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def send(self, event: Any, queue: str = LIVE_QUEUE) -> None:
        """Publish like any non-Python producer would: the raw Celery message, LPUSHed with redis-py."""
        self.redis.lpush(queue, celery_message(INGEST_TASK, [event], queue))

    def done(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange("test:done", 0, -1)]

    def started(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange("test:started", 0, -1)]

    def dead(self) -> DeadLetters:
        return DeadLetters(self.redis)

    def wait(self, cond: Any, timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        logs = "\n".join(w.text()[-3000:] for w in self.workers)
        raise AssertionError(f"timed out waiting for {what}; done={self.done()}\n{logs}")

    def store(self, data: Path | None = None):
        from search.store import open_store

        return open_store(self.settings(data_dir=data or self.data))

    def points(self, data: Path | None = None) -> list[Any]:
        """Every point in the store at ``data`` (default: the test's data dir); [] when nothing was stored."""
        store = self.store(data)
        try:
            return [] if store.meta() is None else list(store.scroll())
        finally:
            store.close()


__all__ = ["REPO", "Env", "Worker", "photo"]
