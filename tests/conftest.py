"""Shared test setup: every test gets its own data directory and no network model downloads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Model hubs are unreachable in CI; fail fast instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's settings or writes into ~/.local/share/lookalike."""
    for key in list(os.environ):
        if key.startswith("LOOKALIKE_") and key not in ("LOOKALIKE_TEST_QDRANT_URL",):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the whole session, so the real model is exported once."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP folder, built once: tests only load it (caches and saved models go to the data dir)."""
    from tests.clip_fixture import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real redis-server on a free port for the module's tests (skips when redis-server is not installed)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def _fresh_embedders() -> Iterator[None]:
    """Forget loaded embedders around a test (opt in with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    from search.models import clear_embedders

    clear_embedders()
    yield
    clear_embedders()
