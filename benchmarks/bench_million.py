"""The one-machine ceiling: the embedded store at a million points, built and then grown the way workers grow it.

    .venv/bin/python benchmarks/bench_million.py --n 1000000 --dim 256 --out bench-out/million-256.md
    .venv/bin/python benchmarks/bench_million.py --n 100000 --dim 1280 --out bench-out/million-1280.md

Data: real EfficientNet-Lite0 embeddings of the photos in ``../shared/data/caltech101-dev`` (computed once through
the lab's embedding cache under ``bench-out/lab`` and kept as ``bench-out/caltech-lite0.npy`` +
``caltech-files.txt``, which ``bench_search.py`` reads too), PCA to ``--dim`` (fitted on the real vectors; 1280 =
raw), L2-normalised; ``--n`` points = real vectors + Gaussian noise (norm ``--noise``), renormalised, payload
``labels`` = the class folder. Queries are other noisy copies (never stored points). The store is the project's
``open_store`` with ``quantization=int8`` and the default ``hnsw_threshold``; the index is built the way the
store builds it by itself (in the background once enough points are unindexed), after a bulk load.

Measured: bulk upsert rate, index build time, disk and RSS, search p50/p99 and recall@10 against exact numpy
top-10 (same run), a label filter, reopen. Then ``--live`` more points are written in batches of
``--live-batch`` (one acknowledged upsert each, as a worker writes) while a thread searches: upsert latency,
search latency during and after, and whether each new point is its own top hit right after its upsert returns.
Markdown to stdout and ``--out``; progress to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from search.config import Settings  # noqa: E402
from search.schema import CollectionMeta, Filter, Match, PointRecord, point_id  # noqa: E402
from search.store import EdgeStore, open_store  # noqa: E402

K = 10
DATASET = REPO.parent / "shared" / "data" / "caltech101-dev"
REAL = REPO / "bench-out" / "caltech-lite0.npy"
FILES = REAL.parent / "caltech-files.txt"
EVENTS: list[tuple[float, str]] = []  # the store's own log lines (copy, build, swap), with their times


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        EVENTS.append((time.perf_counter(), record.getMessage()))
        say(f"store: {record.getMessage()}")


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def real_embeddings() -> tuple[np.ndarray, list[str]]:
    """Lite0 vectors of the dataset and their class folders, computed once (cached in bench-out)."""
    if not (REAL.exists() and FILES.exists()):
        from ingest.lab.datasets import load_dataset
        from ingest.lab.embedcache import EmbeddingCache
        from search.models import get_embedder

        say(f"embedding {DATASET} with efficientnet-lite0 (cache under bench-out/lab)")
        settings = Settings(data_dir=REPO / "bench-out" / "lab")
        embedder = get_embedder("efficientnet-lite0", settings)
        cache = EmbeddingCache.for_embedder(embedder, settings)
        try:
            data = load_dataset(DATASET, embedder, settings, cache)
        finally:
            cache.close()
        REAL.parent.mkdir(parents=True, exist_ok=True)
        np.save(REAL, data.vectors.astype(np.float32))
        FILES.write_text("\n".join(data.keys) + "\n")
    x = np.load(REAL).astype(np.float32)
    rows = FILES.read_text().split()
    return normalise(x), [r.split("/", 1)[0] for r in rows]


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    if dim >= x.shape[1]:
        return x
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return normalise((x - mean) @ vt[:dim].T)


def noisy(base: np.ndarray, idx: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    scale_per_dim = np.float32(scale / np.sqrt(base.shape[1]))
    noise = rng.standard_normal((len(idx), base.shape[1]), dtype=np.float32) * scale_per_dim
    return normalise(base[idx] + noise)


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) * 1000 if xs else float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def du_mb(path: Path) -> float:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0]) / 1e6


def topk(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    s = x @ q
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top])]


def recall(found: list[list[int]], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def timed_searches(store: EdgeStore, qs: np.ndarray, index: dict[str, int], filters: list[Filter] | None = None
                   ) -> tuple[list[float], list[list[int]]]:
    for i in range(min(20, len(qs))):  # warm-up, like a long-running service
        store.search(qs[i], k=K, filter=None if filters is None else filters[i])
    lat, found = [], []
    for i, q in enumerate(qs):
        t = time.perf_counter()
        (hits,) = store.search(q, k=K, filter=None if filters is None else filters[i])
        lat.append(time.perf_counter() - t)
        found.append([index.get(h.id, -1) for h in hits])
    return lat, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256, help="PCA dimensions (1280 = the raw Lite0 vectors)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--live", type=int, default=50_000, help="points added afterwards as workers add them")
    ap.add_argument("--live-batch", type=int, default=16)
    ap.add_argument("--noise", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=REPO / "bench-out" / "million-store")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "million.md")
    args = ap.parse_args()
    logging.getLogger("search.store.edge").addHandler(_Collect())
    logging.getLogger("search.store.edge").setLevel(logging.INFO)
    t_run = time.perf_counter()
    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)

    real, classes = real_embeddings()
    names, labels_real = np.unique(classes, return_inverse=True)
    base = pca(real, args.dim)
    dim = base.shape[1]
    say(f"{len(base)} real vectors, {dim}-d; generating {args.n:,} points")
    src = np.arange(args.n) % len(base)
    rng.shuffle(src)
    x = np.empty((args.n, dim), dtype=np.float32)
    for b in range(0, args.n, 100_000):
        x[b:b + 100_000] = noisy(base, src[b:b + 100_000], rng, args.noise)
    labels = labels_real[src]
    ids = [point_id(f"{i:064x}") for i in range(args.n + args.live)]
    index = {pid: i for i, pid in enumerate(ids)}
    q_src = rng.integers(0, len(base), args.queries)
    qs = noisy(base, q_src, rng, args.noise)
    q_labels = labels_real[q_src]  # the filter: the query's own class ("more like this, among <label>")
    filters = [Filter(must=(Match("labels", (str(names[lab]),)),)) for lab in q_labels]
    r: dict[str, float] = {}

    say("numpy exact baseline")
    truth, lat_np = [], []
    for q in qs:
        t = time.perf_counter()
        truth.append(topk(x, q))
        lat_np.append(time.perf_counter() - t)
    members = {lab: np.flatnonzero(labels == lab) for lab in np.unique(q_labels)}
    truth_f = [members[lab][topk(x[members[lab]], q)] for q, lab in zip(qs, q_labels, strict=True)]

    shutil.rmtree(args.data_dir, ignore_errors=True)
    settings = Settings(data_dir=args.data_dir, quantization="int8")
    rss0 = rss_mb()
    store = open_store(settings, "million")
    assert isinstance(store, EdgeStore)
    store.ensure_collection(CollectionMeta(model="bench-million", dim=dim, preprocessing=f"lite0-pca{dim}"))

    say(f"bulk upsert of {args.n:,} points (batches of 1024, inside bulk())")
    t = time.perf_counter()
    with store.bulk():
        for b in range(0, args.n, 1024):
            store.upsert([PointRecord(ids[i], x[i], {"labels": [str(names[labels[i]])], "source": "bench"})
                          for i in range(b, min(args.n, b + 1024))])
            if b % 200_000 == 0:
                say(f"  {b:,}")
    r["upsert_s"] = time.perf_counter() - t  # includes the flush at the end of the block
    say(f"upsert {args.n / r['upsert_s']:,.0f} points/s; exact search before the index")
    # the flush at the end of bulk() started the background build; measure exact search meanwhile
    lat_exact, found_exact = timed_searches(store, qs[:50], index)
    assert store.building(), "the store should have started its background build"
    child_peak = 0.0
    while not store.wait_for_build(0.5):  # the child's own peak (VmHWM), read while it runs
        build = store._building
        proc = build.proc if build is not None else None
        if proc is not None:
            child_peak = max(child_peak, _hwm_mb(proc.pid))
    r["child_maxrss_mb"] = child_peak
    build_started = next((ts for ts, m in EVENTS if "building the index in the background" in m), t)
    r["build_s"] = time.perf_counter() - build_started
    with store._using() as shard:
        info = shard.info()
    r["indexed"] = info.indexed_vectors_count
    r["disk_mb"] = du_mb(args.data_dir / "qdrant" / "million")
    say(f"built in {r['build_s']:.0f} s; indexed {info.indexed_vectors_count:,} of {info.points_count:,}")

    lat_hnsw, found = timed_searches(store, qs, index)
    lat_filt, found_f = timed_searches(store, qs, index, filters)
    r["rss_store_mb"] = rss_mb() - rss0
    t = time.perf_counter()
    store.search(qs, k=K)
    r["batch_qps"] = len(qs) / (time.perf_counter() - t)

    store.close()
    t = time.perf_counter()
    store = open_store(settings, "million")
    r["reopen_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store.search(qs[0], k=K)
    r["first_query_ms"] = (time.perf_counter() - t) * 1000
    assert isinstance(store, EdgeStore)

    say(f"live: {args.live:,} points in batches of {args.live_batch}, each acknowledged, a search thread beside")
    new = noisy(base, rng.integers(0, len(base), args.live), rng, args.noise)
    new_labels = rng.integers(0, len(names), args.live)
    stop = threading.Event()
    during: list[tuple[float, bool]] = []  # (latency, a build was running)

    def search_loop() -> None:
        i = 0
        while not stop.is_set():
            b = store.building()
            t0 = time.perf_counter()
            store.search(qs[i % len(qs)], k=K)
            during.append((time.perf_counter() - t0, b or store.building()))
            i += 1
            time.sleep(0.005)  # ~100-200 queries/s beside the writes, not a saturating loop

    searcher = threading.Thread(target=search_loop, daemon=True)
    searcher.start()
    up_lat: list[float] = []
    up_building: list[bool] = []
    missed = 0
    builds_seen = 0
    was_building = store.building()
    t_live = time.perf_counter()
    for b in range(0, args.live, args.live_batch):
        rows = range(b, min(args.live, b + args.live_batch))
        batch = [PointRecord(ids[args.n + i], new[i], {"labels": [str(names[new_labels[i]])], "source": "worker"})
                 for i in rows]
        t = time.perf_counter()
        store.upsert(batch)
        up_lat.append(time.perf_counter() - t)
        now = store.building()
        up_building.append(now)
        builds_seen += int(now and not was_building)
        was_building = now
        hits = store.search(new[b:b + len(batch)], k=1)
        missed += sum(1 for i, h in zip(rows, hits, strict=True) if not h or h[0].id != ids[args.n + i])
        if b % 10_000 == 0:
            say(f"  {b:,} (building: {now})")
    r["live_s"] = time.perf_counter() - t_live
    say(f"live writes done in {r['live_s']:.0f} s; waiting for a running build")
    t = time.perf_counter()
    store.wait_for_build()
    r["wait_s"] = time.perf_counter() - t
    stop.set()
    searcher.join()
    with store._using() as shard:
        info = shard.info()

    x_all = np.concatenate([x, new])
    truth_all = [topk(x_all, q) for q in qs]
    lat_after, found_after = timed_searches(store, qs, index)
    r["disk_after_mb"] = du_mb(args.data_dir / "qdrant" / "million")
    store.close()

    s_during = [lat for lat, b in during if b]
    s_idle = [lat for lat, b in during if not b]
    u_build = [lat for lat, b in zip(up_lat, up_building, strict=True) if b]
    np_p50 = pct(lat_np, 50)
    cmd = shlex.join([".venv/bin/python", "benchmarks/bench_million.py", *sys.argv[1:]])
    lines = [
        f"Command: `{cmd}`  ",
        f"Data: {len(base)} real Lite0 embeddings of {DATASET.name}, {'PCA to ' if dim < real.shape[1] else ''}"
        f"{dim}-d, {args.n:,} noisy copies (noise norm {args.noise}); {len(qs)} queries (other noisy copies); "
        f"int8 quantization, HNSW m=16 ef_construct=128 ef=128.  ",
        f"Machine: {os.cpu_count()} cores, shared (1-min load {load0:.2f} at the start, {os.getloadavg()[0]:.2f} "
        f"at the end); run {time.perf_counter() - t_run:.0f} s.",
        "",
        "| N | case | p50 ms | p99 ms | p50 vs numpy exact | recall@10 |",
        "|---:|---|---:|---:|---:|---:|",
        f"| {args.n:,} | numpy exact (x @ q, argpartition) | {np_p50:.1f} | {pct(lat_np, 99):.1f} | 1 | 1 |",
        f"| {args.n:,} | edge before the index (exact scan), 50 queries | {pct(lat_exact, 50):.1f} | "
        f"{pct(lat_exact, 99):.1f} | {pct(lat_exact, 50) / np_p50:.2f} | {recall(found_exact, truth[:50]):.4f} |",
        f"| {args.n:,} | edge HNSW + int8 | {pct(lat_hnsw, 50):.2f} | {pct(lat_hnsw, 99):.2f} | "
        f"{pct(lat_hnsw, 50) / np_p50:.3f} | {recall(found, truth):.4f} |",
        f"| {args.n:,} | edge, label filter (own class, ~{args.n // len(names):,} points) | {pct(lat_filt, 50):.2f} | "
        f"{pct(lat_filt, 99):.2f} | {pct(lat_filt, 50) / np_p50:.3f} | {recall(found_f, truth_f):.4f} |",
        f"| {args.n + args.live:,} | edge after the live writes and their build | {pct(lat_after, 50):.2f} | "
        f"{pct(lat_after, 99):.2f} | {pct(lat_after, 50) / np_p50:.3f} | {recall(found_after, truth_all):.4f} |",
        "",
        "| bulk upsert points/s | index build s (background: copy + child + swap) | build child max RSS MB | "
        "disk MB | process RSS growth MB (store) | reopen s | first query ms | batched q/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.n / r['upsert_s']:,.0f} | {r['build_s']:.0f} | {r['child_maxrss_mb']:,.0f} | {r['disk_mb']:,.0f} | "
        f"{r['rss_store_mb']:,.0f} | {r['reopen_s']:.2f} | {r['first_query_ms']:.1f} | {r['batch_qps']:,.0f} |",
        "",
        f"Live: {args.live:,} points in {len(up_lat):,} upserts of {args.live_batch} (each acknowledged: WAL fsync) in "
        f"{r['live_s']:.0f} s, a search thread beside them (one query every ~5 ms); {builds_seen} background "
        f"build(s) started during the writes; waited {r['wait_s']:.0f} s afterwards for the running one; "
        f"{info.points_count - info.indexed_vectors_count:,} points left unindexed at the end (disk "
        f"{r['disk_after_mb']:,.0f} MB).",
        "",
        "| live phase | n | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        f"| upsert of {args.live_batch}, all | {len(up_lat):,} | {pct(up_lat, 50):.2f} | {pct(up_lat, 99):.2f} | "
        f"{max(up_lat) * 1000:.0f} |",
        f"| upsert of {args.live_batch}, while a build ran | {len(u_build):,} | {pct(u_build, 50):.2f} | "
        f"{pct(u_build, 99):.2f} | {max(u_build, default=float('nan')) * 1000:.0f} |",
        f"| search, while a build ran | {len(s_during):,} | {pct(s_during, 50):.2f} | {pct(s_during, 99):.2f} | "
        f"{max(s_during, default=float('nan')) * 1000:.0f} |",
        f"| search, no build running | {len(s_idle):,} | {pct(s_idle, 50):.2f} | {pct(s_idle, 99):.2f} | "
        f"{max(s_idle, default=float('nan')) * 1000:.0f} |",
        f"| search after (sequential) | {len(lat_after):,} | {pct(lat_after, 50):.2f} | {pct(lat_after, 99):.2f} | "
        f"{max(lat_after) * 1000:.0f} |",
        "",
        f"New points not their own top hit right after their upsert returned: **{missed}** of {args.live:,}.",
        "",
        "Store log: " + "; ".join(f"+{ts - t_run:.0f} s {m}" for ts, m in EVENTS),
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
