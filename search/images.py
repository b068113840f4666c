"""Safe image decoding: bytes in, an upright, fully loaded RGB ``PIL.Image`` out, or an ``ImageError``.

Rules, in order:

1. Identify the format from the bytes (JPEG, PNG, WebP, GIF, BMP, TIFF only: no plugin that shells out
   or parses exotic containers ever sees untrusted input).
2. Refuse images whose header claims more than ``max_pixels`` before a single pixel is decoded
   (decompression bombs); Pillow's own ``DecompressionBombError`` is reported the same way.
3. Refuse images whose decode would hold more than ``max_decode_bytes`` (``LOOKALIKE_MAX_DECODE_MB``),
   estimated from the header (size, mode, format) before decoding: ``decode_budget``. A few hundred KB
   of TIFF can describe 40 MP of 32-bit floats; the pixel cap alone does not bound memory per mode.
4. Truncated or corrupt data is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set).
5. JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (``draft``), never below the requested size;
   ``width``/``height`` always report the original size.
6. Convert to RGB: transparency composited over white, CMYK converted, 16-bit and float greyscale
   scaled (not clipped) to 8 bits; animated images give their first frame. Conversions run tile by tile
   into the RGB result, so no full-size intermediate (a float64 copy, an RGBA copy) is ever made, and the
   source is freed before the orientation is applied: the peak is about two full images (``decode_budget``).
7. Apply the EXIF orientation, so the image and its size are as a viewer shows them.

``decode`` keeps no shared state and is safe to call from many threads; Pillow releases the GIL while
decoding, so a thread pool decodes in parallel.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from search.config import Settings

__all__ = ["DEFAULT_MAX_DECODE_BYTES", "FORMATS", "Decoded", "ImageError", "decode", "decode_budget", "decode_for"]

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

DEFAULT_MAX_DECODE_BYTES = 512 * 2**20  # LOOKALIKE_MAX_DECODE_MB's default
# Bytes per pixel of Pillow's storage for each mode (RGB is stored as 4 bytes; unknown modes count as 8).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2, "BGR;16": 2,
               "BGR;24": 3}
_MODE_BYTES_DEFAULT = 4  # LA, La, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, I, F
# Bytes per pixel a format's decoder holds besides the image while loading (measured with
# benchmarks/bench_decode_memory.py): libtiff reads a whole strip or tile (a hostile TIFF has one strip of
# the whole image); Pillow's WebP reader goes through libwebp's animation decoder, which keeps two RGBA
# canvases, and hands the frame over as a bytes copy before Pillow copies it into the image (16 B/px in all).
_DECODER_BUFFER = {"TIFF": 4, "WEBP": 12}
_OVERHEAD = 32 * 2**20  # tiles, the Python objects around them, a decoder's row buffers, allocator slack
_TILE_WIDTH = 2048
_TILE_PIXELS = 1 << 18  # 256 K pixels: a tile's temporaries (float64 included) stay a few MB


@dataclass
class Decoded:
    """A decoded image and what the pipeline records about it."""

    image: Image.Image  # RGB, upright (EXIF orientation applied), fully loaded
    width: int  # original pixel size (before any draft reduction), upright orientation
    height: int
    format: str  # Pillow format name, e.g. "JPEG"


def decode_budget(mode: str, format: str | None, width: int, height: int) -> int:
    """The most memory (bytes) ``decode`` holds for a ``width`` × ``height`` image of ``mode``/``format``.

    At its peak a decode holds two full-size images: the source (its mode's bytes per pixel) with a
    decoder buffer (TIFF, WebP) while loading, then the source with the RGB result (4 B/px) while
    converting tile by tile, then the RGB result and its rotated copy (the source is freed first).
    ``tests/test_images.py`` checks the measured peak against this."""
    source = _MODE_BYTES.get(mode, _MODE_BYTES_DEFAULT if mode in Image.MODES else 8)
    per_pixel = max(source + _DECODER_BUFFER.get(format or "", 0), source + 4, 8)
    return width * height * per_pixel + _OVERHEAD


def decode(data: bytes, uri: str, *, max_pixels: int, draft: tuple[int, int] | None = None,
           max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Decoded:
    """Decode ``data`` (the bytes of ``uri``, named in errors) to an upright RGB image.

    ``max_pixels`` bounds width × height as declared by the header, checked before decoding;
    ``max_decode_bytes`` bounds the memory the decode may hold (``decode_budget``), checked then too.
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
        # After the draft: a JPEG decoded at 1/8 scale needs 1/64 of the memory.
        need = decode_budget(img.mode, fmt, *img.size)
        if need > max_decode_bytes:
            raise ImageError(uri, _too_much_memory(img, need, max_decode_bytes))
        img.load()
        orientation = _orientation(img)  # after load: PNG may keep its eXIf chunk after the pixels
        rgb = _to_rgb(img)
        if rgb is img:  # a plain Image sharing the decoded pixels (no copy), detached from the file object
            rgb = img._new(img.im)
        img.close()  # frees the source now, before a rotation makes another full-size copy
        if (method := _TRANSPOSE.get(orientation)) is not None:
            rgb = rgb.transpose(method)
            if orientation >= 5:
                width, height = height, width
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


def decode_for(settings: Settings, data: bytes, uri: str, *, draft: tuple[int, int] | None = None) -> Decoded:
    """``decode`` with the caps of ``settings`` (``LOOKALIKE_MAX_PIXELS``, ``LOOKALIKE_MAX_DECODE_MB``): what
    every caller that has settings should use, so no path decodes under looser limits than ingestion."""
    return decode(data, uri, max_pixels=settings.max_pixels, draft=draft,
                  max_decode_bytes=settings.max_decode_mb * 2**20)


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
        return _tiled(img, _greyscale_to_8bit(img))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        return _tiled(img, _over_white)
    return _tiled(img, lambda tile: tile.convert("RGB"))  # L, 1, P, CMYK (Adobe-inverted handled by the
    # JPEG reader), YCbCr, LAB, HSV


def _tiles(width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    tile_w = min(width, _TILE_WIDTH)
    tile_h = max(1, _TILE_PIXELS // tile_w)
    for y in range(0, height, tile_h):
        for x in range(0, width, tile_w):
            yield x, y, min(width, x + tile_w), min(height, y + tile_h)


def _tiled(img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``convert`` (a tile of ``img`` → an RGB tile) applied tile by tile into one RGB image: the only
    full-size images alive are the source and the result, whatever ``convert`` allocates."""
    width, height = img.size
    if width * height <= _TILE_PIXELS:
        return convert(img)
    out = Image.new("RGB", img.size)
    for box in _tiles(width, height):
        out.paste(convert(img.crop(box)), box[:2])
    return out


def _over_white(tile: Image.Image) -> Image.Image:
    """Composite over white: the model never sees what a transparent pixel's hidden colour happens to be."""
    rgba = tile.convert("LA").convert("RGBA") if tile.mode == "La" else tile.convert("RGBA")
    out = Image.new("RGB", tile.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _greyscale_to_8bit(img: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """A tile converter for a wide greyscale image: 16-bit as v/257, floats in [0, 1] × 255, anything else
    min–max over the whole image. Pillow's own ``convert("L")`` clips these (every value above 255 is white).

    The scale is found first (Pillow's extrema, or a tile-by-tile pass for floats, which must skip NaN and
    infinities); each tile is then scaled in float64, which a tile keeps to a few MB."""
    import numpy as np  # only here: keep importing this module light

    if img.mode == "F":
        lo, hi = _finite_extrema(img)
        unit = lo >= 0.0 and hi <= 1.0
        factor = 255.0 if unit else (255.0 / (hi - lo) if hi > lo else 0.0)

        def convert(tile: Image.Image) -> Image.Image:
            arr = np.asarray(tile, dtype=np.float64)
            arr = np.where(np.isfinite(arr), arr, 0.0)  # NaN / inf carry no brightness we could honour
            scaled = arr * factor if unit else (arr - lo) * factor
            return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")

        return convert
    if img.mode.startswith("I;16"):
        scale, offset = 1 / 257, 0.0  # 65535 -> 255: a 16-bit image keeps its brightness
    else:
        lo_i, hi_i = img.getextrema()  # computed in C, no copy
        if lo_i >= 0 and hi_i <= 0xFFFF:
            scale, offset = 1 / 257, 0.0
        elif hi_i > lo_i:
            scale, offset = 255 / (hi_i - lo_i), -lo_i * 255 / (hi_i - lo_i)
        else:
            scale, offset = 0.0, 0.0

    def convert_int(tile: Image.Image) -> Image.Image:
        wide = tile if tile.mode == "I" else tile.convert("I")  # I;16, I;16B, ... -> 32-bit int, no clipping
        # x * scale + offset, + 0.5 and floor to round (as Pillow's point() did), then clip to 8 bits
        arr = np.floor(np.asarray(wide, dtype=np.float64) * scale + (offset + 0.5))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")

    return convert_int


def _finite_extrema(img: Image.Image) -> tuple[float, float]:
    """(min, max) of the finite values of an ``F`` image, tile by tile; (0, 0) when there are none."""
    import numpy as np

    lo, hi = float("inf"), float("-inf")
    width, height = img.size
    for box in _tiles(width, height):
        arr = np.asarray(img.crop(box), dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _fmt_pixels(n: int) -> str:
    return f"{n / 1e6:.4g} MP" if n >= 1_000_000 else f"{n:,} pixels"


def _too_large(width: int, height: int, limit: int) -> str:
    return (
        f"too large: {width}×{height} = {_fmt_pixels(width * height)} exceeds the "
        f"{_fmt_pixels(limit)} limit (LOOKALIKE_MAX_PIXELS)"
    )


def _too_much_memory(img: Image.Image, need: int, limit: int) -> str:
    return (
        f"too large to decode: {img.size[0]}×{img.size[1]} {img.mode} pixels need about {need / 2**20:.0f} MB, "
        f"over the {limit / 2**20:g} MB limit (LOOKALIKE_MAX_DECODE_MB)"
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
