"""``lookalike backfill`` and ``lookalike search`` (registered on the root group by entry point).

``search`` lives here rather than in ``search/`` because query files go through the same safe decoder
as ingested ones (search.images), and dependencies point ingest → search, never back.
"""

from __future__ import annotations

import sys
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app
from search.config import replace
from search.errors import ConfigError, ImageError
from search.schema import Filter, Hit


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--labels-from-dirs", is_flag=True, help="Label each image with its parent folder's name (ImageFolder).")
@click.option("--batch-size", type=int, envvar="LOOKALIKE_BATCH_SIZE", help="Images embedded per batch.")
@click.option("--source", default="backfill", help="Recorded in each new point's `source` field.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to list failures (default: DATA_DIR/reports/backfill-<time>.tsv).")
@click.option("--no-tag", is_flag=True, help="Do not auto-tag new images from labelled neighbours.")
@click.option("--prompts", type=click.Path(dir_okay=False, exists=True, path_type=Path), envvar="LOOKALIKE_TAG_PROMPTS",
              help="Zero-shot tag prompts (CLIP models): one `label` or `label: prompt` per line.")
@click.option("--via-workers", is_flag=True, help="Send the images to Celery workers instead of ingesting here.")
@click.option("--chunk-size", default=64, help="With --via-workers: images per task.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_app
@handle_errors
def backfill(app: AppContext, paths: tuple[str, ...], labels_from_dirs: bool, batch_size: int | None, source: str,
             report: Path | None, no_tag: bool, prompts: Path | None, via_workers: bool, chunk_size: int,
             as_json: bool) -> None:
    """Index images from folders, CSV/JSONL manifests or files.

    Known content (same bytes) is recognised by its hash and skipped, so re-running is a fast no-op and an
    interrupted run resumes where it stopped. Failures are listed, one line each, and the rest goes on.
    """
    from ingest.pipeline import Pipeline
    from ingest.sources import iter_refs

    settings = app.settings(batch_size=batch_size, tag_prompts=prompts)
    errors: list[tuple[str, str]] = []

    def on_error(where: str, reason: str) -> None:
        errors.append((where, reason))
        click.echo(f"skipping {where}: {reason}", err=True)

    refs = list(iter_refs(paths, labels_from_dirs=labels_from_dirs, source=source, on_error=on_error))
    if via_workers:
        fanout = _fanout()
        sent = fanout(refs, settings, queue="backfill", chunk_size=chunk_size)
        click.echo(f"queued {len(refs)} images in {sent} tasks on the backfill queue", err=True)
        return
    report = report or settings.data_dir / "reports" / f"backfill-{datetime.now():%Y%m%d-%H%M%S}.tsv"
    click.echo(f"{len(refs)} images to consider", err=True)
    with Pipeline(settings, source=source, tagger=not no_tag) as pipeline:
        try:
            stats = pipeline.run(refs, progress=True, report=report, total=len(refs))
        except KeyboardInterrupt:
            raise click.ClickException("interrupted: what was written is kept; run the same command to resume") \
                from None
        points = pipeline.store.count() if pipeline.store.meta() is not None else 0
    if errors:  # problems found while listing (bad manifest rows, missing paths) belong in the report too
        report.parent.mkdir(parents=True, exist_ok=True)
        with report.open("a", encoding="utf-8") as fh:
            if not stats.failed:
                fh.write("uri\treason\n")
            fh.writelines(f"{w}\t{r}\n" for w, r in errors)
        stats.report = report
    summary = {**stats.to_dict(), "failed": stats.failed + len(errors), "points": points}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"indexed {stats.indexed}, already present {stats.present}, updated {stats.updated}, "
               f"failed {summary['failed']} in {stats.seconds:.1f} s ({stats.images_per_s:.1f} images/s); "
               f"{points} points in the collection")
    if summary["failed"]:
        click.echo(f"failures listed in {stats.report}")


def _fanout() -> Any:
    """The worker fan-out, found by entry point so ingest never imports workers."""
    for ep in entry_points(group="lookalike.fanout"):
        return ep.load()
    raise ConfigError("--via-workers needs the workers component (entry point lookalike.fanout) installed")


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
    from search.images import decode
    from search.query import Searcher
    from search.reading import read_bytes

    if not (images or texts or ids):
        raise click.UsageError("give at least one image, --text or --id")
    settings = app.settings()
    flt = Filter.parse(list(filters))
    # The allowed roots guard what event producers may name; the user's own query files are not events.
    local = replace(settings, allowed_roots=())
    queries: list[dict[str, Any]] = []
    pictures: list[Any] = []
    for path in images:
        try:
            uri = str(Path(path).resolve())
            pictures.append(decode(read_bytes(uri, local), path, max_pixels=settings.max_pixels).image)
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
            click.echo(f"\n{q['kind']} query: {q['query']}")
            if "error" in q:
                click.echo(f"  (cannot read: {q['error']})")
            elif not hits:
                click.echo("  (no results)")
            for rank, h in enumerate(hits, 1):
                labels = ",".join(h.labels) or "-"
                tags = ",".join(f"{t['label']}({t['score']:.2f})" for t in h.tags) or "-"
                click.echo(f"  {rank:>2}  {h.score:.4f}  {h.id}  labels={labels}  tags={tags}  "
                           f"{h.uris[0] if h.uris else ''}")
    if any("error" in q for q in queries):
        sys.exit(2)


def _sheet(path: Path, queries: list[dict[str, Any]], pictures: list[Any], results: list[list[Hit]],
           settings: Any) -> None:
    from search.images import decode
    from search.reading import local_path, read_bytes
    from search.sheet import draw_sheet

    def load(hit: Hit) -> Any:
        for uri in hit.uris:
            if local_path(uri) is None:
                continue
            try:
                return decode(read_bytes(uri, settings), uri, max_pixels=settings.max_pixels,
                              draft=(320, 320)).image
            except ImageError:
                continue
        return None

    rows = []
    pics = iter(pictures)
    for q in queries:
        rows.append((str(q["query"]) if q["kind"] != "image" else Path(q["query"]).name,
                     next(pics) if q["kind"] == "image" else None))
    draw_sheet(rows, results, load, path)


def register(group: click.Group) -> None:
    group.add_command(backfill)
    group.add_command(search)


__all__ = ["backfill", "register", "search"]
