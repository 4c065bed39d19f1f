"""Spatial filters for tile search: parse a bbox, a point with a radius or a GeoJSON area, then select tiles."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS, Transformer
from shapely.geometry.base import BaseGeometry
from shapely.ops import transform as shapely_transform

from retriever.errors import DataFormatError, EmptySelectionError
from retriever.index.tiles import WGS84

CIRCLE_QUAD_SEGMENTS = 64  # 256 vertices: the polygon departs from the true circle by < 1e-4 of the radius


def _bbox(w: float, s: float, e: float, n: float) -> BaseGeometry:
    """A lon/lat box; w > e means the box crosses the antimeridian and is split in two."""
    if not (-90 <= s < n <= 90 and -180 <= w <= 180 and -180 <= e <= 180) or w == e:
        raise ValueError(
            f"bad bbox w,s,e,n = {w},{s},{e},{n}: need -180 <= w, e <= 180, w != e and -90 <= s < n <= 90"
        )
    if w > e:
        return shapely.MultiPolygon([shapely.box(w, s, 180.0, n), shapely.box(-180.0, s, e, n)])
    return shapely.box(w, s, e, n)


def geodesic_circle(lat: float, lon: float, radius_m: float) -> BaseGeometry:
    """A circle of radius_m metres around (lat, lon), drawn in an azimuthal equidistant CRS centred there.

    Distances from the centre are exact in that projection, so the polygon is the true geodesic circle
    up to its vertex spacing.
    """
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"bad centre lat={lat}, lon={lon}: need -90 <= lat <= 90 and -180 <= lon <= 180")
    if not radius_m > 0:
        raise ValueError(f"radius must be > 0 metres, got {radius_m}")
    aeqd = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    to_wgs84 = Transformer.from_crs(aeqd, WGS84, always_xy=True)
    disc = shapely.Point(0.0, 0.0).buffer(radius_m, quad_segs=CIRCLE_QUAD_SEGMENTS)
    return shapely_transform(to_wgs84.transform, disc)


def _read_geojson(path: Path) -> BaseGeometry:
    """Union of all geometries of a GeoJSON file (FeatureCollection, Feature or bare geometry), in EPSG:4326."""
    try:
        frame = gpd.read_file(path)
    except Exception as exc:  # fiona/pyogrio raise many types; the user needs the file name
        raise DataFormatError(f"cannot read area {path}: {exc}") from exc
    if frame.empty or frame.geometry.isna().all():
        raise DataFormatError(f"area {path} holds no geometry")
    if frame.crs is not None:
        frame = frame.to_crs(WGS84)
    area = shapely.union_all(frame.geometry.dropna().values)
    if area.is_empty:
        raise DataFormatError(f"area {path} holds only empty geometries")
    return area


def _numbers(spec: str) -> list[float] | None:
    try:
        return [float(part) for part in spec.split(",")]
    except ValueError:
        return None


# How a comma-separated spec is read, by its number of values.
NUMERIC_SPECS: dict[int, Callable[..., BaseGeometry]] = {
    4: _bbox,  # w,s,e,n
    3: geodesic_circle,  # lat,lon,radius_m
}


def parse_within(spec: str | Path) -> BaseGeometry:
    """Parse "w,s,e,n" | "lat,lon,radius_m" | a path to a .geojson file into a geometry in EPSG:4326."""
    text = str(spec).strip()
    numbers = _numbers(text)
    if numbers is not None and len(numbers) in NUMERIC_SPECS:
        return NUMERIC_SPECS[len(numbers)](*numbers)
    path = Path(text).expanduser()
    if path.suffix.lower() in {".geojson", ".json"} and path.is_file():
        return _read_geojson(path)
    if text.startswith("{"):  # an inline GeoJSON geometry, handy from scripts
        try:
            return shapely.geometry.shape(json.loads(text))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"inline GeoJSON geometry is invalid: {exc}") from exc
    raise ValueError(
        f"cannot read area {text!r}: expected 'west,south,east,north', 'lat,lon,radius_m' "
        "or the path of an existing .geojson file"
    )


def _centre_within(tiles: gpd.GeoDataFrame, area: BaseGeometry) -> np.ndarray:
    # Boundary points count as inside (intersects, not contains): a tile centred on the edge is kept.
    shapely.prepare(area)
    return shapely.intersects_xy(area, tiles["lon"].to_numpy(float), tiles["lat"].to_numpy(float))


def _footprint_intersects(tiles: gpd.GeoDataFrame, area: BaseGeometry) -> np.ndarray:
    mask = np.zeros(len(tiles), dtype=bool)
    mask[tiles.sindex.query(area, predicate="intersects")] = True
    return mask


# How a tile is matched against an area. The default, "centre", puts each tile in exactly one of two
# adjacent areas and matches how localisation is scored (distance between centres).
SELECTORS: dict[str, Callable[[gpd.GeoDataFrame, BaseGeometry], np.ndarray]] = {
    "centre": _centre_within,
    "intersects": _footprint_intersects,
}


def select(
    tiles: gpd.GeoDataFrame, area: BaseGeometry, how: str = "centre", allow_empty: bool = False
) -> np.ndarray:
    """Boolean mask (N,) of the tiles in area (EPSG:4326).

    how="centre" (default): the tile centre (lat, lon) lies in the area or on its boundary; for a
    lat,lon,radius_m area this means "centre within radius_m metres of the point".
    how="intersects": the footprint polygon touches the area (uses the spatial index).
    Raises EmptySelectionError when nothing is selected, unless allow_empty.
    """
    if how not in SELECTORS:
        raise ValueError(f"unknown selection {how!r}; choose one of {sorted(SELECTORS)}")
    mask = SELECTORS[how](tiles, area)
    if not mask.any() and not allow_empty:
        w, s, e, n = tiles.total_bounds if len(tiles) else (np.nan,) * 4
        aw, as_, ae, an = area.bounds
        raise EmptySelectionError(
            f"the area (bounds {aw:.5f},{as_:.5f},{ae:.5f},{an:.5f}) selects no tile ({how}); "
            f"the gallery covers {w:.5f},{s:.5f},{e:.5f},{n:.5f} (w,s,e,n). Enlarge or move the area."
        )
    return mask
