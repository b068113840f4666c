"""One exception tree for lookalike; every error a user can cause or fix is one of these.

    LookalikeError
     ├── ConfigError            a setting is missing or invalid (names the env var / flag)
     ├── ModelError             a model cannot be loaded or cannot do what was asked
     ├── StoreError             the vector store refused or failed
     │    ├── StoreLocked        another process owns the embedded store
     │    ├── CollectionMismatch the collection was built with another model / preprocessing
     │    └── StoreUnavailable   a Qdrant server cannot be reached (transient: retry)
     └── ImageError             one input image cannot be used (path + reason; the batch goes on)
          └── SourceError        a path/URI cannot be read or is not allowed

Messages are one line, say what failed and, where there is one, the flag or variable that fixes it.
"""

from __future__ import annotations


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


class ImageError(LookalikeError):
    """One image cannot be used. ``str(err)`` is ``"<uri>: <reason>"``."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


class SourceError(ImageError):
    """A path or URI cannot be read, does not exist, or lies outside the allowed roots."""
