"""End to end: the app served on loopback, driven in Debian's chromium by Playwright, and 20 concurrent clients."""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home from a test

from app import callbacks  # noqa: E402
from app.ui import build_demo  # noqa: E402
from tests.app.test_app import FakeExplainer, make_fake_backend  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # 2 shared cores: generous, but bounded
QUERY = "a red church next to a green park"
K = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, callbacks.Engine]]:
    retriever, index = make_fake_backend(tmp_path_factory.mktemp("browser-tiles"))
    demo = build_demo(retriever, index, explainer=FakeExplainer(), concurrency=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", callbacks.make_engine(retriever, index)
    finally:
        demo.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: `make chromium` (apt-get install chromium)")
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1100})
            context.route(
                re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort()
            )  # loopback only
            pg = context.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            pg.dialogs = []  # any alert() would mean script injection
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
            yield pg
        finally:
            browser.close()


def search(page, url: str, query: str, k: int) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    page.fill("#geotext-query textarea", query)
    k_box = page.locator("#geotext-k input[type=number]")
    k_box.fill(str(k))
    k_box.press("Enter")
    page.click("#geotext-search")
    expect(page.locator("#geotext-gallery .thumbnail-item img")).to_have_count(k, timeout=TIMEOUT_MS)


def test_search_shows_thumbnails_markers_and_popup(page, app_url, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    url, engine = app_url
    expected = engine.rank(QUERY, K, None)
    search(page, url, QUERY, K)

    captions = page.locator("#geotext-gallery .caption-label").all_inner_texts()
    assert captions == [callbacks.caption(h) for h in expected]
    # explanations stream in after the ranking; wait for the last of the three reasons
    expect(page.locator("#geotext-explanations")).to_contain_text("#3", timeout=TIMEOUT_MS)
    expect(page.locator("#geotext-explanations")).not_to_contain_text("writing", timeout=TIMEOUT_MS)

    frame = page.frame_locator("#geotext-map iframe")
    expect(frame.locator(".geotext-marker")).to_have_count(K)
    assert sorted(frame.locator(".geotext-rank").all_inner_texts(), key=int) == [
        str(r) for r in range(1, K + 1)
    ]
    # the offline basemap: every gallery tile, each one an image that loaded (by URL, from the app)
    gallery = engine.gallery
    assert gallery is not None and len(gallery.tiles) == gallery.count == 16
    mosaic = frame.locator("img.geotext-mosaic")
    expect(mosaic).to_have_count(gallery.count)
    expect(mosaic.first).to_have_js_property("complete", True)
    widths = mosaic.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert len(widths) == gallery.count and min(widths) > 0, widths

    frame.locator(".geotext-rank", has_text=re.compile(r"^1$")).click()
    popup = frame.locator(".leaflet-popup-content")
    expect(popup).to_contain_text(f"{expected[0].score:.3f}")
    expect(popup).to_contain_text(f"{expected[0].lat:.5f}, {expected[0].lon:.5f}")
    expect(popup).to_contain_text("Why:")
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # selecting a gallery item opens that tile's popup on the map
    page.locator("#geotext-gallery .thumbnail-item").nth(2).click()
    expect(frame.locator(".leaflet-popup-content", has_text=expected[2].tile_id)).to_have_count(1)
    expect(frame.locator(".leaflet-popup")).to_have_count(1)  # the other one has faded out
    focused = frame.locator(".leaflet-popup-content")
    expect(focused).to_contain_text(expected[2].tile_id, timeout=TIMEOUT_MS)
    expect(focused).to_contain_text("#3")


def test_injected_markup_stays_text_in_the_browser(page, app_url) -> None:
    from playwright.sync_api import expect

    url, _ = app_url
    payload = "red <script>alert(1)</script> <img src=x onerror=alert(2)> ${alert(3)}"
    search(page, url, payload, 3)
    frame = page.frame_locator("#geotext-map iframe")
    expect(frame.locator(".geotext-marker")).to_have_count(3)
    frame.locator(".geotext-rank", has_text=re.compile(r"^1$")).click()
    expect(frame.locator(".leaflet-popup-content")).to_contain_text("<script>alert(1)</script>")
    expect(page.locator("#geotext-status")).to_contain_text("<img src=x onerror=alert(2)>")
    assert frame.locator(".leaflet-popup-content img[src='x']").count() == 0
    page.wait_for_timeout(500)
    assert page.dialogs == []


def test_twenty_concurrent_clients_all_succeed(app_url) -> None:
    from gradio_client import Client

    url, _ = app_url
    colours = ["red", "green", "blue", "yellow", "cyan"]

    def one(i: int) -> tuple[str, list]:
        client = Client(url, verbose=False)
        gallery, _map, status, _explanations, _files = client.predict(
            f"a {colours[i % len(colours)]} roof", 3, "", api_name="/search"
        )
        return status, gallery

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20), timeout=300))
    assert len(results) == 20
    for status, gallery in results:
        assert "Top 3 tiles" in status, status
        assert len(gallery) == 3 and all(item["caption"].startswith("#") for item in gallery)


def test_api_answers_a_bad_k_clearly_and_says_where_explanations_are(app_url) -> None:
    from gradio_client import Client

    url, _ = app_url
    client = Client(url, verbose=False)
    gallery, _map, status, _panel, files = client.predict("a red roof", "many", "", api_name="/search")
    assert "K (the number of results) must be a number from 1 to 20" in status and "many" in status
    assert gallery == [] and files in ([], None)
    gallery, _map, status, panel, _files = client.predict("a red roof", 2.5, "", api_name="/search")
    assert len(gallery) == 3 and "Top 3 tiles" in status  # 2.5 rounds half up, as the slider shows it
    assert "/explain" in status and "Explaining" not in status  # nothing is running for an API client
    explained = client.predict("a red roof", 2.5, "", api_name="/explain")
    assert "Why these tiles" in explained and "#3" in explained and "writing" not in explained
