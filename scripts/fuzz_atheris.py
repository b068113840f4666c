"""Coverage-guided fuzzing of lookalike's parsers of untrusted input, for long runs (atheris / libFuzzer).

    pip install atheris
    .venv/bin/python scripts/fuzz_atheris.py event  -max_total_time=3600 corpus/event
    .venv/bin/python scripts/fuzz_atheris.py decode -max_total_time=3600 -rss_limit_mb=2048 corpus/decode

Targets: ``event`` (workers.events.parse_event on raw bytes), ``manifest-csv`` / ``manifest-jsonl``
(iter_refs over a real file holding the input), ``filter`` (Filter.parse on ``\\n``-separated expressions),
``decode`` (search.images.decode; seed its corpus with small real images). Any exception other than the
project's own (InvalidEvent, SourceError/ImageError, ConfigError) is a crash libFuzzer reports and saves.
tests/test_fuzz.py runs the same properties quickly with Hypothesis in the default test set.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris
except ImportError:  # pragma: no cover - an optional tool
    sys.exit("atheris is not installed: pip install atheris (the Hypothesis tests in tests/test_fuzz.py need none)")

with atheris.instrument_imports():
    from ingest.sources import check_ref, iter_refs
    from search.errors import ConfigError, ImageError, SourceError
    from search.images import decode
    from search.schema import Filter
    from workers.events import InvalidEvent, parse_event

warnings.simplefilter("ignore")  # Pillow's warnings about what it skipped in a hostile file
_SCRATCH = Path(tempfile.mkdtemp(prefix="lookalike-atheris-"))


def _event(data: bytes) -> None:
    try:
        event = parse_event(data)
    except InvalidEvent:
        return
    assert check_ref(event.to_ref()) is None, event


def _manifest(suffix: str) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        path = _SCRATCH / f"m{suffix}"
        path.write_bytes(data)
        for ref in iter_refs([path], on_error=lambda where, why: None):
            assert check_ref(ref) is None, ref
        with contextlib.suppress(SourceError):
            list(iter_refs([path]))

    return run


def _filter(data: bytes) -> None:
    with contextlib.suppress(ConfigError, UnicodeDecodeError):
        Filter.parse(data.decode("utf-8", "surrogatepass").split("\n"))


def _decode(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        decode(data, "fuzz", max_pixels=4_000_000, draft=None, max_decode_bytes=128 * 2**20)


TARGETS: dict[str, Callable[[bytes], None]] = {"event": _event, "manifest-csv": _manifest(".csv"),
                                               "manifest-jsonl": _manifest(".jsonl"), "filter": _filter,
                                               "decode": _decode}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dir]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
