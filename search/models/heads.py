"""Saved heads: Dense layers trained by ``lookalike finetune`` on a named base embedder (``"format": "head"``
in ``lookalike.json``), used when the base (e.g. ``a+b``) has no single module stack to extend."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.config import Settings
from search.errors import ModelError
from search.models.base import BaseEmbedder, folder_digest, normalise, one_line
from search.models.registry import get_embedder
from search.schema import CollectionMeta

if TYPE_CHECKING:
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from search.models.protocol import Embedder

INFO_FILE = "lookalike.json"  # written next to a model saved by ``lookalike finetune``


@dataclass(frozen=True)
class DenseLayer:
    """One saved ``Dense`` layer with identity activation: ``y = x @ weight.T + bias``."""

    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray  # (out,) float32

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


class HeadEmbedder(BaseEmbedder):
    """``"format": "head"``: a named base embedder (e.g. ``a+b``, which has no single module stack) followed
    by the saved Dense layers and an L2 normalisation. Images are prepared by the base, so decode threads
    still do the CPU part; texts go through the head too when the base embeds them (CLIP)."""

    def __init__(self, name: str, base: Embedder, layers: Sequence[DenseLayer], settings: Settings,
                 digest: str) -> None:
        super().__init__(name, None, settings)
        if not layers:
            raise ModelError(f"model {name!r}: its head holds no Dense layer; save it again with finetune")
        widths = [base.dim] + [layer.out_features for layer in layers]
        if [layer.in_features for layer in layers] != widths[:-1]:
            raise ModelError(f"model {name!r}: head layers {[(lay.in_features, lay.out_features) for lay in layers]} "
                             f"do not fit its base {base.name!r} ({base.dim}-d); save it again with finetune")
        self.base = base
        self.layers = list(layers)
        self.dim = widths[-1]
        # The folder digest (head weights and lookalike.json) on top of the base's own version string.
        self.preprocessing = f"{base.preprocessing}+w{digest}"
        self.supports_text = base.supports_text
        self.draft_size = base.draft_size

    @property
    def model(self) -> SentenceTransformer:
        raise ModelError(f"model {self.name!r} is a head on {self.base.name!r} and has no single "
                         "sentence-transformers stack; fine-tune on its base instead")

    def apply_head(self, vectors: np.ndarray) -> np.ndarray:
        """Base vectors → Dense layers → L2-normalised (what the saved head computes)."""
        out = np.asarray(vectors, dtype=np.float32)
        for layer in self.layers:
            out = out @ layer.weight.T + layer.bias
        return normalise(out)

    def prepare(self, image: Image.Image) -> Any:
        return self.base.prepare(image)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if not len(items):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.apply_head(self.base.embed_prepared(items))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not self.supports_text:
            return super().embed_texts(texts)
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.apply_head(self.base.embed_texts(texts))

    def meta(self) -> CollectionMeta:
        return CollectionMeta(model=self.name, dim=self.dim, preprocessing=self.preprocessing,
                              extra={"kind": "HeadEmbedder", "base": self.base.name})


def read_model_info(folder: Path) -> dict[str, Any] | None:
    """The ``lookalike.json`` of a saved model folder, or None (absent or unreadable)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _read_dense(folder: Path, name: str) -> DenseLayer:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    activation = str(config.get("activation_function", ""))
    if not activation.endswith("Identity"):
        raise ModelError(f"model {name!r}: Dense layer {folder} has activation {activation or 'unknown'!r}, "
                         "only Identity is supported; save it again with finetune")
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "model.safetensors"))
    weight = np.ascontiguousarray(weights["linear.weight"], dtype=np.float32)
    bias = weights.get("linear.bias")
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else np.asarray(bias, dtype=np.float32)
    return DenseLayer(weight=weight, bias=bias)


def _read_head_layers(head: Path, name: str) -> list[DenseLayer]:
    """The Dense layers of a saved sentence-transformers stack of ``Dense``… + ``Normalize`` (as finetune
    writes it); anything else is refused rather than silently computed differently."""
    layers: list[DenseLayer] = []
    try:
        modules = sorted(json.loads((head / "modules.json").read_text(encoding="utf-8")), key=lambda m: m["idx"])
        for position, module in enumerate(modules):
            kind = str(module["type"]).rsplit(".", 1)[-1]
            if kind == "Normalize" and position == len(modules) - 1:
                continue
            if kind != "Dense":
                raise ModelError(f"model {name!r}: {head} holds a {kind} module where only Dense layers and a final "
                                 "Normalize are supported; save it again with finetune")
            layers.append(_read_dense(head / module["path"], name))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"model {name!r}: cannot read its head in {head} ({one_line(err)}); "
                         "save it again with finetune") from None
    return layers


def load_head(folder: Path, name: str, settings: Settings, info: dict[str, Any] | None = None) -> HeadEmbedder:
    """A ``"format": "head"`` folder: its base by name (``get_embedder``), its Dense layers from ``head/``."""
    folder = Path(folder)
    info = info if info is not None else read_model_info(folder)
    base_name = (info or {}).get("base")
    if not isinstance(base_name, str) or not base_name.strip():
        raise ModelError(f"model {name!r} at {folder}: {INFO_FILE} names no base model; save it again with finetune")
    try:
        base = get_embedder(base_name, settings)
    except ModelError as err:
        raise ModelError(f"model {name!r} at {folder} is a head on {base_name!r}, which does not load: {err}") \
            from None
    layers = _read_head_layers(folder / "head", name)
    return HeadEmbedder(name, base, layers, settings, folder_digest(folder))
