"""Tile encoders that Ray workers can import (a module, not a test closure): they mark and fail on request."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from tests.fakes import FakeRetriever


class MarkingRetriever(FakeRetriever):
    """FakeRetriever that leaves one marker file per encode call (named after its first tile) in marks,
    and raises on any batch holding a tile whose path contains fail_on: cross-process call accounting."""

    def __init__(self, marks: str, fail_on: str | None = None) -> None:
        super().__init__()
        self.marks, self.fail_on = Path(marks), fail_on

    def encode_tiles(
        self, images: Sequence, batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor:
        if self.fail_on and any(self.fail_on in str(p) for p in images):
            raise RuntimeError(f"simulated worker failure on {self.fail_on}")
        (self.marks / f"{Path(str(images[0])).stem}.{uuid.uuid4().hex}").touch()
        return super().encode_tiles(images, batch_size, progress)


def load_fake(**kwargs: object) -> FakeRetriever:
    """Stands in for retriever._cli.load_retriever in CLI tests: importable by Ray workers, unlike a lambda."""
    return FakeRetriever(str(kwargs["model"]))
