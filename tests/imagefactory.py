"""Real image files, good and broken, written where a test asks (usually under ``tmp_path``).

Every function takes the file ``path`` to write (parent folders are created), writes a real file with
Pillow or by hand, and returns the ``Path``. Images are tiny unless said otherwise, so a test can make
hundreds. The format follows the file suffix unless ``format=`` is given, so a broken file can be given
any name (e.g. ``garbage(tmp_path / "x.jpg")``).

Good images
    solid, noise, large_jpeg, good_images (one per supported format), cmyk_jpeg, png16, float_tiff, int32_tiff,
    palette_png_transparent, la_png, rgba_png, animated, exif_jpeg, sparse_png
Broken / hostile files
    truncated, truncated_jpeg, truncated_png, garbage, empty, text_file, png_bomb, gif_bomb,
    write_broken_set (one of each, all with image extensions, so a folder walk picks them up)

Colours used by the transparency and animation generators are the module constants below, so tests can
assert on them without repeating numbers.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BLUE",
    "GREEN",
    "RED",
    "WHITE",
    "animated",
    "cmyk_jpeg",
    "empty",
    "exif_jpeg",
    "float_tiff",
    "garbage",
    "gif_bomb",
    "good_images",
    "int32_tiff",
    "la_png",
    "large_jpeg",
    "noise",
    "palette_png_transparent",
    "png16",
    "png_bomb",
    "rgba_png",
    "solid",
    "sparse_png",
    "text_file",
    "truncated",
    "truncated_jpeg",
    "truncated_png",
    "write_broken_set",
]

RED = (220, 20, 20)
GREEN = (20, 200, 20)
BLUE = (20, 20, 220)
WHITE = (255, 255, 255)

_SUFFIX_FORMAT = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _format_for(path: Path, format: str | None) -> str:
    if format:
        return format.upper()
    try:
        return _SUFFIX_FORMAT[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: cannot tell the image format from the suffix; pass format=") from None


def _save(img: Image.Image, path: str | Path, format: str | None, **save: object) -> Path:
    path = _prepare(path)
    fmt = _format_for(path, format)
    if fmt == "JPEG":
        save.setdefault("quality", 95)
    if fmt == "WEBP":
        save.setdefault("lossless", True)
    img.save(path, fmt, **save)
    return path


# ------------------------------------------------------------------------------------------ good images


def solid(
    path: str | Path,
    *,
    size: tuple[int, int] = (32, 24),
    color: tuple[int, ...] | int = RED,
    mode: str = "RGB",
    format: str | None = None,
    **save: object,
) -> Path:
    """One flat colour. ``mode``/``color`` as for ``Image.new``; extra keywords go to ``Image.save``."""
    return _save(Image.new(mode, size, color), path, format, **save)


def noise(path: str | Path, *, size: tuple[int, int] = (64, 48), seed: int = 0, format: str | None = None) -> Path:
    """Random RGB pixels from ``seed``: different seeds give different bytes and different-looking images."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return _save(Image.fromarray(arr, "RGB"), path, format)


def large_jpeg(path: str | Path, *, size: tuple[int, int] = (2000, 1500), seed: int = 0) -> Path:
    """A big photo-like JPEG (smooth gradients plus mild noise), for draft / speed tests."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    arr += rng.normal(0, 8, size=arr.shape).astype(np.float32)
    return _save(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), path, "JPEG", quality=85)


def good_images(
    folder: str | Path, *, size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = RED
) -> dict[str, Path]:
    """One valid, solid-colour image per supported format in ``folder``; {Pillow format: path}."""
    folder = Path(folder)
    names = {
        "JPEG": "good.jpg",
        "PNG": "good.png",
        "WEBP": "good.webp",
        "GIF": "good.gif",
        "BMP": "good.bmp",
        "TIFF": "good.tiff",
    }
    return {fmt: solid(folder / name, size=size, color=color) for fmt, name in names.items()}


def cmyk_jpeg(
    path: str | Path, *, cmyk: tuple[int, int, int, int] = (0, 255, 255, 0), size: tuple[int, int] = (32, 32)
) -> Path:
    """A CMYK JPEG (Pillow writes the Adobe APP14 marker and inverted CMYK, as Photoshop does).

    The default ``cmyk`` is pure red ink-wise: it should decode to RGB close to (255, 0, 0).
    """
    return _save(Image.new("CMYK", size, cmyk), path, "JPEG")


def png16(path: str | Path, values: Sequence[int] = (0, 16448, 32896, 65535), *, block: int = 8) -> Path:
    """A 16-bit greyscale PNG: one ``block``-wide, ``block``-tall vertical band per value, left to right.

    16448 = 64 × 257 and 32896 = 128 × 257, so a correct 8-bit conversion gives 0, 64, 128, 255.
    """
    row = np.repeat(np.asarray(values, dtype=np.uint16), block)
    arr = np.tile(row, (block, 1))
    return _save(Image.fromarray(arr), path, "PNG")  # uint16 array -> mode I;16 -> 16-bit PNG


def float_tiff(path: str | Path, values: Sequence[float] = (0.0, 0.25, 0.5, 1.0), *, block: int = 8) -> Path:
    """A 32-bit float ("F" mode) greyscale TIFF, one vertical band per value as in ``png16``."""
    row = np.repeat(np.asarray(values, dtype=np.float32), block)
    return _save(Image.fromarray(np.tile(row, (block, 1)), "F"), path, "TIFF")


def int32_tiff(path: str | Path, values: Sequence[int] = (-1000, 0, 1000, 3000), *, block: int = 8) -> Path:
    """A 32-bit signed integer ("I" mode) greyscale TIFF, one vertical band per value as in ``png16``."""
    row = np.repeat(np.asarray(values, dtype=np.int32), block)
    return _save(Image.fromarray(np.tile(row, (block, 1)), "I"), path, "TIFF")


def palette_png_transparent(path: str | Path, *, size: tuple[int, int] = (32, 16)) -> Path:
    """A palette PNG: left half transparent (its hidden colour is GREEN), right half opaque RED."""
    img = Image.new("P", size, 0)
    img.putpalette([*GREEN, *RED] + [0, 0, 0] * 254)
    img.paste(1, (size[0] // 2, 0, size[0], size[1]))
    return _save(img, path, "PNG", transparency=0)


def la_png(path: str | Path, *, size: tuple[int, int] = (30, 10)) -> Path:
    """Grey + alpha, in thirds: left transparent black, middle black at alpha 128, right opaque grey 50."""
    w, h = size
    arr = np.zeros((h, w, 2), dtype=np.uint8)
    arr[:, w // 3 : 2 * w // 3, 1] = 128
    arr[:, 2 * w // 3 :, 0] = 50
    arr[:, 2 * w // 3 :, 1] = 255
    return _save(Image.fromarray(arr, "LA"), path, "PNG")


def rgba_png(path: str | Path, *, size: tuple[int, int] = (30, 10)) -> Path:
    """RGBA in thirds: left transparent BLUE, middle BLUE at alpha 128, right opaque BLUE."""
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[..., :3] = BLUE
    arr[:, w // 3 : 2 * w // 3, 3] = 128
    arr[:, 2 * w // 3 :, 3] = 255
    return _save(Image.fromarray(arr, "RGBA"), path, "PNG")


def animated(
    path: str | Path,
    colors: Sequence[tuple[int, int, int]] = (RED, GREEN, BLUE),
    *,
    size: tuple[int, int] = (24, 24),
    format: str | None = None,
) -> Path:
    """An animation with one flat frame per colour (GIF, WEBP, or APNG for ``.png``)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    return _save(frames[0], path, format, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_jpeg(
    path: str | Path,
    orientation: int,
    *,
    size: tuple[int, int] = (64, 32),
    marker: tuple[int, int, int] = RED,
    background: tuple[int, int, int] = BLUE,
) -> Path:
    """A JPEG stored ``size`` wide/tall with EXIF Orientation ``orientation`` and a 16×16 ``marker`` block
    in the STORED top-left corner.

    Shown upright, the marker lands at: 1 top-left, 3 bottom-right, 6 top-right (size swapped),
    8 bottom-left (size swapped).
    """
    img = Image.new("RGB", size, background)
    img.paste(marker, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, path, "JPEG", exif=exif.tobytes(), subsampling=0)


def sparse_png(path: str | Path, *, size: tuple[int, int] = (2000, 2000)) -> Path:
    """A real, valid, all-black 1-bit PNG whose pixel count is large but whose file is a few KB."""
    return _save(Image.new("1", size, 0), path, "PNG")


# ------------------------------------------------------------------------------------- broken / hostile


def truncated(path: str | Path, *, format: str = "JPEG", keep: float = 0.5, size: tuple[int, int] = (96, 64)) -> Path:
    """A noise image of ``format`` cut after ``keep`` of its bytes (header intact, pixel data missing)."""
    path = _prepare(path)
    full = noise(path, size=size, format=format)
    data = full.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def truncated_jpeg(path: str | Path) -> Path:
    """A JPEG cut in half."""
    return truncated(path, format="JPEG")


def truncated_png(path: str | Path) -> Path:
    """A PNG cut in half, inside its IDAT chunk."""
    return truncated(path, format="PNG")


def garbage(path: str | Path, *, size: int = 4096, seed: int = 0) -> Path:
    """``size`` random bytes (any name you like, e.g. ``photo.jpg``)."""
    path = _prepare(path)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def empty(path: str | Path) -> Path:
    """A zero-byte file."""
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def text_file(path: str | Path, text: str = "This is not a picture.\n") -> Path:
    """A plain text file (name it ``something.png`` to impersonate an image)."""
    path = _prepare(path)
    path.write_text(text, encoding="utf-8")
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(path: str | Path, *, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose (valid, CRC-correct) header claims ``width`` × ``height`` RGB pixels, with almost no data.

    Opening it is cheap; decoding it would allocate width × height × 3 bytes. The default is 400 MP.
    """
    path = _prepare(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    idat = zlib.compress(b"\x00" * 1024)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def gif_bomb(path: str | Path, *, width: int = 65535, height: int = 65535) -> Path:
    """A GIF whose screen and single frame claim ``width`` × ``height`` (default ~4.3 gigapixels) in ~40 bytes."""
    path = _prepare(path)
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes([0, 0, 0, 255, 255, 255])
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    pixels = b"\x02\x02\x44\x01\x00"  # LZW min code size 2, one tiny sub-block, block terminator
    path.write_bytes(screen + frame + pixels + b"\x3b")
    return path


def write_broken_set(folder: str | Path) -> list[Path]:
    """One file of each broken kind in ``folder``, every one named like an image; returns their paths.

    Each fails ``search.images.decode`` under the default settings (40 MP limit): truncated JPEG and PNG,
    random bytes, a zero-byte file, text named ``.png``, and PNG / GIF headers claiming huge sizes.
    """
    folder = Path(folder)
    return [
        truncated_jpeg(folder / "truncated.jpg"),
        truncated_png(folder / "truncated.png"),
        garbage(folder / "garbage.jpg"),
        empty(folder / "empty.jpg"),
        text_file(folder / "text.png"),
        png_bomb(folder / "bomb.png"),
        gif_bomb(folder / "bomb.gif"),
    ]


def photo(path: Path, seed: int, size: tuple[int, int] = (96, 64)) -> Path:
    """A distinct, real JPEG: smooth random colour field, so thumbnails differ per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=92)
    return path


# Three visually distinct classes for the evaluation, fine-tuning and tagging tests.
CLASS_STYLE = {"red_disc": ((220, 30, 30), "ellipse"), "green_box": ((30, 200, 30), "rectangle"),
               "blue_bar": ((30, 30, 220), "bar")}


def make_tree(root, per_class: int = 6, *, seed: int = 0, broken: bool = False):
    """A tiny ImageFolder tree of coloured shapes on noisy backgrounds (distinct bytes per file)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    for cls, (colour, shape) in CLASS_STYLE.items():
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(90, 160, (48, 48, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            x0, y0 = (int(v) for v in rng.integers(2, 14, 2))
            x1, y1 = x0 + int(rng.integers(24, 32)), y0 + int(rng.integers(24, 32))
            if shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.rectangle((x0, y0, x1, y0 + 8), fill=colour)
            img.save(folder / f"{cls}_{i}.{'png' if i % 2 else 'jpg'}")
    if broken:
        (root / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root
