"""Folium map of ranked tiles that works offline: Leaflet and the gallery mosaic served by URL, updates by message."""

from __future__ import annotations

import hashlib
import html
import importlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import branca.element
import folium
import xyzservices.providers as xyz
from PIL import Image

log = logging.getLogger(__name__)

OSM_ATTRIBUTION = '© <a href="https://www.openstreetmap.org/copyright" target="_blank" rel="noopener">OpenStreetMap</a> contributors'
THUMB_SIDE = 256  # px; popups, the gallery and the mosaic share one small JPEG per tile
MAP_HEIGHT_PX = 520
MOSAIC_MAX_TILES = 4000  # beyond this the basemap would cost more than it shows: the extent is outlined only
# Relative to the page, so it also works under a proxy's path prefix; srcdoc iframes resolve against the page.
FILE_ROUTE = "gradio_api/file="


class HitLike(Protocol):
    """The fields of retriever.index.Hit that the map reads."""

    rank: int
    tile_id: str
    score: float
    lat: float
    lon: float
    bbox: tuple[float, float, float, float]  # west, south, east, north
    image_path: str


# --- Files the browser fetches once by URL (Gradio static paths) --------------------------------
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
.geotext-dot .geotext-rank{transform:scale(.42);font-size:0}
.geotext-popup{font:13px/1.35 system-ui,sans-serif;min-width:200px}
.geotext-popup img{display:block;width:150px;height:150px;object-fit:contain;margin:4px 0;border-radius:4px;background:#eee}
.geotext-popup table{border-collapse:collapse;margin:4px 0}
.geotext-popup th{text-align:left;padding-right:8px;font-weight:600}
.geotext-popup .q,.geotext-popup .why,.geotext-popup .marks{margin:4px 0;white-space:pre-wrap;overflow-wrap:anywhere}
.geotext-popup .mark.tile{color:#1a7f37}.geotext-popup .mark.miss{color:#b42318}.geotext-popup .mark.nearby{color:#8a6d00}
.geotext-popup .muted{color:#777}
.leaflet-popup-content{max-height:calc(100vh - 110px);overflow-y:auto;overscroll-behavior:contain}
.geotext-extent-label{font:600 12px system-ui,sans-serif;color:#1f3b73;background:rgba(255,255,255,.85);
  padding:2px 6px;border-radius:4px;white-space:nowrap;pointer-events:none;width:auto !important;height:auto !important}
.geotext-note{font:12px system-ui,sans-serif;background:rgba(255,255,255,.92);padding:4px 8px;border-radius:4px;max-width:260px}
.leaflet-container{background:#e8e8e8}
"""


def _xstatic_dir(package: str) -> Path:
    return Path(importlib.import_module(f"xstatic.pkg.{package}").BASE_DIR)


def thumbs_root() -> Path:
    """The folder of content-named thumbnails: the only tile images the server hands out."""
    root = Path(tempfile.gettempdir()) / "geotext-app-thumbs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def assets_root() -> Path:
    """The folder of the map's scripts and styles as served: copies, so URLs never show the server's paths."""
    root = Path(tempfile.gettempdir()) / "geotext-app-assets"
    root.mkdir(parents=True, exist_ok=True)
    return root


@cache
def asset_file(package: str, filename: str) -> Path:
    """An XStatic file (with the images next to it, which Leaflet's CSS names) copied into assets_root()."""
    module = importlib.import_module(f"xstatic.pkg.{package}")
    folder = assets_root() / f"{package}-{getattr(module, 'VERSION', 'x')}"
    source = _xstatic_dir(package)
    for path in [source / filename, *sorted((source / "images").glob("*.png"))]:
        target = folder / path.relative_to(source)
        if not target.is_file() or target.stat().st_size != path.stat().st_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(dir=target.parent, prefix=".asset-")
            with os.fdopen(fd, "wb") as f:
                f.write(path.read_bytes())
            os.replace(staging, target)
    return folder / filename


def static_dirs() -> list[Path]:
    """Folders the app serves as static files: the map's scripts and styles, and the thumbnails."""
    return [assets_root(), thumbs_root()]


def file_url(path: str | Path) -> str:
    """The URL (relative to the page) at which Gradio serves a file under static_dirs()."""
    return FILE_ROUTE + quote(str(Path(path).resolve()), safe="/")


def _walk(element: branca.element.Element) -> list[branca.element.Element]:
    out = [element]
    for child in list(element._children.values()):
        out.extend(_walk(child))
    return out


def use_local_assets(m: folium.Map) -> None:
    """Swap every CDN link Folium would emit for the app's own copy of the file, served by URL."""
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
            href = text(file_url(asset_file(package, filename)))
            header.add_child(branca.element.Element(f'<link rel="stylesheet" href="{href}">'), name=name)
    for name, (package, filename) in LOCAL_JS.items():
        if name in needed_js:
            src = text(file_url(asset_file(package, filename)))
            header.add_child(branca.element.Element(f'<script src="{src}"></script>'), name=name)
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


@lru_cache(maxsize=8192)
def _thumbnail_file_cached(path: str, mtime: float) -> str | None:
    data = thumbnail_jpeg(path)
    if data is None:
        return None
    target = thumbs_root() / f"{hashlib.sha256(data).hexdigest()[:32]}.jpg"
    if not target.exists():  # written once, atomically: concurrent readers never see half a file
        fd, staging = tempfile.mkstemp(dir=target.parent, prefix=".thumb-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, target)
    return str(target)


def thumbnail_file(path: str | Path) -> str | None:
    """The tile's thumbnail as a file named by its content in thumbs_root(); None when unreadable."""
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        log.warning("thumbnail missing: %s", path)
        return None
    return _thumbnail_file_cached(str(path), mtime)


def thumbnail_url(path: str | Path) -> str | None:
    found = thumbnail_file(path)
    return None if found is None else file_url(found)


# --- Colours and links --------------------------------------------------------------------------
RANK_COLOURS = ["#d7191c", "#e8552d", "#f48b3f", "#fdb863", "#b8d98a", "#80bfa8", "#4a9bc4", "#2c7bb6"]


def rank_colour(rank: int, n: int) -> str:
    """Warm for the best ranks, cool for the last: the same scale whatever K is."""
    position = 0.0 if n <= 1 else (rank - 1) / (n - 1)
    return RANK_COLOURS[min(len(RANK_COLOURS) - 1, int(position * (len(RANK_COLOURS) - 1) + 0.5))]


def osm_url(lat: float, lon: float, zoom: int = 18) -> str:
    return f"https://www.openstreetmap.org/?{urlencode({'mlat': f'{lat:.6f}', 'mlon': f'{lon:.6f}'})}#map={zoom}/{lat:.6f}/{lon:.6f}"


# --- The gallery: every tile the app can answer with, as the offline basemap ----------------------
@dataclass(frozen=True)
class GalleryMap:
    """The gallery's tiles as (thumbnail URL, west, south, east, north), and its extent."""

    tiles: tuple[tuple[str, float, float, float, float], ...]
    extent: tuple[float, float, float, float] | None  # west, south, east, north
    count: int
    label: str = "Gallery"

    @classmethod
    def from_tiles(cls, tiles: Sequence[HitLike], label: str = "Gallery") -> GalleryMap:
        """From hit-like records of every tile; the mosaic is skipped for very large galleries."""
        if not tiles:
            return cls((), None, 0, label)
        bboxes = [tuple(float(v) for v in t.bbox) for t in tiles]
        extent = (
            min(b[0] for b in bboxes),
            min(b[1] for b in bboxes),
            max(b[2] for b in bboxes),
            max(b[3] for b in bboxes),
        )
        mosaic: list[tuple[str, float, float, float, float]] = []
        if len(tiles) <= MOSAIC_MAX_TILES:
            for tile, (w, s, e, n) in zip(tiles, bboxes, strict=True):
                url = thumbnail_url(tile.image_path)
                if url is not None:
                    mosaic.append((url, w, s, e, n))
        return cls(tuple(mosaic), extent, len(tiles), label)

    def caption(self) -> str:
        plural = "tile" if self.count == 1 else "tiles"
        return f"{self.label}: {self.count:,} {plural}; searches answer inside this outline"


# --- Base layers: one offline, the others need the internet -------------------------------------
OFFLINE_NAME = "Gallery map (offline)"
BASEMAPS: dict[str, Callable[[bool], folium.map.Layer]] = {
    "offline": lambda show: folium.FeatureGroup(name=OFFLINE_NAME, overlay=False, show=show),
    # the same attribution text as ours: Leaflet shows an identical line once
    "osm": lambda show: folium.TileLayer(
        xyz.OpenStreetMap.Mapnik, name="OpenStreetMap (online)", attr=OSM_ATTRIBUTION, show=show
    ),
    "satellite": lambda show: folium.TileLayer(
        xyz.Esri.WorldImagery, name="Satellite, Esri (online)", show=show
    ),
}


class _Script(folium.MacroElement):
    """A block of the map's script, rendered after the elements it refers to."""

    _template = folium.template.Template("{% macro script(this, kwargs) %}{{ this.code }}{% endmacro %}")

    def __init__(self, code: str) -> None:
        super().__init__()
        self.code = code


def _mosaic_js(group: str, gallery: GalleryMap) -> str:
    tiles = json.dumps(
        [[u, round(s, 7), round(w, 7), round(n, 7), round(e, 7)] for u, w, s, e, n in gallery.tiles]
    )
    return (
        f"{tiles}.forEach(function(t){{L.imageOverlay(t[0],[[t[1],t[2]],[t[3],t[4]]],"
        f"{{interactive:false,className:'geotext-mosaic'}}).addTo({group});}});"
    )


# The bridge between the page and the map: popups and focus arrive by postMessage from the parent page,
# so a streamed update never redraws the map (zoom, open popup and the user's choice are kept).
BRIDGE_JS = """
(function(){
  var map = %(map)s, SEARCH = %(search)s, markers = %(markers)s, bounds = %(bounds)s;
  var offline = %(offline)s, online = %(online)s, focusSeq = -1;
  function apply(d){
    if (!d || d.search !== SEARCH) return;
    var popups = d.popups || {};
    Object.keys(popups).forEach(function(r){
      var m = markers[r], p = m && m.getPopup();
      if (p && p.getContent() !== popups[r]) p.setContent(popups[r]);
    });
    if (d.focus != null && d.focus_seq > focusSeq && markers[d.focus]) {
      focusSeq = d.focus_seq;
      focus(d.focus, focusSeq);
    }
  }
  // Leaflet ignores a setView made while a zoom animates (the user's wheel or +/-), and the popup would
  // then auto-pan against a view that is about to change: fit and open only once the zoom has ended.
  function focus(rank, seq){
    if (seq !== focusSeq) return;  // a later choice has arrived meanwhile
    if (map._animatingZoom) { map.once('zoomend', function(){ focus(rank, seq); }); return; }
    map.invalidateSize({pan: false});  // the fit and the auto-pan measure the container as it is now
    map.closePopup();
    map.fitBounds(bounds[rank], {maxZoom: 18, padding: [24, 24], animate: false});
    markers[rank].openPopup();
  }
  window.addEventListener('message', function(e){ if (e.source === window.parent) apply(e.data); });
  // Numbered markers that would overlap a better-ranked one shrink to dots until the user zooms in.
  function declutter(){
    var placed = [];
    Object.keys(markers).map(Number).sort(function(a, b){ return a - b; }).forEach(function(r){
      var m = markers[r], el = m.getElement();
      if (!el) return;
      var p = map.latLngToLayerPoint(m.getLatLng());
      var clash = placed.some(function(q){ return Math.abs(q.x - p.x) < 28 && Math.abs(q.y - p.y) < 28; });
      el.classList.toggle('geotext-dot', clash);
      if (!clash) placed.push(p);
    });
  }
  map.on('zoomend viewreset', declutter);
  map.whenReady(function(){ setTimeout(declutter, 0); });
  // An online layer that cannot load says so once and hands back to the offline map.
  online.forEach(function(layer){
    var failed = false;
    layer.on('tileerror', function(){
      if (failed) return;
      failed = true;
      map.removeLayer(layer);
      if (offline && !map.hasLayer(offline)) offline.addTo(map);
      var note = L.control({position: 'bottomleft'});
      note.onAdd = function(){
        var div = L.DomUtil.create('div', 'geotext-note');
        div.textContent = (layer.options.geotextName || 'That layer') +
          ' needs the internet and could not be reached; showing the offline gallery map.';
        return div;
      };
      note.addTo(map);
      setTimeout(function(){ note.remove(); }, 8000);
    });
  });
  L.control.scale({position: 'topright'}).addTo(map);  // bottom-left would cover the attribution on a phone
  window.parent.postMessage({geotext: 'ready', search: SEARCH}, '*');
})();
"""


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
    thumb_url: str | None,
    marks: Sequence[tuple[str, str, str]] | None = None,
) -> str:
    """The popup of one tile; every value is escaped, since Leaflet sets this as live HTML."""
    rows = [
        ("Rank", f"#{int(hit.rank)}"),
        ("Score", f"{float(hit.score):.3f}"),
        ("Confidence", "—" if confidence is None else f"{float(confidence):.2f}"),
        ("Lat, lon", f"{float(hit.lat):.5f}, {float(hit.lon):.5f}"),
        ("Tile", str(hit.tile_id)),
    ]
    table = "".join(f"<tr><th>{text(k)}</th><td>{text(v)}</td></tr>" for k, v in rows)
    image = (
        f'<img src="{text(thumb_url)}" width="150" height="150" alt="tile {text(hit.tile_id)}">'
        if thumb_url
        else '<div class="muted">thumbnail unavailable</div>'
    )
    why = f'<div class="why"><b>Why:</b> <bdi>{text(reason)}</bdi></div>' if reason else ""
    query_html = f'<div class="q"><b>Query:</b> <bdi>{text(query)}</bdi></div>' if query else ""
    link = f'<a href="{text(osm_url(hit.lat, hit.lon))}" target="_blank" rel="noopener noreferrer">Open in OpenStreetMap</a>'
    return f'<div class="geotext-popup">{image}<table>{table}</table>{query_html}{marks_html(marks)}{why}{link}</div>'


def popups(
    hits: Sequence[HitLike],
    query: str = "",
    confidences: Sequence[float] | None = None,
    reasons: Mapping[int, str] | None = None,
    marks: Mapping[int, Sequence[tuple[str, str, str]]] | None = None,
) -> dict[str, str]:
    """Rank (as text, a JSON key) -> popup HTML, for every hit."""
    out = {}
    for i, hit in enumerate(hits):
        rank = int(hit.rank)
        confidence = confidences[i] if confidences is not None and i < len(confidences) else None
        out[str(rank)] = popup_html(
            hit,
            query,
            confidence,
            (reasons or {}).get(rank),
            thumbnail_url(hit.image_path),
            (marks or {}).get(rank),
        )
    return out


def hits_to_map(
    hits: Sequence[HitLike],
    query: str = "",
    confidences: Sequence[float] | None = None,
    reasons: Mapping[int, str] | None = None,
    basemap: str = "offline",
    marks: Mapping[int, Sequence[tuple[str, str, str]]] | None = None,
    gallery: GalleryMap | None = None,
    search_id: str = "",
) -> folium.Map:
    """Numbered markers and rank-coloured footprints of the hits over the gallery mosaic, fitted to the hits
    (to the gallery when there are none). Later popups and focus arrive as messages tagged with search_id.
    """
    if basemap not in BASEMAPS:
        raise ValueError(f"unknown basemap {basemap!r}; choose one of {sorted(BASEMAPS)}")
    m = folium.Map(location=_centre(hits), zoom_start=2 if not hits else 15, tiles=None, control_scale=False)
    layers = {name: make(name == basemap) for name, make in BASEMAPS.items()}
    for layer in layers.values():
        layer.add_to(m)
    _Script(f"{m.get_name()}.attributionControl.addAttribution({json.dumps(OSM_ATTRIBUTION)});").add_to(m)
    if gallery is not None and gallery.tiles:
        _Script(_mosaic_js(layers["offline"].get_name(), gallery)).add_to(m)
    if gallery is not None and gallery.extent is not None:
        w, s, e, n = gallery.extent
        folium.Rectangle(
            [[s, w], [n, e]], color="#1f3b73", weight=2, dash_array="6 4", fill=False, interactive=False
        ).add_to(m)
        folium.Marker(  # under the outline's south-west corner: clear of the controls at the top
            [s, w],
            icon=folium.DivIcon(
                html=text(gallery.caption()), class_name="geotext-extent-label", icon_anchor=(0, -4)
            ),
            interactive=False,
            keyboard=False,
        ).add_to(m)

    footprint_group = folium.FeatureGroup(name="Footprints").add_to(m)
    marker_group = folium.FeatureGroup(name="Ranked markers").add_to(m)
    n_hits = len(hits)
    contents = popups(hits, query, confidences, reasons, marks)
    marker_names: dict[str, str] = {}
    tile_bounds: dict[str, list[list[float]]] = {}
    for hit in hits:
        rank = int(hit.rank)
        colour = rank_colour(rank, n_hits)
        west, south, east, north = (float(v) for v in hit.bbox)
        folium.Polygon(
            locations=_footprint_latlons(hit),
            color=colour,
            weight=3,
            fill=True,
            fill_opacity=0.08,
            tooltip=folium.Tooltip(text(f"#{rank} footprint")),
        ).add_to(footprint_group)
        marker = folium.Marker(
            location=[float(hit.lat), float(hit.lon)],
            icon=folium.DivIcon(
                html=f'<div class="geotext-rank" style="background:{colour}">{rank}</div>',
                icon_size=(26, 26),
                icon_anchor=(13, 13),
                class_name="geotext-marker",
            ),
            popup=folium.Popup(contents[str(rank)], max_width=260, auto_pan_padding=[12, 12]),
            tooltip=folium.Tooltip(text(f"#{rank} · {float(hit.score):.3f}")),
            z_index_offset=(n_hits - rank) * 100,  # the best ranks on top where markers overlap
        ).add_to(marker_group)
        marker_names[str(rank)] = marker.get_name()
        tile_bounds[str(rank)] = [[south, west], [north, east]]

    bounds = _bounds(hits) or (
        [[gallery.extent[1], gallery.extent[0]], [gallery.extent[3], gallery.extent[2]]]
        if gallery is not None and gallery.extent is not None
        else None
    )
    if bounds:
        # Not animated (Folium's fit_bounds is, since the map starts at a zoom): a focus that arrives during
        # that animation would be dropped by Leaflet, and its popup auto-panned off the map as the zoom ends.
        _Script(
            f"{m.get_name()}.fitBounds({json.dumps(bounds)}, {{padding: [24, 24], maxZoom: 18, animate: false}});"
        ).add_to(m)
    folium.LayerControl(collapsed=True).add_to(m)
    online = [layer for name, layer in layers.items() if name != "offline"]
    for layer in online:
        layer.options["geotextName"] = layer.layer_name
    _Script(
        BRIDGE_JS
        % {
            "map": m.get_name(),
            "search": json.dumps(search_id),
            "markers": "{" + ",".join(f"{json.dumps(r)}:{v}" for r, v in marker_names.items()) + "}",
            "bounds": json.dumps(tile_bounds),
            "offline": layers["offline"].get_name(),
            "online": "[" + ",".join(layer.get_name() for layer in online) + "]",
        }
    ).add_to(m)
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
    """The map as an HTML page; its scripts, styles and images are the app's own files, by URL."""
    return m.get_root().render()


def map_iframe(m: folium.Map | str, height: int = MAP_HEIGHT_PX) -> str:
    """The map in a sandboxed iframe: scripts run inside it but cannot reach the Gradio page."""
    page = m if isinstance(m, str) else map_page(m)
    return (
        f'<iframe class="geotext-map" title="Map of the results" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width:100%;height:{int(height)}px;border:0;border-radius:8px" '
        'sandbox="allow-scripts allow-popups allow-popups-to-escape-sandbox" loading="eager"></iframe>'
    )


def empty_map_iframe(height: int = MAP_HEIGHT_PX, gallery: GalleryMap | None = None) -> str:
    """The first view: the gallery mosaic with its extent outlined, or an empty map without a gallery."""
    return map_iframe(hits_to_map([], gallery=gallery), height)
