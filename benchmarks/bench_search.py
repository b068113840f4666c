"""Search benchmark for the embedded store: edge exact (before optimize), edge HNSW (after optimize),
and an exact numpy baseline, at N = 5,784 and N = 100,000 1280-d vectors, in one run.

    .venv/bin/python benchmarks/bench_search.py [--sizes 5784,100000] [--queries 500] [--out FILE.md]

Data: ``bench-out/caltech-lite0.npy`` (real EfficientNet-Lite0 embeddings of Caltech101; labels = class
folders from the sibling ``caltech-files.txt``, else 101 k-means clusters) when it exists; else a
synthetic stand-in (see ``synthetic_embeddings``). The 100k set is that base repeated with small Gaussian
noise and renormalised, so it keeps the cluster structure of the base. Queries are other noisy copies of
random base vectors (never stored points). Reported per query: p50/p99 latency of single-vector
``Store.search`` calls (Python + engine), recall@10 against exact numpy top-10. Also: upsert throughput
(batches of 256, as the store acknowledges them: flushed), optimize time, reopen time, a label filter.
Results go to stdout (Markdown) and ``--out``; progress to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from search import store as store_mod  # noqa: E402
from search.config import Settings  # noqa: E402
from search.schema import CollectionMeta, Filter, Match, PointRecord, point_id  # noqa: E402
from search.store import open_store  # noqa: E402

DIM = 1280
K = 10
REAL = REPO / "bench-out" / "caltech-lite0.npy"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_embeddings(rng: np.random.Generator, n: int = 5784, classes: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for pooled CNN features. EfficientNet's global-average-pooled activations are
    non-negative and share a strong common component (every image excites the same generic channels), so
    unrelated images sit at cosine ~0.5 and same-class images higher; classes differ by which channels are
    stronger. We model a feature as ``common * class_gain * sample_gain`` with log-normal gains, and class
    sizes drawn long-tailed like Caltech101 (31..800 images per class)."""
    common = np.abs(rng.standard_normal(DIM)) ** 1.5 + 0.05
    class_gain = np.exp(0.9 * rng.standard_normal((classes, DIM)))
    weights = np.exp(rng.normal(0, 1.2, classes))
    sizes = 31 + rng.multinomial(n - 31 * classes, weights / weights.sum())
    labels = np.repeat(np.arange(classes), sizes)
    sample_gain = np.exp(0.7 * rng.standard_normal((n, DIM)))
    x = common * class_gain[labels] * sample_gain
    perm = rng.permutation(n)
    return normalise(x[perm]), labels[perm]


def kmeans_labels(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 15) -> np.ndarray:
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        assign = np.argmax(x @ centres.T, axis=1)
        for c in range(k):
            members = x[assign == c]
            centres[c] = members.mean(0) if len(members) else x[rng.integers(len(x))]
        centres = normalise(centres)
    return np.argmax(x @ centres.T, axis=1)


def load_base(rng: np.random.Generator, real: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    if real is not None:
        raw_bytes = real.read_bytes()  # one read: the file may be rewritten by whoever produces it
        digest = hashlib.sha256(raw_bytes).hexdigest()[:12]
        x = normalise(np.load(io.BytesIO(raw_bytes)).astype(np.float32))
        name = f"{real.name} (sha256 {digest}…"
        files = real.parent / "caltech-files.txt"  # one relative path per row: <class>/<image>
        rows = files.read_text().split() if files.exists() else []
        if len(rows) == len(x):
            _, labels = np.unique([r.split("/", 1)[0] for r in rows], return_inverse=True)
            return x, labels, f"{name}; real embeddings of Caltech101; labels = class folders)"
        for sib in (real.with_suffix(".labels.npy"), real.with_suffix(".labels.json"), real.with_suffix(".json")):
            if sib.exists():
                raw = np.load(sib, allow_pickle=False) if sib.suffix == ".npy" else json.loads(sib.read_text())
                if isinstance(raw, dict):
                    raw = raw.get("labels", raw)
                _, labels = np.unique(np.asarray(raw), return_inverse=True)
                return x, labels, f"{name}; real embeddings; labels {sib.name})"
        return x, kmeans_labels(x, 101, rng), f"{name}; real embeddings; 101 k-means labels)"
    x, labels = synthetic_embeddings(rng)
    return x, labels, f"synthetic clustered stand-in ({REAL.relative_to(REPO)} absent or --synthetic)"


def noisy_copies(base: np.ndarray, idx: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Copies of ``base[idx]`` with isotropic Gaussian noise of total norm ~``scale`` (cos to source ~1/sqrt(1+s^2))."""
    noise = rng.standard_normal((len(idx), base.shape[1])).astype(np.float32) * (scale / np.sqrt(base.shape[1]))
    return normalise(base[idx] + noise)


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    s = x @ q
    if mask is not None:
        s = np.where(mask, s, -np.inf)
        k = min(k, int(mask.sum()))
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top])]


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) * 1000


def recall(found: list[list[int]], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]))


def timed_search(store, queries: np.ndarray, ids_to_idx: dict[str, int], filters=None, exact=False):
    # warm-up: page in vectors / graph, like a long-running service
    for i in range(min(20, len(queries))):
        store.search(queries[i : i + 1], k=K, filter=None if filters is None else filters[i], exact=exact)
    lat, found = [], []
    for i in range(len(queries)):
        flt = None if filters is None else filters[i]
        t = time.perf_counter()
        (hits,) = store.search(queries[i : i + 1], k=K, filter=flt, exact=exact)
        lat.append(time.perf_counter() - t)
        found.append([ids_to_idx[h.id] for h in hits])
    return lat, found


def run_size(n: int, base: np.ndarray, base_labels: np.ndarray, nq: int, rng: np.random.Generator,
             efs: list[int], rows: list[dict], extra: dict) -> None:
    say(f"N={n}: building vectors")
    if n == len(base):
        x, labels = base, base_labels
    else:
        src = np.arange(n) % len(base)
        x, labels = noisy_copies(base, src, rng, scale=0.35), base_labels[src]
    q_src = rng.integers(0, len(base), nq)
    queries = noisy_copies(base, q_src, rng, scale=0.35)
    q_labels = rng.integers(0, labels.max() + 1, nq)  # filter: a random class (often not the query's own)
    ids = [point_id(f"{i:064x}") for i in range(n)]
    ids_to_idx = {pid: i for i, pid in enumerate(ids)}
    filters = [Filter(must=(Match("labels", (f"c{lab}",)),)) for lab in q_labels]

    # numpy exact baseline (ground truth)
    say(f"N={n}: numpy exact")
    truth, lat_np = [], []
    for i in range(nq):
        t = time.perf_counter()
        truth.append(numpy_topk(x, queries[i], K))
        lat_np.append(time.perf_counter() - t)
    truth_f, lat_np_f = [], []
    for i in range(nq):
        t = time.perf_counter()
        truth_f.append(numpy_topk(x, queries[i], K, labels == q_labels[i]))
        lat_np_f.append(time.perf_counter() - t)
    rows.append(dict(n=n, method="numpy exact (x @ q + argpartition)", lat=lat_np, recall=1.0))
    rows.append(dict(n=n, method="numpy exact, label filter", lat=lat_np_f, recall=1.0))

    with tempfile.TemporaryDirectory(prefix="lookalike-bench-search-") as tmp:
        # No background build: the "before optimize" rows measure the exact scan, then optimize() builds here.
        settings = Settings(data_dir=Path(tmp), hnsw_threshold=10**9)
        store = open_store(settings, "bench")
        store.ensure_collection(CollectionMeta(model="bench", dim=DIM, preprocessing="bench"))
        # the first batches as a worker would write them (each flushed), the rest as a backfill (bulk())
        say(f"N={n}: upsert in batches of 256")
        split = min(40 * 256, (n // 2) // 256 * 256)
        for mode, lo, hi in (("synced", 0, split), ("bulk", split, n)):
            t = time.perf_counter()
            with store.bulk() if mode == "bulk" else _null():
                for b in range(lo, hi, 256):
                    store.upsert([PointRecord(ids[i], x[i], {"labels": [f"c{labels[i]}"], "source": "bench"})
                                  for i in range(b, min(hi, b + 256))])
            extra[f"upsert_{mode}_{n}"] = (hi - lo) / (time.perf_counter() - t)
            say(f"N={n}: {mode} {extra[f'upsert_{mode}_{n}']:.0f} points/s")

        say(f"N={n}: edge exact (no HNSW yet)")
        lat, found = timed_search(store, queries, ids_to_idx)
        rows.append(dict(n=n, method="edge, before optimize (exact scan)", lat=lat, recall=recall(found, truth)))
        lat, found = timed_search(store, queries, ids_to_idx, filters)
        rows.append(dict(n=n, method="edge, before optimize, label filter", lat=lat, recall=recall(found, truth_f)))

        say(f"N={n}: optimize (HNSW m={store_mod.HNSW_M}, ef_construct={store_mod.HNSW_EF_CONSTRUCT})")
        t = time.perf_counter()
        store.optimize(force=True)
        extra[f"optimize_{n}"] = time.perf_counter() - t
        say(f"N={n}: optimize took {extra[f'optimize_{n}']:.1f} s")

        default_ef = store_mod.HNSW_EF
        for ef in efs:
            store_mod.HNSW_EF = ef
            lat, found = timed_search(store, queries, ids_to_idx)
            tag = " (default)" if ef == default_ef else ""
            rows.append(dict(n=n, method=f"edge HNSW, ef={ef}{tag}", lat=lat, recall=recall(found, truth)))
            say(f"N={n}: ef={ef} p50 {pct(lat, 50):.2f} ms recall {rows[-1]['recall']:.4f}")
        store_mod.HNSW_EF = default_ef
        lat, found = timed_search(store, queries, ids_to_idx, exact=True)
        rows.append(dict(n=n, method="edge after optimize, exact=True", lat=lat, recall=recall(found, truth)))

        lat, found = timed_search(store, queries, ids_to_idx, filters)
        rows.append(dict(n=n, method=f"edge HNSW, label filter (store default: exact when <= "
                                     f"{store_mod.EXACT_FILTER_MAX:,} match)", lat=lat, recall=recall(found, truth_f)))
        saved, store_mod.EXACT_FILTER_MAX = store_mod.EXACT_FILTER_MAX, -1
        lat, found = timed_search(store, queries, ids_to_idx, filters)
        store_mod.EXACT_FILTER_MAX = saved
        rows.append(dict(n=n, method="edge HNSW, label filter (filtered HNSW forced)", lat=lat,
                         recall=recall(found, truth_f)))

        # one batched call, as the tagger issues them
        t = time.perf_counter()
        store.search(queries, k=K)
        extra[f"batch_qps_{n}"] = nq / (time.perf_counter() - t)

        # single-point write latency as a worker acknowledges an event (flushed), and in bulk()
        for mode in ("synced", "bulk"):
            lat_w = []
            ctx = store.bulk() if mode == "bulk" else _null()
            with ctx:
                for i in range(30):
                    t = time.perf_counter()
                    store.set_payload(ids[i], {"note": mode})
                    lat_w.append(time.perf_counter() - t)
            extra[f"set_payload_{mode}_{n}"] = pct(lat_w, 50)

        store.close()
        t = time.perf_counter()
        store = open_store(settings, "bench")
        extra[f"reopen_{n}"] = time.perf_counter() - t
        t = time.perf_counter()
        store.search(queries[:1], k=K)
        extra[f"first_query_{n}"] = time.perf_counter() - t
        store.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5784,100000")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--efs", default="64,128,256", help="HNSW search ef values to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", type=Path, default=None, help=f"base embeddings .npy (default {REAL.relative_to(REPO)} "
                    "if it exists, else synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic stand-in even if real data exists")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "search.md")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    if args.base is not None and not args.base.exists():
        sys.exit(f"--base {args.base}: no such file")
    real = None if args.synthetic else (args.base or (REAL if REAL.exists() else None))
    base, base_labels, source = load_base(rng, real)
    sizes = [len(base) if s.strip() == "5784" else int(s) for s in args.sizes.split(",")]
    efs = sorted({int(e) for e in args.efs.split(",")} | {store_mod.HNSW_EF})
    rows: list[dict] = []
    extra: dict = {}
    t0 = time.perf_counter()
    for n in sizes:
        run_size(n, base, base_labels, args.queries, rng, efs, rows, extra)

    lines = [
        f"Command: `{shlex.join(['.venv/bin/python', 'benchmarks/bench_search.py', *sys.argv[1:]])}`  ",
        f"Data: {source}; {len(base)} base vectors, {DIM}-d; {args.queries} queries per case (noisy copies of "
        f"random base vectors); recall@{K} vs exact numpy; latency = one single-vector `Store.search` call.  ",
        f"Machine: {os.cpu_count()} cores shared with other work (1-min load average {load_start:.2f} at the "
        f"start, {os.getloadavg()[0]:.2f} at the end); qdrant-edge-py 0.9.0; HNSW m={store_mod.HNSW_M}, "
        f"ef_construct={store_mod.HNSW_EF_CONSTRUCT}; total run {time.perf_counter() - t0:.0f} s.",
        "",
        "| N | method | p50 ms | p99 ms | recall@10 |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['method']} | {pct(r['lat'], 50):.2f} | {pct(r['lat'], 99):.2f} | "
                     f"{r['recall']:.4f} |")
    lines += ["", "| N | upsert points/s, 256/batch: synced / bulk() | optimize s | reopen s | first query after "
              "reopen ms | batched search q/s | set_payload p50 ms synced / bulk |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        lines.append(f"| {n:,} | {extra[f'upsert_synced_{n}']:,.0f} / {extra[f'upsert_bulk_{n}']:,.0f} | "
                     f"{extra[f'optimize_{n}']:.1f} | "
                     f"{extra[f'reopen_{n}']:.3f} | {extra[f'first_query_{n}'] * 1000:.1f} | "
                     f"{extra[f'batch_qps_{n}']:,.0f} | {extra[f'set_payload_synced_{n}']:.2f} / "
                     f"{extra[f'set_payload_bulk_{n}']:.3f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.exists() else ""
    notes = previous.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in previous else "\n"
    args.out.write_text(f"# Search benchmark\n\n{table}\n\n<!-- notes -->{notes}")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
