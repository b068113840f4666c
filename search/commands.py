"""``lookalike search``: query the index by image files, text (CLIP) or stored ids, from a terminal.

Registered on the root group through the ``lookalike.commands`` entry point, like every other command.
Query files are read and decoded by the same safe code as ingested images (``search.reading``,
``search.images``); the Python API behind it is ``search.query.Searcher``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app
from search.errors import ImageError, printable
from search.schema import Filter, Hit


@click.command()
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--text", "texts", multiple=True, help="Text query (CLIP models). Repeatable.")
@click.option("--id", "ids", multiple=True, help="Find neighbours of a stored point. Repeatable.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1), help="Results per query.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="Only points with this label/tag/source…, e.g. label=cat. Repeat a field for OR, fields AND.")
@click.option("--min-score", type=float, help="Drop results below this cosine similarity.")
@click.option("--json", "as_json", is_flag=True, help="One JSON answer per query, in order.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), help="Draw queries and results to a PNG.")
@pass_app
@handle_errors
def search(app: AppContext, images: tuple[str, ...], texts: tuple[str, ...], ids: tuple[str, ...], k: int,
           filters: tuple[str, ...], min_score: float | None, as_json: bool, sheet: Path | None) -> None:
    """Search by image files, --text and/or --id. All queries share one model load and run batched.

    Answers come in the order of the queries: images, then texts, then ids. A query image that cannot be
    read gets an answer with an "error" and no results, and the exit status is 2.
    """
    from search.query import Searcher, read_query_image

    if not (images or texts or ids):
        raise click.UsageError("give at least one image, --text or --id")
    settings = app.settings()
    flt = Filter.parse(list(filters))
    queries: list[dict[str, Any]] = []
    pictures: list[Any] = []
    for path in images:
        try:
            pictures.append(read_query_image(str(Path(path).resolve()), settings, name=path))
            queries.append({"query": path, "kind": "image"})
        except ImageError as err:
            click.echo(f"cannot search with {err}", err=True)
            queries.append({"query": path, "kind": "image", "error": err.reason})
    if images and not pictures and not (texts or ids):
        raise click.ClickException("none of the query images could be read")
    with Searcher(settings) as searcher:
        results: list[list[Hit]] = []
        if pictures:
            found = iter(searcher.by_images(pictures, k=k, filter=flt, min_score=min_score))
            results += [[] if "error" in q else next(found) for q in queries]
        else:
            results += [[] for _ in queries]
        if texts:
            results += searcher.by_texts(list(texts), k=k, filter=flt, min_score=min_score)
            queries += [{"query": t, "kind": "text"} for t in texts]
        if ids:
            results += searcher.by_ids(list(ids), k=k, filter=flt, min_score=min_score)
            queries += [{"query": i, "kind": "id"} for i in ids]
    if sheet is not None:
        readable = [(q, r) for q, r in zip(queries, results, strict=True) if "error" not in q]
        _sheet(sheet, [q for q, _ in readable], pictures, [r for _, r in readable], settings)
        click.echo(f"sheet written to {sheet}", err=True)
    if as_json:
        echo_json([{**q, "results": [h.to_dict() for h in r]} for q, r in zip(queries, results, strict=True)])
    else:
        for q, hits in zip(queries, results, strict=True):
            click.echo(f"\n{q['kind']} query: {printable(q['query'])}")
            if "error" in q:
                click.echo(f"  (cannot read: {printable(q['error'])})")
            elif not hits:
                click.echo("  (no results)")
            for rank, h in enumerate(hits, 1):
                labels = printable(",".join(h.labels)) or "-"
                tags = printable(",".join(f"{t['label']}({t['score']:.2f})" for t in h.tags)) or "-"
                click.echo(f"  {rank:>2}  {h.score:.4f}  {h.id}  labels={labels}  tags={tags}  "
                           f"{printable(h.uris[0]) if h.uris else ''}")
    if any("error" in q for q in queries):
        sys.exit(2)


def _sheet(path: Path, queries: list[dict[str, Any]], pictures: list[Any], results: list[list[Hit]],
           settings: Any) -> None:
    from search.sheet import draw_sheet, local_image

    rows = []
    pics = iter(pictures)
    for q in queries:
        rows.append((str(q["query"]) if q["kind"] != "image" else Path(q["query"]).name,
                     next(pics) if q["kind"] == "image" else None))
    draw_sheet(rows, results, lambda hit: local_image(hit.uris, settings), path)


def register(group: click.Group) -> None:
    group.add_command(search)


__all__ = ["register", "search"]
