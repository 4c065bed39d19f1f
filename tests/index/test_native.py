"""The native scan kernels: exact against numpy, built once into the cache atomically, optional where they cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retriever.index import native
from retriever.index.backends import native_topk

needs_kernels = pytest.mark.skipif(not native.available(), reason="the kernels need x86 AVX2/FMA/F16C and cc")


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An empty cache and a forgotten library: the next native.library() call builds it again."""
    monkeypatch.setenv("GEOTEXT_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@needs_kernels
@pytest.mark.parametrize("n", [1, 3, 4, 7, 1001])  # ranges shorter than the threads, and uneven ones
@pytest.mark.parametrize("dim", [8, 13, 40, 1024])  # 13: no 8-wide path at all
@pytest.mark.parametrize("num_q", [1, 2, 5])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fp16_scores_equal_a_float64_product(n: int, dim: int, num_q: int, threads: int) -> None:
    table = unit_rows(n, dim)
    qs = np.random.default_rng(1).standard_normal((num_q, dim)).astype(np.float32)
    got = native.RowScan(table, threads).scores(qs)  # (Q, N)
    want = qs.astype(np.float64) @ table.astype(np.float64).T
    assert got.shape == (num_q, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(dim))


@needs_kernels
def test_equal_rows_score_equal_whichever_path_reads_them() -> None:
    """Rows 0 and 6, equal but at the ends of the table (first and last row read), score exactly the same."""
    table = unit_rows(7, 64)
    table[6] = table[0]
    scores = native.RowScan(table, 1).scores(
        np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    )
    assert np.array_equal(scores[:, 0], scores[:, 6])


@needs_kernels
@pytest.mark.parametrize("dim", [7, 32, 40, 1024])
@pytest.mark.parametrize("num_q", [1, 3, 17])
@pytest.mark.parametrize("n", [5, 333])
def test_uint8_scores_are_exact_and_never_saturate(dim: int, num_q: int, n: int) -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (n, dim), dtype=np.uint8)
    codes[0] = 255  # the largest int16 pair sums maddubs can meet: 2 x 255 x 64
    q8 = rng.integers(-64, 65, (num_q, dim)).astype(np.int8)
    q8[0] = 64
    got = native.RowScan(codes, 2).scores(q8)
    want = q8.astype(np.int64) @ codes.astype(np.int64).T  # (Q, N)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert got[0, 0] == 255 * 64 * dim


def test_sq8_queries_use_the_full_range_and_do_not_depend_on_the_query_scale() -> None:
    rng = np.random.default_rng(4)
    qs = rng.standard_normal((6, 48)).astype(np.float32)
    scale = rng.uniform(1e-4, 1e-2, 48).astype(np.float32)
    q8 = native.quantize_sq8_queries(qs, scale)
    assert q8.dtype == np.int8 and np.abs(q8).max(axis=1).tolist() == [64] * 6
    for factor in (1e-4, 1e4):
        assert np.array_equal(native.quantize_sq8_queries(qs * factor, scale), q8)
    assert not native.quantize_sq8_queries(np.zeros((1, 48), np.float32), scale).any()  # no division by zero


@needs_kernels
@pytest.mark.parametrize("k", [0, 1, 10, 600, 5000])  # 600: more than one range's rows; 5000 > N
@pytest.mark.parametrize("restrict", [False, True])
def test_native_topk_equals_a_stable_argsort_with_ties(k: int, restrict: bool) -> None:
    base = unit_rows(50, 32)
    table = base[np.random.default_rng(5).integers(50, size=1500)]  # every score is tied ~30 times
    qs = np.random.default_rng(6).standard_normal((2, 32)).astype(np.float32)
    rows = np.sort(np.random.default_rng(7).choice(1500, 400, replace=False)) if restrict else None
    scan = native.RowScan(table, 3)
    scores, ids = native_topk(scan, qs, k, rows)
    full = scan.scores(qs)  # (Q, N) the same kernel: ties are exact
    allowed = np.arange(1500) if rows is None else rows
    order = np.argsort(-full[:, allowed], axis=1, kind="stable")[:, :k]
    assert np.array_equal(ids, allowed[order])
    assert np.array_equal(scores, np.take_along_axis(full[:, allowed], order, 1))


@needs_kernels
def test_a_memory_map_is_read_in_place(tmp_path: Path) -> None:
    path = tmp_path / "table.npy"
    np.save(path, unit_rows(100, 16))
    table = np.load(path, mmap_mode="r")
    scan = native.RowScan(table, 2)
    assert np.shares_memory(scan.table, table)
    assert np.allclose(
        scan.scores(np.ones((1, 16), np.float32))[0], table.astype(np.float32).sum(1), atol=1e-5
    )
    for bad in (np.zeros((4, 8), np.float32), unit_rows(8, 16)[:, ::2], np.zeros((0, 8), np.float16)):
        with pytest.raises(ValueError, match="non-empty C-contiguous fp16 or uint8"):
            native.RowScan(bad, 1)


@needs_kernels
def test_the_library_is_built_once_into_the_cache_atomically(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert native.library() is not None
    built = list((fresh_library / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
    native.library.cache_clear()

    def no_rebuild(compiler: str, target: Path) -> None:
        raise AssertionError("rebuilt although the cache holds this build")

    monkeypatch.setattr(native, "_build", no_rebuild)
    assert native.library() is not None


def test_without_a_compiler_or_when_disabled_search_falls_back(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOTEXT_NATIVE", "0")
    assert not native.available()
    native.library.cache_clear()
    monkeypatch.delenv("GEOTEXT_NATIVE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert not native.available()
    with pytest.raises(RuntimeError, match="not available"):
        native.RowScan(unit_rows(4, 8), 1)


@pytest.mark.skipif(
    not native._cpu_has_flags(), reason="only a CPU that could run the kernels tries to build them"
)
def test_a_failing_compiler_warns_and_leaves_nothing_behind(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    with pytest.warns(UserWarning, match="could not be built"):
        assert native.library() is None
    assert not any((fresh_library / "native").glob("*"))  # no half-written library
