"""Property tests of the parsers of untrusted input: nothing escapes but the project's own errors.

* ``workers.events.parse_event``: arbitrary JSON-like values, text and bytes → an ``Event`` or ``InvalidEvent``;
  an accepted event is one the pipeline can store (``ingest.sources.check_ref``) and read safely.
* the manifest readers: arbitrary CSV/JSONL lines (valid UTF-8 or not) written to real files → refs, each
  storable, and one printable report per refused entry; never an exception with ``on_error``.
* ``search.schema.Filter.parse``: arbitrary strings → a ``Filter``, ``None`` or ``ConfigError``.
* ``search.images.decode``: mutated bytes of real small images of every format → a ``Decoded`` or ``ImageError``.

Hypothesis runs derandomized with bounded examples, so the file is fast and deterministic and belongs to the
default test set. ``FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`` runs a longer, randomized campaign;
``scripts/fuzz_atheris.py`` drives the same targets coverage-guided when atheris is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.sources import check_ref, iter_refs
from search.config import Settings
from search.errors import ConfigError, ImageError, LookalikeError, SourceError, printable
from search.images import decode
from search.reading import read_bytes
from search.schema import FILTER_ALIASES, FILTER_FIELDS, Filter
from tests import imagefactory as f
from workers.events import _FIELDS, Event, InvalidEvent, parse_event

_LONG = int(os.environ.get("FUZZ_EXAMPLES", "0"))  # 0: the quick, deterministic default run
FUZZ = settings(max_examples=_LONG or 150, deadline=None, derandomize=not _LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DECODER_FUZZ = settings(FUZZ, max_examples=_LONG or 400)
# Pillow warns about what it skips in a hostile file; the test is about what it raises.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

# Any text, lone surrogates and control characters included (what JSON "\ud800" and a hostile producer give).
ANY_TEXT = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
NASTY = st.sampled_from(["", " ", "\x00", "\ud800", "\udcff", "\n", "\x1b[2J", "%00", "~nobody", "..", "/",
                         "file://", "file:///a%00b", "http://[::1", "https://h:99999/", "\u202e", "a" * 5000])
TEXTS = st.one_of(ANY_TEXT, NASTY, st.builds(lambda a, b: a + b, NASTY, ANY_TEXT))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
                    st.floats(allow_nan=True, allow_infinity=True), TEXTS)
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                        st.dictionaries(TEXTS, inner, max_size=5)), max_leaves=20)
URIS = st.one_of(TEXTS, st.builds(lambda p, t: p + t, st.sampled_from(["/", "file://", "file:///", "http://",
                                                                     "https://", "/srv/"]), TEXTS))
EVENTS = st.fixed_dictionaries(
    {"version": st.one_of(st.just(1), SCALARS), "uri": st.one_of(URIS, JSONISH)},
    optional={"labels": st.one_of(st.lists(TEXTS, max_size=70), JSONISH), "source": st.one_of(TEXTS, JSONISH),
              "event_id": st.one_of(TEXTS, JSONISH), "sent_at": SCALARS,
              "extra": JSONISH})


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory(prefix="lookalike-fuzz-") as tmp:
        yield Path(tmp)


def _accepted_event_is_usable(event: Event, roots: Path) -> None:
    """What parse_event accepts, the pipeline can store and read without an exception of another kind."""
    assert check_ref(event.to_ref()) is None
    assert set(event.to_dict()) <= _FIELDS and math.isfinite(event.sent_at or 0.0)
    with contextlib.suppress(SourceError):
        read_bytes(event.uri, Settings(allowed_roots=(roots,)))  # http(s) is off by default: no network


# ---------------------------------------------------------------------------------------------- events


@FUZZ
@given(raw=st.one_of(JSONISH, EVENTS))
def test_parse_event_on_arbitrary_values(raw: object, scratch: Path) -> None:
    try:
        event = parse_event(raw)
    except InvalidEvent as err:
        assert err.reason == err.reason.strip() and "\n" not in err.reason
        return
    _accepted_event_is_usable(event, scratch)


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda e: json.dumps(e, ensure_ascii=False).encode("utf-8", "surrogatepass"), EVENTS),
    st.builds(lambda e, cut: json.dumps(e)[:cut], EVENTS, st.integers(0, 300)),
    st.sampled_from([_deep(5000), '{"version": 1, "uri": "/a", "sent_at": ' + "9" * 5000 + "}",
                     '{"version": 1, "uri": "/a\\ud800"}', '{"version": 1, "uri": "file:///%00"}']),
    TEXTS,
))
def test_parse_event_on_arbitrary_text_and_bytes(raw: str | bytes, scratch: Path) -> None:
    try:
        event = parse_event(raw)
    except InvalidEvent:
        return
    _accepted_event_is_usable(event, scratch)


# ------------------------------------------------------------------------------------------- manifests


def _collect() -> tuple[list[tuple[str, str]], Callable[[str, str], None]]:
    seen: list[tuple[str, str]] = []
    return seen, lambda location, reason: seen.append((location, reason))


def _read_manifest(path: Path) -> None:
    errors, on_error = _collect()
    refs = list(iter_refs([path], labels_from_dirs=True, on_error=on_error))
    for ref in refs:
        assert check_ref(ref) is None, ref
    for location, reason in errors:
        assert location == printable(location) and reason == printable(reason)
    with contextlib.suppress(SourceError):  # without on_error the first problem is raised, as a SourceError
        list(iter_refs([path]))


LINE_BYTES = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda t: t.encode("utf-8", "surrogatepass"), TEXTS),
    st.builds(lambda e: json.dumps(e, ensure_ascii=False).encode("utf-8", "surrogatepass"), EVENTS),
    st.builds(lambda e: json.dumps(e).encode(), JSONISH),
    st.sampled_from([_deep(3000).encode(), b'{"uri": "a.jpg", "labels": "' + b"|x" * 200 + b'"}',
                     b'{"uri": "a.jpg", "n": ' + b"1" * 5000 + b"}", b"\xff\xfe\x00", b'"quoted\nnewline"']),
)


@FUZZ
@given(lines=st.lists(LINE_BYTES, max_size=8), suffix=st.sampled_from([".jsonl", ".ndjson", ".csv"]),
       header=st.sampled_from([b"uri,labels,source", b"URI", b"\xef\xbb\xbfuri,labels", b"path", b""]))
def test_manifests_of_arbitrary_lines(lines: list[bytes], suffix: str, header: bytes, scratch: Path) -> None:
    path = scratch / f"manifest{suffix}"
    body = b"\n".join(lines) + b"\n"
    path.write_bytes(header + b"\n" + body if suffix == ".csv" else body)
    _read_manifest(path)


@FUZZ
@given(rows=st.lists(st.tuples(URIS, st.lists(TEXTS, max_size=6), st.one_of(st.none(), TEXTS)), max_size=6))
def test_csv_manifests_of_arbitrary_cells(rows: list[tuple[str, list[str], str | None]], scratch: Path) -> None:
    import csv
    import io

    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(["uri", "labels", "source"])
    for uri, labels, source in rows:
        writer.writerow([uri, "|".join(labels), source or ""])
    path = scratch / "cells.csv"
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass"))
    _read_manifest(path)


# --------------------------------------------------------------------------------------------- filters


FILTER_KEYS = st.sampled_from(sorted(set(FILTER_FIELDS) | set(FILTER_ALIASES)))


@FUZZ
@given(exprs=st.lists(st.one_of(TEXTS, st.builds(lambda k, v: f"{k}={v}", FILTER_KEYS, st.one_of(
    TEXTS, st.integers().map(str), st.integers(min_value=2**62, max_value=2**70).map(str),
    st.sampled_from(["9" * 5000, " 12 ", "1_000", "-0", "١٢", "0x10", "1e3"])))), max_size=5))
def test_filter_parse_on_arbitrary_strings(exprs: list[str]) -> None:
    try:
        flt = Filter.parse(exprs)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    for match in flt.must if flt is not None else ():
        for value in match.values:
            if FILTER_FIELDS[match.field] is int:
                assert -(2**63) <= value < 2**63
            else:
                value.encode("utf-8")


# --------------------------------------------------------------------------------------------- decoder


def _seed_images() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = list(f.good_images(folder / "good", size=(12, 9)).values())
        paths += [f.png16(folder / "d.png", block=2), f.float_tiff(folder / "f.tiff", block=2),
                  f.int32_tiff(folder / "i.tiff", block=2), f.cmyk_jpeg(folder / "k.jpg", size=(8, 8)),
                  f.palette_png_transparent(folder / "p.png", size=(8, 4)), f.la_png(folder / "la.png", size=(6, 3)),
                  f.animated(folder / "a.gif", size=(6, 6)), f.animated(folder / "a.webp", size=(6, 6)),
                  f.exif_jpeg(folder / "e.jpg", 6, size=(32, 16)), f.solid(folder / "one.bmp", mode="1", color=1),
                  f.solid(folder / "rgba.tif", mode="RGBA", color=(1, 2, 3, 4))]
        return [p.read_bytes() for p in paths]


SEEDS = _seed_images()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "big"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "big" and len(data) > at + 4:  # a header field turned huge: sizes, counts, offsets
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\xff\xff"]))
    return bytes(data)


@DECODER_FUZZ
@given(data=mutated(), draft=st.sampled_from([None, (4, 4)]))
def test_decoder_on_mutated_images(data: bytes, draft: tuple[int, int] | None) -> None:
    try:
        out = decode(data, "fuzz", max_pixels=1_000_000, draft=draft, max_decode_bytes=64 * 2**20)
    except ImageError as err:
        assert err.reason and "\n" not in err.reason
        return
    assert out.image.mode == "RGB" and out.width > 0 and out.height > 0
    assert out.image.size in ((out.width, out.height), (out.height, out.width)) or draft is not None


def test_the_errors_checked_are_the_projects_own() -> None:
    assert issubclass(InvalidEvent, LookalikeError) and issubclass(SourceError, ImageError)
    assert issubclass(ConfigError, LookalikeError) and issubclass(ImageError, LookalikeError)
