"""Model change without downtime, measured: Lite0 → Lite2 on a real collection while queries keep coming.

    .venv/bin/python benchmarks/bench_migrate.py ../shared/data/caltech101-dev [--data DIR]

1. Backfill the folder with efficientnet-lite0 (labels from folders) into an embedded store under --data
   (skipped when it is already there).
2. In this process: a search loop (by-id queries through a ``Searcher`` that follows the alias, as ``serve``
   does) runs on one thread while ``migrate(--to efficientnet-lite2, --gate)`` runs on the main thread.
3. Report: migration time and points/s, the gate's kNN top-1 on the labelled points (old vs new), queries
   served during the migration, failed queries (must be 0), the longest query, and whether the loop ended
   on the new collection. Then ``rollback`` and check the alias is back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/tmp/lookalike-bench-migrate"))
    ap.add_argument("--to", default="efficientnet-lite2")
    args = ap.parse_args()

    from ingest import migrate as mig
    from search.config import get_settings
    from search.query import Searcher
    from search.store import open_aliases

    env = {**os.environ, "LOOKALIKE_DATA_DIR": str(args.data)}
    subprocess.run([str(REPO / ".venv/bin/lookalike"), "backfill", str(args.folder), "--labels-from-dirs"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    settings = get_settings(data_dir=args.data)
    aliases = open_aliases(settings)
    state = aliases.get(settings.alias)
    if state is not None and state.target != "lookalike_efficientnet_lite0":  # a previous run switched it
        mig.rollback(settings)
    if state is not None and state.migration is not None:
        mig.abandon(settings)
    # A previous run's new collection would make this one a resume: time the whole build.
    shutil.rmtree(args.data / "qdrant" / f"lookalike_{args.to.replace('-', '_')}", ignore_errors=True)

    latencies: list[float] = []
    collections: list[str] = []
    errors: list[str] = []
    stop = threading.Event()
    with Searcher(settings) as searcher:
        ids = [p.id for _, p in zip(range(200), searcher.store.scroll(), strict=False)]

        def loop() -> None:
            i = 0
            while not stop.is_set():
                try:
                    searcher.follow_alias()
                    t0 = time.perf_counter()
                    hits = searcher.by_ids([ids[i % len(ids)]], k=10)[0]
                    latencies.append(time.perf_counter() - t0)
                    if len(hits) != 10:
                        errors.append(f"{len(hits)} hits")
                    collections.append(searcher.store.collection)
                except Exception as err:  # counted: the figure is "failed queries"
                    errors.append(f"{type(err).__name__}: {err}")
                i += 1
                time.sleep(0.01)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        out = mig.migrate(settings, args.to, use_gate=True)
        gated = out
        if not out.switched:  # the gate kept the old model: switch anyway (a resume: nothing is re-embedded),
            out = mig.migrate(settings, args.to)  # to measure the switch under the query loop
        time.sleep(3)  # the loop moves to the new collection between two queries
        stop.set()
        thread.join(30)
    result = {"first_run": gated.to_dict(), "switch_run": out.to_dict(),
              "points_per_s": (gated.copied + gated.skipped) / gated.seconds,
              "queries": len(latencies), "failed_queries": len(errors), "errors": errors[:5],
              "query_p50_ms": statistics.median(latencies) * 1000, "query_max_ms": max(latencies) * 1000,
              "first_collection": collections[0], "last_collection": collections[-1]}
    print(json.dumps(result, indent=2), flush=True)
    print(json.dumps({"after_rollback": mig.rollback(settings).target}))


if __name__ == "__main__":
    main()
