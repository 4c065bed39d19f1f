"""Hybrid ranking: BM25 over tile context fused with the retriever's similarity."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box

from retriever.bm25 import ContextMatcher, fold
from retriever.index import TileIndex, build_index
from retriever.index.hybrid import fuse, hybrid_search
from tests.fakes import COLOURS, FakeRetriever, solid_tile


def test_fold_and_bm25_find_accented_names() -> None:
    assert fold("Töölönlahti Café") == "toolonlahti cafe"
    matcher = ContextMatcher(
        ["Kaisaniemen puisto (park)", "Töölönlahti (bay); Café Ekberg (café)", "Stockmann"]
    )
    scores = matcher.scores("cafe ekberg by toolonlahti")
    assert scores.argmax() == 1 and scores[0] == scores[2] == 0


def test_fuse_weights_the_two_signals() -> None:
    similarity, text = np.array([0.9, 0.1, 0.5]), np.array([0.0, 5.0, 1.0])
    assert fuse(similarity, text, 1.0).argmax() == 0
    assert fuse(similarity, text, 0.0).argmax() == 1
    with pytest.raises(ValueError):
        fuse(similarity, text, 1.5)


def test_hybrid_search_uses_the_context_column(tmp_path: Path) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"{colour}.png"
        solid_tile(colour).save(path)
        lon, lat = 24.94 + i * 0.002, 60.17
        rows.append(
            {
                "tile_id": colour,
                "image_path": str(path),
                "lat": lat,
                "lon": lon,
                "features": f"{colour.title()}katu (street)"
                if colour != "red"
                else "Ravintola Punainen (restaurant)",
                "geometry": box(lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001),
            }
        )
    tiles = gpd.GeoDataFrame(rows, crs=4326)
    index = TileIndex.load(
        build_index(FakeRetriever(), tiles, tmp_path / "idx", thumbnail_px=0), FakeRetriever()
    )
    pixels_only = hybrid_search(
        index, FakeRetriever(), "a blue tile near Ravintola Punainen", k=3, weight=1.0
    )
    text_only = hybrid_search(index, FakeRetriever(), "a blue tile near Ravintola Punainen", k=3, weight=0.0)
    assert pixels_only[0].tile_id == "blue" and text_only[0].tile_id == "red"
    assert [h.rank for h in text_only] == [1, 2, 3]
    inside = hybrid_search(
        index,
        FakeRetriever(),
        "Ravintola Punainen",
        k=8,
        weight=0.0,
        within=f"24.9415,60.1690,{24.94 + 3 * 0.002 + 0.0005},60.1710",
    )
    assert {h.tile_id for h in inside} <= set(COLOURS[1:4]) and "red" not in {h.tile_id for h in inside}

    # The BM25 matcher is the index's own: built once per column and kept; an unknown column is a clear error.
    assert index.context_matcher("features") is index.context_matcher()
    with pytest.raises(ValueError, match="no context column 'nope'"):
        hybrid_search(index, FakeRetriever(), "red", k=3, column="nope")
