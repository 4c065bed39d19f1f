"""Calibration format version 2: named hit features, the fit, the file format, the no-mention cap, the app's file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from demo.calibrate_explain import FEATURE_SETS, _Designs, _select
from retriever.errors import DataFormatError
from retriever.explain.calibration import (
    CALIBRATION_VERSION,
    HIT_FEATURES,
    NO_MENTION_CAP,
    Calibration,
    HitInputs,
    fit_standardised,
    hit_features,
    logit,
    sigmoid,
    similarity_probs,
)
from retriever.explain.evidence import EvidenceFinder
from retriever.explain.signals import LexicalScores, hit_inputs, query_words
from retriever.models.config import CALIBRATION_FILE

DEMO_CALIBRATION = Path(__file__).resolve().parents[2] / "assets" / "demo" / "adapter" / CALIBRATION_FILE
V2 = Calibration(
    version=2,
    temperature=0.1,
    features=("sim", "sim_margin", "bm25_z", "support_margin", "name_share", "query_words"),
    coef=(0.4, -0.1, 0.6, 3.0, 1.5, -0.8),
    bias=-0.5,
    rerank_weight=0.5,
    report={"n_queries": 3},
)
EMPTY = ["<img src=x onerror=alert(1)>", "🙂🙂", "", "asdf"]  # nothing the map data can check


@dataclass
class Hit:
    tile_id: str
    score: float = 0.5
    context: dict = field(default_factory=dict)
    rank: int = 0


@pytest.fixture(scope="module")
def tiles():
    import geopandas as gpd

    return gpd.GeoDataFrame(
        {
            "tile_id": ["a", "b", "c"],
            "context": [
                "Stockmann (department store; department store, shop); Aleksanterinkatu (street)",
                "Lilla Teatern (theatre; theatre, stage)",
                "Kauppatori / Salutorget (marketplace; market, square)",
            ],
            "categories": [["rail:tram"], ["buildings:building"], ["water:sea", "squares:square"]],
        },
        geometry=[box(24.94 + 0.01 * i, 60.16, 24.942 + 0.01 * i, 60.161) for i in range(3)],
        crs="EPSG:4326",
    )


@pytest.fixture(scope="module")
def finder(tiles) -> EvidenceFinder:
    return EvidenceFinder(tiles)


def inputs_for(query: str, finder: EvidenceFinder, tiles, scores=(0.9, 0.5, 0.3)) -> HitInputs:
    ids = ["a", "b", "c"]
    evidence = [finder.evidence(query, Hit(t)) for t in ids]
    return hit_inputs(query, np.array(scores), evidence, LexicalScores(tiles).z(query, ids))


# -- features -------------------------------------------------------------------------------------------------
def test_hit_features_by_hand() -> None:
    hits = HitInputs(
        scores=np.array([0.5, 0.4, 0.2]),
        share=np.array([1.0, 0.5, 0.0]),
        bm25_z=np.array([2.0, 3.0, -1.0]),
        query_words=4,
    )
    x = hit_features(
        hits, ("sim", "sim_margin", "bm25_margin", "support_margin", "query_words", "p_yes"), 0.1
    )
    np.testing.assert_allclose(x[:, 0], logit(similarity_probs(hits.scores, 0.1)))
    np.testing.assert_allclose(x[:, 1], [1.0, -1.0, -3.0])  # (s - best other) / T
    np.testing.assert_allclose(x[:, 2], [-1.0, 1.0, -4.0])
    np.testing.assert_allclose(x[:, 3], [0.5, -0.5, -1.0])
    np.testing.assert_allclose(x[:, 4], np.log1p(4))
    np.testing.assert_allclose(x[:, 5], 0.0)  # no P(yes) given: counts as 0
    assert hit_features(hits, (), 0.1).shape == (3, 0)


def test_evidence_and_bm25_inputs_separate_a_supported_tile(finder, tiles) -> None:
    h = inputs_for("Stockmann on Aleksanterinkatu", finder, tiles)
    assert h.share.tolist() == [1.0, 0.0, 0.0] and h.name_hit.tolist() == [1.0, 0.0, 0.0]
    assert h.has_name.tolist() == [1.0, 1.0, 1.0] and h.miss_share[2] == 1.0
    assert (
        h.bm25_z[0] > 0 > h.bm25_z[1] and h.query_words == query_words("Stockmann on Aleksanterinkatu") == 3
    )
    assert LexicalScores(tiles).z("Stockmann", ["zz"]).tolist() == [0.0]  # a tile not in the gallery
    conf = V2.confidence_of(h)
    assert conf[0] > 0.5 > conf[1] and conf[0] == conf.max()


# -- the no-mention cap -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", EMPTY)
def test_a_query_with_nothing_in_it_gets_low_confidence(query: str, finder, tiles) -> None:
    peaky = Calibration(version=2, features=("sim_margin", "query_words"), coef=(5.0, -2.0), bias=3.0)
    h = inputs_for(query, finder, tiles, scores=(0.99, 0.1, 0.05))
    assert not np.any(h.mentions)
    for cal in (peaky, V2, Calibration.load(DEMO_CALIBRATION)):
        assert cal.confidence_of(h).max() <= NO_MENTION_CAP
    assert peaky.confidence_of(inputs_for("Stockmann", finder, tiles, scores=(0.99, 0.1, 0.05)))[0] > 0.9


def test_the_demo_calibration_gives_an_empty_query_less_than_a_named_one(finder, tiles) -> None:
    cal = Calibration.load(DEMO_CALIBRATION)
    named = cal.confidence_of(inputs_for("Stockmann department store on Aleksanterinkatu", finder, tiles))[0]
    empty = cal.confidence_of(inputs_for("🙂🙂", finder, tiles))[0]
    assert empty <= NO_MENTION_CAP < named


# -- the fit ----------------------------------------------------------------------------------------------------
def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([0.0, 5.0, 1.0])  # mixed units
    true = np.array([1.0, 0.2, -8.0])
    y = rng.random(n) < sigmoid(x @ true + 0.5)
    return x, y.astype(float), true


def test_fit_standardised_recovers_raw_unit_weights_and_is_deterministic() -> None:
    x, y, true = synthetic(40000, 0)
    coef, bias, standardised = fit_standardised(x, y, l2=1e-9)
    np.testing.assert_allclose(coef, true, rtol=0.1)  # the maximum-likelihood fit, back in raw units
    np.testing.assert_allclose(
        sigmoid(x @ coef + bias).mean(), y.mean(), atol=1e-3
    )  # the bias is unpenalised
    np.testing.assert_allclose(standardised, coef * x.std(axis=0))
    again = fit_standardised(x, y, l2=1e-9)
    assert np.array_equal(again[0], coef) and again[1] == bias
    shrunk, _, _ = fit_standardised(x, y, l2=1.0)
    assert np.all(np.abs(shrunk * x.std(axis=0)) < np.abs(standardised))  # the penalty is on z-scored units


def test_nested_selection_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    inputs, label = [], []
    for _ in range(60):
        good = rng.random() < 0.5
        share = rng.random(5) * 0.4
        share[0] += 0.6 * good
        inputs.append(
            HitInputs(
                scores=np.sort(rng.random(5))[::-1] * 0.3 + 0.2,
                share=share,
                name_share=share,
                bm25_z=rng.normal(size=5) + 2 * good * (np.arange(5) == 0),
                mentions=np.full(5, 2.0),
                query_words=int(rng.integers(2, 12)),
            )
        )
        label.append(np.r_[good, rng.random(4) < 0.1])
    designs = _Designs(inputs, np.array(label))
    first, held = _select(designs, np.arange(60), seed=0)
    second, held_again = _select(_Designs(inputs, np.array(label)), np.arange(60), seed=0)
    assert first == second and np.array_equal(held, held_again)
    assert first[0] in FEATURE_SETS and held.shape == (60, 5)


# -- the file format ----------------------------------------------------------------------------------------------
def test_version_2_round_trips(tmp_path: Path) -> None:
    path = V2.save(tmp_path / CALIBRATION_FILE)
    saved = json.loads(path.read_text())
    assert saved["version"] == CALIBRATION_VERSION == 2 and saved["features"] == list(V2.features)
    loaded = Calibration.load(path)
    assert loaded == V2 and loaded.uses_bm25 and loaded.uses_evidence and not loaded.uses_p_yes
    h = HitInputs(np.array([0.5, 0.3]), bm25_z=np.array([1.0, -1.0]), mentions=np.ones(2), query_words=3)
    np.testing.assert_array_equal(loaded.confidence_of(h), V2.confidence_of(h))


def test_a_version_1_file_still_loads_and_means_what_it_meant(tmp_path: Path) -> None:
    old = {"temperature": 0.1, "w_sim": 0.4, "w_yes": 0.0, "bias": -0.7, "w_margin": -0.1, "w_share": 0.9}
    old |= {"w_relative": 1.2, "w_names": 1.9, "rerank_weight": 0.2, "report": {}, "some_future_key": 1}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(old))
    cal = Calibration.find([None, tmp_path])
    assert cal is not None and cal.version == 1 and cal.uses_evidence and not cal.uses_bm25
    scores, share, names = np.array([0.5, 0.45, 0.3]), np.array([1.0, 0.5, 0.0]), np.array([1.0, 0.0, 0.0])
    h = HitInputs(scores, share, names, mentions=np.ones(3))
    np.testing.assert_allclose(cal.confidence_of(h), cal.confidence(scores, None, share, names))


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"version": 99}, "version 99 is not known"),
        ({"version": 2, "features": ["sim", "colour"], "coef": [1.0, 2.0]}, "unknown features"),
        ({"version": 2, "features": ["sim"], "coef": [1.0, 2.0]}, "2 weights for 1 features"),
        ([1, 2], "JSON object"),
    ],
)
def test_a_file_this_code_cannot_read_fails_clearly(tmp_path: Path, data, says: str) -> None:
    path = tmp_path / CALIBRATION_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=says):
        Calibration.load(path)


def test_the_committed_demo_calibration_is_version_2_and_records_how_it_was_fitted() -> None:
    cal = Calibration.load(DEMO_CALIBRATION)
    assert cal.version == 2 and set(cal.features) <= set(HIT_FEATURES) and not cal.uses_p_yes
    report = cal.report
    assert report["n_queries"] == 199 and "human_dev" in report["fitted_on"]
    assert tuple(cal.features) == FEATURE_SETS[report["chosen"]["features"]]
    assert (cal.rerank_weight < 1.0) == report["erm"]["on"]  # the file says whether the app re-ranks
    value, low, high = report["held_out"]["top1_after"]["auroc"]
    assert low <= value <= high


# -- the Explainer reads the same inputs ------------------------------------------------------------------------
def test_the_explainer_confidence_is_the_calibration_on_the_same_inputs(
    tiny_model_dir, finder, tiles
) -> None:
    import torch

    from retriever import load_retriever
    from retriever.explain import Explainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = Explainer(load_retriever(tiny_model_dir("idefics3")), calibration=V2, index=tiles)
    finally:
        torch.set_num_threads(threads)
    hits = [Hit("a", 0.9), Hit("b", 0.5), Hit("c", 0.3)]
    query = "Stockmann department store on Aleksanterinkatu"
    np.testing.assert_allclose(ex.confidence(query, hits), V2.confidence_of(inputs_for(query, finder, tiles)))
    assert ex.reranks and [h.tile_id for h in ex.rerank(query, hits[::-1], k=3)][0] == "a"
    assert max(ex.confidence("🙂🙂", hits)) <= NO_MENTION_CAP


def test_erm_goes_on_only_when_it_pays_and_the_shown_confidence_holds() -> None:
    from demo.calibrate_explain import ERM_MIN_GAIN, erm_pays

    gain = np.r_[np.ones(3), np.zeros(97)]  # +0.03 L@150
    assert gain.mean() >= ERM_MIN_GAIN
    before, after = np.zeros(100, bool), np.r_[np.ones(2, bool), np.zeros(98, bool)]
    assert erm_pays(gain, before, after, shown_auroc_holds=True)
    assert not erm_pays(gain, before, after, shown_auroc_holds=False)  # a better rank, a worse confidence
    assert not erm_pays(gain, after, before, shown_auroc_holds=True)  # hit@1 falls
    assert not erm_pays(np.r_[np.ones(1), np.zeros(99)], before, after, shown_auroc_holds=True)  # 1 in 100
