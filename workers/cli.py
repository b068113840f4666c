"""Commands for event-driven ingestion: worker, enqueue, watch, dead-letters, status.

Registered on the root group through the ``lookalike.commands`` entry point (``register``); the
``backfill --via-workers`` fan-out is ``workers.producer.enqueue_refs`` (entry point ``lookalike.fanout``).
Celery, the pipeline and Redis are imported inside the commands, so ``lookalike --help`` stays instant.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from search.cli import AppContext, echo_json, handle_errors, pass_app
from search.errors import CollectionMismatch, ConfigError, LookalikeError, ModelError, StoreLocked
from workers.producer import DEFAULT_CHUNK, enqueue_refs, is_connection_error, unreachable

if TYPE_CHECKING:
    from workers.config import WorkerSettings

log = logging.getLogger("workers.cli")


def _settings(app: AppContext, **more: Any) -> WorkerSettings:
    from workers.config import WorkerSettings

    return app.settings(WorkerSettings, **more)


# ---------------------------------------------------------------------------------------------- worker
@click.command()
@click.option("--queues", "-Q", default="live,backfill", show_default=True,
              help="Queues to consume, in priority order (live, backfill or full names).")
@click.option("--concurrency", "-c", type=int,
              help="Worker processes. Default: 1 with the embedded store (it allows one process), else the cores.")
@click.option("--pool", "-P", type=click.Choice(["prefork", "threads", "solo"]), default="prefork", show_default=True,
              help="prefork isolates crashes and enforces time limits; the store is owned by the single child "
                   "with the embedded store.")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--hostname", "-n", help="Worker name (default: lookalike@<host>).")
@click.option("--allow-any-path", is_flag=True, envvar="LOOKALIKE_ALLOW_ANY_PATH",
              help="Accept events naming any file (no LOOKALIKE_ALLOWED_ROOTS). Only for trusted producers.")
@pass_app
@handle_errors
def worker(app: AppContext, queues: str, concurrency: int | None, pool: str, loglevel: str, hostname: str | None,
           allow_any_path: bool) -> None:
    """Run a Celery worker that ingests events from Redis.

    \b
    Embedded store (default): ONE process owns the store, so the worker runs one
      prefork child (or --pool threads/solo); a second worker on the same data
      dir is refused (StoreLocked). Searches from other processes need a server.
    Qdrant server (LOOKALIKE_QDRANT_URL): prefork workers on many hosts share it;
      `docker compose up --scale worker=N`.
    Events may only name files under LOOKALIKE_ALLOWED_ROOTS (required).
    """
    from workers.app import make_app, preflight
    from workers.events import resolve_queue

    settings = _settings(app, allow_any_path=allow_any_path or None)
    if concurrency is None:
        concurrency = 1 if settings.embedded else (os.cpu_count() or 1)
    if pool == "solo":
        concurrency = 1
    preflight(settings, pool=pool, concurrency=concurrency)
    names = [resolve_queue(q.strip()) for q in queues.split(",") if q.strip()]
    celery_app = make_app(settings)
    argv = ["worker", "-Q", ",".join(names), "-c", str(concurrency), "-P", pool, "-l", loglevel,
            "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["-n", hostname]
    celery_app.worker_main(argv)


# ---------------------------------------------------------------------------------------------- enqueue
@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--queue", "-q", default="live", show_default=True, help="live (uploads) or backfill (bulk, chunked).")
@click.option("--labels-from-dirs", is_flag=True, help="Label each image with its parent folder's name.")
@click.option("--source", help="Recorded in each new point's `source` field.")
@click.option("--chunk-size", default=DEFAULT_CHUNK, show_default=True, help="Events per backfill task.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
@handle_errors
def enqueue(app: AppContext, paths: tuple[str, ...], queue: str, labels_from_dirs: bool, source: str | None,
            chunk_size: int, as_json: bool) -> None:
    """Send ingestion events for images (files, folders, manifests) to the workers."""
    from ingest.sources import iter_refs

    settings = _settings(app)
    refs = list(iter_refs(paths, labels_from_dirs=labels_from_dirs, source=source,
                          on_error=lambda where, why: click.echo(f"skipping {where}: {why}", err=True)))
    tasks = enqueue_refs(refs, settings, queue=queue, chunk_size=chunk_size)
    if as_json:
        echo_json({"events": len(refs), "tasks": tasks, "queue": queue})
    else:
        click.echo(f"queued {len(refs)} events in {tasks} tasks on {queue}")


# ---------------------------------------------------------------------------------------------- watch
@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--interval", default=0.25, show_default=True, help="Seconds between scans.")
@click.option("--existing", is_flag=True, help="Also ingest files already there at start (known content is skipped).")
@click.option("--labels-from-dirs", is_flag=True, help="Label each image with its parent folder's name.")
@click.option("--source", default="watch", show_default=True)
@click.option("--queue", "-q", default="live", show_default=True, help="With a broker: the queue events go to.")
@click.option("--in-process/--via-broker", "in_process", default=None,
              help="Ingest here (default when LOOKALIKE_BROKER_URL is unset) or send events to workers.")
@pass_app
@handle_errors
def watch(app: AppContext, dirs: tuple[Path, ...], interval: float, existing: bool, labels_from_dirs: bool,
          source: str, queue: str, in_process: bool | None) -> None:
    """Turn new image files under DIRS into ingestions, once each file is completely written.

    Without a broker (LOOKALIKE_BROKER_URL unset) the images are ingested in this process: one laptop,
    no server, searchable within a second. With a broker, events go to the workers. A file counts as
    complete when its size and modification time stay the same over one scan (partial names such as
    *.part, *.tmp and dot-files are ignored until renamed).
    """
    from workers.watch import BrokerSink, InProcessSink, Watcher

    settings = _settings(app)
    if in_process is None:
        in_process = not settings.broker_url
    roots = tuple(d.resolve() for d in dirs)
    if in_process:
        if not settings.allowed_roots:
            settings = _settings(app, allowed_roots=roots)  # explicit: the watched folders, nothing else
        sink = InProcessSink(settings, source)
    else:
        sink = BrokerSink(settings, queue, source)
    click.echo(f"watching {', '.join(map(str, roots))} "
               f"({'ingesting in-process' if in_process else 'sending events to ' + queue}); Ctrl-C stops", err=True)
    watcher = Watcher(roots, interval=interval, existing=existing)
    try:
        watcher.run(lambda paths: sink(paths, labels_from_dirs), removed=sink.forget,
                    fatal=(StoreLocked, CollectionMismatch, ModelError, ConfigError) if in_process else ())
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()


# ---------------------------------------------------------------------------------------------- dead letters
def _dead(settings: WorkerSettings) -> Any:
    from workers.deadletters import DeadLetters

    return DeadLetters.from_url(settings.broker)


@click.group("dead-letters")
def dead_letters() -> None:
    """Events that could not be ingested: list, show, replay (after fixing the cause), purge."""


@dead_letters.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
@handle_errors
def dl_list(app: AppContext, limit: int, as_json: bool) -> None:
    """Oldest first."""
    settings = _settings(app)
    try:
        store = _dead(settings)
        entries, total = store.list(limit=limit), store.count()
    except Exception as err:
        if is_connection_error(err):
            raise ConfigError(unreachable(settings, err)) from None
        raise
    if as_json:
        echo_json({"total": total, "entries": [e.to_dict() for e in entries]})
        return
    from workers.deadletters import safe_name

    for e in entries:
        uri = e.event.get("uri") if isinstance(e.event, dict) else repr(e.event)[:60]
        click.echo(f"{e.id}\t{e.to_dict()['at_iso']}\t{e.attempts}\t{safe_name(uri)}\t{safe_name(e.reason)}"
                   + ("\t(truncated)" if e.truncated else ""))
    click.echo(f"{total} dead letters", err=True)


@dead_letters.command("show")
@click.argument("entry_id")
@pass_app
@handle_errors
def dl_show(app: AppContext, entry_id: str) -> None:
    entry = _dead(_settings(app)).get(entry_id)
    if entry is None:
        raise ConfigError(f"no dead letter {entry_id!r} (see `lookalike dead-letters list`)")
    echo_json(entry.to_dict())


@dead_letters.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every entry.")
@pass_app
@handle_errors
def dl_replay(app: AppContext, ids: tuple[str, ...], replay_all: bool) -> None:
    """Send entries' events to the workers again and remove them: to lookalike.live or lookalike.backfill,
    whichever the event came from (never to another queue a producer named)."""
    from workers.app import make_app
    from workers.events import INGEST_TASK

    if not ids and not replay_all:
        raise click.UsageError("name entry ids, or pass --all")
    settings = _settings(app)
    celery_app = make_app(settings)

    def send(event: dict[str, Any], queue: str) -> None:
        celery_app.send_task(INGEST_TASK, args=[event], queue=queue)

    sent, skipped = _dead(settings).replay(send, None if replay_all else ids)
    for id, why in skipped:
        click.echo(f"not replayed {id}: {why}", err=True)
    click.echo(f"replayed {sent} events")


@dead_letters.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Delete every entry.")
@click.option("--yes", is_flag=True, help="Do not ask.")
@pass_app
@handle_errors
def dl_purge(app: AppContext, ids: tuple[str, ...], purge_all: bool, yes: bool) -> None:
    """Delete entries (their events are not ingested)."""
    if not ids and not purge_all:
        raise click.UsageError("name entry ids, or pass --all")
    if purge_all and not yes:
        click.confirm("delete every dead letter?", abort=True)
    removed = _dead(_settings(app)).purge(None if purge_all else ids)
    click.echo(f"purged {removed} dead letters")


# ---------------------------------------------------------------------------------------------- status
def collect_status(settings: WorkerSettings, *, ping_timeout: float = 1.0, ping: bool = True) -> dict[str, Any]:
    """Queue depths and the oldest waiting event's age, workers answering a ping, worker heartbeats, dead
    letters, points in the store, and the last minute's rates and freshness (``workers.metrics``)."""
    from workers.app import make_app
    from workers.config import mask_url
    from workers.metrics import broker_gauges, last_minute

    url = settings.broker
    out: dict[str, Any] = {"broker": mask_url(url), "store": mask_url(settings.qdrant_url) or
                           f"embedded ({settings.data_dir})", "collection": settings.collection_name}
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        out.update(broker_gauges(client))
        out["last_minute"] = last_minute(client)
        if ping:
            replies = make_app(settings).control.ping(timeout=ping_timeout) or []
            out["workers"] = sorted(name for reply in replies for name in reply)
    except Exception as err:
        if not is_connection_error(err):
            raise
        out["broker_error"] = unreachable(settings, err)
    try:
        from search.store import open_store

        store = open_store(settings)
        try:
            out["points"] = store.count() if store.meta() is not None else 0
        finally:
            store.close()
    except StoreLocked as err:
        # Normal while a worker runs (not an error); the message's first clause names the PID holding it.
        # That worker counts the points itself and publishes the count with its metrics.
        counted = out.get("last_minute", {}).get("points", {}).get(settings.collection_name)
        out["points"] = int(counted) if counted is not None else None
        out["store_note"] = f"{str(err).split(';')[0]} (" + (
            "points as the workers last counted them)" if counted is not None else "points not readable from here)")
    except LookalikeError as err:
        out["points"] = None
        out["store_error"] = str(err)
    return out


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@click.option("--prometheus", is_flag=True,
              help="Queue, dead-letter and store gauges in Prometheus text format (for a textfile collector).")
@pass_app
@handle_errors
def status(app: AppContext, as_json: bool, prometheus: bool) -> None:
    """Queue depths, workers seen, dead letters, points in the store, and the last minute's ingest rates and
    freshness (from the counters workers publish to Redis).

    Exits with status 1 (after printing) when the broker cannot be reached or the store reports an error."""
    data = collect_status(_settings(app), ping=not prometheus)
    failed = "broker_error" in data or "store_error" in data
    if prometheus:
        click.echo(_prometheus_text(data), nl=False)
    elif as_json:
        echo_json(data)
    else:
        _print_status(data)
    if failed:
        raise SystemExit(1)


def _prometheus_text(data: dict[str, Any]) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from workers.metrics import gauge_families

    class Snapshot:
        def collect(self) -> Any:
            yield from gauge_families(None if "broker_error" in data else data)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry).decode()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _print_status(data: dict[str, Any]) -> None:
    click.echo(f"broker        {data['broker']}")
    if "broker_error" in data:
        click.echo(f"              {data['broker_error']}")
    else:
        for q, n in data["queues"].items():
            age = data["oldest_age_s"][q]
            click.echo(f"queue         {q}: {n} waiting" + (f", oldest {_ms(age)}" if n and age else ""))
        click.echo(f"in progress   {data['unacked']} (unacknowledged)")
        click.echo(f"dead letters  {data['dead_letters']}")
        click.echo(f"workers       {', '.join(data['workers']) or 'none answered'}")
        click.echo(f"heartbeats    {data['workers_alive']} worker process(es) alive")
        minute = data["last_minute"]
        if not minute["workers_reporting"]:
            click.echo("last minute   no worker has published metrics yet")
        else:
            click.echo(f"last minute   {minute['window_s']:g} s, {minute['workers_reporting']} worker(s) reporting")
            for lane, rates in sorted(minute["rates_per_s"].items()):
                shown = ", ".join(f"{k} {v:.1f}/s" for k, v in sorted(rates.items()) if v)
                fresh = minute["freshness"].get(lane)
                if fresh and fresh["events"]:
                    shown += f"; freshness p50 {_ms(fresh['p50_s'])}, p99 {_ms(fresh['p99_s'])}"
                click.echo(f"  {lane:<11} {shown or 'idle'}")
    click.echo(f"store         {data['store']} / {data['collection']}")
    points, note = data.get("points"), data.get("store_note") or data.get("store_error")
    click.echo(f"points        {note if points is None else f'{points} — {note}' if note else points}")


def register(group: click.Group) -> None:
    for cmd in (worker, enqueue, watch, dead_letters, status):
        group.add_command(cmd)


__all__ = ["collect_status", "register"]
