"""Tile ingestion: GeoTIFF tiling round-trips, XYZ footprints, CVG-Text names and sidecars, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from pyproj import Geod, Transformer
from rasterio.transform import from_origin

from retriever.errors import DataFormatError
from retriever.index.tiles import detect_kind, load_tiles
from tests.fakes import solid_tile

GEOD = Geod(ellps="WGS84")


def write_raster(path: Path, pixels: np.ndarray, crs: str | None, transform) -> Path:
    """pixels (B, H, W) uint8 written as a GeoTIFF."""
    bands, height, width = pixels.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=bands,
        dtype="uint8",
        crs=crs,
        transform=transform,
    ) as dst:
        dst.write(pixels)
    return path


def cell_colours(rows: int, cols: int) -> np.ndarray:
    """A distinct RGB colour per (row, col) cell: (rows, cols, 3)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([40 + 50 * r, 40 + 50 * c, 200 - 30 * r - 20 * c], axis=-1).astype(np.uint8)


def test_geotiff_in_utm_round_trips(tmp_path):
    # 400 x 300 pixels of 1 m in UTM 33N; each 100 m cell painted its own colour.
    colours = cell_colours(3, 4)
    pixels = np.repeat(np.repeat(colours, 100, axis=0), 100, axis=1).transpose(2, 0, 1)  # (3, 300, 400)
    origin_x, origin_y = 500_000.0, 6_650_000.0
    raster = write_raster(
        tmp_path / "city.tif", pixels, "EPSG:32633", from_origin(origin_x, origin_y, 1.0, 1.0)
    )

    assert detect_kind(raster) == "geotiff"
    tiles = load_tiles(raster, tile_size_m=100, stride_m=100, out_dir=tmp_path / "cut")
    assert len(tiles) == 12 and tiles.crs.to_epsg() == 4326
    to_wgs84 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    for row in range(3):
        for col in range(4):
            tile = tiles.set_index("tile_id").loc[f"city_r{row:04d}_c{col:04d}"]
            x0, y1 = origin_x + 100 * col, origin_y - 100 * row
            lon, lat = to_wgs84.transform([x0, x0 + 100, x0 + 100, x0], [y1 - 100, y1 - 100, y1, y1])
            expected = shapely.Polygon(zip(lon, lat, strict=True))
            assert shapely.equals_exact(tile.geometry.normalize(), expected.normalize(), tolerance=1e-9)
            clon, clat = to_wgs84.transform(x0 + 50, y1 - 50)
            assert (tile.lat, tile.lon) == pytest.approx((clat, clon), abs=1e-9)
            image = np.asarray(Image.open(tile.image_path))
            assert image.shape == (100, 100, 3)
            assert (image == colours[row, col]).all()

    overlapping = load_tiles(raster, tile_size_m=100, stride_m=50, out_dir=tmp_path / "cut50")
    assert len(overlapping) == 7 * 5  # floor((400 - 100) / 50) + 1 columns, floor((300 - 100) / 50) + 1 rows


def test_geotiff_in_wgs84_is_cut_in_metres(tmp_path):
    # ~670 m square near Helsinki in degrees; the four quadrants painted red, green, blue, yellow.
    lon0, lat0, dlon, dlat = 24.93, 60.175, 0.00002, 0.00001
    quadrants = np.array([[[220, 30, 30], [30, 180, 60]], [[30, 60, 220], [230, 220, 40]]], dtype=np.uint8)
    pixels = np.repeat(np.repeat(quadrants, 300, axis=0), 300, axis=1).transpose(2, 0, 1)  # (3, 600, 600)
    raster = write_raster(tmp_path / "geo.tif", pixels, "EPSG:4326", from_origin(lon0, lat0, dlon, dlat))

    tiles = load_tiles(raster, tile_size_m=100, out_dir=tmp_path / "cut")
    assert len(tiles) >= 16
    west, south, east, north = lon0, lat0 - 600 * dlat, lon0 + 600 * dlon, lat0
    for tile in tiles.itertuples():
        ring = np.asarray(tile.geometry.exterior.coords)[:4]  # (4, 2) lon, lat corners
        sides = GEOD.inv(ring[:, 0], ring[:, 1], np.roll(ring[:, 0], -1), np.roll(ring[:, 1], -1))[2]
        assert sides == pytest.approx([100.0] * 4, abs=0.05)  # a 100 m square on the ground
        assert west - 1e-4 < tile.lon < east + 1e-4 and south - 1e-4 < tile.lat < north + 1e-4
        # The tile shows what the raster holds at its centre.
        row, col = int((lat0 - tile.lat) / dlat), int((tile.lon - lon0) / dlon)
        if min(abs(row - 300), abs(col - 300)) > 3 and 0 <= row < 600 and 0 <= col < 600:
            image = np.asarray(Image.open(tile.image_path))
            assert (image[image.shape[0] // 2, image.shape[1] // 2] == pixels[:, row, col]).all()
    # The UTM view of a lon/lat raster has empty corners; tiles reaching into them are skipped.
    full = load_tiles(raster, tile_size_m=100, out_dir=tmp_path / "full", min_valid=1.0)
    assert 0 < len(full) < len(tiles)
    assert not any((np.asarray(Image.open(p)) == 0).all(axis=-1).any() for p in full.image_path)


def test_geotiff_without_crs_is_refused(tmp_path):
    raster = write_raster(
        tmp_path / "plain.tif", np.zeros((1, 50, 50), np.uint8), None, from_origin(10, 50, 1, 1)
    )
    with pytest.raises(DataFormatError, match="no georeference"):
        load_tiles(raster, out_dir=tmp_path / "cut")


def test_geotiff_in_a_local_crs_is_refused(tmp_path):
    local = 'LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["x",EAST],AXIS["y",NORTH]]'
    raster = write_raster(
        tmp_path / "site.tif", np.zeros((1, 50, 50), np.uint8), local, from_origin(0, 50, 1, 1)
    )
    with pytest.raises(DataFormatError, match="CRS"):
        load_tiles(raster, out_dir=tmp_path / "cut")


def test_xyz_footprints_follow_the_slippy_map_grid(tmp_path):
    for z, x, y in [(1, 0, 0), (1, 1, 1), (12, 2200, 1343)]:
        path = tmp_path / "xyz" / str(z) / str(x) / f"{y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        solid_tile("red").save(path)
    assert detect_kind(tmp_path / "xyz") == "xyz"
    tiles = load_tiles(tmp_path / "xyz").set_index("tile_id")
    assert tiles.loc["1/0/0"].geometry.bounds == pytest.approx((-180.0, 0.0, 0.0, 85.0511287798), abs=1e-9)
    assert tiles.loc["1/1/1"].geometry.bounds == pytest.approx((0.0, -85.0511287798, 180.0, 0.0), abs=1e-9)
    tile = tiles.loc["12/2200/1343"]
    assert tile.geometry.bounds[0] == pytest.approx(2200 / 4096 * 360 - 180)
    # The centre is the image's centre pixel (Mercator), a little north of the mid-latitude.
    west, south, east, north = tile.geometry.bounds
    assert south < tile.lat < north and tile.lat > (south + north) / 2
    assert Transformer.from_crs(4326, 3857, always_xy=True).transform(tile.lon, tile.lat)[1] == pytest.approx(
        np.mean(Transformer.from_crs(4326, 3857, always_xy=True).transform([west, east], [south, north])[1])
    )
    assert (tile.zoom, tile.x, tile.y) == (12, 2200, 1343)


def test_cvgtext_names_give_centres_and_square_footprints(tmp_path):
    folder = tmp_path / "NewYork-satellite"
    folder.mkdir()
    solid_tile("red").save(folder / "40.700000,-74.000000_pano0001_2019-06.jpg")
    solid_tile("blue").save(folder / "40.710000,-73.990000_90.jpg")
    assert detect_kind(folder) == "named"
    tiles = load_tiles(folder, footprint_m=120).set_index("tile_id")
    tile = tiles.loc["40.700000,-74.000000_pano0001_2019-06"]
    assert (tile.lat, tile.lon) == (40.7, -74.0)
    west, south, east, north = tile.geometry.bounds
    assert GEOD.inv(west, tile.lat, east, tile.lat)[2] == pytest.approx(120.0, abs=0.01)
    assert GEOD.inv(tile.lon, south, tile.lon, north)[2] == pytest.approx(120.0, abs=0.01)
    assert Path(tile.image_path).is_absolute() and Path(tile.image_path).is_file()


def test_an_image_without_georeference_is_named(tmp_path):
    solid_tile("red").save(tmp_path / "40.7,-74.0_a.jpg")
    solid_tile("red").save(tmp_path / "holiday.jpg")
    with pytest.raises(DataFormatError, match="holiday.jpg"):
        load_tiles(tmp_path)


def test_empty_gallery_is_refused(tmp_path):
    with pytest.raises(DataFormatError, match="empty"):
        load_tiles(tmp_path)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataFormatError, match="Supported layouts"):
        load_tiles(tmp_path)


def test_csv_sidecar_with_context_and_footprints(tmp_path):
    for name in ("a", "b", "c"):
        solid_tile("green").save(tmp_path / f"{name}.png")
    (tmp_path / "tiles.csv").write_text(
        "image,lat,lon,features,footprint\n"
        "a.png,60.17,24.94,church; park,\n"
        'b.png,60.18,24.95,café Ekberg,"POLYGON ((24.9 60.1, 25 60.1, 25 60.2, 24.9 60.2, 24.9 60.1))"\n'
        "c.png,60.19,24.96,harbour,\n"
    )
    assert detect_kind(tmp_path) == "sidecar"
    tiles = load_tiles(tmp_path, footprint_m=200).set_index("tile_id")
    assert tiles.loc["b"].features == "café Ekberg"
    assert tiles.loc["b"].geometry.bounds == pytest.approx((24.9, 60.1, 25.0, 60.2))
    assert (tiles.loc["b"].lat, tiles.loc["b"].lon) == (60.18, 24.95)  # given centre wins over the centroid
    west, _, east, _ = tiles.loc["a"].geometry.bounds
    assert GEOD.inv(west, 60.17, east, 60.17)[2] == pytest.approx(200.0, abs=0.01)
    assert list(tiles.columns[:4]) == ["geometry", "lat", "lon", "image_path"]


def test_csv_sidecar_row_without_coordinates_is_named(tmp_path):
    for name in ("a", "b"):
        solid_tile("green").save(tmp_path / f"{name}.png")
    (tmp_path / "tiles.csv").write_text("image,lat,lon\na.png,60.17,24.94\nb.png,,\n")
    with pytest.raises(DataFormatError, match=r"no georeference: b\.png"):
        load_tiles(tmp_path / "tiles.csv")


def test_geojson_sidecar_polygons_and_points(tmp_path):
    for name in ("a", "b"):
        solid_tile("green").save(tmp_path / f"{name}.png")
    collection = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"image": "a.png", "name": "square"},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[10, 50], [10.002, 50], [10.002, 50.001], [10, 50.001], [10, 50]]],
                },
            },
            {
                "type": "Feature",
                "properties": {"image": "b.png", "name": "point"},
                "geometry": {"type": "Point", "coordinates": [11, 51]},
            },
        ],
    }
    (tmp_path / "tiles.geojson").write_text(json.dumps(collection))
    tiles = load_tiles(tmp_path / "tiles.geojson", footprint_m=50).set_index("tile_id")
    assert (tiles.loc["a"].lon, tiles.loc["a"].lat) == pytest.approx((10.001, 50.0005))
    assert tiles.loc["a"].geometry.bounds == pytest.approx((10, 50, 10.002, 50.001))
    assert (tiles.loc["b"].lon, tiles.loc["b"].lat) == (11, 51)
    assert tiles.loc["b"].geometry.contains(shapely.Point(11, 51)) and tiles.loc["b"].name == "b"
    assert tiles.loc["b"]["name"] == "point"
