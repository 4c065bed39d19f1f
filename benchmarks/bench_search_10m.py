"""10M x 1,024 fp16 tiles on this machine: build time, peak memory, cold and warm latency of exact, SQ8, IVF-PQ.

One run writes a memory-mapped fp16 table of clustered unit rows (20.5 GB at 10M), its SQ8 codes (10.2 GB) and
an IVF-PQ index trained on a sample, then measures, side by side: ours exact (the small-batch scan of the memory
map, native or faiss; batch 64 by GEMM), ours SQ8 (the default scan of the memory-mapped codes: the native
kernel where it runs, else faiss; + exact fp16 re-rank) and IVF-PQ (+ exact re-rank; `--ivf none` skips it),
each cold (the files' pages dropped from the page cache with posix_fadvise) and warm, next to the bounds: the table read at the disk's and at RAM's measured sequential bandwidth. Recall@10 of SQ8
and IVF-PQ against exact on the same queries (noisy stored rows). Peak resident memory after each phase.
Run: python -m benchmarks.bench_search_10m [--n 10000000] [--workdir /work/bench10m] [--keep]
(or --phase build, which may run beside other work, then --phase measure on a quiet machine)
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before faiss/torch load OpenMP: spinning crawls on 2 cores

import argparse
import json
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever.index.ann import recall_at_k, recall_queries
from retriever.index.backends import (
    ExactSearch,
    Sq8Codes,
    Sq8Search,
    ann_topk,
    import_faiss,
    sq8_encode,
    sq8_params,
)

GB = 1e9
CHUNK = 1 << 16
CPU = torch.device("cpu")


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024 / GB


def drop_cache(*paths: Path) -> None:
    """Evict the files' clean pages from the page cache, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_table(path: Path, n: int, dim: int, clusters: int = 4096, seed: int = 0) -> float:
    """(n, dim) fp16 clustered unit rows into a .npy memory map, chunk by chunk; seconds.

    A row is a random centre plus noise drawn from a fixed bank of 65,536 Gaussian rows (shuffled, sign-flipped
    per chunk): generating 10G fresh Gaussians would take longer than the benchmark itself.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    bank = rng.standard_normal((CHUNK, dim)).astype(np.float32) * 0.9  # noise ~ centre: cosine ~0.75
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in tqdm(range(0, n, CHUNK), desc="writing fp16 rows", unit="chunk"):
        hi = min(n, lo + CHUNK)
        noise = bank[rng.permutation(CHUNK)[: hi - lo]] * rng.choice([-1.0, 1.0], size=(1, dim)).astype(
            np.float32
        )
        x = centres[rng.integers(clusters, size=hi - lo)] + noise  # (C, D)
        table[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    table.flush()
    del table
    return time.perf_counter() - start


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def warm_median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def disk_bandwidth(path: Path, nbytes: int = 4 << 30) -> float:
    """GB/s of a cold sequential read of the file's first nbytes (16 MB reads)."""
    drop_cache(path)
    read = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while read < nbytes and (block := f.read(16 << 20)):
            read += len(block)
    return read / (time.perf_counter() - start) / GB


def ram_bandwidth(table: np.ndarray, rows: int, repeats: int) -> float:
    """GB/s of a multi-threaded torch.sum over the first rows of the table, once they are resident."""
    words = torch.from_numpy(np.ascontiguousarray(table[:rows]).reshape(-1).view(np.int64))
    return words.numel() * 8 / warm_median(lambda: words.sum(), repeats) / GB


def build_files(
    args: argparse.Namespace, table_path: Path, codes_path: Path, params_path: Path, ivf_path: Path
) -> dict:
    """Write the fp16 table, its SQ8 codes and params, and the trained, filled IVF-PQ index; seconds and peak RSS."""
    faiss = import_faiss()
    build = {"table_s": write_table(table_path, args.n, args.dim)}
    table = np.load(table_path, mmap_mode="r")  # (N, D) fp16, on disk
    start = time.perf_counter()
    offset, scale = sq8_params(table)
    codes = np.lib.format.open_memmap(codes_path, mode="w+", dtype=np.uint8, shape=table.shape)
    sq8_encode(table, offset, scale, codes)
    codes.flush()
    del codes
    np.save(params_path, np.stack([offset, scale]))
    build["sq8_codes_s"] = time.perf_counter() - start
    build.update(factory=args.ivf, ivf_train_s=0.0, ivf_add_s=0.0)
    if args.ivf != "none":
        start = time.perf_counter()
        ivf = faiss.index_factory(args.dim, args.ivf, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).choice(args.n, args.train_sample, replace=False))
        ivf.train(np.asarray(table[sample], dtype=np.float32))
        build["ivf_train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for lo in tqdm(range(0, args.n, CHUNK), desc=f"adding to {args.ivf}", unit="chunk"):
            ivf.add(np.asarray(table[lo : lo + CHUNK], dtype=np.float32))
        faiss.write_index(ivf, str(ivf_path))
        build["ivf_add_s"] = time.perf_counter() - start
    build["peak_rss_gb"] = peak_rss_gb()
    build["threads"] = torch.get_num_threads()
    return build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench10m"))
    parser.add_argument(
        "--ivf",
        default="IVF1024,PQ64np",
        help="faiss factory (np: no polysemous training, slow and unused); none: no IVF-PQ",
    )
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--ann-rerank", type=int, default=10, help="IVF-PQ: re-rank k x this exactly")
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20, help="recall queries (noisy stored rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the 30 GB of files")
    parser.add_argument(
        "--phase",
        choices=["all", "build", "measure"],
        default="all",
        help="build: write the files and keep them; measure: time the kept files (quiet machine)",
    )
    args = parser.parse_args(argv)
    faiss = import_faiss()
    args.workdir.mkdir(parents=True, exist_ok=True)
    table_path, codes_path = args.workdir / "embeddings.npy", args.workdir / "sq8_codes.npy"
    params_path, ivf_path, built_path = (
        args.workdir / f for f in ("sq8_params.npy", "ivf.faiss", "build.json")
    )
    report: dict[str, object] = {"n": args.n, "dim": args.dim, "threads": torch.get_num_threads()}
    try:
        if args.phase in ("all", "build"):
            build = build_files(args, table_path, codes_path, params_path, ivf_path)
            built_path.write_text(json.dumps(build))
            if args.phase == "build":
                print(json.dumps(build, indent=1))
                return
        build = json.loads(built_path.read_text())
        table = np.load(table_path, mmap_mode="r")  # (N, D) fp16, on disk
        offset, scale = np.load(params_path)
        ivf = faiss.read_index(str(ivf_path)) if build["factory"] != "none" else None
        if ivf is not None:
            faiss.ParameterSpace().set_index_parameters(ivf, f"nprobe={args.nprobe}")
        sizes = {
            "table_gb": table_path.stat().st_size / GB,
            "sq8_gb": codes_path.stat().st_size / GB,
            "ivf_gb": ivf_path.stat().st_size / GB if ivf is not None else 0.0,
        }
        report.update(build=build, sizes=sizes)
        print(json.dumps(report, indent=1), flush=True)

        bounds = {"disk_gb_s": disk_bandwidth(table_path)}
        bounds["ram_gb_s"] = ram_bandwidth(table, min(args.n, 1_000_000), args.repeats)
        bounds["exact_disk_s"] = table.nbytes / (bounds["disk_gb_s"] * GB)
        bounds["exact_ram_s"] = table.nbytes / (bounds["ram_gb_s"] * GB)
        bounds["int8_ram_s"] = table.nbytes / 2 / (bounds["ram_gb_s"] * GB)
        report["bounds"] = bounds
        print(json.dumps(bounds), flush=True)

        queries = recall_queries(table, args.queries, seed=1)  # (Q, D) fp32
        one, batch = torch.from_numpy(queries[:1]), torch.from_numpy(queries[np.arange(64) % len(queries)])
        rows: dict[str, dict[str, float]] = {}

        # -- exact: the memory-mapped fp16 table ------------------------------------------------------------
        exact = ExactSearch(table, CPU)
        drop_cache(table_path)
        rows["exact"] = {"cold_1_s": timed(lambda: exact.topk(one, args.k, None))}
        _, exact_ids = exact.topk(torch.from_numpy(queries), args.k, None)  # (Q, k): the truth
        rows["exact"]["warm_1_s"] = warm_median(lambda: exact.topk(one, args.k, None), args.repeats)
        rows["exact"]["warm_64_s"] = warm_median(lambda: exact.topk(batch, args.k, None), 1)
        rows["exact"]["rss_gb"] = rss_gb()
        print("exact", json.dumps(rows["exact"]), flush=True)

        # -- SQ8: the codes scanned in place (int8-gemm: a packed copy), re-rank from the memory map ---------
        def measure_sq8() -> dict[str, float]:
            drop_cache(table_path)
            codes = Sq8Codes(np.load(codes_path, mmap_mode="r"), offset, scale)
            start = time.perf_counter()
            sq8 = Sq8Search(table, CPU, codes, rerank_factor=10)  # the default scan for codes of this size
            row = {"pack_s": time.perf_counter() - start}
            print(f"SQ8 scan: {sq8.scan_name}", flush=True)
            drop_cache(table_path, codes_path)
            row["cold_1_s"] = timed(lambda: sq8.topk(one, args.k, None))  # re-rank rows come from the disk
            _, ids = sq8.topk(torch.from_numpy(queries), args.k, None)
            row["recall@10"] = recall_at_k(ids, exact_ids)
            row["same_top10"] = float(np.mean(np.all(ids == exact_ids, axis=1)))
            row["warm_1_s"] = warm_median(lambda: sq8.topk(one, args.k, None), args.repeats)
            row["warm_64_s"] = warm_median(lambda: sq8.topk(batch, args.k, None), 1)
            row["rss_gb"] = rss_gb()
            return row  # the packed copy is freed on return

        rows["sq8"] = measure_sq8()
        print("sq8", json.dumps(rows["sq8"]), flush=True)

        # -- IVF-PQ in RAM, re-rank from the memory map ------------------------------------------------------
        if ivf is not None:
            drop_cache(table_path)
            q1 = queries[:1]

            def ann(q: np.ndarray) -> object:
                return ann_topk(ivf, table, q, args.k, args.ann_rerank)

            rows["ivf_pq"] = {"cold_1_s": timed(lambda: ann(q1))}
            _, ids = ann(queries)
            rows["ivf_pq"]["recall@10"] = recall_at_k(ids, exact_ids)
            rows["ivf_pq"]["warm_1_s"] = warm_median(lambda: ann(q1), args.repeats)
            rows["ivf_pq"]["warm_64_s"] = warm_median(lambda: ann(batch.numpy()), 1)
            rows["ivf_pq"]["rss_gb"] = rss_gb()
            print("ivf_pq", json.dumps(rows["ivf_pq"]), flush=True)
        report["search"] = rows
        report["peak_rss_gb"] = peak_rss_gb()

        print(f"\n{args.n:,} x {args.dim} fp16 ({sizes['table_gb']:.1f} GB), threads={report['threads']}")
        print(
            f"build: table {build['table_s']:.0f} s, SQ8 codes {build['sq8_codes_s']:.0f} s, {build['factory']} train "
            f"{build['ivf_train_s']:.0f} s + add {build['ivf_add_s']:.0f} s, SQ8 pack {rows['sq8']['pack_s']:.0f} s"
        )
        print(
            f"bounds: disk {bounds['disk_gb_s']:.2f} GB/s -> fp16 table {bounds['exact_disk_s']:.1f} s; RAM "
            f"{bounds['ram_gb_s']:.1f} GB/s -> fp16 {bounds['exact_ram_s'] * 1e3:.0f} ms, int8 "
            f"{bounds['int8_ram_s'] * 1e3:.0f} ms"
        )
        print(f"{'method':>8} {'cold b1':>9} {'warm b1':>9} {'warm b64':>9} {'recall@10':>9} {'RSS GB':>7}")
        for name, r in rows.items():
            print(
                f"{name:>8} {r['cold_1_s'] * 1e3:>7.0f}ms {r['warm_1_s'] * 1e3:>7.0f}ms "
                f"{r['warm_64_s'] * 1e3:>7.0f}ms {r.get('recall@10', 1.0):>9.3f} {r['rss_gb']:>7.1f}"
            )
        print(f"peak RSS {report['peak_rss_gb']:.1f} GB")
        print(json.dumps(report, default=float))
    finally:
        if not args.keep and args.phase != "build":
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
