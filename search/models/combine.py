"""``a+b``: several embedders' vectors side by side (``ConcatEmbedder``), and the family that takes such names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import ModelError
from search.models.base import BaseEmbedder, normalise
from search.models.registry import ORDER_COMBINE, ModelFamily, ModelRow, get_embedder

if TYPE_CHECKING:
    from PIL import Image

    from search.models.protocol import Embedder


class ConcatEmbedder(BaseEmbedder):
    """``a+b``: each part's normalised vector, concatenated and renormalised (each part weighs the same)."""

    def __init__(self, name: str, parts: list[Embedder], settings: Settings) -> None:
        super().__init__(name, None, settings)
        self.parts = parts
        self.dim = sum(p.dim for p in parts)
        self.supports_text = all(p.supports_text for p in parts)
        sizes = [p.draft_size for p in parts if p.draft_size]
        self.draft_size = max(sizes) if sizes and all(p.draft_size for p in parts) else None

    @property  # type: ignore[override]
    def preprocessing(self) -> str:
        return "|".join(p.preprocessing for p in self.parts)

    def prepare(self, image: Image.Image) -> tuple[Any, ...]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return tuple(p.prepare(image) for p in self.parts)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if not len(items):
            return np.zeros((0, self.dim), dtype=np.float32)
        blocks = [p.embed_prepared([item[i] for item in items]) for i, p in enumerate(self.parts)]
        return normalise(np.concatenate(blocks, axis=1))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not self.supports_text:
            return super().embed_texts(texts)
        return normalise(np.concatenate([p.embed_texts(texts) for p in self.parts], axis=1))


def _load(name: str, settings: Settings) -> ConcatEmbedder:
    parts = [part.strip() for part in name.split("+")]
    if len(parts) < 2 or not all(parts):
        raise ModelError(f"model {name!r}: combine models as a+b, e.g. efficientnet-lite0+efficientnet-lite2")
    return ConcatEmbedder(name, [get_embedder(part, settings) for part in parts], settings)


def _describe(settings: Settings) -> list[ModelRow]:
    return [ModelRow("a+b", "concat", None, "a|b", "any models joined with +: the dimensions add up, each part "
                     "weighs the same")]


FAMILY = ModelFamily("concat", load=_load, describe=_describe, matches=lambda name, settings: "+" in name,
                     order=ORDER_COMBINE)
