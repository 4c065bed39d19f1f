"""What the confidence reads of one query's hits: evidence counts, BM25 z-scores over the gallery, query length."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from retriever.bm25 import CONTEXT_COLUMNS, ContextMatcher
from retriever.explain.calibration import HitInputs
from retriever.explain.evidence import Evidence
from retriever.vocabulary import STOPWORDS, fold

NAMED_KINDS = ("name", "street", "crossing")
_TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    """Accent-folded words less the vocabulary's stopwords (which drop colours, sizes and other look words)."""
    return [t for t in _TOKEN.findall(fold(text)) if t not in STOPWORDS]


class LexicalScores:
    """BM25 over the gallery's richest context column (retriever.bm25, as hybrid search reads it, with the
    vocabulary's stopwords), z-scored per query as hybrid search fuses its BM25."""

    def __init__(self, tiles: Any) -> None:
        column = next((c for c in CONTEXT_COLUMNS if c in getattr(tiles, "columns", ())), None)
        self._rows = {str(t): i for i, t in enumerate(tiles["tile_id"])} if column else {}
        self._bm25 = ContextMatcher([str(c) for c in tiles[column]], tokenize=tokens) if column else None

    def z(self, query: str, tile_ids: Sequence[str]) -> np.ndarray:
        """(k,) z-score of each tile's BM25 among the gallery's; 0 (the gallery mean) for an unknown tile."""
        if self._bm25 is None:
            return np.zeros(len(tile_ids))
        scores = self._bm25.scores(query)  # (N,)
        spread = scores.std()
        z = (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores)
        return np.array([z[self._rows[t]] if t in self._rows else 0.0 for t in tile_ids])


def query_words(query: str) -> int:
    """Words of the query as BM25 reads them (tokens)."""
    return len(tokens(query))


def hit_inputs(
    query: str,
    scores: np.ndarray,
    evidence: Sequence[Evidence],
    bm25_z: np.ndarray | None = None,
    p_yes: np.ndarray | None = None,
) -> HitInputs:
    """HitInputs of one query's top-k from their similarity scores and evidence (one Evidence per hit)."""

    def named(e: Evidence, status: str | None = None) -> int:
        return sum(
            m.mention.kind in NAMED_KINDS and (status is None or m.status == status) for m in e.matches
        )

    mentions = np.array([len(e.matches) for e in evidence], dtype=np.float64)  # (k,)
    return HitInputs(
        scores=np.asarray(scores, dtype=np.float64),
        share=np.array([e.support_share for e in evidence]),
        name_share=np.array([e.name_share for e in evidence]),
        bm25_z=bm25_z,
        name_hit=np.array([float(named(e, "tile") > 0) for e in evidence]),
        has_name=np.array([float(named(e) > 0) for e in evidence]),
        miss_share=np.array([len(e.misses) for e in evidence]) / np.maximum(mentions, 1.0),
        mentions=mentions,
        query_words=query_words(query),
        p_yes=p_yes,
    )
