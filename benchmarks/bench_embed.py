"""Model-only embedding speed: onnxruntime vs eager torch, EfficientNet-Lite0 and Lite2.

Images are decoded and prepared (resized, normalised) before timing; what is timed is
``Embedder.embed_prepared`` on batches of 32, i.e. ``SentenceTransformer.encode`` end to end, next to the
bare network call on the same batch ("raw"), so the encode overhead is visible. Median of --runs.

    .venv/bin/python benchmarks/bench_embed.py [--images DIR] [--runs 5] [--batches 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.config import get_settings  # noqa: E402
from search.models import EfficientNetEmbedder, build_efficientnet  # noqa: E402

BATCH = 32


def load_images(folder: Path, count: int) -> list:
    from PIL import Image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no images under {folder} (--images DIR)")
    step = max(1, len(paths) // count)  # spread over classes
    images = []
    for path in paths[::step][:count]:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


def timed(fn, runs: int, images: int) -> float:
    """Median images/s over ``runs`` calls of ``fn`` (after one warm-up call)."""
    fn()
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=Path("/work/shared/data/caltech101-dev"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3, help="batches of 32 per run")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0 = all cores)")
    parser.add_argument("--models", nargs="*", default=["efficientnet-lite0", "efficientnet-lite2"])
    args = parser.parse_args()

    import torch

    settings = get_settings(data_dir=ROOT / "bench-out" / "lookalike-data", threads=args.threads)
    images = load_images(args.images, BATCH * args.batches)
    n = len(images)
    rows = []
    for variant in args.models:
        model = build_efficientnet(variant, "onnx", settings)
        embedder = EfficientNetEmbedder(variant, model, settings)
        module = model[0]
        prepared = [embedder.prepare(img) for img in images]
        batches = [prepared[i:i + BATCH] for i in range(0, n, BATCH)]
        stacked = [np.stack(b) for b in batches]
        vectors = {}
        for backend in ("onnx", "torch"):
            module.configure(backend=backend, threads=args.threads)
            if backend == "torch" and args.threads == 0:
                torch.set_num_threads(os.cpu_count() or 1)

            def encode(batches=batches, embedder=embedder) -> None:
                for b in batches:
                    embedder.embed_prepared(b)

            if backend == "onnx":
                session = module.onnx_session()

                def raw(session=session, stacked=stacked) -> None:
                    for x in stacked:
                        session.run(None, {"pixel_values": x})
            else:
                def raw(module=module, stacked=stacked) -> None:
                    with torch.inference_mode():
                        for x in stacked:
                            module.pooled(torch.from_numpy(x))

            rate = timed(encode, args.runs, n)
            raw_rate = timed(raw, args.runs, n)
            vectors[backend] = embedder.embed_prepared(prepared)
            rows.append([variant, backend, rate, raw_rate, 100 * (raw_rate / rate - 1)])
            print(f"{variant} {backend}: {rate:.1f} images/s (raw {raw_rate:.1f})", file=sys.stderr)
        module.configure(backend="onnx")
        diff = float(np.abs(vectors["onnx"] - vectors["torch"]).max())
        torch_rate = rows[-1][2]
        rows[-2] += [rows[-2][2] / torch_rate, diff]
        rows[-1] += [1.0, diff]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nbatch {BATCH}, {n} pre-decoded images, median of {args.runs} runs, "
          f"threads={args.threads or os.cpu_count()}, load average {load:.1f}\n")
    print("| model | backend | images/s (encode) | images/s (raw network) | encode overhead | ×torch "
          "| max |Δ| onnx-torch |")
    print("|---|---|---|---|---|---|---|")
    for variant, backend, rate, raw_rate, overhead, ratio, diff in rows:
        print(f"| {variant} | {backend} | {rate:.1f} | {raw_rate:.1f} | {overhead:+.1f} % | {ratio:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
