"""Settings from the environment (``LOOKALIKE_*``), built by a function so tests can override them.

Every field has one environment variable; the README's configuration table lists them all.
``get_settings(**overrides)`` reads the environment at call time (not import time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from search.errors import ConfigError

DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "lookalike"


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Field ``x`` is read from ``LOOKALIKE_X``."""

    data_dir: Path = field(default_factory=default_data_dir)
    model: str = DEFAULT_MODEL
    collection: str | None = None  # default: derived from the model name (schema.collection_name)
    qdrant_url: str | None = None  # unset: the embedded store under data_dir
    qdrant_api_key: str | None = field(default=None, repr=False)
    batch_size: int = 32
    threads: int = 0  # inference threads; 0 = all cores
    backend: str = "onnx"  # onnx | torch, for the EfficientNet models
    max_pixels: int = 40_000_000  # decompression-bomb guard
    max_bytes: int = 50_000_000
    broker_url: str | None = field(default=None, repr=False)  # unset: local Redis for workers, in-process for watch
    allowed_roots: tuple[Path, ...] = ()
    fetch_urls: bool = False
    fetch_timeout: float = 10.0
    tag_k: int = 10
    tag_threshold: float = 0.7  # 97.8 % correct tags at 85.9 % coverage on Caltech101 (benchmarks/results/evaluate.md)
    tag_prompts: Path | None = None
    hnsw_threshold: int = 20_000  # embedded store builds its HNSW index past this many points
    quantization: str = "none"  # none | int8 | binary: Qdrant quantization of stored vectors

    @property
    def collection_name(self) -> str:
        from search.schema import collection_name

        return self.collection or collection_name(self.model)

    @property
    def embedded(self) -> bool:
        return not self.qdrant_url


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(name: str, raw: str, kind: type | str) -> object:
    var = f"LOOKALIKE_{name.upper()}"
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            return _BOOL[raw.strip().lower()]
    except (ValueError, KeyError):
        raise ConfigError(f"{var}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    if name == "allowed_roots":
        return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p)
    if name in ("data_dir", "tag_prompts"):
        return Path(raw).expanduser()
    return raw or None if name in ("collection", "qdrant_url", "qdrant_api_key", "broker_url") else raw


def get_settings(**overrides: object) -> Settings:
    """Settings from ``LOOKALIKE_*`` variables, then ``overrides`` (keyword = field name)."""
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = os.environ.get(f"LOOKALIKE_{f.name.upper()}")
        if raw is not None and raw != "":
            kind = f.type if isinstance(f.type, type) else str(f.type).split(" ")[0]
            values[f.name] = _parse(f.name, raw, kind)
    unknown = set(overrides) - {f.name for f in fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("data_dir"), str):
        values["data_dir"] = Path(str(values["data_dir"])).expanduser()
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.batch_size < 1:
        raise ConfigError("LOOKALIKE_BATCH_SIZE must be at least 1")
    if settings.backend not in ("onnx", "torch"):
        raise ConfigError(f"LOOKALIKE_BACKEND={settings.backend!r}: choose onnx or torch")
    if settings.quantization not in ("none", "int8", "binary"):
        raise ConfigError(f"LOOKALIKE_QUANTIZATION={settings.quantization!r}: choose none, int8 or binary")
    if not 0.0 <= settings.tag_threshold <= 1.0:
        raise ConfigError("LOOKALIKE_TAG_THRESHOLD must be between 0 and 1")
    return settings


__all__ = ["DEFAULT_BROKER_URL", "DEFAULT_MODEL", "Settings", "get_settings", "replace"]
