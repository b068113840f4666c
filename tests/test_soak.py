"""Soak: thousands of events through the real queues while the worker is killed and Redis restarts.

One ``celery worker`` (``tests/worker_app.py``: the real app, tasks, pipeline and embedded store; the tiny
thumbnail embedder) ingests events sent the way producers send them — ``lookalike.ingest`` messages on
``lookalike.live`` and ``lookalike.ingest_batch`` chunks on ``lookalike.backfill``, LPUSHed as raw Celery
messages (``celery_message``) or sent by the project's producer (``enqueue_refs``, ``enqueue_removals``).
Mixed in: invalid events, missing files, broken images (``tests/imagefactory.py``), files outside the
allowed root, poison Celery messages of every kind ``workers.guard`` handles, the same bytes under several
paths with different labels, events sent twice, and ``op: delete`` events for files indexed earlier (the file
is removed from disk first, as ``watch`` would see it). Meanwhile a chaos thread SIGKILLs the worker's pool
child at random moments, SIGKILLs the whole worker once (main process and child, like the OOM killer) and
starts a replacement, and restarts Redis once.

Why one worker: the embedded store admits one process (an ``fcntl`` lock), and qdrant-client's local mode is
per process too, so two workers cannot share a store here (there is no Qdrant server binary). One prefork
worker with one child, killed and replaced, is the production embedded setup; the multi-worker takeover is
measured in ``tests/test_workers.py`` with a store per worker.

At the end every event must be exactly one of:

* a point: a good event's uri is in the point of its bytes, with its labels (copies merged: the point holds
  exactly the live uris of those bytes, every label sent with them, and no label nobody sent — a deleted
  copy's labels may stay), no uri or label twice, no uri in two points;
* gone: a deleted uri is in no point (a point whose every uri was deleted is gone);
* a dead letter with a reason, one per hostile event (matched by a token carried in each event).

``lost`` (an event that is none of these) and ``doubled`` (a duplicate point, uri or label, a uri in two
points, two dead letters for one event, an event both stored and dead-lettered, a point nothing asked for)
must both be 0, and nothing may be left queued, held or taken in Redis. The figures are printed (``-s``);
``LOOKALIKE_SOAK_REPORT=path.json`` also writes them (results: ``benchmarks/results/soak.md``).

Scale: ``LOOKALIKE_SOAK_EVENTS`` (default 2000: ~50 s on 2 shared cores), ``LOOKALIKE_SOAK_RATE`` (events sent
per second, default 50), ``LOOKALIKE_SOAK_SEED`` (default 1). ``benchmarks/bench_soak.py`` runs it larger.

The two fast tests at the end pin the bugs the soak found (see their docstrings).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from search.schema import point_id, sha256_hex
from tests import imagefactory
from tests.redis_server import RedisServer
from tests.workerproc import Worker
from workers.deadletters import DeadLetters
from workers.events import (
    BACKFILL_QUEUE,
    INGEST_BATCH_TASK,
    INGEST_TASK,
    LIVE_QUEUE,
    celery_message,
    make_event,
)

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[1]
EVENTS = int(os.environ.get("LOOKALIKE_SOAK_EVENTS") or 2000)
RATE = float(os.environ.get("LOOKALIKE_SOAK_RATE") or 50)
SEED = int(os.environ.get("LOOKALIKE_SOAK_SEED") or 1)
REPORT = os.environ.get("LOOKALIKE_SOAK_REPORT")  # read now: the autouse fixture clears LOOKALIKE_*
LABELS = ("cat", "dog", "bird", "car", "étiquette")
OK = ("indexed", "present", "updated")
TOKEN = re.compile(r"ev\d{6}x")


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Item:
    """One planned event (or, for ``poison``, one raw message carrying one event)."""

    token: str
    kind: str  # good copy resend | invalid missing broken outside poison | delete
    queue: str
    uri: str | None = None
    labels: tuple[str, ...] = ()
    sha: str | None = None
    event: Any = None  # what is sent (the event, or the raw Redis list item for poison)
    reason: str = ""  # a fragment the dead letter's reason must hold (hostile kinds)
    target: Item | None = None  # resend: the event sent again; delete: the upsert whose file goes
    sent: float | None = None

    @property
    def good(self) -> bool:
        return self.kind in ("good", "copy", "resend")

    @property
    def hostile(self) -> bool:
        return self.kind in ("invalid", "missing", "broken", "outside", "poison")


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _poison(kind: str, tok: str, event: dict[str, Any]) -> tuple[Any, str, str]:
    """(raw list item, queue, reason fragment): a message that is not a valid lookalike task."""
    batch = kind.endswith("/batch")
    kind = kind.removesuffix("/batch")
    queue = BACKFILL_QUEUE if batch else LIVE_QUEUE
    task, arg = (INGEST_BATCH_TASK, [event]) if batch else (INGEST_TASK, event)
    msg = json.loads(celery_message(task, [arg], queue))
    msg["headers"]["origin"] = tok
    h = msg["headers"]
    raw: Any = msg
    if kind == "no-id":
        del h["id"]
        why = "header 'id' must be a non-empty string"
    elif kind == "no-task":
        del h["task"]
        why = "header 'task' must be a non-empty string"
    elif kind == "id-int":
        h["id"] = 42
        why = "header 'id' must be a non-empty string"
    elif kind == "headers-list":
        msg["headers"] = [tok, task]
        why = "'headers' must be an object"
    elif kind == "pickle":
        msg.update(body=_b64(b"\x80\x04\x95" + tok.encode()), **{"content-type": "application/x-python-serialize"})
        why = "is refused"
    elif kind == "yaml":
        msg.update(body=_b64(f"- {tok}"), **{"content-type": "application/x-yaml"})
        why = "is refused"
    elif kind == "not-base64":
        msg["body"] = f"%%%{tok}"  # 9 base64 letters: bad padding (a length of 4n would decode to garbage)
        why = "not valid base64"
    elif kind == "body-dict":
        msg["body"] = _b64(json.dumps({"args": [tok]}))
        why = "the body must be [args, kwargs, embed]"
    elif kind == "body-two":
        msg["body"] = _b64(json.dumps([[arg], {}]))
        why = "not list of 2"
    elif kind == "two-args":
        msg["body"] = _b64(json.dumps([[arg, arg], {}, {}]))
        why = "takes one argument"
    elif kind == "unknown-task":
        h["task"] = "lookalike.ingset"
        why = "unknown task"
    elif kind == "not-json":
        raw = b"\xff" + tok.encode() + b" is not JSON"
        why = "not a JSON message"
    elif kind == "no-properties":
        del msg["properties"]
        why = "'properties' must be an object"
    elif kind == "eta-bad":
        h["eta"] = "tomorrow"
        why = "is not an ISO-8601 time"
    elif kind == "eta-far":
        h["eta"] = "2999-01-01T00:00:00+00:00"
        why = "header 'eta' is more than"
    elif kind == "expired":
        h["expires"] = "2000-01-01T00:00:00+00:00"
        why = "expired at"
    elif kind == "timelimit":
        h["timelimit"] = "soon"
        why = "header 'timelimit' must be"
    elif kind == "retries":
        h["retries"] = "3"
        why = "header 'retries' must be"
    elif kind == "chain":
        msg["body"] = _b64(json.dumps([[arg], {}, {"chain": [{"task": INGEST_TASK}]}]))
        why = "chains and chords are not accepted"
    elif kind == "body-not-json":
        msg["body"] = _b64(f"{tok} {{not json")
        why = "cannot decode the message body"
    elif kind == "recovered":
        h["lookalike_recovered"] = 99
        why = "the whole worker died 99 times"
    elif kind == "batch-not-list":  # a batch task whose argument is not a list of events
        msg = json.loads(celery_message(INGEST_BATCH_TASK, [f"{tok} is not a batch"], BACKFILL_QUEUE))
        raw, queue, why = msg, BACKFILL_QUEUE, "batch is not valid JSON"
    else:
        raise ValueError(kind)
    return (raw if isinstance(raw, bytes) else json.dumps(raw)), queue, why


POISON = ("no-id", "no-task", "id-int", "headers-list", "pickle", "yaml", "not-base64", "body-dict", "body-two",
          "two-args", "unknown-task", "not-json", "no-properties", "eta-bad", "eta-far", "expired", "timelimit",
          "retries", "chain", "body-not-json", "recovered", "batch-not-list", "no-id/batch", "body-dict/batch",
          "unknown-task/batch", "chain/batch", "pickle/batch")


def _invalid(kind: str, uri: str, tok: str) -> tuple[Any, str]:
    """(event, reason fragment): an event ``parse_event`` refuses."""
    return {
        "version-2": ({"version": 2, "uri": uri}, "unsupported version 2"),
        "unknown-field": ({"version": 1, "uri": uri, "colour": "red"}, "unknown field 'colour'"),
        "no-version": ({"uri": uri}, "missing 'version'"),
        "relative": ({"version": 1, "uri": f"relative/{tok}.jpg"}, "must be an absolute path"),
        "uri-null": ({"version": 1, "uri": None, "event_id": tok}, "must be a string, not null"),
        "labels-text": ({"version": 1, "uri": uri, "labels": "cat"}, "'labels' must be a list"),
        "many-labels": ({"version": 1, "uri": uri, "labels": [f"l{i}" for i in range(65)]}, "more than 64 labels"),
        "bad-op": ({"version": 1, "uri": uri, "op": "move"}, "'op' must be one of"),
        "broken-json": (f'{{"version": 1, "uri": "{uri}', "not valid JSON"),
        "not-object": ([tok, uri], "expected a JSON object"),
        "sent-at": ({"version": 1, "uri": uri, "sent_at": -5}, "'sent_at' must be UNIX seconds"),
        "nul": ({"version": 1, "uri": uri + "\x00.jpg"}, "NUL"),
        "surrogate": ({"version": 1, "uri": uri, "labels": ["\ud800"]}, "lone surrogate"),
        "url-port": ({"version": 1, "uri": f"http://example.com:99999/{tok}.jpg"}, "is not usable"),
    }[kind]


INVALID = ("version-2", "unknown-field", "no-version", "relative", "uri-null", "labels-text", "many-labels", "bad-op",
           "broken-json", "not-object", "sent-at", "nul", "surrogate", "url-port")
BROKEN = ("truncated_jpeg", "truncated_png", "garbage", "empty", "text_file", "png_bomb", "gif_bomb")


class Plan:
    """The events of one soak, in send order (deletes are sent once the file they remove was indexed)."""

    def __init__(self, root: Path, outside: Path, n: int, rng: random.Random) -> None:
        self.root, self.outside, self.rng = root, outside, rng
        self.items: list[Item] = []
        self._count = 0
        self._run: list[str] = []  # queues of the next events: runs of uploads, then of backfill
        mix = {"delete": 0.02, "poison": 0.02, "invalid": 0.025, "missing": 0.015, "broken": 0.015,
               "outside": 0.005, "copy": 0.05, "resend": 0.01}
        quota = {k: max(len(POISON) if k == "poison" else 4, round(v * n)) for k, v in mix.items()}
        quota["good"] = n - sum(quota.values())
        kinds = [k for k, v in quota.items() if k != "delete" for _ in range(v)]
        rng.shuffle(kinds)
        kinds[:3] = ["good", "good", "good"]  # something to copy and resend from the start
        poison = list(POISON) * (quota["poison"] // len(POISON) + 1)
        goods: list[Item] = []
        for kind in kinds:
            item = self._make(kind, goods, poison)
            self.items.append(item)
            if item.kind == "good":
                goods.append(item)
        # Deletes: of files indexed in the first 70 % (singles and copies), sent after them.
        candidates = [it for it in self.items[: int(0.7 * len(self.items))] if it.kind in ("good", "copy")
                      and it.sha is not None]
        targets = rng.sample(candidates, min(quota["delete"], len(candidates)))
        resent = {it.target.token for it in self.items if it.kind == "resend" and it.target is not None}
        for target in targets:
            if target.token in resent:
                continue  # a resend arriving after the delete would bring the (missing) file back: a dead letter
            self.items.insert(self.items.index(target) + rng.randint(20, 200),
                              Item(self._token(), "delete", rng.choice([LIVE_QUEUE, LIVE_QUEUE, BACKFILL_QUEUE]),
                                   uri=target.uri, target=target))

    def _queue(self) -> str:
        """Uploads come a few at a time (1–12), backfill in longer runs (8–64, sent in chunks of 1–64)."""
        if not self._run:
            self._run = [LIVE_QUEUE] * self.rng.randint(1, 12) + [BACKFILL_QUEUE] * self.rng.randint(8, 64)
        return self._run.pop(0)

    def _token(self) -> str:
        self._count += 1
        return f"ev{self._count:06d}x"

    def _make(self, kind: str, goods: list[Item], poison: list[str]) -> Item:
        rng = self.rng
        tok = self._token()
        queue = self._queue()
        path = self.root / f"d{self._count % 37:02d}" / f"{tok}.jpg"
        labels = tuple(rng.sample(LABELS, rng.choice([0, 0, 1, 1, 2])))
        if kind == "good":
            imagefactory.photo(_parent(path), seed=10_000 + self._count)
        elif kind == "copy":  # the same bytes at another path, with labels of its own
            shutil.copyfile(rng.choice(goods).uri, _parent(path))
        elif kind == "resend":  # a producer sending an event again
            target = rng.choice(goods)
            return Item(target.token, kind, queue, uri=target.uri, labels=target.labels, sha=target.sha,
                        event=target.event, target=target)
        elif kind == "missing":
            return self._hostile(tok, kind, queue, make_event(str(path), event_id=tok), "no such file")
        elif kind == "broken":  # the same broken bytes under several names, too (truncated, empty, bombs)
            getattr(imagefactory, rng.choice(BROKEN))(_parent(path))
            return self._hostile(tok, kind, queue, make_event(str(path), event_id=tok), "")
        elif kind == "outside":
            secret = imagefactory.photo(_parent(self.outside / f"{tok}.jpg"), seed=self._count)
            if rng.random() < 0.5:
                path = _parent(path)
                path.symlink_to(secret)
            else:
                path = self.root / ".." / "outside" / f"{tok}.jpg"
            return self._hostile(tok, kind, queue, {"version": 1, "uri": str(path), "event_id": tok},
                                 "outside the allowed roots")
        elif kind == "invalid":
            event, why = _invalid(rng.choice(INVALID), str(path), tok)
            return self._hostile(tok, kind, queue, event, why)
        elif kind == "poison":
            raw, queue, why = _poison(poison.pop(0), tok, make_event(str(path), event_id=tok))
            return self._hostile(tok, kind, queue, raw, why)
        event = make_event(str(path), labels, event_id=tok)
        return Item(tok, kind, queue, uri=str(path), labels=labels, sha=sha256_hex(path.read_bytes()), event=event)

    @staticmethod
    def _hostile(tok: str, kind: str, queue: str, event: Any, why: str) -> Item:
        uri = event.get("uri") if isinstance(event, dict) and isinstance(event.get("uri"), str) else None
        return Item(tok, kind, queue, uri=uri, event=event, reason=why)


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- observing
class Done:
    """``test:done`` (one record per ingested image, written by the worker's ``Recording``), read
    incrementally: the first successful outcome per uri, and every outcome."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.records: list[dict[str, Any]] = []
        self.first_ok: dict[str, float] = {}
        self._lock = threading.Lock()

    def poll(self) -> None:
        with self._lock:
            try:
                new = self.client.lrange("test:done", len(self.records), -1)
            except Exception:  # Redis is restarting
                return
            for raw in new:
                rec = json.loads(raw)
                self.records.append(rec)
                if rec["status"] in OK:
                    self.first_ok.setdefault(rec["uri"], rec["t"])

    def ok(self, uri: str) -> bool:
        return uri in self.first_ok


def _retry(what: Callable[[], Any], deadline: float = 60) -> Any:
    """Run ``what`` until Redis answers (a producer waits out a broker restart)."""
    end = time.monotonic() + deadline
    while True:
        try:
            return what()
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- the soak
@dataclass
class Soak:
    tmp: Path
    server: RedisServer
    rng: random.Random
    workers: list[Worker] = field(default_factory=list)
    chaos_log: list[tuple[float, str]] = field(default_factory=list)
    messages: int = 0
    producer_calls: int = 0

    def __post_init__(self) -> None:
        import redis

        self.root = self.tmp / "images"
        self.data = self.tmp / "data"
        self.root.mkdir()
        self.client = redis.Redis.from_url(self.server.url, socket_timeout=5)
        self.done = Done(self.client)
        self._app: Any = None
        self.unsent: list[Item] = []

    # -- processes
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
        env.update({
            "LOOKALIKE_BROKER_URL": self.server.url, "LOOKALIKE_DATA_DIR": str(self.data),
            "LOOKALIKE_ALLOWED_ROOTS": str(self.root), "LOOKALIKE_MODEL": "tiny",
            "LOOKALIKE_TASK_SOFT_TIME_LIMIT": "60", "LOOKALIKE_TASK_TIME_LIMIT": "90",
            "LOOKALIKE_RETRY_BACKOFF_MAX": "2", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "LOOKALIKE_METRICS_PORT": "0",
        })
        return env

    def start_worker(self) -> float:
        worker = Worker(self.env(), self.tmp / f"worker{len(self.workers)}.log", prefix="soak")
        self.workers.append(worker)
        worker.wait_ready()
        assert worker.ready_at is not None
        return worker.ready_at

    @property
    def worker(self) -> Worker:
        return self.workers[-1]

    def settings(self) -> Any:
        from workers.config import worker_settings

        return worker_settings(broker_url=self.server.url, allowed_roots=(self.root,), model="tiny",
                               data_dir=self.data)

    @property
    def app(self) -> Any:
        if self._app is None:
            from workers.app import make_app

            self._app = make_app(self.settings())
        return self._app

    # -- sending
    def send(self, batch: list[Item], queue: str) -> None:
        now = time.time()
        for it in batch:
            it.sent = now
        if len(batch) == 1 and batch[0].kind == "poison":
            _retry(lambda: self.client.lpush(queue, batch[0].event))
        elif all(it.kind == "delete" for it in batch) and queue == LIVE_QUEUE:
            from workers.producer import enqueue_removals

            _retry(lambda: enqueue_removals([it.uri for it in batch], self.settings(), app=self.app))
            self.producer_calls += 1
        elif queue == BACKFILL_QUEUE and self.rng.random() < 0.3 and all(it.kind in ("good", "copy") for it in batch):
            # (Good events only: a send retried across the Redis restart may go twice, under a new task id.)
            from ingest.sources import ImageRef
            from workers.producer import enqueue_refs

            refs = [ImageRef(str(it.uri), it.labels) for it in batch]
            _retry(lambda: enqueue_refs(refs, self.settings(), queue="backfill", chunk_size=len(refs), app=self.app))
            self.producer_calls += 1
        else:
            events = [self._event(it, now) for it in batch]
            if queue == LIVE_QUEUE:
                message = celery_message(INGEST_TASK, events, queue)
            else:
                message = celery_message(INGEST_BATCH_TASK, [events], queue)
            _retry(lambda: self.client.lpush(queue, message))
        self.messages += 1

    @staticmethod
    def _event(it: Item, now: float) -> Any:
        if it.kind == "delete":
            return make_event(str(it.uri), event_id=it.token, sent_at=now, op="delete")
        if it.good:
            return {**it.event, "sent_at": now}
        return it.event

    def produce(self, plan: Plan, rate: float) -> None:
        """Send the plan at ``rate`` events/s: live events one per message, backfill ones in chunks of 1–64;
        a delete waits until the file it removes was indexed, then the file goes and the delete is sent."""
        start = time.monotonic()
        sent = 0
        pending = list(plan.items)
        deferred: list[Item] = []
        while pending or deferred:
            self.done.poll()
            ready = [d for d in deferred if d.target is not None and self.done.ok(str(d.target.uri))]
            for d in ready:
                deferred.remove(d)
                Path(str(d.uri)).unlink(missing_ok=True)
            for i in range(0, len(ready), 3):
                group = ready[i:i + 3]
                queue = group[0].queue
                self.send(group, queue)
                sent += len(group)
            if not pending:
                if deferred and time.monotonic() - start > len(plan.items) / rate + 60:
                    break  # their files were never indexed: not sent (reported)
                time.sleep(0.05)
                continue
            head = pending[0]
            if head.kind == "delete":
                deferred.append(pending.pop(0))
                continue
            if head.queue == LIVE_QUEUE or head.kind == "poison":
                batch = [pending.pop(0)]
            else:
                size = self.rng.randint(1, 64)
                batch = []
                while pending and len(batch) < size and pending[0].queue == BACKFILL_QUEUE and pending[0].kind not in (
                        "poison", "delete"):
                    batch.append(pending.pop(0))
                if not batch:
                    batch = [pending.pop(0)]
            self.send(batch, batch[0].queue)
            sent += len(batch)
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        self.unsent = deferred

    # -- chaos
    def chaos(self, window: float, stop: threading.Event) -> None:
        """Child kills every 2–6 s; one whole-worker kill (and a replacement) and one Redis restart.

        Celery sometimes notices a killed child only at its next pool check (up to ~5 s), so kills every
        second or two would leave the worker mostly stalled: that is measured, not hidden, by ``send→durable``."""
        start = time.monotonic()
        whole_at = start + window * self.rng.uniform(0.25, 0.45)
        redis_at = start + window * self.rng.uniform(0.6, 0.8)
        next_child = start + self.rng.uniform(2, 6)
        while not stop.is_set() and time.monotonic() < start + window:
            now = time.monotonic()
            if whole_at and now >= whole_at:
                whole_at = 0
                self.worker.kill_all()
                self._note("whole worker SIGKILLed")
                self.start_worker()
                self._note("replacement ready")
            elif redis_at and now >= redis_at:
                redis_at = 0
                self._note("Redis stopping")
                self.server.restart(down_for=1.0)
                self._note("Redis back")
            elif now >= next_child:
                next_child = now + self.rng.uniform(2, 6)
                pid = self.worker.child()
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self._note(f"child {pid} SIGKILLed")
                    except ProcessLookupError:
                        pass
            stop.wait(0.05)

    def _note(self, what: str) -> None:
        self.chaos_log.append((time.time(), what))

    def settled(self, plan: Plan) -> bool:
        """Every event sent has an outcome (a successful ingestion or a dead letter), nothing is left."""
        self.done.poll()
        try:
            letters = DeadLetters(self.client).list(limit=None)
        except Exception:
            return False
        tokens = {t for e in letters for t in TOKEN.findall(json.dumps(e.event, ensure_ascii=False))}
        for it in plan.items:
            if it.sent is None or it.kind == "delete" or it.token in tokens:
                continue
            if it.hostile or not self.done.ok(str(it.uri)):
                return False
        return self.quiet()

    def leftovers(self) -> list[str]:
        """Anything still queued, held or taken once the worker stopped."""
        from workers.recovery import HOLDERS_KEY, INFLIGHT_KEY

        found = {key: self.client.llen(key) for key in (LIVE_QUEUE, BACKFILL_QUEUE)}
        found.update({key: self.client.hlen(key) for key in ("unacked", HOLDERS_KEY, INFLIGHT_KEY)})
        found.update({key.decode(): self.client.llen(key) for key in self.client.scan_iter(f"{INFLIGHT_KEY}:*")})
        return [f"left in Redis: {key} ({n})" for key, n in found.items() if n]

    def quiet(self) -> bool:
        """Nothing queued, held or waiting for a retry (checked twice, a second apart)."""
        def idle() -> bool:
            try:
                return not (self.client.llen(LIVE_QUEUE) or self.client.llen(BACKFILL_QUEUE)
                            or self.client.hlen("unacked") or self.client.hlen("lookalike:holders"))
            except Exception:
                return False

        if not idle():
            return False
        time.sleep(1.0)
        return idle()


# ---------------------------------------------------------------------------------------------- the check
def account(plan: Plan, points: list[Any], letters: list[Any], done: Done, unsent: list[Item]) -> dict[str, Any]:
    """Classify every event (see the module docstring); returns the figures and the problems found."""
    problems: list[str] = []
    by_token: dict[str, list[Any]] = defaultdict(list)
    unexplained = []
    for entry in letters:
        tokens = set(TOKEN.findall(json.dumps(entry.event, ensure_ascii=False)))
        if len(tokens) != 1:
            unexplained.append(entry)
        for tok in tokens:
            by_token[tok].append(entry)
    holders: dict[str, list[str]] = defaultdict(list)  # uri → point ids
    point_by_id = {p.id: p for p in points}
    doubled = Counter()
    if len(point_by_id) != len(points):
        doubled["duplicate point ids"] += len(points) - len(point_by_id)
    for p in points:
        uris, labels = p.payload.get("uris") or [], p.payload.get("labels") or []
        if len(set(uris)) != len(uris):
            doubled["uri twice in a point"] += 1
            problems.append(f"point {p.id} uris {uris}")
        if len(set(labels)) != len(labels):
            doubled["label twice in a point"] += 1
            problems.append(f"point {p.id} labels {labels}")
        for u in uris:
            holders[u].append(p.id)
    for u, ids in holders.items():
        if len(ids) > 1:
            doubled["uri in two points"] += 1
            problems.append(f"{u} in points {ids}")

    deleted = {it.uri for it in plan.items if it.kind == "delete" and it.sent is not None}
    sent = [it for it in plan.items if it.sent is not None]
    expected: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"uris": set(), "labels": set(), "all": set()})
    outcome = Counter()
    lost: list[str] = []
    delays: list[float] = []
    for it in sent:
        entries = by_token.get(it.token, [])
        if it.kind == "delete":
            if holders.get(str(it.uri)):
                lost.append(f"{it.token} delete of {it.uri} not applied: still in {holders[str(it.uri)]}")
            else:
                outcome["deleted"] += 1
            continue
        if it.good:
            pid = point_id(str(it.sha))
            expected[pid]["all"] |= set(it.labels)
            if it.uri in deleted:
                if holders.get(str(it.uri)):
                    lost.append(f"{it.token} {it.uri} was deleted but is in {holders[str(it.uri)]}")
                else:
                    outcome["indexed, then deleted"] += 1
                # A redelivery after the delete (its child was killed before the ack) finds the file gone.
                late = [e for e in entries if "no such file" in e.reason]
                outcome["deleted file's late redelivery dead-lettered"] += bool(late)
                if len(late) != len(entries) or len(late) > 1:
                    problems.append(f"{it.token} deleted {it.uri}: dead letters {[e.reason for e in entries]}")
                continue
            expected[pid]["uris"].add(str(it.uri))
            expected[pid]["labels"] |= set(it.labels)
            stored = pid in holders.get(str(it.uri), [])
            if stored and entries:
                doubled["stored and dead-lettered"] += 1
                problems.append(f"{it.token} {it.uri} stored and dead-lettered: {entries[0].reason}")
            elif stored:
                outcome["indexed"] += 1
                if str(it.uri) in done.first_ok and it.kind != "resend":
                    delays.append(done.first_ok[str(it.uri)] - float(it.sent))
            elif entries:
                outcome["dead-lettered (good event)"] += 1
                problems.append(f"{it.token} {it.uri} dead-lettered: {entries[0].reason}")
            else:
                lost.append(f"{it.token} {it.kind} {it.uri} is in no point and no dead letter")
            continue
        # hostile
        if it.uri is not None and holders.get(it.uri):
            doubled["hostile event stored"] += 1
            problems.append(f"{it.token} {it.kind} {it.uri} stored in {holders[it.uri]}")
        if not entries:
            lost.append(f"{it.token} {it.kind} {str(it.event)[:120]!r}: no dead letter")
            continue
        outcome["dead-lettered"] += 1
        if len(entries) > 1:
            doubled["two dead letters for one event"] += 1
            problems.append(f"{it.token} {it.kind}: {len(entries)} dead letters: {[e.reason for e in entries]}")
        if it.reason and not any(it.reason in e.reason for e in entries):
            problems.append(f"{it.token} {it.kind}: reason {entries[0].reason!r} lacks {it.reason!r}")
    for pid, want in expected.items():
        p = point_by_id.get(pid)
        if not want["uris"]:
            if p is not None:
                doubled["point nothing asked for"] += 1
                problems.append(f"point {pid} should be gone (every uri deleted): {p.payload.get('uris')}")
            continue
        if p is None:
            continue  # each of its events was counted lost above
        uris, labels = set(p.payload.get("uris") or []), set(p.payload.get("labels") or [])
        if uris != want["uris"]:
            problems.append(f"point {pid} uris {sorted(uris)} != {sorted(want['uris'])}")
            doubled["point with extra uris"] += bool(uris - want["uris"])
        if not want["labels"] <= labels <= want["all"]:
            problems.append(f"point {pid} labels {sorted(labels)}, want {sorted(want['labels'])} to "
                            f"{sorted(want['all'])}")
            lost += [f"point {pid} lacks labels {sorted(want['labels'] - labels)}"] if want["labels"] - labels else []
            doubled["point with labels nobody sent"] += bool(labels - want["all"])
    strays = set(point_by_id) - set(expected)
    if strays:
        doubled["point nothing asked for"] += len(strays)
        problems.append(f"points nothing asked for: {sorted(strays)[:5]}")
    if unexplained:
        problems.append(f"{len(unexplained)} dead letters match no one event: {[e.reason for e in unexplained[:3]]}")
    # Bytes embedded twice: their first write was lost, unless every uri went (delete) and a copy came later.
    emptied = {point_id(str(it.sha)) for it in sent if it.good and it.uri in deleted}
    indexed_twice = Counter(r["id"] for r in done.records if r["status"] == "indexed" and r["id"] not in emptied)
    delays.sort()
    return {
        "events sent": len(sent),
        "events planned but not sent": len(unsent),
        "outcomes": dict(outcome),
        "stored (uri in its point)": outcome["indexed"],
        "dead-lettered": outcome["dead-lettered"] + outcome["dead-lettered (good event)"],
        "deleted (applied)": outcome["deleted"],
        "lost": len(lost),
        "doubled": sum(doubled.values()),
        "doubled by kind": dict(doubled),
        "points": len(points),
        "dead letters": len(letters),
        "unexplained dead letters": len(unexplained),
        "re-embedded (bytes indexed twice, no delete between)": sum(1 for n in indexed_twice.values() if n > 1),
        "send→durable max s": round(delays[-1], 3) if delays else None,
        "send→durable p99 s": round(delays[int(0.99 * (len(delays) - 1))], 3) if delays else None,
        "send→durable p50 s": round(statistics.median(delays), 3) if delays else None,
        "events durable after more than 5 s": sum(d > 5 for d in delays),
        "lost detail": lost[:20],
        "problems": problems[:40],
    }


def _log_times(text: str, pattern: str) -> list[tuple[float, re.Match[str]]]:
    """(UNIX time, match) of the worker log lines matching ``pattern``."""
    from datetime import datetime

    out = []
    for m in re.finditer(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] " + pattern, text, re.M):
        out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m))
    return out


def timeline(chaos: list[tuple[float, str]], logs: list[str]) -> dict[str, Any]:
    """How long each disruption took to be absorbed, from the chaos log and the worker logs."""
    text = "\n".join(logs)
    noticed = {m["pid"]: t for t, m in _log_times(text, r"Process '.*?' pid:(?P<pid>\d+) exited with 'signal 9")}
    kills = [(t, what.split()[1]) for t, what in chaos if what.startswith("child ")]
    lags = [noticed[pid] - t for t, pid in kills if pid in noticed]
    out: dict[str, Any] = {"child kill → Celery noticed, p50 s": round(statistics.median(lags), 2) if lags else None,
                           "child kill → Celery noticed, max s": round(max(lags), 2) if lags else None}
    when = {what: t for t, what in chaos if not what.startswith("child ")}
    if "whole worker SIGKILLed" in when and "replacement ready" in when:
        killed = when["whole worker SIGKILLed"]
        out["whole kill → replacement ready s"] = round(when["replacement ready"] - killed, 2)
        back = [t for t, _ in _log_times(text, r"dead worker ") if t >= killed]
        out["whole kill → its messages put back s"] = round(min(back) - killed, 2) if back else None
    if "Redis stopping" in when and "Redis back" in when:
        out["Redis down s"] = round(when["Redis back"] - when["Redis stopping"], 2)
        again = [t for t, _ in _log_times(text, r"Connected to ") if t >= when["Redis back"]]
        out["Redis back → worker reconnected s"] = round(min(again) - when["Redis back"], 2) if again else None
    return out


# ---------------------------------------------------------------------------------------------- the test
@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.slow
def test_soak_loses_and_doubles_nothing(tmp_path: Path, redis_server: RedisServer) -> None:
    t_start = time.time()
    rng = random.Random(SEED)
    soak = Soak(tmp_path, redis_server, rng)
    plan = Plan(soak.root, tmp_path / "outside", EVENTS, rng)
    t_plan = time.time() - t_start
    window = len(plan.items) / RATE
    try:
        soak.start_worker()
        stop = threading.Event()
        chaos = threading.Thread(target=soak.chaos, args=(window, stop), daemon=True)
        chaos.start()
        soak.produce(plan, RATE)
        t_sent = time.time()
        chaos.join(window + 120)
        stop.set()
        # Settle: nothing queued or held, and every event sent has an outcome.
        settle_by = time.monotonic() + max(60, window)
        settled = False
        while time.monotonic() < settle_by and not (settled := soak.settled(plan)):
            time.sleep(0.25)
        t_settled = time.time()
        time.sleep(0.5)
        soak.worker.stop()
        soak.done.poll()
        letters = DeadLetters(soak.client).list(limit=None)
        leftovers = soak.leftovers()
        from search.store import open_store

        store = open_store(soak.settings())
        try:
            points = list(store.scroll())
        finally:
            store.close()
    finally:
        for w in soak.workers:
            w.stop()
    logs = "".join(w.text() for w in soak.workers)
    figures = account(plan, points, letters, soak.done, soak.unsent)
    figures["problems"] += leftovers
    chaos_events = Counter(re.sub(r"\d+", "N", what) for _, what in soak.chaos_log)
    figures.update(timeline(soak.chaos_log, [w.text() for w in soak.workers]))
    figures.update({
        "events (LOOKALIKE_SOAK_EVENTS)": EVENTS, "rate events/s": RATE, "seed": SEED,
        "messages": soak.messages, "producer calls (enqueue_refs/enqueue_removals)": soak.producer_calls,
        "chaos": dict(chaos_events),
        "messages put back by recovery": logs.count(" put back on ") + sum(
            int(n) for n in re.findall(r"had taken (\d+) message", logs)),
        "pool children lost (Celery saw signal 9)": len(re.findall(r"exited with 'signal 9", logs)),
        "wall s": round(time.time() - t_start, 1),
        "image files s": round(t_plan, 1),
        "send window s": round(t_sent - t_start - t_plan, 1),
        "settle after last send s": round(t_settled - t_sent, 1),
        "settled": settled,
    })
    text = json.dumps(figures, indent=2, ensure_ascii=False)
    print("\nsoak figures:\n" + text)
    (tmp_path / "figures.json").write_text(text, encoding="utf-8")
    if REPORT:
        Path(REPORT).write_text(text + "\n", encoding="utf-8")
    assert "RestartFreqExceeded" not in logs
    tail = "\n".join(w.text()[-3000:] for w in soak.workers)
    assert figures["lost"] == 0, (figures["lost detail"], tail)
    assert figures["doubled"] == 0, figures["problems"]
    assert figures["unexplained dead letters"] == 0, figures["problems"]
    assert not figures["problems"], figures["problems"]
    assert chaos_events["whole worker SIGKILLed"] == 1 and chaos_events["Redis back"] == 1
    assert chaos_events["child N SIGKILLed"] >= 3


# ---------------------------------------------------------------------------------------------- what it found
_TAKER = r"""
import sys, time
from kombu import Connection, Queue
from workers import recovery
from workers.events import LIVE_QUEUE
from workers.transport import GuardedTransport

recovery.start(sys.argv[1], ttl=1.0, name="victim")
with Connection(sys.argv[1], transport=GuardedTransport) as conn:
    with conn.Consumer(Queue(LIVE_QUEUE, routing_key=LIVE_QUEUE), callbacks=[lambda body, m: None], accept=["json"]):
        conn.transport.cycle.on_poll_start()  # what the event loop does: ask Redis for the next message
        print("taking", flush=True)
        time.sleep(60)  # SIGKILLed before the reply is read
"""


def test_a_message_taken_by_a_worker_killed_before_it_read_it_comes_back(redis_server: RedisServer) -> None:
    """Found by the soak: a chunk of 6 events was lost when the whole worker was SIGKILLed just after it asked
    Redis for its next message. kombu's BRPOP had removed the message from the queue, and the worker died before
    reading the reply and writing its ``unacked`` entry: nothing could restore it. The message is now moved to
    the consumer's in-flight list in Redis, and a live worker puts it back when the taker's heartbeat is gone."""
    from workers.recovery import HOLDERS_KEY, INFLIGHT_KEY, Monitor

    client = redis_server.client()
    client.flushall()
    message = celery_message(INGEST_TASK, [make_event("/images/a.jpg")], LIVE_QUEUE)
    client.lpush(LIVE_QUEUE, message)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _TAKER, redis_server.url], cwd=REPO, env=env,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"taking\n"
        deadline = time.monotonic() + 10
        while client.llen(LIVE_QUEUE) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.llen(LIVE_QUEUE) == 0  # Redis handed it over
    finally:
        proc.kill()
        proc.wait(10)
    assert client.hlen("unacked") == 0 and client.hlen(HOLDERS_KEY) == 0  # never recorded as held...
    lists = [k for k in client.hgetall(INFLIGHT_KEY)]
    assert [client.lrange(k, 0, -1) for k in lists if client.llen(k)] == [[message.encode()]]  # ...but kept

    other = Monitor(client, ttl=1.0, name="other")  # a live worker's scan
    other.beat()
    deadline = time.monotonic() + 10
    while not client.llen(LIVE_QUEUE) and time.monotonic() < deadline:
        other.scan()
        time.sleep(0.1)
    assert client.lrange(LIVE_QUEUE, 0, -1) == [message.encode()]  # back at the head of its queue, once
    assert client.hlen(INFLIGHT_KEY) == 0 and not any(client.llen(k) for k in lists)


def test_a_chunk_that_comes_back_dead_letters_each_bad_event_once(tmp_path: Path, redis_server: RedisServer) -> None:
    """Found by the soak: a chunk whose child was SIGKILLed comes back with ``retries`` + 1
    (retry_on_worker_lost), and the dead letters written by the first attempt were written again under new ids
    (the attempt was part of the id): two dead letters for one invalid event. Likewise when a chunk had handed
    the rest of its events back to the queue (uploads waiting) and was then killed before its ack: the rest
    ran twice, as the new task and in the retried chunk. Both now write one entry per event."""
    from workers.tasks import CHUNK_HEADER

    soak = Soak(tmp_path, redis_server, random.Random(0))
    good = imagefactory.photo(_parent(soak.root / "good.jpg"), seed=1)
    bad = {"version": 2, "uri": str(soak.root / "bad.jpg")}
    missing = make_event(str(soak.root / "missing.jpg"))
    env = {**soak.env(), "LOOKALIKE_TEST_TASK_DELAY": "1.5"}  # each ingest call sleeps first: a child to kill
    worker = Worker(env, tmp_path / "worker.log")
    soak.workers.append(worker)
    deadline = time.monotonic() + 40
    try:
        worker.wait_ready()
        soak.client.lpush(BACKFILL_QUEUE, celery_message(INGEST_BATCH_TASK, [[bad, missing, make_event(str(good))]],
                                                         BACKFILL_QUEUE, task_id="chunk-1"))
        while not soak.client.llen("test:started") and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(json.loads(soak.client.lindex("test:started", 0))["pid"], signal.SIGKILL)  # bad one is in
        while soak.client.llen("test:done") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The rest of chunk-1 as its hand-back would send it: a new task naming the chunk.
        rest = json.loads(celery_message(INGEST_BATCH_TASK, [[missing]], BACKFILL_QUEUE, task_id="rest-of-1"))
        rest["headers"][CHUNK_HEADER] = "chunk-1"
        soak.client.lpush(BACKFILL_QUEUE, json.dumps(rest))
        while soak.client.llen("test:done") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        while not soak.quiet() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
    assert soak.client.llen("test:started") == 3  # killed once, retried once, then the rest
    letters = DeadLetters(soak.client).list(limit=None)
    assert sorted(e.reason.split(" (")[0] for e in letters) == ["no such file", "unsupported version 2"], letters
    assert [e.attempts for e in letters if "version" in e.reason] == [2]  # the entry of the retry, once
