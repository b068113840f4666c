"""One exception tree for lookalike; every error a user can cause or fix is one of these.

    LookalikeError
     ├── ConfigError            a setting is missing or invalid (names the env var / flag)
     ├── ModelError             a model cannot be loaded or cannot do what was asked
     ├── StoreError             the vector store refused or failed
     │    ├── StoreLocked        another process owns the embedded store
     │    ├── CollectionMismatch the collection was built with another model / preprocessing
     │    └── StoreUnavailable   a Qdrant server cannot be reached (transient: retry)
     │         └── ContentLockLost  a write's lock expired before it ended: redo the write
     └── ImageError             one input image cannot be used (path + reason; the batch goes on)
          └── SourceError        a path/URI cannot be read or is not allowed

Messages are one line, say what failed and, where there is one, the flag or variable that fixes it.
``printable`` makes any text safe to show on one line (logs, terminals, TSV reports); ``ImageError``
applies it to the uri and reason in its message, since both come from untrusted input.
"""

from __future__ import annotations

import re

# C0/C1 controls (newline, tab, ESC of ANSI sequences), the bidi controls that reorder what a terminal
# shows (Trojan Source), line/paragraph separators, and lone surrogates (undecodable bytes of a file name,
# which a UTF-8 stream or log handler would refuse to write).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: object) -> str:
    """``text`` as one safe line: control characters, bidi controls and lone surrogates become escapes
    (``\\n``, ``\\t``, ``\\x1b``, ``\\u202e``, ``\\udcff``), so a uri or label cannot forge a log line, a
    TSV row or a terminal escape. For display only: the result no longer names the file."""
    value = text if isinstance(text, str) else str(text)
    return _UNPRINTABLE.sub(_escape, value)


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class ConfigError(LookalikeError):
    """A setting is missing or invalid."""


class ModelError(LookalikeError):
    """A model cannot be loaded, or cannot do what was asked (e.g. text on a CNN)."""


class StoreError(LookalikeError):
    """The vector store refused or failed an operation."""


class StoreLocked(StoreError):
    """Another process holds the embedded store's data directory."""


class CollectionMismatch(StoreError):
    """The collection exists but was built with another model or preprocessing."""


class StoreUnavailable(StoreError):
    """A Qdrant server could not be reached; the operation may succeed later."""


class ContentLockLost(StoreUnavailable):
    """The lock around a read-merge-write expired before the write ended: redo the write (transient)."""


class ImageError(LookalikeError):
    """One image cannot be used. ``str(err)`` is ``"<uri>: <reason>"``."""

    def __init__(self, uri: str, reason: str, *, transient: bool = False) -> None:
        reason = printable(reason)  # reasons quote inputs (a redirect target, a decoder's message)
        super().__init__(f"{printable(uri)}: {reason}")
        self.uri = uri  # as given: callers match it against their inputs
        self.reason = reason
        # True when the same read may succeed later (a server error, a timeout, an I/O hiccup): workers retry
        # those with backoff instead of dead-lettering them at once.
        self.transient = transient


class SourceError(ImageError):
    """A path or URI cannot be read, does not exist, or lies outside the allowed roots."""
