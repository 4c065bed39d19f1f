"""A toy separable dataset: solid-colour tiles with a shape, captioned with the colour and shape words."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image, ImageDraw

from retriever.train.pairs import Pair

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
TRAIN_TEMPLATES = ("a {colour} tile with a {shape}", "{shape} on {colour}", "I see a {colour} {shape}")


def draw_tile(colour: str, shape: str, side: int = 56) -> Image.Image:
    """A tile painted `colour` with a contrasting `shape` in the middle."""
    image = Image.new("RGB", (side, side), COLOURS[colour])
    ink = (255, 255, 255) if sum(COLOURS[colour]) < 300 else (0, 0, 0)
    draw = ImageDraw.Draw(image)
    a, b = side // 4, 3 * side // 4
    painters = {
        "circle": lambda: draw.ellipse((a, a, b, b), fill=ink),
        "square": lambda: draw.rectangle((a, a, b, b), fill=ink),
        "triangle": lambda: draw.polygon([(side // 2, a), (a, b), (b, b)], fill=ink),
        "cross": lambda: (
            draw.rectangle((a, side // 2 - 4, b, side // 2 + 4), fill=ink),
            draw.rectangle((side // 2 - 4, a, side // 2 + 4, b), fill=ink),
        ),
    }
    painters[shape]()
    return image


def make_toy_pairs(
    folder: str | Path, templates: tuple[str, ...] = TRAIN_TEMPLATES, n_colours: int = 6, n_shapes: int = 4
) -> list[Pair]:
    """Write one tile per (colour, shape) and one caption per tile and template; each tile is its own place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    combos = itertools.product(list(COLOURS)[:n_colours], SHAPES[:n_shapes])
    for i, (colour, shape) in enumerate(combos):
        path = folder / f"{colour}_{shape}.png"
        if not path.exists():
            draw_tile(colour, shape).save(path)
        for template in templates:
            pairs.append(
                Pair(
                    text=template.format(colour=colour, shape=shape),
                    image=str(path),
                    group=f"{colour}-{shape}",
                    lat=60.0 + i * 0.01,
                    lon=25.0,
                )
            )
    return pairs
