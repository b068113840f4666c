"""HTTP serving benchmark: `lookalike serve` (real uvicorn, real Lite0) against the in-process Searcher.

    .venv/bin/python benchmarks/bench_serve.py ../shared/data/caltech101-dev [--data DIR] [--queries 200]

1. Backfill the folder into an embedded store under ``--data`` (kept between runs; a re-run is a no-op).
2. In-process baseline, same run: ``Searcher`` on decoded query photos — batched embedding (batch 32) +
   search, queries/s, median of 3 passes; and single-query latency (p50).
3. Start ``lookalike serve`` as its own process and measure over HTTP (httpx, keep-alive):
   by-image queries (multipart upload of the photo bytes) at concurrency 1 and 8 — p50, p99, queries/s;
   by-id queries (JSON) at concurrency 1 — p50, p99; uploads (``POST /v1/images``, wait=true, photos
   re-encoded so their bytes are new) — server-reported and client-measured seconds to searchable;
   RSS of the server idle (model loaded) and at its peak under load (from /proc).
Prints a Markdown table and, with --json, the raw figures. Run it alone: 2 cores are shared by client,
server and model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def backfill(folder: Path, env: dict[str, str]) -> None:
    cmd = [str(REPO / ".venv/bin/lookalike"), "backfill", str(folder), "--labels-from-dirs"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def in_process(data: Path, photos: list[bytes]) -> dict[str, float]:
    from search.config import get_settings
    from search.images import decode
    from search.query import Searcher

    settings = get_settings(data_dir=data)
    with Searcher(settings) as searcher:
        embedder = searcher.embedder
        images = [decode(b, "q", max_pixels=settings.max_pixels, draft=embedder.draft_size).image for b in photos]
        searcher.by_images(images[:32], k=10)  # warm-up
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(0, len(images), 32):
                searcher.by_images(images[i:i + 32], k=10)
            rates.append(len(images) / (time.perf_counter() - t0))
        single = []
        for image in images[:100]:
            t0 = time.perf_counter()
            searcher.by_images([image], k=10)
            single.append(time.perf_counter() - t0)
    return {"batched_qps": statistics.median(rates), "single_p50_ms": statistics.median(single) * 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(REPO / ".venv/bin/lookalike"), "--data-dir", str(data), "serve", "--port",
                                      str(self.port), "--log-level", "warning"], env=env)
        self.peak = 0.0
        self._stop = threading.Event()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("the server did not become ready in 120 s")
        threading.Thread(target=self._watch_rss, daemon=True).start()

    def _watch_rss(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.proc.pid))
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(30)


def run_clients(fn: Any, items: list[Any], concurrency: int) -> tuple[list[float], float]:
    """Latencies of ``fn(client, item)`` over ``items`` from ``concurrency`` threads; and the wall time."""
    clients = [httpx.Client(timeout=60) for _ in range(concurrency)]
    local = threading.local()
    pool = iter(clients)
    lock = threading.Lock()

    def one(item: Any) -> float:
        if not hasattr(local, "client"):
            with lock:
                local.client = next(pool)
        t0 = time.perf_counter()
        fn(local.client, item)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        latencies = list(ex.map(one, items))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return latencies, wall


def search_image(url: str) -> Any:
    def call(client: httpx.Client, data: bytes) -> None:
        r = client.post(f"{url}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")}, params={"k": 10})
        r.raise_for_status()
        assert r.json()[0]["results"], r.text

    return call


def reencoded(data: bytes, seed: int) -> bytes:
    """The same photo with new bytes (one pixel nudged, re-encoded), so the upload is a new point."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 7))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/tmp/lookalike-bench-serve"))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--uploads", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    env = {**os.environ, "LOOKALIKE_DATA_DIR": str(args.data)}
    backfill(args.folder, env)
    rng = random.Random(0)
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = [p.read_bytes() for p in rng.sample(files, args.queries)]
    base = in_process(args.data, photos)

    server = Server(args.data, env)
    out: dict[str, Any] = {"points": httpx.get(f"{server.url}/v1/collections").json()["points"], **base}
    try:
        out["rss_idle_mb"] = rss_mb(server.proc.pid)
        call = search_image(server.url)
        run_clients(call, photos[:16], 1)  # warm-up (allocator, caches)
        for c in (1, 8):
            lat, wall = run_clients(call, photos, c)
            out[f"image_c{c}"] = {"p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
                                  "qps": len(photos) / wall}
        ids = [h["id"] for h in httpx.post(f"{server.url}/v1/search", files={"image": ("q.jpg", photos[0])},
                                            params={"k": 100}).json()[0]["results"]]

        def by_id(client: httpx.Client, pid: str) -> None:
            client.post(f"{server.url}/v1/search", json={"ids": [pid], "k": 10}).raise_for_status()

        lat, _ = run_clients(by_id, ids * 3, 1)
        out["id_c1"] = {"p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000}
        server_s: list[float] = []

        def upload(client: httpx.Client, item: tuple[int, bytes]) -> None:
            r = client.post(f"{server.url}/v1/images", files={"image": (f"u{item[0]}.jpg", item[1])})
            r.raise_for_status()
            assert r.json()["status"] == "indexed", r.text
            server_s.append(r.json()["seconds"])

        salt = int(time.time()) % 10_000 * 1000  # new bytes on every run: a re-run on the same data dir uploads anew
        new = [(i, reencoded(photos[i % len(photos)], salt + i + 1)) for i in range(args.uploads)]
        lat, _ = run_clients(upload, new, 1)
        out["upload"] = {"p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
                         "server_p50_ms": statistics.median(server_s) * 1000}
        out["rss_peak_mb"] = server.peak
    finally:
        server.close()
    ratio = out["image_c8"]["qps"] / out["batched_qps"]
    out["c8_vs_in_process"] = ratio
    if args.json:
        print(json.dumps(out, indent=2))
    rows = [
        ("points", f"{out['points']}", ""),
        ("in-process Searcher, batched (32) image queries/s", f"{out['batched_qps']:.1f}", "baseline"),
        ("in-process single image query p50", f"{out['single_p50_ms']:.1f} ms", ""),
        ("HTTP image query, concurrency 1: p50 / p99", f"{out['image_c1']['p50_ms']:.1f} / "
         f"{out['image_c1']['p99_ms']:.1f} ms", "target p50 ≤ 40 ms"),
        ("HTTP image queries/s, concurrency 1", f"{out['image_c1']['qps']:.1f}", ""),
        ("HTTP image query, concurrency 8: p50 / p99", f"{out['image_c8']['p50_ms']:.1f} / "
         f"{out['image_c8']['p99_ms']:.1f} ms", ""),
        ("HTTP image queries/s, concurrency 8", f"{out['image_c8']['qps']:.1f}",
         f"{ratio:.2f}× in-process batched (target ≥ 0.8)"),
        ("HTTP by-id query p50 / p99", f"{out['id_c1']['p50_ms']:.2f} / {out['id_c1']['p99_ms']:.2f} ms",
         "target p50 ≤ 5 ms"),
        ("upload → searchable p50 (client / server)", f"{out['upload']['p50_ms']:.1f} / "
         f"{out['upload']['server_p50_ms']:.1f} ms", "target p50 ≤ 50 ms"),
        ("RSS idle (Lite0 loaded) / peak under load", f"{out['rss_idle_mb']:.0f} / {out['rss_peak_mb']:.0f} MB", ""),
    ]
    print("| figure | value | note |\n|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
