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

pytestmark = [pytest.mark.browser, pytest.mark.demo]
QUERY = "I'm on Aleksanterinkatu outside the Stockmann department store, there's a Zara nearby"
K = 5


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    backend = load_backend(parse_config(["--explain", "off"], environ={}))
    assert backend.notice is None, backend.notice  # the bundled demo loads with no flags at all
    demo = build_demo(backend.retriever, backend.index, None, concurrency=1)
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
    expect(frame.locator(".leaflet-marker-icon")).to_have_count(K, timeout=TIMEOUT_MS)
    frame.locator(".geotext-rank", has_text=re.compile(r"^1$")).click()
    popup = frame.locator(".leaflet-popup-content")
    expect(popup).to_contain_text(captions[0].split(" · ")[1], timeout=TIMEOUT_MS)  # the score
    expect(popup.locator("a[href*='openstreetmap.org']")).to_have_count(1)
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, Path("/tmp") / "geotext-demo-screenshot.png")  # for a person to look at
