"""The near-duplicate test of ``evaluate --near-duplicates N``: N images of the dataset are altered
(rotation, crop, colour jitter, JPEG q40) and searched for among all of its images; is the original found
at rank 1?
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.lab.embedcache import EmbeddingCache, embed_images
from ingest.lab.metrics import nearest, percent
from search.config import Settings
from search.images import decode_for
from search.reading import read_bytes
from search.schema import sha256_hex

if TYPE_CHECKING:
    from ingest.lab.datasets import Dataset
    from search.models import Embedder

NEAR_COPY_COSINE = 0.95  # two *originals* this similar are frames of one video / re-saved or re-cropped copies
ALTERATIONS = "rotate ±10°, crop 70–90 % area, brightness/contrast/saturation ±20 %, JPEG q40"


def altered_copy(image: Any, rng: np.random.Generator) -> bytes:
    """A deterministic edited copy: rotation ±10°, crop to 70–90 % of the area, colour jitter, JPEG quality 40."""
    from PIL import Image, ImageEnhance

    image = image.convert("RGB")
    angle = float(rng.uniform(-10, 10))
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(128, 128, 128))
    w, h = image.size
    area = float(rng.uniform(0.70, 0.90))
    aspect = float(rng.uniform(0.9, 1.1))
    cw = max(8, min(w, round(w * math.sqrt(area) * aspect)))
    ch = max(8, min(h, round(w * h * area / cw)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.8, 1.2)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=40)
    return buf.getvalue()


def near_duplicate_figures(data: Dataset, embedder: Embedder, cache: EmbeddingCache | None, n: int,
                           seed: int, settings: Settings) -> dict[str, Any]:
    """Rank of each altered copy's original among all images.

    The original counts as found when the hit is the original itself or a copy of the same picture: the same
    bytes, the same vector, or the same pixels up to JPEG noise (mean absolute difference ≤ 2 at the same size).
    ``rank1_unique`` repeats the figure for originals without a near copy in the set (no other image within
    cosine ``NEAR_COPY_COSINE``): where the set holds consecutive video frames or the same photo cropped twice
    (Caltech's Leopards, Faces/Faces_easy), no global descriptor can tell which of them was altered.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data), size=min(n, len(data)), replace=False)
    items = []
    for i in picks:
        original = decode_for(settings, read_bytes(data.uris[i], settings), data.uris[i]).image
        blob = altered_copy(original, np.random.default_rng([seed, int(i)]))
        image = decode_for(settings, blob, f"altered:{data.keys[i]}").image
        items.append((f"altered:{sha256_hex(blob)}", image))
    vectors, computed = embed_images(items, embedder, cache=cache)
    ids, _ = nearest(data.vectors, vectors, 10)
    # the originals' own nearest other image: is there a near copy of it in the set?
    own_ids, own_sims = nearest(data.vectors, data.vectors[picks], 2)
    ranks, unique = [], []
    for row, original, own_row, own_sim in zip(ids, picks.tolist(), own_ids, own_sims, strict=True):
        hit = next((rank for rank, j in enumerate(row, 1) if _same_picture(data, int(j), original, settings)), None)
        ranks.append(hit or 11)
        other, sibling = next(((int(j), float(s)) for j, s in zip(own_row, own_sim, strict=True)
                               if int(j) != original), (-1, 0.0))
        unique.append(sibling < NEAR_COPY_COSINE or _same_picture(data, other, original, settings))
    ranks_arr, unique_arr = np.array(ranks), np.array(unique, dtype=bool)
    return {"copies": len(picks), "rank1": percent((ranks_arr == 1).mean()),
            "top10": percent((ranks_arr <= 10).mean()), "unique_originals": int(unique_arr.sum()),
            "rank1_unique": percent((ranks_arr[unique_arr] == 1).mean()) if unique_arr.any() else None,
            "embedded_now": computed, "alterations": ALTERATIONS}


def _same_picture(data: Dataset, j: int, original: int, settings: Settings) -> bool:
    """Row ``j`` is ``original`` or a copy of it: same row, same bytes, or same pixels up to JPEG noise."""
    if j == original or data.sha256[j] == data.sha256[original]:
        return True
    if float(data.vectors[j] @ data.vectors[original]) < NEAR_COPY_COSINE:
        return False  # cheap reject before decoding
    a, b = _pixels(data, j, settings), _pixels(data, original, settings)
    return a.shape == b.shape and float(np.abs(a - b).mean()) <= 2.0


def _pixels(data: Dataset, i: int, settings: Settings) -> np.ndarray:
    image = decode_for(settings, read_bytes(data.uris[i], settings), data.uris[i]).image
    return np.asarray(image, dtype=np.int16)


__all__ = ["NEAR_COPY_COSINE", "altered_copy", "near_duplicate_figures"]
