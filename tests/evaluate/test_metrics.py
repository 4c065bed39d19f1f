"""Metrics against naive full-matrix references written from the definitions: ties, chunking, re-ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retriever.evaluate.metrics import (
    OFFICIAL_GEOTEXT_KEYS,
    cvg_metrics,
    first_hit_rank,
    first_relevant,
    geotext_metrics,
    haversine_km,
    nearest_by_haversine,
    official_geotext_keys,
    recall_at_k,
    stream_topk,
    topk_ordered,
)
from retriever.evaluate.reference import cvg_metrics_reference, geotext_metrics_reference, official_haversine


def int_embeddings(rng: np.random.Generator, n: int, dim: int = 4, values: int = 2) -> np.ndarray:
    """Small integer vectors: dot products are exact in float32 and tie often."""
    return rng.integers(-values, values + 1, (n, dim)).astype(np.float32)


def reference_order(row: np.ndarray, largest: bool, ties: str) -> np.ndarray:
    """The full order of one row, from numpy's stable argsort."""
    if ties == "high":  # stable ascending, reversed: equal values -> higher index first
        return np.argsort(row if largest else -row, kind="stable")[::-1]
    return np.argsort(-row if largest else row, kind="stable")


# ---------------------------------------------------------------------------------------------
# Tie-exact top-k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("ties", ["high", "low"])
def test_topk_ordered_equals_stable_argsort(largest: bool, ties: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        n_rows, n = int(rng.integers(1, 6)), int(rng.integers(1, 25))
        k = int(rng.integers(1, 30))
        values = rng.integers(0, 4, (n_rows, n)).astype(np.float32)  # many ties
        top = topk_ordered(torch.from_numpy(values), k, largest=largest, ties=ties)
        for r in range(n_rows):
            expected = reference_order(values[r], largest, ties)[:k]
            assert top.indices[r].tolist() == expected.tolist()
            assert top.scores[r].tolist() == values[r, expected].tolist()


def test_topk_ordered_breaks_a_boundary_tie_by_index() -> None:
    values = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk_ordered(values, 3, ties="high").indices.tolist() == [[0, 4, 3]]
    assert topk_ordered(values, 3, ties="low").indices.tolist() == [[0, 1, 2]]
    assert topk_ordered(values, 2, largest=False, ties="low").indices.tolist() == [[1, 2]]


def test_topk_ordered_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        topk_ordered(torch.tensor([[1.0, float("nan")]]), 1)


def test_stream_topk_rejects_non_finite_embeddings() -> None:
    queries, gallery = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    queries[1, 0] = np.nan
    with pytest.raises(ValueError, match="query embeddings contain NaN"):
        stream_topk(queries, gallery, 2)
    with pytest.raises(ValueError, match="gallery embeddings contain NaN"):
        stream_topk(gallery, queries, 2)


def test_stream_topk_accepts_read_only_memmaps(tmp_path) -> None:
    rng = np.random.default_rng(9)
    queries, gallery = int_embeddings(rng, 20), int_embeddings(rng, 9)
    np.save(tmp_path / "q.npy", queries)
    mapped = np.load(tmp_path / "q.npy", mmap_mode="r")
    rows, _ = stream_topk(mapped, gallery, 3, chunk_size=6)
    assert torch.equal(rows.indices, stream_topk(queries, gallery, 3)[0].indices)


@pytest.mark.parametrize("chunk_size", [1, 4, 11, None])
def test_stream_topk_equals_full_matrix_in_both_directions(chunk_size: int | None) -> None:
    rng = np.random.default_rng(1)
    queries, gallery = int_embeddings(rng, 29), int_embeddings(rng, 13)
    rows, cols = stream_topk(queries, gallery, 6, chunk_size=chunk_size)
    full = torch.from_numpy(queries @ gallery.T)  # (Q, G), exact integers
    expected_rows = topk_ordered(full, 6)
    expected_cols = topk_ordered(full.T.contiguous(), 6)
    assert torch.equal(rows.indices, expected_rows.indices)
    assert torch.equal(cols.indices, expected_cols.indices)
    assert torch.equal(cols.scores, expected_cols.scores)


def test_first_relevant_and_first_hit_rank_are_one_definition() -> None:
    rng = np.random.default_rng(10)
    order = np.stack([rng.permutation(12) for _ in range(30)])  # (Q, G)
    gallery_label, query_label = rng.integers(0, 4, 12), rng.integers(0, 5, 30)  # label 4 matches nothing
    relevant = query_label[:, None] == gallery_label[None, :]  # (Q, G)
    first = first_relevant(order, relevant)
    assert first.tolist() == first_hit_rank(order, query_label, gallery_label).tolist()
    assert (first[query_label == 4] == 12).all()  # no relevant item: rank n
    assert recall_at_k(first, 3) == float((first < 3).mean())
    assert math.isnan(recall_at_k(np.array([], dtype=int), 1))


# ---------------------------------------------------------------------------------------------
# GeoText-1652
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 17, None])
def test_geotext_streamed_equals_official_itm_eval(chunk_size: int | None) -> None:
    rng = np.random.default_rng(2)
    for trial in range(4):
        n_images, n_texts = 23 + trial, 61
        images, texts = int_embeddings(rng, n_images), int_embeddings(rng, n_texts)
        labels = rng.integers(0, 6, n_images)
        text_image = rng.integers(0, n_images, n_texts)
        expected = geotext_metrics_reference(texts @ images.T, text_image, labels)
        got = geotext_metrics(texts, images, text_image, labels, chunk_size=chunk_size)
        assert got == expected


def test_geotext_all_scores_tied_follow_the_high_index_rule() -> None:
    # Every score is 0: each ranking is the reversed index order, so only the last items hit at rank 0.
    images, texts = np.zeros((4, 3), np.float32), np.zeros((6, 3), np.float32)
    labels = np.array([0, 0, 1, 1])
    text_image = np.array([0, 1, 2, 3, 0, 3])  # text labels 0 0 1 1 0 1
    got = geotext_metrics(texts, images, text_image, labels, ks=(1, 2), chunk_size=4)
    assert got == geotext_metrics_reference(texts @ images.T, text_image, labels, ks=(1, 2))
    # t2i: order is images 3, 2, 1, 0: label-1 texts (3 of 6) hit at rank 0, label-0 at rank 2.
    assert got["t2i_r1"] == 50.0 and got["t2i_r2"] == 50.0
    # i2t: order is texts 5, 4, ...: text 5 has label 1, text 4 label 0 -> everyone hits by rank 1.
    assert got["i2t_r1"] == 50.0 and got["i2t_r2"] == 100.0


def test_geotext_directions_are_named_without_ambiguity() -> None:
    images = np.array([[1, 0], [0, 1]], np.float32)  # image 0: building 0, image 1: building 1
    texts = np.array([[0, 1], [0, 1], [0, 1]], np.float32)  # text 0 describes image 0 but looks like image 1
    metrics = geotext_metrics(texts, images, np.array([0, 1, 1]), np.array([0, 1]))
    assert metrics["t2i_r1"] == pytest.approx(200 / 3)  # text->image: text 0 misses
    assert metrics["i2t_r1"] == 50.0  # image->text: image 0 sees three tied texts, text 2 (building 1) first
    assert metrics["i2t_r5"] == 100.0
    official = official_geotext_keys(metrics)
    assert official["img_r1"] == metrics["t2i_r1"]  # official img_* is text->image
    assert official["txt_r1"] == metrics["i2t_r1"]  # official txt_* is image->text
    assert official["r_mean"] == metrics["mean"] == (metrics["t2i_mean"] + metrics["i2t_mean"]) / 2
    assert set(official) == set(OFFICIAL_GEOTEXT_KEYS)


def test_geotext_rerank_hook_is_applied_before_metrics() -> None:
    rng = np.random.default_rng(3)
    images, texts = int_embeddings(rng, 15), int_embeddings(rng, 40)
    labels, text_image = rng.integers(0, 4, 15), rng.integers(0, 15, 40)
    calls: list[tuple[int, int]] = []

    def reverse(query: int, candidates: np.ndarray, scores: np.ndarray) -> list[int]:
        calls.append((query, len(candidates)))
        assert np.all(np.diff(scores) <= 0)  # handed over best first
        return candidates[::-1].tolist()

    got = geotext_metrics(texts, images, text_image, labels, rerank_fn=reverse, chunk_size=7)
    assert calls == [(q, 5) for q in range(40)]
    assert got == geotext_metrics_reference(
        texts @ images.T, text_image, labels, rerank_fn=lambda q, c, s: c[::-1]
    )
    assert got != geotext_metrics(texts, images, text_image, labels)  # reversing the top-5 does change R@1

    identity = geotext_metrics(texts, images, text_image, labels, rerank_fn=lambda q, c, s: c)
    assert identity == geotext_metrics(texts, images, text_image, labels)
    with pytest.raises(ValueError, match="permutation"):
        geotext_metrics(texts, images, text_image, labels, rerank_fn=lambda q, c, s: [0, 0, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# CVG-Text
# ---------------------------------------------------------------------------------------------


def test_haversine_agrees_with_the_official_formula_and_with_itself() -> None:
    rng = np.random.default_rng(4)
    ll = np.column_stack([rng.uniform(-35, 45, 400), rng.uniform(-75, 155, 400)])
    vector = haversine_km(ll[:200, :1], ll[:200, 1:], ll[None, 200:, 0], ll[None, 200:, 1])  # (200, 200)
    for i, j in [(0, 0), (3, 17), (150, 199), (42, 7)]:
        a, b = ll[i], ll[200 + j]
        scalar = haversine_km(float(a[0]), float(a[1]), float(b[0]), float(b[1]))
        assert scalar == vector[i, j]  # scalar and broadcast paths: bit-identical
        assert scalar == pytest.approx(official_haversine(a[0], a[1], b[0], b[1]), rel=1e-12)
    assert haversine_km(40.7, -74.0, 40.7, -74.0) == 0.0
    assert haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(111.19492664455873, rel=1e-12)


@pytest.mark.parametrize("m", [1, 10, 40, 500])
@pytest.mark.parametrize("slack", [0, 16])  # slack 0 sends every row down the wide path
def test_nearest_by_haversine_equals_sorting_every_distance(m: int, slack: int, monkeypatch) -> None:
    monkeypatch.setattr("retriever.evaluate.metrics.NEAREST_SLACK", slack)
    rng = np.random.default_rng(8)
    city = np.column_stack([40.7 + rng.uniform(0, 0.02, 150), -74.0 + rng.uniform(0, 0.02, 150)])
    repeated = np.repeat(city[:3], 25, axis=0)  # 3 spots with 25 images each: ties beyond the slack
    world = np.column_stack([rng.uniform(-80, 80, 30), rng.uniform(-179, 179, 30)])
    gallery = np.concatenate([city, repeated, world])[rng.permutation(255)]
    queries = np.concatenate([gallery[:40], city[:5] + 1e-7, world[:3]])
    got = nearest_by_haversine(queries, gallery, m)
    for q, row in zip(queries, got, strict=True):
        pairs = sorted(
            (haversine_km(float(q[0]), float(q[1]), float(g[0]), float(g[1])), j)
            for j, g in enumerate(gallery)
        )
        assert row.tolist() == [j for _, j in pairs[:m]]


def random_cvg_case(rng: np.random.Generator, n: int = 60) -> dict:
    """Images on a coarse grid (repeated points tie in distance), integer embeddings (scores tie)."""
    grid = rng.integers(0, 6, (n, 2))
    image_latlon = np.column_stack([40.70 + grid[:, 0] * 0.0004, -74.0 + grid[:, 1] * 0.0005])
    text_image = rng.permutation(n)[: n - 5]
    return {
        "text_emb": int_embeddings(rng, len(text_image), values=1),
        "image_emb": int_embeddings(rng, n, values=1),
        "text_image": text_image,
        "text_latlon": image_latlon[text_image],
        "image_latlon": image_latlon,
        "subsets": {"panorama": rng.random(len(text_image)) < 0.4},
    }


@pytest.mark.parametrize("gallery_size", [7, 100, None])
@pytest.mark.parametrize("batch_size", [1, 13, 256])
def test_cvg_vectorised_equals_literal_loop(gallery_size: int | None, batch_size: int) -> None:
    case = random_cvg_case(np.random.default_rng(5))
    case["subsets"]["single"] = ~case["subsets"]["panorama"]
    got = cvg_metrics(**case, gallery_size=gallery_size, batch_size=batch_size)
    expected = cvg_metrics_reference(**case, gallery_size=gallery_size)
    assert got == expected  # exact, deviation included
    assert got["overall"]["count"] == 55
    assert got["panorama"]["count"] + got["single"]["count"] == 55


def test_cvg_rerank_hook_equals_literal_loop() -> None:
    case = random_cvg_case(np.random.default_rng(6))
    seen = []

    def rotate(query: int, candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
        seen.append(query)
        return np.roll(candidates, 1)

    got = cvg_metrics(**case, gallery_size=20, batch_size=8, rerank_fn=rotate)
    assert sorted(seen) == list(range(55))
    assert got == cvg_metrics_reference(**case, gallery_size=20, rerank_fn=lambda q, c, s: np.roll(c, 1))
    assert got != cvg_metrics(**case, gallery_size=20)


def test_cvg_hand_example() -> None:
    # Three tiles due north of each other, 0 m, ~44 m and ~133 m from tile 0.
    image_latlon = np.array([[40.7, -74.0], [40.7004, -74.0], [40.7012, -74.0]])
    image_emb = np.eye(3, dtype=np.float32)
    text_emb = np.array(
        [[0, 1, 0], [0, 0, 1], [0, 0, 1]], np.float32
    )  # text 0 prefers tile 1; text 2 is right
    text_image = np.array([0, 0, 2])  # text 1 describes tile 0 but prefers tile 2
    kwargs = {
        "text_latlon": image_latlon[text_image],
        "image_latlon": image_latlon,
        "radii_m": (50, 100, 150),
    }
    got = cvg_metrics(text_emb, image_emb, text_image, **kwargs)["overall"]
    d01, d02 = (
        official_haversine(40.7, -74.0, 40.7004, -74.0),
        official_haversine(40.7, -74.0, 40.7012, -74.0),
    )
    assert 0.04 < d01 < 0.05 and 0.10 < d02 < 0.15
    assert got["R@1"] == pytest.approx(100 / 3) and got["R@5"] == 100.0
    assert got["L@50"] == pytest.approx(200 / 3)  # text 0 (44 m) and text 2 (0 m)
    assert got["L@100"] == pytest.approx(200 / 3) and got["L@150"] == 100.0
    assert got["deviation_km"] == pytest.approx((d01 + d02 + 0.0) / 3, rel=1e-12)

    # With a local gallery of 2, text 1 cannot see tile 2 (the farthest): it falls back to a nearer one.
    local = cvg_metrics(text_emb, image_emb, text_image, gallery_size=2, **kwargs)["overall"]
    assert local["L@100"] == 100.0 and local["R@1"] == pytest.approx(200 / 3)


def test_cvg_empty_subset_reports_none() -> None:
    case = random_cvg_case(np.random.default_rng(7), n=12)
    case["subsets"] = {"panorama": np.zeros(7, dtype=bool)}
    got = cvg_metrics(**case)
    assert got["panorama"]["count"] == 0 and got["panorama"]["R@1"] is None
    assert got == cvg_metrics_reference(**case)
