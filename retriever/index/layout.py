"""The index folder format: file names, the manifest (written last, format_version checked), npy and shard files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from retriever._io import atomic_path, sha256_file, write_text_atomic
from retriever.errors import CorruptIndexError, RetrieverError

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.npy"
TILES = "tiles.parquet"
MANIFEST = "manifest.json"
THUMBNAILS = "thumbnails"
SHARDS = ".shards"
ANN_FILE = "ann.faiss"
SQ8_FILE = "sq8_codes.npy"  # (N, D) uint8, written by `optimize --sq8`
SQ8_PARAMS_FILE = "sq8_params.npy"  # (2, D) fp32: per-dimension offset, scale
FORMAT = "geotext-retriever/tile-index"
FORMAT_VERSION = 1  # bump when a reader of the old format would misread the new one
DTYPES: dict[str, np.dtype] = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}  # stored precision
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


# --- the manifest ----------------------------------------------------------------------------------------


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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CorruptIndexError(f"{path} is not a tile index manifest (format={found!r})")
    check_format_version(manifest, path)
    return manifest


def check_format_version(manifest: dict, path: Path) -> None:
    """Refuse an index written by a newer release (older and equal versions are read as they are)."""
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptIndexError(
            f"{path} has format_version {version!r}, newer than the {FORMAT_VERSION} this release reads; "
            "upgrade geotext-retriever (pip install -U geotext-retriever) or rebuild the index with this one."
        )


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write manifest.json atomically; callers write it last, so its presence proves the rest is complete."""
    return write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))


def stored_fingerprint(fingerprint: dict) -> dict:
    """A retriever fingerprint in the form the manifest stores it (JSON round trip, odd values as str)."""
    return json.loads(json.dumps(fingerprint, default=str))


def portable_path(path: str | None, index_folder: Path) -> str | None:
    """A local path made relative to the index folder (the pair can move together); a hub id unchanged."""
    if path is None:
        return None
    local = Path(path).expanduser()
    if not local.exists():
        return path
    return os.path.relpath(local.resolve(), index_folder.resolve())


def resolve_load_path(path: str | None, index_folder: str | Path) -> str | None:
    """Undo portable_path: a recorded relative path is relative to the index folder."""
    if path is None or Path(path).is_absolute():
        return path
    candidate = Path(index_folder) / path
    return str(candidate.resolve()) if candidate.exists() else path


# --- the embeddings file ---------------------------------------------------------------------------------


def check_embeddings(path: Path, manifest: dict, verify: bool) -> None:
    """Refuse an embeddings file whose header, size or (with verify) sha256 disagrees with the manifest."""
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
    if verify and sha256_file(path) != manifest["embeddings"]["sha256"]:
        raise CorruptIndexError(f"{path} does not match the sha256 in the manifest; rebuild the index")


def check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype, fix: str) -> None:
    """Refuse a .npy file that is missing, unreadable, of another shape or dtype, or truncated; fix names the cure."""
    if not path.is_file():
        raise CorruptIndexError(f"{path} is missing; {fix}")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            stored_shape, fortran, stored = NPY_HEADER_READERS[version](f)
        except (ValueError, KeyError, EOFError) as exc:
            raise CorruptIndexError(f"{path} is not a readable .npy file ({exc}); {fix}") from exc
        offset = f.tell()
    if tuple(stored_shape) != tuple(shape) or np.dtype(stored) != dtype or fortran:
        raise CorruptIndexError(
            f"{path} holds {tuple(stored_shape)} {np.dtype(stored)}, expected {tuple(shape)} {dtype}; {fix}"
        )
    size, want = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
    if size != want:
        raise CorruptIndexError(f"{path} is truncated or padded: {size} bytes, expected {want}; {fix}")


def open_embeddings(folder: Path, manifest: dict, verify: bool = False, mmap: bool = True) -> np.ndarray:
    """The checked embeddings (N, D) fp16/fp32, memory-mapped read-only unless mmap is False."""
    path = folder / manifest["embeddings"]["file"]
    check_embeddings(path, manifest, verify)
    return np.load(path, mmap_mode="r" if mmap else None)


# --- shards: the resumable units of a build --------------------------------------------------------------


def shard_name(i: int) -> str:
    return f"{i:06d}.npz"


def thumbnail_names(n: int, thumbnail_px: int) -> list[str | None]:
    """The thumbnail of row i, relative to the index folder (None for every row without thumbnails)."""
    return [f"{THUMBNAILS}/{row:07d}.jpg" for row in range(n)] if thumbnail_px else [None] * n


def shard_key(fingerprint: dict, dtype: str, thumbnail_px: int) -> str:
    """What a finished shard must have been made with to be reused."""
    return json.dumps(
        {"retriever": fingerprint, "dtype": dtype, "thumbnail_px": thumbnail_px}, sort_keys=True
    )


def shard_done(path: Path, tile_ids: Sequence[str], key: str) -> bool:
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


def save_shard(path: Path, embeddings: np.ndarray, tile_ids: Sequence[str], key: str) -> None:
    """Write one shard atomically: it is either absent or complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=embeddings, tile_ids=np.array(tile_ids, dtype=str), key=np.array(key))


def load_shard(path: Path, tile_ids: Sequence[str], key: str) -> np.ndarray:
    """The embeddings (n_i, D) of a finished shard (read once); a missing or stale one names the fix."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            if str(shard["key"]) == key and shard["tile_ids"].tolist() == list(tile_ids):
                embeddings = shard["embeddings"]
                if embeddings.shape[0] == len(tile_ids):
                    return embeddings
    except (OSError, ValueError, KeyError):
        pass
    raise RetrieverError(
        f"shard {path.name} ({len(tile_ids)} tiles) is missing, unreadable or made by another retriever; "
        "rerun the build to embed it"
    )
