"""Text-guided cross-view geo-localization: MLLM retrievers, tile indexes, evaluation, training and explanations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Lazy attributes keep `import retriever` cheap: torch and transformers load only when used.
_LAZY = {
    "load_retriever": "retriever.encoder",
    "Retriever": "retriever.encoder",
    "RetrievalConfig": "retriever.config",
    "TileIndex": "retriever.index",
    "Hit": "retriever.index",
}

if TYPE_CHECKING:
    from .config import RetrievalConfig
    from .encoder import Retriever, load_retriever
    from .index import Hit, TileIndex


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retriever' has no attribute {name!r}")


__all__ = ["Hit", "RetrievalConfig", "Retriever", "TileIndex", "load_retriever"]
