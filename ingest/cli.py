"""Getting images in and keeping them in step: ``backfill``, ``tag``, ``reconcile``, ``delete``, ``migrate``
(registered on the root group by entry point)."""

from __future__ import annotations

from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app
from search.errors import ConfigError


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
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="LOOKALIKE_BACKFILL_METRICS_PORT",
              help="Serve Prometheus metrics (stage times, outcomes) on 127.0.0.1:PORT while the run lasts.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_app
@handle_errors
def backfill(app: AppContext, paths: tuple[str, ...], labels_from_dirs: bool, batch_size: int | None, source: str,
             report: Path | None, no_tag: bool, prompts: Path | None, via_workers: bool, chunk_size: int,
             metrics_port: int | None, as_json: bool) -> None:
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
    with Pipeline(settings, source=source, tagger=not no_tag, metrics=_metrics(metrics_port)) as pipeline:
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


def _metrics(port: int | None) -> Any:
    """The run's metrics, served on 127.0.0.1:``port`` (None: not collected)."""
    if port is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    from ingest.metrics import IngestMetrics

    registry = CollectorRegistry(auto_describe=True)
    metrics = IngestMetrics(registry)
    try:
        start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on 127.0.0.1:{port}: {err.strerror or err}; "
                          f"choose another --metrics-port") from None
    click.echo(f"metrics on http://127.0.0.1:{port}/metrics", err=True)
    return metrics


def _fanout() -> Any:
    """The worker fan-out, found by entry point so ingest never imports workers."""
    for ep in entry_points(group="lookalike.fanout"):
        return ep.load()
    raise ConfigError("--via-workers needs the workers component (entry point lookalike.fanout) installed")


@click.command("tag")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Zero-shot prompts file (CLIP models): one label per line, or 'label: prompt text' "
                   "[default: LOOKALIKE_TAG_PROMPTS].")
@click.option("--restart", is_flag=True, help="Forget the checkpoint of an interrupted run and start over.")
@click.option("--all", "include_labelled", is_flag=True, help="Also tag points that carry user labels.")
@click.option("--batch", type=int, default=256, help="Points per batch (one checkpoint per batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@pass_app
@handle_errors
def tag_cmd(app: AppContext, prompts: Path | None, restart: bool, include_labelled: bool, batch: int,
            as_json: bool) -> None:
    """Re-tag stored points from their labelled neighbours (e.g. after new labels arrived). Resumable:
    an interrupted run continues where it stopped (--restart to start over)."""
    from ingest.tagging import Tagger, checkpoint_path, load_prompts, retag
    from search.store import open_store

    settings = app.settings(**({"tag_prompts": prompts} if prompts else {}))
    store = open_store(settings)
    try:
        meta = store.meta()
        if meta is None:
            raise ConfigError(f"collection '{store.collection}' is empty; run `lookalike backfill` first")
        prompt_list = load_prompts(settings.tag_prompts) if settings.tag_prompts else []
        embedder = None
        if prompt_list:  # the model is only needed to embed the prompts
            from search.models import get_embedder

            embedder = get_embedder(meta.model, settings)
        tagger = Tagger(store, embedder, settings, prompts=prompt_list)  # type: ignore[arg-type]
        if checkpoint_path(settings, store.collection).exists() and not restart:
            click.echo("resuming an interrupted tagging run (--restart to start over)", err=True)
        stats = retag(store, tagger, settings, restart=restart, include_labelled=include_labelled, batch=batch,
                      on_batch=lambda s: click.echo(f"tagged {s.tagged + s.untagged} points …", err=True))
    finally:
        store.close()
    if as_json:
        echo_json(stats.to_dict())
    else:
        click.echo(f"{stats.seen} points re-tagged ({stats.tagged} tagged, {stats.untagged} left untagged)"
                   + (f"; {stats.skipped} done by the interrupted run" if stats.resumed else ""))


@click.command()
@click.argument("roots", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--labels-from-dirs", is_flag=True, help="Label new images with their parent folder's name.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
@handle_errors
def reconcile(app: AppContext, roots: tuple[Path, ...], dry_run: bool, labels_from_dirs: bool, as_json: bool) -> None:
    """Bring the index in step with the files under ROOTS: remove uris whose file is gone, follow moves by
    hash (nothing re-embedded), ingest new and changed files. Never writes to the image store; safe to
    interrupt and run again. Uris outside ROOTS are left alone."""
    from ingest.pipeline import Pipeline
    from ingest.reconcile import reconcile as run
    from ingest.sources import ImageRef

    settings = app.settings()
    with Pipeline(settings, source="reconcile") as pipeline:

        def ingest(paths: list[str]) -> dict[str, int]:
            refs = [ImageRef(p, (Path(p).parent.name,) if labels_from_dirs else (), "reconcile") for p in paths]
            stats = pipeline.run(refs, progress=not as_json, total=len(refs))
            return {k: v for k, v in stats.to_dict().items() if k in ("indexed", "present", "updated", "failed")}

        report = run(pipeline.store, roots, settings, dry_run=dry_run, lock=pipeline.content_lock, ingest=ingest,
                     warn=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(report.to_dict())
        return
    verb = "would change" if dry_run else "changed"
    click.echo(f"{report.files} files under {', '.join(report.roots)}, {report.points} points scanned "
               f"({report.hashed} files hashed, {report.unreadable} unreadable) in {report.seconds:.1f} s")
    click.echo(f"{verb}: " + ", ".join(f"{k} {report.counts[k]}" for k in report.counts)
               + f"; points deleted {report.deleted}")
    for kind, items in report.examples.items():
        for item in items[:5]:
            click.echo(f"  {kind:<8} {item.get('from', item.get('uri'))}" + (f" -> {item['to']}" if "to" in item
                                                                             else ""))
    if report.ingested:
        click.echo("ingested: " + ", ".join(f"{k} {v}" for k, v in report.ingested.items()))


@click.command()
@click.option("--id", "ids", multiple=True, help="Delete this point (repeatable).")
@click.option("--uri", "uris", multiple=True, help="Forget this location; a point left without one is deleted.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
@handle_errors
def delete(app: AppContext, ids: tuple[str, ...], uris: tuple[str, ...], as_json: bool) -> None:
    """Remove points by id, or locations by uri, from the index (the files are not touched)."""
    import uuid

    from ingest.pipeline import Pipeline

    if not (ids or uris):
        raise click.UsageError("give --id and/or --uri")
    for value in ids:
        try:
            uuid.UUID(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a point id (a UUID)", param_hint="--id") from None
    with Pipeline(app.settings()) as pipeline:
        done = pipeline.forget(list(uris)) + pipeline.delete_ids(list(ids))
    if as_json:
        echo_json([{"target": r.target, "status": r.status, "ids": r.ids} for r in done])
        return
    for r in done:
        click.echo(f"{r.status:<8} {r.target}" + (f" ({', '.join(r.ids)})" if r.ids and r.ids != [r.target] else ""))


@click.command()
@click.option("--to", "to_model", metavar="MODEL", help="Build this model's collection and move the alias to it.")
@click.option("--gate", "use_gate", is_flag=True,
              help="Compare both collections on the labelled points; refuse to switch when the new one is worse.")
@click.option("--rollback", is_flag=True, help="Move the alias back to the collection it named before.")
@click.option("--abandon", is_flag=True, help="Stop an unfinished migration's dual writes (its collection is kept).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
@handle_errors
def migrate(app: AppContext, to_model: str | None, use_gate: bool, rollback: bool, abandon: bool,
            as_json: bool) -> None:
    """Change the model without downtime: clients query the alias (LOOKALIKE_ALIAS, default `lookalike`);
    the new model's collection is built beside the current one from the stored files (resumable: run it
    again after an interruption), every writer also writes new images there meanwhile, and the alias moves
    atomically at the end. The old collection is kept for --rollback."""
    from ingest import migrate as mig

    settings = app.settings()
    if sum(map(bool, (to_model, rollback, abandon))) != 1:
        raise click.UsageError("give exactly one of --to MODEL, --rollback, --abandon")
    if rollback or abandon:
        state = mig.rollback(settings) if rollback else mig.abandon(settings)
        if as_json:
            echo_json({"alias": settings.alias, "target": state.target, "previous": state.previous})
        else:
            click.echo(f"alias '{settings.alias}' → {state.target}")
        return
    assert to_model is not None
    report_path = settings.data_dir / "reports" / f"migrate-{datetime.now():%Y%m%d-%H%M%S}.tsv"
    try:
        out = mig.migrate(settings, to_model, use_gate=use_gate, progress=not as_json, report=report_path)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: what was copied is kept; run the same command to resume") \
            from None
    for pid, reason in out.failed[:20]:
        click.echo(f"skipping {pid}: {reason}", err=True)
    if as_json:
        echo_json(out.to_dict())
    else:
        click.echo(f"{out.source} → {out.target} ({out.model}): copied {out.copied}, already there {out.skipped}, "
                   f"failed {len(out.failed)} in {out.seconds:.1f} s"
                   + (f"; failures listed in {report_path}" if out.failed else ""))
        if out.gate:
            click.echo(f"gate on {out.gate['queries']:.0f} labelled points: kNN top-1 {out.gate['old']:.2%} "
                       f"(old) vs {out.gate['new']:.2%} (new)")
        click.echo(f"alias '{settings.alias}' → {out.target}" if out.switched
                   else f"not switched: the new model is worse; alias '{settings.alias}' still → {out.source}")
    if not out.switched:
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(backfill)
    group.add_command(reconcile)
    group.add_command(delete)
    group.add_command(migrate)
    group.add_command(tag_cmd)


__all__ = ["backfill", "register", "tag_cmd"]
