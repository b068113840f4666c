"""A worker's Prometheus metrics, the broker's and store's gauges, and the counters ``lookalike status`` reads.

* **Prefork pool.** ``enable_multiprocess`` (the worker's main process, before any metric exists) switches
  ``prometheus_client`` to multiprocess mode: every process — the main one and each pool child, a child
  that replaced a killed one too — writes its samples to its own files in one folder, and a scrape sums
  them (``MultiProcessCollector``). A killed child's counts stay in its files: nothing is lost, nothing
  counted twice. The folder is emptied when the worker starts. The ingestion series are ``ingest.metrics``.
* **Broker and store.** ``BrokerCollector`` reads Redis at scrape time: queue depth and the age of the
  oldest waiting event per queue, unacknowledged messages (kombu's ``unacked`` and lookalike's in-flight
  lists), dead letters, live worker processes. The points in the collection are set by the process that
  owns the store (``lookalike_points``, multiprocess mode ``mostrecent``).
* **Served** on ``LOOKALIKE_METRICS_HOST:LOOKALIKE_METRICS_PORT`` (127.0.0.1:9808) by the main process.
* **Status.** Every ``LOOKALIKE_METRICS_INTERVAL`` seconds the main process pushes its event counters and
  freshness buckets to Redis (``lookalike:metrics:<worker>``, the last two minutes); ``last_minute``
  turns the newest and a minute-old snapshot of every worker into rates and freshness quantiles — the
  same counters Prometheus scrapes, for a machine without Prometheus.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.events import BACKFILL_QUEUE, LIVE_QUEUE

if TYPE_CHECKING:
    from ingest.metrics import IngestMetrics
    from workers.config import WorkerSettings

log = logging.getLogger("workers.metrics")

SNAPSHOT_PREFIX = "lookalike:metrics:"
SNAPSHOTS_KEPT = 13  # two minutes at the default 10 s interval
QUEUES = (LIVE_QUEUE, BACKFILL_QUEUE)
LANES = {LIVE_QUEUE: "live", BACKFILL_QUEUE: "backfill"}


# ---------------------------------------------------------------------------------------------- processes
def enable_multiprocess(folder: str | os.PathLike[str] | None = None) -> Path:
    """Multiprocess mode for this process and the children it forks: samples go to files in ``folder``
    (``PROMETHEUS_MULTIPROC_DIR`` if set, else a new temporary folder, removed when this process exits),
    which is emptied first."""
    import prometheus_client.values as values

    given = folder or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(given) if given else _own_folder()
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):  # a previous run's files would be summed into this one's
        old.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    # The value class is chosen when prometheus_client is first imported; choose again in case it already was.
    values.ValueClass = values.MultiProcessValue()
    return path


TEMP_PREFIX = "lookalike-metrics-"


def _own_folder() -> Path:
    """A temporary folder named after this process; those of processes that are gone (a SIGKILLed worker
    cannot remove its own) are removed first."""
    import atexit
    import shutil

    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{TEMP_PREFIX}*-*"):
        pid = old.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    owner = os.getpid()
    # Forked pool children inherit the handler: only the process that made the folder removes it.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_metrics: IngestMetrics | None = None
_metrics_lock = threading.Lock()


def ingest_metrics() -> IngestMetrics:
    """This process's ingestion series (on no registry: scrapes read them from the multiprocess files, or,
    outside a worker, nobody does)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            from ingest.metrics import IngestMetrics

            _metrics = IngestMetrics(None)
        return _metrics


def lane_of(queue: str | None, batch: bool) -> str:
    return LANES.get(queue or "", "backfill" if batch else "live")


# ---------------------------------------------------------------------------------------------- broker
def _sent_at(raw: bytes | str | None) -> float | None:
    """The earliest ``sent_at`` of the events in a queued Celery message (None if it names none)."""
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"])) if message.get("properties", {}).get(
            "body_encoding") == "base64" else json.loads(message["body"])
        arg = body[0][0]
        events = arg if isinstance(arg, list) else [arg]
        times = [float(e["sent_at"]) for e in events if isinstance(e, dict) and isinstance(e.get("sent_at"),
                                                                                         (int, float))]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return min(times) if times else None


def broker_gauges(client: Any, now: float | None = None) -> dict[str, Any]:
    """What Redis says now: queue depths (messages) and oldest waiting event's age (seconds) per queue,
    unacknowledged messages, dead letters and live worker processes."""
    from workers.deadletters import DeadLetters
    from workers.recovery import INFLIGHT_KEY, UNACKED_KEY, alive

    now = time.time() if now is None else now
    depth, age = {}, {}
    for queue in QUEUES:
        depth[queue] = int(client.llen(queue))
        # kombu LPUSHes and BRPOPs: the oldest message is the last one (a restored one is pushed there too)
        sent = _sent_at(client.lindex(queue, -1)) if depth[queue] else None
        age[queue] = max(0.0, now - sent) if sent is not None else 0.0
    inflight = sum(int(client.llen(name)) for name in client.hkeys(INFLIGHT_KEY))
    return {"queues": depth, "oldest_age_s": age, "unacked": int(client.hlen(UNACKED_KEY)) + inflight,
            "dead_letters": DeadLetters(client).count(), "workers_alive": len(alive(client))}


class BrokerCollector:
    """Broker gauges, read from Redis at each scrape; ``lookalike_broker_up`` is 0 when Redis cannot be
    reached (the other gauges are then left out rather than reported as zero)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None

    def describe(self) -> list[Any]:
        return []  # nothing is read from Redis when the collector is registered

    def collect(self) -> Iterator[Any]:
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            data = broker_gauges(self._client)
        except Exception as err:  # a scrape must answer even when Redis is away
            log.debug("broker gauges unavailable: %s", err)
            data = None
        yield from gauge_families(data)


def gauge_families(data: dict[str, Any] | None) -> Iterator[Any]:
    """``lookalike_broker_up``, then ``broker_gauges`` (and ``points`` when known) as metric families; ``data``
    None: Redis did not answer (the other gauges are left out rather than reported as zero)."""
    from prometheus_client.core import GaugeMetricFamily

    yield GaugeMetricFamily("lookalike_broker_up", "1 when Redis answered", value=0 if data is None else 1)
    if data is None:
        return

    depth = GaugeMetricFamily("lookalike_queue_depth", "Messages waiting in a queue (a backfill message carries "
                              "a chunk of events)", labels=["queue"])
    age = GaugeMetricFamily("lookalike_queue_oldest_age_seconds", "Age of the oldest waiting event (0 when the "
                            "queue is empty)", labels=["queue"])
    for queue in data["queues"]:
        depth.add_metric([queue], data["queues"][queue])
        age.add_metric([queue], data["oldest_age_s"][queue])
    yield depth
    yield age
    yield GaugeMetricFamily("lookalike_unacked_messages", "Messages taken by workers and not acknowledged yet",
                            value=data["unacked"])
    yield GaugeMetricFamily("lookalike_dead_letters", "Events in the dead-letter store", value=data["dead_letters"])
    yield GaugeMetricFamily("lookalike_workers_alive", "Worker processes with a live heartbeat",
                            value=data["workers_alive"])
    if data.get("points") is not None:
        points = GaugeMetricFamily("lookalike_points", "Points in the collection", labels=["collection"])
        points.add_metric([data["collection"]], data["points"])
        yield points


# ---------------------------------------------------------------------------------------------- serving
class WorkerMetrics:
    """The worker main process's side: the HTTP endpoint and the publisher thread."""

    def __init__(self, settings: WorkerSettings, name: str) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.settings, self.name = settings, name
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry)
        self.registry.register(BrokerCollector(settings.broker))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    def serve(self) -> None:
        from prometheus_client import start_http_server

        port, host = self.settings.metrics_port, self.settings.metrics_host
        if not port:
            return
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:  # metrics are not worth refusing to ingest over
            log.error("cannot serve metrics on %s:%d (%s): set LOOKALIKE_METRICS_PORT to a free port, or 0",
                      host, port, err.strerror or err)
            return
        log.info("metrics on http://%s:%d/metrics", host, port)

    def start_publishing(self) -> None:
        self._thread = threading.Thread(target=self._publish_loop, name="lookalike-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()

    def _publish_loop(self) -> None:
        import redis

        client = redis.Redis.from_url(self.settings.broker, socket_timeout=5, socket_connect_timeout=3)
        key = SNAPSHOT_PREFIX + self.name
        interval = self.settings.metrics_interval
        while True:
            try:
                data = json.dumps(snapshot(self._counter_families()))
                pipe = client.pipeline()
                pipe.lpush(key, data).ltrim(key, 0, SNAPSHOTS_KEPT - 1).expire(key, int(interval * SNAPSHOTS_KEPT * 2))
                pipe.execute()
            except Exception as err:  # Redis away: the next round tries again
                log.debug("cannot publish metrics: %s", err)
            if self._stop.wait(interval):
                return

    def _counter_families(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        return MultiProcessCollector(None).collect()


def snapshot(families: Iterable[Any], now: float | None = None) -> dict[str, Any]:
    """Event counters and freshness buckets from metric families, as JSON-able data."""
    events: dict[str, float] = {}
    fresh: dict[str, dict[str, float]] = {}
    points: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            if s.name == "lookalike_points" and "collection" in s.labels:
                points[s.labels["collection"]] = s.value
            elif s.name == "lookalike_ingest_events_total":
                key = f"{s.labels.get('lane')}/{s.labels.get('outcome')}"
                events[key] = events.get(key, 0.0) + s.value
            elif s.name == "lookalike_ingest_freshness_seconds_bucket":
                lane = fresh.setdefault(s.labels.get("lane", ""), {})
                lane[s.labels["le"]] = lane.get(s.labels["le"], 0.0) + s.value
    return {"t": time.time() if now is None else now, "events": events, "freshness": fresh, "points": points}


# ---------------------------------------------------------------------------------------------- status
def _delta(new: dict[str, float], old: dict[str, float]) -> dict[str, float]:
    """new − old per key; a counter that went down was reset (its worker restarted): all of new is recent."""
    out = {k: v - old.get(k, 0.0) for k, v in new.items()}
    return dict(new) if any(v < 0 for v in out.values()) else out


def quantile(q: float, buckets: dict[str, float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts keyed by ``le``; None without observations."""
    bounds = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for le, n in bounds:
        if n >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bucket: its bound is what can be said
            return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
        lower, below = le, n
    return lower


def last_minute(client: Any, window: float = 60.0, now: float | None = None) -> dict[str, Any]:
    """Rates (events/s by lane and outcome) and freshness p50/p99 per lane over about the last ``window``
    seconds, from every worker's published snapshots."""
    now = time.time() if now is None else now
    rates: dict[str, float] = {}
    buckets: dict[str, dict[str, float]] = {}
    spans = []
    points: dict[str, float] = {}
    for key in client.scan_iter(match=SNAPSHOT_PREFIX + "*", count=200):
        snaps = []
        for raw in client.lrange(key, 0, SNAPSHOTS_KEPT - 1):
            with contextlib.suppress(ValueError):
                snaps.append(json.loads(raw))
        snaps = [s for s in snaps if now - s.get("t", 0) <= window * 2]
        if len(snaps) < 2:
            continue
        newest = snaps[0]
        for collection, n in newest.get("points", {}).items():  # the newest count any worker made
            points[collection] = max(points.get(collection, 0.0), n)
        older = [s for s in snaps[1:] if newest["t"] - s["t"] >= window * 0.9]
        base = older[0] if older else snaps[-1]
        span = newest["t"] - base["t"]
        if span <= 0:
            continue
        spans.append(span)
        for k, v in _delta(newest["events"], base["events"]).items():
            rates[k] = rates.get(k, 0.0) + v / span
        for lane, b in newest["freshness"].items():
            d = _delta(b, base["freshness"].get(lane, {}))
            into = buckets.setdefault(lane, {})
            for le, n in d.items():
                into[le] = into.get(le, 0.0) + n
    by_lane: dict[str, dict[str, float]] = {}
    for k, v in rates.items():
        lane, outcome = k.split("/", 1)
        by_lane.setdefault(lane, {})[outcome] = round(v, 3)
    freshness = {lane: {"p50_s": quantile(0.5, b), "p99_s": quantile(0.99, b),
                        "events": max(b.values(), default=0)} for lane, b in buckets.items()}
    return {"window_s": round(max(spans), 1) if spans else None, "workers_reporting": len(spans),
            "rates_per_s": by_lane, "freshness": freshness, "points": points}


__all__ = ["BrokerCollector", "WorkerMetrics", "broker_gauges", "enable_multiprocess", "gauge_families",
           "ingest_metrics", "lane_of", "last_minute", "quantile", "snapshot"]
