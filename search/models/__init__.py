"""Named embedders: images (and, for CLIP, texts) → L2-normalised float32 vectors.

    get_embedder("efficientnet-lite0")             built in: ImageNet EfficientNet-Lite0, 1280-d (default)
    get_embedder("efficientnet-lite2")             built in: Lite2 at 260 px, 1280-d (slower, a little better)
    get_embedder("efficientnet-lite0+clip-ViT-B-32")  two embedders' vectors concatenated, renormalised
    get_embedder("clip-ViT-B-32")                  any sentence-transformers model (hub name or folder)
    get_embedder("/path/to/folder")                a saved SentenceTransformer folder
    get_embedder("my-finetune")                    ``<data_dir>/models/my-finetune``, saved by fine-tuning
                                                   (a full stack, or ``head/`` on a named base such as a+b)

Every model is a real ``SentenceTransformer``: the EfficientNets are ``[EfficientNetLite, Normalize]``
where ``EfficientNetLite`` is a sentence-transformers v6 input module (modality ``image``) that runs the
network through onnxruntime (``LOOKALIKE_BACKEND=onnx``, default: 3-4× faster on CPU, same vectors) or
eager torch. Such a model can be extended (``Dense`` heads, PCA) and ``save()``d; the folder loads back
through ``get_embedder(folder)``, or ``SentenceTransformer(folder, trust_remote_code=True)`` with
``search.models`` importable (our module class lives outside the ``sentence_transformers`` namespace).

The preprocessing string (``Embedder.preprocessing``) is stored in collection metadata and changes
whenever the vectors would: input size, resize, pooling, pixel normalisation, and, for models loaded
from a folder, the folder's contents.

Names are resolved by *model families* (``registry``), asked in order; the first that claims a name loads it:

    folders (10)                a path, or a folder saved under ``<data_dir>/models``
    efficientnet (20)           efficientnet-lite0, efficientnet-lite2
    concat (30)                 a+b
    third-party families (50)   entry points in the group ``lookalike.models`` (default order)
    sentence-transformers (90)  any other name: the Hugging Face hub (local cache first)

Adding a model is one new module that defines a ``ModelFamily`` and one entry point that names it::

    [project.entry-points."lookalike.models"]
    acme = "acme_lookalike.models:FAMILY"

Modules, each importing only those above it (torch and sentence-transformers load inside functions, and
``efficientnet_module`` — the one module that imports torch at its top — only on first use):

    protocol                the Embedder protocol (what the rest of lookalike needs of a model)
    base                    BaseEmbedder, normalise, one_line, folder_digest, quiet_transformers
    registry                ModelFamily, ModelRow, families, get_embedder, clear_embedders      ← base
    efficientnet_options    variants, preprocessing options and their version string
    efficientnet_module     EfficientNetLite (the input module), pooling, ONNX       ← base, efficientnet_options
    efficientnet            build_efficientnet, EfficientNetEmbedder, its family     ← base, registry, options
                                                                                       (efficientnet_module lazily)
    sentence_transformer    folder/hub loading, SentenceTransformerEmbedder, hub family  ← efficientnet, ...
    heads                   INFO_FILE, DenseLayer, HeadEmbedder, load_head           ← base, registry
    combine                 ConcatEmbedder, the a+b family                           ← base, registry
    folders                 the saved-folder family                    ← heads, sentence_transformer, ...
    cli                     ``lookalike models`` (a ``lookalike.commands`` entry point) ← registry, search.cli
    (this package)          the modules' public names, each imported on first
                            access (PEP 562): ``lookalike --help`` imports ``search.models.cli`` and with it
                            this package, which then loads nothing else
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.models.base import BaseEmbedder, folder_digest
    from search.models.combine import ConcatEmbedder
    from search.models.efficientnet import EfficientNetEmbedder, build_efficientnet
    from search.models.efficientnet_options import builtin_models
    from search.models.heads import INFO_FILE, DenseLayer, HeadEmbedder, load_head, read_model_info
    from search.models.protocol import Embedder
    from search.models.registry import (
        ENTRY_POINT_GROUP,
        ModelFamily,
        ModelRow,
        clear_embedders,
        describe_models,
        families,
        family_for,
        get_embedder,
        register_family,
    )
    from search.models.sentence_transformer import SentenceTransformerEmbedder


# name → module that defines it; loaded on first access (PEP 562), so ``import search.models`` stays cheap.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("get_embedder", "clear_embedders", "ENTRY_POINT_GROUP", "ModelFamily", "ModelRow",
                     "describe_models", "families", "family_for", "register_family"), "registry"),
    **dict.fromkeys(("BaseEmbedder", "folder_digest"), "base"),
    **dict.fromkeys(("EfficientNetEmbedder", "build_efficientnet"), "efficientnet"),
    "builtin_models": "efficientnet_options",
    "SentenceTransformerEmbedder": "sentence_transformer",
    **dict.fromkeys(("INFO_FILE", "DenseLayer", "HeadEmbedder", "load_head", "read_model_info"), "heads"),
    "ConcatEmbedder": "combine",
    "Embedder": "protocol",
}
_SUBMODULES = frozenset({"base", "cli", "combine", "efficientnet", "efficientnet_module", "efficientnet_options",
                         "folders", "heads", "protocol", "registry", "sentence_transformer"})


def __getattr__(name: str) -> Any:
    if name == "EfficientNetLite":
        # Saved EfficientNet folders name their module class "search.models.EfficientNetLite" (modules.json);
        # it is defined on first use, as it imports torch.
        return importlib.import_module(f"{__name__}.efficientnet").module_class()
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "EfficientNetLite"})


__all__ = [
    "ENTRY_POINT_GROUP",
    "INFO_FILE",
    "BaseEmbedder",
    "ConcatEmbedder",
    "DenseLayer",
    "EfficientNetEmbedder",
    "Embedder",
    "HeadEmbedder",
    "ModelFamily",
    "ModelRow",
    "SentenceTransformerEmbedder",
    "build_efficientnet",
    "builtin_models",
    "clear_embedders",
    "describe_models",
    "families",
    "family_for",
    "folder_digest",
    "get_embedder",
    "load_head",
    "read_model_info",
    "register_family",
]
