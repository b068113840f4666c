"""``lookalike models``: every name the model families know, with dimension and preprocessing, without
loading any weights. Registered through the ``lookalike.commands`` entry point ``models``."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app

if TYPE_CHECKING:
    from search.models.registry import ModelRow


def _table(rows: list[ModelRow]) -> None:
    cells = [(r.name, "?" if r.dim is None else str(r.dim), r.preprocessing or "?", r.family, r.note) for r in rows]
    header = ("name", "dim", "preprocessing", "family", "note")
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(4)]
    for row in [header, *cells]:
        click.echo(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:<{widths[3]}}  "
                   f"{row[4]}".rstrip())


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@pass_app
@handle_errors
def models_command(app: AppContext, as_json: bool) -> None:
    """List model names: built in, saved under the data dir, and from plugins (in the order names resolve).

    A "?" is what cannot be known without downloading the model.
    """
    from search.models.registry import describe_models  # settings and families: not at `lookalike --help`

    rows = describe_models(app.settings())
    if as_json:
        echo_json([asdict(row) for row in rows])
    else:
        _table(rows)


def register(group: click.Group) -> None:
    group.add_command(models_command)
