"""Hybrid ranking: the MLLM's pixel similarity fused with BM25 over each tile's context text (e.g. OSM names)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from shapely.geometry.base import BaseGeometry

if TYPE_CHECKING:  # tile_index builds ContextMatchers: importing it here at run time would be a cycle
    from retriever.index.hits import Hit
    from retriever.index.tile_index import QueryEncoder, TileIndex

TOKEN = re.compile(r"[a-z0-9]+")
CONTEXT_COLUMN = "features"  # the context column the demo gallery and the app fuse with (OSM names per tile)
BLOCK_ROWS = 65536  # rows of the embedding table scored at a time
# Function words and the scaffolding of a pedestrian's description: they name no place, so they only add noise.
STOPWORDS = frozenset(
    """
a an the and or of to in on at by for with from into onto is are was be it its this that there here
i i'm im me my we you your can see saw looks like just some right left side front back behind ahead
across over opposite near nearby next close far where which what any idea am so okay hi hello help lost
think maybe probably guess perhaps not sure but sign signs reads says read
""".split()
)  # noqa: SIM905


def fold(text: str) -> str:
    """Lower-case and strip accents, so "Töölö" and "toolo" meet."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def tokenize(text: str) -> list[str]:
    """Accent-folded word tokens without stopwords."""
    return [w for w in TOKEN.findall(fold(text)) if w not in STOPWORDS]


class ContextMatcher:
    """BM25 (rank_bm25.BM25Okapi) over one context string per tile."""

    def __init__(self, contexts: Sequence[str]) -> None:
        from rank_bm25 import BM25Okapi

        self.size = len(contexts)
        self._bm25 = BM25Okapi([tokenize(c) or ["_"] for c in contexts])

    def scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every tile for one query."""
        return np.asarray(self._bm25.get_scores(tokenize(query)), dtype=np.float64)


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
    column: str = CONTEXT_COLUMN,
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
