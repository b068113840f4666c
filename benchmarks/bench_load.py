"""Freshness under load, and what metrics cost: uploads arriving while a large backfill runs through the same
worker, and the worker's throughput with its metrics on and off — one run, real Caltech photos, Lite0.

    .venv/bin/python benchmarks/bench_load.py ../shared/data/caltech101-dev [--backfill 1500] [--rate 4]
        [--repeats 2] [--out benchmarks/results/load.md]

It starts its own redis-server and one ``celery worker`` at a time (prefork, one child owning a fresh
embedded store, Lite0 on ONNX with 2 threads: ``benchmarks/bench_freshness.py``'s harness).

1. Solo: the same ``--backfill`` images (chunks of 64 on ``lookalike.backfill``) into a fresh store, with
   metrics off (``BENCH_NO_METRICS=1``: nothing recorded) and on, alternately, ``--repeats`` times each:
   images/s from the first chunk sent to the last chunk done, in the order off, on, on, off, … (a drift
   cancels out). Overhead = 1 − on/off (medians). And, directly, the time to record one event's series.
2. Under load: the same backfill into a fresh store while upload events (other images) arrive on
   ``lookalike.live`` at ``--rate`` per second, from 2 s after the backfill starts until it ends. Per upload:
   freshness = ``sent_at`` → its point durable (the task's ``done_at``: an upload's write is fsynced before
   the task records it). Backfill images/s against the solo (metrics on) median.
3. The worker's ``/metrics`` scraped before and after the loaded run: which series moved, and by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_freshness import Harness, _client_app, _send_chunks, copy_model_cache, pct  # noqa: E402

PORT = 19808


def scrape(port: int = PORT) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def backfilled(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    """Backfill events the worker has finished, whatever their outcome."""
    return sum(v for (n, ls), v in samples.items()
               if n == "lookalike_ingest_events_total" and dict(ls).get("lane") == "backfill")


def backfill_run(h: Harness, refs: list[Any], root: Path, data: Path, metrics: bool, uploads: list[Path] | None = None,
                 rate: float = 4.0, name: str = "run", yield_every: int | None = None) -> dict[str, Any]:
    """One fresh worker and store; the backfill (and uploads, if given) through it."""
    from workers.events import INGEST_TASK, LIVE_QUEUE, make_event

    extra = {"BENCH_NO_METRICS": "0" if metrics else "1", "LOOKALIKE_METRICS_PORT": str(PORT) if metrics else "0",
             "LOOKALIKE_METRICS_INTERVAL": "2", "BENCH_YIELD_EVERY": str(yield_every or "")}
    proc = h.start_worker(data, (root,), probe=False, log=h.tmp / f"worker-{name}.log", **extra)
    app = _client_app(h, data, root)
    before = scrape() if metrics else {}
    sent_uploads: list[Any] = []
    stop = threading.Event()

    def send_uploads() -> None:
        time.sleep(2.0)
        start = time.time()
        for n, path in enumerate(uploads or []):
            if stop.is_set():
                return
            time.sleep(max(0.0, start + n / rate - time.time()))
            sent_uploads.append(app.send_task(INGEST_TASK, args=[make_event(str(path), sent_at=time.time())],
                                              queue=LIVE_QUEUE))

    sender = threading.Thread(target=send_uploads, daemon=True)
    t0 = time.perf_counter()
    chunks = _send_chunks(app, refs)
    if uploads:
        sender.start()
    counts = [r.get(timeout=3600)["counts"] for r in chunks]
    if uploads:  # a chunk that handed its rest back has finished; the rest runs as new tasks, not awaited here
        deadline = time.monotonic() + 3600
        while backfilled(scrape()) < len(refs) and time.monotonic() < deadline:
            time.sleep(0.05)
    seconds = time.perf_counter() - t0
    stop.set()
    if uploads:
        sender.join()
    rows = [r.get(timeout=120) for r in sent_uploads]
    after = scrape() if metrics else {}
    h.stop_worker(proc)
    out: dict[str, Any] = {"images": len(refs), "seconds": round(seconds, 2), "img_s": len(refs) / seconds,
                           "indexed": sum(c.get("indexed", 0) for c in counts),
                           "handed_back": sum(c.get("handed_back", 0) for c in counts)}
    if rows:
        fresh = [r["done_at"] - (r["received_at"] - r["queue_wait"]) for r in rows]
        waits = [r["queue_wait"] for r in rows]
        out["uploads"] = {"n": len(rows), "statuses": {s: sum(r["status"] == s for r in rows)
                                                       for s in {r["status"] for r in rows}},
                          "fresh_ms": {"p50": pct(fresh, 50) * 1000, "p99": pct(fresh, 99) * 1000,
                                       "max": max(fresh) * 1000},
                          "queue_wait_ms": {"p50": pct(waits, 50) * 1000, "p99": pct(waits, 99) * 1000}}
    if metrics:
        out["moved"] = {f"{n}{dict(ls) or ''}": round(v - before.get((n, ls), 0.0), 4)
                        for (n, ls), v in sorted(after.items()) if v != before.get((n, ls), 0.0)
                        and not n.endswith("_bucket") and not n.endswith("_created")}
    return out


COST = """
import sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from ingest.pipeline import Outcome
from workers.metrics import enable_multiprocess, ingest_metrics

enable_multiprocess(tempfile.mkdtemp())
m = ingest_metrics()
o = Outcome(uri="x", status="indexed", timings=dict.fromkeys(("read", "decode", "prepare", "lookup", "embed",
                                                             "tag", "upsert"), 0.001))
n, best = 5000, float("inf")
for _ in range(5):
    t = time.perf_counter()
    for _ in range(n):  # what a worker records per event (tasks.BatchRun, a batch of one)
        m.queue_wait.labels("live").observe(0.05)
        m.observe_batch([o])
        m.count("live", "indexed")
        m.durable("live", [time.time() - 0.1])
        m.points.labels("c").set(5)
    best = min(best, (time.perf_counter() - t) / n)
print(best * 1e6)
"""


def recording_cost() -> float:
    """Microseconds a worker spends recording one event's metrics (multiprocess mode, as in a worker)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", COST, str(REPO)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def markdown(res: dict[str, Any], argv: list[str]) -> str:
    solo_on = [r["img_s"] for r in res["solo"] if r["metrics"]]
    solo_off = [r["img_s"] for r in res["solo"] if not r["metrics"]]
    on, off = statistics.median(solo_on), statistics.median(solo_off)
    y0 = res["yield_every"][0]
    load = res["loaded"][str(y0)]
    lines = [
        "# Freshness under load, and the cost of metrics", "",
        f"`{' '.join(['.venv/bin/python', *argv])}` — {os.cpu_count()} cores, "
        f"{res['images']} Caltech101 photos per backfill, Lite0 ONNX, one prefork child.", "",
        "## Metrics overhead (solo backfill through the worker, fresh store each run)", "",
        "| run | metrics | images/s |", "|---|---|---|",
        *[f"| {i + 1} | {'on' if r['metrics'] else 'off'} | {r['img_s']:.1f} |" for i, r in enumerate(res["solo"])],
        "", f"Median on {on:.1f}, off {off:.1f} images/s: overhead **{100 * (1 - on / off):.1f} %** "
        "(target ≤ 3 %); on this shared 2-core machine runs of the same configuration differ by up to ±15 %, "
        "so this comparison cannot resolve a few per cent. Measured directly, recording one event's series "
        f"(multiprocess mode, as in a worker) takes **{res['record_us']:.0f} µs** = "
        f"**{100 * res['record_us'] * 1e-6 * off:.2f} %** of an event's {1000 / off:.1f} ms at the solo rate.", "",
        "## Uploads during the backfill", "",
        f"Uploads at {res['rate']:g}/s while the backfill runs; a backfill chunk looks for waiting uploads every "
        "*sub-batch* images and hands the rest of its chunk back when there are. Solo = the same backfill "
        "alone with the same sub-batch (metrics on). Target: upload freshness p99 ≤ 250 ms with the backfill ≥ "
        "0.8× solo.", "",
        "| sub-batch | solo images/s | under load images/s | ratio | handed back | uploads | freshness p50 | p99 "
        "| max | queue wait p99 |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for y in res["yield_every"]:
        solo = on if y == y0 else res["solo_yield"][str(y)]["img_s"]
        r = res["loaded"][str(y)]
        up = r["uploads"]
        lines.append(f"| {y} | {solo:.1f} | {r['img_s']:.1f} | **{r['img_s'] / solo:.2f}** | {r['handed_back']} | "
                     f"{up['n']} {up['statuses']} | {up['fresh_ms']['p50']:.0f} ms | **{up['fresh_ms']['p99']:.0f} "
                     f"ms** | {up['fresh_ms']['max']:.0f} ms | {up['queue_wait_ms']['p99']:.0f} ms |")
    lines += [
        "", f"## The worker's /metrics: what moved during the loaded run (sub-batch {y0})", "",
        "| series | change |", "|---|---|",
        *[f"| `{k}` | {v:g} |" for k, v in load.get("moved", {}).items()], "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--backfill", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=4.0, help="upload events per second during the backfill")
    parser.add_argument("--repeats", type=int, default=3, help="solo runs with metrics on, and as many off")
    parser.add_argument("--yield-every", default="8,16",
                        help="backfill sub-batch sizes to compare under load (the first is the default's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ingest.sources import iter_refs

    root = args.dataset.resolve()
    refs = list(iter_refs([root], labels_from_dirs=True))
    mixed = refs[::7] + [r for i, r in enumerate(refs) if i % 7]  # every slice spans the classes
    bulk, uploads = mixed[:args.backfill], [Path(r.uri) for r in mixed[args.backfill:]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    h = Harness(tmp)
    ys = [int(y) for y in args.yield_every.split(",")]
    res: dict[str, Any] = {"images": len(bulk), "rate": args.rate, "solo": [], "yield_every": ys, "solo_yield": {},
                           "loaded": {}, "record_us": recording_cost()}
    try:
        warm = tmp / "warm"
        from ingest.pipeline import Pipeline

        with Pipeline(h.settings(warm, (root,))) as p:  # export the ONNX model once, outside the clock
            _ = p.embedder
        for i in range(args.repeats * 2):
            metrics = i % 4 in (1, 2)  # off, on, on, off, …: a drift or an order effect cancels out
            data = tmp / f"solo{i}"
            copy_model_cache(warm, data)
            r = backfill_run(h, bulk, root, data, metrics, name=f"solo{i}", yield_every=ys[0])
            r["metrics"] = metrics
            res["solo"].append(r)
            print(f"solo {i} metrics={metrics}: {r['img_s']:.1f} images/s", file=sys.stderr)
        for y in ys:
            if y != ys[0]:
                data = tmp / f"solo-y{y}"
                copy_model_cache(warm, data)
                res["solo_yield"][str(y)] = backfill_run(h, bulk, root, data, True, name=f"solo-y{y}", yield_every=y)
            data = tmp / f"loaded-y{y}"
            copy_model_cache(warm, data)
            res["loaded"][str(y)] = backfill_run(h, bulk, root, data, True, uploads=uploads, rate=args.rate,
                                                 name=f"loaded-y{y}", yield_every=y)
            print(y, json.dumps(res["loaded"][str(y)].get("uploads")), file=sys.stderr)
    finally:
        h.close()
    text = markdown(res, sys.argv)
    print(text)
    if args.out:
        args.out.write_text(text)
    (tmp / "result.json").write_text(json.dumps(res, indent=1))
    print(f"raw results: {tmp / 'result.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
