"""Prometheus metrics of one HTTP app (their own registry, so two apps in one process never collide).

Names follow Prometheus conventions: ``lookalike_`` prefix, base units (seconds), ``_total`` counters, and
few label values (the route template, never the raw path; the status code; the query kind). Buckets cover
the measured ranges: a by-id query takes ~1 ms, an image query 10–40 ms, an upload up to ~100 ms, and
anything past a few seconds is a problem worth seeing.
"""

from __future__ import annotations

from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The series ``/metrics`` exposes: the HTTP ones here, and the ingestion series of ``ingest.metrics``
    (``ingest``: uploads ingested in-process, lane ``serve``). ``lookalike_points`` is read at scrape time
    through ``count_points`` (the collection served and its size, or None)."""

    def __init__(self, count_points: Callable[[], tuple[str, float] | None] = lambda: None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from ingest.metrics import IngestMetrics

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lookalike_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("lookalike_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.embed = Histogram("lookalike_embed_duration_seconds", "One model call (a micro-batch) by input kind",
                               ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("lookalike_embed_batch_size", "Queries embedded together in one model call",
                               ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.store = Histogram("lookalike_store_duration_seconds", "Store calls made for requests",
                               ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self.uploads = Counter("lookalike_uploads_total", "Uploads by outcome (indexed, present, updated, queued, "
                               "failed)", ["outcome"], registry=r)
        self.ingest = IngestMetrics(r)
        self._count_points = count_points

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        counted = self._count_points()
        self.ingest.points.clear()  # the alias may have moved to another collection since the last scrape
        if counted is not None:
            self.ingest.points.labels(counted[0]).set(counted[1])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]
