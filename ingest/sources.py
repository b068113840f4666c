"""Where images come from: folders, manifests and single files become ``ImageRef``s.

``iter_refs`` turns command-line paths into references, reporting bad entries through ``on_error`` and
going on. Reading the bytes of one reference is ``search.reading.read_bytes`` (shared with the query path),
where the safety rules live.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from search.errors import SourceError
from search.reading import to_path, uri_scheme

__all__ = ["IMAGE_EXTENSIONS", "ImageRef", "SourceError", "iter_refs"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".csv", ".jsonl", ".ndjson"})
OnError = Callable[[str, str], None]


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
        on_error(location, reason)

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
        except ValueError as exc:
            report(text, str(exc))
            continue
        if path.is_dir():
            for file in _walk(path, report):
                yield _ref(file, (), source, labels_from_dirs)
        elif path.is_file():
            if path.suffix.lower() in MANIFEST_EXTENSIONS:
                yield from _read_manifest(path, source, labels_from_dirs, report)
            else:
                yield _ref(path, (), source, labels_from_dirs)
        elif path.is_symlink():
            report(str(path), "broken symbolic link")
        elif path.exists():
            report(str(path), "not a regular file or folder")
        else:
            report(str(path), "no such file or directory")


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
                elif entry.is_symlink():
                    report(str(path), "broken symbolic link")

    yield from visit(Path(os.path.abspath(root)))


def _read_manifest(manifest: Path, source: str | None, labels_from_dirs: bool, report: OnError) -> Iterator[ImageRef]:
    base = manifest.parent.absolute()
    try:
        # utf-8-sig: spreadsheets often write a BOM before the header
        with manifest.open(encoding="utf-8-sig", newline="") as fh:
            if manifest.suffix.lower() == ".csv":
                rows = _csv_rows(manifest, fh, report)
            else:
                rows = _jsonl_rows(manifest, fh, report)
            for location, uri, labels, row_source in rows:
                ref = _manifest_ref(uri, labels, row_source or source, base, labels_from_dirs)
                if isinstance(ref, str):
                    report(location, ref)
                else:
                    yield ref
    except UnicodeDecodeError as exc:
        report(str(manifest), f"not UTF-8 text ({exc.reason} at byte {exc.start})")
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
        yield location, uri, cell(row, col_labels).split("|"), cell(row, col_source) or None


def _jsonl_rows(manifest: Path, fh: Iterable[str], report: OnError) -> Iterator[_Row]:
    for number, line in enumerate(fh, start=1):
        location = f"{manifest}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report(location, f"invalid JSON: {exc.msg}")
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


