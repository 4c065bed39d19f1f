"""End to end on the real offline demo: SmolLM2-based retriever, Helsinki index, in Debian's chromium."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

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


# The map in its own (container) pixels: its size and zoom, the popup's box, the box the mosaic covers.
MAP_VIEW_JS = """() => {
  const c = document.querySelector('.leaflet-container'), o = c.getBoundingClientRect();
  const box = r => [r.left - o.left, r.top - o.top, r.right - o.left, r.bottom - o.top];
  const popup = document.querySelector('.leaflet-popup');
  const tiles = [...document.querySelectorAll('img.geotext-mosaic')].map(e => box(e.getBoundingClientRect()));
  const map = window[Object.keys(window).find(k => /^map_[0-9a-f]+$/.test(k))];
  return {
    size: [o.width, o.height], zoom: map.getZoom(),
    popup: popup ? box(popup.getBoundingClientRect()) : null,
    mosaic: [Math.min(...tiles.map(t => t[0])), Math.min(...tiles.map(t => t[1])),
             Math.max(...tiles.map(t => t[2])), Math.max(...tiles.map(t => t[3]))],
  };
}"""


def settled_map_view(pg: Any) -> dict[str, Any]:
    """MAP_VIEW_JS once two readings agree: the popup's auto-pan (and any zoom) has ended."""
    frame = pg.locator("#geotext-map iframe").element_handle().content_frame()
    view = frame.evaluate(MAP_VIEW_JS)
    for _ in range(40):
        pg.wait_for_timeout(300)
        again = frame.evaluate(MAP_VIEW_JS)
        if again == view:
            return view
        view = again
    raise AssertionError(f"the map never stopped moving: {view}")


def assert_popup_inside_map(view: dict[str, Any]) -> None:
    width, height = view["size"]
    left, top, right, bottom = view["popup"]
    assert left >= -0.5 and top >= -0.5 and right <= width + 0.5 and bottom <= height + 0.5, view


def unpainted_rows(shot: Path, frame_box: dict[str, float], view: dict[str, Any]) -> list[int]:
    """Rows of the map in the screenshot that are one flat colour across the mosaic (page white, or the
    map's grey): the map's iframe was not painted there. The mosaic's own rows are never flat."""
    width, height = view["size"]
    left, top, right, bottom = view["mosaic"]
    left, right = int(max(0, left)) + 2, int(min(width, right)) - 2
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        x0, y0 = round(frame_box["x"]), round(frame_box["y"])
        return [
            y
            for y in range(int(max(0, top)) + 2, int(min(height, bottom)) - 2)
            if len({rgb.getpixel((x0 + x, y0 + y)) for x in range(left, right, 5)}) == 1
        ]


PAINTED_JS = """() => Promise.all([...document.images].map(i => i.decode().catch(() => null)))
  .then(() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done))))"""


def whole_page_shot(pg: Any, path: Path) -> None:
    """The whole page as a plain shot of a viewport as tall as the page. Not full_page: Chromium's capture
    beyond the viewport can leave the map's iframe (its own process) unpainted, in whole or in part, above
    all once the page has been scrolled (microsoft/playwright#40583): the grey band of earlier shots."""
    viewport = pg.viewport_size
    pg.evaluate("window.scrollTo(0, 0)")
    height = pg.evaluate("document.documentElement.scrollHeight")
    pg.set_viewport_size({"width": viewport["width"], "height": max(height, viewport["height"])})
    try:  # the map's images decoded and two frames drawn at the new size, so the shot shows them
        pg.locator("#geotext-map iframe").element_handle().content_frame().evaluate(PAINTED_JS)
        pg.screenshot(path=str(path))
    finally:
        pg.set_viewport_size(viewport)


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
    assert_popup_inside_map(settled_map_view(page))
    shot = tmp_path / "demo.png"
    whole_page_shot(page, shot)
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
    # At once, as a person may: the new map may still be loading, so the focus arrives as it starts up.
    page.locator("#geotext-gallery .thumbnail-item").nth(1).click()  # a focus message, and the heatmap
    expect(frame.locator(".leaflet-popup-content")).to_contain_text("#2", timeout=TIMEOUT_MS)
    expect(page.locator("#geotext-heatmap img")).to_have_count(1, timeout=TIMEOUT_MS)
    view = settled_map_view(page)
    assert_popup_inside_map(view)  # the popup is not clipped by the map's edges
    print(f"demo: bytes over the event stream for one search: {counted['bytes']:,}")
    page.locator("#geotext-heatmap").screenshot(path="/tmp/geotext-demo-heatmap.png")  # scrolls the page
    shot = Path("/tmp/geotext-demo-after-search.png")
    whole_page_shot(page, shot)
    assert unpainted_rows(shot, page.locator("#geotext-map iframe").bounding_box(), view) == []
    assert 5_000 < counted["bytes"] <= PAYLOAD_BUDGET, counted


# The map is shown again (as after a search) while the page holds a focus for it: the page hands the focus
# over as soon as the new map says it is ready, i.e. while the map is still setting up its first view.
RELOAD_WITH_FOCUS_JS = """(rank) => {
  const old = document.querySelector('#geotext-map iframe');
  const search = JSON.parse(old.srcdoc.match(/SEARCH = ("[^"]*")/)[1]);
  old.replaceWith(old.cloneNode(false));
  window.geotextMapUpdate(JSON.stringify({search: search, focus: rank, focus_seq: 1}));
  return search;
}"""


def test_demo_a_focus_that_arrives_as_the_map_starts_is_kept(page, demo_url: str) -> None:  # noqa: F811
    from playwright.sync_api import expect

    search(page, demo_url, QUERY, K)
    frame = page.frame_locator("#geotext-map iframe")
    expect(frame.locator(".geotext-marker")).to_have_count(K, timeout=TIMEOUT_MS)
    search_id = page.evaluate(RELOAD_WITH_FOCUS_JS, 1)  # the top hit
    expect(frame.locator(".leaflet-popup-content")).to_contain_text("#1", timeout=TIMEOUT_MS)
    at_start = settled_map_view(page)
    assert_popup_inside_map(at_start)
    # the same focus once the map is idle: where a focus ends must not depend on when it arrives
    page.evaluate(
        "(m) => window.geotextMapUpdate(JSON.stringify(m))",
        {"search": search_id, "focus": 1, "focus_seq": 2},
    )
    page.wait_for_timeout(300)
    idle = settled_map_view(page)
    assert at_start["zoom"] == idle["zoom"], (at_start, idle)
    assert all(abs(a - b) <= 1 for a, b in zip(at_start["popup"], idle["popup"], strict=True)), (
        at_start,
        idle,
    )
