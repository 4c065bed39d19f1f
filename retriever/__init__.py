"""Text-guided cross-view geo-localization: MLLM retrievers, tile indexes, evaluation, training and explanations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Lazy attributes keep `import retriever` cheap: torch and transformers load only when used.
_LAZY = {
    "load_retriever": "retriever.models.encoder",
    "Retriever": "retriever.models.encoder",
    "RetrievalConfig": "retriever.models.config",
    "TileIndex": "retriever.index",
    "Hit": "retriever.index",
}

if TYPE_CHECKING:
    from retriever.index import Hit, TileIndex
    from retriever.models.config import RetrievalConfig
    from retriever.models.encoder import Retriever, load_retriever


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retriever' has no attribute {name!r}")


__all__ = ["Hit", "RetrievalConfig", "Retriever", "TileIndex", "load_retriever"]
