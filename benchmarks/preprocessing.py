"""Which EfficientNet-Lite preprocessing retrieves best? Caltech101, the book's protocol.

For every image: the share of its 4 nearest *other* images (cosine) that have its class, averaged over
all images, in %. The book's ResNet-50 gets 88.46 % on this set.

    .venv/bin/python benchmarks/preprocessing.py                      # all variants, table to stdout + md
    .venv/bin/python benchmarks/preprocessing.py --variants lite0-resize-gem3

Embeddings are cached as .npy under --out (one file per model + preprocessing string), so re-runs only
score. The default Lite0 embeddings are also written as caltech-lite0.npy with caltech-files.txt
(relative paths, same order): base vectors for the search benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.config import get_settings  # noqa: E402
from search.models import EfficientNetEmbedder, build_efficientnet  # noqa: E402

# name -> (variant, options for EfficientNetLite). The first Lite0 entry without options is the default.
VARIANTS: dict[str, tuple[str, dict]] = {
    "lite0-crop-avg": ("efficientnet-lite0", {"resize": "crop", "activation": "relu6", "pooling": "avg"}),
    "lite0-resize-avg": ("efficientnet-lite0", {"activation": "relu6", "pooling": "avg"}),
    "lite0-resize-gem3": ("efficientnet-lite0", {"activation": "relu6", "pooling": "gem3"}),
    "lite0-resize-gem3-imagenet": ("efficientnet-lite0",
                                   {"activation": "relu6", "pooling": "gem3", "normalization": "imagenet"}),
    "lite0-resize-relu-gem3": ("efficientnet-lite0", {"pooling": "gem3"}),
    "lite0-default": ("efficientnet-lite0", {}),
    "lite2-default": ("efficientnet-lite2", {}),
}
BOOK_RESNET50 = 88.46
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def image_folder(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """torchvision ImageFolder order: sorted class folders, sorted files. → (relative paths, labels, classes)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f"{cls}/{path.name}")
                labels.append(label)
    return files, np.asarray(labels), classes


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = 4) -> float:
    """Mean share (%) of each item's k nearest other items (cosine) with the same label."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    return float((labels[nearest] == labels[:, None]).mean() * 100)


def embed_all(embedder: EfficientNetEmbedder, root: Path, files: list[str],
              batch: int = 32) -> tuple[np.ndarray, float]:
    """Decode + prepare in two threads (one batch ahead) while the previous batch is embedded."""
    from PIL import Image

    def prepare(rel: str) -> np.ndarray:
        with Image.open(root / rel) as img:
            return embedder.prepare(img.convert("RGB"))

    out = np.empty((len(files), embedder.dim), dtype=np.float32)
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        chunks = [files[i:i + batch] for i in range(0, len(files), batch)]
        pending = pool.map(lambda chunk: list(map(prepare, chunk)), chunks)
        for n, prepared in enumerate(pending):
            out[n * batch:n * batch + len(prepared)] = embedder.embed_prepared(prepared)
            if n % 20 == 0:
                print(f"  {min((n + 1) * batch, len(files))}/{len(files)}", file=sys.stderr, end="\r")
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/caltech101-dev"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "preprocessing.md")
    args = parser.parse_args()

    files, labels, classes = image_folder(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = get_settings(data_dir=args.out / "lookalike-data")
    rows = []
    for name in args.variants:
        variant, options = VARIANTS[name]
        model = build_efficientnet(variant, "onnx", settings, **options)
        embedder = EfficientNetEmbedder(variant, model, settings)
        cache = args.out / f"caltech-{variant}-{embedder.preprocessing}.npy"
        seconds = None  # only when embedded in this run
        if cache.exists():
            vectors = np.load(cache)
        else:
            print(f"{name}: embedding {len(files)} images …", file=sys.stderr)
            vectors, seconds = embed_all(embedder, args.data, files)
            np.save(cache, vectors)
        score = precision_at_k(vectors, labels)
        rows.append((name, embedder.preprocessing, score, seconds))
        print(f"{name:28s} {embedder.preprocessing:26s} {score:6.2f} %", file=sys.stderr)
        if variant == "efficientnet-lite0" and not options:
            np.save(args.out / "caltech-lite0.npy", vectors)
            (args.out / "caltech-files.txt").write_text("\n".join(files) + "\n")

    # Speed is benchmarks/bench_embed.py's job: timings here depend on what else shares the CPU.
    header = "| variant | preprocessing | P@4 (%) | Δ vs ResNet-50 |\n|---|---|---|---|\n"
    lines = [f"| {n} | `{p}` | {s:.2f} | {s - BOOK_RESNET50:+.2f} |" for n, p, s, _ in rows]
    table = header + "\n".join(lines) + "\n"
    print(table)
    command = "LOOKALIKE_BACKEND=onnx .venv/bin/python benchmarks/preprocessing.py"
    if args.variants != list(VARIANTS):
        command += " --variants " + " ".join(args.variants)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    notes = ""  # a hand-written "## Notes" section survives re-runs
    if args.markdown.exists() and "\n## Notes" in (old := args.markdown.read_text()):
        notes = "\n## Notes" + old.split("\n## Notes", 1)[1]
    args.markdown.write_text(
        "# EfficientNet-Lite preprocessing on Caltech101\n\n"
        f"Data: `{args.data}` ({len(files)} images, {len(classes)} classes, ImageFolder order). Metric: for every "
        "image, the share of its 4 nearest *other* images (cosine) with the same class, averaged, in %. "
        f"The book's ResNet-50: {BOOK_RESNET50} %.\n\n"
        f"Command: `{command}` (embeddings cached under `bench-out/`, onnxruntime, {os.cpu_count()} CPUs).\n\n"
        + table + notes
    )


if __name__ == "__main__":
    main()
