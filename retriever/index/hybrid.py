"""Hybrid ranking: the MLLM's pixel similarity fused with BM25 over each tile's context text (e.g. OSM names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from retriever.index.hits import Hit
from retriever.index.tile_index import QueryEncoder, TileIndex

BLOCK_ROWS = 65536  # rows of the embedding table scored at a time


def _standardise(x: np.ndarray) -> np.ndarray:
    spread = x.std()
    return (x - x.mean()) / spread if spread > 0 else np.zeros_like(x)


def fuse(similarity: np.ndarray, text_match: np.ndarray, weight: float) -> np.ndarray:
    """weight * z(similarity) + (1 - weight) * z(text match), over the gallery: (N,), (N,) -> (N,)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    return weight * _standardise(similarity) + (1.0 - weight) * _standardise(text_match)


def hybrid_search(
    index: TileIndex,
    retriever: QueryEncoder,
    text: str,
    k: int,
    weight: float = 0.5,
    column: str | None = None,
    within: str | Path | BaseGeometry | np.ndarray | None = None,
) -> list[Hit]:
    """Rank the whole index by fuse(MLLM similarity, BM25 over `column`); hits keep their MLLM similarity as score."""
    matcher = index.context_matcher(column)  # checks the column first: a clear error before any encoding
    index.check_retriever(retriever)
    query = retriever.encode_queries([text])[0].numpy()  # (D,)
    similarity = np.concatenate(  # (N,), in row blocks: never a float32 copy of a large table
        [
            np.asarray(index.embeddings[s : s + BLOCK_ROWS], dtype=np.float32) @ query
            for s in range(0, len(index), BLOCK_ROWS)
        ]
    )
    fused = fuse(similarity, matcher.scores(text), weight)
    rows = index.rows_within(within)
    if rows is not None:
        keep = np.full(len(fused), -np.inf)
        keep[rows] = fused[rows]
        fused = keep
    order = np.argsort(-fused, kind="stable")[: min(k, len(fused) if rows is None else len(rows))]
    return [index.hit(int(row), rank, float(similarity[row])) for rank, row in enumerate(order, 1)]
