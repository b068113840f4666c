"""The real EfficientNet-Lite0 still gives bit-identical vectors and the same preprocessing string as when
``tests/data/lite0_reference.npy`` was recorded (with search/models.py before it became a package).

Collections and embedding caches hold vectors keyed by the preprocessing string: a refactor that changes
either one silently mixes incompatible vectors. Regenerate the reference only for an intended change
(and bump ``PREPROCESSING_VERSION`` then):

    LOOKALIKE_DATA_DIR=$(mktemp -d) .venv/bin/python -m tests.test_model_identity
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REFERENCE = Path(__file__).parent / "data" / "lite0_reference.npy"
PREPROCESSING = "resize224-relu-cgem3-v1"  # what lite0 recorded in every collection so far
# Bits depend on the kernels that ran: onnxruntime, torch (the ONNX export), Pillow (resizing) and the CPU.
RECORDED_ON = {"onnxruntime": "1.32.0", "torch": "2.13.0+cpu", "pillow": "13.0.0", "machine": "x86_64"}


def reference_images() -> list[Image.Image]:
    """Six sample photos (one greyscale) and two generated images in other modes and odd sizes."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)())
              for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")]
    y, x = np.mgrid[0:120, 0:300]
    rgba = np.stack([(x * 255 // 299), (y * 255 // 119), ((x // 10 + y // 10) % 2) * 255,
                     128 + (x % 64) * 2], axis=-1).astype(np.uint8)
    y, x = np.mgrid[0:53, 0:37]
    checker = (((x // 4 + y // 4) % 2) * 200 + (x * y) % 55).astype(np.uint8)
    palette = Image.fromarray(checker).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return [*photos, Image.fromarray(rgba, "RGBA"), palette]


def embed_reference_images() -> tuple[np.ndarray, str]:
    """Vectors and preprocessing string of the images above, through the public loading path."""
    from search.config import get_settings
    from search.models import get_embedder

    embedder = get_embedder("efficientnet-lite0", get_settings())
    return embedder.embed_images(reference_images()), embedder.preprocessing


def runtime() -> dict[str, str]:
    import onnxruntime
    import PIL
    import torch

    return {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "pillow": PIL.__version__,
            "machine": platform.machine()}


@pytest.mark.slow
def test_lite0_vectors_are_bit_identical_to_the_reference() -> None:
    vectors, preprocessing = embed_reference_images()
    assert preprocessing == PREPROCESSING
    reference = np.load(REFERENCE)
    assert vectors.dtype == reference.dtype == np.float32
    assert vectors.shape == reference.shape == (8, 1280)
    # Same code on other kernels may differ in the last bits; then only closeness can be checked.
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=1e-5)
    if runtime() == RECORDED_ON:
        assert np.array_equal(vectors, reference), f"max difference {np.abs(vectors - reference).max():.3g}"


if __name__ == "__main__":
    vectors, preprocessing = embed_reference_images()
    assert preprocessing == PREPROCESSING, preprocessing
    REFERENCE.parent.mkdir(exist_ok=True)
    np.save(REFERENCE, vectors.astype(np.float32))
    print(f"{REFERENCE}: {vectors.shape} {preprocessing} {runtime()}")
