"""`lookalike serve` end to end with the real EfficientNet-Lite0: backfill → serve (a real uvicorn process) →
search by upload → upload a new image → found by search. Photos are scikit-image's bundled samples."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageEnhance

pytestmark = pytest.mark.slow

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick")
CLI = [sys.executable, "-c", "from search.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_backfill_serve_search_upload_search(tmp_path: Path) -> None:
    skdata = pytest.importorskip("skimage.data")
    photos = tmp_path / "photos"
    images = {}
    for name in SAMPLES:
        images[name] = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        (photos / name).mkdir(parents=True)
        images[name].save(photos / name / f"{name}.jpg", quality=92)
    env = {**os.environ, "LOOKALIKE_DATA_DIR": str(tmp_path / "data")}
    subprocess.run([*CLI, "backfill", "--labels-from-dirs", str(photos)], env=env, check=True, timeout=300,
                   capture_output=True)

    port = _free_port()
    server = subprocess.Popen([*CLI, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail(f"serve did not become ready: {server.stderr.read().decode() if server.stderr else ''}")

        # An altered copy of a stored photo finds its original first.
        altered = ImageEnhance.Brightness(images["coffee"].crop((30, 20, 560, 380))).enhance(1.1)
        found = httpx.post(f"{url}/v1/search", files={"image": ("coffee.jpg", _jpeg(altered, 50), "image/jpeg")},
                           params={"k": 3}, timeout=30).json()[0]
        assert found["results"][0]["labels"] == ["coffee"], found

        # A new photo (the rocket, mirrored) uploaded with a label: searchable in the answer, and by search.
        new = _jpeg(images["rocket"].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        added = httpx.post(f"{url}/v1/images", files={"image": ("launch.jpg", new, "image/jpeg")},
                           data={"labels": "launch"}, timeout=60)
        assert added.status_code == 200, added.text
        body = added.json()
        assert body["status"] == "indexed" and body["neighbours"][0]["labels"] == ["rocket"]
        again = httpx.post(f"{url}/v1/search", files={"image": ("q.jpg", new, "image/jpeg")}, params={"k": 1},
                           timeout=30).json()[0]
        assert again["results"][0]["id"] == body["id"] and again["results"][0]["score"] > 0.99
        thumb = httpx.get(f"{url}/v1/points/{body['id']}/thumbnail", params={"size": 128}, timeout=30)
        assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) == 128
        assert httpx.get(f"{url}/v1/collections").json()["points"] == len(SAMPLES) + 1

        # The embedded store has one owner: a second server on the same data dir is refused clearly.
        second = subprocess.run([*CLI, "serve", "--port", str(_free_port())], env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode != 0 and "in use by PID" in second.stderr, second.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(30)
