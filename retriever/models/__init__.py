"""An MLLM as an embedding model: families, poolers, adapters, loading (torch loads on first use)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module: lazy, so `import retriever.models.config` or `.demo_base` stays free of torch.
_LAZY = {
    "load_retriever": "retriever.models.encoder",
    "Retriever": "retriever.models.encoder",
    "RetrievalConfig": "retriever.models.config",
    "FAMILIES": "retriever.models.backbones",
    "Family": "retriever.models.backbones",
}

if TYPE_CHECKING:
    from retriever.models.backbones import FAMILIES, Family
    from retriever.models.config import RetrievalConfig
    from retriever.models.encoder import Retriever, load_retriever


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retriever.models' has no attribute {name!r}")


__all__ = ["FAMILIES", "Family", "RetrievalConfig", "Retriever", "load_retriever"]
