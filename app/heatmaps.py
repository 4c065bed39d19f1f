"""The relevance heatmap as the page shows it: which cells of the tile made it match, a legend and a caption."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRID = 4  # cells per side: the demo model reads a tile as a 4 x 4 grid of image tokens
SCALE = 2.0  # the legend's top: a drop this many times the others' typical drop beyond theirs
BLANK_RGB = (242, 239, 233)  # the demo style's land colour: what a painted-over cell shows
SIDE = 256  # px of the tile in the picture
LEGEND_PX = 36
CAPTION = (
    f"Red cells matter more for your description than for other descriptions: each of the {GRID}×{GRID} "
    "cells is painted over in turn, and the drop in similarity beyond what other descriptions lose there "
    f"is shown in units of their typical drop at that cell (up to {SCALE:g}×)."
)

# Why the comparison: the model reads the image tokens row by row and its embedding leans on the first
# rows for any description. On the demo, painting over a top-row cell costs 2.6x the similarity a
# bottom-row cell does, for every description; the gradient x input map has the same tilt. The plain drop
# put the hot spot in the top row in 16 of 32 query/tile pairs (8 by chance). Dividing each cell's extra
# drop by the others' typical drop at that same cell cancels the position weight: 4 of 32, and the mean
# magnitude is flat across rows (16 human dev descriptions x their top 2 tiles).


def occluded(image: Image.Image, grid: int = GRID) -> list[Image.Image]:
    """The tile, then one copy per cell (row by row) with that cell painted blank."""
    width, height = image.size
    out = [image]
    for i in range(grid):
        for j in range(grid):
            copy = image.copy()
            copy.paste(
                BLANK_RGB,
                (j * width // grid, i * height // grid, (j + 1) * width // grid, (i + 1) * height // grid),
            )
            out.append(copy)
    return out


def contrast_grid(effects: np.ndarray, grid: int = GRID) -> np.ndarray:
    """effects (cells, 1 + R): the similarity drop per cell for the query (column 0) and R other descriptions.

    Returns (grid, grid): the query's drop beyond the others' mean drop, in units of the others' typical
    (mean absolute) drop at that cell; a position weight the model gives a cell for any description cancels.
    A tile whose cells change nothing (a blank one) gives zeros.
    """
    effects = np.asarray(effects, dtype=np.float64)
    query, others = effects[:, 0], effects[:, 1:]
    scale = max(float(np.abs(effects).max()), 1e-12)
    typical = np.abs(others).mean(axis=1) + 0.01 * scale  # a small floor: no division by nothing
    return ((query - others.mean(axis=1)) / typical).reshape(grid, grid)


def relevance(
    encode_tiles: Callable[[Sequence[Image.Image]], Any],
    query_embeddings: Any,
    image_path: str,
    grid: int = GRID,
) -> np.ndarray:
    """(grid, grid) contrast for the first of query_embeddings (Q, D) against the rest, by occlusion."""
    with Image.open(image_path) as image:
        variants = occluded(image.convert("RGB"), grid)
    tiles = np.asarray(encode_tiles(variants), dtype=np.float64)  # (1 + cells, D)
    queries = np.asarray(query_embeddings, dtype=np.float64)  # (1 + R, D)
    similarity = tiles @ queries.T  # (1 + cells, 1 + R)
    return contrast_grid(similarity[0][None, :] - similarity[1:], grid)


def _colour(value: float) -> tuple[int, int, int, int]:
    """0 -> transparent, 1 -> opaque red; yellow in between."""
    v = float(np.clip(value, 0.0, 1.0))
    return (255, int(230 * (1 - v)), 0, int(round(200 * v)))


def picture(image_path: str, grid: np.ndarray, side: int = SIDE) -> Image.Image:
    """The tile with one flat cell per grid entry (no smoothing: the cells are what was measured),
    and a legend from "as for other descriptions" to SCALE times their typical drop."""
    scaled = np.clip(np.asarray(grid, dtype=np.float64) / SCALE, 0.0, 1.0)
    try:
        with Image.open(image_path) as image:
            tile = image.convert("RGBA").resize((side, side))
    except (OSError, ValueError):
        tile = Image.new("RGBA", (side, side), (*BLANK_RGB, 255))
    gh, gw = scaled.shape
    overlay = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for i in range(gh):
        for j in range(gw):
            box = (j * side // gw, i * side // gh, (j + 1) * side // gw - 1, (i + 1) * side // gh - 1)
            draw.rectangle(box, fill=_colour(scaled[i, j]), outline=(255, 255, 255, 110))
    out = Image.new("RGBA", (side, side + LEGEND_PX), (255, 255, 255, 255))
    out.paste(Image.alpha_composite(tile, overlay), (0, 0))
    legend = ImageDraw.Draw(out)
    top, left, right = side + 4, 8, side - 8
    for x in range(left, right):
        r, g, b, a = _colour((x - left) / max(1, right - left - 1))
        alpha = a / 255
        legend.line(
            [(x, top), (x, top + 9)], fill=tuple(int(round(c * alpha + 255 * (1 - alpha))) for c in (r, g, b))
        )
    legend.rectangle((left, top, right, top + 9), outline=(120, 120, 120))
    font = ImageFont.load_default()
    legend.text((left, top + 13), "as for others", fill=(40, 40, 40), font=font)
    label = f"{SCALE:g}x more than others"
    legend.text((right - legend.textlength(label, font=font), top + 13), label, fill=(40, 40, 40), font=font)
    return out.convert("RGB")
