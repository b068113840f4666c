"""Micro-batching: queries that arrive together share one model call, as model servers do.

A request thread prepares its image (decode and resize: CPU work that runs in parallel) and hands the
prepared item to ``MicroBatcher.submit``; one batching thread takes the first waiting item, waits up to
``wait`` seconds (or until ``max_batch`` items are there) for others, runs the model once on all of them and
resolves each request's future with its own row. On two cores a batch of 8 costs far less than 8 single
calls, so throughput under concurrency rises while a lone query waits at most ``wait`` extra.

The event loop never runs the model: async handlers await the future (``asyncio.wrap_future``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

log = logging.getLogger("workers.serve")

_STOP = object()


class MicroBatcher:
    """``submit(item) -> Future[np.ndarray]`` (one vector); ``fn(items) -> (n, dim)`` runs in one thread."""

    def __init__(self, fn: Callable[[Sequence[Any]], np.ndarray], *, max_batch: int = 32, wait: float = 0.005,
                 name: str = "embed", observe: Callable[[int, float], None] | None = None) -> None:
        self.fn, self.max_batch, self.wait, self.name = fn, max(1, max_batch), max(0.0, wait), name
        self._observe = observe
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"lookalike-batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        if self._closed:
            future.set_exception(RuntimeError(f"the {self.name} batcher is closed"))
            return future
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Stop the thread; what is still queued then fails (a swapped model's batcher must not leave a
        request waiting forever)."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=5)
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not _STOP and left[1].set_running_or_notify_cancel():
                left[1].set_exception(RuntimeError(f"the {self.name} batcher closed before this item ran"))

    def _collect(self, first: Any) -> tuple[list[tuple[Any, Future[np.ndarray]]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._run(live)
            if stop:
                return

    def _run(self, batch: list[tuple[Any, Future[np.ndarray]]]) -> None:
        t0 = time.perf_counter()
        try:
            vectors = self.fn([item for item, _ in batch])
        except BaseException as err:  # every waiting request learns why; the thread goes on
            for _, fut in batch:
                fut.set_exception(err)
            return
        if self._observe is not None:
            self._observe(len(batch), time.perf_counter() - t0)
        for (_, fut), row in zip(batch, vectors, strict=True):
            fut.set_result(row)


__all__ = ["MicroBatcher"]
