"""Deterministic stand-ins for a retriever, so the right answer of a search is known in advance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Eight palette colours: a text names them, a tile is painted in one of them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
COLOURS = list(PALETTE)


class FakeRetriever:
    """Texts one-hot encode the colour words they contain; tiles one-hot encode their nearest palette colour."""

    dim = len(PALETTE)

    def __init__(self, name: str = "fake") -> None:
        self.name = name

    def fingerprint(self) -> dict:
        return {
            "family": "fake",
            "model": self.name,
            "revision": None,
            "adapter_hash": None,
            "query_prompt": "{text}",
            "tile_prompt": "{image}",
            "pooling": "onehot",
            "pool_layer": -1,
            "dtype": "float32",
            "quantization": "none",
            "dim": self.dim,
        }

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = None
    ) -> torch.Tensor:
        out = torch.full((len(texts), self.dim), 1e-3)  # (N, D)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                if word.strip(".,") in PALETTE:
                    out[row, COLOURS.index(word.strip(".,"))] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)

    def encode_tiles(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor:
        palette = np.array(list(PALETTE.values()), dtype=np.float32)  # (8, 3)
        out = torch.full((len(images), self.dim), 1e-3)
        for row, image in enumerate(images):
            if not isinstance(image, Image.Image):
                image = Image.open(image)
            mean_rgb = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
            out[row, int(np.argmin(((palette - mean_rgb) ** 2).sum(1)))] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


def solid_tile(colour: str, size: int = 32) -> Image.Image:
    """A tile painted in one palette colour."""
    return Image.new("RGB", (size, size), PALETTE[colour])
