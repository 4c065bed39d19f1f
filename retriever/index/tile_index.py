"""TileIndex: open a checked index folder, search it (exact, faiss or ANN; spatial filters exact) into Hits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
from shapely.geometry.base import BaseGeometry

from retriever._io import pick_device
from retriever.bm25 import CONTEXT_COLUMNS, ContextMatcher
from retriever.errors import CorruptIndexError, IndexMismatchError
from retriever.index.backends import BACKENDS, resolve_backend, stored_options
from retriever.index.hits import Hit, json_safe
from retriever.index.layout import TILES, open_embeddings, read_manifest, stored_fingerprint
from retriever.index.spatial import parse_within, select
from retriever.index.tiles import CORE_COLUMNS, WGS84

log = logging.getLogger(__name__)


class QueryEncoder(Protocol):
    """What text search needs from a retriever."""

    def fingerprint(self) -> dict: ...

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = None
    ) -> torch.Tensor: ...


def fingerprint_differences(recorded: dict, live: dict) -> list[str]:
    """One 'key: index=..., live=...' line per differing key (a key absent on one side counts)."""
    missing = "<absent>"
    live = stored_fingerprint(live)  # compare in the form the manifest stores
    keys = list(recorded) + [key for key in live if key not in recorded]
    return [
        f"{key}: index={recorded.get(key, missing)!r}, live={live.get(key, missing)!r}"
        for key in keys
        if recorded.get(key, missing) != live.get(key, missing)
    ]


def refuse_mismatch(recorded: dict, live: dict, folder: Path) -> None:
    """Raise IndexMismatchError, listing the differing keys, unless the fingerprints agree."""
    differences = fingerprint_differences(recorded, live)
    if differences:
        raise IndexMismatchError(
            f"the index at {folder} was built by a different retriever:\n  "
            + "\n  ".join(differences)
            + "\nLoad the retriever recorded in its manifest, or rebuild the index with this one."
        )


def read_tiles(folder: Path, manifest: dict) -> gpd.GeoDataFrame:
    """The tile table of an index, row for row with its embeddings, in EPSG:4326."""
    path = folder / manifest["tiles"]["file"]
    try:
        tiles = gpd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise CorruptIndexError(f"cannot read {path}: {exc}") from exc
    if len(tiles) != manifest["n"]:
        raise CorruptIndexError(f"{TILES} has {len(tiles)} rows, the manifest says {manifest['n']}")
    return tiles.to_crs(WGS84) if tiles.crs is not None and tiles.crs != WGS84 else tiles


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
        self._matchers: dict[str, ContextMatcher] = {}

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
            refuse_mismatch(manifest["retriever"], retriever.fingerprint(), folder)
        embeddings = open_embeddings(folder, manifest, verify=verify, mmap=mmap)
        tiles = read_tiles(folder, manifest)
        backend = resolve_backend(manifest, backend, exact)
        backend_options = {**stored_options(backend, folder, manifest), **backend_options}
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
        refuse_mismatch(self.fingerprint, retriever.fingerprint(), self.folder)

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

    def context_matcher(self, column: str | None = None) -> ContextMatcher:
        """BM25 over one context column of the tiles (default: the richest of CONTEXT_COLUMNS present), built on
        first use and kept (its statistics never change)."""
        if column is None:
            column = next((c for c in CONTEXT_COLUMNS if c in self.tiles.columns), CONTEXT_COLUMNS[-1])
        if column not in self.tiles.columns:
            raise ValueError(
                f"The index has no context column {column!r}; columns: {', '.join(self.context_columns)}"
            )
        if column not in self._matchers:
            self._matchers[column] = ContextMatcher([str(c) for c in self.tiles[column]])
        return self._matchers[column]

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
