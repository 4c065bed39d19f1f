"""The tile index: a resumable sharded build, a verified load, and exact or FAISS top-K search with spatial filters."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
from PIL import Image
from shapely.geometry.base import BaseGeometry
from tqdm.auto import tqdm

from retriever._io import library_versions
from retriever.errors import (
    CorruptIndexError,
    DataFormatError,
    ImageDecodeError,
    IndexMismatchError,
    MissingDependencyError,
    RetrieverError,
)
from retriever.index.spatial import parse_within, select
from retriever.index.tiles import CORE_COLUMNS, SOURCES, WGS84, load_tiles

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.npy"
TILES = "tiles.parquet"
MANIFEST = "manifest.json"
THUMBNAILS = "thumbnails"
SHARDS = ".shards"
FORMAT = "geotext-retriever/tile-index"
FORMAT_VERSION = 1
DTYPES: dict[str, np.dtype] = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
VERSIONED_PACKAGES = (  # beside Python and this library's own version
    "numpy",
    "torch",
    "transformers",
    "peft",
    "faiss-cpu",
    "geopandas",
    "shapely",
    "pyarrow",
    "rasterio",
)
NPY_HEADER_READERS: dict[tuple[int, int], Callable[[IO[bytes]], tuple]] = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class TileEncoder(Protocol):
    """What building needs from a retriever."""

    def fingerprint(self) -> dict: ...

    def encode_tiles(
        self, images: Sequence[Any], batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor: ...


class QueryEncoder(Protocol):
    """What text search needs from a retriever."""

    def fingerprint(self) -> dict: ...

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = None
    ) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------------
# Hits and their exports


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


def hits_to_csv(
    hits: Sequence[Hit] | Sequence[Sequence[Hit]],
    path_or_buffer: str | Path | IO[str],
    queries: Sequence[str] | None = None,
) -> None:
    """Write hits as CSV: [query_index, query,] rank, tile_id, score, lat, lon, west, south, east, north, image_path, context..."""
    nested = bool(hits) and not isinstance(hits[0], Hit)
    rows = []
    for q, query_hits in enumerate(_per_query(hits)):
        for hit in query_hits:
            row = {"query_index": q} if nested else {}
            if queries is not None:
                row["query"] = queries[q]
            west, south, east, north = hit.bbox
            row.update(rank=hit.rank, tile_id=hit.tile_id, score=hit.score, lat=hit.lat, lon=hit.lon)
            row.update(west=west, south=south, east=east, north=north, image_path=hit.image_path)
            row.update({key: value for key, value in json_safe(hit.context).items() if key not in row})
            rows.append(row)
    columns = ["rank", "tile_id", "score", "lat", "lon", "west", "south", "east", "north", "image_path"]
    pd.DataFrame(rows, columns=None if rows else columns).to_csv(path_or_buffer, index=False)


# ---------------------------------------------------------------------------------------------------------
# Search backends


def exact_topk(
    table: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    rows: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    block_rows: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of queries (Q, D) with table rows (N, D); returns scores, row ids (Q, k).

    The table is read in chunks small enough to stay in cache: fp16 rows are widened to fp32 into a
    reused buffer, multiplied, and a running top-k is kept per block, so memory stays O(block x Q) and
    the bytes read per query are the stored ones (half of fp32 for fp16). rows restricts the scan.
    """
    n = table.shape[0] if rows is None else rows.numel()
    k = min(k, n)
    num_q, dim = queries.shape
    device = table.device
    if chunk_rows is None:  # tuned in benchmarks/bench_search.py: cache-sized for matvec, larger for GEMM
        chunk_rows = (512 if num_q <= 8 else 4096) if device.type == "cpu" else 1 << 16
    block_rows = max(block_rows, chunk_rows)
    widen = table.dtype != torch.float32
    q_t = queries.to(device=device, dtype=torch.float32).T.contiguous()  # (D, Q)
    f32 = (
        torch.empty((chunk_rows, dim), dtype=torch.float32, device=device)
        if widen or rows is not None
        else None
    )
    picked = (
        torch.empty((chunk_rows, dim), dtype=table.dtype, device=device)
        if widen and rows is not None
        else None
    )
    scores = torch.empty((min(block_rows, n), num_q), dtype=torch.float32, device=device)  # (B, Q)
    best_s = best_i = None
    for b0 in range(0, n, block_rows):
        b1 = min(b0 + block_rows, n)
        for c0 in range(b0, b1, chunk_rows):
            c1 = min(c0 + chunk_rows, b1)
            x = (
                table[c0:c1]
                if rows is None
                else torch.index_select(table, 0, rows[c0:c1], out=(picked if widen else f32)[: c1 - c0])
            )
            if widen:
                x = f32[: c1 - c0].copy_(x)  # (C, D) fp32, still in cache for the product
            if num_q == 1:  # GEMV: torch.mm with one column takes a much slower path on CPU
                torch.mv(x, q_t[:, 0], out=scores[c0 - b0 : c1 - b0, 0])
            else:
                torch.mm(x, q_t, out=scores[c0 - b0 : c1 - b0])
        s, i = torch.topk(scores[: b1 - b0], min(k, b1 - b0), dim=0)  # (k', Q)
        i += b0
        if best_s is not None:
            s, j = torch.topk(torch.cat([best_s, s]), k, dim=0)
            i = torch.gather(torch.cat([best_i, i]), 0, j)
        best_s, best_i = s, i
    if rows is not None:
        best_i = rows[best_i]
    return best_s.T.contiguous(), best_i.T.contiguous()


def _as_tensor(embeddings: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memmap: torch warns, but the table is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(embeddings)


def faiss_view(embeddings: np.ndarray):
    """A faiss flat index whose codes are the embeddings' own memory (zero copy), or None without faiss.

    fp16 rows are exactly faiss's "SQfp16" codes and fp32 rows IndexFlatIP's, so the scan is exact. faiss
    scans one query on one thread at memory speed with no per-chunk synchronisation, which beats the
    chunked torch scan at batch 1 and stays fast when other processes share the cores.
    """
    try:
        import faiss
    except ImportError:
        return None
    n, dim = embeddings.shape
    flat = {
        np.dtype(np.float16): lambda: faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        ),
        np.dtype(np.float32): lambda: faiss.IndexFlatIP(dim),
    }
    if embeddings.dtype not in flat or not embeddings.flags.c_contiguous:
        return None
    index = flat[embeddings.dtype]()
    codes = embeddings.reshape(-1).view(np.uint8)
    try:  # a non-owning MaybeOwnedVector (faiss >= 1.10), the same mechanism as faiss's own mmap loading
        view = faiss.MaybeOwnedVectorUInt8()
        pointer = faiss.swig_ptr(codes)
        view.is_owned, view.view_data, view.view_size = False, pointer, codes.size
        view.c_ptr, view.c_size = pointer, codes.size
        index.codes = view
    except (AttributeError, TypeError):
        return None
    index.ntotal = n
    index.referenced_objects = [embeddings]  # the codes point into this array: keep it alive
    return index


class ExactSearch:
    """Exact top-K: small batches by a zero-copy faiss scan on CPU, otherwise chunked torch products.

    On an accelerator the table is moved there once. On CPU it is read in place (a memory map works).
    """

    faiss_max_queries = 2  # above this, one GEMM pass over the table beats a faiss pass per query

    def __init__(self, embeddings: np.ndarray, device: torch.device, chunk_rows: int | None = None) -> None:
        self.table = _as_tensor(embeddings).to(device)  # (N, D); a no-op view on CPU
        self.device = device
        self.chunk_rows = chunk_rows
        self.scan = faiss_view(embeddings) if device.type == "cpu" else None

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = self.table.shape[0]
        # Few candidates: gather them (cost ~ candidates); many: scan all rows and skip the others (a bitmap).
        if (
            self.scan is not None
            and len(queries) <= self.faiss_max_queries
            and (rows is None or len(rows) > n // 16)
        ):
            return self._faiss_topk(queries, k, rows)
        row_ids = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        scores, ids = exact_topk(self.table, queries, k, row_ids, self.chunk_rows)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def _faiss_topk(
        self, queries: torch.Tensor, k: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)  # (Q, D)
        if rows is None:
            return self.scan.search(q, k)
        mask = np.zeros(self.table.shape[0], dtype=bool)
        mask[rows] = True
        bits = np.packbits(mask, bitorder="little")  # faiss reads bit i as bits[i >> 3] >> (i & 7)
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        return self.scan.search(q, k, params=faiss.SearchParameters(sel=selector))


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError("the faiss backend needs faiss: pip install faiss-cpu") from exc
    return faiss


class FaissSearch:
    """A FAISS index built from the embeddings (an in-memory copy), by factory string.

    "Flat" (IndexFlatIP, fp32 copy) and "SQfp16" (fp16 copy, half the memory) are exact; e.g.
    "IVF1024,Flat" (params "nprobe=32") or "HNSW32" (params "efSearch=128") are approximate.
    Filtered searches go through the exact scan of the candidate rows, so spatial filters stay exact.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        device: torch.device,
        factory: str = "Flat",
        params: str | None = None,
        train_size: int = 100_000,
        chunk_rows: int | None = None,
    ) -> None:
        faiss = _import_faiss()
        n, dim = embeddings.shape
        self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, train_size), replace=False))
            self.index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
        for start in range(0, n, 1 << 16):  # fp32 in slices: the fp16 table is never widened whole
            self.index.add(np.ascontiguousarray(embeddings[start : start + (1 << 16)], dtype=np.float32))
        if params:  # e.g. "nprobe=32" or "efSearch=128"
            faiss.ParameterSpace().set_index_parameters(self.index, params)
        self.exact = ExactSearch(embeddings, torch.device("cpu"), chunk_rows)

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if rows is not None:
            return self.exact.topk(queries, k, rows)
        scores, ids = self.index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
        return scores, ids  # approximate indexes may pad with id -1


def ann_topk(
    index: Any, embeddings: np.ndarray, queries: np.ndarray, k: int, rerank: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries (Q, D) fp32 from a faiss index; rerank > 1 fetches k x rerank candidates and re-scores
    them exactly against the stored (memory-mapped) rows, so only Q x k x rerank rows are read.

    Returns scores, ids (Q, k); ids are -1 where the index found fewer than k.
    """
    if rerank <= 1:
        return index.search(queries, k)
    _, cand = index.search(queries, k * rerank)  # (Q, kR)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for qi, (q, c) in enumerate(zip(queries, cand, strict=True)):
        c = np.sort(c[c >= 0])  # sorted reads from the memory map
        exact = np.asarray(embeddings[c], dtype=np.float32) @ q  # (kR,)
        top = np.argsort(-exact, kind="stable")[:k]
        scores[qi, : len(top)], ids[qi, : len(top)] = exact[top], c[top]
    return scores, ids


class AnnSearch:
    """A trained faiss ANN index stored next to the embeddings (written by `optimize`), read into memory.

    Unfiltered searches go through the ANN index (approximate; ids may be padded with -1), optionally
    re-scoring k x rerank candidates exactly against the stored rows. Searches with a spatial filter fall
    back to the exact scan of the filtered rows: an IVF or HNSW index cannot restrict its candidates
    cheaply, and a filtered area is usually small enough for exact search anyway.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        device: torch.device,
        path: str | Path,
        params: str | None = None,
        chunk_rows: int | None = None,
        rerank: int = 0,
    ) -> None:
        faiss = _import_faiss()
        path = Path(path)
        if not path.is_file():
            raise CorruptIndexError(f"{path} is missing; rerun `python -m retriever.index optimize`")
        try:
            self.index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise CorruptIndexError(f"cannot read the ANN index {path}: {exc}") from exc
        n, dim = embeddings.shape
        if self.index.ntotal != n or self.index.d != dim:
            raise CorruptIndexError(
                f"{path} holds {self.index.ntotal} x {self.index.d} vectors, the embeddings {n} x {dim}; "
                "rerun `python -m retriever.index optimize`"
            )
        if params:  # e.g. "nprobe=32" or "efSearch=128"
            faiss.ParameterSpace().set_index_parameters(self.index, params)
        self.params, self.rerank, self.embeddings = params, rerank, embeddings
        self.exact = ExactSearch(embeddings, device, chunk_rows)

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if rows is not None:  # spatial filter: exact over the filtered rows
            return self.exact.topk(queries, k, rows)
        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)  # (Q, D)
        return ann_topk(self.index, self.embeddings, q, k, self.rerank)  # scores, ids (Q, k)


BACKENDS: dict[str, Callable[..., ExactSearch | FaissSearch | AnnSearch]] = {
    "torch": ExactSearch,
    "faiss": FaissSearch,
    "ann": AnnSearch,
}


def _ann_options(folder: Path, manifest: dict) -> dict:
    ann = manifest.get("ann")
    if not ann:
        raise ValueError(
            f"{folder} has no ANN index; build one with `python -m retriever.index optimize {folder} --faiss ...`"
        )
    return {"path": folder / ann["file"], "params": ann.get("params"), "rerank": int(ann.get("rerank", 0))}


# Options a backend reads from the index folder and its manifest (others need none).
BACKEND_OPTIONS: dict[str, Callable[[Path, dict], dict]] = {"ann": _ann_options}


def resolve_backend(manifest: dict, backend: str | None = None, exact: bool = False) -> str:
    """The backend a load uses: the one asked for, else "ann" when the index has one (and exact is off), else "torch"."""
    if backend == "ann" and exact:
        raise ValueError('backend="ann" is approximate; drop exact=True or pick "torch"')
    if backend is not None:
        return backend
    return "ann" if manifest.get("ann") and not exact else "torch"


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------
# Manifest and file checks


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a finished index; a missing one means the build never completed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptIndexError(f"no index at {folder}: the folder does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (unfinished shards are in .shards/)" if (folder / SHARDS).is_dir() else ""
        raise CorruptIndexError(
            f"{folder} has no {MANIFEST}: its build did not finish{hint}. "
            "Rerun `python -m retriever.index build ... --out` on it to resume."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptIndexError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CorruptIndexError(f"{path} is not a tile index manifest (format={manifest.get('format')!r})")
    return manifest


def fingerprint_differences(recorded: dict, live: dict) -> list[str]:
    """One 'key: index=..., live=...' line per differing key (a key absent on one side counts)."""
    missing = "<absent>"
    live = json.loads(json.dumps(live, default=str))  # compare in the form the manifest stores
    keys = list(recorded) + [key for key in live if key not in recorded]
    return [
        f"{key}: index={recorded.get(key, missing)!r}, live={live.get(key, missing)!r}"
        for key in keys
        if recorded.get(key, missing) != live.get(key, missing)
    ]


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _check_embeddings(path: Path, manifest: dict, verify: bool) -> None:
    """Refuse an embeddings file whose header, size or hash disagrees with the manifest."""
    if not path.is_file():
        raise CorruptIndexError(f"{path} is missing")
    expect = (int(manifest["n"]), int(manifest["dim"]))
    dtype = DTYPES[manifest["dtype"]]
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, stored = NPY_HEADER_READERS[version](f)
        except (ValueError, KeyError, EOFError) as exc:
            raise CorruptIndexError(f"{path} is not a readable .npy file: {exc}") from exc
        offset = f.tell()
    if tuple(shape) != expect or np.dtype(stored) != dtype or fortran:
        raise CorruptIndexError(
            f"{path} holds {tuple(shape)} {np.dtype(stored)}, the manifest says {expect} {dtype}; rebuild the index"
        )
    size, want = path.stat().st_size, offset + expect[0] * expect[1] * dtype.itemsize
    if size != want or size != manifest["embeddings"]["bytes"]:
        raise CorruptIndexError(
            f"{path} is truncated or padded: {size} bytes, expected {want}; rebuild the index"
        )
    if verify and file_sha256(path) != manifest["embeddings"]["sha256"]:
        raise CorruptIndexError(f"{path} does not match the sha256 in the manifest; rebuild the index")


# ---------------------------------------------------------------------------------------------------------
# The index


class TileIndex:
    """Tile embeddings (N, D) with their GeoParquet metadata; search returns ranked Hits."""

    def __init__(
        self,
        folder: Path,
        manifest: dict,
        embeddings: np.ndarray,
        tiles: gpd.GeoDataFrame,
        device: torch.device,
        backend: str = "torch",
        backend_options: dict | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; choose one of {sorted(BACKENDS)}")
        self.folder, self.manifest, self.embeddings, self.tiles = folder, manifest, embeddings, tiles
        self.device = device
        self.backend_name = backend
        self.backend = BACKENDS[backend](embeddings, device, **(backend_options or {}))
        # Columns as arrays once, so building a Hit is a few lookups.
        self._ids = tiles["tile_id"].astype(str).to_numpy()
        self._lat = tiles["lat"].to_numpy(float)
        self._lon = tiles["lon"].to_numpy(float)
        self._geoms = tiles.geometry.to_numpy()
        self._bounds = shapely.bounds(self._geoms)  # (N, 4)
        thumbs = tiles["thumbnail"] if "thumbnail" in tiles else pd.Series([None] * len(tiles))
        self._images = [
            str((folder / t).resolve()) if isinstance(t, str) else str(p)
            for t, p in zip(thumbs, tiles["image_path"], strict=True)
        ]
        self.context_columns = [c for c in tiles.columns if c not in CORE_COLUMNS and c != "thumbnail"]
        self._context = {c: tiles[c].to_numpy() for c in self.context_columns}

    @classmethod
    def load(
        cls,
        folder: str | Path,
        retriever: QueryEncoder | None = None,
        device: str | torch.device | None = None,
        *,
        backend: str | None = None,
        mmap: bool = True,
        verify: bool = False,
        exact: bool = False,
        **backend_options: Any,
    ) -> TileIndex:
        """Open an index folder, checking its files; refuses (IndexMismatchError) a retriever with another fingerprint.

        backend: "torch" (exact; GPU when present; on CPU, batches of <= 2 queries use a zero-copy faiss
        scan of the same table), "faiss" (an in-memory faiss index; backend_options: factory, params) or
        "ann" (the trained index written by `optimize`; backend_options: params). None (the default) picks
        "ann" when the manifest records one and exact is False, else "torch". Filtered searches are exact
        with every backend. verify also checks the embeddings' sha256 (reads the whole file).
        """
        folder = Path(folder).expanduser().resolve()
        manifest = read_manifest(folder)
        if retriever is not None:
            _refuse_mismatch(manifest["retriever"], retriever.fingerprint(), folder)
        _check_embeddings(folder / manifest["embeddings"]["file"], manifest, verify)
        embeddings = np.load(folder / manifest["embeddings"]["file"], mmap_mode="r" if mmap else None)
        try:
            tiles = gpd.read_parquet(folder / manifest["tiles"]["file"])
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise CorruptIndexError(f"cannot read {folder / manifest['tiles']['file']}: {exc}") from exc
        if len(tiles) != manifest["n"]:
            raise CorruptIndexError(f"{TILES} has {len(tiles)} rows, the manifest says {manifest['n']}")
        tiles = tiles.to_crs(WGS84) if tiles.crs is not None and tiles.crs != WGS84 else tiles
        backend = resolve_backend(manifest, backend, exact)
        if backend in BACKEND_OPTIONS:
            backend_options = {**BACKEND_OPTIONS[backend](folder, manifest), **backend_options}
        return cls(folder, manifest, embeddings, tiles, pick_device(device), backend, backend_options)

    @property
    def n(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def fingerprint(self) -> dict:
        return self.manifest["retriever"]

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"TileIndex({str(self.folder)!r}, n={self.n}, dim={self.dim}, dtype={self.manifest['dtype']})"

    def check_retriever(self, retriever: QueryEncoder) -> None:
        """Raise IndexMismatchError unless retriever is the one that built the index."""
        _refuse_mismatch(self.fingerprint, retriever.fingerprint(), self.folder)

    def rows_within(self, within: str | Path | BaseGeometry | np.ndarray | None) -> np.ndarray | None:
        """Row ids inside an area (spec string, geometry or boolean mask); None means every row."""
        if within is None:
            return None
        if isinstance(within, np.ndarray) and within.dtype == bool:
            mask = within
            if not mask.any():
                raise ValueError("the spatial mask selects no tile")
        else:
            area = parse_within(within) if isinstance(within, str | Path) else within
            mask = select(self.tiles, area)
        return None if mask.all() else np.flatnonzero(mask)

    def search(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int,
        within: str | Path | BaseGeometry | np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Top-k tiles per query (Q, D), restricted to within (see rows_within); k > candidates is clamped."""
        if k <= 0:
            raise ValueError(f"k must be at least 1, got {k}")
        if isinstance(query_embeddings, torch.Tensor):
            queries = query_embeddings.detach().float().cpu()
        else:
            queries = torch.from_numpy(np.asarray(query_embeddings, dtype=np.float32))
        queries = queries[None] if queries.ndim == 1 else queries  # (Q, D)
        if queries.shape[-1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[-1]}, the index {self.dim}")
        rows = self.rows_within(within)
        candidates = self.n if rows is None else len(rows)
        if k > candidates:
            where = "in the index" if rows is None else "in the area"
            log.warning(
                "k=%d is more than the %d tiles %s; returning all %d", k, candidates, where, candidates
            )
            k = candidates
        scores, ids = self.backend.topk(queries, k, rows)
        return [
            [
                self._hit(int(row), rank, float(score))
                for rank, (score, row) in enumerate(zip(s, i, strict=True), 1)
                if row >= 0
            ]
            for s, i in zip(scores, ids, strict=True)
        ]

    def search_text(
        self,
        retriever: QueryEncoder,
        texts: str | Sequence[str],
        k: int,
        within: str | Path | BaseGeometry | np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Encode texts with retriever (checked against the manifest) and search."""
        self.check_retriever(retriever)
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.search(retriever.encode_queries(texts), k, within)

    def hit(self, row: int, rank: int, score: float) -> Hit:
        """The Hit for one row of the index, at a given rank and score (for rankers built on top)."""
        return self._hit(row, rank, score)

    def _hit(self, row: int, rank: int, score: float) -> Hit:
        return Hit(
            rank=rank,
            tile_id=str(self._ids[row]),
            score=score,
            lat=float(self._lat[row]),
            lon=float(self._lon[row]),
            bbox=tuple(float(v) for v in self._bounds[row]),
            image_path=self._images[row],
            footprint=self._geoms[row],
            context={c: json_safe(values[row]) for c, values in self._context.items()},
        )


def _refuse_mismatch(recorded: dict, live: dict, folder: Path) -> None:
    differences = fingerprint_differences(recorded, live)
    if differences:
        raise IndexMismatchError(
            f"the index at {folder} was built by a different retriever:\n  "
            + "\n  ".join(differences)
            + "\nLoad the retriever recorded in its manifest, or rebuild the index with this one."
        )


# ---------------------------------------------------------------------------------------------------------
# Building


def _validated(tiles: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    if len(tiles) == 0:
        raise DataFormatError("empty gallery: there are no tiles to index")
    missing = [c for c in CORE_COLUMNS if c not in tiles.columns]
    if missing:
        raise DataFormatError(
            f"the tile frame lacks columns {missing}; build it with retriever.index.tiles.load_tiles"
        )
    if tiles["tile_id"].duplicated().any():
        raise DataFormatError("tile ids must be unique")
    if tiles.crs is None:
        raise DataFormatError("the tile frame has no CRS; footprints must be in EPSG:4326")
    return tiles.to_crs(WGS84).reset_index(drop=True)


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_thumbnails(images: Sequence[str], targets: Sequence[Path], px: int) -> None:
    for source, target in zip(images, targets, strict=True):
        try:
            with Image.open(source) as image:
                image.draft("RGB", (px, px))  # JPEG decodes at reduced size directly
                thumb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"cannot read tile image {source}: {exc}") from exc
        thumb.thumbnail((px, px))
        tmp = _atomic_path(target)
        thumb.save(tmp, format="JPEG", quality=88)
        os.replace(tmp, target)


def _shard_key(fingerprint: dict, dtype: str, thumbnail_px: int) -> str:
    return json.dumps(
        {"retriever": fingerprint, "dtype": dtype, "thumbnail_px": thumbnail_px}, sort_keys=True
    )


def _shard_done(path: Path, tile_ids: Sequence[str], key: str) -> bool:
    """A finished shard for exactly these tiles, made by the same retriever and settings."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as shard:
            same = str(shard["key"]) == key and shard["tile_ids"].tolist() == list(tile_ids)
            return same and shard["embeddings"].shape[0] == len(tile_ids)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable shard %s (%s); it will be recomputed", path, exc)
        return False


def _save_shard(path: Path, embeddings: np.ndarray, tile_ids: Sequence[str], key: str) -> None:
    tmp = _atomic_path(path)
    with open(tmp, "wb") as f:
        np.savez(f, embeddings=embeddings, tile_ids=np.array(tile_ids, dtype=str), key=np.array(key))
    os.replace(tmp, path)  # a shard is either absent or complete


def build_index(
    retriever: TileEncoder,
    tiles: gpd.GeoDataFrame,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: str = "fp16",
    thumbnail_px: int = 256,
    progress: bool | None = None,
    load_args: dict | None = None,
) -> Path:
    """Embed tiles into an index folder; rerunning after an interruption reuses the finished shards.

    Order: shards (.shards/, each written atomically) -> embeddings.npy -> tiles.parquet -> manifest.json,
    so a manifest proves the rest is complete. thumbnail_px=0 skips thumbnails (hits then point at the
    source images). load_args ({"model", "adapter", "quantization"}) tells the search CLI how to reload
    the retriever.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    tiles = _validated(tiles)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is an unfinished build
    shard_dir = out / SHARDS
    shard_dir.mkdir(exist_ok=True)
    if thumbnail_px:
        (out / THUMBNAILS).mkdir(exist_ok=True)

    fingerprint = json.loads(json.dumps(retriever.fingerprint(), default=str))
    key = _shard_key(fingerprint, dtype, thumbnail_px)
    n = len(tiles)
    ids = tiles["tile_id"].astype(str).tolist()
    images = tiles["image_path"].astype(str).tolist()
    thumbs = [f"{THUMBNAILS}/{row:07d}.jpg" for row in range(n)] if thumbnail_px else [None] * n
    shards = [shard_dir / f"{i:06d}.npz" for i in range(math.ceil(n / shard_size))]

    show = progress if progress is not None else n >= 1000
    with tqdm(total=n, desc="embedding tiles", unit="tile", disable=not show) as bar:
        for i, shard in enumerate(shards):
            lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
            if not _shard_done(shard, ids[lo:hi], key):
                if thumbnail_px:
                    _write_thumbnails(images[lo:hi], [out / t for t in thumbs[lo:hi]], thumbnail_px)
                vectors = retriever.encode_tiles(images[lo:hi], batch_size=batch_size, progress=False)
                vectors = np.asarray(torch.as_tensor(vectors).float().cpu(), dtype=np.float32)  # (n_i, D)
                if vectors.ndim != 2 or vectors.shape[0] != hi - lo:
                    raise RetrieverError(f"encode_tiles returned {vectors.shape} for {hi - lo} tiles")
                _save_shard(shard, vectors.astype(DTYPES[dtype]), ids[lo:hi], key)
            bar.update(hi - lo)

    # Merge the shards into one memory-mappable .npy.
    with np.load(shards[0], allow_pickle=False) as first:
        dim = int(first["embeddings"].shape[1])
    target = out / EMBEDDINGS
    tmp = _atomic_path(target)
    merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=(n, dim))
    for i, shard in enumerate(shards):
        with np.load(shard, allow_pickle=False) as part:
            if part["embeddings"].shape[1] != dim:
                raise RetrieverError(f"shard {shard} has dimension {part['embeddings'].shape[1]}, not {dim}")
            merged[i * shard_size : i * shard_size + len(part["embeddings"])] = part["embeddings"]
    merged.flush()
    del merged
    os.replace(tmp, target)

    table = tiles.assign(thumbnail=thumbs)
    tmp = _atomic_path(out / TILES)
    table.to_parquet(tmp)
    os.replace(tmp, out / TILES)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "retriever": fingerprint,
        "load": json_safe(load_args) if load_args else None,
        "n": n,
        "dim": dim,
        "dtype": dtype,
        "embeddings": {"file": EMBEDDINGS, "bytes": target.stat().st_size, "sha256": file_sha256(target)},
        "tiles": {
            "file": TILES,
            "columns": [str(c) for c in table.columns],
            "context_columns": [str(c) for c in table.columns if c not in CORE_COLUMNS and c != "thumbnail"],
        },
        "thumbnails": {"folder": THUMBNAILS, "px": thumbnail_px} if thumbnail_px else None,
        "versions": library_versions(VERSIONED_PACKAGES),
    }
    tmp = _atomic_path(out / MANIFEST)
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)  # written last: its presence proves the build finished
    shutil.rmtree(shard_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Approximate search: python -m retriever.index optimize

ANN_FILE = "ann.faiss"
ADD_CHUNK_ROWS = 1 << 16  # rows widened to fp32 at a time while adding (64k x 1024 x 4 B = 256 MiB)


def _ivf_params(index: Any, nprobe: int | None, ef_search: int | None) -> str | None:
    return f"nprobe={nprobe or 32}"


def _hnsw_params(index: Any, nprobe: int | None, ef_search: int | None) -> str | None:
    return f"efSearch={ef_search or 128}"


# Search-time parameters by the kind of trained index (first match wins); flat indexes have none.
SEARCH_PARAMS: dict[str, Callable[[Any, int | None, int | None], str | None]] = {
    "ivf": _ivf_params,
    "hnsw": _hnsw_params,
}


def _index_kind(index: Any) -> str | None:
    import faiss

    kinds = {
        "ivf": faiss.try_extract_index_ivf(index) is not None,
        "hnsw": hasattr(faiss.downcast_index(index), "hnsw"),
    }
    return next((kind for kind, present in kinds.items() if present), None)


def _no_polysemous_training(index: Any) -> None:
    """Skip PQ's polysemous training (factory default): search never uses Hamming filtering, and it is slow."""
    import faiss

    for part in (index, faiss.try_extract_index_ivf(index)):
        if part is not None and hasattr(faiss.downcast_index(part), "do_polysemous_training"):
            faiss.downcast_index(part).do_polysemous_training = False


def _rows_fp32(embeddings: np.ndarray, rows: np.ndarray, chunk_rows: int = ADD_CHUNK_ROWS) -> np.ndarray:
    """embeddings[rows] widened to fp32, gathered in chunks from the (memory-mapped) table; rows sorted."""
    out = np.empty((len(rows), embeddings.shape[1]), dtype=np.float32)  # (M, D)
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = embeddings[rows[start : start + chunk_rows]]
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k (Q, k) found in the approximate top-k (Q, k)."""
    k = exact_ids.shape[1]
    found = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids, strict=True)]
    return float(np.mean(found) / k)


def recall_queries(embeddings: np.ndarray, count: int, seed: int = 1, noise: float = 0.1) -> np.ndarray:
    """count stored rows (random) plus Gaussian noise of relative size noise, L2-normalised: (Q, D) fp32."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(embeddings), size=min(count, len(embeddings)), replace=False))
    q = _rows_fp32(embeddings, rows)  # (Q, D)
    scale = noise * np.linalg.norm(q, axis=1, keepdims=True) / math.sqrt(q.shape[1])
    q += rng.standard_normal(q.shape).astype(np.float32) * scale
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = _atomic_path(folder / MANIFEST)
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)


def optimize_index(
    folder: str | Path,
    factory: str,
    *,
    train_sample: int = 500_000,
    params: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int = 0,
    num_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Train a faiss index (factory string, inner product) next to the embeddings; returns the manifest's "ann" entry.

    The embeddings are read memory-mapped: only the training sample (train_sample x D fp32) and one chunk of
    ADD_CHUNK_ROWS rows are ever widened to fp32. recall@k against exact search is measured on num_queries
    noisy stored rows. Order: ann.faiss (tmp + rename), then manifest.json rewritten with "ann" (tmp + rename).
    params (a faiss ParameterSpace string) overrides nprobe / ef_search (defaults: nprobe=32, efSearch=128).
    rerank > 1 re-scores k x rerank ANN candidates exactly against the stored rows at search time (recorded;
    recall is measured with it): the cure for PQ's coarse scores at the cost of k x rerank row reads.
    """
    import time

    faiss = _import_faiss()
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    _check_embeddings(folder / manifest["embeddings"]["file"], manifest, verify=False)
    embeddings = np.load(folder / manifest["embeddings"]["file"], mmap_mode="r")  # (N, D) fp16/fp32, on disk
    n, dim = embeddings.shape
    show = progress if progress is not None else n >= 100_000
    started = time.perf_counter()

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot build {factory!r}: {str(exc).strip().splitlines()[-1]}") from exc
    _no_polysemous_training(index)
    sample_size = 0
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, train_sample), replace=False))
        sample_size = len(sample)
        log.info("training %s on %d of %d vectors", factory, sample_size, n)
        train = _rows_fp32(embeddings, sample)  # (M, D) fp32
        index.train(train)
        del train
    trained = time.perf_counter()
    with tqdm(total=n, desc=f"adding to {factory}", unit="vec", disable=not show) as bar:
        for start in range(0, n, ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(
                embeddings[start : start + ADD_CHUNK_ROWS], dtype=np.float32
            )  # (C, D)
            index.add(chunk)
            bar.update(len(chunk))
    built = time.perf_counter()

    kind = _index_kind(index)
    if params is None and kind in SEARCH_PARAMS:
        params = SEARCH_PARAMS[kind](index, nprobe, ef_search)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)

    queries = recall_queries(embeddings, num_queries, seed=seed + 1)  # (Q, D)
    _, exact_ids = ExactSearch(embeddings, torch.device("cpu")).topk(torch.from_numpy(queries), k, None)
    t0 = time.perf_counter()
    _, approx_ids = ann_topk(index, embeddings, queries, k, rerank)  # (Q, k)
    query_seconds = time.perf_counter() - t0
    recall = recall_at_k(approx_ids, exact_ids)

    target = folder / ANN_FILE
    tmp = _atomic_path(target)
    faiss.write_index(index, str(tmp))
    os.replace(tmp, target)
    entry = {
        "file": ANN_FILE,
        "factory": factory,
        "kind": kind,
        "params": params,
        "rerank": rerank,
        "metric": "inner_product",
        f"recall@{k}": round(recall, 4),
        "recall_queries": len(queries),
        "recall_noise": 0.1,
        "train_sample": sample_size,
        "train_seconds": round(trained - started, 2),
        "add_seconds": round(built - trained, 2),
        "build_seconds": round(built - started, 2),
        "query_ms_per_query": round(1000 * query_seconds / max(len(queries), 1), 4),
        "bytes": target.stat().st_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "faiss": faiss.__version__,
    }
    _write_manifest(folder, {**manifest, "ann": entry})  # last: the entry proves ann.faiss is complete
    return entry


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m retriever.index build|info|optimize


def _load_retriever(
    model: str, adapter: str | None = None, quantization: str = "none", device: str | None = None
):
    from retriever.models.encoder import load_retriever  # lazy: transformers is heavy and searching does not need it

    return load_retriever(model, adapter=adapter, quantization=quantization, device=device)


def _portable(path: str | None, index_folder: Path) -> str | None:
    """A local path made relative to the index folder (the pair can move together); a hub id unchanged."""
    if path is None:
        return None
    local = Path(path).expanduser()
    if not local.exists():
        return path
    return os.path.relpath(local.resolve(), index_folder.resolve())


def resolve_load_path(path: str | None, index_folder: str | Path) -> str | None:
    """Undo _portable: a recorded relative path is relative to the index folder."""
    if path is None or Path(path).is_absolute():
        return path
    candidate = Path(index_folder) / path
    return str(candidate.resolve()) if candidate.exists() else path


def _cmd_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    tiles = load_tiles(
        args.tiles,
        args.kind,
        tile_size_m=args.tile_size_m,
        stride_m=args.stride_m,
        footprint_m=args.footprint_m,
        out_dir=args.tiles_dir or out / "source_tiles",
        tile_px=args.tile_px,
        progress=False if args.no_progress else None,
    )
    print(f"{len(tiles)} tiles from {args.tiles}", file=sys.stderr)
    load_args = {
        "model": _portable(args.model, out),
        "adapter": _portable(args.adapter, out),
        "quantization": args.quantization,
    }
    options = {
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "dtype": args.dtype,
        "thumbnail_px": args.thumbnail_px,
        "progress": False if args.no_progress else None,
        "load_args": load_args,
    }
    ENGINES[args.engine](args, tiles, out, options)
    print(f"index written to {out} ({len(tiles)} tiles)", file=sys.stderr)
    return 0


def _build_local(args: argparse.Namespace, tiles: gpd.GeoDataFrame, out: Path, options: dict) -> Path:
    retriever = _load_retriever(args.model, args.adapter, args.quantization, args.device)
    return build_index(retriever, tiles, out, **options)


def _build_ray(args: argparse.Namespace, tiles: gpd.GeoDataFrame, out: Path, options: dict) -> Path:
    import functools

    from retriever.index.ray_build import ray_build_index  # lazy: ray is an optional dependency

    factory = functools.partial(_load_retriever, args.model, args.adapter, args.quantization, args.device)
    return ray_build_index(
        factory,
        tiles,
        out,
        num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker,
        ray_address=args.ray_address,
        **options,
    )


# Embedding engines for `build`: in this process, or on Ray actors (local mode or a cluster).
ENGINES: dict[str, Callable[[argparse.Namespace, gpd.GeoDataFrame, Path, dict], Path]] = {
    "local": _build_local,
    "ray": _build_ray,
}


def _cmd_info(args: argparse.Namespace) -> int:
    index = TileIndex.load(args.index, verify=args.verify)
    print(json.dumps({**index.manifest, "ok": True}, indent=2))
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    try:
        entry = _optimize_from_args(args)
    except ValueError as exc:  # e.g. a factory string faiss cannot parse
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(entry, indent=2))
    return 0


def _optimize_from_args(args: argparse.Namespace) -> dict:
    return optimize_index(
        args.index,
        args.faiss,
        train_sample=args.train_sample,
        params=args.params,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        rerank=args.rerank,
        num_queries=args.recall_queries,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": _cmd_build,
    "info": _cmd_info,
    "optimize": _cmd_optimize,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retriever.index", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="cut a tile source and embed it into an index folder (resumable)")
    build.add_argument("--model", required=True, help="base model id or folder")
    build.add_argument("--adapter", help="trained adapter folder (LoRA/DoRA/QLoRA)")
    build.add_argument("--quantization", default="none", help="e.g. none or nf4")
    build.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    build.add_argument(
        "--tiles", required=True, help="GeoTIFF, z/x/y folder, '<lat>,<lon>_*.jpg' folder or sidecar"
    )
    build.add_argument("--kind", choices=sorted(SOURCES), help="source kind (default: detected)")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--tile-size-m", type=float, default=150.0, help="GeoTIFF tile side in metres")
    build.add_argument(
        "--stride-m", type=float, help="GeoTIFF step between tiles in metres (default: tile size)"
    )
    build.add_argument(
        "--footprint-m", type=float, default=150.0, help="footprint side for point-located images"
    )
    build.add_argument("--tile-px", type=int, help="GeoTIFF tile side in pixels (default: native resolution)")
    build.add_argument("--tiles-dir", help="where GeoTIFF tiles are written (default: OUT/source_tiles)")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--shard-size", type=int, default=1024, help="tiles per resumable shard")
    build.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored embedding precision")
    build.add_argument("--thumbnail-px", type=int, default=256, help="thumbnail side; 0 = none")
    build.add_argument("--no-progress", action="store_true")
    build.add_argument("--engine", choices=["local", "ray"], default="local", help="where tiles are embedded")
    build.add_argument("--ray-address", help="Ray cluster address, e.g. auto (default: local mode)")
    build.add_argument("--num-workers", type=int, default=1, help="Ray actors, one retriever replica each")
    build.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor")

    info = sub.add_parser("info", help="check an index folder and print its manifest")
    info.add_argument("index")
    info.add_argument("--verify", action="store_true", help="also check the embeddings' sha256")

    opt = sub.add_parser(
        "optimize", help="train a faiss ANN index next to the embeddings; search then uses it by default"
    )
    opt.add_argument("index", help="index folder written by build")
    opt.add_argument("--faiss", required=True, help='faiss factory string, e.g. "IVF4096,PQ64" or "HNSW32"')
    opt.add_argument("--train-sample", type=int, default=500_000, help="vectors sampled for training")
    knob = opt.add_mutually_exclusive_group()
    knob.add_argument("--nprobe", type=int, help="IVF lists probed per query (default 32)")
    knob.add_argument("--ef-search", type=int, help="HNSW search breadth (default 128)")
    knob.add_argument(
        "--params", help='raw faiss ParameterSpace string, e.g. "nprobe=16,quantizer_efSearch=64"'
    )
    opt.add_argument(
        "--rerank", type=int, default=0, help="re-score k x RERANK candidates exactly (0 = off; 10 for PQ)"
    )
    opt.add_argument("--recall-queries", type=int, default=1000, help="queries for the recall@10 check")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except RetrieverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
