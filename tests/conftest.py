"""Shared test setup: every test gets its own data directory and no network model downloads."""

from __future__ import annotations

import os
from pathlib import Path

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
