"""The contract other services rely on: collection names and metadata, payload fields, point IDs.

* Point ID: ``uuid5(NAMESPACE_URL, "urn:sha256:" + sha256_hex_of_the_image_bytes)`` — the same bytes
  are one point however many times, and from however many paths, they arrive.
* Payload: see ``PAYLOAD_FIELDS``; ``uris`` accumulates every location seen for the bytes.
* Collection metadata: ``CollectionMeta`` — refused when opened with another model/preprocessing.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
DISTANCE = "Cosine"

# field -> Qdrant payload index type; every field a filter may use is indexed.
PAYLOAD_INDEXES: dict[str, str] = {
    "sha256": "keyword",
    "uris": "keyword",
    "labels": "keyword",
    "tags[].label": "keyword",
    "source": "keyword",
    "model": "keyword",
    "ingested_at": "datetime",
    "duplicate_of": "keyword",
}

PAYLOAD_FIELDS = (
    "sha256",  # hex digest of the image bytes
    "uris",  # every location the bytes were seen at
    "source",  # who sent it: "backfill", "worker", "watch", or the event's source
    "width",
    "height",
    "format",  # PIL format name: JPEG, PNG, ...
    "bytes",  # size of the file
    "ingested_at",  # RFC 3339 UTC time of first ingestion
    "labels",  # given by the user
    "tags",  # predicted: [{"label", "score", "method": "knn"|"zero-shot", "neighbours"|"prompt"}]
    "model",  # embedding model name
    "duplicate_of",  # id of the stored point it near-duplicates when ingested (ingest.duplicates), else None
)


# field -> the type every stored value has (checked by ``build_payload``; tags entries are dicts).
_PAYLOAD_TYPES: dict[str, type | tuple[type, ...]] = {
    "sha256": str, "uris": list, "source": str, "width": int, "height": int, "format": str, "bytes": int,
    "ingested_at": str, "labels": list, "tags": list, "model": str, "duplicate_of": (str, type(None)),
}


def build_payload(*, sha256: str, uris: list[str], source: str, width: int, height: int, format: str,
                  size: int, ingested_at: str, labels: list[str], tags: list[dict[str, Any]],
                  model: str, duplicate_of: str | None = None) -> dict[str, Any]:
    """The payload of a new point — the one place it is built, so every writer stores the same shape.

    Keyword-only, one per ``PAYLOAD_FIELDS`` entry (``size`` is stored as ``bytes``); a value of the wrong
    type is a programming error and raises ``TypeError`` before anything is written."""
    payload = {"sha256": sha256, "uris": list(uris), "source": source, "width": width, "height": height,
               "format": format, "bytes": size, "ingested_at": ingested_at, "labels": list(labels),
               "tags": list(tags), "model": model, "duplicate_of": duplicate_of}
    check_payload(payload)
    return payload


def check_payload(payload: dict[str, Any]) -> None:
    """Refuse a payload that does not follow the contract (unknown or missing fields, wrong types)."""
    if set(payload) != set(PAYLOAD_FIELDS):
        extra, missing = sorted(set(payload) - set(PAYLOAD_FIELDS)), sorted(set(PAYLOAD_FIELDS) - set(payload))
        raise TypeError(f"payload fields differ from the contract: unknown {extra}, missing {missing}")
    for key, kind in _PAYLOAD_TYPES.items():
        value = payload[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"payload field {key!r} must be {getattr(kind, '__name__', kind)}, "
                            f"not {type(value).__name__}")
    if not all(isinstance(x, str) for x in payload["uris"] + payload["labels"]):
        raise TypeError("payload 'uris' and 'labels' hold strings only")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def point_id(sha256: str) -> str:
    """The point ID for image bytes with this SHA-256 hex digest."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:sha256:{sha256.lower()}"))


def collection_name(model: str) -> str:
    """Default collection for a model: ``lookalike_<model slug>``."""
    slug = re.sub(r"[^a-z0-9]+", "_", model.rsplit("/", 1)[-1].lower()).strip("_")
    return f"lookalike_{slug or 'model'}"


@dataclass(frozen=True)
class CollectionMeta:
    """What a collection was built with. Stored with the collection, checked on every open."""

    model: str
    dim: int
    preprocessing: str
    distance: str = DISTANCE
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lookalike": asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CollectionMeta | None:
        inner = (data or {}).get("lookalike")
        if not inner:
            return None
        keys = ("model", "dim", "preprocessing", "distance", "schema", "extra")
        return cls(**{k: inner[k] for k in keys if k in inner})

    def mismatch(self, other: CollectionMeta) -> str | None:
        """Why ``other`` cannot be used with this collection, or None."""
        for key in ("model", "dim", "preprocessing", "distance"):
            if getattr(self, key) != getattr(other, key):
                return f"{key} is {getattr(self, key)!r} in the collection but {getattr(other, key)!r} now"
        return None


@dataclass(frozen=True)
class Match:
    """``field`` has any of ``values`` (list fields match if any element does)."""

    field: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Filter:
    """A small, backend-neutral filter: all ``must`` hold, no ``must_not`` holds,
    every field in ``non_empty`` is present and non-empty, and the point is not in ``exclude_ids``."""

    must: tuple[Match, ...] = ()
    must_not: tuple[Match, ...] = ()
    non_empty: tuple[str, ...] = ()
    exclude_ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, exprs: list[str] | tuple[str, ...]) -> Filter | None:
        """``["label=cat", "label=dog", "source=web"]`` → labels in {cat, dog} AND source = web.
        ``label``, ``tag`` and ``uri`` stand for ``labels``, ``tags[].label`` and ``uris``. Unknown fields are
        refused (a typo must not silently match nothing); values are exact and case-sensitive. Anything a
        store could not take (a whole number outside int64, a string with a lone surrogate) is a ``ConfigError``
        here, not a traceback there."""
        from search.errors import ConfigError

        grouped: dict[str, list[Any]] = {}
        for expr in exprs:
            key, sep, value = expr.partition("=")
            key = FILTER_ALIASES.get(key.strip(), key.strip())
            if not sep or not key:
                raise ConfigError(f"--filter {expr!r}: expected FIELD=VALUE, e.g. label=cat")
            if key not in FILTER_FIELDS:
                names = ", ".join(sorted(set(FILTER_ALIASES) | set(FILTER_FIELDS) - set(FILTER_ALIASES.values())))
                raise ConfigError(f"--filter {expr!r}: unknown field {key!r}; filter on one of {names}")
            if FILTER_FIELDS[key] is int:
                try:
                    number = int(value)
                except ValueError:  # not a number, or over 4300 digits
                    raise ConfigError(f"--filter {expr[:60]!r}: {key} takes a whole number") from None
                if not _INT64_MIN <= number <= _INT64_MAX:  # the stores' integers: a bigger one is a traceback there
                    raise ConfigError(f"--filter {expr[:60]!r}: {key} must be between {_INT64_MIN} and {_INT64_MAX}")
                grouped.setdefault(key, []).append(number)
            else:
                try:
                    value.encode("utf-8")  # a lone surrogate cannot be sent to either store
                except UnicodeEncodeError:
                    raise ConfigError(f"--filter {expr[:60]!r}: the value is not valid Unicode text") from None
                grouped.setdefault(key, []).append(value)
        if not grouped:
            return None
        return cls(must=tuple(Match(k, tuple(v)) for k, v in grouped.items()))


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
FILTER_ALIASES = {"label": "labels", "tag": "tags[].label", "tags": "tags[].label", "uri": "uris"}
FILTER_FIELDS: dict[str, type] = {"labels": str, "tags[].label": str, "uris": str, "source": str, "sha256": str,
                                  "model": str, "format": str, "width": int, "height": int, "bytes": int,
                                  "duplicate_of": str}


@dataclass
class PointRecord:
    """A point as stored: id, vector (float32, L2-normalised) and payload."""

    id: str
    vector: Any  # numpy array or None when not requested
    payload: dict[str, Any]


@dataclass
class Hit:
    """One search result."""

    id: str
    score: float
    payload: dict[str, Any]

    @property
    def uris(self) -> list[str]:
        return list(self.payload.get("uris") or [])

    @property
    def labels(self) -> list[str]:
        return list(self.payload.get("labels") or [])

    @property
    def tags(self) -> list[dict[str, Any]]:
        return list(self.payload.get("tags") or [])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(float(self.score), 6), "uris": self.uris, "labels": self.labels,
                "tags": self.tags, "sha256": self.payload.get("sha256")}
