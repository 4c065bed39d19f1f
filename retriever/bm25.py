"""BM25 over one context string per tile (its OSM names and kind words): hybrid search and the confidence share it."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np

TOKEN = re.compile(r"[a-z0-9]+")
# The context columns hybrid search reads, richest first: "context" (names plus the words people use for each
# feature's kind) and "features" (names and kinds only), as the demo gallery writes them.
CONTEXT_COLUMNS = ("context", "features")
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
    """BM25 (rank_bm25.BM25Okapi) over one context string per tile; words by `tokenize`."""

    def __init__(self, contexts: Sequence[str], tokenize: Callable[[str], list[str]] = tokenize) -> None:
        from rank_bm25 import BM25Okapi

        self.size = len(contexts)
        self.tokenize = tokenize
        self._bm25 = BM25Okapi([tokenize(c) or ["_"] for c in contexts])

    def scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every tile for one query."""
        return np.asarray(self._bm25.get_scores(self.tokenize(query)), dtype=np.float64)
