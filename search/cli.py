"""The root ``lookalike`` click group.

Subcommands of ``ingest`` and ``workers`` are registered through the ``lookalike.commands`` entry-point
group (each entry point is a ``register(group)`` function), so this package imports neither. Heavy
libraries are imported inside the commands: ``lookalike --help`` stays instant.

Results go to stdout (a table, or JSON with ``--json``); progress and logs go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from search.errors import LookalikeError

if TYPE_CHECKING:
    from search.config import S

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class AppContext:
    """Global options, turned into Settings on demand (env first, then flags)."""

    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, cls: type[S] | None = None, **more: Any) -> S:
        """``cls`` (default: the core Settings, or a process's extension of it) from the environment, then
        the flags. pydantic is imported here, not at start-up: ``lookalike --help`` stays instant."""
        from search.config import Settings, load

        return load(cls or Settings, **{**self.overrides, **{k: v for k, v in more.items() if v is not None}})  # type: ignore[return-value]


pass_app = click.make_pass_decorator(AppContext, ensure=True)


def handle_errors(fn: F) -> F:
    """Turn our domain errors into one-line click errors (exit status 1), never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LookalikeError as err:
            raise click.ClickException(str(err)) from None

    return wrapper  # type: ignore[return-value]


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


class _PluginGroup(click.Group):
    """Loads the ``lookalike.commands`` entry points the first time commands are listed or resolved."""

    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in sorted(entry_points(group="lookalike.commands"), key=lambda e: e.name):
            try:
                ep.load()(self)
            except Exception as err:  # a broken plugin must not take the whole CLI down
                click.echo(f"warning: cannot load commands from {ep.value}: {err}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_PluginGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LOOKALIKE_DATA_DIR",
              help="Where the embedded store, caches and models live.")
@click.option("--model", "-m", envvar="LOOKALIKE_MODEL",
              help="Embedding model: efficientnet-lite0 (default), efficientnet-lite2, a CLIP name or a folder.")
@click.option("--collection", envvar="LOOKALIKE_COLLECTION", help="Collection name (default: derived from the model).")
@click.option("--qdrant-url", envvar="LOOKALIKE_QDRANT_URL", help="Use a Qdrant server instead of the embedded store.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.version_option(package_name="lookalike")
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None, model: str | None, collection: str | None,
         qdrant_url: str | None, verbose: int) -> None:
    """lookalike — reverse image search on Qdrant.

    Backfill an image store, search it by image, text (CLIP) or id, evaluate retrieval,
    and keep it fresh with Celery workers. Settings come from LOOKALIKE_* variables and these flags.
    """
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)], stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    overrides = {"data_dir": data_dir, "model": model, "collection": collection, "qdrant_url": qdrant_url}
    ctx.obj = AppContext({k: v for k, v in overrides.items() if v is not None})
