"""The committed demo model on a fixed slice of the human dev set: its figures must not drop."""

from __future__ import annotations

import json

import pytest

from demo import ASSETS
from demo.evaluate_human import READERS, SPLITS, bm25_matrix, read_human, similarity_matrix, slice_figures

QUALITY = ASSETS / "quality_human.json"
HUMAN_SPLITS = ("dev", "test")

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(QUALITY.read_text())["regression_slice"]


def test_the_human_dev_set_is_well_formed() -> None:
    for split in HUMAN_SPLITS:
        data = read_human(SPLITS[split])
        assert len(data.queries) >= (150 if split == "dev" else 50)
        assert 0.3 <= data.has_name.mean() <= 0.5  # both kinds of description, names and no names
        words = [len(q.split()) for q in data.queries]
        assert min(words) >= 6 and max(words) <= 60
    dev, test = (set(read_human(SPLITS[s]).queries) for s in HUMAN_SPLITS)
    assert not dev & test


def test_committed_model_keeps_its_figures_on_the_dev_slice(recorded: dict) -> None:
    data = read_human(SPLITS["dev"])
    similarity, tiles = similarity_matrix(ASSETS / "index", ASSETS / "adapter", data, "none")
    column = "context" if "context" in tiles.columns else "features"
    bm25 = bm25_matrix([str(c) for c in tiles[column]], data.queries)  # (Q, N)
    now = slice_figures(similarity, bm25, data, tiles, recorded["weight"])
    assert now["n"] == recorded["n"]
    for ranking, figures in recorded["rankings"].items():
        for metric, (value, low, high) in figures.items():
            allowed = value - (high - low) / 2  # not worse than the bootstrap half-interval
            assert now["rankings"][ranking][metric][0] >= allowed - 1e-9, (ranking, metric)


def test_generated_split_reads_as_a_human_set_with_the_look_plans_unnamed() -> None:
    data = READERS["generated"](SPLITS["generated"])
    assert len(data.queries) == len(data.kind) >= 500
    unnamed = [q for q, named in zip(data.queries, data.has_name) if not named]
    assert unnamed and all(":look_" in k for k, named in zip(data.kind, data.has_name) if not named)
    assert 0.05 < (~data.has_name).mean() < 0.5
