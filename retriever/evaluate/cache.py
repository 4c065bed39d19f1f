"""Embedding a PairSet, block by block, through an on-disk cache keyed by the retriever and the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever import __version__
from retriever._io import sha256_file, write_atomic, write_text_atomic
from retriever.errors import ImageDecodeError
from retriever.evaluate.data import PairSet
from retriever.protocols import Encoder  # what evaluation needs: a Retriever or a test fake

ENCODE_BLOCK = 256  # items per encode call: the unit of progress, caching and failure isolation


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def relative_path(path: Path, root: Path | None) -> str:
    """`path` relative to `root` when it lies below it (how results and errors name images)."""
    try:
        return str(path.relative_to(root)) if root else str(path)
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Cache entries: <kind>-<key>.npy, then its manifest <kind>-<key>.json, written last
# ---------------------------------------------------------------------------------------------


def cache_keys(retriever: Encoder, pairs: PairSet) -> dict[str, str]:
    """Cache keys of the text and the image embeddings: the retriever fingerprint plus the data.

    Texts are keyed by their content; images by path (relative to the data root, so a moved
    dataset still hits) and by size and mtime, so a fixed or replaced image invalidates them.
    """
    base = {
        "fingerprint": retriever.fingerprint(),
        "annotations": [sha256_file(p) for p in pairs.sources],
    }
    texts = _sha256_bytes("\x1e".join(pairs.texts).encode("utf-8"))
    stats = []
    for p in pairs.images:
        st = p.stat() if p.exists() else None
        stats.append([relative_path(p, pairs.root), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    images = _sha256_bytes(json.dumps(stats).encode("utf-8"))
    keys = {}
    for kind, content in (("texts", texts), ("images", images)):
        keyed = json.dumps({**base, "kind": kind, "content": content}, sort_keys=True)
        keys[kind] = _sha256_bytes(keyed.encode())[:24]
    return keys


def _cache_load(cache_dir: Path, kind: str, key: str, n: int) -> tuple[np.ndarray, dict] | None:
    manifest_path = cache_dir / f"{kind}-{key}.json"
    array_path = cache_dir / f"{kind}-{key}.npy"
    if not manifest_path.is_file() or not array_path.is_file():
        return None  # the manifest is written last: without it the entry is incomplete
    manifest = json.loads(manifest_path.read_text())
    array = np.load(array_path, mmap_mode="r")
    if array.shape[0] != n or manifest.get("rows") != n:
        return None
    return array, manifest


def _cache_store(cache_dir: Path, kind: str, key: str, array: np.ndarray, manifest: dict) -> None:
    write_atomic(cache_dir / f"{kind}-{key}.npy", lambda f: np.save(f, array))
    text = json.dumps({**manifest, "rows": int(array.shape[0]), "dim": int(array.shape[1])}, indent=1)
    write_text_atomic(cache_dir / f"{kind}-{key}.json", text)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _encode_texts(retriever: Encoder, texts: list[str], batch_size: int, progress: bool | None) -> np.ndarray:
    blocks = range(0, len(texts), ENCODE_BLOCK)
    out = [
        retriever.encode_queries(texts[s : s + ENCODE_BLOCK], batch_size=batch_size, progress=False)
        for s in tqdm(
            blocks, desc="Encoding texts", unit="block", disable=progress is False or len(blocks) < 2
        )
    ]
    return torch.cat(out).float().numpy()  # (T, D)


def _encode_one_by_one(
    retriever: Encoder, block: list[Path], start: int, failed: list[tuple[int, str]]
) -> list[np.ndarray | None]:
    """Isolate the bad files of a failing block: (1, D) per good image, None per bad one (recorded in failed)."""
    parts: list[np.ndarray | None] = []
    for offset, path in enumerate(block):
        try:
            parts.append(retriever.encode_tiles([path], batch_size=1, progress=False).float().numpy())
        except (ImageDecodeError, OSError, ValueError) as err:
            failed.append((start + offset, f"{type(err).__name__}: {err}"))
            parts.append(None)
    return parts


def _encode_images(
    retriever: Encoder, images: list[Path], batch_size: int, progress: bool | None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Embed all images; an unreadable one is recorded as (index, reason) and left as a NaN row, not raised."""
    blocks = range(0, len(images), ENCODE_BLOCK)
    parts: list[np.ndarray | None] = []  # (b, D) per block, or (1, D) / None per image of a failing block
    failed: list[tuple[int, str]] = []
    for start in tqdm(
        blocks, desc="Encoding images", unit="block", disable=progress is False or len(blocks) < 2
    ):
        block = images[start : start + ENCODE_BLOCK]
        try:
            parts.append(retriever.encode_tiles(block, batch_size=batch_size, progress=False).float().numpy())
        except (ImageDecodeError, OSError, ValueError):
            parts.extend(_encode_one_by_one(retriever, block, start, failed))
    dim = next((p.shape[1] for p in parts if p is not None), 0)
    rows = [p if p is not None else np.full((1, dim), np.nan, dtype=np.float32) for p in parts]
    return (np.concatenate(rows) if rows else np.empty((0, dim), dtype=np.float32)), failed


def embed_pairs(
    retriever: Encoder,
    pairs: PairSet,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]], dict[str, str]]:
    """Text (T, D) and image (I, D) embeddings, from the cache when it holds them.

    Returns the embeddings, the unreadable images as (index, reason) (their rows are NaN), and
    whether each modality was a cache "hit" or "miss".
    """
    keys = cache_keys(retriever, pairs) if cache_dir else {}
    cache = Path(cache_dir) if cache_dir else None
    status: dict[str, str] = {}
    manifest_base = {"fingerprint": retriever.fingerprint(), "dataset": pairs.name, "version": __version__}

    hit = _cache_load(cache, "texts", keys["texts"], len(pairs.texts)) if cache else None
    if hit is not None:
        texts, status["texts"] = hit[0], "hit"
    else:
        texts, status["texts"] = _encode_texts(retriever, pairs.texts, batch_size, progress), "miss"
        if cache:
            _cache_store(cache, "texts", keys["texts"], texts, manifest_base)

    hit = _cache_load(cache, "images", keys["images"], len(pairs.images)) if cache else None
    if hit is not None:
        images, status["images"] = hit[0], "hit"
        failed = [(int(i), str(reason)) for i, reason in hit[1].get("failed", [])]
    else:
        images, failed = _encode_images(retriever, pairs.images, batch_size, progress)
        status["images"] = "miss"
        if cache:
            _cache_store(cache, "images", keys["images"], images, {**manifest_base, "failed": failed})
    return texts, images, failed, status


__all__ = ["ENCODE_BLOCK", "Encoder", "cache_keys", "embed_pairs", "relative_path"]
