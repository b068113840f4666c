"""Saved model folders, by path or by name under ``<data_dir>/models``: a full sentence-transformers stack
(EfficientNet or CLIP, maybe with Dense heads) or a head on a named base. Asked first: a folder that exists
always means that folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import Settings
from search.errors import ModelError
from search.models.base import folder_digest
from search.models.efficientnet_options import VARIANTS, preprocessing_string
from search.models.heads import load_head, read_model_info
from search.models.registry import ORDER_FOLDERS, ModelFamily, ModelRow
from search.models.sentence_transformer import PREPROCESSING, from_model, load_folder

if TYPE_CHECKING:
    from search.models.protocol import Embedder


def saved_models_dir(settings: Settings) -> Path:
    return settings.data_dir / "models"


def _folder(name: str, settings: Settings) -> Path | None:
    """The existing path ``name`` (a file too: load refuses it), else a folder saved under that name."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if "/" not in name and "\\" not in name and name not in ("", ".", ".."):
        saved = saved_models_dir(settings) / name
        if saved.is_dir():
            return saved
    return None


def from_folder(name: str, folder: Path, settings: Settings) -> Embedder:
    info = read_model_info(folder)
    if info is not None and info.get("format") == "head":
        return load_head(folder, name, settings, info)
    return from_model(name, load_folder(folder, name), settings, folder)


def _load(name: str, settings: Settings) -> Embedder:
    folder = _folder(name, settings)
    if folder is None:  # removed since the registry matched it
        raise ModelError(f"model folder {name!r} does not exist (--model PATH / LOOKALIKE_MODEL)")
    if not folder.is_dir():
        raise ModelError(f"model {name!r} is a file; pass a SentenceTransformer folder or a model name")
    return from_folder(name, folder, settings)


# -- describing saved folders without loading them -------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stack_dim(folder: Path) -> int | None:
    """Output width of a saved stack: its last Dense layer, else the EfficientNet's features."""
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return None
    for module in reversed(modules):
        if not isinstance(module, dict):
            return None
        config = _read_json(folder / str(module["path"]) / "config.json") if module.get("path") else None
        if isinstance(config, dict) and isinstance(config.get("out_features"), int):
            return int(config["out_features"])
        if str(module.get("type", "")).endswith(".EfficientNetLite"):
            lite = _read_json(folder / "efficientnet_config.json")
            variant = VARIANTS.get(lite.get("variant", "")) if isinstance(lite, dict) else None
            return variant.dim if variant else None
    return None


def describe_folder(name: str, folder: Path) -> ModelRow:
    """What ``get_embedder(name)`` would record for a saved folder, read from its files (weights are hashed,
    not loaded)."""
    info = read_model_info(folder) or {}
    dim = info.get("dim") if isinstance(info.get("dim"), int) else None
    digest = folder_digest(folder)
    if info.get("format") == "head":
        return ModelRow(name, "folders", dim, None, f"saved head on {info.get('base')!r}: preprocessing is the "
                        f"base's + w{digest}")
    dim = dim or _stack_dim(folder)
    lite = _read_json(folder / "efficientnet_config.json")
    if isinstance(lite, dict):
        try:
            base = preprocessing_string(**{k: lite[k] for k in ("image_size", "resize", "activation", "pooling",
                                                                "normalization", "version")})
        except KeyError:
            return ModelRow(name, "folders", dim, None, "saved EfficientNet with an incomplete config")
        return ModelRow(name, "folders", dim, f"{base}+w{digest}", "saved EfficientNet stack")
    return ModelRow(name, "folders", dim, f"{PREPROCESSING}+w{digest}",
                    "saved sentence-transformers model" + ("" if dim else " (dimension known once loaded)"))


def _describe(settings: Settings) -> list[ModelRow]:
    root = saved_models_dir(settings)
    if not root.is_dir():
        return []
    # Names starting with "." are finetune's half-written folders.
    return [describe_folder(path.name, path) for path in sorted(root.iterdir())
            if path.is_dir() and not path.name.startswith(".")]


FAMILY = ModelFamily("folders", load=_load, describe=_describe,
                     matches=lambda name, settings: _folder(name, settings) is not None, order=ORDER_FOLDERS)
