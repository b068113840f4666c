"""The soak test (``tests/test_soak.py``) at a chosen size, its figures as JSON and a Markdown table.

    .venv/bin/python benchmarks/bench_soak.py [--events 10000] [--rate 50] [--seed 1] [--json soak.json]

A thin wrapper: it runs ``pytest tests/test_soak.py -m "slow and redis" -k soak_loses`` with
``LOOKALIKE_SOAK_EVENTS``/``_RATE``/``_SEED`` set (the test starts its own redis-server and ``celery worker``
processes, kills them and restarts Redis; see the test's docstring), then prints the figures the test wrote.
The exit status is pytest's: non-zero when an event was lost or doubled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    ("events sent", "events sent"),
    ("stored (uri in its point)", "stored: uri in the point of its bytes, with its labels"),
    ("indexed, then deleted", "indexed, then removed by an op=delete event"),
    ("deleted (applied)", "op=delete events applied"),
    ("dead-lettered", "dead-lettered with a reason (hostile events)"),
    ("lost", "**lost**"),
    ("doubled", "**doubled**"),
    ("points", "points in the store"),
    ("dead letters", "dead-letter entries"),
    ("re-embedded (bytes indexed twice, no delete between)", "bytes embedded twice (a write lost)"),
    ("send→durable p50 s", "send → durable, p50 (s)"),
    ("send→durable p99 s", "send → durable, p99 (s)"),
    ("send→durable max s", "send → durable, max (s)"),
    ("child kill → Celery noticed, max s", "child SIGKILL → Celery notices, max (s)"),
    ("whole kill → replacement ready s", "whole-worker SIGKILL → replacement ready (s)"),
    ("whole kill → its messages put back s", "whole-worker SIGKILL → its messages put back (s)"),
    ("Redis down s", "Redis down (s)"),
    ("Redis back → worker reconnected s", "Redis back → worker reconnected (s)"),
    ("messages put back by recovery", "messages put back by recovery"),
    ("wall s", "wall time of the test (s)"),
]


def table(figures: dict) -> str:
    flat = {**figures, **figures.get("outcomes", {})}
    chaos = figures.get("chaos", {})
    lines = ["| figure | value |", "| --- | ---: |"]
    lines += [f"| {label} | {flat.get(key)} |" for key, label in ROWS]
    lines.append(f"| chaos | {chaos.get('child N SIGKILLed', 0)} child SIGKILLs, "
                 f"{chaos.get('whole worker SIGKILLed', 0)} whole-worker SIGKILL + replacement, "
                 f"{chaos.get('Redis back', 0)} Redis restart |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=50.0, help="events sent per second")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    report = args.json or Path(tempfile.mkdtemp(prefix="soak-")) / "soak.json"
    env = {**os.environ, "LOOKALIKE_SOAK_EVENTS": str(args.events), "LOOKALIKE_SOAK_RATE": str(args.rate),
           "LOOKALIKE_SOAK_SEED": str(args.seed), "LOOKALIKE_SOAK_REPORT": str(report)}
    cmd = [sys.executable, "-m", "pytest", "tests/test_soak.py", "-m", "slow and redis", "-k", "soak_loses",
           "-p", "no:cacheprovider", "-q", "-s", "-o", "timeout=3600"]
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    print(f"\npytest exit {rc} after {time.time() - t0:.0f} s")
    if report.exists():
        figures = json.loads(report.read_text(encoding="utf-8"))
        print(f"\n{table(figures)}\n")
        if figures.get("problems"):
            print("problems:", *figures["problems"], sep="\n  ")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
