"""Backfill benchmark: end-to-end images/s against model-only images/s, measured in the same run,
then the re-run (must be a fast no-op).

    .venv/bin/python benchmarks/bench_backfill.py ../shared/data/caltech101-dev [--model efficientnet-lite0]

Model-only = ``embed_prepared`` on already decoded and prepared images (the network alone, same batch
size), median of 3 passes over a sample. End-to-end = ``Pipeline.run`` on the whole folder into a fresh
embedded store (read, hash, decode, embed, tag, upsert, HNSW build if large). Prints a Markdown table and,
with --json, the raw figures.

``--breakdown`` also runs the pipeline over the same images with the network replaced by a null one (the
real decode and resize, random unit vectors): the process CPU time per image that is *not* the network,
with numpy's BLAS at its default threads and at one (``search.models.registry.single_threaded_blas``), and
the network's own CPU time per image. On 2 cores both compete for the same CPU, so the ratio cannot exceed
network / (network + the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

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


class NullNetwork:
    """The real embedder's preparation, a free network: what the rest of the pipeline costs."""

    def __init__(self, real) -> None:
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def embed_prepared(self, items):
        v = np.random.default_rng(len(items)).normal(size=(len(items), self.real.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_images(self, images):
        return self.embed_prepared([self.real.prepare(i) for i in images])


def breakdown(settings, refs, tag: bool) -> dict:
    """CPU ms per image outside the network (BLAS default vs one thread), and the network's own."""
    from threadpoolctl import threadpool_info, threadpool_limits

    real = get_embedder(settings.model, settings)  # loading it limits BLAS to one thread
    default_threads = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)
    out = {}
    for label, threads in (("blas_default", os.cpu_count() or 1), ("blas_one_thread", 1)):
        limiter = threadpool_limits(limits=threads, user_api="blas")
        with tempfile.TemporaryDirectory(prefix="lookalike-null-") as tmp:
            null_settings = settings.replace(data_dir=Path(tmp))
            with Pipeline(null_settings, embedder=NullNetwork(real), tagger=tag) as p:
                _ = p.embedder
                c0 = time.process_time()
                stats = p.run(refs)
                cpu = time.process_time() - c0
        limiter.restore_original_limits()
        out[label] = {"cpu_ms_per_image": round(1000 * cpu / len(refs), 3),
                      "stage_wall_ms_per_image": {k: round(1000 * v / len(refs), 3)
                                                  for k, v in stats.stage_seconds.items()}}
    threadpool_limits(limits=default_threads, user_api="blas")
    prepared = [real.prepare(decode(Path(r.uri).read_bytes(), r.uri, max_pixels=settings.max_pixels).image)
                for r in refs[:512]]
    c0 = time.process_time()
    for i in range(0, len(prepared), settings.batch_size):
        real.embed_prepared(prepared[i:i + settings.batch_size])
    out["network_cpu_ms_per_image"] = round(1000 * (time.process_time() - c0) / len(prepared), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sample", type=int, default=768, help="images for the model-only measurement")
    ap.add_argument("--no-tag", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also: CPU per image outside the network")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        cache = Path(tmp) / "data"
        settings = get_settings(data_dir=cache, model=args.model, batch_size=args.batch_size)
        refs = list(iter_refs([args.folder], labels_from_dirs=True))
        rate_model = model_only(settings, refs, args.sample)

        with Pipeline(settings, tagger=not args.no_tag) as p:
            first = p.run(refs, progress=True, total=len(refs))
            points = p.store.count()
        with Pipeline(settings, tagger=not args.no_tag) as p:
            second = p.run(refs, progress=False)
            points_after = p.store.count()
        split = breakdown(settings, refs, tag=not args.no_tag) if args.breakdown else None

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
    if split is not None:
        figures["breakdown"] = split
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print("| figure | value |\n|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
