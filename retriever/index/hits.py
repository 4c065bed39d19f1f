"""Ranked hits and their exports: the one GeoJSON and CSV writer, with cells a spreadsheet will not run."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

from retriever._io import write_text_atomic

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what Excel, LibreOffice and Sheets read as a formula
HIT_COLUMNS = ["rank", "tile_id", "score", "lat", "lon", "west", "south", "east", "north", "image_path"]


def json_safe(value: Any) -> Any:
    """A value json.dumps accepts: numpy scalars unwrapped, NaN as None, arrays as lists."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, np.ndarray | list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, BaseGeometry):
        return json.loads(shapely.to_geojson(value))
    if value is pd.NaT or value is pd.NA:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@dataclass(frozen=True)
class Hit:
    """One ranked tile."""

    rank: int  # 1-based
    tile_id: str
    score: float
    lat: float  # tile centre, EPSG:4326
    lon: float
    bbox: tuple[float, float, float, float]  # west, south, east, north
    image_path: str  # absolute path to the thumbnail (the source image when built without thumbnails)
    footprint: shapely.geometry.Polygon  # EPSG:4326
    context: dict = field(default_factory=dict)  # optional context columns, JSON-safe values

    def to_dict(self) -> dict:
        """JSON-safe; the footprint as a GeoJSON geometry."""
        return {
            "rank": self.rank,
            "tile_id": self.tile_id,
            "score": self.score,
            "lat": self.lat,
            "lon": self.lon,
            "bbox": list(self.bbox),
            "image_path": self.image_path,
            "footprint": json_safe(self.footprint),
            "context": json_safe(self.context),
        }


def _per_query(hits: Sequence[Hit] | Sequence[Sequence[Hit]]) -> list[list[Hit]]:
    return [list(hits)] if not hits or isinstance(hits[0], Hit) else [list(h) for h in hits]


def hits_to_geojson(
    hits: Sequence[Hit] | Sequence[Sequence[Hit]], queries: Sequence[str] | None = None
) -> dict:
    """A GeoJSON FeatureCollection of hit footprints; lists per query get query_index (and query) properties."""
    nested = bool(hits) and not isinstance(hits[0], Hit)
    features = []
    for q, query_hits in enumerate(_per_query(hits)):
        for hit in query_hits:
            record = hit.to_dict()
            properties = {key: value for key, value in record.items() if key not in {"footprint", "context"}}
            properties.update(record["context"])
            if nested:
                properties["query_index"] = q
            if queries is not None:
                properties["query"] = queries[q]
            features.append({"type": "Feature", "geometry": record["footprint"], "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def csv_cell(value: Any) -> Any:
    """A text cell that starts like a formula (= + - @, tab, CR) gets a leading apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(
    rows: Sequence[Mapping[str, Any]],
    path_or_buffer: str | Path | IO[str],
    columns: Sequence[str] | None = None,
) -> None:
    """Write dict rows as CSV with formula-safe text cells and headers; a path is written atomically.

    columns names the header of an empty table (otherwise the rows' keys, in first-seen order).
    """
    frame = pd.DataFrame(list(rows), columns=None if rows else columns)
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):  # numeric columns are never formulas
            frame[column] = frame[column].map(csv_cell)
    frame.columns = [csv_cell(str(c)) for c in frame.columns]  # context column names come from user data
    if isinstance(path_or_buffer, str | Path):
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        write_text_atomic(path_or_buffer, buffer.getvalue())
    else:
        frame.to_csv(path_or_buffer, index=False)


def hit_rows(
    hits: Sequence[Hit] | Sequence[Sequence[Hit]], queries: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One flat row per hit: [query_index, query,] rank, tile_id, score, lat, lon, west..north, image_path, context..."""
    nested = bool(hits) and not isinstance(hits[0], Hit)
    rows = []
    for q, query_hits in enumerate(_per_query(hits)):
        for hit in query_hits:
            row: dict[str, Any] = {"query_index": q} if nested else {}
            if queries is not None:
                row["query"] = queries[q]
            west, south, east, north = hit.bbox
            row.update(rank=hit.rank, tile_id=hit.tile_id, score=hit.score, lat=hit.lat, lon=hit.lon)
            row.update(west=west, south=south, east=east, north=north, image_path=hit.image_path)
            row.update({key: value for key, value in json_safe(hit.context).items() if key not in row})
            rows.append(row)
    return rows


def hits_to_csv(
    hits: Sequence[Hit] | Sequence[Sequence[Hit]],
    path_or_buffer: str | Path | IO[str],
    queries: Sequence[str] | None = None,
) -> None:
    """Write hits as CSV (the columns of hit_rows), formula-safe: see csv_cell."""
    write_csv(hit_rows(hits, queries), path_or_buffer, HIT_COLUMNS)
