"""Any sentence-transformers model: loading from a folder or the Hugging Face hub (with failures that are
clear offline), ``SentenceTransformerEmbedder`` (e.g. CLIP, which embeds texts too), and the hub family,
which takes every name no other family claims.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import ModelError
from search.models.base import BaseEmbedder, folder_digest, normalise, one_line, quiet_transformers
from search.models.efficientnet import EfficientNetEmbedder, module_class, onnx_cache
from search.models.efficientnet_options import builtin_models
from search.models.registry import ORDER_HUB, ModelFamily, ModelRow

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from search.models.protocol import Embedder

PREPROCESSING = "st-v1"  # hub models: the name pins the processor; folders add their content digest


class SentenceTransformerEmbedder(BaseEmbedder):
    """Any other sentence-transformers model that embeds images, e.g. CLIP (which embeds texts too)."""

    def __init__(self, name: str, model: SentenceTransformer, settings: Settings, folder: Path | None = None) -> None:
        super().__init__(name, model, settings)
        modalities = list(getattr(model, "modalities", ["text"]))
        if "image" not in modalities:
            raise ModelError(f"model {name!r} does not embed images (modalities: {', '.join(map(str, modalities))}); "
                             "choose an image model, e.g. efficientnet-lite0 or clip-ViT-B-32")
        self.supports_text = "text" in modalities
        self._folder = folder
        self._preprocessing: str | None = None
        dim = model.get_embedding_dimension()
        if not dim:
            from PIL import Image as PILImage

            dim = self.embed_prepared([PILImage.new("RGB", (32, 32))]).shape[1]
        self.dim = int(dim)

    @property  # type: ignore[override]
    def preprocessing(self) -> str:
        # Hub models: the name pins the processor; local folders: their content does (hashed on first use).
        if self._preprocessing is None:
            base = PREPROCESSING
            self._preprocessing = f"{base}+w{folder_digest(self._folder)}" if self._folder is not None else base
        return self._preprocessing

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if not len(items):
            return np.zeros((0, self.dim), dtype=np.float32)
        return super().embed_prepared(items)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not self.supports_text:
            return super().embed_texts(texts)
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        from sentence_transformers.base.modules import Transformer

        # {"text": ...} pins the modality: a query like "photo.jpg" or an URL must not be opened as an image.
        inputs: list[Any] = ([{"text": t} for t in texts] if isinstance(self.model[0], Transformer)
                             else list(texts))
        vectors = self.model.encode(inputs, batch_size=self.settings.batch_size, show_progress_bar=False,
                                    convert_to_numpy=True)
        return normalise(vectors)


def from_model(name: str, model: SentenceTransformer, settings: Settings, folder: Path | None) -> Embedder:
    """The embedder for a loaded SentenceTransformer: EfficientNet stacks keep their fast path."""
    _configure(model, settings)
    if hasattr(model[0], "prepare_image"):
        return EfficientNetEmbedder(name, model, settings, folder)
    return SentenceTransformerEmbedder(name, model, settings, folder)


def _configure(model: SentenceTransformer, settings: Settings) -> None:
    first = model[0]
    if hasattr(first, "configure") and hasattr(first, "onnx_session"):
        first.configure(backend=settings.backend, threads=settings.threads, cache_dir=onnx_cache(settings))
    elif settings.threads > 0:
        import torch

        torch.set_num_threads(settings.threads)


# -- local folders -------------------------------------------------------------------------------------------------


def load_folder(folder: Path, name: str) -> SentenceTransformer:
    """A local folder: a saved SentenceTransformer, or a plain transformers model (CLIP)."""
    from sentence_transformers import SentenceTransformer

    cls = module_class()
    ref = f"{cls.__module__}.{cls.__name__}"
    try:
        with quiet_transformers():
            # Resolve our own module class directly: no trust_remote_code needed for it, and nothing else is trusted.
            loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
            if loader is not None:
                return loader(str(folder), {ref: cls}, device="cpu", local_files_only=True)
            return SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                                       trust_remote_code=_only_known_modules(folder, ref))
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"cannot load model {name!r} from {folder}: {one_line(err)}") from None


def _only_known_modules(folder: Path, ref: str) -> bool:
    try:
        refs = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(r == ref or r.startswith("sentence_transformers.") for r in refs)


# -- the hub -------------------------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 4.0) -> bool:
    """Can we open a TCP connection to the Hugging Face endpoint within ``timeout`` (DNS included)?"""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:  # in a thread: getaddrinfo has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="hf-hub-probe")
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _load_hub(name: str) -> SentenceTransformer:
    """A sentence-transformers model by hub name: the local HF cache first, the hub only if it answers."""
    from sentence_transformers import SentenceTransformer

    with quiet_transformers():
        try:
            return SentenceTransformer(name, device="cpu", local_files_only=True)
        except OSError:
            pass  # not (fully) cached
        except Exception as err:
            raise ModelError(f"cannot load model {name!r}: {one_line(err)}") from None
        if not _hub_reachable():
            raise ModelError(f"cannot load model {name!r}: not in the local Hugging Face cache and the hub is "
                             "unreachable; run once on a connected machine or pass a local folder "
                             "(--model PATH / LOOKALIKE_MODEL)")
        try:
            return SentenceTransformer(name, device="cpu")
        except Exception as err:
            raise ModelError(f"cannot load model {name!r}: {one_line(err)} (names: {', '.join(builtin_models())}, "
                             "a sentence-transformers model such as clip-ViT-B-32, or a folder)") from None


def _load(name: str, settings: Settings) -> Embedder:
    # A path-like name gets here only when no such folder exists (the folder family is asked first).
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name!r} does not exist (--model PATH / LOOKALIKE_MODEL)")
    return from_model(name, _load_hub(name), settings, None)


def _describe(settings: Settings) -> list[ModelRow]:
    return [ModelRow("<hub name>", "sentence-transformers", None, PREPROCESSING,
                     "any sentence-transformers image model on the Hugging Face hub, e.g. clip-ViT-B-32; "
                     "not described offline (its dimension is known once it is downloaded)")]


# Takes every name: it is asked last.
FAMILY = ModelFamily("sentence-transformers", load=_load, describe=_describe, matches=lambda name, settings: True,
                     order=ORDER_HUB)
