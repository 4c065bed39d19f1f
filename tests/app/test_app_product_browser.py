"""The app as a user meets it, in Debian's chromium: slow reasons never hold a search, focus and popups are
kept, the offline map, the bytes per search, Enter, bidi isolation and area filters."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app import callbacks
from app.ui import QUERY_HINT, build_demo
from retriever.errors import ReasonInterrupted
from tests.app.test_app import FakeExplainer, make_fake_backend
from tests.app.test_app_browser import TIMEOUT_MS, free_port, page, search  # noqa: F401  (page is a fixture)

pytestmark = pytest.mark.browser

BUDGET_S = 1.5  # the budget for a search, or a heatmap click, while reasons are being written
PAYLOAD_BUDGET = 600_000  # bytes over the event stream per search, after the first page load
TOKEN_S = 0.1  # ~10 tokens a second: SmolLM2-135M writing on 2 busy CPU cores
TOKENS = 60  # 6 s per reason


class SlowExplainer(FakeExplainer):
    """Writes like the real Explainer on a shared model: the evidence sentence at once, then the LM's text in
    one piece when generation ends. Its worker holds the model lock for the whole reason, so a search can only
    get the model because the reason gives way between two tokens (yield_to), raising ReasonInterrupted.
    Long reasons, so a popup with one must scroll."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__()
        self.lock = lock
        self.stopped_early = 0

    def reason(self, query: str, hit: Any, yield_to: Any = None) -> Iterator[str]:
        self.reason_calls += 1
        yield f"Tile {hit.tile_id} looks right here. "
        words: list[str] = []
        stop, gave_way = threading.Event(), threading.Event()

        def write() -> None:
            with self.lock:
                for i in range(TOKENS):
                    if stop.is_set() or (yield_to is not None and yield_to()):
                        self.stopped_early += 1
                        gave_way.set()
                        return
                    time.sleep(TOKEN_S)
                    words.append(f"word{i} ")

        worker = threading.Thread(target=write, daemon=True)
        worker.start()
        try:
            worker.join()
        finally:
            stop.set()
            worker.join()
        if gave_way.is_set():
            raise ReasonInterrupted("a search needs the model")
        yield "".join(words)

    def confidence(self, query: str, hits: Sequence[Any]) -> list[float]:
        with self.lock:
            return super().confidence(query, hits)


@pytest.fixture(scope="module")
def slow_app(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, callbacks.Engine, SlowExplainer]]:
    retriever, index = make_fake_backend(tmp_path_factory.mktemp("product-tiles"))
    retriever.model_lock = threading.RLock()  # as the real Retriever has: searches and reasons share it
    explainer = SlowExplainer(retriever.model_lock)
    demo = build_demo(retriever, index, explainer=explainer, concurrency=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", callbacks.make_engine(retriever, index), explainer
    finally:
        demo.close()


def captions(pg) -> list[str]:
    return pg.locator("#geotext-gallery .caption-label").all_inner_texts()


def wait_writing(pg) -> None:
    from playwright.sync_api import expect

    expect(pg.locator("#geotext-explanations")).to_contain_text("writing", timeout=TIMEOUT_MS)
    expect(pg.locator("#geotext-status")).to_contain_text("Writing reasons", timeout=TIMEOUT_MS)


def test_a_search_and_a_heatmap_click_answer_while_reasons_stream(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, explainer = slow_app
    expected = [callbacks.caption(h) for h in engine.rank("a blue roof", 3, None)]
    search(page, url, "a red church", 4)
    wait_writing(page)
    # a second search while the first one's reasons are being written
    page.fill("#geotext-query textarea", "a blue roof")
    page.locator("#geotext-k input[type=number]").fill("3")
    page.locator("#geotext-k input[type=number]").press("Tab")
    started = time.perf_counter()
    page.click("#geotext-search")
    expect(page.locator("#geotext-status")).to_contain_text("blue roof", timeout=TIMEOUT_MS)
    search_s = time.perf_counter() - started
    assert captions(page) == expected
    # a heatmap click while the new search's reasons stream
    wait_writing(page)
    started = time.perf_counter()
    page.locator("#geotext-gallery .thumbnail-item").nth(1).click()
    expect(page.locator("#geotext-heatmap img")).to_have_count(1, timeout=TIMEOUT_MS)
    heatmap_s = time.perf_counter() - started
    print(f"search while explaining: {search_s:.2f} s; heatmap click while explaining: {heatmap_s:.2f} s")
    assert search_s < BUDGET_S and heatmap_s < BUDGET_S, (search_s, heatmap_s)
    assert explainer.stopped_early >= 1  # a reason stepped aside between two tokens
    # the heatmap clears on a new search
    page.click("#geotext-search")
    expect(page.locator("#geotext-heatmap img")).to_have_count(0, timeout=TIMEOUT_MS)


def test_focus_and_popup_survive_the_reasons_and_fit_the_map(page, slow_app, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, _ = slow_app
    query = "a green park"
    hits = engine.rank(query, 5, None)
    search(page, url, query, 5)
    wait_writing(page)
    page.locator("#geotext-gallery .thumbnail-item").nth(2).click()
    frame = page.frame_locator("#geotext-map iframe")
    popup = frame.locator(".leaflet-popup-content")
    expect(popup).to_contain_text(hits[2].tile_id, timeout=TIMEOUT_MS)
    zoom_before = frame.locator("body").evaluate(
        "() => document.querySelector('.leaflet-proxy').style.transform"
    )
    # wait for all three reasons (#3's reaches the open popup in place)
    expect(page.locator("#geotext-status")).not_to_contain_text("Writing", timeout=TIMEOUT_MS * 2)
    expect(popup).to_have_count(1)
    expect(popup).to_contain_text(hits[2].tile_id)
    expect(popup).to_contain_text("Why:")
    expect(popup).to_contain_text("word59")  # the whole reason arrived in the open popup
    zoom_after = frame.locator("body").evaluate(
        "() => document.querySelector('.leaflet-proxy').style.transform"
    )
    # the zoom the focus chose is kept (the popup may pan the map to stay inside it): not the overview again
    assert re.search(r"scale\((\d+)\)", zoom_after).group(1) == re.search(
        r"scale\((\d+)\)", zoom_before
    ).group(1)
    assert page.locator("#geotext-gallery .thumbnail-item.selected").count() == 1
    # the popup's box lies inside the map's box (it scrolls rather than being clipped)
    shot = tmp_path / "focused-popup.png"
    page.screenshot(path=str(shot), full_page=True)
    Path("/tmp/geotext-focused-popup.png").write_bytes(shot.read_bytes())
    box = page.locator("#geotext-map iframe").bounding_box()
    whole = frame.locator(".leaflet-popup").bounding_box()
    assert whole["y"] >= box["y"] - 0.5 and whole["x"] >= box["x"] - 0.5, (whole, box)
    assert whole["y"] + whole["height"] <= box["y"] + box["height"] + 0.5, (whole, box)
    assert whole["x"] + whole["width"] <= box["x"] + box["width"] + 0.5, (whole, box)


def test_enter_searches_and_shift_enter_adds_a_line(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, _, _ = slow_app
    page.goto(url)
    expect(page.get_by_text(QUERY_HINT)).to_be_visible()
    box = page.locator("#geotext-query textarea")
    box.click()
    box.type("a red roof")
    box.press("Shift+Enter")
    box.type("and a yellow wall")
    assert box.input_value() == "a red roof\nand a yellow wall"
    page.wait_for_timeout(500)
    assert page.locator("#geotext-gallery .thumbnail-item").count() == 0  # Shift+Enter did not search
    box.press("Enter")
    expect(page.locator("#geotext-gallery .thumbnail-item")).to_have_count(callbacks.DEFAULT_K)
    assert box.input_value() == "a red roof\nand a yellow wall"  # Enter added no line
    # an input error keeps the results on screen and says so
    box.fill("   ")
    box.press("Enter")
    expect(page.locator("#geotext-status")).to_contain_text("describe what you see")
    expect(page.locator("#geotext-status")).to_contain_text("previous search")
    expect(page.locator("#geotext-gallery .thumbnail-item")).to_have_count(callbacks.DEFAULT_K)


def test_a_bidi_override_in_the_query_cannot_reorder_the_status(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, _, _ = slow_app
    search(page, url, "red \u202eevil tail", 3)
    status = page.locator("#geotext-status")
    expect(status).to_contain_text("ranked by")
    # the words after the query still run left to right: "ranked" is drawn left of "by"
    order = status.evaluate(
        """el => {
          const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
          let node;
          while ((node = walker.nextNode())) {
            const i = node.data.indexOf('ranked by');
            if (i < 0) continue;
            const box = (a, b) => { const r = document.createRange(); r.setStart(node, a); r.setEnd(node, b);
                                     return r.getBoundingClientRect(); };
            const ranked = box(i, i + 6), by = box(i + 7, i + 9);
            return [ranked.left, by.left, ranked.top, by.top];
          }
          return null;
        }"""
    )
    assert order is not None
    ranked_left, by_left, ranked_top, by_top = order
    assert abs(ranked_top - by_top) > 5 or ranked_left < by_left, order
    assert "\u2068" in status.inner_text() and "\u2069" in status.inner_text()


def test_an_area_around_a_point_inside_a_tile_returns_that_tile(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, _ = slow_app
    tile = engine.rank("red", 1, None)[0]
    west, south, east, north = tile.bbox
    lat, lon = south + 0.2 * (north - south), west + 0.2 * (east - west)  # inside, away from the centre
    page.goto(url)
    page.fill("#geotext-query textarea", "a blue roof")
    page.fill("#geotext-area input, #geotext-area textarea", f"{lat:.6f},{lon:.6f},30")
    page.click("#geotext-search")
    expect(page.locator("#geotext-gallery .caption-label").first).to_be_visible(timeout=TIMEOUT_MS)
    assert any(f"{tile.lat:.4f}, {tile.lon:.4f}" in c for c in captions(page)), captions(page)
    assert "No tile" not in page.locator("#geotext-status").inner_text()


def test_markers_stay_readable_at_the_largest_k(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, _ = slow_app
    k = engine.gallery.count  # 16: the whole fake gallery (MAX_K is 20)
    search(page, url, "a red church", k)
    frame = page.frame_locator("#geotext-map iframe")
    expect(frame.locator(".geotext-marker")).to_have_count(k)
    numbered = frame.locator(".geotext-marker:not(.geotext-dot)")
    boxes = [numbered.nth(i).bounding_box() for i in range(numbered.count())]
    assert (
        boxes
        and frame.locator(
            ".geotext-marker:not(.geotext-dot) .geotext-rank", has_text=re.compile(r"^1$")
        ).count()
        == 1
    )
    for i, a in enumerate(boxes):  # no two numbers overlap; the rest are dots until the user zooms in
        for b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["width"] <= b["x"] + 1
                or b["x"] + b["width"] <= a["x"] + 1
                or a["y"] + a["height"] <= b["y"] + 1
                or b["y"] + b["height"] <= a["y"] + 1
            )
            assert apart, (a, b)
    assert frame.locator(".leaflet-control-attribution").inner_text().count("OpenStreetMap") == 1


def stream_bytes(pg) -> Any:
    """Bytes received over Gradio's event stream (SSE) from now on, counted by the browser (CDP)."""
    cdp = pg.context.new_cdp_session(pg)
    cdp.send("Network.enable")
    streams: set[str] = set()
    total = {"bytes": 0}

    def on_response(event: dict) -> None:
        if "/queue/data" in event["response"]["url"]:
            streams.add(event["requestId"])

    def on_data(event: dict) -> None:
        if event["requestId"] in streams:
            total["bytes"] += int(event["dataLength"])

    cdp.on("Network.responseReceived", on_response)
    cdp.on("Network.dataReceived", on_data)
    return total


def test_payload_per_search_is_within_budget(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, _ = slow_app
    search(page, url, "a red church", 6)  # the first page load and search
    expect(page.locator("#geotext-status")).not_to_contain_text("Writing", timeout=TIMEOUT_MS * 2)
    counted = stream_bytes(page)
    page.fill("#geotext-query textarea", "a yellow wall")
    page.click("#geotext-search")
    expect(page.locator("#geotext-status")).to_contain_text("yellow wall", timeout=TIMEOUT_MS)
    expect(page.locator("#geotext-status")).not_to_contain_text("Writing", timeout=TIMEOUT_MS * 2)
    page.locator("#geotext-gallery .thumbnail-item").nth(0).click()
    page.wait_for_timeout(1000)
    print(f"bytes over the event stream for one search with its reasons: {counted['bytes']:,}")
    assert 5_000 < counted["bytes"] <= PAYLOAD_BUDGET, counted


def test_online_layers_say_so_and_hand_back_to_the_offline_map(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, _ = slow_app
    page.goto(url)  # the page's route aborts every request off the loopback: this browser is offline
    frame = page.frame_locator("#geotext-map iframe")
    expect(frame.locator("img.geotext-mosaic")).to_have_count(engine.gallery.count)
    expect(frame.locator(".geotext-extent-label")).to_contain_text(f"{engine.gallery.count} tiles")
    frame.locator(".leaflet-control-layers").hover()
    labels = frame.locator(".leaflet-control-layers-base label").all_inner_texts()
    assert [t.strip() for t in labels] == [
        "Gallery map (offline)",
        "OpenStreetMap (online)",
        "Satellite, Esri (online)",
    ]
    frame.get_by_text("OpenStreetMap (online)").click()
    expect(frame.locator(".geotext-note")).to_contain_text("needs the internet", timeout=TIMEOUT_MS)
    expect(frame.locator(".leaflet-control-layers-base input").first).to_be_checked()  # offline again
    expect(frame.locator("img.geotext-mosaic")).to_have_count(engine.gallery.count)
    assert frame.locator(".leaflet-control-attribution").inner_text().count("OpenStreetMap") == 1


def test_a_tile_beyond_the_top_three_is_explained_on_request(page, slow_app) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine, _ = slow_app
    hits = engine.rank("a green park", 5, None)
    search(page, url, "a green park", 5)
    panel = page.locator("#geotext-explanations")
    expect(page.locator("#geotext-status")).not_to_contain_text("Writing", timeout=TIMEOUT_MS * 2)
    assert "**#5**" not in panel.inner_text() and "#5 ·" not in panel.inner_text()
    page.locator("#geotext-gallery .thumbnail-item").nth(4).click()
    button = page.locator("#geotext-explain-one")
    expect(button).to_have_text("Explain tile #5", timeout=TIMEOUT_MS)
    button.click()
    expect(page.locator("#geotext-status")).to_contain_text("Writing a reason for #5", timeout=TIMEOUT_MS)
    expect(panel).to_contain_text(f"Tile {hits[4].tile_id} looks right here", timeout=TIMEOUT_MS)
    expect(page.locator("#geotext-status")).not_to_contain_text("Writing", timeout=TIMEOUT_MS)
    expect(panel).to_contain_text("word59")
    popup = page.frame_locator("#geotext-map iframe").locator(".leaflet-popup-content")
    expect(popup).to_contain_text("word59")  # the open popup got the reason in place
