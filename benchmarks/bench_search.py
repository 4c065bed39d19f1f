"""Exact top-k on CPU over N x D fp16 embeddings: ours (retriever.index.ExactSearch) versus faiss IndexFlatIP.

Ours reads the fp16 table in place: batches of <= 2 queries through a zero-copy faiss SQfp16 view of it,
larger batches through chunked fp16 -> fp32 torch GEMM. Run: python -m benchmarks.bench_search [--n 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from retriever.index import ExactSearch

GB = 1e9


def rss_gb() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / GB


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: page faults, thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit-norm random rows stored as fp16, generated in slices so fp32 is never held whole."""
    out = np.empty((n, dim), dtype=np.float16)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, 1 << 16):
        rows = torch.randn(min(1 << 16, n - start), dim, generator=generator)
        out[start : start + len(rows)] = torch.nn.functional.normalize(rows, dim=1).half().numpy()
    return out


def read_bandwidth(array: np.ndarray, repeats: int) -> dict[str, float]:
    """Sequential read bandwidth (GB/s): numpy sum (one thread) and torch sum (all threads) over array's bytes."""
    words = array.reshape(-1).view(np.int64)
    as_tensor = torch.from_numpy(words)
    numpy_s = median_time(lambda: words.sum(), repeats)
    torch_s = median_time(lambda: as_tensor.sum(), repeats)
    return {
        "numpy_sum_1thread": array.nbytes / numpy_s / GB,
        "torch_sum_all_threads": array.nbytes / torch_s / GB,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery rows")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tune", action="store_true", help="also sweep chunk_rows for our scan")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--torch-only", action="store_true", help="also time the torch scan at every batch")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__} threads={torch.get_num_threads()}  cpus={os.cpu_count()}")
    base_rss = rss_gb()
    start = time.perf_counter()
    table = make_embeddings(args.n, args.dim)
    print(
        f"gallery: {args.n} x {args.dim} fp16 = {table.nbytes / GB:.2f} GB (made in {time.perf_counter() - start:.1f} s)"
    )

    bandwidth = read_bandwidth(table, args.repeats)
    machine_bw = max(bandwidth.values())
    print("read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()))

    rng = np.random.default_rng(1)
    queries = {b: rng.standard_normal((b, args.dim)).astype(np.float32) for b in args.batches}
    for q in queries.values():
        q /= np.linalg.norm(q, axis=1, keepdims=True)

    ours = ExactSearch(table, torch.device("cpu"))
    if args.tune:
        for b, q in queries.items():
            qt = torch.from_numpy(q)
            for chunk in (128, 256, 512, 1024, 2048, 4096, 8192, 16384):
                ours.chunk_rows = chunk
                t = median_time(lambda qt=qt: ours.topk(qt, args.k, None), max(1, args.repeats // 2))
                print(f"  tune batch {b:>3} chunk_rows {chunk:>6}: {t * 1e3:8.1f} ms")
        ours.chunk_rows = None

    before = rss_gb()
    results: dict[int, dict] = {}
    for b, q in queries.items():
        qt = torch.from_numpy(q)
        t = median_time(lambda qt=qt: ours.topk(qt, args.k, None), args.repeats)
        path = "faiss-view" if ours.scan is not None and b <= ours.faiss_max_queries else "torch"
        results[b] = {"ours_s": t, "path": path, "ours_ids": ours.topk(qt, args.k, None)[1]}
        if args.torch_only:
            limit, ours.faiss_max_queries = ours.faiss_max_queries, 0
            results[b]["torch_scan_s"] = median_time(lambda qt=qt: ours.topk(qt, args.k, None), args.repeats)
            ours.faiss_max_queries = limit
    print(
        f"ours: reads the fp16 table in place ({table.nbytes / GB:.2f} GB, no copy); RSS after searching "
        f"{rss_gb() - before:+.2f} GB; peak RSS so far {peak_rss_gb():.2f} GB (start {base_rss:.2f} GB)"
    )

    if not args.no_faiss:
        import faiss

        before = rss_gb()
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(args.dim)
        for s in range(0, args.n, 1 << 16):  # faiss IndexFlatIP stores fp32: a second, 2x larger copy
            flat.add(table[s : s + (1 << 16)].astype(np.float32))
        print(
            f"faiss IndexFlatIP: fp32 copy {args.n * args.dim * 4 / GB:.2f} GB "
            f"(RSS +{rss_gb() - before:.2f} GB), built in {time.perf_counter() - start:.1f} s, "
            f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}"
        )
        for b, q in queries.items():
            results[b]["faiss_s"] = median_time(lambda q=q: flat.search(q, args.k), args.repeats)
            results[b]["agree"] = float(np.mean(flat.search(q, args.k)[1] == results[b]["ours_ids"]))
        del flat

    print(f"\nexact top-{args.k} over {args.n} x {args.dim}, median of {args.repeats} (after a warm-up run)")
    header = f"{'batch':>5} {'ours ms':>9} {'faiss ms':>9} {'faiss/ours':>10} {'ours GB/s':>9} {'of machine':>10} {'same ids':>8}"
    print(header + "  ours path" + ("   torch-scan ms" if args.torch_only else ""))
    summary = {}
    for b, r in results.items():
        ours_bw = table.nbytes / r["ours_s"] / GB  # bytes of the stored table read per batch
        faiss_s = r.get("faiss_s", float("nan"))
        line = (
            f"{b:>5} {r['ours_s'] * 1e3:>9.1f} {faiss_s * 1e3:>9.1f} {faiss_s / r['ours_s']:>10.2f} "
            f"{ours_bw:>9.1f} {ours_bw / machine_bw:>10.0%} {r.get('agree', float('nan')):>8.0%}"
        )
        line += f"  {r['path']:>9}"
        if "torch_scan_s" in r:
            line += f"  {r['torch_scan_s'] * 1e3:>15.1f}"
        print(line)
        summary[b] = {k: v for k, v in r.items() if k != "ours_ids"} | {"ours_gb_s": ours_bw}
    print(json.dumps({"bandwidth_gb_s": bandwidth, "by_batch": summary}, default=float))


if __name__ == "__main__":
    main()
