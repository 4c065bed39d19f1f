"""Folium map of ranked tiles that renders offline: inlined Leaflet/jQuery, our own tiles as overlays."""

from __future__ import annotations

import base64
import html
import importlib
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import branca.element
import folium
import xyzservices.providers as xyz
from PIL import Image

log = logging.getLogger(__name__)

OSM_ATTRIBUTION = '© <a href="https://www.openstreetmap.org/copyright" target="_blank" rel="noopener">OpenStreetMap</a> contributors'
THUMB_SIDE = 256  # px; popups and overlays share one small JPEG per tile
MAP_HEIGHT_PX = 520


class HitLike(Protocol):
    """The fields of retriever.index.Hit that the map reads."""

    rank: int
    tile_id: str
    score: float
    lat: float
    lon: float
    bbox: tuple[float, float, float, float]  # west, south, east, north
    image_path: str


# --- Local copies of the JS/CSS that Folium would fetch from CDNs --------------------------------
# Folium asset name -> (xstatic package, file). Order matters: jQuery and Leaflet load before plugins.
LOCAL_JS: dict[str, tuple[str, str]] = {
    "jquery": ("jquery", "jquery.min.js"),
    "leaflet": ("leaflet", "leaflet.js"),
    "markerclusterjs": ("leaflet_markercluster", "leaflet.markercluster.js"),
}
LOCAL_CSS: dict[str, tuple[str, str]] = {
    "leaflet_css": ("leaflet", "leaflet.css"),
    "markerclustercss": ("leaflet_markercluster", "MarkerCluster.css"),
    "markerclusterdefaultcss": ("leaflet_markercluster", "MarkerCluster.Default.css"),
}
# Folium defaults we do not need (Bootstrap, Awesome Markers): dropped rather than fetched.
NOT_NEEDED = {
    "bootstrap",
    "bootstrap_css",
    "glyphicons_css",
    "awesome_markers",
    "awesome_markers_css",
    "awesome_markers_font_css",
    "awesome_rotate_css",
}

MAP_CSS = """
.geotext-rank{box-sizing:border-box;width:26px;height:26px;border-radius:13px;border:2px solid #fff;
  display:flex;align-items:center;justify-content:center;color:#fff;font:bold 13px system-ui,sans-serif;
  box-shadow:0 1px 4px rgba(0,0,0,.5);cursor:pointer}
.geotext-popup{font:13px/1.35 system-ui,sans-serif;min-width:200px}
.geotext-popup img{display:block;width:150px;height:150px;object-fit:contain;margin:4px 0;border-radius:4px;background:#eee}
.geotext-popup table{border-collapse:collapse;margin:4px 0}
.geotext-popup th{text-align:left;padding-right:8px;font-weight:600}
.geotext-popup .q,.geotext-popup .why,.geotext-popup .marks{margin:4px 0;white-space:pre-wrap;overflow-wrap:anywhere}
.geotext-popup .mark.tile{color:#1a7f37}.geotext-popup .mark.miss{color:#b42318}.geotext-popup .mark.nearby{color:#8a6d00}
.geotext-popup .muted{color:#777}
.leaflet-container{background:#e8e8e8}
"""


def _xstatic_dir(package: str) -> Path:
    return Path(importlib.import_module(f"xstatic.pkg.{package}").BASE_DIR)


@cache
def _inline_js(package: str, filename: str) -> str:
    code = (_xstatic_dir(package) / filename).read_text(encoding="utf-8")
    code = re.sub(
        r"//# sourceMappingURL=\S+", "", code
    )  # the map file would be fetched relative to about:srcdoc
    return code.replace("</script", "<\\/script")


@cache
def _inline_css(package: str, filename: str) -> str:
    folder = _xstatic_dir(package)
    css = (folder / filename).read_text(encoding="utf-8")

    def to_data_uri(match: re.Match[str]) -> str:
        path = folder / match.group(1)
        if not path.is_file():  # e.g. url(#default#VML)
            return match.group(0)
        return f"url(data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"url\(([^)#:]+\.png)\)", to_data_uri, css).replace("</style", "<\\/style")


def _walk(element: branca.element.Element) -> list[branca.element.Element]:
    out = [element]
    for child in list(element._children.values()):
        out.extend(_walk(child))
    return out


def use_local_assets(m: folium.Map) -> None:
    """Swap every CDN link Folium would emit for an inline copy from the XStatic packages."""
    needed_js: set[str] = set()
    needed_css: set[str] = set()
    for element in _walk(m):
        for name, url in getattr(element, "default_js", []):
            needed_js.add(name) if name in LOCAL_JS else _drop(name, url)
        for name, url in getattr(element, "default_css", []):
            needed_css.add(name) if name in LOCAL_CSS else _drop(name, url)
        if hasattr(element, "default_js"):
            element.default_js = []  # instance attributes shadow the class-level CDN lists
            element.default_css = []
    header = m.get_root().header
    for name, (package, filename) in LOCAL_CSS.items():
        if name in needed_css:
            header.add_child(
                branca.element.Element(f"<style>{_inline_css(package, filename)}</style>"), name=name
            )
    for name, (package, filename) in LOCAL_JS.items():
        if name in needed_js:
            header.add_child(
                branca.element.Element(f"<script>{_inline_js(package, filename)}</script>"), name=name
            )
    header.add_child(branca.element.Element(f"<style>{MAP_CSS}</style>"), name="geotext_css")


def _drop(name: str, url: str) -> None:
    if name not in NOT_NEEDED:
        raise ValueError(f"Folium asset {name!r} ({url}) has no local copy; add it to LOCAL_JS/LOCAL_CSS.")


# --- Escaping -----------------------------------------------------------------------------------
def text(value: object) -> str:
    """HTML-escape, and also neutralise what a JS template literal would interpret (` $ \\)."""
    escaped = html.escape(str(value), quote=True)
    return escaped.replace("`", "&#96;").replace("$", "&#36;").replace("\\", "&#92;")


# --- Thumbnails ---------------------------------------------------------------------------------
@lru_cache(maxsize=512)
def _thumbnail_cached(path: str, mtime: float, side: int) -> bytes | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            return buffer.getvalue()
    except (OSError, ValueError) as error:
        log.warning("cannot read thumbnail %s: %s", path, error)
        return None


def thumbnail_jpeg(path: str | Path, side: int = THUMB_SIDE) -> bytes | None:
    """A small JPEG of the tile, or None when the file cannot be read."""
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        log.warning("thumbnail missing: %s", path)
        return None
    return _thumbnail_cached(str(path), mtime, side)


def thumbnail_data_uri(path: str | Path, side: int = THUMB_SIDE) -> str | None:
    data = thumbnail_jpeg(path, side)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode()


# --- Colours and links --------------------------------------------------------------------------
RANK_COLOURS = ["#d7191c", "#e8552d", "#f48b3f", "#fdb863", "#b8d98a", "#80bfa8", "#4a9bc4", "#2c7bb6"]


def rank_colour(rank: int, n: int) -> str:
    """Warm for the best ranks, cool for the last: the same scale whatever K is."""
    position = 0.0 if n <= 1 else (rank - 1) / (n - 1)
    return RANK_COLOURS[min(len(RANK_COLOURS) - 1, int(position * (len(RANK_COLOURS) - 1) + 0.5))]


def osm_url(lat: float, lon: float, zoom: int = 18) -> str:
    return f"https://www.openstreetmap.org/?{urlencode({'mlat': f'{lat:.6f}', 'mlon': f'{lon:.6f}'})}#map={zoom}/{lat:.6f}/{lon:.6f}"


# --- Base layers: one offline, the others need the internet -------------------------------------
BASEMAPS: dict[str, Callable[[bool], folium.map.Layer]] = {
    "offline": lambda show: folium.FeatureGroup(name="Result tiles only (offline)", overlay=False, show=show),
    "osm": lambda show: folium.TileLayer(xyz.OpenStreetMap.Mapnik, name="OpenStreetMap (online)", show=show),
    "satellite": lambda show: folium.TileLayer(
        xyz.Esri.WorldImagery, name="Satellite, Esri (online)", show=show
    ),
}


class _Attribution(folium.MacroElement):
    """Adds a permanent attribution line: our tiles and footprints come from OSM data."""

    _template = folium.template.Template(
        "{% macro script(this, kwargs) %}{{ this._parent.get_name() }}.attributionControl"
        ".addAttribution({{ this.text|tojson }});{% endmacro %}"
    )

    def __init__(self, text_html: str) -> None:
        super().__init__()
        self.text = text_html


class _OpenPopup(folium.MacroElement):
    """Opens a marker's popup once every layer is on the map (folium's `show=True` fires too early)."""

    _template = folium.template.Template(
        "{% macro script(this, kwargs) %}{{ this.marker.get_name() }}.openPopup();{% endmacro %}"
    )

    def __init__(self, marker: folium.Marker) -> None:
        super().__init__()
        self.marker = marker


# --- The map ------------------------------------------------------------------------------------
MARK_SYMBOLS = {"tile": "✓", "nearby": "≈ nearby", "miss": "✗"}  # evidence status -> what the page shows
MARK_TITLES = {"tile": "in this tile", "nearby": "within 100 m of this tile", "miss": "not in this tile"}


def marks_html(marks: Sequence[tuple[str, str, str]] | None) -> str:
    """The query's words with ✓ / ≈ nearby / ✗ marks; words escaped and isolated (<bdi>) from the layout."""
    if not marks:
        return ""
    spans = []
    for surface, status, matched in marks:
        title = MARK_TITLES.get(status, "")
        if matched and status != "miss":
            title = f"{title}: {matched}"
        spans.append(
            f'<span class="mark {text(status)}" title="{text(title)}">{text(MARK_SYMBOLS.get(status, "?"))} '
            f"<bdi>{text(surface)}</bdi></span>"
        )
    return f'<div class="marks"><b>Evidence:</b> {" · ".join(spans)}</div>'


def popup_html(
    hit: HitLike,
    query: str,
    confidence: float | None,
    reason: str | None,
    thumb_uri: str | None,
    marks: Sequence[tuple[str, str, str]] | None = None,
) -> str:
    """The popup of one tile; every value is escaped, since jQuery parses this as live HTML."""
    rows = [
        ("Rank", f"#{int(hit.rank)}"),
        ("Score", f"{float(hit.score):.3f}"),
        ("Confidence", "—" if confidence is None else f"{float(confidence):.2f}"),
        ("Lat, lon", f"{float(hit.lat):.5f}, {float(hit.lon):.5f}"),
        ("Tile", str(hit.tile_id)),
    ]
    table = "".join(f"<tr><th>{text(k)}</th><td>{text(v)}</td></tr>" for k, v in rows)
    image = (
        f'<img src="{thumb_uri}" alt="tile {text(hit.tile_id)}">'
        if thumb_uri
        else '<div class="muted">thumbnail unavailable</div>'
    )
    why = f'<div class="why"><b>Why:</b> <bdi>{text(reason)}</bdi></div>' if reason else ""
    query_html = f'<div class="q"><b>Query:</b> <bdi>{text(query)}</bdi></div>' if query else ""
    link = f'<a href="{text(osm_url(hit.lat, hit.lon))}" target="_blank" rel="noopener noreferrer">Open in OpenStreetMap</a>'
    return f'<div class="geotext-popup">{image}<table>{table}</table>{query_html}{marks_html(marks)}{why}{link}</div>'


def hits_to_map(
    hits: Sequence[HitLike],
    query: str = "",
    confidences: Sequence[float] | None = None,
    reasons: Mapping[int, str] | None = None,
    focus: int | None = None,
    basemap: str = "offline",
    overlays: bool = True,
    marks: Mapping[int, Sequence[tuple[str, str, str]]] | None = None,
) -> folium.Map:
    """Numbered markers, rank-coloured footprints and thumbnail overlays of the hits, fitted to them.

    `reasons` maps a rank to its explanation, `marks` to its evidence marks; `focus` (a rank) zooms to that tile and opens its popup.
    """
    if basemap not in BASEMAPS:
        raise ValueError(f"unknown basemap {basemap!r}; choose one of {sorted(BASEMAPS)}")
    reasons = reasons or {}
    m = folium.Map(location=_centre(hits), zoom_start=2 if not hits else 15, tiles=None, control_scale=True)
    for name, make in BASEMAPS.items():
        make(name == basemap).add_to(m)
    _Attribution(OSM_ATTRIBUTION).add_to(m)

    tiles_group = folium.FeatureGroup(name="Result tiles (images)", show=overlays).add_to(m)
    footprint_group = folium.FeatureGroup(name="Footprints").add_to(m)
    marker_group = folium.FeatureGroup(name="Ranked markers").add_to(m)
    n = len(hits)
    focus_hit, focus_marker = None, None
    for i, hit in enumerate(hits):
        colour = rank_colour(int(hit.rank), n)
        west, south, east, north = (float(v) for v in hit.bbox)
        thumb_uri = thumbnail_data_uri(hit.image_path)
        if thumb_uri:
            folium.raster_layers.ImageOverlay(
                image=thumb_uri, bounds=[[south, west], [north, east]], opacity=0.9, pixelated=False
            ).add_to(tiles_group)
        folium.Polygon(
            locations=_footprint_latlons(hit),
            color=colour,
            weight=3,
            fill=True,
            fill_opacity=0.08,
            tooltip=folium.Tooltip(text(f"#{hit.rank} footprint")),
        ).add_to(footprint_group)
        confidence = confidences[i] if confidences is not None and i < len(confidences) else None
        popup = folium.Popup(
            popup_html(
                hit,
                query,
                confidence,
                reasons.get(int(hit.rank)),
                thumb_uri,
                (marks or {}).get(int(hit.rank)),
            ),
            max_width=260,
        )
        marker = folium.Marker(
            location=[float(hit.lat), float(hit.lon)],
            icon=folium.DivIcon(
                html=f'<div class="geotext-rank" style="background:{colour}">{int(hit.rank)}</div>',
                icon_size=(26, 26),
                icon_anchor=(13, 13),
                class_name="geotext-marker",
            ),
            popup=popup,
            tooltip=folium.Tooltip(text(f"#{hit.rank} · {float(hit.score):.3f}")),
        ).add_to(marker_group)
        if focus == int(hit.rank):
            focus_hit, focus_marker = hit, marker

    bounds = _bounds([focus_hit] if focus_hit is not None else hits)
    if focus_hit is not None:  # leave room above the tile for its open popup
        m.fit_bounds(bounds, padding_top_left=(40, 300), padding_bottom_right=(40, 16), max_zoom=18)
    elif bounds:
        m.fit_bounds(bounds, padding=(24, 24), max_zoom=18)
    folium.LayerControl(collapsed=True).add_to(m)
    if focus_marker is not None:
        _OpenPopup(focus_marker).add_to(m)
    use_local_assets(m)
    return m


def _centre(hits: Sequence[HitLike]) -> list[float]:
    if not hits:
        return [20.0, 0.0]
    return [sum(float(h.lat) for h in hits) / len(hits), sum(float(h.lon) for h in hits) / len(hits)]


def _bounds(hits: Sequence[HitLike]) -> list[list[float]] | None:
    if not hits:
        return None
    west = min(float(h.bbox[0]) for h in hits)
    south = min(float(h.bbox[1]) for h in hits)
    east = max(float(h.bbox[2]) for h in hits)
    north = max(float(h.bbox[3]) for h in hits)
    return [[south, west], [north, east]]


def _footprint_latlons(hit: HitLike) -> list[list[float]]:
    """The footprint ring as [lat, lon] pairs; the bbox when the hit carries no polygon."""
    footprint: Any = getattr(hit, "footprint", None)
    if footprint is not None and getattr(footprint, "exterior", None) is not None:
        return [[float(y), float(x)] for x, y in footprint.exterior.coords]
    west, south, east, north = (float(v) for v in hit.bbox)
    return [[south, west], [south, east], [north, east], [north, west]]


def map_page(m: folium.Map) -> str:
    """The map as a standalone HTML page (no external scripts or styles)."""
    return m.get_root().render()


def map_iframe(m: folium.Map | str, height: int = MAP_HEIGHT_PX) -> str:
    """The map in a sandboxed iframe: scripts run inside it but cannot reach the Gradio page."""
    page = m if isinstance(m, str) else map_page(m)
    return (
        f'<iframe class="geotext-map" title="Map of the results" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width:100%;height:{int(height)}px;border:0;border-radius:8px" '
        'sandbox="allow-scripts allow-popups allow-popups-to-escape-sandbox" loading="eager"></iframe>'
    )


def empty_map_iframe(height: int = MAP_HEIGHT_PX) -> str:
    return map_iframe(hits_to_map([]), height)
