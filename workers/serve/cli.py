"""``lookalike serve``: run the HTTP API and web page with uvicorn (one process; see ``workers.serve``)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import click

from search.cli import AppContext, handle_errors, pass_app

log = logging.getLogger("workers.serve")


@click.command()
@click.option("--host", envvar="LOOKALIKE_HOST", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs LOOKALIKE_API_KEY (or --allow-public).")
@click.option("--port", envvar="LOOKALIKE_PORT", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--watch", "watch_dirs", multiple=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Also ingest new files appearing under DIR (repeatable).")
@click.option("--allow-public", is_flag=True, envvar="LOOKALIKE_ALLOW_PUBLIC",
              help="Listen beyond loopback without an API key (a trusted network only).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@pass_app
@handle_errors
def serve(app: AppContext, host: str, port: int, watch_dirs: tuple[Path, ...], allow_public: bool,
          log_level: str) -> None:
    """Serve the HTTP API (/v1, OpenAPI at /docs) and the web page at http://HOST:PORT/.

    \b
    Embedded store (default): this process owns the store; uploads and --watch
      folders are ingested here, a second server or a worker gets StoreLocked.
    Qdrant server + broker (LOOKALIKE_QDRANT_URL, LOOKALIKE_BROKER_URL): run any
      number of replicas beside the workers; uploads become live events.
    """
    import uvicorn

    from search.errors import LookalikeError
    from workers.serve.api import create_app
    from workers.serve.service import Service
    from workers.serve.settings import ServeSettings

    settings = app.settings(ServeSettings, host=host, port=port, allow_public=allow_public or None)
    settings.check_bind()
    service = Service(settings)
    web = create_app(settings, service=service, start=False)
    # Load the model and open the store before listening: a store owned by another process or a model that
    # cannot load is a one-line error now, not a server that answers 503 forever.
    click.echo(f"loading {settings.model} …", err=True)
    service.start(wait=True)
    if service.error is not None:
        raise LookalikeError(service.error)
    if watch_dirs:
        _watch(web.state.service, settings, watch_dirs)
    click.echo(f"lookalike serving on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops", err=True)
    uvicorn.run(web, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                timeout_graceful_shutdown=10)


def _watch(service: Any, settings: Any, dirs: tuple[Path, ...]) -> None:
    """Watched folders feed the server's own pipeline (or the workers, when uploads become events)."""
    from workers.watch import BrokerSink, Watcher

    roots = tuple(d.resolve() for d in dirs)
    sink: Any = (BrokerSink(settings, "live", "watch") if settings.publishes_events
                 else lambda paths, labels_from_dirs: _ingest_here(service, paths))
    watcher = Watcher(roots, interval=0.25)
    forget = sink.forget if settings.publishes_events else lambda paths: _forget_here(service, paths)
    thread = threading.Thread(target=watcher.run, args=(lambda paths: sink(paths, False),),
                              kwargs={"removed": forget}, daemon=True, name="lookalike-serve-watch")
    thread.start()


def _ingest_here(service: Any, paths: list[Path]) -> None:
    from workers.watch import refs_for

    for outcome in service.ingest(refs_for(paths, False, "watch")):
        log.info("watch: %s %s (%s)", outcome.status, outcome.uri, outcome.reason or outcome.id)


def _forget_here(service: Any, paths: list[Path]) -> None:
    for removal in service.forget([str(p) for p in paths]):
        log.info("watch: %s %s", removal["status"], removal["target"])


def register(group: click.Group) -> None:
    group.add_command(serve)


__all__ = ["register", "serve"]
