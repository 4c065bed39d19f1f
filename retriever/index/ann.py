"""`optimize`: a faiss ANN index, or SQ8 codes for a compressed scan, next to the embeddings, with measured recall."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever._io import atomic_path, write_atomic
from retriever.index.backends import (
    ExactSearch,
    Sq8Search,
    ann_topk,
    import_faiss,
    load_sq8,
    sq8_encode,
    sq8_params,
)
from retriever.index.layout import (
    ANN_FILE,
    SQ8_FILE,
    SQ8_PARAMS_FILE,
    open_embeddings,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

ADD_CHUNK_ROWS = 1 << 16  # rows widened to fp32 at a time while adding (64k x 1024 x 4 B = 256 MiB)
RECALL_NOISE = 0.1  # relative noise added to the stored rows that serve as recall queries


def index_kind(index: Any) -> str | None:
    """ "ivf" or "hnsw" for the trained index kinds that take search-time parameters, else None (flat)."""
    faiss = import_faiss()
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    if hasattr(faiss.downcast_index(index), "hnsw"):
        return "hnsw"
    return None


def default_params(kind: str | None, nprobe: int | None, ef_search: int | None) -> str | None:
    """The ParameterSpace string for a kind of index: nprobe (default 32) or efSearch (default 128)."""
    if kind == "ivf":
        return f"nprobe={nprobe or 32}"
    if kind == "hnsw":
        return f"efSearch={ef_search or 128}"
    return None


@dataclass(frozen=True)
class AnnChoice:
    """What `optimize` builds when no factory is given: a faiss factory, its search params and the re-rank."""

    factory: str
    params: str
    rerank: int
    rule: str  # which branch of default_ann chose it, recorded in the manifest


# The default rule (default_ann), from `python -m benchmarks.bench_ann` on 1 thread (figures: its docstring and
# the default_ann docstring). Target: recall@10 >= 0.95 at <= 5 ms p50 per query.
HNSW_MAX_BYTES = 8 << 30  # HNSW32 holds fp32 rows in RAM: N x D x 4 B (+ ~256 B/row of graph); 2M x 1,024
HNSW_EF_SEARCH = 256  # measured: 0.979 real 50k (2.6 ms), 0.973 synthetic 100k x 1,024; 128: 0.951 / 0.91
PQ_SUB_DIM = 16  # PQ sub-vector width: D/16 bytes a code (64 B at 1,024-d)
PQ_RERANK = 20  # PQ's coarse scores: re-score 20k candidates exactly (synthetic 1M: 0.27 -> 0.60)
PQ_NPROBE_FRACTION = 1 / 8  # lists probed by the IVF-PQ fallback


def ivf_lists(n: int) -> int:
    """IVF list count: the power of two nearest sqrt(n) (1,024 at 1M: k-means stays minutes on 2 cores), halved
    until each list has faiss's 39 training points."""
    lists = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    while lists > 1 and lists * 39 > n:
        lists //= 2
    return lists


def default_ann(n: int, dim: int) -> AnnChoice:
    """The factory, search params and re-rank `optimize` uses for an N x D table when none is given.

    - N x D x 4 B <= HNSW_MAX_BYTES: "HNSW32", efSearch=HNSW_EF_SEARCH, no re-rank.
    - larger (HNSW's fp32 rows would not fit in RAM): "IVF{ivf_lists(N)},PQ{~D/16}", nprobe = nlist / 8,
      re-rank PQ_RERANK from the memory-mapped fp16 rows. This fallback is below the target on the synthetic
      set (0.60 at 1M); for exact recall at large N use `optimize --sq8` (the compressed exact scan).

    Evidence (bench_ann, 1 thread on 2 shared cores, p50 of a one-query TileIndex.search, recall@10 vs exact):
    - Real demo embeddings (demo model, 50,000 rendered tiles at 12.5 m stride x 8 rotations, 576-d; 739
      description queries; exact p50 8.1 ms): HNSW32 efSearch 128 / 256 reach 0.951 / 0.979 at 1.8 / 2.6 ms
      (build 26 s). IVF256,SQ8 needs a quarter of its lists probed (nprobe 64: 0.953, 1.8 ms; 128: 0.985,
      4.3 ms): text queries fall between the lists that image embeddings train. IVF256,PQ36 + re-rank 20
      tops out at 0.91 (nprobe 128).
    - Synthetic clustered 1M x 1,024 (latent 64; noisy stored rows as queries; exact p50 431 ms): IVF1024,SQ8
      nprobe 128 + re-rank 2: 0.82 at 60 ms; IVF1024,PQ64 nprobe 128 + re-rank 20: 0.60 at 15 ms. HNSW32 on
      its first 100k: efSearch 256: 0.973 at 6.5 ms under CPU contention (exact took 431 ms here, 242 ms in
      issue 16's quieter run), 0.91 at 3.8 ms with efSearch 128. Builds: IVF1024,SQ8
      130 s, IVF1024,PQ64 485 s at 1M; HNSW32 231 s at 100k (~1 hour at 1M on one core).
    """
    if n * dim * 4 <= HNSW_MAX_BYTES:
        return AnnChoice(
            "HNSW32", f"efSearch={HNSW_EF_SEARCH}", 0, f"n x dim x 4 B <= {HNSW_MAX_BYTES}: HNSW32"
        )
    lists = ivf_lists(n)
    sub = next(m for m in range(max(dim // PQ_SUB_DIM, 1), 0, -1) if dim % m == 0)  # faiss: m divides D
    return AnnChoice(
        f"IVF{lists},PQ{sub}",
        f"nprobe={max(1, round(lists * PQ_NPROBE_FRACTION))}",
        PQ_RERANK,
        f"n x dim x 4 B > {HNSW_MAX_BYTES}: IVF-PQ + exact re-rank",
    )


def _no_polysemous_training(index: Any) -> None:
    """Skip PQ's polysemous training (factory default): search never uses Hamming filtering, and it is slow."""
    faiss = import_faiss()
    for part in (index, faiss.try_extract_index_ivf(index)):
        if part is not None and hasattr(faiss.downcast_index(part), "do_polysemous_training"):
            faiss.downcast_index(part).do_polysemous_training = False


def _rows_fp32(embeddings: np.ndarray, rows: np.ndarray, chunk_rows: int = ADD_CHUNK_ROWS) -> np.ndarray:
    """embeddings[rows] widened to fp32, gathered in chunks from the (memory-mapped) table; rows sorted."""
    out = np.empty((len(rows), embeddings.shape[1]), dtype=np.float32)  # (M, D)
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = embeddings[rows[start : start + chunk_rows]]
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k (Q, k) found in the approximate top-k (Q, k)."""
    k = exact_ids.shape[1]
    found = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids, strict=True)]
    return float(np.mean(found) / k)


def recall_queries(
    embeddings: np.ndarray, count: int, seed: int = 1, noise: float = RECALL_NOISE
) -> np.ndarray:
    """count stored rows (random) plus Gaussian noise of relative size noise, L2-normalised: (Q, D) fp32."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(embeddings), size=min(count, len(embeddings)), replace=False))
    q = _rows_fp32(embeddings, rows)  # (Q, D)
    scale = noise * np.linalg.norm(q, axis=1, keepdims=True) / math.sqrt(q.shape[1])
    q += rng.standard_normal(q.shape).astype(np.float32) * scale
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q


def _new_index(factory: str, dim: int) -> Any:
    faiss = import_faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot build {factory!r}: {str(exc).strip().splitlines()[-1]}") from exc
    _no_polysemous_training(index)
    return index


def _train(index: Any, factory: str, embeddings: np.ndarray, train_sample: int, seed: int) -> int:
    """Train on a random sample of at most train_sample rows (none for flat or HNSW); returns its size."""
    if index.is_trained:
        return 0
    n = len(embeddings)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, train_sample), replace=False))
    log.info("training %s on %d of %d vectors", factory, len(sample), n)
    index.train(_rows_fp32(embeddings, sample))  # (M, D) fp32, dropped once trained
    return len(sample)


def _add(index: Any, factory: str, embeddings: np.ndarray, show: bool) -> None:
    """Add every row, ADD_CHUNK_ROWS at a time widened to fp32: the table is never widened whole."""
    with tqdm(total=len(embeddings), desc=f"adding to {factory}", unit="vec", disable=not show) as bar:
        for start in range(0, len(embeddings), ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(
                embeddings[start : start + ADD_CHUNK_ROWS], dtype=np.float32
            )  # (C, D)
            index.add(chunk)
            bar.update(len(chunk))


def _measure_recall(
    index: Any, embeddings: np.ndarray, num_queries: int, k: int, rerank: int, seed: int
) -> tuple[float, int, float]:
    """recall@k of the ANN search against exact search on noisy stored rows: (recall, queries, seconds)."""
    queries = recall_queries(embeddings, num_queries, seed=seed)  # (Q, D)
    _, exact_ids = ExactSearch(embeddings, torch.device("cpu")).topk(torch.from_numpy(queries), k, None)
    started = time.perf_counter()
    _, approx_ids = ann_topk(index, embeddings, queries, k, rerank)  # (Q, k)
    return recall_at_k(approx_ids, exact_ids), len(queries), time.perf_counter() - started


def optimize_index(
    folder: str | Path,
    factory: str | None = None,
    *,
    train_sample: int = 500_000,
    params: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int | None = None,
    num_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Train a faiss index (factory string, inner product) next to the embeddings; returns the manifest's "ann" entry.

    The embeddings are read memory-mapped: only the training sample (train_sample x D fp32) and one chunk of
    ADD_CHUNK_ROWS rows are ever widened to fp32. recall@k against exact search is measured on num_queries
    noisy stored rows. Order: ann.faiss (atomic), then manifest.json rewritten with "ann" (atomic).
    params (a faiss ParameterSpace string) overrides nprobe / ef_search (defaults: nprobe=32, efSearch=128).
    rerank > 1 re-scores k x rerank ANN candidates exactly against the stored rows at search time (recorded;
    recall is measured with it): the cure for PQ's coarse scores at the cost of k x rerank row reads.
    factory None: default_ann(N, D) picks the factory, its params and rerank (each overridden when given);
    the entry then records "default_rule".
    """
    faiss = import_faiss()
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    embeddings = open_embeddings(folder, manifest)  # (N, D) fp16/fp32, on disk
    choice = default_ann(*embeddings.shape) if factory is None else None
    if choice is not None:
        factory = choice.factory
        if params is None and nprobe is None and ef_search is None:
            params = choice.params
        rerank = choice.rerank if rerank is None else rerank
    rerank = rerank or 0
    started = time.perf_counter()
    index = _new_index(factory, embeddings.shape[1])
    sample_size = _train(index, factory, embeddings, train_sample, seed)
    trained = time.perf_counter()
    _add(index, factory, embeddings, show=progress if progress is not None else len(embeddings) >= 100_000)
    built = time.perf_counter()
    kind = index_kind(index)
    params = default_params(kind, nprobe, ef_search) if params is None else params
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    recall, measured, query_seconds = _measure_recall(index, embeddings, num_queries, k, rerank, seed + 1)

    target = folder / ANN_FILE
    with atomic_path(target) as tmp:
        faiss.write_index(index, str(tmp))
    entry = {
        "file": ANN_FILE,
        "factory": factory,
        "kind": kind,
        "params": params,
        "rerank": rerank,
        "metric": "inner_product",
        f"recall@{k}": round(recall, 4),
        "recall_queries": measured,
        "recall_noise": RECALL_NOISE,
        "train_sample": sample_size,
        "train_seconds": round(trained - started, 2),
        "add_seconds": round(built - trained, 2),
        "build_seconds": round(built - started, 2),
        "query_ms_per_query": round(1000 * query_seconds / max(measured, 1), 4),
        "bytes": target.stat().st_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "faiss": faiss.__version__,
    }
    if choice is not None:
        entry["default_rule"] = choice.rule
    write_manifest(folder, {**manifest, "ann": entry})  # last: the entry proves ann.faiss is complete
    return entry


def same_topk(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of queries whose top-k ids (Q, k) equal the exact ones, rank for rank."""
    return float(np.mean(np.all(approx_ids == exact_ids, axis=1)))


def compress_index(
    folder: str | Path,
    *,
    rerank_factor: int = 10,
    num_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    threads: int | None = None,
    scan: str | None = None,
) -> dict:
    """Write SQ8 codes of the embeddings (per-dimension offset/scale) next to them; returns the manifest's "sq8" entry.

    Search then scans the codes (half the bytes of fp16) and re-ranks the best k x rerank_factor rows exactly.
    How often that equals exact fp16 search (recall@k and same top-k, rank for rank) is measured on
    num_queries noisy stored rows and recorded. Order: the codes and their params (atomic), then
    manifest.json rewritten with "sq8" (atomic, last).
    """
    import_faiss()
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    embeddings = open_embeddings(folder, manifest)  # (N, D) fp16/fp32, on disk
    started = time.perf_counter()
    offset, scale = sq8_params(embeddings)  # (D,), (D,)
    with atomic_path(folder / SQ8_FILE) as tmp:
        codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=embeddings.shape)  # (N, D)
        sq8_encode(embeddings, offset, scale, codes)
        codes.flush()
        del codes
    write_atomic(folder / SQ8_PARAMS_FILE, lambda f: np.save(f, np.stack([offset, scale])))
    built = time.perf_counter()

    n, dim = embeddings.shape
    search = Sq8Search(
        embeddings,
        torch.device("cpu"),
        load_sq8(folder / SQ8_FILE, folder / SQ8_PARAMS_FILE, n, dim),
        rerank_factor,
        threads,
        scan=scan,
    )
    queries = recall_queries(embeddings, num_queries, seed=seed + 1)  # (Q, D)
    _, exact_ids = search.exact.topk(torch.from_numpy(queries), k, None)  # (Q, k)
    measured = time.perf_counter()
    _, sq8_ids = search.compressed_topk(queries, k)  # (Q, k)
    query_seconds = time.perf_counter() - measured
    entry = {
        "file": SQ8_FILE,
        "params_file": SQ8_PARAMS_FILE,
        "rerank_factor": search.rerank_factor,
        "scan": search.scan_name,  # the scan the recall was measured with; a load uses the same one
        f"recall@{k}": round(recall_at_k(sq8_ids, exact_ids), 5),
        f"same_top{k}": round(same_topk(sq8_ids, exact_ids), 5),
        "recall_queries": len(queries),
        "recall_noise": RECALL_NOISE,
        "build_seconds": round(built - started, 2),
        "query_ms_per_query": round(1000 * query_seconds / max(len(queries), 1), 4),
        "bytes": (folder / SQ8_FILE).stat().st_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(folder, {**manifest, "sq8": entry})  # last: the entry proves the codes are complete
    return entry
