"""Tile galleries: read a GeoTIFF, an XYZ folder or geotagged images into one GeoDataFrame in EPSG:4326."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from PIL import Image
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError, ProjError
from tqdm.auto import tqdm

from retriever._io import atomic_path
from retriever.errors import DataFormatError

WGS84 = CRS.from_epsg(4326)  # every footprint and area in the package is in this CRS
GEOD = Geod(ellps="WGS84")
CORE_COLUMNS = ["tile_id", "geometry", "lat", "lon", "image_path"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
GEOTIFF_SUFFIXES = {".tif", ".tiff", ".vrt", ".jp2"}
SIDECAR_SUFFIXES = {".csv", ".geojson", ".json", ".parquet"}  # .parquet: GeoParquet
# CVG-Text names: "<lat>,<lon>_<anything>.jpg" (or just "<lat>,<lon>.jpg").
LATLON_NAME = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*,\s*([-+]?\d+(?:\.\d+)?)(?:_|$)")
# Sidecar column names accepted for each field (first match wins).
SIDECAR_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_path", "path", "file", "filename"),
    "lat": ("lat", "latitude", "y"),
    "lon": ("lon", "lng", "longitude", "x"),
    "tile_id": ("tile_id", "id"),
    "footprint": ("footprint",),
    "footprint_m": ("footprint_m",),
}


@dataclass(frozen=True)
class TileOptions:
    """How a source is cut into tiles; each source kind reads the fields it needs."""

    tile_size_m: float = 150.0  # GeoTIFF: tile side in metres
    stride_m: float | None = None  # GeoTIFF: step between tile origins; None = tile_size_m (no overlap)
    footprint_m: float = 150.0  # point-located images: side of the square footprint around the centre
    out_dir: Path | None = None  # GeoTIFF: folder for the tile PNGs; None = "<stem>_tiles" beside the raster
    tile_px: int | None = None  # GeoTIFF: tile side in pixels; None = the raster's native resolution
    min_valid: float = 0.5  # GeoTIFF: skip tiles whose valid (not nodata) fraction is lower
    progress: bool | None = None


@dataclass(frozen=True)
class SourceKind:
    """One kind of tile source: how to recognise it and how to read it."""

    detect: Callable[[Path], bool]
    load: Callable[[Path, TileOptions], gpd.GeoDataFrame]
    layout: str  # shown to the user when nothing matches


# ---------------------------------------------------------------------------------------------------------
# Building the frame


def square_footprints(lat: np.ndarray, lon: np.ndarray, side_m: float | np.ndarray) -> np.ndarray:
    """Lon/lat-aligned squares of side_m metres (geodesic) centred on each point; (N,) polygons."""
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    half = np.broadcast_to(np.asarray(side_m, float) / 2.0, lat.shape)
    edge = {az: GEOD.fwd(lon, lat, np.full_like(lat, az), half) for az in (0.0, 90.0, 180.0, 270.0)}
    return shapely.box(edge[270.0][0], edge[180.0][1], edge[90.0][0], edge[0.0][1])


def make_tiles_frame(
    tile_ids: Sequence[str],
    footprints: Sequence[shapely.Geometry] | np.ndarray,
    image_paths: Sequence[str | Path],
    lat: Sequence[float] | None = None,
    lon: Sequence[float] | None = None,
    context: pd.DataFrame | None = None,
    source: str | Path = "the source",
) -> gpd.GeoDataFrame:
    """The gallery frame: core columns, then context columns; centres default to footprint centroids."""
    if len(tile_ids) == 0:
        raise DataFormatError(f"empty gallery: no tiles found in {source}")
    geometry = np.asarray(footprints, dtype=object)
    if lat is None or lon is None:
        with warnings.catch_warnings():  # a centroid in degrees is fine at tile scale
            warnings.simplefilter("ignore", UserWarning)
            centres = shapely.centroid(geometry)
        lon, lat = shapely.get_x(centres), shapely.get_y(centres)
    frame = gpd.GeoDataFrame(
        {
            "tile_id": [str(t) for t in tile_ids],
            "lat": np.asarray(lat, float),
            "lon": np.asarray(lon, float),
            "image_path": [str(Path(p).resolve()) for p in image_paths],
        },
        geometry=gpd.GeoSeries(geometry, crs=WGS84),
    )
    duplicated = frame["tile_id"][frame["tile_id"].duplicated()].unique()
    if len(duplicated):
        raise DataFormatError(f"tile ids must be unique in {source}; repeated: {list(duplicated[:5])}")
    bad = ~(frame["lat"].between(-90, 90) & frame["lon"].between(-180, 180))
    if bad.any():
        raise DataFormatError(
            f"tiles with impossible coordinates in {source}: {frame['tile_id'][bad].head(5).tolist()}"
        )
    if context is not None and len(context.columns):
        context = context.reset_index(drop=True).drop(columns=CORE_COLUMNS, errors="ignore")
        frame = pd.concat([frame, context], axis=1)
    return gpd.GeoDataFrame(frame[CORE_COLUMNS + [c for c in frame.columns if c not in CORE_COLUMNS]])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _no_georeference(paths: Sequence[str | Path], how: str) -> DataFormatError:
    shown = ", ".join(Path(p).name for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
    return DataFormatError(f"{len(paths)} image(s) have no georeference: {shown}. {how}")


# ---------------------------------------------------------------------------------------------------------
# Images named "<lat>,<lon>_....jpg" (CVG-Text)


def _is_named_folder(path: Path) -> bool:
    return path.is_dir() and any(LATLON_NAME.match(p.stem) for p in _image_files(path))


def _load_named(path: Path, opts: TileOptions) -> gpd.GeoDataFrame:
    files = _image_files(path)
    matches = [LATLON_NAME.match(p.stem) for p in files]
    missing = [p for p, m in zip(files, matches, strict=True) if m is None]
    if missing:
        raise _no_georeference(
            missing, "Name them '<lat>,<lon>_<anything>.jpg' or describe them in a CSV/GeoJSON sidecar."
        )
    lat = np.array([float(m.group(1)) for m in matches])
    lon = np.array([float(m.group(2)) for m in matches])
    footprints = square_footprints(lat, lon, opts.footprint_m)
    return make_tiles_frame([p.stem for p in files], footprints, files, lat, lon, source=path)


# ---------------------------------------------------------------------------------------------------------
# A CSV or GeoJSON sidecar: columns image, lat, lon [, tile_id, footprint (WKT), footprint_m, context...]


def _sidecar_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix.lower() in SIDECAR_SUFFIXES else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SIDECAR_SUFFIXES)
    if len(found) > 1:
        raise DataFormatError(
            f"{path} holds several sidecar files ({', '.join(p.name for p in found)}); pass the one to use"
        )
    return found[0] if found else None


def _pick(columns: Sequence[str], field: str) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[a] for a in SIDECAR_ALIASES[field] if a in lower), None)


def _load_sidecar(path: Path, opts: TileOptions) -> gpd.GeoDataFrame:
    sidecar = _sidecar_file(path)
    assert sidecar is not None  # detect() guarantees it
    if sidecar.suffix.lower() == ".csv":
        table = pd.read_csv(sidecar)
        geometry = None
    else:
        try:
            table = (
                gpd.read_parquet(sidecar) if sidecar.suffix.lower() == ".parquet" else gpd.read_file(sidecar)
            )
        except Exception as exc:  # pyogrio raises several types; the user needs the file name
            raise DataFormatError(f"cannot read sidecar {sidecar}: {exc}") from exc
        if table.crs is not None:
            table = table.to_crs(WGS84)
        geometry = np.asarray(table.geometry.values, dtype=object)
        table = pd.DataFrame(table.drop(columns=table.geometry.name))
    if table.empty:
        raise DataFormatError(f"empty gallery: sidecar {sidecar} has no rows")
    cols = {field: _pick(list(table.columns), field) for field in SIDECAR_ALIASES}
    if cols["image"] is None:
        raise DataFormatError(f"sidecar {sidecar} needs an 'image' column (columns: {list(table.columns)})")
    images = [sidecar.parent / str(name) for name in table[cols["image"]]]
    absent = [str(p) for p in images if not p.is_file()]
    if absent:
        raise DataFormatError(f"sidecar {sidecar} names {len(absent)} missing image(s), e.g. {absent[:3]}")

    n = len(table)
    lat = pd.to_numeric(table[cols["lat"]], errors="coerce").to_numpy() if cols["lat"] else np.full(n, np.nan)
    lon = pd.to_numeric(table[cols["lon"]], errors="coerce").to_numpy() if cols["lon"] else np.full(n, np.nan)
    footprints = np.full(n, None, dtype=object)
    if cols["footprint"] is not None:  # WKT polygons in EPSG:4326
        wkt = [v if isinstance(v, str) and v.strip() else None for v in table[cols["footprint"]]]
        footprints = shapely.from_wkt(np.array(wkt, dtype=object), on_invalid="raise")
    if geometry is not None:  # GeoJSON: a polygon is the footprint, a point the centre
        is_point = shapely.get_type_id(geometry) == 0
        lon = np.where(np.isnan(lon) & is_point, shapely.get_x(geometry), lon)
        lat = np.where(np.isnan(lat) & is_point, shapely.get_y(geometry), lat)
        footprints = np.where(shapely.is_missing(footprints) & ~is_point, geometry, footprints)
    has_footprint = ~shapely.is_missing(footprints) & ~shapely.is_empty(footprints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        centres = shapely.centroid(np.where(has_footprint, footprints, None))
    lon = np.where(np.isnan(lon) & has_footprint, shapely.get_x(centres), lon)
    lat = np.where(np.isnan(lat) & has_footprint, shapely.get_y(centres), lat)
    unplaced = np.isnan(lat) | np.isnan(lon)
    if unplaced.any():
        raise _no_georeference(
            [images[i] for i in np.flatnonzero(unplaced)], f"Give each row lat and lon in {sidecar.name}."
        )
    side = (
        pd.to_numeric(table[cols["footprint_m"]], errors="coerce").fillna(opts.footprint_m).to_numpy()
        if cols["footprint_m"]
        else opts.footprint_m
    )
    footprints = np.where(has_footprint, footprints, square_footprints(lat, lon, side))
    ids = table[cols["tile_id"]].astype(str).tolist() if cols["tile_id"] else [p.stem for p in images]
    used = {c for c in cols.values() if c is not None}
    context = table.drop(columns=[c for c in table.columns if c in used])
    return make_tiles_frame(ids, footprints, images, lat, lon, context=context, source=sidecar)


# ---------------------------------------------------------------------------------------------------------
# An XYZ folder z/x/y.png (Web Mercator slippy-map tiles, y counted from the north)


def _xyz_files(path: Path) -> list[tuple[int, int, int, Path]]:
    found = []
    for file in path.glob("*/*/*"):
        z, x = file.parent.parent.name, file.parent.name
        if file.suffix.lower() in IMAGE_SUFFIXES and z.isdigit() and x.isdigit() and file.stem.isdigit():
            found.append((int(z), int(x), int(file.stem), file))
    return sorted(found)


def _is_xyz_folder(path: Path) -> bool:
    return path.is_dir() and any(
        p.name.isdigit() and p.is_dir() and any(c.name.isdigit() for c in p.iterdir()) for p in path.iterdir()
    )


def _mercator_lat(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * y / 2.0**z))))


def xyz_bounds(z: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """(west, south, east, north) of slippy-map tiles; y may be fractional (y + 0.5 is the centre)."""
    z, x, y = (np.asarray(a, float) for a in (z, x, y))
    west, east = x / 2.0**z * 360.0 - 180.0, (x + 1) / 2.0**z * 360.0 - 180.0
    return west, _mercator_lat(y + 1, z), east, _mercator_lat(y, z)


def _load_xyz(path: Path, opts: TileOptions) -> gpd.GeoDataFrame:
    found = _xyz_files(path)
    if not found:
        raise DataFormatError(f"empty gallery: no z/x/y.png tiles under {path}")
    z, x, y = (np.array([f[i] for f in found]) for i in range(3))
    outside = (x >= 2**z) | (y >= 2**z)
    if outside.any():
        bad = [f"{a}/{b}/{c}" for a, b, c in zip(z[outside], x[outside], y[outside], strict=True)]
        raise DataFormatError(f"tiles outside the zoom level's grid under {path}: {bad[:5]}")
    west, south, east, north = xyz_bounds(z, x, y)
    lon = (west + east) / 2.0
    lat = _mercator_lat(y + 0.5, z)  # the centre pixel, not the mid-latitude
    ids = [f"{a}/{b}/{c}" for a, b, c in zip(z, x, y, strict=True)]
    context = pd.DataFrame({"zoom": z, "x": x, "y": y})
    return make_tiles_frame(
        ids, shapely.box(west, south, east, north), [f[3] for f in found], lat, lon, context, source=path
    )


# ---------------------------------------------------------------------------------------------------------
# A GeoTIFF cut into square tiles of tile_size_m metres every stride_m metres


def _is_geotiff(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in GEOTIFF_SUFFIXES


def _raster_crs(src, path: Path) -> CRS:
    """The raster's CRS as pyproj, refusing rasters without one or in a CRS that cannot reach EPSG:4326."""
    if src.crs is None or src.transform.is_identity:
        raise DataFormatError(
            f"{path} has no georeference (no CRS or geotransform); assign one, "
            "e.g. `gdal_edit.py -a_srs EPSG:32633 -a_ullr ...`"
        )
    try:
        crs = CRS.from_user_input(src.crs.to_wkt())
        lon, lat = Transformer.from_crs(crs, WGS84, always_xy=True).transform(*src.xy(0, 0))
    except (CRSError, ProjError) as exc:
        raise DataFormatError(f"{path} is in a CRS that cannot be converted to EPSG:4326: {exc}") from exc
    if not (math.isfinite(lon) and math.isfinite(lat)) or crs.is_engineering:
        raise DataFormatError(f"{path} is in an unknown or local CRS ({crs.name}); reproject it first")
    return crs


def _metric_crs(crs: CRS, src, path: Path) -> tuple[CRS, float]:
    """A CRS in linear units to cut tiles in, and its metres per unit: the raster's own if projected, else UTM."""
    if crs.is_projected and crs.axis_info and crs.axis_info[0].unit_conversion_factor:
        return crs, float(crs.axis_info[0].unit_conversion_factor)
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    utm = gpd.GeoSeries([shapely.box(west, south, east, north)], crs=WGS84).estimate_utm_crs()
    if utm is None:
        raise DataFormatError(f"no UTM zone covers {path}; reproject it to a metric CRS first")
    return utm, 1.0


def _stretch(ds, bands: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-band 2-98 % limits for non-byte rasters, from a decimated read so all tiles share one scale."""
    if all(np.dtype(ds.dtypes[b - 1]) == np.uint8 for b in bands):
        return None
    scale = max(ds.width, ds.height) / 1024.0
    shape = (len(bands), max(1, int(ds.height / max(scale, 1))), max(1, int(ds.width / max(scale, 1))))
    sample = ds.read(bands, out_shape=shape, masked=True).astype(float)
    low = np.array([np.nanpercentile(b.compressed(), 2) if b.count() else 0.0 for b in sample])
    high = np.array([np.nanpercentile(b.compressed(), 98) if b.count() else 1.0 for b in sample])
    return low, np.maximum(high, low + 1e-12)


def _to_rgb(data: np.ndarray, stretch: tuple[np.ndarray, np.ndarray] | None) -> Image.Image:
    """(B, H, W) raster values to an RGB image (one band becomes grey)."""
    if stretch is not None:
        low, high = stretch
        data = (data.astype(float) - low[:, None, None]) / (high - low)[:, None, None] * 255.0
        data = np.clip(data, 0, 255)
    pixels = np.moveaxis(data.astype(np.uint8), 0, -1)  # (H, W, B)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3]))


def _save_atomic(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def _load_geotiff(path: Path, opts: TileOptions) -> gpd.GeoDataFrame:
    import rasterio
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import from_bounds

    stride_m = opts.stride_m or opts.tile_size_m
    if not (opts.tile_size_m > 0 and stride_m > 0):
        raise ValueError(f"tile size and stride must be > 0 m, got {opts.tile_size_m} and {stride_m}")
    out_dir = Path(opts.out_dir) if opts.out_dir is not None else path.with_name(f"{path.stem}_tiles")
    out_dir.mkdir(parents=True, exist_ok=True)

    with rasterio.open(path) as src:
        crs = _raster_crs(src, path)
        work_crs, metres_per_unit = _metric_crs(crs, src, path)
        # A geographic raster is cut in a warped (UTM) view; the alpha band marks where data exists.
        ds = (
            src
            if work_crs == crs
            else WarpedVRT(
                src, crs=work_crs.to_wkt(), resampling=Resampling.bilinear, add_alpha=src.nodata is None
            )
        )
        try:
            bands = [i for i, ci in zip(ds.indexes, ds.colorinterp, strict=True) if ci != ColorInterp.alpha][
                :3
            ]
            bands = bands if len(bands) == 3 else bands[:1]
            size, stride = opts.tile_size_m / metres_per_unit, stride_m / metres_per_unit
            left, bottom, right, top = ds.bounds
            pixel_m = abs(ds.transform.a) * metres_per_unit
            px = opts.tile_px or max(1, round(opts.tile_size_m / pixel_m))
            n_cols = int(math.floor((right - left - size) / stride + 1e-9)) + 1 if right - left >= size else 0
            n_rows = int(math.floor((top - bottom - size) / stride + 1e-9)) + 1 if top - bottom >= size else 0
            stretch = _stretch(ds, bands)
            to_wgs84 = Transformer.from_crs(work_crs, WGS84, always_xy=True)

            ids, boxes, files = [], [], []
            cells = [(r, c) for r in range(n_rows) for c in range(n_cols)]
            show = opts.progress if opts.progress is not None else len(cells) > 200
            for r, c in tqdm(cells, desc=f"cutting {path.name}", disable=not show):
                x0, y1 = left + c * stride, top - r * stride
                x1, y0 = x0 + size, y1 - size
                window = from_bounds(x0, y0, x1, y1, ds.transform)
                valid = ds.read_masks(1, window=window, out_shape=(px, px), resampling=Resampling.nearest)
                if (valid > 0).mean() < opts.min_valid:
                    continue
                tile_id = f"{path.stem}_r{r:04d}_c{c:04d}"
                file = out_dir / f"{tile_id}.png"
                if not file.exists():  # a rerun after an interruption keeps finished tiles
                    data = ds.read(
                        bands, window=window, out_shape=(len(bands), px, px), resampling=Resampling.bilinear
                    )
                    _save_atomic(_to_rgb(data, stretch), file)
                ids.append(tile_id)
                boxes.append((x0, y0, x1, y1))
                files.append(file)
        finally:
            if ds is not src:
                ds.close()

    if not ids:
        raise DataFormatError(
            f"empty gallery: {path} yields no {opts.tile_size_m:g} m tile with >= {opts.min_valid:.0%} valid pixels"
        )
    x0, y0, x1, y1 = np.array(boxes).T
    # Corners (and centres) go to EPSG:4326 one by one: the square is not lon/lat-aligned any more.
    corner_x = np.stack([x0, x1, x1, x0], axis=1)
    corner_y = np.stack([y0, y0, y1, y1], axis=1)
    lon_c, lat_c = to_wgs84.transform(corner_x, corner_y)
    footprints = shapely.polygons(np.stack([lon_c, lat_c], axis=-1))
    lon, lat = to_wgs84.transform((x0 + x1) / 2.0, (y0 + y1) / 2.0)
    return make_tiles_frame(ids, footprints, files, lat, lon, source=path)


# ---------------------------------------------------------------------------------------------------------
# Registry and entry point (detection tries the kinds in this order)

SOURCES: dict[str, SourceKind] = {
    "geotiff": SourceKind(_is_geotiff, _load_geotiff, "a GeoTIFF file (.tif/.tiff) with a CRS"),
    "xyz": SourceKind(_is_xyz_folder, _load_xyz, "a folder of slippy-map tiles z/x/y.png"),
    "sidecar": SourceKind(
        lambda p: _sidecar_file(p) is not None,
        _load_sidecar,
        "a CSV/GeoJSON sidecar (columns image, lat, lon [, footprint WKT, footprint_m]) or its folder",
    ),
    "named": SourceKind(_is_named_folder, _load_named, "a folder of images named '<lat>,<lon>_....jpg'"),
}


def detect_kind(source: str | Path) -> str:
    """The name of the first source kind that recognises source."""
    path = Path(source)
    if not path.exists():
        raise DataFormatError(f"tile source {path} does not exist")
    for name, kind in SOURCES.items():
        if kind.detect(path):
            return name
    if path.is_dir() and not any(path.iterdir()):
        raise DataFormatError(f"empty gallery: {path} is an empty folder")
    layouts = "\n  ".join(f"{name}: {kind.layout}" for name, kind in SOURCES.items())
    raise DataFormatError(f"cannot tell what kind of tile source {path} is. Supported layouts:\n  {layouts}")


def load_tiles(
    source: str | Path,
    kind: str | None = None,
    *,
    tile_size_m: float = 150.0,
    stride_m: float | None = None,
    footprint_m: float = 150.0,
    out_dir: str | Path | None = None,
    tile_px: int | None = None,
    min_valid: float = 0.5,
    progress: bool | None = None,
) -> gpd.GeoDataFrame:
    """Read a tile source into a GeoDataFrame (EPSG:4326): tile_id, geometry, lat, lon, image_path, context...

    kind is a key of SOURCES; None detects it. GeoTIFF tiles are written as PNGs to out_dir.
    """
    path = Path(source).expanduser()
    name = kind or detect_kind(path)
    if name not in SOURCES:
        raise ValueError(f"unknown tile source kind {name!r}; choose one of {sorted(SOURCES)}")
    options = TileOptions(
        tile_size_m=tile_size_m,
        stride_m=stride_m,
        footprint_m=footprint_m,
        out_dir=Path(out_dir) if out_dir is not None else None,
        tile_px=tile_px,
        min_valid=min_valid,
        progress=progress,
    )
    return SOURCES[name].load(path, options)
