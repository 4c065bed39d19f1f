"""Evidence on hand-made tiles: typo-tolerant names, kind words, nearby, misses; the faithfulness check."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import box

from retriever.explain.calibration import Calibration, auroc, expected_calibration_error
from retriever.explain.evidence import EvidenceFinder, check_reason, plain_sentence, split_sentences
from retriever.vocabulary import Vocabulary

SIDE = 0.002  # degrees of longitude; ~110 m at 60 N
TILES = [
    # tile_id, west, south, features (context style), categories
    (
        "a",
        24.940,
        60.1680,
        "Stockmann (department store; department store, shop); Aleksanterinkatu / Alexandersgatan (street); "
        "Keskuskatu / Centralgatan (street)",
        ["roads:primary", "rail:tram", "buildings:building"],
    ),
    (
        "b",
        24.942,
        60.1680,
        "Lilla Teatern (theatre; theatre, stage)",
        ["buildings:building"],
    ),  # east neighbour
    (
        "c",
        24.950,
        60.1700,
        "Helsingin tuomiokirkko / Helsingfors domkyrka (church); Senaatintori / Senatstorget (square)",
        ["squares:square", "pois:worship"],
    ),
    ("d", 24.960, 60.1600, "Kauppatori / Salutorget (marketplace)", ["water:sea", "squares:square"]),
]


class Hit:
    def __init__(self, tile_id: str) -> None:
        self.tile_id = tile_id
        self.context: dict = {}


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


@pytest.fixture(scope="module")
def finder(vocabulary: Vocabulary) -> EvidenceFinder:
    import geopandas as gpd

    frame = gpd.GeoDataFrame(
        {
            "tile_id": [t[0] for t in TILES],
            "features": [t[3] for t in TILES],
            "categories": [t[4] for t in TILES],
        },
        geometry=[box(w, s, w + SIDE, s + SIDE / 2) for _, w, s, _, _ in TILES],
        crs="EPSG:4326",
    )
    return EvidenceFinder(frame, vocabulary)


def statuses(evidence) -> dict[str, tuple[str, str]]:
    return {m.mention.surface.lower(): (m.status, m.matched) for m in evidence.matches}


def test_a_name_with_a_typo_finds_the_feature(finder: EvidenceFinder) -> None:
    found = statuses(finder.evidence("Stokman on aleksanterinkatu", Hit("a")))
    assert found["stokman"] == ("tile", "Stockmann (department store)")
    assert found["aleksanterinkatu"][0] == "tile"


def test_a_kind_word_goes_through_the_vocabulary(finder: EvidenceFinder) -> None:
    found = statuses(finder.evidence("the big white cathedral", Hit("c")))
    assert found["cathedral"][0] == "tile" and "tuomiokirkko" in found["cathedral"][1]
    assert statuses(finder.evidence("the big white cathedral", Hit("a")))["cathedral"][0] == "miss"


def test_a_neighbour_within_100_m_is_nearby(finder: EvidenceFinder) -> None:
    assert finder.neighbours("a") == ["b"]
    found = statuses(finder.evidence("Stockmann, the theatre next door", Hit("a")))
    assert found["stockmann"][0] == "tile" and found["theatre"] == ("nearby", "Lilla Teatern (theatre)")


def test_a_name_elsewhere_and_a_missing_kind_are_misses(finder: EvidenceFinder) -> None:
    evidence = finder.evidence("kauppatori by the sea with a mosque", Hit("a"))
    found = statuses(evidence)
    assert found["kauppatori"][0] == "miss" and found["sea"][0] == "miss" and found["mosque"][0] == "miss"
    assert evidence.support_share == 0.0 and len(evidence.misses) == 3
    assert statuses(finder.evidence("kauppatori by the sea", Hit("d")))["sea"] == ("tile", "water")


def test_crossing_needs_both_streets(finder: EvidenceFinder) -> None:
    found = statuses(finder.evidence("corner of Aleksanterinkatu and Keskuskatu, trams", Hit("a")))
    crossing = next(v for k, v in found.items() if "&" in k)
    assert crossing[0] == "tile" and found["trams"][0] == "tile"
    assert next(v for k, v in statuses(finder.evidence(
        "corner of Aleksanterinkatu and Keskuskatu", Hit("c"))).items() if "&" in k)[0] == "miss"  # fmt: skip


@pytest.mark.parametrize("query", ["asdf", "<img src=x onerror=alert(1)>", "🙂🙂🙂", "???"])
def test_a_query_with_nothing_in_it_has_no_support(finder: EvidenceFinder, query: str) -> None:
    evidence = finder.evidence(query, Hit("a"))
    assert evidence.matches == () and evidence.support_share == 0.0
    assert "Nothing in the description" in plain_sentence(evidence)


# -- the faithfulness check ------------------------------------------------------------------------------------
def test_an_invented_name_is_replaced(finder: EvidenceFinder, vocabulary: Vocabulary) -> None:
    evidence = finder.evidence("Stokman department store, a theatre", Hit("a"))
    checked = check_reason(
        "The tile shows the Tokyo Metropolitan Government Office.", evidence, vocabulary, finder.gallery_names
    )
    assert checked.replaced and not checked.kept and "Tokyo" in checked.dropped[0][1]
    assert checked.text == plain_sentence(evidence)
    assert checked.text.startswith("Matches Stockmann (department store)") and "nearby" in checked.text


def test_a_faithful_sentence_is_kept(finder: EvidenceFinder, vocabulary: Vocabulary) -> None:
    evidence = finder.evidence("Stokman department store on aleksanterinkatu", Hit("a"))
    checked = check_reason(
        "The tile shows Stockmann, a large department store on Aleksanterinkatu. It also",
        evidence,
        vocabulary,
    )
    assert checked.kept == ("The tile shows Stockmann, a large department store on Aleksanterinkatu.",)
    assert not checked.replaced and checked.cut  # the fragment "It also" is cut


def test_a_kind_the_tile_lacks_is_dropped(finder: EvidenceFinder, vocabulary: Vocabulary) -> None:
    evidence = finder.evidence("a cathedral on a square", Hit("a"))
    checked = check_reason(
        "There is a cathedral by the square. There is no cathedral here.", evidence, vocabulary
    )
    assert [s for s, _ in checked.dropped] == ["There is a cathedral by the square."]
    assert checked.kept == ("There is no cathedral here.",)  # a negation is not a claim
    assert checked.text.startswith("No cathedral or square in this tile.")


def test_split_sentences_cuts_the_fragment() -> None:
    assert split_sentences("One two. Three four! Five") == (["One two.", "Three four!"], True)
    assert split_sentences("One two?") == (["One two?"], False)


# -- calibration arithmetic against naive references -----------------------------------------------------------
def naive_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def naive_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if members:
            gap = abs(np.mean([conf[i] for i in members]) - np.mean([correct[i] for i in members]))
            total += len(members) / len(conf) * gap
    return total


def test_auroc_and_ece_match_naive_references() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        scores = np.round(rng.random(60), 1)  # ties on purpose
        labels = rng.random(60) < scores
        assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels))
        assert expected_calibration_error(scores, labels) == pytest.approx(
            naive_ece(scores, labels.astype(float))
        )
    assert np.isnan(auroc(np.ones(3), np.ones(3, dtype=bool)))


def test_evidence_share_raises_the_calibrated_confidence() -> None:
    cal = Calibration(w_sim=0.5, w_margin=0.1, w_share=3.0, w_yes=0.0, bias=-2.0)
    scores = np.array([0.5, 0.45, 0.4])
    low = cal.confidence(scores, None, np.zeros(3))
    high = cal.confidence(scores, None, np.ones(3))
    assert np.all(high > low) and not cal.uses_p_yes and cal.uses_evidence


def test_a_brand_name_says_what_the_feature_is(vocabulary: Vocabulary) -> None:
    finder = EvidenceFinder(None, vocabulary)
    hit = Hit("x")
    hit.context = {"features": "Stockmann (building)", "categories": []}
    found = statuses(finder.evidence("a department store", hit))
    assert found["department store"] == ("tile", "Stockmann (building)")  # NSI: Stockmann is one


def test_markup_in_the_query_names_nothing(finder: EvidenceFinder) -> None:
    assert finder.evidence("<img src=x onerror=alert(1)> &amp; ${alert(3)}", Hit("a")).matches == ()
