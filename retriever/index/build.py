"""Building an index: plan shards, embed each (resumable), then finalize: merge -> tiles.parquet -> manifest last."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import geopandas as gpd
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from retriever._io import atomic_path, library_versions, sha256_file
from retriever.errors import DataFormatError, ImageDecodeError, RetrieverError
from retriever.index.hits import json_safe
from retriever.index.layout import (
    DTYPES,
    EMBEDDINGS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARDS,
    THUMBNAILS,
    TILES,
    VERSIONED_PACKAGES,
    load_shard,
    save_shard,
    shard_done,
    shard_key,
    shard_name,
    stored_fingerprint,
    thumbnail_names,
    write_manifest,
)
from retriever.index.tiles import CORE_COLUMNS, WGS84

log = logging.getLogger(__name__)


class TileEncoder(Protocol):
    """What building needs from a retriever."""

    def fingerprint(self) -> dict: ...

    def encode_tiles(
        self, images: Sequence[Any], batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Shard:
    """One resumable unit of a build: the tiles of rows lo..hi-1, written to `path` when embedded."""

    path: Path  # .shards/<i:06d>.npz
    lo: int
    hi: int
    tile_ids: list[str]
    images: list[str]
    thumbnails: list[Path]  # where each tile's thumbnail goes; empty without thumbnails


def validate_tiles(tiles: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The tile frame checked (non-empty, core columns, unique ids, a CRS), in EPSG:4326 with a fresh index."""
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


def check_options(dtype: str, shard_size: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")


def prepare_folder(out_dir: str | Path, thumbnail_px: int) -> Path:
    """Create the index folder (absolute) and mark it unfinished: the old manifest goes first."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is an unfinished build
    (out / SHARDS).mkdir(exist_ok=True)
    if thumbnail_px:
        (out / THUMBNAILS).mkdir(exist_ok=True)
    return out


def plan_shards(tiles: gpd.GeoDataFrame, out: Path, shard_size: int, thumbnail_px: int) -> list[Shard]:
    """Cut the (validated) tiles into shards of shard_size rows, in order."""
    n = len(tiles)
    ids = tiles["tile_id"].astype(str).tolist()
    images = tiles["image_path"].astype(str).tolist()
    thumbs = thumbnail_names(n, thumbnail_px)
    shards = []
    for i in range(math.ceil(n / shard_size)):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        targets = [out / t for t in thumbs[lo:hi] if t is not None]
        shards.append(Shard(out / SHARDS / shard_name(i), lo, hi, ids[lo:hi], images[lo:hi], targets))
    return shards


def write_thumbnails(images: Sequence[str], targets: Sequence[Path], px: int) -> None:
    """A JPEG of at most px x px per image, each written atomically."""
    for source, target in zip(images, targets, strict=True):
        try:
            with Image.open(source) as image:
                image.draft("RGB", (px, px))  # JPEG decodes at reduced size directly
                thumb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"cannot read tile image {source}: {exc}") from exc
        thumb.thumbnail((px, px))
        with atomic_path(target) as tmp:
            thumb.save(tmp, format="JPEG", quality=88)


def embed_shard(
    retriever: TileEncoder, shard: Shard, key: str, dtype: str, thumbnail_px: int, batch_size: int = 8
) -> int:
    """Write the shard's thumbnails, embed its tiles and save the shard file; returns its tile count."""
    if thumbnail_px:
        write_thumbnails(shard.images, shard.thumbnails, thumbnail_px)
    vectors = retriever.encode_tiles(shard.images, batch_size=batch_size, progress=False)
    vectors = np.asarray(torch.as_tensor(vectors).float().cpu(), dtype=np.float32)  # (n_i, D)
    if vectors.ndim != 2 or vectors.shape[0] != len(shard.images):
        raise RetrieverError(f"encode_tiles returned {vectors.shape} for {len(shard.images)} tiles")
    save_shard(shard.path, vectors.astype(DTYPES[dtype]), shard.tile_ids, key)
    return len(shard.images)


def _merge_shards(shards: Sequence[Shard], key: str, target: Path, dtype: str) -> int:
    """Concatenate the finished shards into one memory-mappable .npy (N, D), atomically; returns D."""
    first = load_shard(shards[0].path, shards[0].tile_ids, key)  # (n_0, D)
    n, dim = shards[-1].hi, int(first.shape[1])
    with atomic_path(target) as tmp:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=(n, dim))
        for i, shard in enumerate(shards):
            part = first if i == 0 else load_shard(shard.path, shard.tile_ids, key)  # (n_i, D)
            if part.shape[1] != dim:
                raise RetrieverError(f"shard {shard.path} has dimension {part.shape[1]}, not {dim}")
            merged[shard.lo : shard.hi] = part
        merged.flush()
        del merged
    return dim


def finalize(
    tiles: gpd.GeoDataFrame,
    out: Path,
    shards: Sequence[Shard],
    fingerprint: dict,
    *,
    dtype: str = "fp16",
    thumbnail_px: int = 256,
    load_args: dict | None = None,
) -> Path:
    """Merge finished shards into embeddings.npy, then tiles.parquet, then the manifest (last), then drop .shards/.

    A shard that is missing or made with another key is an error that says to rerun the build.
    """
    fingerprint = stored_fingerprint(fingerprint)
    key = shard_key(fingerprint, dtype, thumbnail_px)
    dim = _merge_shards(shards, key, out / EMBEDDINGS, dtype)
    table = tiles.assign(thumbnail=thumbnail_names(len(tiles), thumbnail_px))
    with atomic_path(out / TILES) as tmp:
        table.to_parquet(tmp)
    manifest = _manifest(out, table, fingerprint, dim, dtype, thumbnail_px, load_args)
    write_manifest(out, manifest)  # written last: its presence proves the build finished
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return out


def _manifest(
    out: Path,
    table: gpd.GeoDataFrame,
    fingerprint: dict,
    dim: int,
    dtype: str,
    thumbnail_px: int,
    load_args: dict | None,
) -> dict:
    embeddings = out / EMBEDDINGS
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "retriever": fingerprint,
        "load": json_safe(load_args) if load_args else None,
        "n": len(table),
        "dim": dim,
        "dtype": dtype,
        "embeddings": {
            "file": EMBEDDINGS,
            "bytes": embeddings.stat().st_size,
            "sha256": sha256_file(embeddings),
        },
        "tiles": {
            "file": TILES,
            "columns": [str(c) for c in table.columns],
            "context_columns": [str(c) for c in table.columns if c not in CORE_COLUMNS and c != "thumbnail"],
        },
        "thumbnails": {"folder": THUMBNAILS, "px": thumbnail_px} if thumbnail_px else None,
        "versions": library_versions(VERSIONED_PACKAGES),
    }


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
    check_options(dtype, shard_size)
    tiles = validate_tiles(tiles)
    out = prepare_folder(out_dir, thumbnail_px)
    fingerprint = stored_fingerprint(retriever.fingerprint())
    key = shard_key(fingerprint, dtype, thumbnail_px)
    shards = plan_shards(tiles, out, shard_size, thumbnail_px)
    show = progress if progress is not None else len(tiles) >= 1000
    with tqdm(total=len(tiles), desc="embedding tiles", unit="tile", disable=not show) as bar:
        for shard in shards:
            if not shard_done(shard.path, shard.tile_ids, key):
                embed_shard(retriever, shard, key, dtype, thumbnail_px, batch_size)
            bar.update(shard.hi - shard.lo)
    return finalize(
        tiles, out, shards, fingerprint, dtype=dtype, thumbnail_px=thumbnail_px, load_args=load_args
    )
