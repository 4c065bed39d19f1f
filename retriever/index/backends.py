"""Search backends over the embedding table: exact (torch or a zero-copy faiss scan), in-memory faiss, stored ANN."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retriever._io import lazy_import
from retriever.errors import CorruptIndexError


def import_faiss() -> Any:
    """faiss, or MissingDependencyError with the install line."""
    return lazy_import("faiss", pip="faiss-cpu", purpose="the faiss backend")


def exact_topk(
    table: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    rows: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    block_rows: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of queries (Q, D) with table rows (N, D); returns scores, row ids (Q, k).

    The table is read in chunks small enough to stay in cache: fp16 rows are widened to fp32 into a
    reused buffer, multiplied, and a running top-k is kept per block, so memory stays O(block x Q) and
    the bytes read per query are the stored ones (half of fp32 for fp16). rows restricts the scan.
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
        s, i = torch.topk(scores[: b1 - b0], min(k, b1 - b0), dim=0)  # (k', Q)
        i += b0
        if best_s is not None:
            s, j = torch.topk(torch.cat([best_s, s]), k, dim=0)
            i = torch.gather(torch.cat([best_i, i]), 0, j)
        best_s, best_i = s, i
    if rows is not None:
        best_i = rows[best_i]
    return best_s.T.contiguous(), best_i.T.contiguous()


def _as_tensor(embeddings: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memmap: torch warns, but the table is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(embeddings)


def faiss_view(embeddings: np.ndarray) -> Any:
    """A faiss flat index whose codes are the embeddings' own memory (zero copy), or None without faiss.

    fp16 rows are exactly faiss's "SQfp16" codes and fp32 rows IndexFlatIP's, so the scan is exact. faiss
    scans one query on one thread at memory speed with no per-chunk synchronisation, which beats the
    chunked torch scan at batch 1 and stays fast when other processes share the cores.
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
    index = flat[embeddings.dtype]()
    codes = embeddings.reshape(-1).view(np.uint8)
    try:  # a non-owning MaybeOwnedVector (faiss >= 1.10), the same mechanism as faiss's own mmap loading
        view = faiss.MaybeOwnedVectorUInt8()
        pointer = faiss.swig_ptr(codes)
        view.is_owned, view.view_data, view.view_size = False, pointer, codes.size
        view.c_ptr, view.c_size = pointer, codes.size
        index.codes = view
    except (AttributeError, TypeError):
        return None
    index.ntotal = n
    index.referenced_objects = [embeddings]  # the codes point into this array: keep it alive
    return index


class ExactSearch:
    """Exact top-K: small batches by a zero-copy faiss scan on CPU, otherwise chunked torch products.

    On an accelerator the table is moved there once. On CPU it is read in place (a memory map works).
    """

    faiss_max_queries = 2  # above this, one GEMM pass over the table beats a faiss pass per query

    def __init__(self, embeddings: np.ndarray, device: torch.device, chunk_rows: int | None = None) -> None:
        self.table = _as_tensor(embeddings).to(device)  # (N, D); a no-op view on CPU
        self.device = device
        self.chunk_rows = chunk_rows
        self.scan = faiss_view(embeddings) if device.type == "cpu" else None

    def topk(self, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = self.table.shape[0]
        # Few candidates: gather them (cost ~ candidates); many: scan all rows and skip the others (a bitmap).
        if (
            self.scan is not None
            and len(queries) <= self.faiss_max_queries
            and (rows is None or len(rows) > n // 16)
        ):
            return self._faiss_topk(queries, k, rows)
        row_ids = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        scores, ids = exact_topk(self.table, queries, k, row_ids, self.chunk_rows)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def _faiss_topk(
        self, queries: torch.Tensor, k: int, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)  # (Q, D)
        if rows is None:
            return self.scan.search(q, k)
        mask = np.zeros(self.table.shape[0], dtype=bool)
        mask[rows] = True
        bits = np.packbits(mask, bitorder="little")  # faiss reads bit i as bits[i >> 3] >> (i & 7)
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        return self.scan.search(q, k, params=faiss.SearchParameters(sel=selector))


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


BACKENDS: dict[str, Callable[..., ExactSearch | FaissSearch | AnnSearch]] = {
    "torch": ExactSearch,
    "faiss": FaissSearch,
    "ann": AnnSearch,
}


def stored_options(backend: str, folder: Path, manifest: dict) -> dict:
    """Options a backend reads from the index folder and its manifest: the ANN file and its settings."""
    if backend != "ann":
        return {}
    ann = manifest.get("ann")
    if not ann:
        raise ValueError(
            f"{folder} has no ANN index; build one with `python -m retriever.index optimize {folder} --faiss ...`"
        )
    return {"path": folder / ann["file"], "params": ann.get("params"), "rerank": int(ann.get("rerank", 0))}


def resolve_backend(manifest: dict, backend: str | None = None, exact: bool = False) -> str:
    """The backend a load uses: the one asked for, else "ann" when the index has one (and exact is off), else "torch"."""
    if backend == "ann" and exact:
        raise ValueError('backend="ann" is approximate; drop exact=True or pick "torch"')
    if backend is not None:
        return backend
    return "ann" if manifest.get("ann") and not exact else "torch"
