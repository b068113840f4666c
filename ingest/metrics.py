"""Prometheus series of the ingestion pipeline, shared by every process that ingests (workers, backfill, serve).

Names follow Prometheus conventions: ``lookalike_`` prefix, base units (seconds), ``_total`` counters, few
label values. ``lane`` says which road an event came by: ``live`` and ``backfill`` (the worker queues),
``cli`` (``lookalike backfill`` in-process), ``serve`` (HTTP uploads in-process).

=========================================  =========  ===================================================
``lookalike_ingest_events_total``          counter    events by ``lane`` and ``outcome``: indexed, present,
                                                      updated, removed, deleted, absent, failed (in-process
                                                      runs), dead_lettered, retried (workers)
``lookalike_ingest_stage_seconds``         histogram  per event and ``stage`` (read, decode, lookup, embed,
                                                      tag, upsert); a batched stage's time is shared out
                                                      among the batch's events, so the sum is the cost
``lookalike_ingest_queue_wait_seconds``    histogram  event ``sent_at`` → a worker took it, by ``lane``
``lookalike_ingest_freshness_seconds``     histogram  event ``sent_at`` → its point durable in the store
``lookalike_ingest_batch_size``            histogram  images per pipeline call
``lookalike_model_load_seconds``           histogram  loading the model (once per process)
``lookalike_points``                       gauge      points in the collection, by ``collection``
=========================================  =========  ===================================================

Buckets follow the measured ranges: a Lite0 event costs ~10–30 ms in all; an upload is durable ~30–250 ms
after it is sent (the target is 250 ms under load), a backfill event may wait minutes to hours.

The values live wherever ``prometheus_client`` keeps them: in memory in one process, or in files shared by a
prefork pool (multiprocess mode, ``workers.metrics``): these objects are made per process, after that choice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

STAGES = ("read", "decode", "lookup", "embed", "tag", "upsert")
OUTCOMES = ("indexed", "present", "updated", "removed", "deleted", "absent", "failed", "dead_lettered", "retried")
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                     3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Outcomes that leave the event's point in the store: their freshness is measured.
STORED = frozenset({"indexed", "present", "updated"})


class Timed(Protocol):
    """What is read of an ``ingest.pipeline.Outcome`` (named structurally: the pipeline imports this module)."""

    timings: dict[str, float]


class IngestMetrics:
    """The ingestion series, registered on ``registry`` (None: on no registry — a prefork worker collects
    them from the multiprocess files instead)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.events = Counter("lookalike_ingest_events", "Ingestion events by lane and outcome",
                              ["lane", "outcome"], registry=r)
        self.stage = Histogram("lookalike_ingest_stage_seconds", "Time per event in each pipeline stage "
                               "(a batched stage's time divided among its events)", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.queue_wait = Histogram("lookalike_ingest_queue_wait_seconds", "From an event's sent_at until a "
                                    "worker took it", ["lane"], buckets=FRESHNESS_BUCKETS, registry=r)
        self.freshness = Histogram("lookalike_ingest_freshness_seconds", "From an event's sent_at until its "
                                   "point was durable in the store", ["lane"], buckets=FRESHNESS_BUCKETS,
                                   registry=r)
        self.batch = Histogram("lookalike_ingest_batch_size", "Images per pipeline call", buckets=BATCH_BUCKETS,
                               registry=r)
        self.model_load = Histogram("lookalike_model_load_seconds", "Loading the embedding model",
                                    buckets=LOAD_BUCKETS, registry=r)
        self.points = Gauge("lookalike_points", "Points in the collection", ["collection"], registry=r,
                            multiprocess_mode="mostrecent")
        self._points_at = 0.0

    def observe_batch(self, outcomes: Sequence[Timed]) -> None:
        """One pipeline call: its size and every event's stage times."""
        if not outcomes:
            return
        self.batch.observe(len(outcomes))
        for outcome in outcomes:
            for stage, seconds in outcome.timings.items():
                if stage in STAGES:
                    self.stage.labels(stage).observe(seconds)

    def count(self, lane: str, outcome: str, n: int = 1) -> None:
        if outcome not in OUTCOMES:  # the dashboard and its test know only these
            raise ValueError(f"unknown ingestion outcome {outcome!r}")
        if n:
            self.events.labels(lane, outcome).inc(n)

    def durable(self, lane: str, sent_at: Iterable[float], now: float | None = None) -> None:
        """Events (their ``sent_at``) whose points are now durable."""
        now = time.time() if now is None else now
        for t in sent_at:
            self.freshness.labels(lane).observe(max(0.0, now - t))

    def set_points(self, collection: str, count: Any, every: float = 0.0) -> None:
        """Record the collection's size; ``count`` is called at most once per ``every`` seconds (a count is
        cheap, not free)."""
        now = time.monotonic()
        if every and now - self._points_at < every:
            return
        self._points_at = now
        self.points.labels(collection).set(count() if callable(count) else count)


__all__ = ["BATCH_BUCKETS", "FRESHNESS_BUCKETS", "OUTCOMES", "STAGES", "STAGE_BUCKETS", "STORED", "IngestMetrics"]
