"""Progress of a long run, on stderr: tqdm's bar on a terminal; elsewhere (a log file, CI, ``docker logs``) one
plain line every ``every`` seconds and one at the end — tqdm would write thousands of carriage-return
updates into the file.

    backfill: 1,234/5,784 images (21.3%), 87.1 images/s, ETA 0:00:52, 2 failed
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO


def eta(done: int, total: int | None, elapsed: float) -> float | None:
    """Seconds left at the rate so far; None while unknown."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


def clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


class Progress:
    """``update(n)`` as items finish; ``write(line)`` for a message between updates; ``close()`` at the end."""

    def __init__(self, total: int | None, *, desc: str = "backfill", unit: str = "images", enabled: bool = True,
                 stream: TextIO | None = None, every: float = 10.0, tty: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.disable = not enabled
        self.done = self.failed = 0
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        if enabled and (tty if tty is not None else _isatty(self.stream)):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1, desc=desc)

    def update(self, n: int, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._line(now)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable and self.done:
            self._line(time.monotonic(), final=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.1f}%)" if self.total \
            else f"{self.done:,} {self.unit}"
        failed = f", {self.failed:,} failed" if self.failed else ""
        left = f", ETA {clock(eta(self.done, self.total, elapsed))}" if self.total else ""
        return f"{self.desc}: {count}, {rate:.1f} {self.unit}/s{left}{failed}"

    def _line(self, now: float, final: bool = False) -> None:
        text = self.line(now)
        if final:
            text = text.split(", ETA")[0].split(f", {self.failed:,} failed")[0] + \
                f", done in {clock(now - self._start)}" + (f", {self.failed:,} failed" if self.failed else "")
        print(text, file=self.stream, flush=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["Progress", "clock", "eta"]
