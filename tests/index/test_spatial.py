"""Spatial filters: spec parsing and exact selection on hand-made footprints."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import shapely
from pyproj import Geod

from retriever.index.spatial import EmptySelectionError, geodesic_circle, parse_within, select
from retriever.index.tiles import make_tiles_frame, square_footprints

GEOD = Geod(ellps="WGS84")


def frame(lat: list[float], lon: list[float], side_m: float = 100.0) -> gpd.GeoDataFrame:
    lat_a, lon_a = np.array(lat), np.array(lon)
    ids = [f"t{i}" for i in range(len(lat))]
    return make_tiles_frame(
        ids, square_footprints(lat_a, lon_a, side_m), [f"{i}.png" for i in ids], lat_a, lon_a
    )


def test_bbox_spec_is_a_lonlat_box():
    area = parse_within("24.9, 60.1, 25.0, 60.2")
    assert area.equals(shapely.box(24.9, 60.1, 25.0, 60.2))


def test_bbox_across_the_antimeridian_keeps_both_sides():
    area = parse_within("179.5,-1,-179.5,1")
    tiles = frame([0.0, 0.0, 0.0, 0.0], [179.9, -179.9, 0.0, 179.0])
    assert select(tiles, area).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "spec", ["1,2", "0,61,1,60", "5,60,5,61", "60,25,-5", "95,0,100", "nowhere.geojson", ""]
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_within(spec)


def test_radius_is_a_geodesic_circle():
    lat, lon, radius = 60.17, 24.94, 1000.0
    area = parse_within(f"{lat},{lon},{radius}")
    azimuths = np.arange(0.0, 360.0, 15.0)
    for distance, inside in ((985.0, True), (1015.0, False)):
        plon, plat, _ = GEOD.fwd(
            np.full_like(azimuths, lon),
            np.full_like(azimuths, lat),
            azimuths,
            np.full_like(azimuths, distance),
        )
        assert shapely.intersects_xy(area, plon, plat).tolist() == [inside] * len(azimuths)
    # Far north, a degree of longitude is short: the circle must be wider in degrees than tall.
    west, south, east, north = geodesic_circle(70.0, 0.0, 5000.0).bounds
    assert (east - west) > 2.5 * (north - south)


def test_centre_within_radius_on_hand_made_tiles():
    lat0, lon0 = 40.7, -74.0
    # Tile centres 400, 490, 510 and 800 m due east of the point; the 100 m footprints all cross 500 m.
    distances = [400.0, 490.0, 510.0, 800.0]
    lon, lat, _ = GEOD.fwd([lon0] * 4, [lat0] * 4, [90.0] * 4, distances)
    tiles = frame(list(lat), list(lon))
    area = parse_within(f"{lat0},{lon0},500")
    assert select(tiles, area).tolist() == [True, True, False, False]
    assert select(tiles, area, how="intersects").tolist() == [True, True, True, False]


def test_polygon_centre_versus_footprint_and_boundary():
    tiles = make_tiles_frame(
        ["a", "b", "c"],
        [shapely.box(0, 0, 2, 2), shapely.box(2, 0, 4, 2), shapely.box(4, 0, 6, 2)],
        ["a.png", "b.png", "c.png"],
    )
    # Covers a's centre (1, 1) and touches b's footprint only; c's centre (5, 1) lies on the edge.
    area = shapely.Polygon([(0.5, 0.5), (2.5, 0.5), (2.5, 1.5), (0.5, 1.5)]).union(
        shapely.box(5, 0.5, 5.5, 1.5)
    )
    assert select(tiles, area).tolist() == [True, False, True]
    assert select(tiles, area, how="intersects").tolist() == [True, True, True]


def test_geojson_area_is_reprojected_and_unioned(tmp_path):
    # Two squares in Web Mercator metres around (0, 0) and (10 km east).
    collection = gpd.GeoDataFrame(
        geometry=[shapely.box(-500, -500, 500, 500), shapely.box(9500, -500, 10500, 500)], crs="EPSG:3857"
    )
    path = tmp_path / "area.geojson"
    path.write_text(collection.to_json())
    area = parse_within(str(path))
    assert area.geom_type == "MultiPolygon"
    west, _, east, north = area.bounds
    assert west == pytest.approx(-500 / 6378137 * 180 / np.pi, rel=1e-6)
    assert east == pytest.approx(10500 / 6378137 * 180 / np.pi, rel=1e-6)
    assert north == pytest.approx(0.0044915764, rel=1e-6)
    # An inline geometry (what the app may pass) is read too.
    inline = parse_within(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}))
    assert inline.area == pytest.approx(0.5)


def test_an_area_that_selects_nothing_is_an_error():
    tiles = frame([60.17], [24.94])
    with pytest.raises(EmptySelectionError, match="selects no tile"):
        select(tiles, parse_within("0,0,1,1"))
    assert not select(tiles, parse_within("0,0,1,1"), allow_empty=True).any()
