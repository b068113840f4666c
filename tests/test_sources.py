"""ingest.sources: folder walks and manifests become ImageRefs; bad entries are reported and skipped."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest.sources import IMAGE_EXTENSIONS, ImageRef, iter_refs
from search.errors import SourceError, printable
from tests import imagefactory as f


def _errors() -> tuple[list[tuple[str, str]], Callable[[str, str], None]]:
    seen: list[tuple[str, str]] = []
    return seen, lambda location, reason: seen.append((location, reason))


# ------------------------------------------------------------------------------------------ folder walk


def test_extensions_constant() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


def test_folder_walk_is_recursive_sorted_case_insensitive_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    f.solid(root / "b.jpg")
    f.solid(root / "A.JPG", format="JPEG")
    f.solid(root / "c.Png", format="PNG")
    f.solid(root / "sub" / "deeper" / "x.TIFF", format="TIFF")
    f.solid(root / "sub" / "y.webp")
    f.solid(root / ".hidden.jpg")
    f.solid(root / ".cache" / "z.jpg")
    f.text_file(root / "notes.txt")
    f.text_file(root / "sub" / "manifest.csv", "uri\nb.jpg\n")  # inside a walk a CSV is just a non-image
    f.text_file(root / "README")
    refs = list(iter_refs([root]))
    rel = [Path(r.uri).relative_to(root).as_posix() for r in refs]
    assert rel == ["A.JPG", "b.jpg", "c.Png", "sub/deeper/x.TIFF", "sub/y.webp"]
    assert all(Path(r.uri).is_absolute() and r.labels == () and r.source is None for r in refs)
    assert list(iter_refs([root])) == refs  # deterministic


def test_relative_folder_gives_absolute_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f.solid(tmp_path / "imgs" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    [ref] = iter_refs(["imgs"])
    assert ref.uri == str(tmp_path / "imgs" / "a.jpg")


def test_labels_from_dirs_uses_the_parent_folder(tmp_path: Path) -> None:
    root = tmp_path / "caltech"
    f.solid(root / "airplanes" / "image_0001.jpg")
    f.solid(root / "airplanes" / "image_0002.jpg")
    f.solid(root / "faces" / "image_0001.jpg")
    refs = list(iter_refs([root], labels_from_dirs=True, source="bench"))
    assert [(Path(r.uri).parent.name, r.labels, r.source) for r in refs] == [
        ("airplanes", ("airplanes",), "bench"),
        ("airplanes", ("airplanes",), "bench"),
        ("faces", ("faces",), "bench"),
    ]
    assert all(r.labels == () for r in iter_refs([root]))


def test_symlink_loops_are_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    f.solid(root / "a" / "1.jpg")
    f.solid(root / "b" / "2.jpg")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "b" / "self").symlink_to(root / "b", target_is_directory=True)
    outside = tmp_path / "elsewhere"
    f.solid(outside / "3.jpg")
    (root / "c").symlink_to(outside, target_is_directory=True)
    refs = list(iter_refs([root]))
    names = sorted(Path(r.uri).name for r in refs)
    assert names == ["1.jpg", "2.jpg", "3.jpg"]  # each real folder once; a linked folder is followed


def test_single_files_urls_and_missing_paths(tmp_path: Path) -> None:
    img = f.solid(tmp_path / "one.jpg")
    odd = f.solid(tmp_path / "no-extension", format="PNG")  # named explicitly: decode decides
    errors, on_error = _errors()
    refs = list(
        iter_refs(
            [img, str(odd), "https://example.com/a.jpg", tmp_path / "missing.jpg", "ftp://host/x.jpg"],
            on_error=on_error,
        )
    )
    assert [r.uri for r in refs] == [str(img), str(odd), "https://example.com/a.jpg"]
    assert errors == [
        (str(tmp_path / "missing.jpg"), "no such file or directory"),
        ("ftp://host/x.jpg", "unsupported URI scheme 'ftp' (use a local path or an http(s) URL)"),
    ]


def test_without_on_error_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        list(iter_refs([tmp_path / "missing"]))
    assert err.value.reason == "no such file or directory"


def test_broken_symlink_in_a_folder_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    f.solid(root / "ok.jpg")
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    errors, on_error = _errors()
    assert [Path(r.uri).name for r in iter_refs([root], on_error=on_error)] == ["ok.jpg"]
    assert errors == [(str(root / "gone.jpg"), "broken symbolic link")]


# -------------------------------------------------------------------------------------------- manifests


def test_csv_manifest_relative_paths_labels_and_a_bad_row(tmp_path: Path) -> None:
    data = tmp_path / "data"
    f.solid(data / "imgs" / "a.jpg")
    f.solid(data / "imgs" / "b.jpg")
    absolute = f.solid(tmp_path / "elsewhere" / "c.jpg")
    manifest = data / "manifest.csv"
    manifest.write_text(
        "\ufeffid,URI,labels\n"  # BOM and a capitalised header, as spreadsheets write them
        "1,imgs/a.jpg,cat|pet| cat \n"
        "2,,dog\n"
        f"3,{absolute},\n"
        "\n"
        "4,https://example.com/d.jpg,remote\n"
        "5,ftp://example.com/e.jpg,x\n"
        "6,./imgs/../imgs/b.jpg,dog\n",
        encoding="utf-8",
    )
    errors, on_error = _errors()
    refs = list(iter_refs([manifest], source="m", on_error=on_error))
    assert refs == [
        ImageRef(str(data / "imgs" / "a.jpg"), ("cat", "pet"), "m"),
        ImageRef(str(absolute), (), "m"),
        ImageRef("https://example.com/d.jpg", ("remote",), "m"),
        ImageRef(str(data / "imgs" / "b.jpg"), ("dog",), "m"),
    ]
    assert errors == [
        (f"{manifest}:3", "empty `uri`"),
        (f"{manifest}:7", "unsupported URI scheme 'ftp' (use a local path or an http(s) URL)"),
    ]


def test_csv_manifest_without_a_uri_column(tmp_path: Path) -> None:
    manifest = f.text_file(tmp_path / "m.csv", "path,labels\na.jpg,cat\n")
    errors, on_error = _errors()
    assert list(iter_refs([manifest], on_error=on_error)) == []
    assert errors == [(str(manifest), "no `uri` column in the CSV header")]
    with pytest.raises(SourceError, match="no `uri` column"):
        list(iter_refs([manifest]))


def test_csv_source_column_overrides_the_default(tmp_path: Path) -> None:
    manifest = f.text_file(tmp_path / "m.csv", "uri,source\na.jpg,camera\nb.jpg,\n")
    refs = list(iter_refs([manifest], source="default"))
    assert [(Path(r.uri).name, r.source) for r in refs] == [("a.jpg", "camera"), ("b.jpg", "default")]


def test_jsonl_manifest_and_bad_lines(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    manifest = f.text_file(
        sub / "m.jsonl",
        '{"uri": "x/a.png", "labels": ["cat", "cat", " pet"]}\n'
        "{not json\n"
        '["a list"]\n'
        '{"uri": "b.png", "labels": "dog|pet"}\n'
        '{"labels": ["orphan"]}\n'
        '{"uri": "c.png", "labels": [1, 2]}\n'
        "\n"
        '{"uri": "https://example.com/e.jpg"}\n'
        '{"uri": "file://' + str(tmp_path / "f.png") + '", "source": "disk"}\n',
    )
    errors, on_error = _errors()
    refs = list(iter_refs([manifest], labels_from_dirs=False, on_error=on_error))
    assert refs == [
        ImageRef(str(sub / "x" / "a.png"), ("cat", "pet")),
        ImageRef(str(sub / "b.png"), ("dog", "pet")),
        ImageRef("https://example.com/e.jpg", ()),
        ImageRef(str(tmp_path / "f.png"), (), "disk"),
    ]
    locations = [loc for loc, _ in errors]
    assert locations == [f"{manifest}:2", f"{manifest}:3", f"{manifest}:5", f"{manifest}:6"]
    assert errors[0][1].startswith("invalid JSON")
    assert errors[3][1] == "`labels` must be a list of strings"


NOT_UTF8 = "uri is not UTF-8 text (undecodable bytes or a lone surrogate); it cannot be stored"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_line_that_is_not_utf8_is_refused_on_its_own(tmp_path: Path, suffix: str) -> None:
    """It used to stop the whole manifest (UnicodeDecodeError): the rows after it were never read."""
    manifest = tmp_path / f"m{suffix}"
    rows = [b"a.jpg", b"\xff\xfe.jpg", b"b.jpg"]
    if suffix == ".csv":
        manifest.write_bytes(b"uri\n" + b"\n".join(rows) + b"\n")
    else:
        manifest.write_bytes(b"".join(b'{"uri": "' + r + b'"}\n' for r in rows))
    errors, on_error = _errors()
    assert [Path(r.uri).name for r in iter_refs([manifest], on_error=on_error)] == ["a.jpg", "b.jpg"]
    line = 3 if suffix == ".csv" else 2
    assert errors == [(f"{manifest}:{line}", NOT_UTF8)]


def test_hostile_jsonl_lines_are_refused_one_by_one(tmp_path: Path) -> None:
    lines = [
        '{"uri": "ok1.jpg"}',
        "[" * 100_000,  # RecursionError in json.loads
        '{"uri": "a.jpg", "n": ' + "1" * 5000 + "}",  # ValueError: over 4300 digits
        '{"uri": "\\ud800.jpg"}',  # a lone surrogate, escaped in JSON
        '{"uri": "b.jpg", "labels": ["\\udc80"]}',
        '{"uri": "file:///x/a%00b.jpg"}',  # a NUL once percent-decoded
        '{"uri": "c.jpg", "labels": ["nul\\u0000"]}',
        '{"uri": "d.jpg", "labels": ' + json.dumps([f"l{i}" for i in range(100_000)]) + "}",
        '{"uri": "e.jpg", "labels": ["' + "x" * 300 + '"]}',
        '{"uri": "' + "f" * 5000 + '.jpg"}',
        '{"uri": "g.jpg", "source": "' + "s" * 300 + '"}',
        '{"uri": "~no-such-user-here/h.jpg"}',
        '{"uri": "i.jpg", "pad": "' + "p" * (2 << 20) + '"}',  # a line over 1 MB
        '{"uri": "ok2.jpg", "labels": ["fine"]}',
    ]
    manifest = f.text_file(tmp_path / "m.jsonl", "\n".join(lines) + "\n")
    errors, on_error = _errors()
    refs = list(iter_refs([manifest], on_error=on_error))
    assert [(Path(r.uri).name, r.labels) for r in refs] == [("ok1.jpg", ()), ("ok2.jpg", ("fine",))]
    assert [loc for loc, _ in errors] == [f"{manifest}:{n}" for n in range(2, 14)]
    reasons = [reason for _, reason in errors]
    assert reasons[0].startswith("invalid JSON: RecursionError") and reasons[1].startswith("invalid JSON: ValueError")
    assert reasons[2] == "the path is not valid text (a lone surrogate)"
    assert reasons[3].startswith("label is not UTF-8 text")
    assert reasons[4] == "the path contains a NUL byte" and reasons[5] == "label contains a NUL character"
    assert reasons[6] == "more than 64 labels" and reasons[7] == "label is longer than 256 characters"
    assert reasons[8] == "uri is longer than 4096 characters" and reasons[9] == "source is longer than 256 characters"
    assert reasons[10].startswith("cannot expand '~'") and reasons[11] == "line longer than 1048576 characters"


def test_hostile_csv_rows_are_refused_one_by_one(tmp_path: Path) -> None:
    manifest = f.text_file(tmp_path / "m.csv", "uri,labels,source\n"
                           "ok1.jpg,,\n"
                           "a.jpg," + "|".join(["x"] * 50_000) + ",\n"  # under csv's 128 KB field limit
                           "file:///x/a%00b.jpg,,\n"
                           "b.jpg,nul\x00,\n"
                           '"c\nd.jpg",x,\n'  # a quoted newline: a legal, if odd, file name
                           "ok2.jpg,fine,\n")
    errors, on_error = _errors()
    refs = list(iter_refs([manifest], on_error=on_error))
    assert [Path(r.uri).name for r in refs] == ["ok1.jpg", "c\nd.jpg", "ok2.jpg"]
    assert errors == [(f"{manifest}:3", "more than 64 labels"), (f"{manifest}:4", "the path contains a NUL byte"),
                      (f"{manifest}:5", "label contains a NUL character")]


def test_the_row_bounds_are_the_event_contracts() -> None:
    from ingest import sources
    from workers import events

    assert (sources.MAX_LABELS, sources.MAX_TEXT_CHARS, sources.MAX_URI_CHARS) == (
        events.MAX_LABELS, events.MAX_TEXT_CHARS, events.MAX_URI_CHARS)


def test_special_files_and_undecodable_names_in_a_folder_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    f.solid(root / "ok.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "pipe.txt")  # not named like an image: skipped like any other non-image
    (root / "to_pipe.png").symlink_to(root / "pipe.jpg")
    bad_name = os.fsdecode(b"caf\xe9.jpg")
    f.solid(root / bad_name)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    try:
        errors, on_error = _errors()
        assert [Path(r.uri).name for r in iter_refs([root], on_error=on_error)] == ["ok.jpg"]
    finally:
        sock.close()
    assert errors == [
        (printable(str(root / bad_name)), NOT_UTF8),
        (str(root / "pipe.jpg"), "not a regular file (a FIFO)"),
        (str(root / "sock.png"), "not a regular file (a socket)"),
        (str(root / "to_pipe.png"), "not a regular file (a FIFO)"),
    ]
    errors, on_error = _errors()
    assert list(iter_refs([root / "pipe.jpg"], on_error=on_error)) == []
    assert errors == [(str(root / "pipe.jpg"), "not a regular file or folder (a FIFO)")]


@pytest.mark.parametrize(("path", "reason"), [
    ("/tmp/a\x00b", "the path contains a NUL byte"),
    ("/tmp/\ud800", "the path is not valid text (a lone surrogate)"),
    ("/" + "a" * 5000, "cannot stat: File name too long"),
])
def test_hostile_command_line_paths_are_reported(path: str, reason: str) -> None:
    errors, on_error = _errors()
    assert list(iter_refs([path], on_error=on_error)) == []
    assert errors == [(printable(path), reason)]


def test_locations_and_reasons_reach_on_error_printable(tmp_path: Path) -> None:
    """A newline or ANSI escape in a name must not forge a log line or reach a terminal raw."""
    manifest = f.text_file(tmp_path / "m.jsonl", '{"uri": "ftp://x/\\u001b[31mred\\nfake line"}\n')
    errors, on_error = _errors()
    assert list(iter_refs([manifest], on_error=on_error)) == []
    [(_, reason)] = errors
    assert reason == "unsupported URI scheme 'ftp' (use a local path or an http(s) URL)"
    missing = tmp_path / "new\nline\x1b[2J.jpg"
    list(iter_refs([missing], on_error=on_error))
    assert errors[-1] == (str(tmp_path) + "/new\\nline\\x1b[2J.jpg", "no such file or directory")
    with pytest.raises(SourceError) as err:
        list(iter_refs([missing]))
    assert "\n" not in str(err.value) and err.value.uri == str(missing)
