"""Shared duck types: what one part of the library needs from another, with no heavy imports behind them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


@runtime_checkable
class QueryEncoder(Protocol):
    """Embeds descriptions: (N,) strings -> (N, D) unit vectors on the CPU."""

    dim: int

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = None
    ) -> torch.Tensor: ...


@runtime_checkable
class TileEncoder(Protocol):
    """Embeds tile images (PIL images or paths): (N,) -> (N, D) unit vectors, and says how it embeds."""

    dim: int

    def encode_tiles(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor: ...

    def fingerprint(self) -> dict[str, Any]: ...


@runtime_checkable
class Encoder(QueryEncoder, TileEncoder, Protocol):
    """Both sides of retrieval: retriever.models.Retriever, or a test fake."""


@runtime_checkable
class HitLike(Protocol):
    """A ranked tile as explanations read it: retriever.index.Hit or a look-alike (`context` is optional)."""

    @property
    def rank(self) -> int: ...

    @property
    def score(self) -> float: ...

    @property
    def image_path(self) -> str: ...


class RerankFn(Protocol):
    """Re-orders one query's candidates: (query index, (k,) gallery indices, (k,) scores) -> (k,) indices."""

    def __call__(self, query_idx: int, candidates: np.ndarray, scores: np.ndarray) -> Sequence[int]: ...
