"""Settings from the environment (``LOOKALIKE_*``), with one set of parsing rules for every process.

Each field ``x`` of a settings class is read from ``LOOKALIKE_X`` (pydantic-settings): numbers must parse,
booleans are ``1/true/yes/on`` or ``0/false/no/off`` (anything else is refused, never read as false),
path lists are separated by ``os.pathsep``, network lists by commas, and an empty variable means "unset".
A value that does not parse is a ``ConfigError`` that names the variable. The README's configuration
table lists every variable.

``Settings`` holds what the core needs (store, model, reading, tagging). Long-running processes extend it
with their own concerns — ``workers.config.WorkerSettings`` (broker, task limits) and the HTTP server's
settings — so the core knows nothing of brokers or HTTP. ``load(cls, **overrides)`` builds any of them;
``get_settings(**overrides)`` is ``load(Settings, ...)``. Both read the environment at call time.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from search.errors import ConfigError

DEFAULT_MODEL = "efficientnet-lite0"
ENV_PREFIX = "LOOKALIKE_"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "lookalike"


def env_var(field: str) -> str:
    """The environment variable of a settings field: ``max_bytes`` → ``LOOKALIKE_MAX_BYTES``."""
    return f"{ENV_PREFIX}{field.upper()}"


class BaseLookalikeSettings(BaseSettings):
    """The shared rules: the ``LOOKALIKE_`` prefix, immutability, no unknown fields, empty = unset."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_ignore_empty=True,
                                      validate_default=False, hide_input_in_errors=True)

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied and validated (the environment is not read again)."""
        try:
            # Only the fields that were given carry over as given: "was the model asked for?" survives a replace.
            return type(self).model_validate({**self.model_dump(exclude_unset=True), **changes})
        except ValidationError as err:
            raise _config_error(err, type(self)) from None


S = TypeVar("S", bound=BaseLookalikeSettings)

def _split_commas(value: Any) -> Any:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value


PathList = Annotated[tuple[Path, ...], NoDecode]  # os.pathsep-separated in the environment
TextList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_commas)]  # comma-separated


class Settings(BaseLookalikeSettings):
    """Runtime configuration of the core. Field ``x`` is read from ``LOOKALIKE_X``."""

    # -- where data lives and which store holds the vectors
    data_dir: Path = Field(default_factory=default_data_dir)
    collection: str | None = None  # default: the alias's collection, else derived from the model name
    alias: str = "lookalike"  # the name clients query; a model change moves it (lookalike migrate)
    qdrant_url: str | None = None  # unset: the embedded store under data_dir
    qdrant_api_key: str | None = None
    hnsw_threshold: int = 20_000  # embedded store builds its HNSW index past this many points
    quantization: Literal["none", "int8", "binary"] = "none"  # Qdrant quantization of stored vectors

    # -- the model and how it runs
    model: str = DEFAULT_MODEL
    batch_size: int = 32
    threads: int = 0  # inference threads; 0 = all cores
    backend: Literal["onnx", "torch"] = "onnx"  # for the EfficientNet models

    # -- reading and decoding untrusted images
    max_pixels: int = 40_000_000  # decompression-bomb guard
    max_bytes: int = 50_000_000
    max_decode_mb: int = 512  # memory one decode may hold (search.images.decode_budget), whatever the file size
    allowed_roots: PathList = ()
    allow_hardlinks: bool = False  # read files with several hard links under allowed_roots (search.reading)
    fetch_urls: bool = False
    fetch_timeout: float = 10.0
    fetch_allow_networks: TextList = ()  # CIDRs fetched from although not public, e.g. an internal image host

    # -- tagging from labelled neighbours and prompts
    tag_k: int = 10
    tag_threshold: float = 0.7  # 97.8 % correct tags at 85.9 % coverage on Caltech101 (benchmarks/results/evaluate.md)
    tag_prompts: Path | None = None

    @property
    def collection_name(self) -> str:
        from search.schema import collection_name

        return self.collection or collection_name(self.model)

    @property
    def embedded(self) -> bool:
        return not self.qdrant_url

    def __repr_args__(self) -> Any:  # secrets never reach a log line or a traceback
        return [(k, "****" if v and k in SECRET_FIELDS else v) for k, v in super().__repr_args__()]

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p for p in value.split(os.pathsep) if p]
        return tuple(Path(p).expanduser().resolve() for p in value)

    @field_validator("fetch_allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        value = _split_commas(value)
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad network
        return tuple(value)

    @field_validator("data_dir", "tag_prompts", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.batch_size < 1:
            raise ValueError("LOOKALIKE_BATCH_SIZE must be at least 1")
        if self.max_decode_mb < 1:
            raise ValueError("LOOKALIKE_MAX_DECODE_MB must be at least 1")
        if not 0.0 <= self.tag_threshold <= 1.0:
            raise ValueError("LOOKALIKE_TAG_THRESHOLD must be between 0 and 1")
        return self


SECRET_FIELDS = frozenset({"qdrant_api_key", "broker_url", "result_backend", "api_key"})


def _config_error(err: ValidationError, cls: type[BaseLookalikeSettings]) -> ConfigError:
    """A ValidationError as one line naming the variable (the value is left out: it may be a secret)."""
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        return ConfigError(f"unknown setting {loc[0] if loc else '?'!r} for {cls.__name__}")
    if not loc:  # a check across fields: its message names the variables itself
        return ConfigError(message)
    hint = ""
    if first.get("type") == "bool_parsing":
        hint = " (use 1/0, true/false, yes/no or on/off)"
    elif first.get("type") == "literal_error":
        hint = f" ({message.lower()})"
        message = "invalid choice"
    return ConfigError(f"{env_var(loc[0])}: {message}{hint}")


def load(cls: type[S], **overrides: Any) -> S:
    """``cls`` from ``LOOKALIKE_*`` variables, then ``overrides`` (keyword = field name; None = not given)."""
    unknown = set(overrides) - set(cls.model_fields)
    if unknown:
        raise TypeError(f"unknown settings for {cls.__name__}: {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as err:
        raise _config_error(err, cls) from None


def get_settings(**overrides: Any) -> Settings:
    """Settings from ``LOOKALIKE_*`` variables, then ``overrides`` (keyword = field name)."""
    return load(Settings, **overrides)


def replace(settings: S, **changes: Any) -> S:
    """``settings`` with ``changes`` applied (validated); the functional spelling of ``Settings.replace``."""
    return settings.replace(**changes)


__all__ = ["DEFAULT_MODEL", "BaseLookalikeSettings", "PathList", "Settings", "TextList", "env_var", "get_settings",
           "load", "replace"]
