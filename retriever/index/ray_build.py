"""Distributed tile embedding on Ray Data: one retriever replica per actor embeds missing shards, then build.finalize."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
from tqdm.auto import tqdm

from retriever._io import lazy_import
from retriever.index.build import (
    Shard,
    TileEncoder,
    check_options,
    embed_shard,
    finalize,
    plan_shards,
    prepare_folder,
    validate_tiles,
)
from retriever.index.layout import shard_done, shard_key, stored_fingerprint

log = logging.getLogger(__name__)


def import_ray() -> Any:
    """ray, or MissingDependencyError with the install line."""
    return lazy_import("ray", pip='"ray[data]"', purpose="the ray engine")


class ShardEmbedder:
    """A Ray Data actor: builds one retriever replica, then embeds whole shards (one row = one shard)."""

    def __init__(
        self, factory: Callable[[], TileEncoder], key: str, dtype: str, thumbnail_px: int, batch_size: int
    ) -> None:
        self.retriever = factory()
        self.key, self.dtype, self.thumbnail_px, self.batch_size = key, dtype, thumbnail_px, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [
            embed_shard(self.retriever, shard, self.key, self.dtype, self.thumbnail_px, self.batch_size)
            for shard in _shards_of(batch)
        ]
        return {"shard": batch["shard"], "tiles": np.array(counts)}


def _row_of(shard: Shard) -> dict[str, Any]:
    """A shard as a Ray Data row of plain values."""
    return {
        "shard": str(shard.path),
        "lo": shard.lo,
        "hi": shard.hi,
        "ids": shard.tile_ids,
        "images": shard.images,
        "thumbs": [str(t) for t in shard.thumbnails],
    }


def _shards_of(batch: dict[str, np.ndarray]) -> list[Shard]:
    """The shards of a Ray Data batch (the inverse of _row_of)."""
    columns = (batch[name] for name in ("shard", "lo", "hi", "ids", "images", "thumbs"))
    return [
        Shard(
            path=Path(str(path)),
            lo=int(lo),
            hi=int(hi),
            tile_ids=[str(i) for i in ids],
            images=[str(p) for p in images],
            thumbnails=[Path(str(t)) for t in thumbs],
        )
        for path, lo, hi, ids, images, thumbs in zip(*columns, strict=True)
    ]


def _fingerprint_of(factory: Callable[[], TileEncoder]) -> dict:
    return stored_fingerprint(factory().fingerprint())


def _start_ray(ray: Any, ray_address: str | None) -> None:
    if not ray.is_initialized():  # local mode when address is None; workers see the driver's import path
        env = {"PYTHONPATH": os.pathsep.join([os.getcwd(), *[p for p in sys.path if p]])}
        ray.init(
            address=ray_address, runtime_env={"env_vars": env}, log_to_driver=False, include_dashboard=False
        )


def _embed_on_actors(
    ray: Any, todo: list[Shard], actor_kwargs: dict, resources: dict, num_workers: int, show: bool
) -> None:
    """Embed the shards in todo on num_workers actors; each shard file is written as soon as it is embedded."""
    dataset = ray.data.from_items([_row_of(s) for s in todo], override_num_blocks=len(todo)).map_batches(
        ShardEmbedder,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=1,  # one shard per call
        concurrency=num_workers,
        **resources,
    )
    total = sum(s.hi - s.lo for s in todo)
    with tqdm(total=total, desc="embedding tiles (ray)", unit="tile", disable=not show) as bar:
        for row in dataset.iter_rows():
            bar.update(int(row["tiles"]))


def ray_build_index(
    factory: Callable[[], TileEncoder],
    tiles: gpd.GeoDataFrame,
    out_dir: str | Path,
    *,
    num_workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    ray_address: str | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: str = "fp16",
    thumbnail_px: int = 256,
    progress: bool | None = None,
    load_args: dict | None = None,
) -> Path:
    """build_index with the embedding spread over Ray actors; equal output, same resumable .shards/ layout.

    factory builds the retriever (it is pickled to the workers: a module-level class or a functools.partial
    of one). Missing shards are embedded by num_workers actors (one replica each, gpus_per_worker GPUs) and
    written as they finish; shards already finished are skipped, so an interrupted run redoes only the
    missing ones. build.finalize then merges them and writes tiles.parquet and the manifest.
    """
    ray = import_ray()
    check_options(dtype, shard_size)
    tiles = validate_tiles(tiles)
    out = prepare_folder(out_dir, thumbnail_px)
    _start_ray(ray, ray_address)
    resources = {"num_gpus": gpus_per_worker, "num_cpus": cpus_per_worker}
    fingerprint = ray.get(ray.remote(_fingerprint_of).options(**resources).remote(factory))
    key = shard_key(fingerprint, dtype, thumbnail_px)
    shards = plan_shards(tiles, out, shard_size, thumbnail_px)
    todo = [s for s in shards if not shard_done(s.path, s.tile_ids, key)]
    log.info("%d of %d shards to embed on %d Ray workers", len(todo), len(shards), num_workers)
    if todo:
        actor_kwargs = {
            "factory": factory,
            "key": key,
            "dtype": dtype,
            "thumbnail_px": thumbnail_px,
            "batch_size": batch_size,
        }
        show = progress if progress is not None else len(tiles) >= 1000
        _embed_on_actors(ray, todo, actor_kwargs, resources, num_workers, show)
    return finalize(
        tiles, out, shards, fingerprint, dtype=dtype, thumbnail_px=thumbnail_px, load_args=load_args
    )
