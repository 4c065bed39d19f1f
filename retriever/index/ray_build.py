"""Distributed tile embedding on Ray Data: one retriever replica per actor, shards merged by build_index."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import torch
from tqdm.auto import tqdm

from retriever.errors import MissingDependencyError, RetrieverError
from retriever.index import (
    DTYPES,
    SHARDS,
    THUMBNAILS,
    TileEncoder,
    _save_shard,
    _shard_done,
    _shard_key,
    _validated,
    _write_thumbnails,
    build_index,
)

log = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError('the ray engine needs Ray Data: pip install "ray[data]"') from exc
    return ray


class ShardEmbedder:
    """A Ray Data actor: builds one retriever replica, then embeds whole shards (one row = one shard)."""

    def __init__(
        self,
        factory: Callable[[], TileEncoder],
        out: str,
        key: str,
        dtype: str,
        thumbnail_px: int,
        batch_size: int,
    ) -> None:
        self.retriever = factory()
        self.out, self.key, self.dtype = Path(out), key, dtype
        self.thumbnail_px, self.batch_size = thumbnail_px, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for shard, images, ids, thumbs in zip(
            batch["shard"], batch["images"], batch["ids"], batch["thumbs"], strict=True
        ):
            images, ids = [str(p) for p in images], [str(i) for i in ids]
            if self.thumbnail_px:
                _write_thumbnails(images, [self.out / str(t) for t in thumbs], self.thumbnail_px)
            vectors = self.retriever.encode_tiles(images, batch_size=self.batch_size, progress=False)
            vectors = np.asarray(torch.as_tensor(vectors).float().cpu(), dtype=np.float32)  # (n_i, D)
            if vectors.ndim != 2 or vectors.shape[0] != len(images):
                raise RetrieverError(f"encode_tiles returned {vectors.shape} for {len(images)} tiles")
            _save_shard(self.out / SHARDS / str(shard), vectors.astype(DTYPES[self.dtype]), ids, self.key)
        return {"shard": batch["shard"], "tiles": np.array([len(i) for i in batch["ids"]])}


class _ShardsOnly:
    """Stands in for the retriever when build_index merges shards that Ray already wrote."""

    def __init__(self, fingerprint: dict) -> None:
        self._fingerprint = fingerprint

    def fingerprint(self) -> dict:
        return self._fingerprint

    def encode_tiles(
        self, images: Sequence[Any], batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor:
        raise RetrieverError(f"a shard of {len(images)} tiles is missing after the Ray run; rerun the build")


def _fingerprint_of(factory: Callable[[], TileEncoder]) -> dict:
    return json.loads(json.dumps(factory().fingerprint(), default=str))


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
    missing ones. The ordinary build_index then merges them and writes tiles.parquet and the manifest.
    """
    ray = _import_ray()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tiles = _validated(tiles)
    out = Path(out_dir).expanduser().resolve()
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    if thumbnail_px:
        (out / THUMBNAILS).mkdir(exist_ok=True)
    if not ray.is_initialized():  # local mode when address is None; workers see the driver's import path
        env = {"PYTHONPATH": os.pathsep.join([os.getcwd(), *[p for p in sys.path if p]])}
        ray.init(
            address=ray_address, runtime_env={"env_vars": env}, log_to_driver=False, include_dashboard=False
        )

    fingerprint = ray.get(
        ray.remote(_fingerprint_of)
        .options(num_gpus=gpus_per_worker, num_cpus=cpus_per_worker)
        .remote(factory)
    )
    key = _shard_key(fingerprint, dtype, thumbnail_px)
    n = len(tiles)
    ids = tiles["tile_id"].astype(str).tolist()
    images = tiles["image_path"].astype(str).tolist()
    thumbs = [f"{THUMBNAILS}/{row:07d}.jpg" if thumbnail_px else "" for row in range(n)]
    todo = []
    for i in range(math.ceil(n / shard_size)):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        name = f"{i:06d}.npz"
        if not _shard_done(out / SHARDS / name, ids[lo:hi], key):
            todo.append({"shard": name, "images": images[lo:hi], "ids": ids[lo:hi], "thumbs": thumbs[lo:hi]})
    log.info("%d of %d shards to embed on %d Ray workers", len(todo), math.ceil(n / shard_size), num_workers)

    if todo:
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            ShardEmbedder,
            fn_constructor_kwargs={
                "factory": factory,
                "out": str(out),
                "key": key,
                "dtype": dtype,
                "thumbnail_px": thumbnail_px,
                "batch_size": batch_size,
            },
            batch_size=1,  # one shard per call: a shard file is written as soon as it is embedded
            concurrency=num_workers,
            num_gpus=gpus_per_worker,
            num_cpus=cpus_per_worker,
        )
        show = progress if progress is not None else n >= 1000
        with tqdm(
            total=sum(len(t["ids"]) for t in todo),
            desc="embedding tiles (ray)",
            unit="tile",
            disable=not show,
        ) as bar:
            for row in dataset.iter_rows():
                bar.update(int(row["tiles"]))
    return build_index(
        _ShardsOnly(fingerprint),
        tiles,
        out,
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=dtype,
        thumbnail_px=thumbnail_px,
        progress=False,
        load_args=load_args,
    )
