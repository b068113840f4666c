"""What a worker needs beyond the core settings: the broker, the task limits and the retry policy.

``WorkerSettings`` extends ``search.config.Settings`` (same parsing rules, same ``LOOKALIKE_`` prefix), so a
worker's settings go wherever the core's do. Its own variables:

``LOOKALIKE_BROKER_URL`` (unset: ``redis://127.0.0.1:6379/0``), ``LOOKALIKE_TASK_SOFT_TIME_LIMIT`` (120 s),
``LOOKALIKE_TASK_TIME_LIMIT`` (180 s), ``LOOKALIKE_VISIBILITY_TIMEOUT`` (600 s), ``LOOKALIKE_MAX_RETRIES`` (8),
``LOOKALIKE_RETRY_BACKOFF`` (1 s, doubled per attempt), ``LOOKALIKE_RETRY_BACKOFF_MAX`` (60 s),
``LOOKALIKE_RESULT_BACKEND`` (unset: results are not stored — the state lives in Qdrant),
``LOOKALIKE_ALLOW_ANY_PATH`` (1: run a worker without ``LOOKALIKE_ALLOWED_ROOTS``; off by default),
``LOOKALIKE_HEARTBEAT_TTL`` (3 s: a worker silent this long is dead and its messages go back to the queue,
see ``workers.recovery``), ``LOOKALIKE_METRICS_PORT`` (9808; 0: no metrics endpoint) and
``LOOKALIKE_METRICS_HOST`` (127.0.0.1; 0.0.0.0 in a container) where a worker serves Prometheus metrics,
``LOOKALIKE_METRICS_INTERVAL`` (10 s: how often a worker publishes its counters for ``lookalike status``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pydantic import Field, NonNegativeFloat, NonNegativeInt, ValidationInfo, field_validator

from search.config import Settings, load
from search.errors import ConfigError, printable

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


class WorkerSettings(Settings):
    """Core settings + broker, task limits and retry policy (seconds)."""

    broker_url: str | None = None  # unset: local Redis for workers, in-process ingestion for watch
    task_soft_time_limit: NonNegativeFloat = 120.0
    task_time_limit: NonNegativeFloat = 180.0
    visibility_timeout: NonNegativeFloat = 600.0
    max_retries: NonNegativeInt = 8
    retry_backoff: NonNegativeFloat = 1.0
    retry_backoff_max: NonNegativeFloat = 60.0
    result_backend: str | None = None
    allow_any_path: bool = False
    heartbeat_ttl: NonNegativeFloat = 3.0
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_interval: float = Field(default=10.0, gt=0, le=60)

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A URL that the broker's client cannot parse fails here, naming the variable, not later in a traceback (the
        message leaves the value out: it may hold a password)."""
        if value:
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(value)
                _ = parts.port  # ValueError on a port that is not a number in 0-65535
            except ValueError as err:
                raise ValueError(f"not a usable URL ({str(err).split(':')[0]})") from None
            if info.field_name == "broker_url" and parts.scheme not in ("redis", "rediss", "unix", "memory",
                                                                        "sentinel"):
                raise ValueError(f"use a redis://, rediss:// or unix:// URL, not {parts.scheme or 'no'} scheme")
        return value

    @property
    def broker(self) -> str:
        """The broker URL workers and producers connect to."""
        return self.broker_url or DEFAULT_BROKER_URL

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.retry_backoff, self.retry_backoff_max)

    def check(self) -> None:
        """Refuse limits that would break the delivery guarantees (see ``workers.app``)."""
        if not 0 < self.task_soft_time_limit < self.task_time_limit:
            raise ConfigError(f"LOOKALIKE_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit:g} s) must be positive "
                              f"and below LOOKALIKE_TASK_TIME_LIMIT ({self.task_time_limit:g} s)")
        if not 1 <= self.heartbeat_ttl <= 60:
            raise ConfigError(f"LOOKALIKE_HEARTBEAT_TTL ({self.heartbeat_ttl:g} s) must be between 1 and 60 s")
        needed = self.task_time_limit + self.retry_backoff_max
        if self.visibility_timeout <= needed:
            raise ConfigError(
                f"LOOKALIKE_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) must exceed the task hard time limit "
                f"plus the longest retry delay ({self.task_time_limit:g} + {self.retry_backoff_max:g} s), or Redis "
                f"redelivers messages that are still being worked on; raise it or lower LOOKALIKE_TASK_TIME_LIMIT")


def worker_settings(**overrides: Any) -> WorkerSettings:
    """WorkerSettings from ``LOOKALIKE_*`` variables, then ``overrides``."""
    return load(WorkerSettings, **overrides)


def as_worker_settings(settings: Settings) -> WorkerSettings:
    """``settings`` as WorkerSettings: the worker-only fields come from the environment."""
    if isinstance(settings, WorkerSettings):
        return settings
    return load(WorkerSettings, **settings.model_dump(exclude_unset=True))


@dataclass(frozen=True)
class RetryPolicy:
    """One retry policy for both ways a task retries: an exception Celery retries on its own
    (``autoretry_for``, see ``celery_options``) and events the pipeline reported as transient failures
    (the task calls ``retry`` with ``countdown``). Both back off exponentially with full jitter, capped at
    ``backoff_max`` seconds, at most ``max_retries`` times; then the events are dead-lettered."""

    max_retries: int = 8
    backoff: float = 1.0
    backoff_max: float = 60.0

    def celery_options(self) -> dict[str, Any]:
        return {"retry_backoff": self.backoff, "retry_backoff_max": int(self.backoff_max), "retry_jitter": True,
                "max_retries": self.max_retries}

    def exhausted(self, retries: int) -> bool:
        return retries >= self.max_retries

    def countdown(self, retries: int) -> int:
        """Seconds before attempt ``retries + 1`` (Celery's own formula: random in [0, min(max, b·2^n)])."""
        ceiling = min(self.backoff_max, max(1.0, self.backoff) * (2 ** retries))
        return int(random.randrange(int(ceiling) + 1))


# Query (and fragment) parameters whose values are secrets: password=, api-key=, access_token=, X-Amz-Signature=…
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature|sig$|session", re.IGNORECASE)


def mask_url(url: str | None) -> str:
    """``url`` fit for logs and status output: the password (or a lone user part, which some schemes use as
    the secret) becomes ``****``, so do the values of query and fragment parameters that name secrets
    (``?password=``, ``?api-key=``, ``#access_token=``), and the result is one printable line.

    Never raises: a URL that does not parse (a bad port, an unclosed ``[``) is masked from its text alone,
    since ``status`` must print whatever the operator configured."""
    if not url:
        return ""
    try:
        return printable(_mask(str(url)))
    except Exception:  # masking must never be the thing that fails: say nothing of the URL
        return "<unparseable URL>"


def _mask(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # authority ends at the first / ? or #; its user info ends at the last @ (RFC 3986)
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:****@{hostport}" if colon else f"****@{hostport}"
    before, hash_, fragment = tail.partition("#")
    path, qmark, query = before.partition("?")
    tail = path + qmark + _mask_params(query) + hash_ + _mask_params(fragment)
    return (scheme + sep if sep else "") + authority + tail


def _mask_params(text: str) -> str:
    parts = []
    for part in text.split("&"):
        name, eq, _value = part.partition("=")
        parts.append(f"{name}=****" if eq and _SECRET_PARAM.search(unquote(name)) else part)
    return "&".join(parts)


__all__ = ["DEFAULT_BROKER_URL", "RetryPolicy", "WorkerSettings", "as_worker_settings", "mask_url",
           "worker_settings"]
