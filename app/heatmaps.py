"""The relevance heatmap as the page shows it: which cells of the tile made it match, a legend and a caption."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retriever.explain.heatmap import BLANK_RGB, GRID, contrast_grid, occluded  # noqa: F401 (re-exported)
from retriever.explain.heatmap import occlusion_relevance as relevance  # noqa: F401 (re-exported)

SCALE = 2.0  # the legend's top: a drop this many times the others' typical drop beyond theirs
SIDE = 256  # px of the tile in the picture
LEGEND_PX = 36
CAPTION = (
    f"Red cells matter more for your description than for other descriptions: each of the {GRID}×{GRID} "
    "cells is painted over in turn, and the drop in similarity beyond what other descriptions lose there "
    f"is shown in units of their typical drop at that cell (up to {SCALE:g}×)."
)


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
