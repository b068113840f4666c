"""What every model family shares: the embedder base class and a few small helpers. Imports nothing heavy."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.errors import ModelError
from search.schema import CollectionMeta

if TYPE_CHECKING:
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from search.config import Settings


def normalise(vectors: Any) -> np.ndarray:
    """Rows scaled to unit length, as float32 (a single vector becomes one row)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


def one_line(err: BaseException) -> str:
    """The first line of an error's message (library errors can span pages; ours are one line)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def folder_digest(folder: Path) -> str:
    """Short content hash of a model folder (everything but the model card), so a retrained model
    saved under the same name is not mixed into a collection built with the old one."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "README.md" or "/." in f"/{rel}":
            continue
        digest.update(rel.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info chatter while loading (results go to stdout)."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        yield
        return
    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            tlog.enable_progress_bar()
        tlog.set_verbosity(level)


class BaseEmbedder:
    """A named model that turns images (and, for CLIP, texts) into L2-normalised float32 vectors.

    ``prepare`` is the CPU part for one image (thread-safe, run it in decode threads); ``embed_prepared``
    runs the network on a batch of prepared items through ``SentenceTransformer.encode``. Subclasses set
    ``dim`` and ``preprocessing``; combinations pass ``model=None``.
    """

    name: str
    dim: int
    preprocessing: str
    supports_text: bool = False
    draft_size: tuple[int, int] | None = None  # a JPEG decoder may downscale (DCT) to at least this size

    def __init__(self, name: str, model: SentenceTransformer | None, settings: Settings) -> None:
        self.name = name
        self._model = model
        self.settings = settings

    @property
    def model(self) -> SentenceTransformer:
        """The underlying SentenceTransformer (shared: ``copy.deepcopy`` it before changing it)."""
        if self._model is None:
            raise ModelError(f"model {self.name!r} combines several models; fine-tune or save its parts instead")
        return self._model

    def prepare(self, image: Image.Image) -> Any:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if not len(items):
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(items), batch_size=self.settings.batch_size, show_progress_bar=False,
                                    convert_to_numpy=True)
        return normalise(vectors)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prepared([self.prepare(image) for image in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise ModelError(f"model {self.name!r} embeds images only; text search needs a CLIP model, "
                         "e.g. --model clip-ViT-B-32")

    def meta(self) -> CollectionMeta:
        return CollectionMeta(model=self.name, dim=self.dim, preprocessing=self.preprocessing,
                              extra={"kind": type(self).__name__})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, preprocessing={self.preprocessing!r})"
