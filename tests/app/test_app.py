"""The app without a browser: callbacks, hits_to_map, escaping, offline assets, config and the ZeroGPU wrapper."""

from __future__ import annotations

import csv
import html
import json
import re
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from PIL import Image
from shapely.geometry import Point, Polygon, box

from app import callbacks, maps
from app.callbacks import Engine, SearchState, UserInputError
from app.config import AppConfig, demo_ranking_weight, load_backend, parse_config
from retriever.errors import ReasonInterrupted
from tests.fakes import COLOURS, PALETTE, FakeRetriever, solid_tile

XSS_QUERY = "red <script>alert(1)</script> <img src=x onerror=alert(1)> ${alert(3)} `tick` C:\\users"
LIVE_MARKUP = ("<script>alert", "<img src=x", "onerror=alert(1)>", "${alert(3)}")


# --- A small gallery: the real TileIndex when retriever.index is importable, else a stand-in ----------
def tile_rows(folder: Path, n: int = 16, side_deg: float = 0.002) -> list[dict[str, Any]]:
    """Tiles in a grid over central Helsinki, each painted in one palette colour (written to folder)."""
    rows = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        lat, lon = 60.165 + 0.0015 * (i // 4), 24.935 + 0.003 * (i % 4)
        path = folder / f"tile_{i:02d}_{colour}.png"
        solid_tile(colour, 48).save(path)
        bbox = (lon - side_deg / 2, lat - side_deg / 4, lon + side_deg / 2, lat + side_deg / 4)
        rows.append(
            {
                "tile_id": f"hel-{i:02d}",
                "lat": lat,
                "lon": lon,
                "bbox": bbox,
                "path": str(path),
                "colour": colour,
            }
        )
    return rows


try:
    from retriever.index import Hit, TileIndex, build_index
except ImportError:  # the index module is not there yet: a stand-in with the contract's surface
    TileIndex = build_index = None

    @dataclass(frozen=True)
    class Hit:  # the contract's fields (docs/CONTRACT.md)
        rank: int
        tile_id: str
        score: float
        lat: float
        lon: float
        bbox: tuple[float, float, float, float]
        image_path: str
        footprint: Polygon
        context: dict = field(default_factory=dict)


class FakeIndex:
    """Exact cosine top-K over tile_rows; used only while retriever.index is missing."""

    def __init__(self, rows: list[dict[str, Any]], retriever: FakeRetriever) -> None:
        self.rows = rows
        self.embeddings = retriever.encode_tiles([r["path"] for r in rows])  # (N, D)

    def search_text(self, retriever: Any, texts: list[str], k: int, within: Any = None) -> list[list[Hit]]:
        scores = retriever.encode_queries(texts) @ self.embeddings.T  # (Q, N)
        out = []
        for row_scores in scores.tolist():
            order = sorted(range(len(self.rows)), key=lambda j: (-row_scores[j], j))
            if within is not None:
                order = [j for j in order if within.intersects(box(*self.rows[j]["bbox"]))]
            out.append([self._hit(rank, j, row_scores[j]) for rank, j in enumerate(order[:k], start=1)])
        return out

    def _hit(self, rank: int, j: int, score: float) -> Hit:
        r = self.rows[j]
        return Hit(
            rank,
            r["tile_id"],
            float(score),
            r["lat"],
            r["lon"],
            r["bbox"],
            r["path"],
            box(*r["bbox"]),
            {"features": f"a {r['colour']} tile"},
        )


def make_fake_backend(folder: Path) -> tuple[FakeRetriever, Any]:
    """FakeRetriever plus an index over tile_rows(folder): a real TileIndex when the module exists."""
    retriever = FakeRetriever()
    rows = tile_rows(folder)
    if build_index is None:
        return retriever, FakeIndex(rows, retriever)
    import geopandas as gpd

    frame = gpd.GeoDataFrame(
        {
            "tile_id": [r["tile_id"] for r in rows],
            "lat": [r["lat"] for r in rows],
            "lon": [r["lon"] for r in rows],
            "image_path": [r["path"] for r in rows],
            "features": [f"a {r['colour']} tile" for r in rows],
        },
        geometry=[box(*r["bbox"]) for r in rows],
        crs="EPSG:4326",
    )
    out = build_index(retriever, frame, folder / "index", thumbnail_px=64, progress=False)
    return retriever, TileIndex.load(out, retriever=retriever)


class FakeExplainer:
    """Confidence by rank; reasons streamed in chunks, the first one carrying markup to be escaped."""

    def __init__(self) -> None:
        self.confidence_calls = 0
        self.reason_calls = 0

    def confidence(self, query: str, hits: Sequence[Any]) -> list[float]:
        self.confidence_calls += 1
        return [1.0 / (1 + h.rank) for h in hits]

    def reason(self, query: str, hit: Any) -> Iterator[str]:
        self.reason_calls += 1
        yield f"Tile {hit.tile_id} "
        yield "<img src=x onerror=alert(1)> " if hit.rank == 1 else "looks "
        yield "matches."


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> tuple[FakeRetriever, Any]:
    return make_fake_backend(tmp_path_factory.mktemp("tiles"))


@pytest.fixture
def engine(backend: tuple[FakeRetriever, Any]) -> Engine:
    return callbacks.make_engine(*backend)


def page_without_data_uris(page: str) -> str:
    return re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", page)


def fitted_bounds(page: str) -> list[list[float]]:
    """The bounds Folium's fitBounds call gives the map (not Leaflet's own source)."""
    return json.loads(re.search(r"map_[0-9a-f]+\.fitBounds\(\s*(\[\[.*?\]\])", page, re.S).group(1))


# --- Query checks -------------------------------------------------------------------------------
def test_empty_query_gets_a_friendly_message_and_keeps_the_previous_results(engine: Engine) -> None:
    for raw in ("", "   \n\t ", None):
        view = callbacks.search(raw, 5, "", engine)
        assert "describe what you see" in view.status.lower()
        assert "previous search" not in view.status  # there was none
        # only the status changes: every other output is left as it is on the page
        assert (view.gallery, view.map_html, view.files, view.state, view.explanations) == (None,) * 5
        assert "Traceback" not in view.status
    previous = callbacks.search("red", 3, "", engine).state
    again = callbacks.search("", 5, "", engine, previous=previous)
    assert again.gallery is None and again.state is None
    assert "still those of your previous search" in again.status


def test_long_query_is_truncated_with_a_notice(engine: Engine) -> None:
    raw = "red " * 2000  # 8,000 characters
    text, notices = callbacks.clean_query(raw)
    assert len(text) <= callbacks.MAX_QUERY_CHARS and text.endswith("red")
    assert notices and "first" in notices[0]
    view = callbacks.search(raw, 3, "", engine)
    assert len(view.state.query) <= callbacks.MAX_QUERY_CHARS
    assert "only its first" in view.status and len(view.gallery) == 3


def test_short_query_is_kept_and_k_is_clamped_rounding_half_up() -> None:
    assert callbacks.clean_query("  a  red\tchurch \x00 ") == ("a red church", [])
    values = (0, 1, 7.4, 99, None, 2.5, 0.5, 3.5, 4.49, "6", " 2.5 ", float("nan"))
    assert [callbacks.clamp_k(v) for v in values] == [
        1,
        1,
        7,
        callbacks.MAX_K,
        callbacks.DEFAULT_K,
        3,  # half up, as the slider shows it (Python's round gives 2)
        1,
        4,
        4,
        6,
        3,
        callbacks.DEFAULT_K,
    ]


@pytest.mark.parametrize("bad", ["abc", "", [3], {"k": 3}, True, float("inf")])
def test_k_that_is_not_a_number_gets_a_clear_message(engine: Engine, bad: object) -> None:
    with pytest.raises(UserInputError, match="must be a number from 1 to 20"):
        callbacks.clamp_k(bad)
    view = callbacks.search("red", bad, "", engine)
    assert "K (the number of results) must be a number from 1 to 20" in view.status
    assert view.state is None and "Traceback" not in view.status


def test_k_two_and_a_half_returns_three_tiles(engine: Engine) -> None:
    view = callbacks.search("red", 2.5, "", engine)
    assert len(view.gallery) == 3 and len(view.state.hits) == 3


@pytest.mark.parametrize("spec", ["/etc/passwd", "area.geojson", "60.1,24.9", "1,2,3,4,5", "red"])
def test_area_accepts_only_numbers(spec: str) -> None:
    with pytest.raises(UserInputError, match="west,south,east,north"):
        callbacks.parse_area(spec)


def test_area_filter_restricts_results(engine: Engine, backend: tuple[FakeRetriever, Any]) -> None:
    pytest.importorskip("retriever.index.spatial")
    first = engine.rank("red", 1, None)[0]
    view = callbacks.search("red", 10, ",".join(str(v) for v in first.bbox), engine)
    assert view.state.hits and all(box(*h.bbox).intersects(box(*first.bbox)) for h in view.state.hits)
    assert view.state.hits[0].tile_id == first.tile_id
    assert "fewer than" in view.status
    nowhere = callbacks.search("red", 5, "0,0,0.001,0.001", engine)
    assert "No tile's footprint touches that area" in nowhere.status and nowhere.gallery is None


def test_area_inside_one_tile_returns_the_tiles_that_cover_it(engine: Engine) -> None:
    """A 30 m circle, and a tiny box, away from every tile centre still find the footprints around them."""
    tile = engine.rank("red", 1, None)[0]
    west, south, east, north = tile.bbox
    lat, lon = south + 0.2 * (north - south), west + 0.2 * (east - west)  # inside, far from the centre
    assert abs(lat - tile.lat) > 0.0001 and abs(lon - tile.lon) > 0.0003  # > 10 m from it
    circle = callbacks.search("blue", 10, f"{lat},{lon},30", engine)
    assert circle.state is not None, circle.status
    assert tile.tile_id in [h.tile_id for h in circle.state.hits]
    point = Point(lon, lat)
    assert all(box(*h.bbox).distance(point) < 0.001 for h in circle.state.hits)
    tiny = callbacks.search("blue", 10, f"{lon - 1e-5},{lat - 1e-5},{lon + 1e-5},{lat + 1e-5}", engine)
    assert tile.tile_id in [h.tile_id for h in tiny.state.hits]
    centres = callbacks.parse_area(f"{lat},{lon},30")
    assert not centres.contains(Point(tile.lon, tile.lat))  # a centre-based filter would have found nothing


# --- Search ---------------------------------------------------------------------------------------
def test_search_ranks_the_matching_tiles_first_with_captions(engine: Engine) -> None:
    view = callbacks.search("a red church next to a green park", 5, "", engine)
    hits = view.state.hits
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    colours = [h.context["features"].split()[1] for h in hits]
    assert set(colours[:4]) == {"red", "green"}  # 2 red + 2 green tiles outscore the rest
    assert len(view.gallery) == 5
    for (image, caption), hit, colour in zip(view.gallery, hits, colours, strict=True):
        with Image.open(image) as decoded:  # the thumbnail is this tile's image
            assert all(
                abs(a - b) < 12 for a, b in zip(decoded.convert("RGB").getpixel((5, 5)), PALETTE[colour])
            )
        assert caption == f"#{hit.rank} · {hit.score:.3f} · {hit.lat:.4f}, {hit.lon:.4f}"
    assert abs(sum(view.state.confidences) - 1) < 1e-6
    assert view.state.confidences == sorted(view.state.confidences, reverse=True)
    assert "Top 5 tiles" in view.status and 'class="geotext-map"' in view.map_html


def test_search_never_calls_the_explainer(backend: tuple[FakeRetriever, Any]) -> None:
    explainer = FakeExplainer()
    engine = callbacks.make_engine(*backend, explainer=explainer)
    view = callbacks.search("blue", 4, "", engine)
    assert len(view.gallery) == 4
    assert explainer.confidence_calls == 0 and explainer.reason_calls == 0  # the ranking is never held back


def test_errors_become_friendly_messages_without_details(caplog: pytest.LogCaptureFixture) -> None:
    def broken(query: str, k: int, within: Any) -> list[Any]:
        raise RuntimeError("secret /srv/model/path exploded")

    view = callbacks.search("red", 5, "", Engine(rank=broken))
    assert "Something went wrong" in view.status
    assert "secret" not in view.status and "Traceback" not in view.status
    ref = re.search(r"`([0-9a-f]{8})`", view.status).group(1)
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)  # logged with its traceback


def test_library_errors_are_shown_escaped() -> None:
    errors = pytest.importorskip("retriever.errors")

    def refuse(query: str, k: int, within: Any) -> list[Any]:
        raise errors.IndexMismatchError("index built by <b>another</b> model")

    view = callbacks.search("red", 5, "", Engine(rank=refuse))
    assert "another" in view.status and "<b>" not in view.status


def test_no_backend_shows_the_notice() -> None:
    view = callbacks.search("red", 5, "", None, notice="Pass `--model` and `--index`.")
    assert "--model" in view.status and view.gallery is None and view.state is None


# --- hits_to_map ------------------------------------------------------------------------------------
def test_map_has_numbered_markers_popups_and_footprints(engine: Engine) -> None:
    hits = engine.rank("yellow", 6, None)
    confidences = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]
    page = maps.map_page(maps.hits_to_map(hits, query="yellow & <b>bold</b>", confidences=confidences))
    assert page.count("L.marker(") == 6
    for hit in hits:
        colour = maps.rank_colour(hit.rank, 6)
        assert f'\\"geotext-rank\\" style=\\"background:{colour}\\"\\u003e{hit.rank}\\u003c/div' in page
        assert f"<th>Score</th><td>{hit.score:.3f}</td>" in page
        assert f"{hit.lat:.5f}, {hit.lon:.5f}" in page
    assert page.count("yellow &amp; &lt;b&gt;bold&lt;/b&gt;") == 6  # the escaped query in every popup
    assert "<b>bold</b>" not in page
    assert "<th>Confidence</th><td>0.50</td>" in page
    assert page.count("L.polygon(") == 6
    assert maps.rank_colour(1, 6) in page and maps.rank_colour(6, 6) in page
    assert maps.rank_colour(1, 6) != maps.rank_colour(6, 6)
    assert "L.imageOverlay(" not in page and "data:image" not in page  # thumbnails by URL, in the popups
    for hit in hits:
        assert html.escape(maps.thumbnail_url(hit.image_path)) in page
    assert html.escape(maps.osm_url(hits[0].lat, hits[0].lon)) in page
    west = min(h.bbox[0] for h in hits)
    north = max(h.bbox[3] for h in hits)
    (s, w), (n, e) = fitted_bounds(page)
    assert w == pytest.approx(west) and n == pytest.approx(north)
    assert re.search(r"attributionControl\.addAttribution\(.*OpenStreetMap.*contributors", page)


def test_reason_shows_in_the_map_and_the_bridge_knows_every_marker(engine: Engine) -> None:
    hits = engine.rank("cyan", 3, None)
    page = maps.map_page(maps.hits_to_map(hits, reasons={2: "a cyan roof <i>here</i>"}, search_id="s-1"))
    assert "a cyan roof &lt;i&gt;here&lt;/i&gt;" in page
    marker_names = re.findall(r"var (marker_[0-9a-f]+) = L\.marker\(", page)
    bridge = re.search(r"SEARCH = \"s-1\", markers = (\{.*?\}), bounds = (\{.*?\});", page)
    assert bridge, "the map listens for updates of this search"
    assert bridge.group(1) == "{" + ",".join(f'"{r}":{m}' for r, m in zip((1, 2, 3), marker_names)) + "}"
    west, south, east, north = hits[1].bbox
    assert json.loads(bridge.group(2))["2"] == [[south, west], [north, east]]  # where a focus on #2 zooms


def test_map_escapes_xss_in_query_and_reasons(engine: Engine) -> None:
    hits = engine.rank("red", 3, None)
    m = maps.hits_to_map(hits, query=XSS_QUERY, reasons={1: XSS_QUERY})
    page = maps.map_page(m)
    iframe = maps.map_iframe(m)
    for live in LIVE_MARKUP:
        assert live not in page, live
        assert live not in iframe, live
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#36;{alert(3)}" in page and "&#96;tick&#96;" in page and "C:&#92;users" in page
    # the iframe is sandboxed and its whole page is one escaped attribute
    assert (
        iframe.startswith("<iframe")
        and 'sandbox="allow-scripts' in iframe
        and "allow-same-origin" not in iframe
    )
    assert "<script" not in iframe.split('srcdoc="', 1)[1].split('"', 1)[0]


def test_search_output_never_has_live_markup(engine: Engine) -> None:
    view = callbacks.search(XSS_QUERY, 4, "", engine)
    assert view.state.hits, "the colour word still ranks"
    page = html.unescape(view.map_html.split('srcdoc="', 1)[1].split('"', 1)[0])  # what the iframe runs
    assert "L.marker(" in page
    for live in LIVE_MARKUP:
        assert live not in page
        assert live not in view.status
        assert all(live not in caption for _, caption in view.gallery)
    assert all("<" not in caption and "script" not in caption for _, caption in view.gallery)
    assert "&lt;script&gt;" in view.status  # shown as text, not dropped


def test_map_loads_only_the_apps_own_files(engine: Engine) -> None:
    hits = engine.rank("white", 4, None)
    page = maps.map_page(maps.hits_to_map(hits, query="white", gallery=engine.gallery))
    urls = re.findall(r'<script src="([^"]+)"', page) + re.findall(
        r'<link rel="stylesheet" href="([^"]+)"', page
    )
    urls += re.findall(r'<img src="([^"]+)"', html.unescape(page)) + re.findall(
        r'\["(gradio_api/[^"]+)"', page
    )
    served = [Path(p).resolve() for p in maps.static_dirs()]
    assert len(urls) > 4 + 16
    for url in urls:  # every file is one the app serves, by a URL relative to the page
        assert url.startswith(maps.FILE_ROUTE), url
        path = Path(unquote(url.removeprefix(maps.FILE_ROUTE)))
        assert path.is_file() and any(path.is_relative_to(d) for d in served), path
    assert any(u.endswith("leaflet.js") for u in urls) and any(u.endswith("jquery.min.js") for u in urls)
    assert not any(".venv" in u or "site-packages" in u for u in urls)  # no server paths in the page
    assert len(page) < 60_000  # no inlined scripts or images
    lowered = page_without_data_uris(page).lower()
    for cdn in ("cdn", "unpkg", "jsdelivr", "code.jquery.com", "bootstrap", "googleapis", "sourcemappingurl"):
        assert cdn not in lowered, cdn
    # only the optional online basemaps fetch from a remote host, and they are off by default
    tile_hosts = set(re.findall(r'L\.tileLayer\(\s*"https?://([^/]+)/', page))
    assert tile_hosts == {"tile.openstreetmap.org", "server.arcgisonline.com"}


def test_basemap_registry_picks_the_initial_layer(engine: Engine) -> None:
    hits = engine.rank("red", 2, None)

    def shown_tile_layers(basemap: str) -> int:
        page = maps.map_page(maps.hits_to_map(hits, basemap=basemap))
        tile_vars = re.findall(r"var (tile_layer_\w+) = L\.tileLayer\(", page)
        return sum(bool(re.search(rf"{v}\.addTo\(map_", page)) for v in tile_vars)

    assert shown_tile_layers("offline") == 0  # nothing fetched from the internet by default
    assert shown_tile_layers("osm") == 1
    with pytest.raises(ValueError, match="unknown basemap"):
        maps.hits_to_map(hits, basemap="google")


def test_unreadable_thumbnail_does_not_break_the_map(tmp_path: Path) -> None:
    hit = Hit(
        1,
        "gone",
        0.5,
        60.17,
        24.94,
        (24.939, 60.169, 24.941, 60.171),
        str(tmp_path / "missing.png"),
        None,
        {},
    )
    page = maps.map_page(maps.hits_to_map([hit], query="q"))
    assert "thumbnail unavailable" in page and page.count("L.marker(") == 1
    assert (
        page.count("L.imageOverlay(") == 0 and page.count("L.polygon(") == 1
    )  # bbox stands in for the footprint
    items = callbacks.gallery_items([hit])
    with Image.open(items[0][0]) as placeholder:
        assert placeholder.size == (64, 64)
    assert items[0][1].startswith("#1 · 0.500")


def test_empty_map_renders() -> None:
    iframe = maps.empty_map_iframe()
    assert "L.map(" in html.unescape(iframe) and "L.marker(" not in html.unescape(iframe)


# --- Explanations -----------------------------------------------------------------------------------
def test_explanations_stream_after_the_ranking(backend: tuple[FakeRetriever, Any]) -> None:
    explainer = FakeExplainer()
    engine = callbacks.make_engine(*backend, explainer=explainer)
    first = callbacks.search("magenta", 5, "", engine)
    views = list(callbacks.explain(first.state, engine, reason_top=2, interval_s=0.0))
    assert explainer.confidence_calls == 1 and explainer.reason_calls == 2
    # the first update carries the explainer's confidence and no reasons yet
    assert views[0].state.confidences == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    assert views[0].state.reasons == {} and "writing" in views[0].explanations
    final = views[-1].state
    assert set(final.reasons) == {1, 2} and final.reasons[2] == f"Tile {final.hits[1].tile_id} looks matches."
    streamed = [v.state.reasons.get(1, "") for v in views if v.state]
    assert any(0 < len(r) < len(final.reasons[1]) for r in streamed)  # partial text was pushed
    all_text = " ".join(v.map_html or "" for v in views) + " ".join(v.explanations or "" for v in views)
    assert "onerror=alert(1)>" not in all_text and "&lt;img src" in all_text
    geojson = json.loads(Path(views[-1].files[0]).read_text())
    assert geojson["features"][0]["properties"]["reason"].startswith("Tile ")


def test_explainer_failure_keeps_the_ranking(backend: tuple[FakeRetriever, Any]) -> None:
    class Broken(FakeExplainer):
        def confidence(self, query: str, hits: Sequence[Any]) -> list[float]:
            raise RuntimeError("cuda out of memory at 0xdeadbeef")

    engine = callbacks.make_engine(*backend, explainer=Broken())
    first = callbacks.search("black", 3, "", engine)
    views = list(callbacks.explain(first.state, engine))
    assert len(views) == 1 and "Something went wrong" in views[0].explanations
    assert "deadbeef" not in views[0].explanations and views[0].state is None  # state left untouched


def test_no_explainer_shows_similarity_confidence(engine: Engine) -> None:
    view = callbacks.search("blue", 3, "", engine)
    assert "softmax of the similarity scores" in view.explanations
    assert list(callbacks.explain(view.state, engine)) == []


# --- Gallery selection and downloads ---------------------------------------------------------------
def test_selecting_a_gallery_item_sends_a_focus_message_not_a_new_map(engine: Engine) -> None:
    view = callbacks.search("green", 4, "", engine)
    message, state = callbacks.focus(view.state, 2)
    assert state.focus == 3
    sent = json.loads(message)
    assert sent["search"] == view.state.search_id and sent["focus"] == 3
    assert set(sent["popups"]) == {"1", "2", "3", "4"} and view.state.hits[2].tile_id in sent["popups"]["3"]
    again, later = callbacks.focus(state, 0)
    assert json.loads(again)["focus_seq"] > sent["focus_seq"]  # each choice is applied once, in order
    assert callbacks.focus(view.state, 99) == (None, view.state)  # out of range: nothing to send
    assert callbacks.focus(None, 0) == (None, None)


def test_downloads_are_geojson_and_csv(engine: Engine) -> None:
    view = callbacks.search("yellow", 4, "", engine)
    state = SearchState(**{**view.state.__dict__, "reasons": {1: "=HYPERLINK(evil)"}})
    geojson_path, csv_path = callbacks.export_results(state)
    data = json.loads(Path(geojson_path).read_text())
    assert data["type"] == "FeatureCollection" and data["query"] == "yellow"
    assert [f["properties"]["rank"] for f in data["features"]] == [1, 2, 3, 4]
    first = data["features"][0]
    assert first["geometry"]["type"] == "Polygon"
    assert first["properties"]["score"] == pytest.approx(view.state.hits[0].score, abs=1e-6)
    assert "/" not in first["properties"]["image"]  # no server paths leak
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["tile_id"] == view.state.hits[0].tile_id
    assert rows[0]["reason"] == "'=HYPERLINK(evil)"  # not a live spreadsheet formula
    assert float(rows[1]["lat"]) == pytest.approx(view.state.hits[1].lat)


# --- Config, UI wiring, ZeroGPU ---------------------------------------------------------------------
def test_config_flags_override_env_over_defaults(tmp_path: Path) -> None:
    env = {"GEOTEXT_MODEL": "env-model", "GEOTEXT_INDEX": "env-index", "GEOTEXT_QUANTIZATION": "4bit"}
    config = parse_config(["--index", "flag-index", "--port", "7999"], environ=env)
    assert (config.model, config.index, config.quantization, config.port) == (
        "env-model",
        "flag-index",
        "4bit",
        7999,
    )
    default = parse_config([], environ={})
    assert default == AppConfig(examples=default.examples, hybrid=demo_ranking_weight()) and default.examples
    assert (
        parse_config(["--index", "other"], environ={}).hybrid is None
    )  # the demo's choice is the demo's only
    examples = tmp_path / "ex.txt"
    examples.write_text("# comment\nfirst example\n\nsecond example\n")
    assert parse_config(["--examples", str(examples)], environ={}).examples == [
        "first example",
        "second example",
    ]
    with pytest.raises(SystemExit):
        parse_config(["--basemap", "google"], environ={})


def test_demo_ranking_choice_is_read_from_its_file(tmp_path: Path) -> None:
    choice = tmp_path / "ranking.json"
    choice.write_text(json.dumps({"ranking": "hybrid", "weight": 0.35}))
    assert demo_ranking_weight(choice) == 0.35
    choice.write_text(json.dumps({"ranking": "pixels", "weight": 1.0}))
    assert demo_ranking_weight(choice) is None
    choice.write_text("{not json")
    assert demo_ranking_weight(choice) is None and demo_ranking_weight(tmp_path / "absent.json") is None


def test_status_names_the_ranking_and_counts_in_good_grammar() -> None:
    state = callbacks.SearchState(query="a church", hits=[object()], confidences=[0.5], basemap="offline")
    one = callbacks.summary_md(state, 0.1, ["Only 1 tile matched"], ranking="hybrid: 0.3 × MLLM")
    assert "The top tile" in one and "Top 1 tiles" not in one and "ranked by hybrid: 0.3 × MLLM" in one
    assert (
        callbacks.tiles(1) == "1 tile" and callbacks.tiles(2) == "2 tiles" and callbacks.tiles(0) == "0 tiles"
    )
    many = callbacks.summary_md(replace(state, hits=[object(), object()]), 0.1, [])
    assert "**Top 2 tiles**" in many


def test_user_text_in_the_status_is_bidi_isolated(engine: Engine) -> None:
    query = "red \u202eevil\u2069 tail"  # an override, and a stray closer that tries to end the isolate early
    view = callbacks.search(query, 3, "", engine)
    shown = re.search("\u2068(.*?)\u2069", view.status).group(1)
    assert "\u202e" in shown and "\u2069" not in shown  # the override stays inside its isolate
    after = view.status.split("\u2069", 1)[1]
    assert after.startswith("” · ") and "ranked by" in after and "\u202e" not in after


def test_missing_model_or_index_gives_a_notice_not_a_crash(tmp_path: Path) -> None:
    backend = load_backend(AppConfig(model=str(tmp_path / "nope"), index=str(tmp_path / "nope-index")))
    assert backend.retriever is None and backend.index is None
    assert "--model" in backend.notice and "GEOTEXT_MODEL" in backend.notice and "nope" in backend.notice
    assert "--index" in load_backend(AppConfig(model=str(tmp_path), index=None)).notice


def test_build_demo_wires_search_with_a_model_queue(backend: tuple[FakeRetriever, Any]) -> None:
    import gradio as gr

    from app.ui import build_demo

    demo = build_demo(*backend, explainer=FakeExplainer(), examples=["a red tile"], concurrency=2)
    assert isinstance(demo, gr.Blocks)
    fns = list(demo.fns.values())
    search = next(f for f in fns if f.api_name == "search")
    assert search.concurrency_limit == 2 and search.concurrency_id == "model"
    page_search = [f for f in fns if getattr(f.fn, "__name__", "") == "on_search"]
    assert len(page_search) == 2 and all(f.concurrency_id == "model" for f in page_search)  # button, Enter
    explain = [
        f for f in fns if getattr(f.fn, "__name__", "") in ("on_explain", "on_explain_one", "api_explain")
    ]
    names = sorted(f.fn.__name__ for f in explain)
    assert names == ["api_explain", "on_explain", "on_explain", "on_explain_one"]
    assert all(f.concurrency_id == "explain" for f in explain)  # never ahead of a search
    assert next(f for f in fns if f.api_name == "explain").fn.__name__ == "api_explain"
    select = next(f for f in fns if getattr(f.fn, "__name__", "") == "on_select")
    assert select.concurrency_limit is None  # a click on a thumbnail never queues
    plain = build_demo(None, None, notice="Pass `--model`.")
    assert not any(getattr(f.fn, "__name__", "") == "on_explain" for f in plain.fns.values())


def test_on_gpu_is_a_no_op_without_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.gpu import on_gpu

    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError

    def f(x: int) -> int:
        return x + 1

    assert on_gpu(f) is f and on_gpu(duration=30)(f) is f


def test_on_gpu_wraps_with_spaces_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.gpu import on_gpu

    seen: list[Any] = []

    def gpu(fn: Any = None, *, duration: int | None = None) -> Any:
        def deco(f: Any) -> Any:
            seen.append((f.__name__, duration))
            return lambda *a: ("on gpu", f(*a))

        return deco(fn) if callable(fn) else deco

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))

    def encode(x: int) -> int:
        return x * 2

    assert on_gpu(encode)(3) == ("on gpu", 6)
    assert on_gpu(duration=90)(encode)(1) == ("on gpu", 2)
    assert seen == [("encode", None), ("encode", 90)]


def test_index_ranking_is_exact(backend: tuple[FakeRetriever, Any], tmp_path: Path) -> None:
    retriever, index = backend
    rows = tile_rows(tmp_path)
    hits = index.search_text(retriever, ["red"], k=len(rows))[0]
    brute = (retriever.encode_queries(["red"]) @ retriever.encode_tiles([r["path"] for r in rows]).T)[0]
    assert [h.score for h in hits] == pytest.approx(sorted(brute.tolist(), reverse=True), abs=1e-3)
    assert {h.tile_id for h in hits[:2]} == {r["tile_id"] for r in rows if r["colour"] == "red"}


def test_relevance_heatmap_is_shown_for_the_selected_tile_only() -> None:
    from PIL import Image

    from app.callbacks import Engine, SearchState, relevance_heatmap

    drawn: list[tuple[str, str]] = []

    def heatmap(query: str, hit) -> Image.Image:
        drawn.append((query, hit))
        return Image.new("RGBA", (8, 8))

    engine = Engine(rank=lambda q, k, w: [], heatmap=heatmap)
    state = SearchState(query="a red church", hits=["tile-a", "tile-b"])
    assert isinstance(relevance_heatmap(state, 1, engine), Image.Image)
    assert drawn == [("a red church", "tile-b")]
    assert relevance_heatmap(state, 5, engine) is None and relevance_heatmap(None, 0, engine) is None

    def broken(query: str, hit) -> Image.Image:
        raise RuntimeError("no gradients today")

    assert relevance_heatmap(state, 0, Engine(rank=engine.rank, heatmap=broken)) is None


class EvidenceExplainer(FakeExplainer):
    """FakeExplainer plus evidence marks: the query's first word in the tile, its last a miss."""

    def evidence(self, query: str, hit: Any) -> Any:
        words = query.split()
        match = types.SimpleNamespace
        matches = [
            match(mention=match(surface=words[0]), status="tile", matched=f"{words[0]} (kind)"),
            match(mention=match(surface=words[-1]), status="miss", matched=words[-1]),
            match(mention=match(surface="\u202eevil"), status="nearby", matched="x"),
        ]
        return types.SimpleNamespace(matches=matches)


def test_evidence_marks_are_shown_escaped_and_isolated(backend: tuple[FakeRetriever, Any]) -> None:
    engine = callbacks.make_engine(*backend, explainer=EvidenceExplainer())
    query = "magenta <img src=x onerror=alert(1)>"
    first = callbacks.search(query, 3, "", engine)
    views = list(callbacks.explain(first.state, engine, reason_top=1, interval_s=0.0))
    final = views[-1].state
    assert final.marks[1][0] == ("magenta", "tile", "magenta (kind)")
    panel = next(v.explanations for v in reversed(views) if v.explanations)
    assert "✓ \u2068magenta\u2069" in panel and "✗ \u2068onerror=alert\\(1\\)&gt;\u2069" in panel
    assert "≈ nearby \u2068\u202eevil\u2069" in panel  # a right-to-left override stays inside its isolate
    page = "".join(json.loads(next(v.map_update for v in reversed(views) if v.map_update))["popups"].values())
    assert '<span class="mark tile" title="in this tile: magenta (kind)">✓ <bdi>magenta</bdi></span>' in page
    assert "<bdi>onerror=alert(1)&gt;</bdi>" in page
    for live in LIVE_MARKUP:
        assert live not in page and live not in panel
    geojson = json.loads(Path(views[-1].files[0]).read_text())
    assert geojson["features"][0]["properties"]["evidence"].startswith("✓ magenta; ✗ onerror")


def test_erm_reranks_the_search_only_when_the_calibration_asks(backend: tuple[FakeRetriever, Any]) -> None:
    class Reranking(EvidenceExplainer):
        reranks = True

        def rerank(self, query: str, hits: Sequence[Any], k: int = 5) -> list[Any]:
            head = list(reversed(hits[:k]))
            return [replace(h, rank=i + 1) for i, h in enumerate(head + list(hits[k:]))]

    plain = callbacks.make_engine(*backend, explainer=EvidenceExplainer())
    erm = callbacks.make_engine(*backend, explainer=Reranking())
    before = [h.tile_id for h in plain.rank("magenta", 5, None)]
    assert [h.tile_id for h in erm.rank("magenta", 5, None)] == before[::-1]
    assert "ERM" in erm.ranking and "ERM" not in plain.ranking


# --- Status, turns and supersession ------------------------------------------------------------------
def test_status_says_what_runs_and_clears_when_done(backend: tuple[FakeRetriever, Any]) -> None:
    engine = callbacks.make_engine(*backend, explainer=FakeExplainer())
    first = callbacks.search("magenta", 5, "", engine)
    assert "⏳" in first.status and first.status.startswith(first.state.summary)
    assert "no explanation model is loaded" not in first.explanations  # one is: say what will come
    views = list(
        callbacks.explain(first.state, engine, interval_s=0.0, note=lambda: "⚠️ Please describe it first.")
    )
    statuses = [v.status for v in views if v.status is not None]
    assert "Writing reasons for #1, #2, #3…" in statuses[0]
    assert any("Writing a reason for #3…" in s for s in statuses)
    assert "⏳" not in statuses[-1] and statuses[-1].startswith(first.state.summary)  # cleared at the end
    assert all("Please describe it first" in s for s in statuses)  # an input error since stays shown


def test_a_tile_beyond_the_top_three_is_explained_on_request(backend: tuple[FakeRetriever, Any]) -> None:
    explainer = FakeExplainer()
    engine = callbacks.make_engine(*backend, explainer=explainer)
    first = callbacks.search("magenta", 6, "", engine)
    auto = list(callbacks.explain(first.state, engine, interval_s=0.0))[-1].state
    assert set(auto.reasons) == {1, 2, 3} and explainer.reason_calls == 3
    assert "Explain the selected tile" in callbacks.explanations_md(auto, explainer=True)
    views = list(callbacks.explain(auto, engine, interval_s=0.0, ranks=[5]))
    assert set(views[-1].state.reasons) == {1, 2, 3, 5} and explainer.reason_calls == 4
    assert explainer.confidence_calls == 1  # the confidence is not estimated again
    popups = json.loads(next(v.map_update for v in reversed(views) if v.map_update))["popups"]
    assert "Why:" in popups["5"] and "Why:" not in popups["4"]


def test_a_reason_steps_aside_for_a_search_and_is_written_again() -> None:
    turns = callbacks.ModelTurns()
    started = threading.Event()
    closed: list[int] = []

    def reason(query: str, hit: Any) -> Iterator[str]:
        try:
            for i in range(6):
                if i == 2 and not closed:
                    started.set()
                    time.sleep(0.3)  # a search arrives while this reason is being written
                yield f"w{i} "
        finally:
            closed.append(1)

    def search_meanwhile() -> None:
        started.wait(5)
        with turns.urgent():
            time.sleep(0.6)  # still waiting for (holding) the model when the next token comes

    hit = types.SimpleNamespace(
        rank=1, score=0.5, tile_id="t", lat=0.0, lon=0.0, bbox=(0, 0, 1, 1), image_path=""
    )
    engine = Engine(rank=lambda q, k, w: [hit], confidence=lambda q, hits: [0.5], reason=reason, turns=turns)
    state = SearchState(query="q", hits=[hit], confidences=[1.0], search_id="s")
    other = threading.Thread(target=search_meanwhile)
    other.start()
    views = list(callbacks.explain(state, engine, interval_s=0.0))
    other.join()
    assert len(closed) == 2  # the first attempt was closed (its generation stops), then written again
    assert views[-1].state.reasons[1] == "w0 w1 w2 w3 w4 w5"


class GivingWayExplainer(FakeExplainer):
    """Reasons that take yield_to, like the real Explainer: on a shared model they stop with
    ReasonInterrupted while a search waits; on their own copy (own_model) they pause and go on."""

    def __init__(self, own_model: bool) -> None:
        super().__init__()
        self.own_model = own_model
        self.seen_yield_to: list[bool] = []

    def reason(self, query: str, hit: Any, yield_to: Any = None) -> Iterator[str]:
        self.reason_calls += 1
        yield "Evidence first. "
        for i in range(4):
            waiting = bool(yield_to and yield_to())
            self.seen_yield_to.append(waiting)
            if waiting and not self.own_model:
                raise ReasonInterrupted("a search needs the model")
            while waiting and yield_to():
                time.sleep(0.01)
            time.sleep(0.1)
            yield f"w{i} "


@pytest.mark.parametrize("own_model", [False, True])
def test_a_search_gets_the_model_from_a_reason_that_gives_way(backend, own_model: bool) -> None:
    explainer = GivingWayExplainer(own_model)
    engine = callbacks.make_engine(*backend, explainer=explainer)
    assert engine.reason_pauses is own_model
    state = callbacks.search("magenta", 1, "", engine).state
    searched = threading.Event()

    def search_meanwhile() -> None:
        time.sleep(0.15)  # while the reason writes its words
        with engine.turns.urgent():
            time.sleep(0.3)
        searched.set()

    other = threading.Thread(target=search_meanwhile)
    other.start()
    views = list(callbacks.explain(state, engine, interval_s=0.0))
    other.join()
    assert searched.is_set() and views[-1].state.reasons[1].strip() == "Evidence first. w0 w1 w2 w3"
    if own_model:  # it saw the search waiting, paused and went on: written once
        assert True in explainer.seen_yield_to and explainer.reason_calls == 1
    else:  # stopped (by itself or by the page) and written again
        assert explainer.reason_calls == 2


def test_a_reason_interrupted_for_a_search_is_written_again() -> None:
    calls: list[int] = []

    def reason(query: str, hit: Any) -> Iterator[str]:
        calls.append(1)
        yield "Evidence first. "
        if len(calls) == 1:
            raise ReasonInterrupted("a search needs the model")  # as the Explainer does on a shared model
        yield "The tile shows a square."

    hit = types.SimpleNamespace(
        rank=1, score=0.5, tile_id="t", lat=0.0, lon=0.0, bbox=(0, 0, 1, 1), image_path=""
    )
    engine = Engine(rank=lambda q, k, w: [hit], confidence=lambda q, hits: [0.5], reason=reason)
    state = SearchState(query="q", hits=[hit], confidences=[1.0], search_id="s")
    views = list(callbacks.explain(state, engine, interval_s=0.0))
    assert len(calls) == 2 and views[-1].state.reasons[1] == "Evidence first. The tile shows a square."
    assert not any("no explanation" in (v.explanations or "") for v in views)  # not shown as a failure


def test_a_newer_search_stops_the_older_explanations() -> None:
    latest = callbacks.LatestSearch(max_sessions=2)
    latest.start("alice", "s1")
    assert latest.is_current("alice", "s1")
    latest.note("alice", "⚠️ bad area")
    assert latest.note_for("alice") == "⚠️ bad area"
    latest.start("alice", "s2")
    assert not latest.is_current("alice", "s1") and latest.is_current("alice", "s2")
    assert latest.note_for("alice") is None  # a new search clears the old message
    latest.start("bob", "b1")
    latest.start("carol", "c1")  # bounded: the oldest session is forgotten
    assert latest.is_current("alice", "anything") and not latest.is_current("carol", "x")

    def reason(query: str, hit: Any) -> Iterator[str]:
        yield from ("a ", "b ", "c ")

    hit = types.SimpleNamespace(
        rank=1, score=0.5, tile_id="t", lat=0.0, lon=0.0, bbox=(0, 0, 1, 1), image_path=""
    )
    engine = Engine(rank=lambda q, k, w: [hit], confidence=lambda q, hits: [0.5], reason=reason)
    state = SearchState(query="q", hits=[hit], confidences=[1.0], search_id="old")
    views = list(callbacks.explain(state, engine, interval_s=0.0, is_current=lambda: False))
    assert views == []  # superseded before it wrote anything: nothing overwrites the newer results


def test_a_search_registers_itself_before_it_hands_the_model_back(engine: Engine) -> None:
    seen: list[bool] = []
    view = callbacks.search("red", 3, "", engine, on_ranked=lambda: seen.append(engine.turns.pending()))
    assert view.state is not None and seen == [True]  # older explanations wake up to a newer search
    assert not engine.turns.pending()
    assert callbacks.search("", 3, "", engine, on_ranked=lambda: seen.append(False)).state is None
    assert seen == [True]  # an input error supersedes nothing
