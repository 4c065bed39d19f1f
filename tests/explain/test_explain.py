"""Explanations on tiny random models: P(yes) batching, reasons, heatmap grids, ERM, calibration, evaluate hook."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retriever import load_retriever
from retriever.errors import ReasonInterrupted
from retriever.explain import (
    Calibration,
    Explainer,
    ValExample,
    calibration_ece,
    erm_order,
    fit_calibration,
    fit_rerank_weight,
    make_reranker,
    similarity_probs,
)
from retriever.explain.evidence import check_reason
from retriever.explain.explainer import NO_MENTION_CAP
from retriever.explain.prompts import MATCH_QUESTION, build_prompt, context_text
from retriever.models.adapters import add_adapter
from retriever.models.backbones import FAMILIES
from retriever.models.config import CALIBRATION_FILE

FAMILY_NAMES = tuple(FAMILIES)
QUERY = "a red church on the corner, a small park opposite"

# The image-token grid of each tiny model, worked out by hand from retriever/models/tiny.py:
# Qwen at image_side 112: 112/14 = 8 patches a side, merged 2x2 -> 4x4; Idefics3: 64/16 = 4, pixel
# shuffle 2 -> 2x2; InternVL: 32/8 = 4, downsample 0.5 -> 2x2.
EXPECTED_GRID = {"qwen2_vl": (4, 4), "qwen2_5_vl": (4, 4), "idefics3": (2, 2), "internvl": (2, 2)}
LOAD_OPTIONS = {"qwen2_vl": {"image_side": 112}, "qwen2_5_vl": {"image_side": 112}}


@dataclass(frozen=True)
class FakeHit:
    """The fields of retriever.index.Hit that explanations read."""

    rank: int
    tile_id: str
    score: float
    image_path: str
    context: dict = field(default_factory=dict)


COLOURS = [(200, 30, 30), (30, 180, 60), (30, 60, 220), (230, 220, 40), (250, 250, 250)]
CONTEXTS = [
    {},
    {"features": ["church", "park"]},
    {"features": "a long list of things: tram stop, bridge, river, harbour, market square", "name": "x"},
    {"pois": ["cafe"]},
    {},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hits(tmp_path_factory: pytest.TempPathFactory) -> list[FakeHit]:
    folder = tmp_path_factory.mktemp("tiles")
    out = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"tile{i}.png"
        image = Image.new("RGB", (48, 40), colour)
        image.paste((10, 10, 10), (0, 0, 16, 16))  # a dark corner: not a flat image
        image.save(path)
        out.append(FakeHit(i + 1, f"t{i}", 0.5 - 0.02 * i, str(path), CONTEXTS[i]))
    return out


@pytest.fixture(scope="module")
def retrievers(tiny_model_dir):
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_retriever(tiny_model_dir(family), **LOAD_OPTIONS.get(family, {}))
        return cache[family]

    return get


# -- P(yes) ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_p_yes_in_unit_interval_and_batched_equals_one_by_one(family: str, retrievers, hits) -> None:
    ex = Explainer(retrievers(family), cache_size=0)  # no cache: both calls really run the model
    batch = ex._inputs([h.image_path for h in hits], [context_text(h.context) + "?" for h in hits], "Answer:")
    assert batch["attention_mask"].min() == 0  # the contexts differ in length: padding is exercised
    batched = ex.p_yes(QUERY, hits)
    one_by_one = ex.p_yes(QUERY, hits, batch_size=1)
    assert batched.shape == (5,) and np.all((batched > 0) & (batched < 1))
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5, rtol=0)
    assert np.ptp(batched) > 0  # different tiles and contexts, different answers


def test_p_yes_runs_with_the_adapter_switched_off(tiny_model_dir, hits) -> None:
    base = tiny_model_dir("idefics3")
    plain = Explainer(load_retriever(base)).p_yes(QUERY, hits)
    r = add_adapter(load_retriever(base), "lora", rank=4, alpha=8)
    with torch.no_grad():  # a fresh LoRA is the identity; make it matter
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    r.model.train()  # dropout must not leak into P(yes)
    np.testing.assert_allclose(Explainer(r).p_yes(QUERY, hits), plain, atol=1e-5, rtol=0)
    with_adapter = Explainer(r, adapter_off=False).p_yes(QUERY, hits)
    assert np.abs(with_adapter - plain).max() > 1e-4  # the adapter changes the answers when left on
    assert r.model.training  # the caller's mode is restored


def test_yes_and_no_tokens_are_distinct_single_tokens(retrievers) -> None:
    r = retrievers("qwen2_vl")
    ex = Explainer(r)
    assert set(ex.yes_ids).isdisjoint(ex.no_ids)
    decoded = {r.tokenizer.decode([i]).strip().lower() for i in ex.yes_ids}
    assert decoded == {"yes"} and {r.tokenizer.decode([i]).strip().lower() for i in ex.no_ids} == {"no"}


# -- reasons --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_greedy_reasons_are_deterministic_and_streamed(family: str, retrievers, hits) -> None:
    ex = Explainer(retrievers(family))
    first = list(ex.reason(QUERY, hits[1], max_new_tokens=12))
    second = list(ex.reason(QUERY, hits[1], max_new_tokens=12))
    assert "".join(first) and "".join(first) == "".join(second)
    assert all(isinstance(chunk, str) for chunk in first)
    other = "".join(ex.reason("a blue harbour with a bridge", hits[3], max_new_tokens=12))
    assert other != "".join(first)  # the prompt reaches the model


def test_reason_can_be_abandoned_early(retrievers, hits) -> None:
    r = retrievers("internvl")
    ex = Explainer(r)
    stream = ex.reason(QUERY, hits[0], max_new_tokens=200)
    next(stream)
    stream.close()  # stops the generation thread and leaves the adapter context
    assert ex.p_yes(QUERY, hits[:2]).shape == (2,)


def adapted(tiny_model_dir) -> object:
    """A tiny idefics3 retriever with a LoRA that matters (a fresh one is the identity)."""
    r = add_adapter(load_retriever(tiny_model_dir("idefics3")), "lora", rank=4, alpha=8)
    with torch.no_grad():
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return r


def test_own_model_writes_like_the_shared_model_with_the_adapter_off(tiny_model_dir, hits) -> None:
    r = adapted(tiny_model_dir)
    shared, own = Explainer(r, cache_size=0), Explainer(r, cache_size=0, own_model=True)
    assert own.own_model and not shared.own_model
    np.testing.assert_allclose(own.p_yes(QUERY, hits), shared.p_yes(QUERY, hits), atol=1e-5, rtol=0)
    assert "".join(own.reason(QUERY, hits[1], max_new_tokens=12)) == "".join(
        shared.reason(QUERY, hits[1], max_new_tokens=12)
    )
    with r.model_lock:  # another thread holding the retriever's model (a search) does not block the copy
        done: list[np.ndarray] = []
        worker = threading.Thread(target=lambda: done.append(own.p_yes(QUERY, hits[:2])))
        worker.start()
        worker.join(timeout=60)
        assert done and done[0].shape == (2,)
    assert any("lora" in n for n, _ in r.model.named_parameters())  # the retriever keeps its adapter


def test_a_reason_on_its_own_model_pauses_for_a_search_and_loses_nothing(tiny_model_dir, hits) -> None:
    own = Explainer(adapted(tiny_model_dir), own_model=True)
    calm = "".join(own.reason(QUERY, hits[1], max_new_tokens=12))
    asked: list[float] = []

    def search_waits() -> bool:  # a search waits for the first 0.3 s of the generation
        asked.append(time.perf_counter())
        return asked[-1] - asked[0] < 0.3

    paused = "".join(own.reason(QUERY, hits[1], max_new_tokens=12, yield_to=search_waits))
    assert paused == calm
    assert asked[-1] - asked[0] >= 0.3 and len(asked) > 5  # it polled while paused, then went on


def test_a_reason_on_the_shared_model_stops_for_a_search(retrievers, hits) -> None:
    ex = Explainer(retrievers("idefics3"))
    stream = ex.reason(QUERY, hits[1], max_new_tokens=30, yield_to=lambda: True)
    first = next(stream)  # the evidence sentence comes before the LM runs
    assert first
    with pytest.raises(ReasonInterrupted):
        list(stream)
    assert ex.p_yes(QUERY, hits[:2]).shape == (2,)  # the model was handed back


SIGN_QUERY = "Stokman on Aleksanterinkatu, a theatre"
SIGN_CONTEXT = {"features": "Stockmann (department store); Aleksanterinkatu / Alexandersgatan (street)"}
SIGN_PLAIN = "Matches Stockmann (department store) and Aleksanterinkatu; no theatre in this tile."


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_writes_an_evidence_grounded_reason(family: str, retrievers, hits, monkeypatch) -> None:
    ex = Explainer(retrievers(family))
    hit = FakeHit(1, "s", 0.5, hits[0].image_path, SIGN_CONTEXT)
    bodies: list[str] = []
    inputs = ex._inputs
    monkeypatch.setattr(ex, "_inputs", lambda tiles, b, *a: bodies.extend(b) or inputs(tiles, b, *a))
    text = "".join(ex.reason(SIGN_QUERY, hit, max_new_tokens=16))
    assert text.startswith(SIGN_PLAIN)  # the evidence sentence comes first, and names the miss
    assert "in the tile: Stockmann (department store), Aleksanterinkatu; not found: theatre" in bodies[0]
    checked = ex.last_checked
    vocabulary = ex.finder.vocabulary
    evidence = ex.evidence(SIGN_QUERY, hit)
    assert all(not check_reason(s, evidence, vocabulary).dropped for s in checked.kept)
    assert text == checked.text


def test_reasons_never_repeat_a_word_trigram(retrievers, hits) -> None:
    ex = Explainer(retrievers("qwen2_vl"))
    hit = FakeHit(1, "s", 0.5, hits[0].image_path, SIGN_CONTEXT)
    raw = "".join(ex.write(SIGN_QUERY, hit, ex.evidence(SIGN_QUERY, hit), max_new_tokens=40)).split()
    trigrams = [tuple(raw[i : i + 3]) for i in range(len(raw) - 2)]
    assert raw and len(trigrams) == len(set(trigrams))


def test_an_invented_name_from_the_generator_is_replaced(retrievers, hits, monkeypatch) -> None:
    ex = Explainer(retrievers("idefics3"))
    hit = FakeHit(1, "s", 0.5, hits[0].image_path, SIGN_CONTEXT)
    monkeypatch.setattr(ex, "write", lambda *a, **k: iter(["The Tokyo Metropolitan ", "Government Office."]))
    assert "".join(ex.reason(SIGN_QUERY, hit)) == SIGN_PLAIN and ex.last_checked.replaced
    faithful = "Stockmann is a department store on Aleksanterinkatu."
    monkeypatch.setattr(ex, "write", lambda *a, **k: iter([faithful]))
    assert "".join(ex.reason(SIGN_QUERY, hit)) == f"{SIGN_PLAIN} {faithful}"


@pytest.mark.parametrize("query", ["<img src=x onerror=alert(1)>", "🙂🙂", "asdf"])
def test_a_query_with_nothing_in_it_gets_low_confidence(query: str, retrievers, hits) -> None:
    peaky = Calibration(temperature=0.01, w_sim=2.0, w_margin=1.0, w_share=2.0, w_yes=0.0, bias=1.0)
    ex = Explainer(retrievers("idefics3"), calibration=peaky)
    hit_list = [FakeHit(i + 1, f"s{i}", 0.9 - 0.3 * i, hits[0].image_path, SIGN_CONTEXT) for i in range(3)]
    assert max(ex.confidence(query, hit_list)) <= NO_MENTION_CAP
    assert ex.confidence(SIGN_QUERY, hit_list)[0] > 0.5  # the same hits, a query the tile supports


def test_prompts_carry_the_description_and_the_tile_context() -> None:
    text = context_text({"features": ["church", "park"], "empty": "", "n_shops": 3})
    assert text == "Known from the map of this tile: features: church, park; n shops: 3\n"
    assert context_text({}) == "" and len(context_text({"a": "x " * 1000})) < 700
    body = MATCH_QUESTION.format(description=QUERY, context=text)
    plain = build_prompt(type("NoTemplate", (), {})(), "<image>", body, "Answer:")
    assert plain.startswith("<image>\n") and QUERY in plain and "church, park" in plain
    assert plain.endswith("Answer yes or no.\nAnswer:")


# -- heatmaps -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_heatmap_matches_the_patch_grid_and_is_deterministic(family: str, retrievers, hits) -> None:
    r = retrievers(family)
    ex = Explainer(r)
    grid = ex.relevance_grid(QUERY, hits[0])
    assert grid.shape == EXPECTED_GRID[family]
    batch = r.process_tiles([hits[0].image_path])
    n_image_tokens = int((batch["input_ids"][0] == r.base_model.config.image_token_id).sum())
    assert n_image_tokens == grid.size == np.prod(FAMILIES[family].image_grid(r.base_model.config, batch))
    assert np.abs(grid).max() > 0  # the gradient reached the image tokens
    np.testing.assert_array_equal(ex.relevance_grid(QUERY, hits[0]), grid)
    overlay = ex.heatmap(QUERY, hits[0])
    again = ex.heatmap(QUERY, hits[0])
    assert overlay.mode == "RGBA" and overlay.size == (48, 40)
    assert np.array_equal(np.asarray(overlay), np.asarray(again))
    thumb = np.asarray(Image.open(hits[0].image_path).convert("RGBA"))
    if grid.max() > 0:  # some positive evidence: the overlay tints the tile
        assert not np.array_equal(np.asarray(overlay), thumb)


# -- ERM ------------------------------------------------------------------------------------------------------
def test_erm_order_changes_exactly_when_p_yes_disagrees() -> None:
    sim = np.array([0.50, 0.48, 0.47, 0.40, 0.30])
    agree = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # same order as the similarity
    for w in (0.0, 0.3, 0.5, 1.0):
        assert erm_order(sim, agree, w).tolist() == [0, 1, 2, 3, 4]
    flat = np.full(5, 0.5)  # no opinion: the similarity decides
    assert erm_order(sim, flat, 0.5).tolist() == [0, 1, 2, 3, 4]
    swap = np.array([0.8, 0.95, 0.7, 0.6, 0.5])  # the MLLM prefers #2 over #1, agrees on the rest
    assert erm_order(sim, swap, 0.5).tolist() == [1, 0, 2, 3, 4]
    assert erm_order(sim, swap, 1.0).tolist() == [0, 1, 2, 3, 4]  # weight 1: similarity only
    assert erm_order(sim, swap[::-1], 0.0).tolist() == np.argsort(-swap[::-1], kind="stable").tolist()


def test_rerank_reorders_the_top_k_and_renumbers(retrievers, hits, monkeypatch) -> None:
    ex = Explainer(retrievers("qwen2_vl"), weight=0.5)
    more = hits + [FakeHit(6, "t5", 0.1, hits[0].image_path), FakeHit(7, "t6", 0.05, hits[1].image_path)]
    monkeypatch.setattr(ex, "p_yes", lambda q, h: np.linspace(0.9, 0.5, len(h)))  # agrees
    kept = ex.rerank(QUERY, more, k=5)
    assert [h.tile_id for h in kept] == [h.tile_id for h in more]
    monkeypatch.setattr(
        ex, "p_yes", lambda q, h: np.array([0.6, 0.58, 0.56, 0.99, 0.5][: len(h)])
    )  # lifts t3 only
    moved = ex.rerank(QUERY, more, k=5)
    assert [h.tile_id for h in moved] == ["t3", "t0", "t1", "t2", "t4", "t5", "t6"]
    assert [h.rank for h in moved] == [1, 2, 3, 4, 5, 6, 7]
    assert moved[0].score == more[3].score  # the similarity score travels with its tile


def test_confidence_and_rerank_of_one_search_share_one_forward(retrievers, hits, monkeypatch) -> None:
    ex = Explainer(retrievers("idefics3"))
    forwards = []
    run = ex._p_yes_batch
    monkeypatch.setattr(ex, "_p_yes_batch", lambda batch: forwards.append(1) or run(batch))
    ex.confidence(QUERY, hits)
    ex.rerank(QUERY, hits, k=5)
    assert len(forwards) == 1
    ex.p_yes("another description", hits)
    assert len(forwards) == 2


def test_fit_rerank_weight_uses_an_informative_p_yes() -> None:
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(200):
        relevant = np.zeros(5, dtype=bool)
        relevant[rng.integers(5)] = True
        scores = np.sort(rng.normal(0.5, 0.01, 5))[::-1]  # similarity: barely informative
        p_yes = np.where(relevant, 0.8, 0.3) + rng.normal(0, 0.05, 5)
        examples.append(ValExample(scores, np.clip(p_yes, 0.01, 0.99), relevant))
    fit = fit_rerank_weight(examples)
    assert fit.weight < 1.0 and fit.r1_after > fit.r1_before + 30


# -- confidence and calibration -------------------------------------------------------------------------------
def synthetic_examples(n: int, seed: int) -> list[ValExample]:
    """An overconfident MLLM: P(yes) is near 0 or 1, right only 70% of the time."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        relevant = np.zeros(5, dtype=bool)
        relevant[rng.integers(5)] = True
        scores = np.sort(rng.normal(0.4, 0.05, 5))[::-1]
        says_yes = np.where(rng.random(5) < 0.7, relevant, ~relevant)
        out.append(ValExample(scores, np.where(says_yes, 0.99, 0.02), relevant))
    return out


def test_calibration_lowers_ece_on_a_miscalibrated_set(tmp_path: Path) -> None:
    fit_on, test_on = synthetic_examples(300, 0), synthetic_examples(300, 1)
    cal = fit_calibration(fit_on)
    assert cal.report["ece_after"] < cal.report["ece_before"] / 3
    assert calibration_ece(cal, test_on) < calibration_ece(Calibration(), test_on) / 3  # also held out
    assert 0 < cal.w_yes < 1  # the overconfident P(yes) is shrunk
    cal.save(tmp_path / "cal.json")
    loaded = Calibration.load(tmp_path / "cal.json")
    assert loaded == cal and json.loads((tmp_path / "cal.json").read_text())["report"]["ece_after"] >= 0


def test_confidence_combines_similarity_and_p_yes(tiny_model_dir, hits, monkeypatch) -> None:
    folder = tiny_model_dir("internvl")
    r = load_retriever(folder)
    similarity_only = Calibration(temperature=0.1, w_sim=1.0, w_yes=0.0, bias=0.0)
    ex = Explainer(r, calibration=similarity_only)
    conf = ex.confidence(QUERY, hits)
    expected = similarity_probs(np.array([h.score for h in hits]), 0.1)
    np.testing.assert_allclose(conf, expected, atol=1e-9)
    full = Explainer(r).confidence(QUERY, hits)
    assert len(full) == 5 and all(0.0 <= c <= 1.0 for c in full)
    assert full != pytest.approx(list(expected))  # P(yes) counts by default

    Calibration(temperature=0.2, rerank_weight=0.25).save(folder / CALIBRATION_FILE)
    try:  # a calibration saved with the model is picked up
        found = Explainer(r)
        assert found.calibration.temperature == 0.2 and found.calibration.rerank_weight == 0.25
        assert Explainer(r, weight=0.9).calibration.rerank_weight == 0.9
    finally:
        (folder / CALIBRATION_FILE).unlink()


# -- evaluation hook ------------------------------------------------------------------------------------------
def test_make_reranker_needs_an_mllm() -> None:
    from retriever.errors import RetrieverError
    from tests.fakes import FakeRetriever

    with pytest.raises(RetrieverError, match="MLLM retriever"):
        make_reranker(FakeRetriever(), None)


@pytest.mark.parametrize("protocol", ["cvgtext", "geotext1652"])
def test_evaluate_with_rerank_erm_on_fake_data(
    protocol: str, tiny_model_dir, tmp_path: Path, monkeypatch, capsys
) -> None:
    from retriever.evaluate.__main__ import main as evaluate_main
    from tests.data.cvgtext.data import make_cvgtext
    from tests.data.geotext1652.data import make_geotext1652

    data = (make_cvgtext if protocol == "cvgtext" else make_geotext1652)(tmp_path / "data")
    calls: list[int] = []
    p_yes = Explainer.p_yes

    def counting(self, query, hits, batch_size=None):
        calls.append(len(hits))
        return p_yes(self, query, hits, batch_size)

    monkeypatch.setattr(Explainer, "p_yes", counting)
    out = tmp_path / "results.json"
    model = str(tiny_model_dir("idefics3"))
    argv = ["--protocol", protocol, "--data", str(data), "--model", model, "--no-progress", "--out", str(out)]
    assert evaluate_main([*argv, "--rerank", "erm", "--rerank-depth", "3"]) == 0
    results = json.loads(out.read_text())
    assert results["options"]["rerank"] == "erm"
    n_texts = results["counts"]["texts"]
    assert calls == [3] * n_texts  # one batched P(yes) forward per text, over its top-3
    assert "R@1" in capsys.readouterr().out
