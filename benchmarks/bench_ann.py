"""ANN vs exact search at N synthetic 1,024-d fp16 vectors: build time, memory, p50 latency, recall@10.

Writes a synthetic index folder (memory-mapped fp16 embeddings, a tile table, a manifest), then measures
exact search (TileIndex, backend "torch": zero-copy faiss SQfp16 scan for one query), IVF-PQ and HNSW built
by `retriever.index.optimize_index`. HNSW with flat fp32 storage builds at ~2k vectors/s at 1,024-d on 2
cores, so it runs on the first --hnsw-n rows (default: all) in a folder of its own.
Run: python -m benchmarks.bench_ann [--n 1000000] [--train-sample 100000] [--hnsw-n 200000]
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before faiss/torch load OpenMP: spinning threads crawl on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever._io import library_versions
from retriever.index import (
    EMBEDDINGS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TILES,
    TileIndex,
    optimize_index,
    recall_at_k,
    recall_queries,
)
from retriever.index.tiles import make_tiles_frame, square_footprints

GB = 1e9
CHUNK = 1 << 16


def rss_gb() -> float:
    """Resident memory of this process now (file-backed pages of the memory map included)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / GB


def write_gallery(folder: Path, n: int, dim: int, clusters: int, latent: int = 64, seed: int = 0) -> float:
    """A synthetic index folder: n clustered unit vectors (fp16, written in chunks) and point tiles; seconds.

    Vectors: a cluster centre + a spread in a random latent-dim subspace + small isotropic noise (embeddings
    have a low intrinsic dimension); latent=0 gives isotropic noise, the worst case for PQ.
    """
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)  # (C, D)
    basis = rng.standard_normal((max(latent, 1), dim)).astype(np.float32) * (
        0.5 * math.sqrt(dim / max(latent, 1))
    )
    table = np.lib.format.open_memmap(folder / EMBEDDINGS, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in tqdm(range(0, n, CHUNK), desc="writing vectors", unit="chunk"):
        hi = min(n, lo + CHUNK)
        x = centres[rng.integers(clusters, size=hi - lo)]  # (C', D)
        if latent:
            x += rng.standard_normal((hi - lo, latent), dtype=np.float32) @ basis  # (C', D)
            x += 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
        else:
            x += 0.7 * rng.standard_normal(x.shape, dtype=np.float32)
        table[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    table.flush()
    del table
    lat, lon = 60.0 + rng.random(n) * 2, 24.0 + rng.random(n) * 4
    ids = [f"t{i:08d}" for i in range(n)]
    tiles = make_tiles_frame(
        ids, square_footprints(lat, lon, 100.0), [f"/synthetic/{i}.png" for i in ids], lat, lon
    )
    tiles.assign(thumbnail=None).to_parquet(folder / TILES)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "retriever": {"family": "synthetic"},
        "load": None,
        "n": n,
        "dim": dim,
        "dtype": "fp16",
        "embeddings": {"file": EMBEDDINGS, "bytes": (folder / EMBEDDINGS).stat().st_size, "sha256": None},
        "tiles": {"file": TILES, "columns": [str(c) for c in tiles.columns], "context_columns": []},
        "thumbnails": None,
        "versions": library_versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return time.perf_counter() - start


def p50_ms(index: TileIndex, queries: np.ndarray, k: int = 10) -> float:
    """Median wall time of one single-query search (Hits included), after one warm-up query."""
    index.search(queries[0], k)
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(
    folder: Path, name: str, latency_queries: np.ndarray, exact_ids: np.ndarray, **load: object
) -> dict:
    before = rss_gb()
    start = time.perf_counter()
    index = TileIndex.load(folder, **load)
    load_s = time.perf_counter() - start
    row = {"method": name, "backend": index.backend_name, "load_s": round(load_s, 2)}
    row["p50_ms"] = round(p50_ms(index, latency_queries), 3)
    _, ids = index.backend.topk(torch.from_numpy(latency_queries), 10, None)
    row["recall@10"] = round(recall_at_k(ids, exact_ids), 4)
    row["rss_gb_after"] = round(rss_gb(), 2)
    row["rss_gb_added"] = round(rss_gb() - before, 2)
    return row


def run_ann(folder: Path, factory: str, args: argparse.Namespace, lat_q: np.ndarray, **knobs: object) -> dict:
    before = rss_gb()
    entry = optimize_index(folder, factory, train_sample=args.train_sample, num_queries=args.queries, **knobs)
    print(json.dumps(entry), flush=True)
    exact = TileIndex.load(folder, exact=True)
    _, exact_ids = exact.backend.topk(torch.from_numpy(lat_q), 10, None)
    del exact
    row = measure(folder, f"{factory} rerank={entry['rerank']}", lat_q, exact_ids)
    n = json.loads((folder / MANIFEST).read_text())["n"]
    row.update(
        n=n,
        build_s=entry["build_seconds"],
        train_s=entry["train_seconds"],
        build_rss_gb_added=round(rss_gb() - before, 2),
        manifest_recall=entry["recall@10"],
        params=entry["params"],
        index_gb=round(entry["bytes"] / GB, 3),
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=1000, help="synthetic cluster centres")
    parser.add_argument("--latent-dim", type=int, default=64, help="intrinsic dimension; 0 = isotropic noise")
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--ivf", default="IVF1024,PQ64", help="IVF-PQ factory string")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument(
        "--rerank", type=int, default=10, help="IVF-PQ: re-score k x RERANK candidates exactly"
    )
    parser.add_argument("--sweep", action="store_true", help="IVF: recall and p50 for nprobe x rerank")
    parser.add_argument("--methods", default="ivf,hnsw", help="comma list of ivf, hnsw (exact always runs)")
    parser.add_argument("--hnsw", default="HNSW32", help="HNSW factory string")
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--hnsw-n", type=int, help="build HNSW on the first rows only (default: all)")
    parser.add_argument("--queries", type=int, default=200, help="recall queries at build time")
    parser.add_argument("--latency-queries", type=int, default=30)
    parser.add_argument("--workdir", type=Path, help="where the synthetic index goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic index folders")
    args = parser.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ann_"))
    rows: list[dict] = []
    try:
        gallery = root / f"gallery_{args.n}"
        gen_s = write_gallery(gallery, args.n, args.dim, args.clusters, args.latent_dim)
        print(
            f"wrote {args.n} x {args.dim} fp16 ({args.n * args.dim * 2 / GB:.2f} GB) in {gen_s:.1f} s",
            flush=True,
        )
        embeddings = np.load(gallery / EMBEDDINGS, mmap_mode="r")
        lat_q = recall_queries(embeddings, args.latency_queries, seed=123)  # (Q, D) noisy stored rows
        del embeddings

        exact = TileIndex.load(gallery, exact=True)
        _, exact_ids = exact.backend.topk(torch.from_numpy(lat_q), 10, None)
        del exact
        row = measure(gallery, "exact (torch/faiss-view, fp16 mmap)", lat_q, exact_ids, exact=True)
        rows.append({**row, "n": args.n, "build_s": 0.0, "index_gb": round(args.n * args.dim * 2 / GB, 3)})
        print(json.dumps(rows[-1]), flush=True)

        if "ivf" in args.methods:
            rows.append(run_ann(gallery, args.ivf, args, lat_q, nprobe=args.nprobe, rerank=args.rerank))
            print(json.dumps(rows[-1]), flush=True)
            if args.rerank > 1:  # the same trained index without the exact re-score
                row = measure(gallery, f"{args.ivf} rerank=0", lat_q, exact_ids, rerank=0)
                rows.append({**rows[-1], **row, "manifest_recall": "-"})
                print(json.dumps(rows[-1]), flush=True)
            if args.sweep:
                sweep(gallery, lat_q, exact_ids)
        if "hnsw" in args.methods:
            hnsw_n = min(args.hnsw_n or args.n, args.n)
            hnsw_folder = gallery
            if hnsw_n < args.n:  # same distribution, fewer rows
                hnsw_folder = root / f"gallery_{hnsw_n}"
                write_gallery(hnsw_folder, hnsw_n, args.dim, args.clusters, args.latent_dim)
            hnsw_q = recall_queries(
                np.load(hnsw_folder / EMBEDDINGS, mmap_mode="r"), args.latency_queries, seed=123
            )
            rows.append(run_ann(hnsw_folder, args.hnsw, args, hnsw_q, ef_search=args.ef_search))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return report(rows)


def sweep(folder: Path, queries: np.ndarray, exact_ids: np.ndarray) -> None:
    """Search-time recall/latency trade-off of the trained IVF index: nprobe x rerank, no rebuild."""
    print("\n| nprobe | rerank | recall@10 | p50 ms |\n|---|---|---|---|")
    for nprobe in (16, 64, 256):
        for rerank in (0, 10, 50):
            index = TileIndex.load(folder, params=f"nprobe={nprobe}", rerank=rerank)
            _, ids = index.backend.topk(torch.from_numpy(queries), 10, None)
            print(
                f"| {nprobe} | {rerank} | {recall_at_k(ids, exact_ids):.3f} | {p50_ms(index, queries):.2f} |",
                flush=True,
            )


def report(rows: list[dict]) -> int:
    """Print the rows as a markdown table."""
    print(
        "\n| method | N | build s | index GB | RSS added GB (build/search) | p50 ms | recall@10 (build / latency q) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['n']:,} | {r['build_s']} | {r['index_gb']} | "
            f"{r.get('build_rss_gb_added', 0)} / {r['rss_gb_added']} | {r['p50_ms']} | "
            f"{r.get('manifest_recall', 1.0)} / {r['recall@10']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
