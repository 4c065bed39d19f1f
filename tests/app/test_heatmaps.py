"""The heatmap: occlusion compared with other descriptions removes the model's position effect; legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import callbacks, heatmaps

CELL = 16  # px per cell of the 4 x 4 test tile
# The model stand-in reads the top row five times as strongly as the rest, whatever the query: the
# position effect the real model has (its embedding leans on the first image tokens).
ROW_WEIGHT = np.array([5.0, 1.0, 1.0, 1.0])
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "grey": (128, 128, 128)}


def embed(image: Image.Image) -> np.ndarray:
    """(4,): how much of each colour the tile shows (blank counts for nothing), cells weighted by row."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    out = np.zeros(len(COLOURS))
    for i in range(4):
        for j in range(4):
            cell = pixels[i * CELL : (i + 1) * CELL, j * CELL : (j + 1) * CELL].reshape(-1, 3).mean(0)
            for c, rgb in enumerate(COLOURS.values()):
                if np.abs(cell - rgb).max() < 20:
                    out[c] += ROW_WEIGHT[i]
    return out


def encode_tiles(images: list[Image.Image]) -> np.ndarray:
    return np.stack([embed(im) for im in images])


def query(colour_weights: dict[str, float]) -> np.ndarray:
    return np.array([colour_weights.get(c, 0.0) for c in COLOURS])


@pytest.fixture
def tile(tmp_path: Path) -> Path:
    """Grey everywhere, with one red cell in the bottom row (row 3, column 2)."""
    image = Image.new("RGB", (4 * CELL, 4 * CELL), COLOURS["grey"])
    image.paste(COLOURS["red"], (2 * CELL, 3 * CELL, 3 * CELL, 4 * CELL))
    path = tmp_path / "tile.png"
    image.save(path)
    return path


def test_raw_occlusion_puts_the_hot_spot_in_the_top_row_and_the_contrast_does_not(tile: Path) -> None:
    # "a red roof" cares about red, and a little about grey; the others are other scenes
    queries = np.stack(
        [
            query({"red": 1.0, "grey": 0.3}),
            query({"grey": 1.0}),
            query({"grey": 0.8, "blue": 1}),
            query({"green": 1, "grey": 0.6}),
        ]
    )
    with Image.open(tile) as image:
        variants = heatmaps.occluded(image.convert("RGB"))
    similarity = encode_tiles(variants) @ queries.T
    raw = (similarity[0, 0] - similarity[1:, 0]).reshape(4, 4)
    assert np.unravel_index(raw.argmax(), raw.shape)[0] == 0  # the position effect: a grey top-row cell
    grid = heatmaps.relevance(encode_tiles, queries, str(tile))
    assert np.unravel_index(grid.argmax(), grid.shape) == (3, 2)  # the red cell the query is about
    assert grid[0].max() < grid[3, 2] / 2


def test_a_blank_tile_shows_no_relevance_anywhere(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (4 * CELL, 4 * CELL), heatmaps.BLANK_RGB).save(blank)
    queries = np.stack([query({"red": 1.0}), query({"grey": 1.0}), query({"blue": 1.0})])
    grid = heatmaps.relevance(encode_tiles, queries, str(blank))
    assert np.allclose(grid, 0.0)
    picture = np.asarray(heatmaps.picture(str(blank), grid))[: heatmaps.SIDE]
    assert (picture[..., 0].astype(int) - picture[..., 2].astype(int)).max() < 30  # no red or yellow cell


def test_the_picture_has_flat_cells_and_a_legend(tile: Path) -> None:
    grid = np.zeros((4, 4))
    grid[1, 2] = heatmaps.SCALE  # the legend's top
    image = heatmaps.picture(str(tile), grid)
    assert image.size == (heatmaps.SIDE, heatmaps.SIDE + heatmaps.LEGEND_PX)
    pixels = np.asarray(image).astype(int)
    cell = heatmaps.SIDE // 4
    inside = pixels[cell + 4 : 2 * cell - 4, 2 * cell + 4 : 3 * cell - 4]
    assert inside.std(axis=(0, 1)).max() < 3  # one flat colour per cell: no smoothing into a blob
    assert inside[..., 0].mean() > 200 and inside[..., 2].mean() < 80  # the hottest cell is red
    legend = pixels[heatmaps.SIDE + 6, 10 : heatmaps.SIDE - 10]
    assert legend[0, 2] > 200 and legend[-1, 2] < 100  # white-ish to red, left to right
    assert "other descriptions" in heatmaps.CAPTION and len(heatmaps.CAPTION.split(". ")) == 1


def test_the_engine_heatmap_compares_with_other_descriptions_and_clears_on_search(tmp_path: Path) -> None:
    from tests.app.test_app import make_fake_backend

    retriever, index = make_fake_backend(tmp_path)
    engine = callbacks.make_engine(retriever, index, references=["a green park", "a blue lake", "a red roof"])
    view = callbacks.search("a red roof", 3, "", engine)
    assert view.heatmap is callbacks.CLEAR  # a new search empties the previous tile's heatmap
    from app.ui import _out

    assert _out(view.heatmap) is None and _out(None) is not None  # None skips, CLEAR empties
    picture = callbacks.relevance_heatmap(view.state, 0, engine)
    assert isinstance(picture, Image.Image) and picture.size[1] == heatmaps.SIDE + heatmaps.LEGEND_PX
    assert callbacks.make_engine(retriever, index, references=["only one"]).heatmap is None
