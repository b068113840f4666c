"""Backfill benchmark: end-to-end images/s against model-only images/s, measured in the same run,
then the re-run (must be a fast no-op).

    .venv/bin/python benchmarks/bench_backfill.py ../shared/data/caltech101-dev [--model efficientnet-lite0]

Model-only = ``embed_prepared`` on already decoded and prepared images (the network alone, same batch
size), median of 3 passes over a sample. End-to-end = ``Pipeline.run`` on the whole folder into a fresh
embedded store (read, hash, decode, embed, tag, upsert, HNSW build if large). Prints a Markdown table and,
with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ingest.pipeline import Pipeline
from ingest.sources import iter_refs
from search.config import get_settings
from search.images import decode
from search.models import get_embedder


def model_only(settings, refs, sample: int, passes: int = 3) -> float:
    embedder = get_embedder(settings.model, settings)
    prepared = []
    for ref in refs[:sample]:
        data = Path(ref.uri).read_bytes()
        prepared.append(embedder.prepare(decode(data, ref.uri, max_pixels=settings.max_pixels).image))
    embedder.embed_prepared(prepared[: settings.batch_size])  # warm-up
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(0, len(prepared), settings.batch_size):
            embedder.embed_prepared(prepared[i : i + settings.batch_size])
        rates.append(len(prepared) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sample", type=int, default=768, help="images for the model-only measurement")
    ap.add_argument("--no-tag", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        cache = Path(tmp) / "data"
        settings = get_settings(data_dir=cache, model=args.model, batch_size=args.batch_size)
        refs = list(iter_refs([args.folder], labels_from_dirs=True))
        rate_model = model_only(settings, refs, args.sample)

        with Pipeline(settings, tagger=not args.no_tag) as p:
            first = p.run(refs, progress=True)
            points = p.store.count()
        with Pipeline(settings, tagger=not args.no_tag) as p:
            second = p.run(refs, progress=False)
            points_after = p.store.count()

    figures = {
        "images": len(refs),
        "model": args.model,
        "model_only_images_per_s": round(rate_model, 1),
        "end_to_end_images_per_s": round(first.images_per_s, 1),
        "ratio_end_to_end_to_model": round(first.images_per_s / rate_model, 3),
        "first_run_s": round(first.seconds, 2),
        "indexed": first.indexed, "duplicates_merged": first.updated, "failed": first.failed,
        "rerun_s": round(second.seconds, 3),
        "rerun_share_of_first": round(second.seconds / first.seconds, 4),
        "rerun_new_points": points_after - points,
        "stage_seconds_total": {k: round(v, 2) for k, v in first.stage_seconds.items()},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print("| figure | value |\n|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
