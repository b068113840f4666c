"""The HTTP server's settings: ``LOOKALIKE_*`` like every other process (see ``search.config``).

``LOOKALIKE_HOST`` / ``LOOKALIKE_PORT`` (127.0.0.1:8000), ``LOOKALIKE_API_KEY`` (unset: no key; when set,
every write needs ``Authorization: Bearer <key>``, and reads too with ``LOOKALIKE_PROTECT_READS=1``),
``LOOKALIKE_ALLOW_PUBLIC`` (1: bind beyond loopback without a key), ``LOOKALIKE_CORS_ORIGINS`` (comma list;
unset: CORS off), ``LOOKALIKE_UPLOADS_DIR`` (default ``<data dir>/uploads``), ``LOOKALIKE_MAX_QUERIES`` (64
queries per request), ``LOOKALIKE_MAX_K`` (1000), ``LOOKALIKE_REQUEST_TIMEOUT`` (30 s),
``LOOKALIKE_BATCH_WAIT_MS`` (5 ms: how long a query waits for others to share its model call),
``LOOKALIKE_THUMBNAIL_CACHE`` (1024 thumbnails kept in memory).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field

from search.config import TextList, load
from search.errors import ConfigError
from workers.config import WorkerSettings


class ServeSettings(WorkerSettings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    protect_reads: bool = False
    allow_public: bool = False
    cors_origins: TextList = ()
    uploads_dir: Path | None = None
    max_queries: int = Field(64, ge=1)
    max_k: int = Field(1000, ge=1)
    request_timeout: float = Field(30.0, gt=0)
    batch_wait_ms: float = Field(5.0, ge=0)
    thumbnail_cache: int = Field(1024, ge=0)

    @property
    def uploads(self) -> Path:
        return (self.uploads_dir or self.data_dir / "uploads").expanduser().resolve()

    @property
    def publishes_events(self) -> bool:
        """Uploads become live events for the workers only when they can share the store (a Qdrant server);
        on the embedded store this process owns the data and ingests in-process."""
        return bool(self.broker_url) and not self.embedded

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without an API key, unless explicitly allowed."""
        if self.api_key or self.allow_public or _loopback(self.host):
            return
        raise ConfigError(f"refusing to listen on {self.host} without an API key: set LOOKALIKE_API_KEY, or "
                          "LOOKALIKE_ALLOW_PUBLIC=1 (--allow-public) if the network is trusted")

    def check_uploads(self) -> None:
        roots = self.allowed_roots
        if roots and not any(self.uploads == r or self.uploads.is_relative_to(r) for r in roots):
            raise ConfigError(f"the uploads folder {self.uploads} lies outside LOOKALIKE_ALLOWED_ROOTS; set "
                              "LOOKALIKE_UPLOADS_DIR inside a root, or add it to the roots")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_settings(**overrides: object) -> ServeSettings:
    return load(ServeSettings, **overrides)


__all__ = ["ServeSettings", "serve_settings"]
