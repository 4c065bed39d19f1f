"""Render OSM layers as OSM-Carto-like map images (geopandas + matplotlib Agg) and cut them into tiles.

Figures are drawn on an explicit Agg canvas, so importing this module leaves matplotlib's backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import geopandas as gpd
import matplotlib.patheffects as pe
import numpy as np
import shapely
import shapely.affinity
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from shapely.geometry import LineString, box
from shapely.ops import linemerge, substring, unary_union

from demo.osm import Layers

Extent = tuple[float, float, float, float]  # minx, miny, maxx, maxy in METRIC_CRS metres
Visible = Callable[[str], gpd.GeoDataFrame]  # layer name -> its features near the view

DPI = 100
LAND = "#f2efe9"
WATER = "#aad3df"
WATER_TEXT = "#2a5b8a"
BUILDING_FILL, BUILDING_EDGE = "#d9d0c9", "#b3a497"
SQUARE_FILL, SQUARE_EDGE = "#e2e1ea", "#b8b7c6"
TREE_FILL, TREE_EDGE = "#b5d69c", "#8fbf78"
PLATFORM_FILL = "#c4c0c8"

LANDUSE_FILL: dict[str, str] = {
    "commercial": "#f2dad9",
    "retail": "#fbd5d0",
    "residential": "#e4e2de",
    "institutional": "#efefd6",
    "railway": "#e6d9e3",
    "military": "#f3e3dd",
    "construction": "#d4d4c0",
    "industrial": "#ebdbe8",
}
GREEN_FILL: dict[str, str] = {
    "park": "#c8facc",
    "garden": "#cdebb0",
    "playground": "#dffce2",
    "pitch": "#aae0cb",
    "grass": "#cdebb0",
    "wood": "#add19e",
    "scrub": "#c8d7ab",
}


@dataclass(frozen=True)
class LineStyle:
    """A line class: width on the ground (m), colour, optional casing and dash pattern (in line widths)."""

    width_m: float
    color: str
    casing: str | None = None
    casing_m: float = 0.0
    dash: tuple[float, float] | None = None
    z: int = 0


ROAD_STYLES: dict[str, LineStyle] = {
    "primary": LineStyle(14, "#fcd6a4", "#b4864a", 1.6, z=9),
    "secondary": LineStyle(12, "#f7fabf", "#9aa048", 1.6, z=8),
    "tertiary": LineStyle(10, "#ffffff", "#a8a8a8", 1.4, z=7),
    "residential": LineStyle(8, "#ffffff", "#b8b8b8", 1.2, z=6),
    "pedestrian": LineStyle(7, "#e2e1ea", "#a9a8b8", 1.0, z=5),
    "service": LineStyle(4.5, "#ffffff", "#c2c2c2", 1.0, z=4),
    "cycleway": LineStyle(1.3, "#2f4ff0", "#ffffff", 0.9, dash=(2.5, 1.5), z=3),
    "footway": LineStyle(1.3, "#f0664f", "#ffffff", 0.9, dash=(2.0, 1.6), z=2),
    "steps": LineStyle(3.0, "#f0664f", "#ffffff", 0.8, dash=(0.6, 0.6), z=1),
}
RAIL_STYLES: dict[str, LineStyle] = {
    "rail": LineStyle(3.2, "#707070", z=20),
    "tram": LineStyle(1.3, "#404040", z=21),
}
RAIL_DASH = LineStyle(1.6, "#ffffff", dash=(3.0, 3.0))  # white dashes over grey: the classic railway look


@dataclass(frozen=True)
class Symbol:
    """How a POI category is drawn: a distinct marker shape and colour, and its label colour."""

    marker: str
    color: str
    size_px: float = 9.0


POI_SYMBOLS: dict[str, Symbol] = {
    "food": Symbol("o", "#d76f00"),
    "shop": Symbol("s", "#a03cb0", 8.0),
    "culture": Symbol("*", "#c2185b", 12.0),
    "hotel": Symbol("h", "#00796b", 10.0),
    "worship": Symbol("P", "#222222", 10.0),
    "education": Symbol("^", "#8d6e00", 10.0),
    "health": Symbol("p", "#d32f2f", 10.0),
    "transport": Symbol("D", "#1565c0", 8.0),
    "other": Symbol("o", "#6d6d6d", 6.0),
}
# Label priority: landmarks first, then everyday shops; a lower rank wins a contested spot.
POI_LABEL_RANK: dict[str, int] = {
    "worship": 0,
    "culture": 1,
    "hotel": 2,
    "transport": 3,
    "education": 4,
    "health": 5,
    "food": 6,
    "shop": 7,
    "other": 8,
}


@dataclass(frozen=True)
class TextStyle:
    """Font size (pt at DPI), colour, style and halo of one label class."""

    size: float
    color: str
    style: str = "normal"
    weight: str = "normal"
    halo: str = "#ffffff"


TEXT_STYLES: dict[str, TextStyle] = {
    "street_major": TextStyle(7.0, "#222222", weight="bold"),
    "street": TextStyle(6.5, "#333333"),
    "park": TextStyle(6.5, "#2b6b2b", style="italic"),
    "water": TextStyle(7.0, WATER_TEXT, style="italic", halo="#d6ecf2"),
    "square": TextStyle(6.5, "#4a4a5a", style="italic"),
    "building": TextStyle(5.8, "#6b5544"),
    "district": TextStyle(8.0, "#7a7a7a", weight="bold"),
    "poi": TextStyle(5.8, "#333333"),
}
STREET_LABEL_CLASSES = {"primary", "secondary", "tertiary", "residential", "pedestrian", "service"}
STREET_LABEL_SPACING_M = 105.0  # repeat street names often, so most ~150 m tiles carry the names they show
CHAR_WIDTH_EM = 0.6  # mean glyph advance of DejaVu Sans, for collision boxes


class _Placer:
    """Greedy label collision avoidance on approximate text boxes, in ground metres."""

    def __init__(self, px_per_m: float) -> None:
        self.px_per_m = px_per_m
        self.boxes: list[shapely.Geometry] = []
        self.tree: shapely.STRtree | None = None
        self._pending: list[shapely.Geometry] = []
        self.names: dict[str, list[tuple[float, float]]] = {}

    def size_m(self, text: str, style: TextStyle) -> tuple[float, float]:
        em_px = style.size * DPI / 72
        return (len(text) * CHAR_WIDTH_EM * em_px + 2) / self.px_per_m, (1.25 * em_px) / self.px_per_m

    def repeats(self, name: str, x: float, y: float, within_m: float = 60.0) -> bool:
        """True when the same text is already drawn close by (a church is both a building and a POI)."""
        return any(math.hypot(x - px, y - py) < within_m for px, py in self.names.get(name, ()))

    def remember(self, name: str, x: float, y: float) -> None:
        self.names.setdefault(name, []).append((x, y))

    def fits(self, geom: shapely.Geometry) -> bool:
        if any(geom.intersects(b) for b in self._pending):
            return False
        return self.tree is None or len(self.tree.query(geom, predicate="intersects")) == 0

    def add(self, geom: shapely.Geometry) -> None:
        self._pending.append(geom)
        if len(self._pending) > 64:  # rebuild the tree in batches: cheaper than a linear scan of every box
            self.boxes.extend(self._pending)
            self._pending = []
            self.tree = shapely.STRtree(self.boxes)


def _rotated_box(x: float, y: float, w: float, h: float, angle_deg: float) -> shapely.Geometry:
    rect = box(-w / 2, -h / 2, w / 2, h / 2)
    return shapely.affinity.translate(shapely.affinity.rotate(rect, angle_deg, origin=(0, 0)), x, y)


def _text(ax: Axes, x: float, y: float, text: str, style: TextStyle, **kw: object) -> None:
    ax.text(
        x,
        y,
        text,
        fontsize=style.size,
        color=style.color,
        fontstyle=style.style,
        fontweight=style.weight,
        ha=kw.pop("ha", "center"),
        va=kw.pop("va", "center"),
        rotation_mode="anchor",
        path_effects=[pe.withStroke(linewidth=2.2, foreground=style.halo)],
        zorder=100,
        clip_on=True,
        **kw,
    )


def _lines_of(geom: shapely.Geometry) -> Iterator[LineString]:
    for part in shapely.get_parts(geom):
        if part.geom_type == "LineString" and part.length > 0:
            yield part


def _street_label_spots(
    line: LineString, length_m: float, spacing: float
) -> Iterator[tuple[float, float, float]]:
    """(x, y, angle) every `spacing` metres where the line is straight enough to carry the text."""
    if line.length < length_m * 1.1:
        return
    n = max(1, int(line.length // spacing))
    offset = (line.length - (n - 1) * spacing) / 2 if n > 1 else line.length / 2
    for i in range(n):
        at = offset + i * spacing
        a, b = max(at - length_m / 2, 0), min(at + length_m / 2, line.length)
        piece = substring(line, a, b)
        if piece.geom_type != "LineString" or piece.length < length_m * 0.95:
            continue
        (x0, y0), (x1, y1) = piece.coords[0], piece.coords[-1]
        if math.hypot(x1 - x0, y1 - y0) < piece.length * 0.97:  # too curved for straight text
            continue
        angle = math.degrees(math.atan2(y1 - y0, x1 - x0))
        angle = angle - 180 if angle > 90 else angle + 180 if angle <= -90 else angle  # keep text upright
        mid = line.interpolate(at)
        yield mid.x, mid.y, angle


def _draw_lines(ax: Axes, gdf: gpd.GeoDataFrame, style: LineStyle, pt_per_m: float, casing: bool) -> None:
    if len(gdf) == 0:
        return
    width = (style.width_m + (2 * style.casing_m if casing else 0)) * pt_per_m
    color = style.casing if casing else style.color
    if color is None:
        return
    kw: dict = {"capstyle": "round", "joinstyle": "round"}
    if style.dash and not casing:
        kw = {"linestyle": (0, style.dash), "capstyle": "butt"}
    gdf.plot(ax=ax, color=color, linewidth=width, zorder=style.z + (0 if casing else 0.5), **kw)


def _draw_areas(ax: Axes, visible: Visible, pt_per_m: float) -> None:
    """Areas, bottom to top: land use, greenery, water, squares, platforms, trees, buildings."""
    landuse = visible("landuse")
    for kind, colour in LANDUSE_FILL.items():
        part = landuse[landuse["category"] == kind]
        if len(part):
            part.plot(ax=ax, color=colour, linewidth=0, zorder=-10)
    green = visible("green")
    for kind in ("wood", "scrub", "grass", "park", "garden", "playground", "pitch"):  # small ones on top
        part = green[green["category"] == kind]
        if len(part):
            part.plot(ax=ax, color=GREEN_FILL[kind], edgecolor="#a5d6a0", linewidth=0.3, zorder=-9)
    water = visible("water")
    water_areas = water[water.geom_type.isin(["Polygon", "MultiPolygon"])]
    if len(water_areas):
        water_areas.plot(ax=ax, color=WATER, linewidth=0, zorder=-8)
    water_lines = water[
        water.geom_type.isin(["LineString", "MultiLineString"]) & ~water["tunnel"].astype(bool)
    ]
    if len(water_lines):
        water_lines.plot(ax=ax, color=WATER, linewidth=2.5 * pt_per_m, zorder=-8)
    squares = visible("squares")
    if len(squares):
        squares.plot(ax=ax, color=SQUARE_FILL, edgecolor=SQUARE_EDGE, linewidth=0.4, zorder=-7)
    rail = visible("rail")
    platforms = rail[(rail["category"] == "platform") & rail.geom_type.isin(["Polygon", "MultiPolygon"])]
    if len(platforms):
        platforms.plot(ax=ax, color=PLATFORM_FILL, linewidth=0, zorder=-6)
    trees = visible("trees")
    if len(trees):
        xy = shapely.get_coordinates(trees.geometry.values)
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            s=(4.5 * pt_per_m) ** 2,
            c=TREE_FILL,
            edgecolors=TREE_EDGE,
            linewidths=0.4,
            zorder=-5,
        )
    buildings = visible("buildings")
    if len(buildings):
        buildings.plot(ax=ax, color=BUILDING_FILL, edgecolor=BUILDING_EDGE, linewidth=0.6, zorder=-4)


def _draw_network(ax: Axes, visible: Visible, pt_per_m: float) -> gpd.GeoDataFrame:
    """Roads and rails, every casing below every fill so crossings read as junctions; returns the surface
    roads (the ones that carry street labels)."""
    rail = visible("rail")
    roads = visible("roads")
    tunnels = roads["tunnel"].astype(bool)
    surface = roads[~tunnels]
    for casing in (True, False):
        for cls, style in ROAD_STYLES.items():
            _draw_lines(ax, surface[surface["category"] == cls], style, pt_per_m, casing)
    underground = roads[tunnels & roads["category"].isin(["primary", "secondary", "tertiary", "residential"])]
    if len(underground):
        underground.plot(ax=ax, color="#9a9a9a", linewidth=2.0 * pt_per_m, linestyle=(0, (3, 2)), zorder=10)
    surface_rail = rail[~rail["tunnel"].astype(bool) & rail.geom_type.isin(["LineString", "MultiLineString"])]
    for cls, style in RAIL_STYLES.items():
        _draw_lines(ax, surface_rail[surface_rail["category"] == cls], style, pt_per_m, casing=False)
    mainline = surface_rail[surface_rail["category"] == "rail"]
    if len(mainline):
        mainline.plot(
            ax=ax,
            color=RAIL_DASH.color,
            linewidth=RAIL_DASH.width_m * pt_per_m,
            linestyle=(0, RAIL_DASH.dash),
            zorder=22,
        )
    return surface


def render_canvas(layers: Layers, extent: Extent, px_per_m: float) -> Image.Image:
    """Draw every layer over `extent` at `px_per_m` pixels per metre; returns an RGB image (north up)."""
    x0, y0, x1, y1 = extent
    width_px, height_px = round((x1 - x0) * px_per_m), round((y1 - y0) * px_per_m)
    pt_per_m = px_per_m * 72 / DPI
    # headless and stateless: an Agg canvas of our own, not pyplot's global figure manager
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor=LAND)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_axis_off()
    ax.set_facecolor(LAND)
    view = box(*extent).buffer(60)

    def visible(name: str) -> gpd.GeoDataFrame:
        gdf = layers[name]
        return gdf[gdf.intersects(view)] if len(gdf) else gdf

    _draw_areas(ax, visible, pt_per_m)
    surface = _draw_network(ax, visible, pt_per_m)

    placer = _Placer(px_per_m)
    _label_streets(ax, surface, placer)
    _label_areas(ax, layers, view, placer)
    _draw_pois(ax, visible("pois"), placer)
    _label_places(ax, visible("places"), placer)

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


def _label_streets(ax: Axes, roads: gpd.GeoDataFrame, placer: _Placer) -> None:
    named = roads[roads["name"].notna() & roads["category"].isin(STREET_LABEL_CLASSES)]
    order = {cls: i for i, cls in enumerate(ROAD_STYLES)}
    groups = sorted(named.groupby("name"), key=lambda kv: min(order[c] for c in kv[1]["category"]))
    for name, group in groups:
        major = bool(group["category"].isin(["primary", "secondary"]).any())
        style = TEXT_STYLES["street_major" if major else "street"]
        w, h = placer.size_m(name, style)
        merged = unary_union(list(group.geometry))
        merged = linemerge(merged) if merged.geom_type == "MultiLineString" else merged
        for line in sorted(_lines_of(merged), key=lambda g: -g.length):
            for x, y, angle in _street_label_spots(line, w, STREET_LABEL_SPACING_M):
                spot = _rotated_box(x, y, w, h, angle)
                # Dual carriageways are two parallel ways of one name: label the pair once.
                if placer.fits(spot) and not placer.repeats(
                    name, x, y, within_m=STREET_LABEL_SPACING_M * 0.7
                ):
                    placer.add(spot)
                    placer.remember(name, x, y)
                    _text(ax, x, y, name, style, rotation=angle)


# Area label classes: (layer, categories or None for all, text style); drawn in this order.
AREA_LABELS: tuple[tuple[str, tuple[str, ...] | None, str], ...] = (
    ("water", None, "water"),
    ("green", ("park", "garden", "playground", "wood"), "park"),
    ("squares", None, "square"),
    ("buildings", None, "building"),
)


def _label_areas(ax: Axes, layers: Layers, view: shapely.Geometry, placer: _Placer) -> None:
    for layer, categories, style_name in AREA_LABELS:
        gdf = layers[layer]
        gdf = gdf[gdf["name"].notna() & gdf.intersects(view)]
        if categories is not None:
            gdf = gdf[gdf["category"].isin(categories)]
        style = TEXT_STYLES[style_name]
        for name, geom in sorted(zip(gdf["name"], gdf.geometry, strict=True), key=lambda ng: -ng[1].area):
            w, h = placer.size_m(name, style)
            spot = geom.representative_point() if geom.area > 0 else geom.interpolate(0.5, normalized=True)
            rect = box(spot.x - w / 2, spot.y - h / 2, spot.x + w / 2, spot.y + h / 2)
            if placer.fits(rect) and not placer.repeats(name, spot.x, spot.y):
                placer.add(rect)
                placer.remember(name, spot.x, spot.y)
                _text(ax, spot.x, spot.y, name, style)


def _draw_pois(ax: Axes, pois: gpd.GeoDataFrame, placer: _Placer) -> None:
    pt_per_px = 72 / DPI
    for category, symbol in POI_SYMBOLS.items():
        part = pois[pois["category"] == category]
        if len(part):
            xy = shapely.get_coordinates(part.geometry.values)
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                s=(symbol.size_px * pt_per_px) ** 2,
                marker=symbol.marker,
                c=symbol.color,
                edgecolors="white",
                linewidths=0.6,
                zorder=50,
            )
    named = pois[pois["name"].notna()]
    ranked = sorted(
        zip(named["name"], named["category"], named.geometry, strict=True),
        key=lambda r: (POI_LABEL_RANK[r[1]], r[0]),
    )
    base = TEXT_STYLES["poi"]
    gap = 6.5 / placer.px_per_m  # clear of the marker
    for name, category, point in ranked:
        if placer.repeats(name, point.x, point.y):
            continue
        style = TextStyle(base.size, POI_SYMBOLS[category].color)
        w, h = placer.size_m(name, style)
        # Try right, left, above, below the marker, like a cartographer would.
        for dx, dy, ha, va in (
            (gap, 0, "left", "center"),
            (-gap, 0, "right", "center"),
            (0, gap, "center", "bottom"),
            (0, -gap, "center", "top"),
        ):
            cx = point.x + dx + (w / 2 if ha == "left" else -w / 2 if ha == "right" else 0)
            cy = point.y + dy + (h / 2 if va == "bottom" else -h / 2 if va == "top" else 0)
            rect = box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if placer.fits(rect):
                placer.add(rect)
                placer.remember(name, point.x, point.y)
                _text(ax, point.x + dx, point.y + dy, name, style, ha=ha, va=va)
                break


def _label_places(ax: Axes, places: gpd.GeoDataFrame, placer: _Placer) -> None:
    for name, category, point in zip(places["name"], places["category"], places.geometry, strict=True):
        style = TEXT_STYLES["water" if category == "water" else "district"]
        text = name if category == "water" else name.upper()
        w, h = placer.size_m(text, style)
        rect = box(point.x - w / 2, point.y - h / 2, point.x + w / 2, point.y + h / 2)
        if placer.fits(rect):
            placer.add(rect)
            _text(ax, point.x, point.y, text, style)


def crop(canvas: Image.Image, canvas_extent: Extent, tile_bounds: Extent, px: int) -> Image.Image:
    """Cut one tile out of a canvas rendered over `canvas_extent`; the result is exactly px × px."""
    x0, _, _, y1 = canvas_extent
    scale = canvas.width / (canvas_extent[2] - x0)
    left = round((tile_bounds[0] - x0) * scale)
    top = round((y1 - tile_bounds[3]) * scale)  # image rows grow southwards
    return canvas.crop((left, top, left + px, top + px))


def quantise(image: Image.Image, colors: int = 64) -> Image.Image:
    """A palette image: map renders hold few colours, so this shrinks PNGs several-fold at no visible cost."""
    return image.convert("RGB").quantize(
        colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
