"""End to end on the real offline demo: SmolLM2-based retriever, Helsinki index, in Debian's chromium."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import load_backend, parse_config
from app.ui import build_demo
from tests.app.test_app_browser import TIMEOUT_MS, free_port, page, search  # noqa: F401  (page is a fixture)
from tests.app.test_app_product_browser import PAYLOAD_BUDGET, stream_bytes

pytestmark = [pytest.mark.browser, pytest.mark.demo]
QUERY = "I'm on Aleksanterinkatu outside the Stockmann department store, there's a Zara nearby"
K = 5


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    config = parse_config(["--explain", "off"], environ={})
    backend = load_backend(config)
    assert backend.notice is None, backend.notice  # the bundled demo loads with no flags at all
    demo = build_demo(backend.retriever, backend.index, None, concurrency=1, hybrid_weight=config.hybrid)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_demo_answers_in_the_browser(page, demo_url: str, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect

    search(page, demo_url, QUERY, K)
    captions = page.locator("#geotext-gallery .caption-label").all_inner_texts()
    assert [c.split(" · ")[0] for c in captions] == [f"#{i}" for i in range(1, K + 1)]
    frame = page.frame_locator("#geotext-map iframe")
    expect(frame.locator(".geotext-marker")).to_have_count(K, timeout=TIMEOUT_MS)
    frame.locator(".geotext-rank", has_text=re.compile(r"^1$")).click()
    popup = frame.locator(".leaflet-popup-content")
    expect(popup).to_contain_text(captions[0].split(" · ")[1], timeout=TIMEOUT_MS)  # the score
    expect(popup.locator("a[href*='openstreetmap.org']")).to_have_count(1)
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, Path("/tmp") / "geotext-demo-screenshot.png")  # for a person to look at


def test_demo_first_view_is_the_gallery_and_a_search_costs_little(page, demo_url: str) -> None:  # noqa: F811
    from playwright.sync_api import expect

    page.goto(demo_url)
    frame = page.frame_locator("#geotext-map iframe")
    mosaic = frame.locator("img.geotext-mosaic")
    expect(mosaic).to_have_count(135, timeout=TIMEOUT_MS)  # every gallery tile is the offline basemap
    expect(frame.locator(".geotext-extent-label")).to_contain_text("135 tiles")
    loaded = 0
    for _ in range(60):  # every tile image arrives (by URL, once) and decodes
        loaded = mosaic.evaluate_all("els => els.filter(e => e.complete && e.naturalWidth > 0).length")
        if loaded == 135:
            break
        page.wait_for_timeout(500)
    assert loaded == 135
    page.locator("#geotext-map").screenshot(path="/tmp/geotext-first-view.png")
    search(page, demo_url, QUERY, K)  # the first page load and search
    counted = stream_bytes(page)
    page.fill("#geotext-query textarea", "a tram stop by the railway station square")
    page.click("#geotext-search")
    expect(page.locator("#geotext-status")).to_contain_text("railway station", timeout=TIMEOUT_MS)
    page.locator("#geotext-gallery .thumbnail-item").nth(1).click()  # a focus message, and the heatmap
    expect(page.locator("#geotext-heatmap img")).to_have_count(1, timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    print(f"demo: bytes over the event stream for one search: {counted['bytes']:,}")
    page.locator("#geotext-heatmap").screenshot(path="/tmp/geotext-demo-heatmap.png")
    page.screenshot(path="/tmp/geotext-demo-after-search.png", full_page=True)
    assert 5_000 < counted["bytes"] <= PAYLOAD_BUDGET, counted
