"""Metrics: the ingestion series, the broker gauges, a real worker scraped after known events (prefork,
multiprocess mode, a pool child killed half-way), ``lookalike status`` from the same counters, and the
progress line of a run whose stderr is not a terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import TinyEmbedder
from tests.imagefactory import make_tree
from tests.redis_server import RedisServer
from tests.workerproc import Env, photo
from workers.events import BACKFILL_QUEUE, INGEST_BATCH_TASK, LIVE_QUEUE, celery_message, make_event


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


# ---------------------------------------------------------------------------------------------- pure parts
def test_quantile_interpolates_like_histogram_quantile() -> None:
    from workers.metrics import quantile

    buckets = {"0.1": 50.0, "0.25": 90.0, "1.0": 100.0, "+Inf": 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.1 + 0.15 * 0.5)
    assert quantile(0.99, buckets) == pytest.approx(0.25 + 0.75 * 0.9)
    assert quantile(0.5, {"0.1": 0.0, "+Inf": 0.0}) is None
    assert quantile(0.99, {"0.1": 1.0, "+Inf": 10.0}) == 0.1  # beyond the last bucket: its bound


def test_oldest_waiting_event_is_read_from_the_queued_message() -> None:
    from workers.metrics import _sent_at

    live = celery_message("lookalike.ingest", [make_event("/x/a.jpg", sent_at=100.5)], LIVE_QUEUE)
    chunk = celery_message(INGEST_BATCH_TASK, [[make_event("/x/b.jpg", sent_at=200.0),
                                                make_event("/x/c.jpg", sent_at=150.0)]], BACKFILL_QUEUE)
    assert _sent_at(live) == 100.5
    assert _sent_at(chunk) == 150.0
    assert _sent_at(celery_message("lookalike.ingest", [make_event("/x/d.jpg")], LIVE_QUEUE)) is None
    assert _sent_at(b"not json") is None and _sent_at(json.dumps({"body": "%%%"})) is None


def test_progress_without_a_terminal_writes_plain_lines_with_an_eta() -> None:
    from ingest.progress import Progress

    out = io.StringIO()
    bar = Progress(1000, stream=out, every=0.0)
    bar.update(250)
    bar.update(250, failed=2)
    bar.write("skipping /x/y.jpg: cannot decode")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("backfill: 250/1,000 images (25.0%), ") and "ETA 0:00:" in lines[0]
    assert lines[1].endswith(", 2 failed") and "500/1,000" in lines[1]
    assert lines[2] == "skipping /x/y.jpg: cannot decode"
    assert lines[3].startswith("backfill: 500/1,000 images") and "done in" in lines[3] and "ETA" not in lines[3]


def test_progress_without_a_total_has_no_eta() -> None:
    from ingest.progress import Progress

    out = io.StringIO()
    bar = Progress(None, stream=out, every=0.0)
    bar.update(7, failed=1)
    bar.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("backfill: 7 images, ") and first.endswith(", 1 failed") and "ETA" not in first
    assert "done in" in last and last.count("failed") == 1


def test_progress_lines_are_throttled() -> None:
    from ingest.progress import Progress

    out = io.StringIO()
    bar = Progress(10_000, stream=out, every=3600)
    for _ in range(1000):
        bar.update(10)
    bar.close()
    assert len(out.getvalue().splitlines()) == 1  # the closing line only


def test_a_backfill_records_stage_times_outcomes_and_model_load(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from ingest.metrics import IngestMetrics
    from ingest.pipeline import Pipeline
    from ingest.sources import iter_refs
    from search.config import Settings

    make_tree(tmp_path / "imgs", per_class=2)  # 3 classes
    (tmp_path / "imgs" / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    settings = Settings(data_dir=tmp_path / "data", model="tiny", batch_size=4)
    refs = list(iter_refs([str(tmp_path / "imgs")], labels_from_dirs=True))
    with Pipeline(settings, embedder=TinyEmbedder(), tagger=False, metrics=metrics) as pipeline:
        stats = pipeline.run(refs, total=len(refs))
        pipeline.run(refs, total=len(refs))  # a re-run: everything present
    samples = parse(generate_latest(registry).decode())
    assert stats.indexed == 6 and stats.failed == 1
    assert value(samples, "lookalike_ingest_events_total", lane="cli", outcome="indexed") == 6
    assert value(samples, "lookalike_ingest_events_total", lane="cli", outcome="failed") == 2
    assert value(samples, "lookalike_ingest_events_total", lane="cli", outcome="present") == 6
    assert value(samples, "lookalike_ingest_stage_seconds_count", stage="embed") == 6
    assert value(samples, "lookalike_ingest_stage_seconds_count", stage="read") == 14
    assert value(samples, "lookalike_ingest_batch_size_sum") == 14
    assert value(samples, "lookalike_ingest_stage_seconds_sum", stage="embed") > 0


# ---------------------------------------------------------------------------------------------- a real worker
@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer) -> Iterator[Env]:
    redis_server.client().flushall()
    e = Env(tmp_path, redis_server.url)
    yield e
    e.stop()


def _scrape(port: int, until: Any = None, timeout: float = 10) -> dict:
    """A scrape; with ``until``, the first scrape it accepts (``test:done`` is written before the task ends:
    the points are made durable, and their freshness observed, just after)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            samples = parse(resp.read().decode())
        if until is None or until(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def _status(env: Env, *args: str) -> Any:
    from tests.clirun import run_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_BROKER_URL", env.redis_url)
        mp.setenv("LOOKALIKE_MODEL", "tiny")
        return run_cli(["status", *args], env.data)


@pytest.mark.redis
def test_a_worker_is_scraped_after_known_events_and_a_killed_child_loses_no_counts(env: Env) -> None:
    port = _free_port()
    worker = env.start(LOOKALIKE_METRICS_PORT=str(port), LOOKALIKE_METRICS_INTERVAL="1")
    now = time.time()
    live = [photo(env.root / f"live{i}.jpg", i) for i in range(6)]
    broken = env.root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for path in [*live, broken]:
        env.send(make_event(str(path), sent_at=now))
    env.send({"version": 1})  # invalid event: dead-lettered
    chunk = [make_event(str(photo(env.root / f"bulk{i}.jpg", 100 + i)), sent_at=now) for i in range(4)]
    env.redis.lpush(BACKFILL_QUEUE, celery_message(INGEST_BATCH_TASK, [chunk], BACKFILL_QUEUE))
    env.wait(lambda: len(env.done()) == 11 and env.dead().count() == 2, what="11 events and 2 dead letters")

    fresh = "lookalike_ingest_freshness_seconds_count"
    s = _scrape(port, lambda s: value(s, fresh, lane="live") + value(s, fresh, lane="backfill") >= 10)
    events = "lookalike_ingest_events_total"
    assert value(s, events, lane="live", outcome="indexed") == 6
    assert value(s, events, lane="live", outcome="dead_lettered") == 2
    assert value(s, events, lane="backfill", outcome="indexed") == 4
    # Every event with a sent_at was waited for once; every stored one was made durable once.
    assert value(s, "lookalike_ingest_queue_wait_seconds_count", lane="live") == 7
    assert value(s, "lookalike_ingest_queue_wait_seconds_count", lane="backfill") == 4
    assert value(s, "lookalike_ingest_freshness_seconds_count", lane="live") == 6
    assert value(s, "lookalike_ingest_freshness_seconds_count", lane="backfill") == 4
    assert value(s, "lookalike_ingest_freshness_seconds_bucket", lane="live", le="+Inf") == 6
    assert value(s, "lookalike_ingest_stage_seconds_count", stage="embed") == 10
    assert value(s, "lookalike_ingest_stage_seconds_count", stage="read") == 11
    assert value(s, "lookalike_ingest_batch_size_sum") == 11
    assert value(s, "lookalike_model_load_seconds_count") == 1
    assert total(s, "lookalike_points") == 10
    assert value(s, "lookalike_broker_up") == 1
    assert value(s, "lookalike_queue_depth", queue=LIVE_QUEUE) == 0
    assert value(s, "lookalike_dead_letters") == 2
    assert value(s, "lookalike_workers_alive") >= 1

    # The pool child is SIGKILLed (idle); its replacement's counts add to the dead one's.
    child = worker.child()
    assert child is not None and child != worker.proc.pid
    os.kill(child, signal.SIGKILL)
    env.wait(lambda: worker.child() not in (None, child), what="a replacement child")
    for i in range(3):
        env.send(make_event(str(photo(env.root / f"after{i}.jpg", 200 + i)), sent_at=time.time()))
    env.wait(lambda: len(env.done()) == 14, what="3 more events")
    s = _scrape(port, lambda s: value(s, fresh, lane="live") >= 9)
    assert value(s, events, lane="live", outcome="indexed") == 9
    assert value(s, "lookalike_ingest_freshness_seconds_count", lane="live") == 9
    assert value(s, "lookalike_ingest_stage_seconds_count", stage="embed") == 13
    assert value(s, "lookalike_model_load_seconds_count") == 2  # the replacement loaded the model too

    # `lookalike status` reads the same counters, published to Redis every second here.
    time.sleep(2.5)
    result = _status(env, "--json")
    data = json.loads(result.stdout)
    minute = data["last_minute"]
    assert minute["workers_reporting"] == 1
    assert minute["rates_per_s"]["live"]["indexed"] > 0
    assert 0 < minute["freshness"]["live"]["p50_s"] <= minute["freshness"]["live"]["p99_s"]
    assert data["points"] == 13 and "as the workers last counted them" in data["store_note"]  # the worker owns it
    text = _status(env).stdout
    assert "last minute" in text and "live" in text
    prom = parse(_status(env, "--prometheus").stdout)
    assert value(prom, "lookalike_queue_depth", queue=BACKFILL_QUEUE) == 0
    assert value(prom, "lookalike_dead_letters") == 2
