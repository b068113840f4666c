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
from search.images import Decoded, decode, decode_budget
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


# ------------------------------------------------------------------------------------------- memory


def test_decode_memory_is_bounded_before_decoding(tmp_path: Path) -> None:
    path = f.float_tiff(tmp_path / "f.tif", block=200)  # 800 x 200 floats
    need = decode_budget("F", "TIFF", 800, 200)
    reason = _reason(path, max_decode_bytes=need - 1)
    assert reason.startswith("too large to decode: 800×200 F pixels need about") and reason.endswith(
        "MB limit (LOOKALIKE_MAX_DECODE_MB)")
    assert _decode(path, max_decode_bytes=need).width == 800
    # A JPEG decoded at 1/8 scale needs 1/64 of the memory: the budget is taken after the draft.
    jpeg = f.large_jpeg(tmp_path / "big.jpg", size=(2000, 1500))
    cap = decode_budget("RGB", "JPEG", 500, 375)
    assert "LOOKALIKE_MAX_DECODE_MB" in _reason(jpeg, max_decode_bytes=cap)
    assert _decode(jpeg, max_decode_bytes=cap, draft=(224, 224)).width == 2000


def _wide_reference(arr: np.ndarray) -> np.ndarray:
    """The whole-image conversion the decoder had before it worked in tiles (float64, one piece)."""
    finite = np.isfinite(arr)
    arr = np.where(finite, arr.astype(np.float64), 0.0)
    lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    scaled = arr * 255.0 if lo >= 0.0 and hi <= 1.0 else (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def test_tiled_conversion_equals_the_whole_image_conversion(tmp_path: Path) -> None:
    """Big enough for several tiles in both directions (tiles are 2048 wide, 256 K pixels)."""
    rng = np.random.default_rng(0)
    h, w = 300, 2500
    floats = (rng.normal(0, 3, (h, w))).astype(np.float32)
    floats[5, 7], floats[100, 2400], floats[299, 0] = np.nan, np.inf, -np.inf
    out = _decode(f._save(Image.fromarray(floats, "F"), tmp_path / "f.tif", "TIFF"))
    assert np.array_equal(np.asarray(out.image)[..., 0], _wide_reference(floats))
    ints = rng.integers(-5000, 70000, (h, w), dtype=np.int32)
    out = _decode(f._save(Image.fromarray(ints, "I"), tmp_path / "i.tif", "TIFF"))
    lo, hi = int(ints.min()), int(ints.max())
    expected = np.clip(np.floor(ints * (255 / (hi - lo)) + (-lo * 255 / (hi - lo) + 0.5)), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(out.image)[..., 0], expected)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    out = _decode(f._save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png", "PNG"))
    src = Image.fromarray(rgba, "RGBA")
    whole = Image.new("RGB", src.size, f.WHITE)
    whole.paste(src, mask=src.getchannel("A"))
    assert np.array_equal(np.asarray(out.image), np.asarray(whole))
    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    out = _decode(f._save(Image.fromarray(cmyk, "CMYK"), tmp_path / "k.tif", "TIFF"))
    assert np.array_equal(np.asarray(out.image), np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")))


_PEAK_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from search.images import decode
import numpy  # the float path imports it: not part of the decode's peak

def hwm_kb():  # this process's peak resident memory (VmHWM), reset below to what it holds now
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

data = open(sys.argv[2], "rb").read()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = hwm_kb()
out = decode(data, "x", max_pixels=int(sys.argv[3]))
print((hwm_kb() - before) * 1024, out.width * out.height)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
@pytest.mark.parametrize("case", ["float-tiff", "int32-tiff", "rgba-png", "rgba-webp"])
def test_peak_decode_memory_stays_within_the_budget(tmp_path: Path, case: str) -> None:
    """A small file near the pixel cap, decoded in a fresh process: the peak resident memory it adds stays
    within decode_budget. The 478 KB float TIFF of 40 MP used to peak at 1.4 GB (float64 copies); the
    budget for it is 8 bytes per pixel."""
    import subprocess
    import sys

    side = 2000  # 4 MP near a 4.5 MP cap: the decode, not the interpreter, dominates the peak
    band = np.repeat(np.linspace(0.0, 1.0, 8, dtype=np.float32), side // 8)  # flat bands: a small file
    path = tmp_path / {"float-tiff": "f.tif", "int32-tiff": "i.tif", "rgba-png": "a.png", "rgba-webp": "a.webp"}[case]
    if case == "float-tiff":
        Image.fromarray(np.tile(band, (side, 1)), "F").save(path, compression="tiff_adobe_deflate")
    elif case == "int32-tiff":
        Image.fromarray(np.tile((band * 1e6).astype(np.int32), (side, 1)), "I").save(
            path, compression="tiff_adobe_deflate")
    else:
        Image.new("RGBA", (side, side), (10, 20, 30, 128)).save(path, lossless=True)
    assert path.stat().st_size < 200_000
    with Image.open(path) as img:
        budget = decode_budget(img.mode, img.format, *img.size)
    repo = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, repo, str(path), "4500000"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    peak, pixels = (int(x) for x in proc.stdout.split())
    assert pixels == side * side
    assert peak <= budget, f"peak {peak / 2**20:.0f} MB over the {budget / 2**20:.0f} MB budget"
    if case != "rgba-webp":  # libwebp's canvases make WebP the one format above two images' worth
        assert peak <= pixels * 8 + 16 * 2**20, f"peak {peak / 2**20:.0f} MB for {pixels / 1e6:.0f} MP"
