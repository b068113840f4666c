"""Safe image decoding: bytes in, an upright, fully loaded RGB ``PIL.Image`` out, or an ``ImageError``.

Rules, in order:

1. Identify the format from the bytes (JPEG, PNG, WebP, GIF, BMP, TIFF only: no plugin that shells out
   or parses exotic containers ever sees untrusted input).
2. Refuse images whose header claims more than ``max_pixels`` before a single pixel is decoded
   (decompression bombs); Pillow's own ``DecompressionBombError`` is reported the same way.
3. Truncated or corrupt data is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set).
4. JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (``draft``), never below the requested size;
   ``width``/``height`` always report the original size.
5. Convert to RGB: transparency composited over white, CMYK converted, 16-bit and float greyscale
   scaled (not clipped) to 8 bits; animated images give their first frame.
6. Apply the EXIF orientation, so the image and its size are as a viewer shows them.

``decode`` keeps no shared state and is safe to call from many threads; Pillow releases the GIL while
decoding, so a thread pool decodes in parallel.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import (  # importing the plugins registers them, so Image.open never imports all of them
    BmpImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    UnidentifiedImageError,
    WebPImagePlugin,  # noqa: F401
)

from search.errors import ImageError

__all__ = ["FORMATS", "Decoded", "ImageError", "decode"]

# Formats decode() accepts (Pillow names). MPO (multi-picture JPEG from cameras) arrives via the JPEG opener.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_JPEG_FORMATS = ("JPEG", "MPO")
_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Magic numbers of the accepted formats, to tell "corrupt PNG" from "not an image" when Pillow gives up.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_PIL_BOMB = re.compile(r"\((\d+) pixels\)")


@dataclass
class Decoded:
    """A decoded image and what the pipeline records about it."""

    image: Image.Image  # RGB, upright (EXIF orientation applied), fully loaded
    width: int  # original pixel size (before any draft reduction), upright orientation
    height: int
    format: str  # Pillow format name, e.g. "JPEG"


def decode(data: bytes, uri: str, *, max_pixels: int, draft: tuple[int, int] | None = None) -> Decoded:
    """Decode ``data`` (the bytes of ``uri``, named in errors) to an upright RGB image.

    ``max_pixels`` bounds width × height as declared by the header, checked before decoding.
    ``draft=(w, h)`` lets a JPEG decode at a reduced scale that is still at least ``w`` × ``h``
    (upright orientation); other formats ignore it. Raises ``ImageError(uri, reason)``.
    """
    if not data:
        raise ImageError(uri, "empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(uri, _unidentified(data)) from None
    except Image.DecompressionBombError as exc:
        size = _claimed_size(data)
        reason = (
            _too_large(*size, max_pixels) if size and size[0] * size[1] > max_pixels else _pil_bomb(exc, max_pixels)
        )
        raise ImageError(uri, reason) from None
    except Exception as exc:  # a plugin choking on a malformed header
        raise ImageError(uri, _corrupt(exc)) from None

    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(uri, f"truncated or corrupt image: invalid size {width}×{height}")
        if width * height > max_pixels:
            raise ImageError(uri, _too_large(width, height, max_pixels))
        fmt = img.format or "unknown"
        if draft is not None and fmt in _JPEG_FORMATS:
            dw, dh = draft
            if _orientation(img) in (5, 6, 7, 8):  # the draft box is in stored (sideways) orientation
                dw, dh = dh, dw
            img.draft("RGB", (max(1, dw), max(1, dh)))
        img.load()
        orientation = _orientation(img)  # after load: PNG may keep its eXIf chunk after the pixels
        rgb = _to_rgb(img)
        if (method := _TRANSPOSE.get(orientation)) is not None:
            rgb = rgb.transpose(method)
            if orientation >= 5:
                width, height = height, width
        elif rgb is img:
            rgb = img.copy()  # a plain Image, detached from the file object and its bytes
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its screen
        raise ImageError(uri, _pil_bomb(exc, max_pixels)) from None
    except MemoryError:
        raise ImageError(uri, f"out of memory decoding {img.size[0]}×{img.size[1]} pixels") from None
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, ValueError, zlib.error, ...
        raise ImageError(uri, _corrupt(exc)) from None
    finally:
        img.close()  # frees the source (rgb is always a separate image by now)
    return Decoded(rgb, width, height, fmt)


def _orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when absent or unreadable: bad metadata must not lose the image."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # I;16*, I (32-bit int), F (32-bit float)
        return _greyscale_to_8bit(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        # Composite over white: the model never sees what a transparent pixel's hidden colour happens to be.
        rgba = img.convert("LA").convert("RGBA") if mode == "La" else img.convert("RGBA")
        out = Image.new("RGB", img.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted handled by the JPEG reader), YCbCr, LAB, HSV


def _greyscale_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a wide greyscale image to ``L``: 16-bit as v/257, floats in [0, 1] × 255, anything else min–max.

    Pillow's own ``convert("L")`` clips these (every value above 255 becomes white).
    """
    if img.mode == "F":
        import numpy as np  # only here: keep importing this module light

        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)
        arr = np.where(finite, arr, 0.0)  # NaN / inf carry no brightness we could honour
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    wide = img if img.mode == "I" else img.convert("I")  # I;16, I;16B, ... -> 32-bit int, no clipping
    lo, hi = wide.getextrema()
    if img.mode.startswith("I;16") or (lo >= 0 and hi <= 0xFFFF):
        scale, offset = 1 / 257, 0.0  # 65535 -> 255: a 16-bit image keeps its brightness
    elif hi > lo:
        scale, offset = 255 / (hi - lo), -lo * 255 / (hi - lo)
    else:
        scale, offset = 0.0, 0.0
    # point() on an "I" image applies x * scale + offset in C; + 0.5 rounds instead of truncating.
    return wide.point(lambda x: x * scale + (offset + 0.5)).convert("L")


def _fmt_pixels(n: int) -> str:
    return f"{n / 1e6:.4g} MP" if n >= 1_000_000 else f"{n:,} pixels"


def _too_large(width: int, height: int, limit: int) -> str:
    return (
        f"too large: {width}×{height} = {_fmt_pixels(width * height)} exceeds the "
        f"{_fmt_pixels(limit)} limit (LOOKALIKE_MAX_PIXELS)"
    )


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """The size a header claims, read by the format's opener without Pillow's bomb check (headers only).

    Only used to word the error after Pillow refused an image at open time.
    """
    prefix = data[:16]
    for fmt in FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        try:
            if factory is not None and (accept is None or accept(prefix) is True):
                with factory(io.BytesIO(data), "") as img:
                    return img.size
        except Exception:
            continue
    return None


def _pil_bomb(exc: Exception, limit: int) -> str:
    """Pillow refused before we saw the size: its message carries the pixel count, not the dimensions."""
    match = _PIL_BOMB.search(str(exc))
    if match is None:
        return f"too large: {exc} (LOOKALIKE_MAX_PIXELS)"
    pixels = int(match.group(1))
    if pixels > limit:
        return f"too large: {_fmt_pixels(pixels)} exceeds the {_fmt_pixels(limit)} limit (LOOKALIKE_MAX_PIXELS)"
    return (
        f"too large: {_fmt_pixels(pixels)} exceeds Pillow's decompression-bomb limit "
        "(raise PIL.Image.MAX_IMAGE_PIXELS as well as LOOKALIKE_MAX_PIXELS)"
    )


def _unidentified(data: bytes) -> str:
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "truncated or corrupt image: unreadable WEBP header"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return f"truncated or corrupt image: unreadable {name} header"
    return "not an image (unrecognised format)"


def _corrupt(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(detail) > 120:
        detail = detail[:117] + "..."
    return f"truncated or corrupt image: {detail}"
