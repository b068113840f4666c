"""The built-in EfficientNet-Lite models: ``build_efficientnet``, ``EfficientNetEmbedder`` and their family.

Torch loads only when a model is built (the module class lives in ``efficientnet_module``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings, get_settings
from search.models.base import BaseEmbedder, folder_digest, quiet_transformers
from search.models.efficientnet_options import VARIANTS, preprocessing_string
from search.models.registry import ORDER_BUILTIN, ModelFamily, ModelRow

if TYPE_CHECKING:
    from PIL import Image
    from sentence_transformers import SentenceTransformer


def module_class() -> type:
    """``EfficientNetLite``, the sentence-transformers input module (imports torch on first use)."""
    from search.models.efficientnet_module import EfficientNetLite

    return EfficientNetLite


def onnx_cache(settings: Settings) -> Path:
    return settings.data_dir / "cache" / "onnx"


def build_efficientnet(variant: str, backend: str = "onnx", settings: Settings | None = None,
                       **options: Any) -> SentenceTransformer:
    """``SentenceTransformer([EfficientNetLite(variant), Normalize()])`` with the installed ImageNet weights.

    ``options`` override the preprocessing (``resize``, ``activation``, ``pooling``, ``normalization``,
    ``image_size``; ``pretrained=False`` for random weights);
    the defaults are the measured best.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    settings = settings or get_settings()
    module = module_class()(variant, **options)
    module.configure(backend=backend, threads=settings.threads, cache_dir=onnx_cache(settings))
    with quiet_transformers():
        return SentenceTransformer(modules=[module, Normalize()], device="cpu")


_torch_worker: Any = None
_torch_worker_lock = threading.Lock()


def _single_torch_thread() -> Any:
    """A one-thread executor whose torch ops run single-threaded (shared by the ONNX embedders)."""
    global _torch_worker
    with _torch_worker_lock:
        if _torch_worker is None:
            from concurrent.futures import ThreadPoolExecutor

            import torch

            def one_thread() -> None:
                torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo the next line
                torch.set_num_threads(1)

            before = torch.get_num_threads()
            worker = ThreadPoolExecutor(1, thread_name_prefix="lookalike-embed", initializer=one_thread)
            worker.submit(int).result()  # start the thread now, so its initializer has run
            # The setter also changed the default of threads started later; give them the old one back.
            torch.set_num_threads(before)
            _torch_worker = worker
        return _torch_worker


class EfficientNetEmbedder(BaseEmbedder):
    """A SentenceTransformer whose input module is ``EfficientNetLite`` (built in, or saved with heads)."""

    def __init__(self, name: str, model: SentenceTransformer, settings: Settings, folder: Path | None = None) -> None:
        super().__init__(name, model, settings)
        self._module = model[0]
        self.dim = int(model.get_embedding_dimension() or self._module.get_embedding_dimension())
        base = self._module.preprocessing
        self.preprocessing = f"{base}+w{folder_digest(folder)}" if folder is not None else base
        size = self._module.image_size
        self.draft_size = (2 * size, 2 * size)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self._module.prepare_image(image)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if self._module.backend != "onnx":
            return super().embed_prepared(items)
        # With onnxruntime doing the heavy part, torch only normalises (and applies any heads). On a busy
        # CPU a multi-threaded torch op waits a scheduler slice (~16 ms measured) for its second thread, so
        # these run in one thread whose torch thread count is 1 (the setting is per thread).
        return _single_torch_thread().submit(super().embed_prepared, items).result()


# -- the family ------------------------------------------------------------------------------------------------


def _load(name: str, settings: Settings) -> EfficientNetEmbedder:
    # build_efficientnet configures the module from the settings (backend, threads, ONNX cache).
    return EfficientNetEmbedder(name, build_efficientnet(name, settings.backend, settings), settings)


def _describe(settings: Settings) -> list[ModelRow]:
    return [ModelRow(name, "efficientnet", variant.dim, preprocessing_string(variant.image_size),
                     f"built in, ImageNet weights from {variant.package.replace('_', '-')}")
            for name, variant in VARIANTS.items()]


FAMILY = ModelFamily("efficientnet", load=_load, describe=_describe, matches=lambda name, settings: name in VARIANTS,
                     order=ORDER_BUILTIN)
