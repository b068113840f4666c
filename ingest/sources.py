"""Where images come from: folders, manifests and single files become ``ImageRef``s.

``iter_refs`` turns command-line paths into references, reporting bad entries through ``on_error`` and
going on. Reading the bytes of one reference is ``search.reading.read_bytes`` (shared with the query path),
where the safety rules live.

Every entry is judged on its own: a manifest row or a folder entry that cannot become a storable
``ImageRef`` is reported (location and reason, both made ``printable``) and the rest go on. A row is held
to the event contract's bounds (``workers.events``: at most 64 labels of at most 256 characters, a uri of
at most 4096), and every string must be storable text: no NUL, no lone surrogate (a file name whose bytes
are not UTF-8 cannot go into a JSON payload). Special files (FIFOs, sockets, devices) named like images are
reported, never opened.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from search.errors import SourceError, printable
from search.reading import to_path, uri_scheme

__all__ = ["IMAGE_EXTENSIONS", "ImageRef", "SourceError", "iter_refs"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".csv", ".jsonl", ".ndjson"})
OnError = Callable[[str, str], None]

# The event contract's bounds (workers.events), so a manifest row can carry no more than an event can.
MAX_URI_CHARS = 4096
MAX_LABELS = 64
MAX_TEXT_CHARS = 256  # one label or source
MAX_LINE_CHARS = 1 << 20  # one JSONL line; a longer one is reported without being held in memory


@dataclass(frozen=True)
class ImageRef:
    """One image to ingest: where it is, the labels the user gave it, and which source it came from."""

    uri: str  # absolute local path (str) or http(s) URL
    labels: tuple[str, ...] = ()
    source: str | None = None


# ---------------------------------------------------------------------------------------------- refs


def iter_refs(
    paths: Iterable[str | Path],
    *,
    labels_from_dirs: bool = False,
    source: str | None = None,
    on_error: OnError | None = None,
) -> Iterator[ImageRef]:
    """Yield an ``ImageRef`` for every image named by ``paths``, in a deterministic order.

    Each path is one of:

    * a folder: walked recursively, files with an image extension (any case) yielded in sorted path order;
      names starting with ``.`` are skipped, symlinked folders followed once (loops are safe);
    * a manifest, ``.csv`` with a header naming a ``uri`` column (optional ``labels``, ``|``-separated, and
      ``source``) or ``.jsonl`` lines ``{"uri": ..., "labels": [...], "source": ...}``; relative uris are
      resolved against the manifest's folder, http(s) URLs are passed through;
    * an http(s) URL or any other file: yielded as a single image (decoding decides whether it is one).

    ``labels_from_dirs`` adds the image's parent folder name as a label (ImageFolder layout: root/class/img).
    A missing path or bad manifest row calls ``on_error(location, reason)`` (location like
    ``"/data/m.csv:17"``) and iteration goes on; without ``on_error`` a ``SourceError`` is raised instead.
    """

    def report(location: str, reason: str) -> None:
        if on_error is None:
            raise SourceError(location, reason)
        on_error(printable(location), printable(reason))  # both end up in logs, terminals and TSV reports

    for raw in paths:
        text = os.fspath(raw)
        scheme = uri_scheme(text)
        if scheme in ("http", "https"):
            yield ImageRef(text, (), source)
            continue
        if scheme is not None and scheme != "file":
            report(text, f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)")
            continue
        try:
            path = to_path(text)
            st = _stat(path)
        except ValueError as exc:
            report(text, str(exc))
            continue
        except OSError as exc:  # a name too long, a permission denied on a parent, ...
            report(text, f"cannot stat: {exc.strerror or exc}")
            continue
        if st is not None and stat.S_ISDIR(st.st_mode):
            for file in _walk(path, report):
                yield from _checked(_ref(file, (), source, labels_from_dirs), str(file), report)
        elif st is not None and stat.S_ISREG(st.st_mode):
            if path.suffix.lower() in MANIFEST_EXTENSIONS:
                yield from _read_manifest(path, source, labels_from_dirs, report)
            else:
                yield from _checked(_ref(path, (), source, labels_from_dirs), str(path), report)
        elif st is not None:
            report(str(path), f"not a regular file or folder ({_kind(st.st_mode)})")
        elif path.is_symlink():
            report(str(path), "broken symbolic link")
        else:
            report(str(path), "no such file or directory")


def _stat(path: Path) -> os.stat_result | None:
    """``path``'s stat (symlinks followed), None when nothing is there; other ``OSError``s propagate."""
    try:
        return path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # ELOOP: a link loop reads as broken
            return None
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _checked(ref: ImageRef, location: str, report: OnError) -> Iterator[ImageRef]:
    """``ref`` if every string in it can be stored, else a report."""
    reason = check_ref(ref)
    if reason is None:
        yield ref
    else:
        report(location, reason)


def check_ref(ref: ImageRef) -> str | None:
    """Why ``ref`` cannot be stored as it is (a payload is JSON: no lone surrogates; no NUL; the event
    contract's bounds), or None. The pipeline asks too, for refs that did not come through ``iter_refs``."""
    if (reason := _text_problem(ref.uri, "uri", MAX_URI_CHARS)) is not None:
        return reason
    if len(ref.labels) > MAX_LABELS:
        return f"more than {MAX_LABELS} labels ({len(ref.labels)})"
    for label in ref.labels:
        if (reason := _text_problem(label, "label", MAX_TEXT_CHARS)) is not None:
            return reason
    if ref.source is not None:
        return _text_problem(ref.source, "source", MAX_TEXT_CHARS)
    return None


def _text_problem(value: str, what: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"{what} is longer than {limit} characters"
    if "\x00" in value:
        return f"{what} contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} is not UTF-8 text (undecodable bytes or a lone surrogate); it cannot be stored"
    return None


def _ref(path: Path, labels: Iterable[str], source: str | None, labels_from_dirs: bool) -> ImageRef:
    label_list = list(labels)
    if labels_from_dirs and path.parent.name:
        label_list.append(path.parent.name)
    return ImageRef(str(path), _clean_labels(label_list), source)


def _clean_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Strip, drop empties, de-duplicate keeping the first occurrence."""
    return tuple(dict.fromkeys(s for s in (label.strip() for label in labels) if s))


def _walk(root: Path, report: OnError) -> Iterator[Path]:
    """Image files under ``root`` in sorted order; follows symlinked folders, each real folder once."""
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:  # a symlink loop, or the same folder reached twice: walk it once
                return
            seen.add(key)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            report(str(folder), f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                report(str(path), f"cannot stat: {exc.strerror or exc}")
                continue
            if is_dir:
                yield from visit(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                if is_file:
                    yield path
                    continue
                try:
                    mode = entry.stat().st_mode  # follows a symlink: a link to a FIFO is a FIFO
                except OSError as exc:
                    report(str(path), "broken symbolic link" if entry.is_symlink()
                           else f"cannot stat: {exc.strerror or exc}")
                    continue
                # a FIFO, socket or device named like an image: never opened, but said
                report(str(path), f"not a regular file ({_kind(mode)})")

    yield from visit(Path(os.path.abspath(root)))


def _read_manifest(manifest: Path, source: str | None, labels_from_dirs: bool, report: OnError) -> Iterator[ImageRef]:
    base = manifest.parent.absolute()
    try:
        # utf-8-sig: spreadsheets often write a BOM before the header. surrogateescape: a line that is not
        # UTF-8 is reported on its own (its bytes become lone surrogates, refused by check_ref), not the file.
        with manifest.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            if manifest.suffix.lower() == ".csv":
                rows = _csv_rows(manifest, fh, report)
            else:
                rows = _jsonl_rows(manifest, fh, report)
            for location, uri, labels, row_source in rows:
                ref = _manifest_ref(uri, labels, row_source or source, base, labels_from_dirs)
                if isinstance(ref, str):
                    report(location, ref)
                else:
                    yield from _checked(ref, location, report)
    except OSError as exc:
        report(str(manifest), f"cannot read manifest: {exc.strerror or exc}")


_Row = tuple[str, str, list[str], str | None]


def _csv_rows(manifest: Path, fh: Iterable[str], report: OnError) -> Iterator[_Row]:
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        report(f"{manifest}:1", f"bad CSV header: {exc}")
        return
    columns = [c.strip().lower() for c in header or []]
    if "uri" not in columns:
        report(str(manifest), "no `uri` column in the CSV header")
        return
    col_uri = columns.index("uri")
    col_labels = columns.index("labels") if "labels" in columns else None
    col_source = columns.index("source") if "source" in columns else None

    def cell(row: list[str], col: int | None) -> str:
        return row[col].strip() if col is not None and col < len(row) else ""

    while True:
        line_before = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit(), a NUL byte
            report(f"{manifest}:{reader.line_num}", f"bad CSV row: {exc}")
            if reader.line_num == line_before:
                return  # the reader cannot move past it
            continue
        location = f"{manifest}:{reader.line_num}"
        if not any(c.strip() for c in row):
            continue  # blank line
        uri = cell(row, col_uri)
        if not uri:
            report(location, "empty `uri`")
            continue
        labels = cell(row, col_labels)
        if labels.count("|") >= MAX_LABELS:  # refused before splitting 100k labels into a list
            report(location, f"more than {MAX_LABELS} labels")
            continue
        yield location, uri, labels.split("|"), cell(row, col_source) or None


def _lines(fh: IO[str]) -> Iterator[tuple[int, str | None]]:
    """(line number, line) for each line; None for a line over MAX_LINE_CHARS, which is skipped unread."""
    number = 0
    while line := fh.readline(MAX_LINE_CHARS + 1):
        number += 1
        if len(line) <= MAX_LINE_CHARS or line.endswith(("\n", "\r")):
            yield number, line
            continue
        while (rest := fh.readline(MAX_LINE_CHARS)) and not rest.endswith(("\n", "\r")):
            pass
        yield number, None


def _jsonl_rows(manifest: Path, fh: IO[str], report: OnError) -> Iterator[_Row]:
    for number, line in _lines(fh):
        location = f"{manifest}:{number}"
        if line is None:
            report(location, f"line longer than {MAX_LINE_CHARS} characters")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report(location, f"invalid JSON: {exc.msg}")
            continue
        except (ValueError, RecursionError) as exc:  # a number over 4300 digits; nesting deeper than the stack
            report(location, f"invalid JSON: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if not isinstance(record, dict):
            report(location, "expected a JSON object with a `uri`")
            continue
        uri, labels, row_source = record.get("uri"), record.get("labels", []), record.get("source")
        if not isinstance(uri, str) or not uri.strip():
            report(location, "missing or empty `uri` (must be a string)")
            continue
        if isinstance(labels, str):
            labels = labels.split("|")
        if labels is None:
            labels = []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            report(location, "`labels` must be a list of strings")
            continue
        if len(labels) > MAX_LABELS:
            report(location, f"more than {MAX_LABELS} labels")
            continue
        if row_source is not None and not isinstance(row_source, str):
            report(location, "`source` must be a string")
            continue
        yield location, uri.strip(), labels, row_source or None


def _manifest_ref(
    uri: str, labels: list[str], source: str | None, base: Path, labels_from_dirs: bool
) -> ImageRef | str:
    """The ref for one manifest row, or the reason it is refused."""
    scheme = uri_scheme(uri)
    if scheme in ("http", "https"):
        return ImageRef(uri, _clean_labels(labels), source)
    if scheme is not None and scheme != "file":
        return f"unsupported URI scheme {scheme!r} (use a local path or an http(s) URL)"
    try:
        path = to_path(uri, base)
    except ValueError as exc:
        return str(exc)
    return _ref(path, labels, source, labels_from_dirs)


