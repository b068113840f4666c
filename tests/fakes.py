"""Test doubles shared by the test modules (no test module imports another one).

``TinyEmbedder`` satisfies the ``search.models.Embedder`` protocol without a network: an image becomes its
normalised 8×8 RGB thumbnail (192-d; folded to ``dim`` by a fixed projection when another width is asked
for), and texts embed only when a ``texts`` table is given (standing in for CLIP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from search.errors import ModelError
from search.schema import CollectionMeta

THUMB = 8  # thumbnail side: 8 × 8 × 3 = 192 values


class TinyEmbedder:
    """A deterministic stand-in for a model (see the module docstring). ``calls`` counts embedding batches."""

    draft_size: tuple[int, int] | None = None

    def __init__(self, name: str = "tiny", *, dim: int = THUMB * THUMB * 3, preprocessing: str = "thumb8-v1",
                 texts: Mapping[str, Sequence[float]] | None = None) -> None:
        self.name, self.dim, self.preprocessing = name, dim, preprocessing
        self.texts = dict(texts) if texts is not None else None
        self.supports_text = texts is not None
        self.calls = 0
        full = THUMB * THUMB * 3
        self._fold = None if dim == full else np.random.default_rng(dim).standard_normal((full, dim)).astype(np.float32)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((THUMB, THUMB)), dtype=np.float32).ravel()

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        self.calls += 1
        if not len(items):
            return np.zeros((0, self.dim), dtype=np.float32)
        x = np.stack(items) - 127.5
        if self._fold is not None:
            x = x @ self._fold
        return _unit(x)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prepared([self.prepare(i) for i in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.texts is None:
            raise ModelError(f"model {self.name!r} embeds images only")
        return _unit(np.array([self.texts[t] for t in texts], dtype=np.float32).reshape(len(texts), self.dim))

    def meta(self) -> CollectionMeta:
        return CollectionMeta(model=self.name, dim=self.dim, preprocessing=self.preprocessing)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)).astype(np.float32)
