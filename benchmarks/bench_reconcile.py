"""reconcile at scale: an embedded store of N points (synthetic payloads, real files), 1 % of the files deleted
and 1 % moved, then ``reconcile``; wall time, peak memory, and what it re-embedded (nothing, for moves).

    .venv/bin/python benchmarks/bench_reconcile.py [--points 100000] [--dir /tmp/lookalike-bench-reconcile]

Each file holds a few unique bytes (reconcile hashes files, it never decodes them); each point has the
payload backfill would write for it. Run 1 finds an empty state table (it hashes every file, as the first
run on an existing store does); run 2 repeats the same changes on a fresh copy with the state table warm
(what a nightly reconcile costs). Each run is its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(base: Path, n: int, dim: int = 16) -> None:
    from search.config import get_settings
    from search.schema import CollectionMeta, PointRecord, build_payload, point_id, sha256_hex
    from search.store import open_store

    photos = base / "photos"
    settings = get_settings(data_dir=base / "data", model="synthetic")
    store = open_store(settings)
    store.ensure_collection(CollectionMeta(model="synthetic", dim=dim, preprocessing="synthetic-v1"))
    store.aliases().ensure(settings.alias, store.collection)
    rng = np.random.default_rng(0)
    batch: list[PointRecord] = []
    with store.bulk():
        for i in range(n):
            path = photos / f"d{i // 1000:04d}" / f"img{i:07d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = f"image {i} {rng.integers(1 << 62)}".encode()
            path.write_bytes(data)
            sha = sha256_hex(data)
            payload = build_payload(sha256=sha, uris=[str(path)], source="backfill", width=64, height=48,
                                    format="JPEG", size=len(data), ingested_at="2026-11-30T00:00:00Z",
                                    labels=[f"class{i % 101}"], tags=[], model="synthetic")
            batch.append(PointRecord(point_id(sha), rng.standard_normal(dim).astype(np.float32), payload))
            if len(batch) == 2000:
                store.upsert(batch)
                batch = []
        if batch:
            store.upsert(batch)
    store.close()


def change(base: Path, n: int, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    files = sorted((base / "photos").rglob("*.jpg"))
    picked = rng.sample(files, 2 * (n // 100))
    deleted, moved = picked[: n // 100], picked[n // 100:]
    for p in deleted:
        p.unlink()
    target = base / "photos" / "reorganised"
    target.mkdir(exist_ok=True)
    for p in moved:
        p.rename(target / p.name)
    return {"files_deleted": len(deleted), "files_moved": len(moved)}


def run_once(base: Path) -> None:
    """In this process: reconcile, print JSON with the report, wall time and peak RSS."""
    from ingest.reconcile import reconcile
    from search.config import get_settings
    from search.store import open_store, resolve

    settings = resolve(get_settings(data_dir=base / "data"))
    embedded: list[int] = []
    store = open_store(settings)
    t0 = time.perf_counter()
    report = reconcile(store, [base / "photos"], settings, ingest=lambda paths: embedded.append(len(paths)) or {})
    wall = time.perf_counter() - t0
    points = store.count()
    store.close()
    print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "re_embedded": sum(embedded), "points_after": points, **report.to_dict()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lookalike-bench-reconcile"))
    ap.add_argument("--once", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.once:
        run_once(args.once)
        return
    results = []
    for label in ("cold state table", "warm state table"):
        work = args.dir / "work"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        build(work, args.points)
        print(f"built {args.points} points and files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if label.startswith("warm"):  # a reconcile of the unchanged tree fills the state table first
            subprocess.run([sys.executable, __file__, "--once", str(work)], capture_output=True, check=True, env=env)
        changes = change(work, args.points)
        out = subprocess.run([sys.executable, __file__, "--once", str(work)], capture_output=True, text=True,
                             check=True, env=env)
        results.append({"run": label, **json.loads(out.stdout.strip().splitlines()[-1]), **changes})
    print("| run | points | files deleted / moved | wall | peak RSS | hashed | gone | moved | new | re-embedded | "
          "points after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['points']} | {r['files_deleted']} / {r['files_moved']} | {r['wall_s']:.1f} s | "
              f"{r['peak_rss_mb']:.0f} MB | {r['hashed']} | {r['gone']} | {r['moved']} | {r['new']} | "
              f"{r['re_embedded']} | {r['points_after']} |")


if __name__ == "__main__":
    main()
