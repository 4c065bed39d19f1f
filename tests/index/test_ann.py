"""FAISS ANN indexes: optimize trains them, the manifest's recall@10 holds, search picks ANN or exact."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import retriever.index.__main__ as index_cli  # noqa: E402
import retriever.index.ann as ann_mod  # noqa: E402
from retriever.index import (  # noqa: E402
    ANN_FILE,
    MANIFEST,
    AnnSearch,
    ExactSearch,
    TileIndex,
    build_index,
    optimize_index,
    recall_at_k,
)
from tests.index.test_index import TableRetriever, brute_force, random_gallery  # noqa: E402

N, D, CLUSTERS = 20_000, 64, 200


def clustered(n: int = N, dim: int = D, clusters: int = CLUSTERS, seed: int = 0) -> np.ndarray:
    """(n, dim) unit vectors around random cluster centres, the shape of real embedding galleries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """An fp16 index of N clustered vectors, without an ANN index."""
    tiles, _ = random_gallery(N, D)
    vectors = dict(zip(tiles["tile_id"], clustered(), strict=True))
    out = tmp_path_factory.mktemp("ann") / "plain"
    return build_index(TableRetriever(vectors), tiles, out, shard_size=5000, thumbnail_px=0, progress=False)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def ivfpq(plain: Path, tmp_path_factory) -> Path:
    folder = copy_of(plain, tmp_path_factory.mktemp("ivfpq"))
    optimize_index(folder, "IVF64,PQ16", train_sample=10_000, nprobe=8, progress=False)
    return folder


def queries(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = clustered(seed=0)[rng.choice(N, n, replace=False)] + 0.02 * rng.standard_normal((n, D))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)  # (n, D)


def test_ivfpq_reaches_the_recall_recorded_in_its_manifest(ivfpq: Path) -> None:
    entry = json.loads((ivfpq / MANIFEST).read_text())["ann"]
    assert (ivfpq / ANN_FILE).is_file() and entry["file"] == ANN_FILE
    assert entry["factory"] == "IVF64,PQ16" and entry["params"] == "nprobe=8" and entry["kind"] == "ivf"
    assert entry["train_sample"] == 10_000 and entry["build_seconds"] > 0
    assert 0.3 < entry["recall@10"] < 1.0  # approximate, but useful
    # Recompute on fresh queries through the loaded index: ANN ids vs exact ids.
    q = torch.from_numpy(queries(1000, seed=7))
    _, ann_ids = TileIndex.load(ivfpq).backend.topk(q, 10, None)
    _, exact_ids = TileIndex.load(ivfpq, exact=True).backend.topk(q, 10, None)
    assert abs(recall_at_k(ann_ids, exact_ids) - entry["recall@10"]) < 0.05
    # The index on disk is the one measured: more probes can only find more.
    dense = TileIndex.load(ivfpq, params="nprobe=64").backend.topk(q, 10, None)[1]
    assert recall_at_k(dense, exact_ids) >= recall_at_k(ann_ids, exact_ids)


def test_search_uses_ann_automatically_and_exact_when_asked(ivfpq: Path, plain: Path) -> None:
    embeddings = np.load(ivfpq / "embeddings.npy").astype(np.float32)
    q = queries(5, seed=3)
    auto = TileIndex.load(ivfpq)
    assert auto.backend_name == "ann" and isinstance(auto.backend, AnnSearch)
    ann_scores, ann_ids = auto.backend.index.search(q, 10)
    hits = auto.search(q, 10)
    assert [[h.tile_id for h in row] for row in hits] == [[f"t{i:05d}" for i in row] for row in ann_ids]
    exact_scores, exact_ids = brute_force(embeddings, q, 10)
    assert not np.allclose(ann_scores, exact_scores, atol=1e-3)  # PQ scores are approximations

    for exact in (TileIndex.load(ivfpq, exact=True), TileIndex.load(ivfpq, backend="torch")):
        assert isinstance(exact.backend, ExactSearch) and not isinstance(exact.backend, AnnSearch)
        got = exact.search(q, 10)
        assert [[h.tile_id for h in row] for row in got] == [[f"t{i:05d}" for i in row] for row in exact_ids]
        np.testing.assert_allclose([[h.score for h in row] for row in got], exact_scores, atol=1e-4)

    # An index without an ANN entry stays exact; asking for ann there, or ann + exact, is an error.
    assert TileIndex.load(plain).backend_name == "torch"
    with pytest.raises(ValueError, match="optimize"):
        TileIndex.load(plain, backend="ann")
    with pytest.raises(ValueError, match="approximate"):
        TileIndex.load(ivfpq, backend="ann", exact=True)


def test_spatial_filters_with_ann_are_exact_over_the_filtered_rows(ivfpq: Path) -> None:
    index = TileIndex.load(ivfpq)
    embeddings = np.load(ivfpq / "embeddings.npy").astype(np.float32)
    mask = (index.tiles["district"] == "west").to_numpy()
    rows = np.flatnonzero(mask)
    q = queries(3, seed=5)
    hits = index.search(q, 10, within=mask)
    scores, ids = brute_force(embeddings, q, 10, rows)
    assert [[h.tile_id for h in row] for row in hits] == [[f"t{i:05d}" for i in row] for row in ids]
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-4)


def test_hnsw_factory(plain: Path, tmp_path: Path) -> None:
    folder = copy_of(plain, tmp_path)
    entry = optimize_index(folder, "HNSW16", ef_search=64, num_queries=300, progress=False)
    assert entry["kind"] == "hnsw" and entry["params"] == "efSearch=64" and entry["train_sample"] == 0
    assert entry["recall@10"] > 0.8
    index = TileIndex.load(folder)
    assert index.backend_name == "ann" and index.backend.index.hnsw.efSearch == 64
    q = torch.from_numpy(queries(300, seed=11))
    _, ann_ids = index.backend.topk(q, 10, None)
    _, exact_ids = TileIndex.load(folder, exact=True).backend.topk(q, 10, None)
    assert abs(recall_at_k(ann_ids, exact_ids) - entry["recall@10"]) < 0.08


def test_optimize_cli_and_rebuild_drops_the_ann_entry(plain: Path, tmp_path: Path, capsys) -> None:
    folder = copy_of(plain, tmp_path)
    argv = [
        "optimize",
        str(folder),
        "--faiss",
        "IVF32,Flat",
        "--train-sample",
        "5000",
        "--nprobe",
        "32",
        "--rerank",
        "3",
    ]
    assert index_cli.main([*argv, "--recall-queries", "200", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["ann"] == printed and printed["params"] == "nprobe=32" and printed["train_sample"] == 5000
    assert printed["recall@10"] == 1.0 and printed["rerank"] == 3  # all 32 lists probed, flat codes: exact
    assert (
        manifest["n"] == N
        and manifest["embeddings"] == json.loads((plain / MANIFEST).read_text())["embeddings"]
    )
    assert index_cli.main(["info", str(folder)]) == 0
    assert index_cli.main(["optimize", str(folder), "--faiss", "Nonsense", "--no-progress"]) == 2
    assert "Nonsense" in capsys.readouterr().err
    assert json.loads((folder / MANIFEST).read_text())["ann"] == printed  # a failed optimize leaves it alone


def test_optimize_never_widens_the_whole_table(plain: Path, tmp_path: Path, monkeypatch) -> None:
    folder = copy_of(plain, tmp_path)
    monkeypatch.setattr(ann_mod, "ADD_CHUNK_ROWS", 1000)
    tracemalloc.start()
    try:
        optimize_index(folder, "IVF16,Flat", train_sample=2000, num_queries=100, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < N * D * 4 / 2  # far below the fp32 table (5 MB): chunks and the sample only


def test_bad_factory_is_a_clear_error(plain: Path, tmp_path: Path) -> None:
    folder = copy_of(plain, tmp_path)
    with pytest.raises(ValueError, match="Nonsense"):
        optimize_index(folder, "Nonsense", progress=False)
    assert "ann" not in json.loads((folder / MANIFEST).read_text())


def test_rerank_rescores_exactly_and_raises_recall(plain: Path, ivfpq: Path, tmp_path: Path) -> None:
    folder = copy_of(plain, tmp_path)
    entry = optimize_index(folder, "IVF64,PQ16", train_sample=10_000, nprobe=8, rerank=10, progress=False)
    plain_entry = json.loads((ivfpq / MANIFEST).read_text())["ann"]
    assert entry["rerank"] == 10 and plain_entry["rerank"] == 0
    assert (
        entry["recall@10"] > plain_entry["recall@10"] + 0.2
    )  # PQ's coarse scores fixed by the exact re-score
    index = TileIndex.load(folder)
    assert index.backend.rerank == 10
    embeddings = np.load(folder / "embeddings.npy").astype(np.float32)
    q = queries(4, seed=9)
    scores, ids = index.backend.topk(torch.from_numpy(q), 10, None)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", embeddings[ids], q), atol=1e-4)  # exact scores
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # ranked best first
    assert TileIndex.load(folder, rerank=0).backend.rerank == 0  # a load option overrides the manifest


@pytest.mark.parametrize(
    "n,dim,factory,params,rerank",
    [
        (5_000, 576, "HNSW32", "efSearch=256", 0),
        (50_000, 576, "HNSW32", "efSearch=256", 0),  # the demo gallery's size
        (2_000_000, 1024, "HNSW32", "efSearch=256", 0),  # 8.2 GB of fp32 rows: the largest HNSW
        (3_000_000, 1024, "IVF2048,PQ64", "nprobe=256", 20),  # HNSW's rows would not fit: PQ + re-rank
        (10_000_000, 1024, "IVF4096,PQ64", "nprobe=512", 20),
        (10_000_000, 600, "IVF4096,PQ30", "nprobe=512", 20),  # PQ's m: the largest <= D/16 dividing D
    ],
)
def test_default_ann_choice_by_size(n: int, dim: int, factory: str, params: str, rerank: int) -> None:
    choice = ann_mod.default_ann(n, dim)
    assert (choice.factory, choice.params, choice.rerank) == (factory, params, rerank)
    assert choice.rule  # recorded in the manifest


def test_ivf_lists_leave_faiss_enough_training_points() -> None:
    for n in (100, 1_000, 20_000, 123_457, 10_000_000):
        lists = ann_mod.ivf_lists(n)
        assert lists & (lists - 1) == 0 and (lists * 39 <= n or lists == 1)


def test_optimize_without_factory_records_the_default_and_its_recall_holds_on_load(
    plain: Path, tmp_path: Path
) -> None:
    folder = copy_of(plain, tmp_path)
    entry = optimize_index(folder, num_queries=500, progress=False)
    chosen = ann_mod.default_ann(N, D)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["ann"] == entry and entry["default_rule"] == chosen.rule
    assert (entry["factory"], entry["params"], entry["rerank"]) == (
        chosen.factory,
        chosen.params,
        chosen.rerank,
    )
    assert entry["recall@10"] >= 0.95  # the rule's target, here on clustered vectors
    # Fresh noisy-row queries through the loaded index reproduce the recorded recall.
    index = TileIndex.load(folder)
    assert index.backend_name == "ann" and index.backend.params == chosen.params
    assert index.backend.rerank == chosen.rerank
    q = torch.from_numpy(ann_mod.recall_queries(np.load(folder / "embeddings.npy"), 500, seed=99))
    _, ann_ids = index.backend.topk(q, 10, None)
    _, exact_ids = TileIndex.load(folder, exact=True).backend.topk(q, 10, None)
    assert abs(recall_at_k(ann_ids, exact_ids) - entry["recall@10"]) < 0.03
    # Explicit knobs still win over the rule's.
    again = optimize_index(folder, ef_search=64, rerank=3, num_queries=100, progress=False)
    assert (again["factory"], again["params"], again["rerank"]) == (chosen.factory, "efSearch=64", 3)


def test_optimize_cli_without_factory_uses_the_default(plain: Path, tmp_path: Path, capsys) -> None:
    folder = copy_of(plain, tmp_path)
    assert index_cli.main(["optimize", str(folder), "--recall-queries", "200", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    chosen = ann_mod.default_ann(N, D)
    assert json.loads((folder / MANIFEST).read_text())["ann"] == printed
    assert (printed["factory"], printed["params"], printed["rerank"]) == (
        chosen.factory,
        chosen.params,
        chosen.rerank,
    )
    assert printed["default_rule"] == chosen.rule
