"""The ``Embedder`` protocol: what the rest of lookalike needs of a model (fakes in tests follow it too)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from search.schema import CollectionMeta


@runtime_checkable
class Embedder(Protocol):
    """What the rest of lookalike needs of a model; every family's ``load`` returns one.

    ``BaseEmbedder`` implements it for anything built on a SentenceTransformer; a third-party embedder may
    implement it from scratch.
    """

    name: str  # the name it was loaded by (collections record it)
    dim: int  # length of every vector
    preprocessing: str  # version of everything between decoded image and vector: changes whenever vectors would
    supports_text: bool  # embed_texts works (CLIP); otherwise it raises ModelError with a hint
    draft_size: tuple[int, int] | None  # a JPEG decoder may downscale (DCT) to at least this size; None: don't

    def prepare(self, image: Image.Image) -> Any:
        """The CPU part for one decoded image (thread-safe: decode threads run it)."""

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """Prepared items → (N, dim) float32, L2-normalised rows; (0, dim) for no items."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``embed_prepared`` of ``prepare`` of each image."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → vectors in the image space (only when ``supports_text``)."""

    def meta(self) -> CollectionMeta:
        """What a collection built with this model records (name, dim, preprocessing, kind)."""
