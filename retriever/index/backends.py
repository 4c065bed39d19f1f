"""Search backends over the embedding table: exact (torch, native or faiss scans in place), SQ8, faiss, ANN."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever._io import lazy_import
from retriever.errors import CorruptIndexError
from retriever.index import native
from retriever.index.layout import check_npy


def import_faiss() -> Any:
    """faiss, or MissingDependencyError with the install line."""
    return lazy_import("faiss", pip="faiss-cpu", purpose="the faiss backend")


def _ordered(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values, positions (Q, k) reordered by value descending, then position (a stable sort on sorted ids)."""
    by_position = torch.sort(positions, dim=1).indices
    values, positions = torch.gather(values, 1, by_position), torch.gather(positions, 1, by_position)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return torch.gather(values, 1, by_value), torch.gather(positions, 1, by_value)


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of scores (Q, B), ties going to the lower position (torch.topk breaks ties
    arbitrarily); returns values and positions (Q, k), ordered by score descending, then position.

    torch.topk of k + 1 settles the set unless the (k + 1)-th value equals the k-th; only then (exact
    duplicates) are the tied rows counted in order over the whole row.
    """
    k = min(k, scores.shape[1])
    values, positions = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)  # (Q, k + 1) sorted
    if values.shape[1] > k and bool((values[:, k] == values[:, k - 1]).any()):  # a tie across the cut
        kth = values[:, k - 1 : k]  # (Q, 1)
        above, at = scores > kth, scores == kth  # (Q, B)
        at &= torch.cumsum(at, dim=1, dtype=torch.int32) <= k - above.sum(dim=1, keepdim=True)
        positions = (above | at).nonzero()[:, 1].view(-1, k)  # (Q, k) ascending per query
        return _ordered(torch.gather(scores, 1, positions), positions)
    return _ordered(values[:, :k], positions[:, :k])


def exact_topk(
    table: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    rows: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    block_rows: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of queries (Q, D) with table rows (N, D); returns scores, row ids (Q, k).

    Ties rank the lower row first (a stable argsort of -scores). The table is read in chunks small enough
    to stay in cache: fp16 rows are widened to fp32 into a reused buffer, multiplied, and a running top-k
    is kept per block, so memory stays O(block x Q) and the bytes read per query are the stored ones (half
    of fp32 for fp16). rows restricts the scan.
    """
    n = table.shape[0] if rows is None else rows.numel()
    k = min(k, n)
    num_q, dim = queries.shape
    device = table.device
    if chunk_rows is None:  # tuned in benchmarks/bench_search.py: cache-sized for matvec, larger for GEMM
        chunk_rows = (512 if num_q <= 8 else 4096) if device.type == "cpu" else 1 << 16
    block_rows = max(block_rows, chunk_rows)
    widen = table.dtype != torch.float32
    q_t = queries.to(device=device, dtype=torch.float32).T.contiguous()  # (D, Q)
    f32 = (
        torch.empty((chunk_rows, dim), dtype=torch.float32, device=device)
        if widen or rows is not None
        else None
    )
    picked = (
        torch.empty((chunk_rows, dim), dtype=table.dtype, device=device)
        if widen and rows is not None
        else None
    )
    scores = torch.empty((min(block_rows, n), num_q), dtype=torch.float32, device=device)  # (B, Q)
    best_s = best_i = None
    for b0 in range(0, n, block_rows):
        b1 = min(b0 + block_rows, n)
        for c0 in range(b0, b1, chunk_rows):
            c1 = min(c0 + chunk_rows, b1)
            x = (
                table[c0:c1]
                if rows is None
                else torch.index_select(table, 0, rows[c0:c1], out=(picked if widen else f32)[: c1 - c0])
            )
            if widen:
                x = f32[: c1 - c0].copy_(x)  # (C, D) fp32, still in cache for the product
            if num_q == 1:  # GEMV: torch.mm with one column takes a much slower path on CPU
                torch.mv(x, q_t[:, 0], out=scores[c0 - b0 : c1 - b0, 0])
            else:
                torch.mm(x, q_t, out=scores[c0 - b0 : c1 - b0])
        s, i = select_topk(scores[: b1 - b0].T.contiguous(), k)  # (Q, k'): a row per query is fast
        i += b0
        if best_s is not None:  # earlier blocks first: among equal scores, position order is row order
            s, j = select_topk(torch.cat([best_s, s], dim=1), k)
            i = torch.gather(torch.cat([best_i, i], dim=1), 1, j)
        best_s, best_i = s, i
    if rows is not None:
        best_i = rows[best_i]
    return best_s, best_i


def _as_tensor(embeddings: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memmap: torch warns, but the table is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(embeddings)


def _zero_copy(index: Any, table: np.ndarray) -> Any:
    """index with table's rows as its codes (zero copy), or None when this faiss cannot view memory."""
    import faiss

    codes = table.reshape(-1).view(np.uint8)
    try:  # a non-owning MaybeOwnedVector (faiss >= 1.10), the same mechanism as faiss's own mmap loading
        view = faiss.MaybeOwnedVectorUInt8()
        pointer = faiss.swig_ptr(codes)
        view.is_owned, view.view_data, view.view_size = False, pointer, codes.size
        view.c_ptr, view.c_size = pointer, codes.size
        index.codes = view
    except (AttributeError, TypeError):
        return None
    index.ntotal = len(table)
    index.referenced_objects = [table]  # the codes point into this array: keep it alive
    return index


def faiss_view(embeddings: np.ndarray) -> Any:
    """A faiss flat index whose codes are the embeddings' own memory (zero copy), or None without faiss.

    fp16 rows are exactly faiss's "SQfp16" codes and fp32 rows IndexFlatIP's, so the scan is exact. faiss
    scans one query on one thread at memory speed; ThreadedScan runs one such view per row range.
    """
    try:
        import faiss
    except ImportError:
        return None
    n, dim = embeddings.shape
    flat = {
        np.dtype(np.float16): lambda: faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        ),
        np.dtype(np.float32): lambda: faiss.IndexFlatIP(dim),
    }
    if embeddings.dtype not in flat or not embeddings.flags.c_contiguous:
        return None
    return _zero_copy(flat[embeddings.dtype](), embeddings)


def default_threads() -> int:
    """Threads for the threaded scans: torch's intra-op thread count (all cores unless limited)."""
    return max(1, torch.get_num_threads())


def _one_omp_thread() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # per thread: each scan thread runs its own query loop, no nested team


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates per query from scores, ids (Q, C): by score descending, then lower id (ties)."""
    valid = ids >= 0
    key = np.where(valid, -scores, np.inf)  # faiss pads with id -1: last
    order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), key), axis=1)[:, :k]  # (Q, k)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class ThreadedScan:
    """Top-k over a zero-copy faiss view per row range, one range per thread (faiss drops the GIL).

    Each range keeps its own top k + 1 and the ranges' lists are merged by score, then row. faiss picks
    arbitrarily among rows tied at its cut, so search also says which queries may have lost a tied row: those
    where some range's (k + 1)-th score reaches the merged k-th. Callers rescan those exactly (only exact
    duplicates ever tie); every other query equals a stable argsort of -scores over the whole table.
    """

    max_queries = 2  # above this, one GEMM pass over the table beats a faiss pass per query

    def __init__(
        self,
        table: np.ndarray,
        threads: int | None = None,
        view: Callable[[np.ndarray], Any] = faiss_view,
    ) -> None:
        n = len(table)
        self.ranges = native.row_ranges(n, threads or default_threads())
        self.views = [view(table[a:b]) for a, b in self.ranges]  # zero-copy faiss indexes, one per range
        self.ok = all(v is not None for v in self.views)
        self.n = n
        self._pool: ThreadPoolExecutor | None = None

    def _map(self, fn: Callable[[int], Any]) -> list[Any]:
        if len(self.ranges) == 1:
            return [fn(0)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.ranges), "scan", initializer=_one_omp_thread)
        return list(self._pool.map(fn, range(len(self.ranges))))

    def search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """scores, ids (Q, k) of queries (Q, D) fp32, and tied (Q,): a row tied at the cut may be missing.

        rows (sorted ids) restricts the scan by a bitmap.
        """
        import faiss

        k = min(k, self.n if rows is None else len(rows))
        mask = None
        if rows is not None:
            mask = np.zeros(self.n, dtype=bool)
            mask[rows] = True

        def one(part: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a, b = self.ranges[part]
            candidates = b - a if mask is None else int(mask[a:b].sum())
            kk = min(k + 1, candidates)
            if kk == 0:
                return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64), None
            if mask is None:
                s, i = self.views[part].search(queries, kk)
            else:
                bits = np.packbits(mask[a:b], bitorder="little")  # faiss: bit i is bits[i >> 3] >> (i & 7)
                selector = faiss.IDSelectorBitmap(b - a, faiss.swig_ptr(bits))
                s, i = self.views[part].search(queries, kk, params=faiss.SearchParameters(sel=selector))
            cut = s[:, -1] if kk < candidates else None  # (Q,) this range's worst kept score: rows below it
            return s, np.where(i >= 0, i + a, -1), cut  # (Q, kk) local ids -> table rows

        parts = self._map(one)
        scores = np.concatenate([s for s, _, _ in parts], axis=1)  # (Q, sum kk)
        ids = np.concatenate([i for _, i, _ in parts], axis=1)
        scores, ids = merge_topk(scores, ids, k)  # (Q, k)
        kth = scores[:, -1] if k else np.full(len(queries), np.inf, dtype=np.float32)
        tied = np.zeros(len(queries), dtype=bool)
        for _, _, cut in parts:
            if cut is not None:
                tied |= cut >= kth  # a row this range did not return may score as high as the k-th
        return scores, ids, tied

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def native_topk(
    scan: native.RowScan, queries: np.ndarray, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k scores, ids (Q, k) of a native scan, ties going to the lower row. Each thread keeps its range's
    best k in a heap and the lists merge by score, then row; rows (sorted ids) restricts the answer to them."""
    k = min(k, scan.table.shape[0] if rows is None else len(rows))
    if k == 0:
        return np.empty((len(queries), 0), scan.score_dtype), np.empty((len(queries), 0), np.int64)
    if rows is None:
        scores, ids = scan.top(queries, k)  # (Q, T * k)
        top, picked = merge_topk(scores, ids, k)
        return top.astype(scan.score_dtype), picked
    wanted = np.asarray(rows, dtype=np.int64)
    allowed = torch.from_numpy(scan.scores(queries))[:, torch.from_numpy(wanted)]  # (Q, R)
    top, positions = select_topk(allowed, k)  # (Q, k)
    return top.numpy(), wanted[positions.numpy()]


class NativeScan:
    """Exact top-k of a few queries over an fp16 table in place by the native kernel (native.RowScan): every row
    scored at memory speed, one row range per thread, each keeping its best k in a heap (ties: the lower row),
    so no query is ever tied at the cut. The same interface as ThreadedScan."""

    # Measured at 1M x 1,024 (2 cores): 123 / 219 / 429 / 698 / 1,810 ms for 1 / 3 / 8 / 16 / 32 queries against
    # 1.0-1.8 s for the chunked torch GEMM, which wins from about 64 queries on.
    max_queries = 32

    def __init__(self, table: np.ndarray, threads: int | None = None) -> None:
        self.scan = native.RowScan(table, threads or default_threads())
        self.ranges = self.scan.ranges

    def search(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """scores, ids (Q, k) of queries (Q, D) fp32, and tied (Q,), always False; rows (sorted ids) restricts."""
        scores, ids = native_topk(self.scan, queries, k, rows)
        return scores, ids, np.zeros(len(queries), dtype=bool)

    def close(self) -> None:
        self.scan.close()


def small_batch_scan(embeddings: np.ndarray, threads: int | None) -> NativeScan | ThreadedScan | None:
    """The exact scan for batches of a few queries on CPU: the native kernel for C-contiguous fp16 tables where
    it runs, else the threaded zero-copy faiss views; None when neither can read the table in place."""
    fits = embeddings.dtype == np.float16 and embeddings.flags.c_contiguous and len(embeddings) > 0
    if fits and native.available():
        return NativeScan(embeddings, threads)
    scan = ThreadedScan(embeddings, threads)
    return scan if scan.ok else None


class ExactSearch:
    """Exact top-K: small batches (the scan's max_queries) by a scan in place on CPU (native kernel, else threaded
    zero-copy faiss views), otherwise chunked torch products.

    On an accelerator the table is moved there once. On CPU it is read in place (a memory map works).
    threads (default torch.get_num_threads()) splits a small batch's scan by row ranges; 1 is one scan.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        device: torch.device,
        chunk_rows: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.table = _as_tensor(embeddings).to(device)  # (N, D); a no-op view on CPU
        self.device = device
        self.chunk_rows = chunk_rows
        # None: no native kernel and no faiss (or a table neither reads in place): torch does every batch
        self.threaded = small_batch_scan(embeddings, threads) if device.type == "cpu" else None

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = self.table.shape[0]
        # Few candidates: gather them (cost ~ candidates); many: scan all rows and skip the others (a bitmap).
        if (
            self.threaded is not None
            and len(queries) <= self.threaded.max_queries
            and (rows is None or len(rows) > n // 16)
        ):
            q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)  # (Q, D)
            scores, ids, tied = self.threaded.search(q, k, rows)
            if tied.any():  # exact duplicates at the cut: the torch scan settles the tie by row order
                scores[tied], ids[tied] = self._torch_topk(queries[torch.from_numpy(tied)], k, rows)
            return scores, ids
        return self._torch_topk(queries, k, rows)

    def _torch_topk(
        self, queries: torch.Tensor, k: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        row_ids = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        scores, ids = exact_topk(self.table, queries, k, row_ids, self.chunk_rows)
        return scores.cpu().numpy(), ids.cpu().numpy()


# --- SQ8: int8 codes scanned first, the best k x r re-ranked exactly ---------------------------------------


@dataclass
class Sq8Codes:
    """Per-dimension 8-bit codes of a table: row ~= offset + scale * code, codes (N, D) uint8 (memory-mapped).

    They are faiss "SQ8" codes with vmin = offset - scale / 2 and vdiff = 255 * scale (faiss decodes
    vmin + (code + 0.5) / 255 * vdiff), so faiss scans them in place.
    """

    codes: np.ndarray  # (N, D) uint8
    offset: np.ndarray  # (D,) fp32
    scale: np.ndarray  # (D,) fp32

    def view(self, codes: np.ndarray) -> Any:
        """A zero-copy faiss SQ8 index over some rows (R, D) of the codes, or None without faiss."""
        try:
            import faiss
        except ImportError:
            return None
        dim = codes.shape[1]
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        trained = np.concatenate([self.offset - self.scale / 2, 255.0 * self.scale]).astype(np.float32)
        faiss.copy_array_to_vector(trained, index.sq.trained)  # (2D,) vmin, vdiff
        index.is_trained = True
        return _zero_copy(index, codes)


def sq8_params(embeddings: np.ndarray, chunk_rows: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension offset (the minimum) and scale ((max - min) / 255) over every row: (D,), (D,) fp32."""
    lo = np.full(embeddings.shape[1], np.inf, dtype=np.float32)
    hi = np.full(embeddings.shape[1], -np.inf, dtype=np.float32)
    for start in range(0, len(embeddings), chunk_rows):
        chunk = np.asarray(embeddings[start : start + chunk_rows], dtype=np.float32)  # (C, D)
        lo, hi = np.minimum(lo, chunk.min(axis=0)), np.maximum(hi, chunk.max(axis=0))
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    return lo, scale


def sq8_encode(
    embeddings: np.ndarray, offset: np.ndarray, scale: np.ndarray, out: np.ndarray, chunk_rows: int = 1 << 16
) -> np.ndarray:
    """Write the codes round((row - offset) / scale) of every row into out (N, D) uint8, chunk by chunk."""
    for start in range(0, len(embeddings), chunk_rows):
        chunk = np.asarray(embeddings[start : start + chunk_rows], dtype=np.float32)  # (C, D)
        out[start : start + len(chunk)] = np.clip(np.rint((chunk - offset) / scale), 0, 255).astype(np.uint8)
    return out


def sq8_from_table(embeddings: np.ndarray) -> Sq8Codes:
    """SQ8 codes of a table in memory (for benchmarks and tests; `optimize --sq8` writes them to the index)."""
    offset, scale = sq8_params(embeddings)
    codes = sq8_encode(embeddings, offset, scale, np.empty(embeddings.shape, dtype=np.uint8))
    return Sq8Codes(codes, offset, scale)


def load_sq8(codes_path: Path, params_path: Path, n: int, dim: int) -> Sq8Codes:
    """The checked SQ8 files of an index: codes (N, D) uint8 memory-mapped, and their (2, D) offset/scale."""
    fix = "rerun `python -m retriever.index optimize INDEX --sq8`"
    check_npy(codes_path, (n, dim), np.dtype(np.uint8), fix)
    check_npy(params_path, (2, dim), np.dtype(np.float32), fix)
    params = np.load(params_path)
    return Sq8Codes(np.load(codes_path, mmap_mode="r"), params[0], params[1])


def rerank_exact(
    embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of the candidate rows (Q, C) against queries (Q, D), read once in row order; top-k by
    score, then row (ties), as scores, ids (Q, k)."""
    wanted = np.unique(candidates[candidates >= 0])  # sorted: one ordered pass over the memory map
    by_row = np.empty((len(wanted), len(queries)), dtype=np.float32)  # (U, Q): every query, every candidate
    for lo in range(0, len(wanted), 4096):  # fp32 rows a slice at a time: a batch's candidates stay small
        by_row[lo : lo + 4096] = np.asarray(embeddings[wanted[lo : lo + 4096]], dtype=np.float32) @ queries.T
    where = np.searchsorted(wanted, np.maximum(candidates, 0))  # (Q, C) into by_row
    exact = by_row[where, np.arange(len(queries))[:, None]]  # (Q, C)
    ids = np.where(candidates >= 0, candidates, -1)
    return merge_topk(exact.astype(np.float32), ids, k)


def int8_gemm_available() -> bool:
    """Whether this torch has fbgemm's int8 GEMM (x86 with AVX2): the dynamic-quantized linear ops."""
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_dynamic"
        )
    except (AttributeError, RuntimeError):
        return False


class FaissSq8Scan:
    """The SQ8 candidate scan by zero-copy faiss SQ8 views per row range (a float query; no copy, no packing)."""

    def __init__(self, codes: Sq8Codes, threads: int | None = None, progress: bool | None = None) -> None:
        self.scan = ThreadedScan(codes.codes, threads, view=codes.view)
        if not self.scan.ok:
            import_faiss()  # the usual reason a view fails: name the install
            raise RuntimeError(
                f"faiss {import_faiss().__version__} cannot scan memory in place; pip install 'faiss-cpu>=1.10'"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate scores, ids (Q, k) of queries (Q, D) fp32, and tied (Q,) at the cut."""
        return self.scan.search(queries, k)


class Int8GemmScan:
    """The SQ8 candidate scan as one int8 GEMM per block of rows (fbgemm: u8 query x s8 codes, int32 sums).

    score(row) = q . (offset + scale * code) ranks like (q * scale) . (code - 128): the offset term and the
    128 shift add the same amount to every row. Each scaled query row is then divided by its largest |value|,
    which changes no row's rank but lets fbgemm's 7-bit dynamic quantization use its whole range for every
    query (unnormalised, the ~1e-4-sized scaled values lost nearly all precision: 0-10% same top-10 on 200k
    uniform rows, against 100% normalised). One query reads 1 byte per value at memory speed; a batch runs as
    an integer GEMM (faster than the fp32 GEMM peak). The cost: the codes are packed once into fbgemm's
    layout, an in-memory copy of N x D bytes that takes about 16-21 s per million 1,024-d rows on 2 cores.
    """

    block_rows = 1 << 16  # measured: smaller blocks pack faster but pay ~2-5 ms of overhead per GEMM call
    query_batch = 256  # (Q, block) fp32 scores: at most 64 MB at a time

    def __init__(self, codes: Sq8Codes, threads: int | None = None, progress: bool | None = None) -> None:
        n = len(codes.codes)
        self.scale = torch.from_numpy(np.asarray(codes.scale, dtype=np.float32))  # (D,)
        self.starts = list(range(0, n, self.block_rows))
        show = progress if progress is not None else n >= 1_000_000
        with warnings.catch_warnings():  # torch marks quantized-tensor constructors deprecated; fbgemm stays
            warnings.simplefilter("ignore")
            self.blocks = [
                self._pack(np.asarray(codes.codes[lo : lo + self.block_rows]))
                for lo in tqdm(
                    self.starts, desc="packing SQ8 codes for int8 GEMM", unit="block", disable=not show
                )
            ]

    @staticmethod
    def _pack(block: np.ndarray) -> Any:
        signed = torch.from_numpy(block).bitwise_xor(128).view(torch.int8)  # (B, D): code - 128
        weight = torch._make_per_tensor_quantized_tensor(signed, 1.0, 0)
        return torch.ops.quantized.linear_prepack(weight, None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate scores (each row in its own units: for ordering only), ids (Q, k) of queries (Q, D) fp32,
        best first, and tied (Q,): always False, since a tie of coarse integer scores at the cut says nothing the
        recall does not. Normalised queries order candidates about as well as faiss's float scan (on 200k
        uniform 1,024-d rows, 20 candidates gave the exact top-10 for 100% of queries), so k are enough."""
        parts = [
            self._search(torch.from_numpy(np.ascontiguousarray(queries[i : i + self.query_batch])), k)
            for i in range(0, len(queries), self.query_batch)
        ]
        scores, ids = (np.concatenate(p) for p in zip(*parts, strict=True))
        return scores, ids, np.zeros(len(queries), dtype=bool)

    def _search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        scaled = queries * self.scale  # (Q, D): the per-dimension scale folded into the query
        # Rank-neutral per row, and every row then fills fbgemm's 7-bit range.
        scaled = scaled / scaled.abs().amax(1, keepdim=True).clamp_min(1e-30)
        best_s = best_i = None
        for lo, packed in zip(self.starts, self.blocks, strict=True):
            scores = torch.ops.quantized.linear_dynamic(scaled, packed, True)  # (Q, B), per-row units
            s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # (Q, k)
            i += lo
            if best_s is not None:
                s, j = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, j)
            best_s, best_i = s, i
        assert best_s is not None and best_i is not None
        return best_s.numpy(), best_i.numpy()


class NativeSq8Scan:
    """The SQ8 candidate scan by the native uint8 x int8 kernel over the codes in place: no copy, no packing.

    Queries become int8 (native.quantize_sq8_queries: the scale folded in, each row at full 7-bit range), the
    kernel sums exact int32 scores, and the best k are taken by score, then row. One query reads the codes once
    at memory speed; a batch passes over them once per 64 queries (the kernel's TOP_QUERIES; compute-bound from
    ~8 queries). Each thread keeps its best k in heaps (no (Q, N) score array).
    """

    def __init__(self, codes: Sq8Codes, threads: int | None = None, progress: bool | None = None) -> None:
        self.scan = native.RowScan(codes.codes, threads or default_threads())
        self.scale = np.asarray(codes.scale, dtype=np.float32)  # (D,)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate int scores (for ordering only), ids (Q, k) of queries (Q, D) fp32, best first, and tied
        (Q,), always False: the selection is exact on the integer scores, ties going to the lower row."""
        q8 = native.quantize_sq8_queries(queries, self.scale)  # (Q, D) int8
        scores, ids = native_topk(self.scan, q8, k)  # (Q, k)
        return scores.astype(np.float32), ids, np.zeros(len(queries), dtype=bool)


SQ8_SCANS: dict[str, Callable[..., FaissSq8Scan | Int8GemmScan | NativeSq8Scan]] = {
    "native": NativeSq8Scan,
    "int8-gemm": Int8GemmScan,
    "faiss": FaissSq8Scan,
}
SQ8_SCAN_RUNS: dict[str, Callable[[], bool]] = {  # whether a scan can run on this machine
    "native": lambda: native.available(),  # looked up at call time: tests switch the kernels off
    "int8-gemm": lambda: int8_gemm_available(),
    "faiss": lambda: True,
}


INT8_GEMM_MAX_BYTES = 4 << 30  # the int8 scan holds a packed copy of the codes in RAM: up to ~4M x 1,024 rows


def default_sq8_scan(code_bytes: int | None = None) -> str:
    """The SQ8 scan a search uses when none is named: the native kernel where it runs (no copy, any size);
    else fbgemm's int8 GEMM where torch has it and its packed copy of the codes (code_bytes, N x D) fits
    INT8_GEMM_MAX_BYTES; else faiss's zero-copy float scan.

    Measured in benchmarks/bench_search.py (1M x 1,024, 2 cores); figures in docs/scale-out.md. int8-gemm costs
    ~21-24 s per million rows to pack at load, and N x D bytes of RAM; the native scan reads the memory map.
    """
    if native.available():
        return "native"
    if int8_gemm_available() and (code_bytes is None or code_bytes <= INT8_GEMM_MAX_BYTES):
        return "int8-gemm"
    return "faiss"


class Sq8Search:
    """SQ8 scan (int8 codes stored next to the fp16 rows; half the bytes), then an exact re-rank of the best
    k x rerank_factor candidates with the fp16 rows.

    The result is exact whenever the true top-k is among the candidates (the manifest records how often at
    build time, and with which scan). Spatial filters go to the exact search. scan: "native" (the AVX2 kernel
    over the codes in place, every batch size), "int8-gemm" (fbgemm, every batch size: one integer GEMM per
    block of a packed copy) or "faiss" (float SQ8 views; batches above faiss_max_queries go to the exact fp16
    GEMM); None: default_sq8_scan for the size of the codes.
    """

    faiss_max_queries = 2

    def __init__(
        self,
        embeddings: np.ndarray,
        device: torch.device,
        codes: Sq8Codes,
        rerank_factor: int = 10,
        threads: int | None = None,
        chunk_rows: int | None = None,
        scan: str | None = None,
        progress: bool | None = None,
    ) -> None:
        if codes.codes.shape != embeddings.shape:
            raise CorruptIndexError(
                f"SQ8 codes of shape {codes.codes.shape} for embeddings {embeddings.shape}; "
                "rerun `python -m retriever.index optimize INDEX --sq8`"
            )
        self.embeddings, self.sq8, self.rerank_factor = embeddings, codes, max(1, int(rerank_factor))
        self.scan_name = scan or default_sq8_scan(int(codes.codes.nbytes))
        if self.scan_name not in SQ8_SCANS:
            raise ValueError(f"unknown SQ8 scan {self.scan_name!r}; pick one of {', '.join(SQ8_SCANS)}")
        if not SQ8_SCAN_RUNS[self.scan_name]():
            fallback = default_sq8_scan(int(codes.codes.nbytes))
            warnings.warn(
                f"the {self.scan_name!r} SQ8 scan cannot run on this machine: the codes are scanned by "
                f"{fallback!r} instead (the recall may differ a little from the manifest's)",
                stacklevel=2,
            )
            self.scan_name = fallback
        self.scan = SQ8_SCANS[self.scan_name](codes, threads, progress)
        self.exact = ExactSearch(embeddings, device, chunk_rows, threads)

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if rows is not None or (self.scan_name == "faiss" and len(queries) > self.faiss_max_queries):
            return self.exact.topk(queries, k, rows)
        return self.compressed_topk(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)

    def compressed_topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The SQ8 scan and exact re-rank for any batch (Q, D) fp32 (one scan pass per query): scores, ids."""
        k = min(k, len(self.embeddings))
        _, candidates, tied = self.scan.search(queries, k * self.rerank_factor)  # (Q, kR) approximate order
        scores, ids = rerank_exact(self.embeddings, queries, candidates, k)
        if tied.any():  # equal codes at the candidate cut: a tied row may be missing, so search exactly
            scores[tied], ids[tied] = self.exact.topk(torch.from_numpy(queries[tied]), k, None)
        return scores, ids


class FaissSearch:
    """A FAISS index built from the embeddings (an in-memory copy), by factory string.

    "Flat" (IndexFlatIP, fp32 copy) and "SQfp16" (fp16 copy, half the memory) are exact; e.g.
    "IVF1024,Flat" (params "nprobe=32") or "HNSW32" (params "efSearch=128") are approximate.
    Filtered searches go through the exact scan of the candidate rows, so spatial filters stay exact.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        device: torch.device,
        factory: str = "Flat",
        params: str | None = None,
        train_size: int = 100_000,
        chunk_rows: int | None = None,
    ) -> None:
        faiss = import_faiss()
        n, dim = embeddings.shape
        self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, train_size), replace=False))
            self.index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
        for start in range(0, n, 1 << 16):  # fp32 in slices: the fp16 table is never widened whole
            self.index.add(np.ascontiguousarray(embeddings[start : start + (1 << 16)], dtype=np.float32))
        if params:  # e.g. "nprobe=32" or "efSearch=128"
            faiss.ParameterSpace().set_index_parameters(self.index, params)
        self.exact = ExactSearch(embeddings, torch.device("cpu"), chunk_rows)

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if rows is not None:
            return self.exact.topk(queries, k, rows)
        scores, ids = self.index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
        return scores, ids  # approximate indexes may pad with id -1


def ann_topk(
    index: Any, embeddings: np.ndarray, queries: np.ndarray, k: int, rerank: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries (Q, D) fp32 from a faiss index; rerank > 1 fetches k x rerank candidates and re-scores
    them exactly against the stored (memory-mapped) rows, so only Q x k x rerank rows are read.

    Returns scores, ids (Q, k); ids are -1 where the index found fewer than k.
    """
    if rerank <= 1:
        return index.search(queries, k)
    _, cand = index.search(queries, k * rerank)  # (Q, kR)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for qi, (q, c) in enumerate(zip(queries, cand, strict=True)):
        c = np.sort(c[c >= 0])  # sorted reads from the memory map
        exact = np.asarray(embeddings[c], dtype=np.float32) @ q  # (kR,)
        top = np.argsort(-exact, kind="stable")[:k]
        scores[qi, : len(top)], ids[qi, : len(top)] = exact[top], c[top]
    return scores, ids


class AnnSearch:
    """A trained faiss ANN index stored next to the embeddings (written by `optimize`), read into memory.

    Unfiltered searches go through the ANN index (approximate; ids may be padded with -1), optionally
    re-scoring k x rerank candidates exactly against the stored rows. Searches with a spatial filter fall
    back to the exact scan of the filtered rows: an IVF or HNSW index cannot restrict its candidates
    cheaply, and a filtered area is usually small enough for exact search anyway.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        device: torch.device,
        path: str | Path,
        params: str | None = None,
        chunk_rows: int | None = None,
        rerank: int = 0,
    ) -> None:
        faiss = import_faiss()
        path = Path(path)
        if not path.is_file():
            raise CorruptIndexError(f"{path} is missing; rerun `python -m retriever.index optimize`")
        try:
            self.index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise CorruptIndexError(f"cannot read the ANN index {path}: {exc}") from exc
        n, dim = embeddings.shape
        if self.index.ntotal != n or self.index.d != dim:
            raise CorruptIndexError(
                f"{path} holds {self.index.ntotal} x {self.index.d} vectors, the embeddings {n} x {dim}; "
                "rerun `python -m retriever.index optimize`"
            )
        if params:  # e.g. "nprobe=32" or "efSearch=128"
            faiss.ParameterSpace().set_index_parameters(self.index, params)
        self.params, self.rerank, self.embeddings = params, rerank, embeddings
        self.exact = ExactSearch(embeddings, device, chunk_rows)

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if rows is not None:  # spatial filter: exact over the filtered rows
            return self.exact.topk(queries, k, rows)
        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)  # (Q, D)
        return ann_topk(self.index, self.embeddings, q, k, self.rerank)  # scores, ids (Q, k)


BACKENDS: dict[str, Callable[..., ExactSearch | FaissSearch | AnnSearch | Sq8Search]] = {
    "torch": ExactSearch,
    "faiss": FaissSearch,
    "ann": AnnSearch,
    "sq8": Sq8Search,
}


def stored_options(backend: str, folder: Path, manifest: dict) -> dict:
    """Options a backend reads from the index folder and its manifest: the ANN or SQ8 files and settings."""
    if backend == "sq8":
        sq8 = manifest.get("sq8")
        if not sq8:
            raise ValueError(
                f"{folder} has no SQ8 codes; write them with `python -m retriever.index optimize {folder} --sq8`"
            )
        codes = load_sq8(folder / sq8["file"], folder / sq8["params_file"], manifest["n"], manifest["dim"])
        # the scan its recall was measured with (indexes written before scans had names: faiss)
        return {"codes": codes, "rerank_factor": int(sq8["rerank_factor"]), "scan": sq8.get("scan", "faiss")}
    if backend != "ann":
        return {}
    ann = manifest.get("ann")
    if not ann:
        raise ValueError(
            f"{folder} has no ANN index; build one with `python -m retriever.index optimize {folder} --faiss ...`"
        )
    return {"path": folder / ann["file"], "params": ann.get("params"), "rerank": int(ann.get("rerank", 0))}


def resolve_backend(manifest: dict, backend: str | None = None, exact: bool = False) -> str:
    """The backend a load uses: the one asked for, else (exact off) "ann" when the index has one, then "sq8"
    when it has SQ8 codes, else "torch"."""
    if backend in ("ann", "sq8") and exact:
        kind = "approximate" if backend == "ann" else "approximate before its re-rank (not guaranteed exact)"
        raise ValueError(f'backend="{backend}" is {kind}; drop exact=True or pick "torch"')
    if backend is not None:
        return backend
    if exact:
        return "torch"
    return "ann" if manifest.get("ann") else "sq8" if manifest.get("sq8") else "torch"
