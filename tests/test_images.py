"""search.images.decode on real files written by tests/imagefactory.py: good ones decode to upright RGB with
the right colours, broken and hostile ones fail with a short reason and no large allocation."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from search.errors import ImageError
from search.images import Decoded, decode
from tests import imagefactory as f

DEFAULT_MAX = 40_000_000  # Settings.max_pixels


def _decode(path: Path, **kw: object) -> Decoded:
    kw.setdefault("max_pixels", DEFAULT_MAX)
    return decode(path.read_bytes(), str(path), **kw)  # type: ignore[arg-type]


def _reason(path: Path, **kw: object) -> str:
    with pytest.raises(ImageError) as err:
        _decode(path, **kw)
    assert err.value.uri == str(path)
    assert str(err.value) == f"{path}: {err.value.reason}"
    return err.value.reason


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


# ------------------------------------------------------------------------------------------- good files


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_supported_format_decodes_to_rgb(tmp_path: Path, fmt: str) -> None:
    path = f.good_images(tmp_path, size=(40, 30), color=f.RED)[fmt]
    out = _decode(path)
    assert out.format == fmt
    assert (out.width, out.height) == (40, 30) == out.image.size
    assert out.image.mode == "RGB"
    assert _close(out.image.getpixel((20, 15)), f.RED)
    assert type(out.image) is Image.Image  # detached from the file object: no lazy loading left


def test_cmyk_jpeg_adobe_inverted_becomes_rgb(tmp_path: Path) -> None:
    path = f.cmyk_jpeg(tmp_path / "cmyk.jpg", cmyk=(0, 255, 255, 0))
    assert b"Adobe" in path.read_bytes()  # the APP14 marker: stored inverted, as Photoshop writes it
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = _decode(path)
    assert out.image.mode == "RGB"
    assert _close(out.image.getpixel((16, 16)), (255, 0, 0))
    grey = _decode(f.cmyk_jpeg(tmp_path / "k.jpg", cmyk=(0, 0, 0, 128)))
    assert _close(grey.image.getpixel((16, 16)), (127, 127, 127))


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = f.png16(tmp_path / "deep.png", values=(0, 16448, 32896, 65535), block=8)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = _decode(path)
    # v / 257: 0, 64, 128, 255 — clipping would have made the last three all 255
    assert [out.image.getpixel((x, 4)) for x in (4, 12, 20, 28)] == [(v, v, v) for v in (0, 64, 128, 255)]


def test_float_greyscale_is_scaled(tmp_path: Path) -> None:
    unit = _decode(f.float_tiff(tmp_path / "unit.tiff", values=(0.0, 0.25, 0.5, 1.0)))
    assert [unit.image.getpixel((x, 4))[0] for x in (4, 12, 20, 28)] == [0, 64, 128, 255]
    wide = _decode(f.float_tiff(tmp_path / "wide.tiff", values=(-1.0, 0.0, 1.0, 3.0)))  # min–max to 0..255
    assert [wide.image.getpixel((x, 4))[0] for x in (4, 12, 20, 28)] == [0, 64, 128, 255]


def test_32_bit_integer_greyscale_outside_16_bits_is_min_max_scaled(tmp_path: Path) -> None:
    out = _decode(f.int32_tiff(tmp_path / "i32.tiff", values=(-1000, 0, 1000, 3000)))
    assert [out.image.getpixel((x, 4))[0] for x in (4, 12, 20, 28)] == [0, 64, 128, 255]


def test_palette_transparency_is_composited_over_white(tmp_path: Path) -> None:
    out = _decode(f.palette_png_transparent(tmp_path / "pal.png", size=(32, 16)))
    assert out.image.getpixel((4, 8)) == f.WHITE  # the hidden GREEN must not show through
    assert out.image.getpixel((28, 8)) == f.RED


def test_la_is_composited_over_white(tmp_path: Path) -> None:
    out = _decode(f.la_png(tmp_path / "la.png", size=(30, 10)))
    left, middle, right = (out.image.getpixel((x, 5)) for x in (5, 15, 25))
    assert left == f.WHITE
    assert _close(middle, (127, 127, 127), tol=1)  # black at alpha 128 over white
    assert right == (50, 50, 50)


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    out = _decode(f.rgba_png(tmp_path / "rgba.png", size=(30, 10)))
    left, middle, right = (out.image.getpixel((x, 5)) for x in (5, 15, 25))
    assert left == f.WHITE
    assert _close(middle, (137, 137, 237), tol=1)  # BLUE at alpha 128 over white
    assert right == f.BLUE


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp", "anim.png"])
def test_animation_gives_its_first_frame(tmp_path: Path, name: str) -> None:
    path = f.animated(tmp_path / name, colors=(f.RED, f.GREEN, f.BLUE))
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    out = _decode(path)
    assert _close(out.image.getpixel((12, 12)), f.RED)


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [
        (1, "top-left"),
        (3, "bottom-right"),
        (6, "top-right"),
        (8, "bottom-left"),
    ],
)
def test_exif_orientation_makes_the_image_upright(tmp_path: Path, orientation: int, corner: str) -> None:
    path = f.exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation, size=(64, 32))
    out = _decode(path)
    w, h = (32, 64) if orientation in (6, 8) else (64, 32)
    assert out.image.size == (w, h) and (out.width, out.height) == (w, h)
    corners = {"top-left": (4, 4), "top-right": (w - 5, 4), "bottom-left": (4, h - 5), "bottom-right": (w - 5, h - 5)}
    for name, xy in corners.items():
        expected = f.RED if name == corner else f.BLUE
        assert _close(out.image.getpixel(xy), expected, tol=12), (name, out.image.getpixel(xy))


def test_draft_decodes_a_big_jpeg_smaller_but_reports_the_original_size(tmp_path: Path) -> None:
    path = f.large_jpeg(tmp_path / "big.jpg", size=(2000, 1500))
    full = _decode(path)
    small = _decode(path, draft=(224, 224))
    assert full.image.size == (2000, 1500)
    assert (small.width, small.height) == (2000, 1500)
    assert small.image.size == (500, 375)  # 1/4 scale: 1/8 would give 188 rows, under the 224 asked for
    # same picture: the reduced decode matches a downscaled full decode
    reference = np.asarray(full.image.resize(small.image.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(small.image, dtype=np.int16) - reference).mean() < 6


def test_draft_box_follows_the_upright_orientation(tmp_path: Path) -> None:
    path = f.exif_jpeg(tmp_path / "side.jpg", 6, size=(1600, 800))  # upright: 800 wide, 1600 tall
    out = _decode(path, draft=(100, 400))
    assert (out.width, out.height) == (800, 1600)
    assert out.image.size == (200, 400)  # 1/4 scale, still >= 100×400 upright
    assert _close(out.image.getpixel((198, 1)), f.RED, tol=20)  # the marker, upright at the top right


def test_draft_is_ignored_for_other_formats(tmp_path: Path) -> None:
    out = _decode(f.noise(tmp_path / "n.png", size=(640, 480)), draft=(64, 64))
    assert out.image.size == (640, 480)


# ------------------------------------------------------------------------------------- broken / hostile


def test_truncated_jpeg_is_an_error(tmp_path: Path) -> None:
    assert _reason(f.truncated_jpeg(tmp_path / "cut.jpg")).startswith("truncated or corrupt image: ")


def test_truncated_png_is_an_error(tmp_path: Path) -> None:
    assert _reason(f.truncated_png(tmp_path / "cut.png")).startswith("truncated or corrupt image: ")


def test_a_jpeg_cut_inside_its_header_is_called_corrupt_not_unknown(tmp_path: Path) -> None:
    path = tmp_path / "head.jpg"
    path.write_bytes(f.noise(tmp_path / "n.jpg").read_bytes()[:20])
    assert _reason(path) == "truncated or corrupt image: unreadable JPEG header"


def test_garbage_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    assert _reason(f.garbage(tmp_path / "photo.jpg")) == "not an image (unrecognised format)"


def test_text_named_png_is_not_an_image(tmp_path: Path) -> None:
    assert _reason(f.text_file(tmp_path / "notes.png")) == "not an image (unrecognised format)"


def test_empty_file(tmp_path: Path) -> None:
    assert _reason(f.empty(tmp_path / "zero.jpg")) == "empty file"


def test_formats_outside_the_list_are_refused(tmp_path: Path) -> None:
    ppm = tmp_path / "x.ppm"
    Image.new("RGB", (8, 8)).save(ppm, "PPM")  # Pillow can read it, but decode only accepts the listed formats
    assert _reason(ppm) == "not an image (unrecognised format)"


def test_bomb_beyond_the_default_limit_is_refused_from_the_header(tmp_path: Path) -> None:
    path = f.png_bomb(tmp_path / "bomb.png", width=8000, height=8000)  # 64 MP, under Pillow's own warning
    started = time.perf_counter()
    reason = _reason(path)
    assert reason == "too large: 8000×8000 = 64 MP exceeds the 40 MP limit (LOOKALIKE_MAX_PIXELS)"
    assert time.perf_counter() - started < 0.5  # refused from the header, nothing decoded


def test_bomb_that_pillow_refuses_first_still_names_its_size(tmp_path: Path) -> None:
    # 400 MP is over 2 × Image.MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError while opening
    reason = _reason(f.png_bomb(tmp_path / "huge.png", width=20000, height=20000))
    assert reason == "too large: 20000×20000 = 400 MP exceeds the 40 MP limit (LOOKALIKE_MAX_PIXELS)"
    gif = _reason(f.gif_bomb(tmp_path / "huge.gif"))
    assert gif.startswith("too large: 65535×65535 = ") and gif.endswith("(LOOKALIKE_MAX_PIXELS)")


def test_small_max_pixels_refuses_a_real_image(tmp_path: Path) -> None:
    path = f.sparse_png(tmp_path / "sparse.png", size=(2000, 2000))
    assert path.stat().st_size < 10_000  # tiny file, 4 MP of pixels
    assert _reason(path, max_pixels=1_000_000) == (
        "too large: 2000×2000 = 4 MP exceeds the 1 MP limit (LOOKALIKE_MAX_PIXELS)"
    )
    assert _decode(path, max_pixels=4_000_000).image.size == (2000, 2000)  # exactly at the limit: allowed
    noisy = f.noise(tmp_path / "n.jpg", size=(96, 64))
    assert _reason(noisy, max_pixels=5000).startswith("too large: 96×64 = 6,144 pixels exceeds the 5,000 pixels")


def test_pillow_globals_are_left_alone(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    _reason(f.truncated_jpeg(tmp_path / "cut.jpg"))
    _decode(f.noise(tmp_path / "ok.jpg"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert before == Image.MAX_IMAGE_PIXELS


def test_broken_set_all_fail_under_default_settings(tmp_path: Path) -> None:
    broken = f.write_broken_set(tmp_path / "bad")
    assert len({p.name for p in broken}) == len(broken)
    for path in broken:
        _reason(path)


# ------------------------------------------------------------------------------------------- threading


def test_decode_is_thread_safe(tmp_path: Path) -> None:
    paths = [f.noise(tmp_path / f"n{i}.jpg", size=(160, 120), seed=i) for i in range(24)]
    paths += [f.exif_jpeg(tmp_path / "e6.jpg", 6), f.rgba_png(tmp_path / "a.png"), f.png16(tmp_path / "d.png")]
    paths += [f.truncated_jpeg(tmp_path / "cut.jpg"), f.garbage(tmp_path / "g.jpg")]
    datas = [p.read_bytes() for p in paths]

    def run(data: bytes) -> bytes | str:
        try:
            return decode(data, "x", max_pixels=DEFAULT_MAX, draft=(64, 64)).image.tobytes()
        except ImageError as err:
            return err.reason

    serial = [run(d) for d in datas]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            assert list(pool.map(run, datas * 4)) == serial * 4
