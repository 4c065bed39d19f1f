"""Threaded exact search and the SQ8 compressed mode return exactly what brute force returns, ties included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import retriever.index.__main__ as index_cli  # noqa: E402
from retriever.errors import CorruptIndexError  # noqa: E402
from retriever.index import (  # noqa: E402
    MANIFEST,
    TileIndex,
    build_index,
    native,  # noqa: E402
    recall_at_k,
)
from retriever.index.ann import recall_queries  # noqa: E402
from retriever.index.backends import (  # noqa: E402
    SQ8_SCAN_RUNS,
    SQ8_SCANS,
    ExactSearch,
    Int8GemmScan,
    NativeScan,
    Sq8Search,
    ThreadedScan,
    default_sq8_scan,
    int8_gemm_available,
    sq8_from_table,
)
from retriever.index.layout import SQ8_FILE, SQ8_PARAMS_FILE  # noqa: E402
from tests.index.test_index import TableRetriever, random_gallery  # noqa: E402

N, D = 3000, 32
CPU = torch.device("cpu")


def brute_force(
    table: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by a stable argsort of -scores: ties go to the lower row. One torch product: equal rows score equal."""
    rows = np.arange(len(table)) if rows is None else rows
    scores = (
        torch.from_numpy(queries) @ torch.from_numpy(table[rows].astype(np.float32)).T
    ).numpy()  # (Q, R)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), rows[order]


def with_duplicates(n: int = N, dim: int = D, distinct: int = 400, seed: int = 0) -> np.ndarray:
    """(n, dim) fp16 unit rows drawn from `distinct` rows: every query meets many exact ties."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((distinct, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    return base[rng.integers(distinct, size=n)].astype(np.float16)


def clustered(n: int = N, dim: int = D, clusters: int = 30, seed: int = 0) -> np.ndarray:
    """(n, dim) fp16 unit rows around random centres (real galleries are clustered)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def queries(q: int, dim: int = D, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((q, dim)).astype(np.float32)


SMALL_BATCH_SCANS = [
    "faiss",
    *(["native"] if native.available() else []),
]  # native: x86 AVX2 and a C compiler


@pytest.mark.parametrize("num_q", [1, 3, 32, 64])  # 32: the native scan's largest batch; 64: the GEMM
@pytest.mark.parametrize("k", [1, 10, 1000, N + 5])  # 1000 and N + 5: more than the rows of one thread
@pytest.mark.parametrize("threads", [1, 2, 7])
@pytest.mark.parametrize("kernel", SMALL_BATCH_SCANS)
def test_threaded_exact_equals_brute_force_with_ties(
    num_q: int, k: int, threads: int, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel == "faiss":
        monkeypatch.setattr(native, "available", lambda: False)
    table = with_duplicates()
    qs = queries(num_q)
    search = ExactSearch(table, CPU, threads=threads)
    assert isinstance(search.threaded, {"faiss": ThreadedScan, "native": NativeScan}[kernel])
    assert len(search.threaded.ranges) == threads
    rows = np.sort(np.random.default_rng(2).choice(N, 1200, replace=False))  # a spatial filter's rows
    for restrict in (None, rows):
        want_s, want_i = brute_force(table, qs, k, restrict)
        got_s, got_i = search.topk(torch.from_numpy(qs), k, restrict)
        assert np.array_equal(got_i, want_i)
        assert np.allclose(got_s, want_s, atol=1e-4)


@pytest.mark.parametrize("kernel", SMALL_BATCH_SCANS)
def test_batches_up_to_the_scans_limit_go_to_the_scan(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native scan takes batches of up to 32 queries (measured faster than the GEMM), faiss up to 2."""
    if kernel == "faiss":
        monkeypatch.setattr(native, "available", lambda: False)
    search = ExactSearch(with_duplicates(), CPU, threads=2)
    limit = {"faiss": 2, "native": 32}[kernel]
    assert search.threaded is not None and search.threaded.max_queries == limit
    calls: list[int] = []
    scan_search = search.threaded.search
    monkeypatch.setattr(
        search.threaded, "search", lambda q, k, rows: calls.append(len(q)) or scan_search(q, k, rows)
    )
    for num_q in (1, limit, limit + 1):
        search.topk(torch.from_numpy(queries(num_q)), 5, None)
    assert calls == [1, limit]


def test_threaded_scan_reads_the_table_in_place() -> None:
    table = with_duplicates()
    scan = ThreadedScan(table, threads=3)
    assert [b - a for a, b in scan.ranges] == [1000, 1000, 1000]
    assert all(not view.codes.is_owned for view in scan.views)  # faiss reads the array's own memory


SCANS = [name for name in SQ8_SCANS if SQ8_SCAN_RUNS[name]()]


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("num_q", [1, 2, 70])
def test_sq8_rerank_returns_the_exact_top_k(num_q: int, scan: str) -> None:
    table = clustered()
    search = Sq8Search(table, CPU, sq8_from_table(table), rerank_factor=10, threads=2, scan=scan)
    assert search.scan_name == scan
    for seed in range(20):
        qs = queries(num_q, seed=seed)
        want_s, want_i = brute_force(table, qs, 10)
        got_s, got_i = search.topk(torch.from_numpy(qs), 10, None)
        assert np.array_equal(got_i, want_i)
        assert np.allclose(got_s, want_s, atol=1e-4)


@pytest.mark.parametrize("scan", SCANS)
def test_sq8_with_ties_and_large_k_equals_brute_force(scan: str) -> None:
    table = with_duplicates()
    search = Sq8Search(table, CPU, sq8_from_table(table), rerank_factor=N, threads=2, scan=scan)  # kR >= N
    qs = queries(1)
    for k in (1, 10, 700):
        assert np.array_equal(search.topk(torch.from_numpy(qs), k, None)[1], brute_force(table, qs, k)[1])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    """An fp16 index of clustered rows with SQ8 codes written by `optimize --sq8`."""
    tiles, _ = random_gallery(N, D)
    vectors = dict(zip(tiles["tile_id"], clustered().astype(np.float32), strict=True))
    out = tmp_path_factory.mktemp("sq8") / "index"
    build_index(TableRetriever(vectors), tiles, out, shard_size=1000, thumbnail_px=0, progress=False)
    assert (
        index_cli.main(["optimize", str(out), "--sq8", "--rerank-factor", "10", "--recall-queries", "200"])
        == 0
    )
    return out


def test_sq8_is_recorded_in_the_manifest_and_used_on_load(compressed: Path) -> None:
    entry = json.loads((compressed / MANIFEST).read_text())["sq8"]
    assert entry["file"] == SQ8_FILE and entry["params_file"] == SQ8_PARAMS_FILE
    assert entry["rerank_factor"] == 10 and entry["recall_queries"] == 200
    assert entry["same_top10"] >= 0.995 and entry["recall@10"] >= 0.999
    assert entry["bytes"] == (compressed / SQ8_FILE).stat().st_size
    index = TileIndex.load(compressed)
    assert index.backend_name == "sq8" and isinstance(index.backend, Sq8Search)
    assert entry["scan"] == index.backend.scan_name == default_sq8_scan()  # measured and loaded alike
    assert isinstance(index.backend.sq8.codes, np.memmap)
    stored = np.load(compressed / "embeddings.npy")
    qs = queries(1, seed=9)
    want_s, want_i = brute_force(stored, qs, 10)
    hits = index.search(qs, 10)[0]
    assert [h.tile_id for h in hits] == [f"t{i:05d}" for i in want_i[0]]
    # The recall recorded at build time is what a load reproduces on the same kind of queries.
    rq = recall_queries(stored, 200, seed=1)
    _, sq8_ids = index.backend.compressed_topk(rq, 10)
    _, exact_ids = TileIndex.load(compressed, exact=True).backend.topk(torch.from_numpy(rq), 10, None)
    assert recall_at_k(sq8_ids, exact_ids) == pytest.approx(entry["recall@10"], abs=1e-4)


def test_exact_true_bypasses_sq8(compressed: Path) -> None:
    index = TileIndex.load(compressed, exact=True)
    assert index.backend_name == "torch" and isinstance(index.backend, ExactSearch)
    with pytest.raises(ValueError, match="exact"):
        TileIndex.load(compressed, backend="sq8", exact=True)


def test_sq8_keeps_spatial_filters_exact(compressed: Path) -> None:
    index = TileIndex.load(compressed)
    stored = np.load(compressed / "embeddings.npy")
    area = "60.15,24.95,2500"
    mask = index.rows_within(area)
    qs = queries(1, seed=4)
    want_s, want_i = brute_force(stored, qs, 10, mask)
    hits = index.search(qs, 10, within=area)[0]
    assert [int(h.tile_id[1:]) for h in hits] == want_i[0].tolist()


@pytest.mark.parametrize("name", [SQ8_FILE, SQ8_PARAMS_FILE])
def test_a_truncated_sq8_file_is_refused_by_name(compressed: Path, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "index"
    shutil.copytree(compressed, folder)
    path = folder / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptIndexError, match=rf"{name}.*truncated.*optimize INDEX --sq8"):
        TileIndex.load(folder)
    assert TileIndex.load(folder, exact=True).backend_name == "torch"  # exact search does not read them


@pytest.mark.skipif(not int8_gemm_available(), reason="fbgemm's int8 GEMM is x86-only")
def test_int8_gemm_blocks_merge_like_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-block top lists merge into the one-block answer (the query is quantized the same way)."""
    codes = sq8_from_table(clustered())
    qs = queries(5)
    whole = Int8GemmScan(codes).search(qs, 50)
    monkeypatch.setattr(Int8GemmScan, "block_rows", 700)
    blocked = Int8GemmScan(codes)
    assert len(blocked.blocks) == 5  # 3000 rows: 4 x 700 + 200
    parts = blocked.search(qs, 50)
    np.testing.assert_array_equal(parts[0], whole[0])
    for got, want, scores in zip(parts[1], whole[1], whole[0], strict=True):
        distinct = np.unique(scores, return_counts=True)[1] == 1  # untied scores: the same row
        single = np.isin(scores, np.unique(scores)[distinct])
        np.testing.assert_array_equal(got[single], want[single])
        assert set(got) <= set(range(N))


@pytest.mark.skipif(not int8_gemm_available(), reason="fbgemm's int8 GEMM is x86-only")
def test_int8_gemm_scores_rank_like_the_decoded_codes() -> None:
    """(q * scale) . (code - 128) differs from q . decoded row by a constant per query, up to 7-bit rounding."""
    table = clustered()
    codes = sq8_from_table(table)
    qs = queries(3)
    scores, ids, _ = Int8GemmScan(codes).search(qs, N)
    decoded = codes.offset + codes.scale * codes.codes.astype(np.float32)  # (N, D)
    for q, s, i in zip(qs, scores, ids, strict=True):
        want = decoded[i] @ q  # (N,)
        assert np.corrcoef(s, want)[0, 1] > 0.999


@pytest.mark.skipif(not int8_gemm_available(), reason="fbgemm's int8 GEMM is x86-only")
def test_int8_gemm_candidates_do_not_depend_on_the_query_scale() -> None:
    """A query and the same query times 1e-4 or 1e4 rank rows alike: each row is brought to full 7-bit range."""
    codes = sq8_from_table(clustered())
    scan = Int8GemmScan(codes)
    qs = queries(4)
    _, want, _ = scan.search(qs, 30)
    for factor in (1e-4, 1e4):
        np.testing.assert_array_equal(scan.search(qs * factor, 30)[1], want)


@pytest.mark.skipif(not int8_gemm_available(), reason="fbgemm's int8 GEMM is x86-only")
def test_int8_gemm_rerank_is_exact_on_uniform_rows() -> None:
    """Uniform unit rows (no cluster structure: the hard case) at 1,024 dimensions, whose per-dimension scaled
    queries are tiny: 2 x k int8 candidates, re-ranked, give brute force's top-10 for nearly every query."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((20_000, 1024)).astype(np.float32)
    table = (table / np.linalg.norm(table, axis=1, keepdims=True)).astype(np.float16)
    search = Sq8Search(table, CPU, sq8_from_table(table), rerank_factor=2, threads=2, scan="int8-gemm")
    qs = rng.standard_normal((40, 1024)).astype(np.float32)
    _, want = brute_force(table, qs, 10)
    _, got = search.topk(torch.from_numpy(qs), 10, None)
    same = np.mean([set(g) == set(w) for g, w in zip(got, want, strict=True)])
    assert same >= 0.95


@pytest.mark.skipif(not int8_gemm_available(), reason="fbgemm's int8 GEMM is x86-only")
def test_the_int8_gemm_scan_is_recorded_and_used_on_load(compressed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "index"
    shutil.copytree(compressed, folder)
    index_cli.main(["optimize", str(folder), "--sq8", "--sq8-scan", "int8-gemm", "--recall-queries", "100"])
    entry = json.loads((folder / MANIFEST).read_text())["sq8"]
    index = TileIndex.load(folder)
    assert entry["scan"] == index.backend.scan_name == "int8-gemm"
    rq = recall_queries(np.load(folder / "embeddings.npy"), 100, seed=1)
    _, exact_ids = TileIndex.load(folder, exact=True).backend.topk(torch.from_numpy(rq), 10, None)
    _, ids = index.backend.compressed_topk(rq, 10)
    assert recall_at_k(ids, exact_ids) == pytest.approx(entry["recall@10"], abs=1e-4)  # reproduced on load


def test_the_default_sq8_scan_is_native_then_int8_gemm_while_its_packed_copy_is_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from retriever.index.backends import INT8_GEMM_MAX_BYTES

    if native.available():  # zero-copy at any size
        assert default_sq8_scan(1_000_000) == default_sq8_scan(INT8_GEMM_MAX_BYTES + 1) == "native"
        assert Sq8Search(clustered(), CPU, sq8_from_table(clustered()), threads=2).scan_name == "native"
    monkeypatch.setattr(native, "available", lambda: False)
    small = "int8-gemm" if int8_gemm_available() else "faiss"
    assert default_sq8_scan(1_000_000) == default_sq8_scan() == small
    assert default_sq8_scan(INT8_GEMM_MAX_BYTES + 1) == "faiss"  # e.g. 10M x 1,024: no 10 GB copy in RAM
    search = Sq8Search(clustered(), CPU, sq8_from_table(clustered()), rerank_factor=10, threads=2)
    assert search.scan_name == small


def test_a_scan_that_cannot_run_here_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """An index whose manifest names the native scan still loads where no compiler or AVX2 exists."""
    monkeypatch.setattr(native, "available", lambda: False)
    table = clustered()
    with pytest.warns(UserWarning, match="'native' SQ8 scan cannot run"):
        search = Sq8Search(table, CPU, sq8_from_table(table), rerank_factor=10, threads=2, scan="native")
    assert search.scan_name == default_sq8_scan()
    qs = queries(1)
    assert np.array_equal(search.topk(torch.from_numpy(qs), 10, None)[1], brute_force(table, qs, 10)[1])
