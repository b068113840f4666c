"""Freshness and throughput of event-driven ingestion (Celery on Redis), measured on real images.

    .venv/bin/python benchmarks/bench_freshness.py /work/shared/data/caltech101-dev [--events 200] [--rate 4]
        [--seed 300] [--images 1500] [--skip-throughput] [--json results.json]

It starts its own redis-server (AOF on) and ``celery worker`` processes (prefork, one child owning a fresh
embedded store, efficientnet-lite0 on ONNX with 2 threads), each in its own temp data dir.

1. Freshness. ``--seed`` labelled images are backfilled first (so new images get tags). Then ``--events``
   upload events are published at a steady ``--rate`` per second, each carrying its publish time. For
   every event the worker reports: when it received the message, the pipeline's stage timings, when a
   real search (k=1, by the new vector, in the worker process — the embedded store belongs to it) first
   returned the new point, and when the task finished (write flushed to disk; the ack follows).
   Afterwards the store is opened here and every event's image is searched again by its stored vector.
2. Throughput. The same ``--images`` images are ingested by ``Pipeline.run`` in this process and, in a
   second fresh store, by one worker fed ``lookalike.ingest_batch`` chunks of 64 through Redis; the ratio
   is worker images/s over in-process images/s (same machine, same run).

When this module is the worker's app (``celery -A bench_freshness``), ``app`` wraps the store so that each
upsert is followed by the k=1 search probe; the probe's time is returned in the task result (a Redis
result backend is configured for the benchmark only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------- worker side
class _ProbeStore:
    """A store whose upsert, before its flush, searches each new vector and records when it is found."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.visible: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def upsert(self, points: Any) -> None:
        import numpy as np

        with self._store.bulk():  # same writes; the flush waits until the probe has searched
            self._store.upsert(points)
            hits = self._store.search(np.stack([p.vector for p in points]), k=1)
            now = time.time()
            for p, h in zip(points, hits, strict=True):
                if h and h[0].id == p.id:
                    self.visible[p.id] = now


class _Probed:
    def __init__(self, pipeline: Any, store: _ProbeStore) -> None:
        self._pipeline, self._store = pipeline, store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def ingest(self, refs: Any) -> Any:
        outcomes = self._pipeline.ingest(refs)
        for o in outcomes:
            if o.id in self._store.visible:
                o.timings["visible_at"] = self._store.visible.pop(o.id)
        return outcomes


class _NoMetrics:
    """Records nothing (BENCH_NO_METRICS=1): the baseline of the metrics-overhead measurement."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self


def _factory(settings: Any) -> Any:
    from ingest.pipeline import Pipeline
    from search.store import open_store

    if os.environ.get("BENCH_YIELD_EVERY"):  # backfill sub-batch size: how often a chunk looks for uploads
        import workers.tasks

        workers.tasks.YIELD_EVERY = int(os.environ["BENCH_YIELD_EVERY"])
    if os.environ.get("BENCH_NO_METRICS") == "1":
        import workers.metrics

        workers.metrics._metrics = _NoMetrics()  # type: ignore[assignment]

    if os.environ.get("BENCH_PROBE") != "1":
        return Pipeline(settings, source="worker")
    store = _ProbeStore(open_store(settings))
    return _Probed(Pipeline(settings, store=store, source="worker"), store)


def __getattr__(name: str) -> Any:
    if name == "app":
        from workers.app import make_app

        value = make_app(pipeline_factory=_factory)
        globals()["app"] = value
        return value
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------- harness
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Harness:
    def __init__(self, tmp: Path) -> None:
        from tests.redis_server import RedisServer

        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis").start()
        self.procs: list[subprocess.Popen[bytes]] = []

    def settings(self, data: Path, roots: tuple[Path, ...]) -> Any:
        from workers.config import worker_settings

        return worker_settings(broker_url=self.redis.url, data_dir=data, allowed_roots=roots, threads=2)

    def start_worker(self, data: Path, roots: tuple[Path, ...], probe: bool, log: Path,
                     **extra: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
        env.update({"LOOKALIKE_BROKER_URL": self.redis.url, "LOOKALIKE_DATA_DIR": str(data),
                    "LOOKALIKE_ALLOWED_ROOTS": os.pathsep.join(map(str, roots)),
                    "LOOKALIKE_RESULT_BACKEND": self.redis.url[:-1] + "1", "BENCH_PROBE": "1" if probe else "0",
                    "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")]), "HF_HUB_OFFLINE": "1",
                    "LOOKALIKE_METRICS_PORT": "0", **extra})
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_freshness", "worker", "-c", "1",
                                 "-P", "prefork", "-l", "info", "-Q", "lookalike.live,lookalike.backfill",
                                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                                cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 180
        while "pipeline ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return proc

    def stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.stop_worker(p)
        self.redis.stop()


def copy_model_cache(src: Path, dst: Path) -> None:
    """Reuse the ONNX export between data dirs (the export is a one-time cost, not ingestion)."""
    if (src / "cache").exists():
        shutil.copytree(src / "cache", dst / "cache", dirs_exist_ok=True)


def _client_app(h: Harness, data: Path, root: Path) -> Any:
    """A Celery client for the worker on ``data``, with a result backend (Redis db 1) so we can wait on tasks."""
    from workers.app import make_app

    os.environ["LOOKALIKE_RESULT_BACKEND"] = h.redis.url[:-1] + "1"
    try:
        return make_app(h.settings(data, (root,)))
    finally:
        del os.environ["LOOKALIKE_RESULT_BACKEND"]


def _send_chunks(app: Any, refs: list[Any], size: int = 64) -> list[Any]:
    """Backfill-queue batch tasks of ``size`` events; returns their AsyncResults."""
    from workers.events import BACKFILL_QUEUE, INGEST_BATCH_TASK, make_event

    return [app.send_task(INGEST_BATCH_TASK, args=[[make_event(r.uri, r.labels) for r in refs[i:i + size]]],
                          queue=BACKFILL_QUEUE) for i in range(0, len(refs), size)]


def freshness(h: Harness, seed_refs: list[Any], event_paths: list[Path], rate: float, data: Path,
              root: Path) -> dict[str, Any]:
    from workers.events import INGEST_TASK, LIVE_QUEUE, make_event

    proc = h.start_worker(data, (root,), probe=True, log=h.tmp / "worker-freshness.log")
    app = _client_app(h, data, root)
    t0 = time.time()
    seeds = _send_chunks(app, seed_refs)
    for r in seeds:
        r.get(timeout=600)
    seed_s = time.time() - t0
    app.send_task(INGEST_TASK, args=[make_event(str(event_paths[0]))], queue=LIVE_QUEUE).get(timeout=60)  # warm
    results = []
    interval = 1.0 / rate
    start = time.time()
    for n, path in enumerate(event_paths[1:]):
        target = start + n * interval
        time.sleep(max(0.0, target - time.time()))
        results.append(app.send_task(INGEST_TASK, args=[make_event(str(path), sent_at=time.time())],
                                     queue=LIVE_QUEUE))
    rows = [r.get(timeout=600) for r in results]
    h.stop_worker(proc)

    def stage(row: dict[str, Any], *names: str) -> float:
        return sum(row["timings"].get(n, 0.0) for n in names)

    sent = [r["received_at"] - r["queue_wait"] for r in rows]
    searchable = [r["timings"]["visible_at"] - s for r, s in zip(rows, sent, strict=True)
                  if "visible_at" in r["timings"]]
    acked = [r["done_at"] - s for r, s in zip(rows, sent, strict=True)]
    stages = {
        "queue wait": [r["queue_wait"] for r in rows],
        "read + lookup": [stage(r, "read", "lookup") for r in rows],
        "decode + prepare": [stage(r, "decode") for r in rows],
        "embed": [stage(r, "embed") for r in rows],
        "tag": [stage(r, "tag") for r in rows],
        "upsert + probe search + fsync": [stage(r, "upsert") for r in rows],
    }
    tagged = sum(1 for r in rows if r["tags"])

    # Check from outside: every event's image is in the store and is its own nearest neighbour.
    from search.store import open_store

    store = open_store(h.settings(data, (root,)))
    try:
        ids = [r["id"] for r in rows]
        points = {p.id: p for p in store.retrieve(ids, with_vectors=True)}
        import numpy as np

        found = 0
        if points:
            hits = store.search(np.stack([points[i].vector for i in ids if i in points]), k=1)
            found = sum(1 for i, hh in zip([i for i in ids if i in points], hits, strict=True) if hh and hh[0].id == i)
    finally:
        store.close()
    return {
        "events": len(rows), "rate_per_s": rate, "seeded": len(seed_refs), "seed_s": round(seed_s, 1),
        "statuses": {s: sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}},
        "tagged": tagged, "found_by_search_after": found, "probe_found": len(searchable),
        "searchable_ms": {"p50": pct(searchable, 50) * 1000, "p99": pct(searchable, 99) * 1000},
        "acked_ms": {"p50": pct(acked, 50) * 1000, "p99": pct(acked, 99) * 1000},
        "stages_ms": {k: {"p50": pct(v, 50) * 1000, "p99": pct(v, 99) * 1000, "mean": statistics.fmean(v) * 1000}
                      for k, v in stages.items()},
    }


def throughput(h: Harness, refs: list[Any], root: Path, data_a: Path, data_b: Path) -> dict[str, Any]:
    from ingest.pipeline import Pipeline

    settings = h.settings(data_a, (root,))
    with Pipeline(settings, source="backfill") as pipeline:
        from PIL import Image

        pipeline.embedder.embed_images([Image.new("RGB", (64, 64))])  # model loaded before the clock starts
        t0 = time.perf_counter()
        stats = pipeline.run(refs)
        in_process = time.perf_counter() - t0
    copy_model_cache(data_a, data_b)
    proc = h.start_worker(data_b, (root,), probe=False, log=h.tmp / "worker-throughput.log")
    app = _client_app(h, data_b, root)
    t0 = time.perf_counter()
    sent = _send_chunks(app, refs)
    counts = [r.get(timeout=1800)["counts"] for r in sent]
    via_workers = time.perf_counter() - t0
    h.stop_worker(proc)
    indexed = sum(c["indexed"] for c in counts)
    return {"images": len(refs), "in_process_s": round(in_process, 2), "in_process_img_s": len(refs) / in_process,
            "in_process_indexed": stats.indexed, "workers_s": round(via_workers, 2),
            "workers_img_s": len(refs) / via_workers, "workers_indexed": indexed,
            "ratio": (len(refs) / via_workers) / (len(refs) / in_process)}


def fsync_cost(data: Path) -> dict[str, float]:
    """What one synced single-point write costs on this disk (the floor under an upload's ack)."""
    import uuid

    import numpy as np

    from search.config import get_settings
    from search.schema import CollectionMeta, PointRecord
    from search.store import open_store

    store = open_store(get_settings(data_dir=data, model="probe"))
    store.ensure_collection(CollectionMeta(model="probe", dim=8, preprocessing="none"))
    out = {}
    try:
        for sync in (True, False):
            store.sync_writes = sync
            times = []
            for _ in range(15):
                v = np.random.rand(8).astype(np.float32)
                t = time.perf_counter()
                store.upsert([PointRecord(str(uuid.uuid4()), v / np.linalg.norm(v), {})])
                times.append(time.perf_counter() - t)
            out["synced_ms" if sync else "unsynced_ms"] = statistics.median(times) * 1000
    finally:
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="upload events per second")
    parser.add_argument("--seed", type=int, default=300, help="labelled images backfilled before the uploads")
    parser.add_argument("--images", type=int, default=1500, help="images for the throughput comparison")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from ingest.sources import iter_refs

    root = args.dataset.resolve()
    refs = list(iter_refs([root], labels_from_dirs=True))
    # Spread every slice over all classes: seeds, events and throughput images are disjoint.
    mixed = refs[::7] + [r for i, r in enumerate(refs) if i % 7]
    seed_refs, event_refs = mixed[:args.seed], mixed[args.seed:args.seed + args.events + 1]
    bulk_refs = mixed[args.seed + args.events + 1:][:args.images]
    tmp = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    h = Harness(tmp)
    out: dict[str, Any] = {"cores": os.cpu_count(), "fsync": fsync_cost(tmp / "fsync")}
    try:
        if not args.skip_throughput:
            out["throughput"] = throughput(h, bulk_refs, root, tmp / "inproc", tmp / "workers")
            print(json.dumps(out["throughput"], indent=1), file=sys.stderr)
        if not args.skip_freshness:
            if (tmp / "inproc").exists():
                copy_model_cache(tmp / "inproc", tmp / "fresh")
            out["freshness"] = freshness(h, seed_refs, [Path(r.uri) for r in event_refs], args.rate, tmp / "fresh",
                                         root)
    finally:
        h.close()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
