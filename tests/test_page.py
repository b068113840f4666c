"""The web page of ``lookalike serve`` in a real browser: Debian's chromium driven by Playwright.

The real app (uvicorn on 127.0.0.1, a free port, in a background thread) serves the tiny fake model over the
embedded store, with a few labelled photos already indexed. Images reach the page the ways people give them:
dropped (a ``drop`` event carrying a DataTransfer built in the page from the file's bytes), pasted (a
``paste`` event) and chosen (the file input). Screenshots go to ``$LOOKALIKE_ARTIFACTS`` when set, else under
pytest's tmp dir; never into the repository.

Run with ``pytest -m browser tests/test_page.py``; skipped when chromium or Playwright is missing
(``apt-get install chromium``; Playwright's own browser download is not needed).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.fakes import TinyEmbedder
from workers.serve.api import create_app
from workers.serve.service import Service
from workers.serve.settings import ServeSettings, serve_settings

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
expect = sync_api.expect

CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on PATH (apt-get install chromium, or set LOOKALIKE_CHROMIUM)", allow_module_level=True)
KEY = "page-test-key"
DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
SCORE = re.compile(r"^-?\d\.\d{3}$")
HOSTILE = "<img src=x onerror=window.__pwned=1>"

# name: (top colour, bottom colour, disc colour, labels)
PHOTOS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int], tuple[str, ...]]] = {
    "sunset.jpg": ((250, 120, 40), (120, 30, 80), (255, 220, 90), ("sky", "warm")),
    "dusk.jpg": ((240, 100, 60), (90, 20, 90), (255, 200, 120), ("sky", "warm")),
    "sea.jpg": ((90, 170, 230), (10, 50, 120), (240, 240, 255), ("sea", "blue")),
    "lagoon.jpg": ((110, 200, 220), (20, 90, 140), (250, 250, 230), ("sea",)),
    "forest.jpg": ((120, 180, 90), (20, 70, 30), (60, 40, 20), ("forest", "green")),
    "lemon.jpg": ((250, 240, 200), (230, 220, 160), (250, 220, 20), ("fruit", HOSTILE)),
    "gone.jpg": ((200, 200, 200), (60, 60, 60), (0, 0, 0), ("lost",)),
}
UPLOADED = ("dune.jpg", ((240, 200, 120), (180, 120, 60), (250, 240, 200)), "sand,warm")


def photo(path: Path, top: tuple[int, int, int], bottom: tuple[int, int, int], disc: tuple[int, int, int],
          size: tuple[int, int] = (320, 240)) -> Path:
    """A real JPEG: a vertical gradient with a disc, so thumbnails look like something in the screenshots."""
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / (h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    draw.ellipse([w * 0.55, h * 0.2, w * 0.8, h * 0.2 + w * 0.25], fill=disc)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)
    return path


# ---------------------------------------------------------------------------------------------- the server
@dataclass
class Live:
    url: str
    service: Service
    settings: ServeSettings
    ids: dict[str, str] = field(default_factory=dict)  # photo name -> point id


def _serve(settings: ServeSettings) -> Iterator[tuple[str, Service]]:
    import uvicorn

    service = Service(settings, embedder=TinyEmbedder())
    app = create_app(settings, service=service)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port stays ours: no race between choosing it and binding it
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="page-test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    assert service._ready.wait(20) and service.error is None, service.error
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The app with six readable photos indexed from a folder, one uploaded through the API, and one whose
    file was deleted after indexing (its thumbnail is a 404)."""
    from ingest.sources import ImageRef

    root = tmp_path_factory.mktemp("page")
    settings = serve_settings(data_dir=root / "data", model="tiny")
    for url, service in _serve(settings):
        live = Live(url, service, settings)
        refs = [ImageRef(uri=str(photo(root / "photos" / name, *colours)), labels=labels)
                for name, (*colours, labels) in PHOTOS.items()]
        for ref, outcome in zip(refs, service.ingest(refs), strict=True):
            assert outcome.status == "indexed", outcome
            live.ids[Path(ref.uri).name] = outcome.id
        name, colours, labels = UPLOADED
        data = photo(root / "photos" / name, *colours).read_bytes()
        answer = httpx.post(f"{url}/v1/images", files={"image": (name, data, "image/jpeg")},
                            data={"labels": labels}, timeout=20)
        assert answer.status_code == 200, answer.text
        live.ids[name] = answer.json()["id"]
        (root / "photos" / "gone.jpg").unlink()
        yield live


def _keyed(root: Path, *, protect_reads: bool) -> Iterator[Live]:
    settings = serve_settings(data_dir=root / "data", model="tiny", api_key=KEY, protect_reads=protect_reads)
    for url, service in _serve(settings):
        data = photo(root / "sea.jpg", *PHOTOS["sea.jpg"][:3]).read_bytes()
        answer = httpx.post(f"{url}/v1/images", files={"image": ("sea.jpg", data, "image/jpeg")},
                            data={"labels": "sea"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=20)
        assert answer.status_code == 200, answer.text
        yield Live(url, service, settings, {"sea.jpg": answer.json()["id"]})


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A second app whose writes need the API key (reads stay open), with one labelled photo."""
    yield from _keyed(tmp_path_factory.mktemp("page-keyed"), protect_reads=False)


@pytest.fixture(scope="module")
def keyed_reads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A third app whose reads need the key too (LOOKALIKE_PROTECT_READS): thumbnails included."""
    yield from _keyed(tmp_path_factory.mktemp("page-keyed-reads"), protect_reads=True)


# ---------------------------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert CHROMIUM is not None
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("LOOKALIKE_ARTIFACTS")
    folder = Path(env) / "page" if env else tmp_path_factory.mktemp("page-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Tab:
    """One browser page, with what it did: the requests it made and the script errors it raised."""

    page: Any
    base: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def shot(self, folder: Path, name: str, *, full_page: bool = True) -> Path:
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def check_clean(self) -> None:
        """No script error, nothing fetched from anywhere but this server, nothing injected from a label."""
        assert self.errors == []
        outside = [u for u in self.requests if not u.startswith((self.base, "blob:", "data:"))]
        assert outside == []
        assert self.page.evaluate("() => window.__pwned") is None


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def open_(base: str, viewport: dict[str, int] = DESKTOP, *, ready: bool = True) -> Tab:
        context = browser.new_context(viewport=viewport, device_scale_factor=1)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        tab = Tab(page, base)
        page.on("request", lambda r: tab.requests.append(r.url))
        page.on("pageerror", lambda e: tab.errors.append(str(e)))
        page.add_init_script("""
            window.__shift = 0;
            new PerformanceObserver((list) => {
              for (const e of list.getEntries()) if (!e.hadRecentInput) window.__shift += e.value;
            }).observe({type: "layout-shift", buffered: true});
        """)
        page.goto(base + "/")
        if ready:
            expect(page.locator("#points")).to_be_visible()
        return tab

    yield open_
    for context in contexts:
        context.close()


def _file_in_page(page: Any, path: Path, name: str | None = None, mime: str = "image/jpeg") -> Any:
    """A DataTransfer holding the file's bytes as a File, built inside the page."""
    return page.evaluate_handle(
        """([b64, name, type]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type}));
            return transfer;
        }""", [base64.b64encode(path.read_bytes()).decode(), name or path.name, mime])


def drop(page: Any, path: Path, name: str | None = None, mime: str = "image/jpeg") -> None:
    transfer = _file_in_page(page, path, name, mime)
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#drop")).to_have_class(re.compile(r"\bdragging\b"))
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def paste(page: Any, path: Path) -> None:
    transfer = _file_in_page(page, path, "image.png", "image/png")
    page.evaluate("""(transfer) => document.body.dispatchEvent(
        new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true}))""", transfer)


def wait_results(page: Any) -> str:
    status = page.locator("#status")
    expect(status).to_have_text(re.compile(r"(\d+ results? .*in [\d,]+ ms\.|No similar images|could not be served)"))
    return str(status.text_content())


def wait_thumbnails(page: Any, grid: str = "#grid") -> None:
    """Every card shows its thumbnail (decoded: naturalWidth > 0) or the placeholder; lazy images load once
    scrolled to."""
    cards = page.locator(f"{grid} .card")
    for i in range(cards.count()):
        cards.nth(i).scroll_into_view_if_needed()
    page.wait_for_function(
        """(grid) => [...document.querySelectorAll(grid + " .card .thumb")].every((t) =>
              t.classList.contains("missing") || (t.querySelector("img")?.complete
                                                   && t.querySelector("img").naturalWidth > 0))""", arg=grid)
    page.evaluate("() => window.scrollTo(0, 0)")


def card_data(page: Any, grid: str = "#grid") -> list[dict[str, Any]]:
    return page.evaluate("""(grid) => [...document.querySelectorAll(grid + " .card")].map((c) => ({
        id: c.dataset.id,
        score: c.querySelector(".score").textContent,
        name: c.querySelector(".name").textContent,
        labels: [...c.querySelectorAll(".chip.label")].map((x) => x.textContent),
        tags: [...c.querySelectorAll(".chip.tag")].map((x) => x.textContent),
        width: c.querySelector("img")?.naturalWidth ?? 0,
        lazy: c.querySelector("img")?.loading ?? "lazy",
        missing: c.querySelector(".thumb").classList.contains("missing"),
    }))""", grid)


@pytest.fixture(scope="module")
def queries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Query images that are not in the index."""
    root = tmp_path_factory.mktemp("queries")
    broken = root / "notes.jpg"
    broken.write_text("This is not a picture.\n")
    return {
        "warm": photo(root / "evening.jpg", (245, 115, 50), (110, 25, 85), (255, 215, 100)),
        "sea": photo(root / "bay.jpg", (95, 175, 225), (15, 55, 125), (235, 235, 250)),
        "new": photo(root / "new-meadow.jpg", (170, 220, 120), (60, 120, 40), (250, 250, 250)),
        "paste": photo(root / "clip.png", (100, 190, 225), (15, 80, 130), (245, 245, 235)),
        "broken": broken,
    }


# ---------------------------------------------------------------------------------------------- tests
def test_drop_search_click_and_add_at_desktop_width(live: Live, open_page: Any, queries: dict[str, Path],
                                                    artifacts: Path) -> None:
    tab = open_page(live.url)
    page = tab.page
    expect(page.locator("#server")).to_contain_text("tiny")
    expect(page.locator("#points")).to_have_text("8 images")
    expect(page.locator("#text")).to_be_disabled()
    expect(page.locator("#text-note")).to_contain_text("embeds images only")
    expect(page.locator("#text-note")).to_contain_text("clip-ViT-B-32")
    expect(page.locator("#url")).to_be_disabled()
    expect(page.locator("#url-note")).to_have_text("URL fetching is off on this server (LOOKALIKE_FETCH_URLS).")
    expect(page.locator("#add-button")).to_be_disabled()
    tab.shot(artifacts, "desktop-0-empty")

    # drop a photo: results, best first, with labels, tags, scores and thumbnails
    with page.expect_request(lambda r: "/v1/search" in r.url) as searched:
        drop(page, queries["warm"])
    assert searched.value.method == "POST" and "multipart/form-data" in searched.value.headers["content-type"]
    assert "k=10" in searched.value.url
    assert "8 results in" in wait_results(page)
    expect(page.locator("#query")).to_have_attribute("data-kind", "image")
    expect(page.locator("#query-title")).to_have_text("evening.jpg")
    wait_thumbnails(page)
    cards = card_data(page)
    assert len(cards) == 8
    assert all(SCORE.match(c["score"]) for c in cards), [c["score"] for c in cards]
    scores = [float(c["score"]) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert cards[0]["name"] in {"sunset.jpg", "dusk.jpg"} and "sky" in cards[0]["labels"]
    by_name = {c["name"]: c for c in cards}
    assert by_name["gone.jpg"]["missing"] and by_name["gone.jpg"]["width"] == 0  # the placeholder, not a broken img
    assert all(c["width"] > 0 and c["lazy"] == "lazy" for c in cards if c["name"] != "gone.jpg")
    assert by_name["lemon.jpg"]["labels"] == ["fruit", HOSTILE]  # shown as text, never as markup
    assert any(re.fullmatch(r"\S+ \d\.\d{3}", t) for c in cards for t in c["tags"])  # label + score
    tab.shot(artifacts, "desktop-1-dropped")

    # click a result: it becomes an id query
    target = live.ids["sea.jpg"]
    with page.expect_request(lambda r: "/v1/search" in r.url) as searched:
        page.locator(f'#grid .card[data-id="{target}"]').click()
    assert searched.value.post_data_json == {"ids": [target], "k": 10, "filter": []}
    expect(page.locator("#query")).to_have_attribute("data-kind", "id")
    expect(page.locator("#query")).to_have_attribute("data-id", target)
    expect(page.locator("#query-title")).to_have_text("sea.jpg")
    assert "7 results in" in wait_results(page)
    wait_thumbnails(page)
    cards = card_data(page)
    assert target not in {c["id"] for c in cards} and cards[0]["name"] == "lagoon.jpg"
    tab.shot(artifacts, "desktop-2-by-id")

    # add a new photo to the index: searchable when the answer comes, with its tags and neighbours
    drop(page, queries["new"])
    wait_results(page)
    expect(page.locator("#add-button")).to_be_enabled()
    page.fill("#add-labels", "meadow, fresh")
    with page.expect_request(lambda r: "/v1/images" in r.url) as added:
        page.click("#add-button")
    assert added.value.method == "POST" and "multipart/form-data" in added.value.headers["content-type"]
    msg = page.locator("#added-msg")
    expect(msg).to_have_text(re.compile(r"^Added — searchable in [\d,]+ ms \(server: \d+\.\d{3} s\)\.$"))
    expect(page.locator("#points")).to_have_text("9 images")
    expect(page.locator("#added-grid .card")).to_have_count(8)
    wait_thumbnails(page, "#added-grid")
    assert page.locator("#added-tags .chip.tag").count() > 0
    tab.shot(artifacts, "desktop-3-added")

    # and it is found: the same photo again has itself on top, with the labels just given
    drop(page, queries["new"])
    wait_results(page)
    top = card_data(page)[0]
    assert top["score"] == "1.000" and top["labels"] == ["meadow", "fresh"]
    assert page.evaluate("() => window.__shift") < 0.1  # no layout shift worth the name
    tab.check_clean()


def test_narrow_width_file_picker_paste_filter_and_k(live: Live, open_page: Any, queries: dict[str, Path],
                                                     artifacts: Path) -> None:
    tab = open_page(live.url, NARROW)
    page = tab.page
    assert page.evaluate("() => document.documentElement.scrollWidth") <= NARROW["width"]  # no sideways scroll
    tab.shot(artifacts, "narrow-0-empty")

    page.set_input_files("#file", str(queries["sea"]))
    wait_results(page)
    expect(page.locator("#query-title")).to_have_text("bay.jpg")
    assert card_data(page)[0]["name"] in {"sea.jpg", "lagoon.jpg"}

    with page.expect_request(lambda r: "/v1/search" in r.url) as searched:
        page.select_option("#k", "5")
    assert "k=5" in searched.value.url
    assert "5 results in" in wait_results(page)
    expect(page.locator("#grid .card")).to_have_count(5)

    with page.expect_request(lambda r: "/v1/search" in r.url) as searched:
        page.fill("#label-filter", "warm")
        page.press("#label-filter", "Enter")
    assert "filter=label%3Dwarm" in searched.value.url
    assert "3 results with label warm in" in wait_results(page)
    wait_thumbnails(page)
    cards = card_data(page)
    assert len(cards) == 3 and all("warm" in c["labels"] for c in cards)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= NARROW["width"]
    tab.shot(artifacts, "narrow-1-filtered")

    page.fill("#label-filter", "")
    page.press("#label-filter", "Enter")
    assert "5 results in" in wait_results(page)
    paste(page, queries["paste"])
    expect(page.locator("#query-title")).to_have_text("Pasted image")
    wait_results(page)
    wait_thumbnails(page)
    assert card_data(page)[0]["name"] in {"sea.jpg", "lagoon.jpg"}
    tab.shot(artifacts, "narrow-2-pasted")
    page.emulate_media(color_scheme="dark")
    page.wait_for_timeout(300)  # the colour transitions
    tab.shot(artifacts, "narrow-3-dark", full_page=False)
    tab.check_clean()


def test_errors_read_as_sentences(live: Live, open_page: Any, queries: dict[str, Path], artifacts: Path) -> None:
    tab = open_page(live.url)
    page = tab.page
    drop(page, queries["broken"], mime="image/jpeg")
    status = page.locator("#status")
    expect(status).to_have_text("This query could not be served: not an image (unrecognised format)")
    expect(status).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#grid .card")).to_have_count(0)
    page.click("#add-button")  # a request refused with 422 {"error": ...}
    expect(page.locator("#add-note")).to_have_text("Not added: notes.jpg: not an image (unrecognised format)")
    tab.shot(artifacts, "errors-0-not-an-image")

    # a server that says it offers text and URLs: the boxes open, and the refusals still read as sentences
    def more(route: Any) -> None:
        info = route.fetch().json()
        route.fulfill(json={**info, "supports_text": True, "fetch_urls": True})

    page.route("**/v1/collections", more)
    page.reload()
    expect(page.locator("#text")).to_be_enabled()
    expect(page.locator("#url")).to_be_enabled()
    with page.expect_request(lambda r: "/v1/search" in r.url) as searched:
        page.fill("#text", "a red bicycle")
        page.press("#text", "Enter")
    assert searched.value.post_data_json == {"texts": ["a red bicycle"], "k": 10, "filter": []}
    expect(status).to_have_text("This query could not be served: model 'tiny' embeds images only")
    with page.expect_request(lambda r: "/v1/search" in r.url) as searched:
        page.fill("#url", "https://example.com/cat.jpg")
        page.press("#url", "Enter")
    assert searched.value.post_data_json["urls"] == ["https://example.com/cat.jpg"]
    expect(status).to_have_text("URL queries need URL fetching: set LOOKALIKE_FETCH_URLS=1 on the server")
    assert "{" not in str(status.text_content())
    tab.shot(artifacts, "errors-1-refused")
    tab.check_clean()


def test_an_api_key_is_asked_for_on_401_and_kept_for_the_tab(keyed: Live, open_page: Any,
                                                             queries: dict[str, Path], artifacts: Path) -> None:
    tab = open_page(keyed.url)
    page = tab.page
    drop(page, queries["sea"])
    assert "1 result in" in wait_results(page)  # reads need no key here
    page.click("#add-button")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_have_text("This server needs an API key to add images (LOOKALIKE_API_KEY).")
    tab.shot(artifacts, "key-0-asked", full_page=False)  # the modal's backdrop covers the viewport only
    page.fill("#key", "wrong")
    page.click("#key-save")
    expect(page.locator("#key-reason")).to_contain_text("refused")  # asked again
    page.wait_for_timeout(1500)  # a person typing: not the server's time, so not in "searchable in"
    with page.expect_request(lambda r: "/v1/images" in r.url and r.headers.get("authorization") == f"Bearer {KEY}"):
        page.fill("#key", KEY)
        page.click("#key-save")
    expect(dialog).to_be_hidden()
    expect(page.locator("#added-msg")).to_contain_text("searchable in")
    assert int(str(page.locator("#added-msg").get_attribute("data-ms"))) < 1500
    assert page.evaluate("() => sessionStorage.getItem('lookalike.apiKey')") == KEY
    expect(page.locator("#forget-key")).to_be_visible()

    drop(page, queries["new"])  # the next write sends the kept key without asking
    wait_results(page)
    page.click("#add-button")
    expect(page.locator("#added-msg")).to_have_text(re.compile(r"^Added — searchable in"))
    expect(dialog).to_be_hidden()
    expect(page.locator("#points")).to_have_text("3 images")
    tab.shot(artifacts, "key-1-added")
    tab.check_clean()


def test_with_protected_reads_the_page_asks_first_and_thumbnails_come_with_the_key(
        keyed_reads: Live, open_page: Any, queries: dict[str, Path], artifacts: Path) -> None:
    tab = open_page(keyed_reads.url, ready=False)
    page = tab.page
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_have_text(
        "This server needs an API key to read the index (LOOKALIKE_API_KEY).")
    page.click("#key-cancel")
    expect(page.locator("#server")).to_have_text("This needs an API key; none was given.")
    page.reload()
    page.fill("#key", KEY)
    page.click("#key-save")
    expect(page.locator("#points")).to_have_text("1 image")
    drop(page, queries["sea"])
    assert "1 result in" in wait_results(page)
    wait_thumbnails(page)  # an <img> cannot send the key: the page fetches the thumbnail with it instead
    (card,) = card_data(page)
    assert card["width"] > 0 and not card["missing"] and card["labels"] == ["sea"]
    tab.shot(artifacts, "key-2-protected-reads")
    page.click("#forget-key")
    assert page.evaluate("() => sessionStorage.getItem('lookalike.apiKey')") is None
    page.select_option("#k", "5")  # the rerun asks again
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_have_text("This server needs an API key to search (LOOKALIKE_API_KEY).")
    page.fill("#key", KEY)
    page.click("#key-save")
    assert "1 result in" in wait_results(page)
    tab.check_clean()
