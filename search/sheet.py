"""Contact sheets: each query and its results with scores, drawn as one PNG (Pillow only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from search.schema import Hit

THUMB = 160
PAD = 8
CAPTION = 30


def _tile(image: Image.Image | None, size: int = THUMB) -> Image.Image:
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    if image is not None:
        thumb = ImageOps.contain(image.convert("RGB"), (size, size))
        tile.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    else:
        ImageDraw.Draw(tile).text((10, size // 2 - 6), "(not readable)", fill=(120, 120, 120))
    return tile


def local_image(uris: Iterable[str], settings: Any) -> Image.Image | None:
    """The first of ``uris`` that is a readable local image (decoded small, for a tile), or None."""
    from search.errors import ImageError
    from search.images import decode_for
    from search.reading import local_path, read_bytes

    for uri in uris:
        if local_path(uri) is None:
            continue
        try:
            return decode_for(settings, read_bytes(uri, settings), uri, draft=(320, 320)).image
        except ImageError:
            continue
    return None


def draw_sheet(queries: Sequence[tuple[str, Image.Image | None]], results: Sequence[Sequence[Hit]],
               load: Callable[[Hit], Image.Image | None], path: Path, *, prefix: str = "query: ") -> Path:
    """One row per query: the query (captioned ``prefix`` + its title) then its hits (captioned with score
    and label/tag)."""
    cols = 1 + max((len(r) for r in results), default=0)
    width = PAD + cols * (THUMB + PAD)
    height = PAD + len(queries) * (THUMB + CAPTION + PAD)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, ((title, qimg), hits) in enumerate(zip(queries, results, strict=True)):
        y = PAD + row * (THUMB + CAPTION + PAD)
        sheet.paste(_tile(qimg), (PAD, y))
        draw.rectangle((PAD - 3, y - 3, PAD + THUMB + 2, y + THUMB + 2), outline=(30, 110, 220), width=3)
        draw.text((PAD, y + THUMB + 3), f"{prefix}{title}"[:26], fill="black", font=font)
        for col, hit in enumerate(hits, start=1):
            x = PAD + col * (THUMB + PAD)
            sheet.paste(_tile(load(hit)), (x, y))
            name = (hit.labels or [t["label"] for t in hit.tags] or [Path(hit.uris[0]).name if hit.uris else hit.id])[0]
            draw.text((x, y + THUMB + 3), f"#{col} {hit.score:.3f}", fill="black", font=font)
            draw.text((x, y + THUMB + 15), str(name)[:26], fill=(80, 80, 80), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
