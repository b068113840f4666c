"""Run the ``lookalike`` CLI in-process (click's CliRunner), as the command-line tests do."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_cli(args: list[Any], data_dir: str | Path, **kwargs: Any) -> Any:
    """``lookalike --data-dir DATA_DIR ARGS…``; exceptions propagate unless ``catch_exceptions=True``."""
    from click.testing import CliRunner

    from search.cli import main

    kwargs.setdefault("catch_exceptions", False)
    return CliRunner().invoke(main, ["--data-dir", str(data_dir), *map(str, args)], **kwargs)
