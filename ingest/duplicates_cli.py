"""``lookalike duplicates`` (registered on the root group by entry point): near-duplicate groups of the
collection, each with the keeper it proposes. It reads only: nothing is deleted or changed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app
from search.errors import ConfigError


@click.command("duplicates")
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity at or above which two images are near-duplicates [default: the one measured "
                   "for the collection's model].")
@click.option("-k", "k", type=click.IntRange(min=1), default=None,
              help="Neighbours asked per image while grouping [default: 10].")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
@click.option("--sheet", "sheet_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write one PNG per group (keeper first) into this folder.")
@pass_app
@handle_errors
def duplicates(app: AppContext, threshold: float | None, k: int | None, as_json: bool, sheet_dir: Path | None) -> None:
    """Find groups of near-duplicates (re-encoded, resized, cropped or lightly edited copies) and propose a
    keeper per group: the most pixels, then the earliest ingested. Nothing is deleted."""
    from tqdm import tqdm

    from ingest.duplicates import DEFAULT_K, describe, find_groups, threshold_for
    from search.store import open_store

    settings = app.settings()
    store = open_store(settings)
    try:
        meta = store.meta()
        if meta is None:
            raise ConfigError(f"collection '{store.collection}' does not exist; run `lookalike backfill` first")
        threshold = threshold_for(meta, threshold)
        total = store.count()
        with tqdm(total=total, unit="img", file=sys.stderr, desc="grouping", dynamic_ncols=True,
                  disable=None) as bar:
            scan = find_groups(store, threshold, k=k or DEFAULT_K, on_batch=bar.update)
        groups = list(describe(store, scan))
    finally:
        store.close()
    if sheet_dir is not None:
        _sheets(groups, sheet_dir, settings)
    spare = sum(len(g.others) for g in groups)
    if as_json:
        echo_json({"threshold": threshold, "model": meta.model, "points": scan.points, "groups": len(groups),
                   "duplicates": spare, "seconds": round(scan.seconds, 3), "results": [g.to_dict() for g in groups]})
        return
    for n, group in enumerate(groups, 1):
        click.echo(f"\ngroup {n}: {1 + len(group.others)} images")
        for role, member in [("keep", group.keeper)] + [("dup", m) for m in group.others]:
            click.echo(f"  {role:<4}  {member.similarity:.4f}  {_size(member.payload):>11}  "
                       f"{member.payload.get('ingested_at') or '-':<24}  {member.id}  {_where(member.payload)}")
    click.echo(f"\n{len(groups)} groups; {spare} images could go (keeping one per group); {scan.points} points "
               f"scanned at threshold {threshold:g} in {scan.seconds:.1f} s")


def _size(payload: dict[str, Any]) -> str:
    return f"{payload.get('width', '?')}x{payload.get('height', '?')}"


def _where(payload: dict[str, Any]) -> str:
    uris = list(payload.get("uris") or [])
    return uris[0] + (f" (+{len(uris) - 1} more)" if len(uris) > 1 else "") if uris else ""


def _sheets(groups: list[Any], folder: Path, settings: Any) -> None:
    from ingest.duplicates import draw_group_sheet
    from search.sheet import local_image

    folder.mkdir(parents=True, exist_ok=True)
    for n, group in enumerate(groups, 1):
        draw_group_sheet(group, folder / f"group-{n:04d}.png",
                         lambda payload: local_image(payload.get("uris") or [], settings))
    click.echo(f"{len(groups)} sheets written to {folder}", err=True)


def register(group: click.Group) -> None:
    group.add_command(duplicates)


__all__ = ["duplicates", "register"]
