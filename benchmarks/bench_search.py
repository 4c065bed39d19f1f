"""Exact top-k on CPU over N x D fp16 rows: our scans, SQ8 + re-rank, faiss IndexFlatIP, bounds.

One run prints, per data set (uniform and clustered unit vectors) and batch (1 and 64), side by side: ours
(the native fp16 kernel threaded by row ranges, where it runs; GEMM at batch 64), ours SQ8 + exact re-rank by
each SQ8 scan that runs here (the native u8 x s8 kernel, fbgemm's int8 GEMM, faiss's float SQ8 views), the
peer threaded zero-copy faiss SQfp16 scan (our batch-1 scan before the native kernel), faiss IndexFlatIP (an
fp32 copy) and the bandwidth bound (table bytes / the read bandwidth of a multi-threaded torch.sum over the
same table, measured in the same run, before and after the batch-1 timings; the higher is used). Batch 64 also
reports GFLOP/s against a measured fp32 GEMM peak, and fbgemm's int8 GEMM peak. SQ8 recall is measured on noisy
stored rows. On the first data set, a sweep over batches of 1-64 queries times our small-batch scan against the
torch GEMM that larger batches use.
Run: python -m benchmarks.bench_search [--n 1000000] [--dim 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from retriever.index import native
from retriever.index.ann import recall_at_k, recall_queries, same_topk
from retriever.index.backends import (
    SQ8_SCAN_RUNS,
    SQ8_SCANS,
    ExactSearch,
    Int8GemmScan,
    Sq8Search,
    ThreadedScan,
    int8_gemm_available,
    sq8_from_table,
)

GB = 1e9
CPU = torch.device("cpu")


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: page faults, thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_embeddings(n: int, dim: int, kind: str, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """(n, dim) fp16 unit rows: uniform on the sphere, or Gaussian clusters around `clusters` random centres
    (cosine to the centre ~0.7, like real embedding galleries); made in slices, fp32 never held whole."""
    out = np.empty((n, dim), dtype=np.float16)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
    sigma = 1.0 / dim**0.5  # noise of norm ~1 next to a unit centre
    for start in range(0, n, 1 << 16):
        m = min(1 << 16, n - start)
        rows = torch.randn(m, dim, generator=generator)
        if kind == "clustered":
            rows = centres[torch.randint(clusters, (m,), generator=generator)] + sigma * rows
        out[start : start + m] = torch.nn.functional.normalize(rows, dim=1).half().numpy()
    return out


def torch_sum_bandwidth(array: np.ndarray, repeats: int) -> float:
    """GB/s of a multi-threaded torch.sum over the array's bytes (viewed as int64): the read bound."""
    words = torch.from_numpy(array.reshape(-1).view(np.int64))
    return array.nbytes / median_time(lambda: words.sum(), repeats) / GB


def gemm_peak(dim: int, batch: int, repeats: int) -> dict[str, float]:
    """Measured fp32 GEMM GFLOP/s: our shape on a block that fits cache (R x D @ D x Q), and a large sgemm."""
    out = {}
    q = torch.randn(dim, batch)
    for rows in (256, 1024):
        a = torch.randn(rows, dim)
        c = torch.empty(rows, batch)
        t = median_time(lambda a=a, c=c: [torch.mm(a, q, out=c) for _ in range(50)], repeats) / 50
        out[f"mm_{rows}x{dim}x{batch}"] = 2 * rows * dim * batch / t / 1e9
    big = torch.randn(2048, 2048)
    out["sgemm_2048"] = 2 * 2048**3 / median_time(lambda: torch.mm(big, big), repeats) / 1e9
    return out


def int8_gemm_peak(dim: int, batch: int, repeats: int) -> float | None:
    """Measured int8 GOP/s (a multiply-add counted as 2) of fbgemm's GEMM on a block of our shape (16,384 packed
    rows x D, Q queries; 16 MB, about L3-sized): the compute bound of an int8 batch scan; None without fbgemm."""
    if not int8_gemm_available():
        return None
    rows = 16384
    block = np.random.default_rng(0).integers(0, 256, (rows, dim), dtype=np.uint8)
    with warnings.catch_warnings():  # torch marks quantized-tensor constructors deprecated; fbgemm stays
        warnings.simplefilter("ignore")
        packed = Int8GemmScan._pack(block)
    x = torch.randn(batch, dim)
    t = median_time(lambda: [torch.ops.quantized.linear_dynamic(x, packed, True) for _ in range(50)], repeats)
    return 2 * rows * dim * batch / (t / 50) / 1e9


def small_batch_sweep(
    table: np.ndarray, ours: ExactSearch, k: int, repeats: int
) -> dict[int, dict[str, float]]:
    """Seconds per batch of Q queries: our small-batch scan (while Q <= its max_queries) against the chunked
    torch GEMM that larger batches use; where they cross is where ExactSearch should switch."""
    if ours.threaded is None:
        return {}
    print(
        f"small batches: {type(ours.threaded).__name__} (max_queries {ours.threaded.max_queries}) vs torch GEMM"
    )
    rows = {}
    generator = np.random.default_rng(7)
    for batch in (1, 2, 4, 8, 16, 32, 64):
        qs = generator.standard_normal((batch, table.shape[1])).astype(np.float32)
        scan = median_time(lambda qs=qs: ours.threaded.search(qs, k), repeats)
        gemm = median_time(
            lambda qs=qs: ours._torch_topk(torch.from_numpy(qs), k, None), max(1, repeats // 2)
        )
        rows[batch] = {"scan_s": scan, "gemm_s": gemm}
        print(f"  Q={batch:>3}  scan {scan * 1e3:8.1f} ms   GEMM {gemm * 1e3:8.1f} ms", flush=True)
    return rows


def run_dataset(kind: str, args: argparse.Namespace, peak: float, faiss_too: bool) -> dict:
    start = time.perf_counter()
    table = make_embeddings(args.n, args.dim, kind)
    sq8 = sq8_from_table(table)
    made = time.perf_counter() - start
    bw = torch_sum_bandwidth(table, args.repeats)
    bw_int8 = torch_sum_bandwidth(sq8.codes, args.repeats)
    print(
        f"\n[{kind}] {args.n} x {args.dim} fp16 = {table.nbytes / GB:.2f} GB, int8 codes "
        f"{sq8.codes.nbytes / GB:.2f} GB (made in {made:.1f} s); torch.sum read bandwidth "
        f"{bw:.1f} GB/s (fp16 table), {bw_int8:.1f} GB/s (int8 table)"
    )
    ours = ExactSearch(table, CPU, threads=args.threads)
    print(f"ours at batch 1: {type(ours.threaded).__name__} (native kernels here: {native.available()})")
    faiss_threaded = ThreadedScan(table, args.threads)  # the peer: threaded zero-copy faiss SQfp16 views
    compressed = {}
    for scan in [s for s in SQ8_SCANS if SQ8_SCAN_RUNS[s]()]:
        t0 = time.perf_counter()
        compressed[scan] = Sq8Search(
            table, CPU, sq8, rerank_factor=args.rerank_factor, threads=args.threads, scan=scan
        )
        packs = " (packs the codes into fbgemm's layout: once, at load)" if scan == "int8-gemm" else ""
        print(f"SQ8 scan {scan}: ready in {time.perf_counter() - t0:.1f} s{packs}")

    # SQ8 recall: noisy stored rows as queries, SQ8 + re-rank against exact fp16.
    rq = recall_queries(table, args.recall_queries, seed=1)  # (Q, D)
    _, exact_ids = ours.topk(torch.from_numpy(rq), args.k, None)
    recall = {}
    for scan, search in compressed.items():
        t0 = time.perf_counter()
        _, sq8_ids = search.compressed_topk(rq, args.k)
        sq8_ms = 1e3 * (time.perf_counter() - t0) / len(rq)
        recall[scan] = {
            f"recall@{args.k}": recall_at_k(sq8_ids, exact_ids),
            f"same_top{args.k}": same_topk(sq8_ids, exact_ids),
        }
        print(
            f"SQ8 {scan} r={args.rerank_factor} on {len(rq)} noisy rows: recall@{args.k} "
            f"{recall[scan][f'recall@{args.k}']:.4f}, same top-{args.k} {recall[scan][f'same_top{args.k}']:.2%} "
            f"({sq8_ms:.1f} ms/query in one batch of {len(rq)})"
        )

    flat = None
    if faiss_too:
        import faiss

        flat = faiss.IndexFlatIP(args.dim)
        for s in range(0, args.n, 1 << 16):  # IndexFlatIP stores fp32: a second, 2x larger copy
            flat.add(table[s : s + (1 << 16)].astype(np.float32))

    print(f"exact top-{args.k}, median of {args.repeats} after a warm-up (ms)", flush=True)
    names = {"native": "SQ8nat", "int8-gemm": "SQ8gemm", "faiss": "SQ8faiss"}
    print(
        f"{'batch':>5} {'ours':>8} "
        + " ".join(f"{names[s]:>8}" for s in compressed)
        + f" {'faissThr':>9} {'faissFlat':>10} {'bound16':>8} {'bound8':>7}"
        f" {'ours GB/s':>9} {'of bw':>6} {'best/b16':>8} {'GFLOP/s':>8} {'of peak':>7} {'SQ8 GOP/s':>9}"
    )
    rows = {}
    for batch in (1, 64):
        q = torch.from_numpy(np.ascontiguousarray(rq[np.arange(batch) % len(rq)]))
        qn = q.numpy()
        r = {"ours": median_time(lambda q=q: ours.topk(q, args.k, None), args.repeats)}
        for scan, search in compressed.items():
            r[f"sq8_{scan}"] = median_time(
                lambda q=q, search=search: search.topk(q, args.k, None), args.repeats
            )
        r["faiss_threaded"] = (
            median_time(lambda qn=qn: faiss_threaded.search(qn, args.k), args.repeats)
            if batch == 1
            else r["ours"]
        )  # batch 64: the same GEMM path
        if batch == 1:  # the bound after the timings too: the machine's bandwidth drifts (shared hosts)
            bw = max(bw, torch_sum_bandwidth(table, args.repeats))
        if flat is not None:
            reps = args.repeats if batch == 1 else max(1, args.repeats // 3)
            r["faiss_flat"] = median_time(lambda qn=qn: flat.search(qn, args.k), reps)
            same = flat.search(qn, args.k)[1] == ours.topk(q, args.k, None)[1]
            r["faiss_same_ids"] = float(np.mean(same))
        best_sq8 = min(r[f"sq8_{scan}"] for scan in compressed)
        r["bound_fp16"] = table.nbytes / (bw * GB)
        r["bound_int8"] = sq8.codes.nbytes / (bw * GB)
        r["ours_gb_s"] = table.nbytes / r["ours"] / GB
        r["ours_of_bw"] = r["ours_gb_s"] / bw
        r["sq8_of_bound"] = best_sq8 / r["bound_fp16"]
        r["gflops"] = 2 * args.n * args.dim * batch / r["ours"] / 1e9
        r["of_peak"] = r["gflops"] / peak
        r["sq8_gops"] = 2 * args.n * args.dim * batch / best_sq8 / 1e9  # int8 multiply-adds as 2 ops
        rows[batch] = r
        print(
            f"{batch:>5} {r['ours'] * 1e3:>8.1f} "
            + " ".join(f"{r[f'sq8_{s}'] * 1e3:>8.1f}" for s in compressed)
            + f" {r['faiss_threaded'] * 1e3:>9.1f} "
            f"{r.get('faiss_flat', float('nan')) * 1e3:>10.1f} {r['bound_fp16'] * 1e3:>8.1f} "
            f"{r['bound_int8'] * 1e3:>7.1f} {r['ours_gb_s']:>9.1f} {r['ours_of_bw']:>6.0%} "
            f"{r['sq8_of_bound']:>8.2f} {r['gflops']:>8.1f} {r['of_peak']:>7.0%} {r['sq8_gops']:>9.1f}",
            flush=True,
        )
    flat = None  # free the fp32 copy
    sweep = small_batch_sweep(table, ours, args.k, 3) if faiss_too else {}  # the first data set only
    print(
        "(SQ8 columns include the exact fp16 re-rank of k x r candidates; SQ8faiss sends batch 64 to the fp16 "
        "GEMM; faissThr is the threaded faiss SQfp16 scan (batch 64: our GEMM); best/b16 = the faster SQ8 / the "
        "fp16 read bound; bounds are batch-1 read times at the higher of the two bandwidth readings)"
    )
    return {
        "bandwidth_gb_s": bw,
        "bandwidth_int8_gb_s": bw_int8,
        "sq8": recall,
        "by_batch": rows,
        "small": sweep,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery rows")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="scan threads (default torch.get_num_threads())")
    parser.add_argument("--rerank-factor", type=int, default=10)
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument(
        "--data", nargs="+", choices=["uniform", "clustered"], default=["uniform", "clustered"]
    )
    parser.add_argument("--no-faiss", action="store_true", help="skip faiss IndexFlatIP (an fp32 copy)")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__} threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    peaks = gemm_peak(args.dim, 64, args.repeats)
    peak = max(peaks.values())
    print("fp32 GEMM GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + f" (peak {peak:.1f})")
    int8_peak = int8_gemm_peak(args.dim, 64, args.repeats)
    if int8_peak is not None:
        bound = 2 * args.n * args.dim * 64 / (int8_peak * 1e9)
        print(
            f"int8 GEMM GOP/s (fbgemm, 16384 x {args.dim} x 64): {int8_peak:.1f}; batch 64 over {args.n} rows "
            f"at that peak: {bound:.3f} s (the compute bound of an SQ8 batch)"
        )
    summary = {"gemm_gflops": peaks, "int8_gemm_gops": int8_peak}
    for i, kind in enumerate(args.data):
        summary[kind] = run_dataset(kind, args, peak, faiss_too=not args.no_faiss and i == 0)
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
