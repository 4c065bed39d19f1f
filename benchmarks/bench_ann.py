"""ANN vs exact search on real demo embeddings or N synthetic clustered vectors: recall@10 / p50 curves.

--gallery demo: the demo area rendered at a fine stride with offsets and rotations and embedded by the demo
model (benchmarks/bench_ann_demo.py; cached under /tmp), queried with the description sets' embeddings.
--gallery synthetic: N clustered 1,024-d unit vectors, queried with noisy stored rows.
Either is written as an index folder (memory-mapped fp16 table, tiles, manifest). Exact search (TileIndex,
backend "torch": the zero-copy faiss SQfp16 scan for one query) is the peer, measured in the same run. Then
IVF-PQ (+ exact re-rank), IVF-SQ8 and HNSW are built by `retriever.index.optimize_index` and swept over their
search parameters without a rebuild: recall@10 against exact search and the p50 of a one-query search (Hits
included). Last, `optimize_index(folder)` without a factory builds the default (ann.default_ann).
HNSW with flat fp32 storage builds at ~1k vectors/s at 1,024-d on 1 core, so at 1M it runs on the first
--hnsw-n rows in a folder of its own. Figures and the defaults drawn from them: docs in ann.default_ann.
Run: python -m benchmarks.bench_ann [--gallery demo|synthetic] [--n 1000000] [--hnsw-n 200000] [--threads 1]
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before faiss/torch load OpenMP: spinning threads crawl on shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from retriever._io import library_versions  # noqa: E402
from retriever.index import (  # noqa: E402
    ANN_FILE,
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
from retriever.index.ann import default_ann, ivf_lists  # noqa: E402
from retriever.index.backends import import_faiss  # noqa: E402
from retriever.index.tiles import make_tiles_frame, square_footprints  # noqa: E402

GB = 1e9
CHUNK = 1 << 16
K = 10
# Search-time sweeps: one build per factory, then these params (x re-rank) on the same trained index.
NPROBES = (4, 8, 16, 32, 64, 128)
PQ_RERANKS = (0, 10, 20)
SQ8_RERANKS = (0, 2)
EF_SEARCHES = (16, 32, 64, 128, 256)


def rss_gb() -> float:
    """Resident memory of this process now (file-backed pages of the memory map included)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / GB


def write_folder(
    folder: Path,
    n: int,
    dim: int,
    fill: Callable[[np.ndarray], None],
    lat: np.ndarray,
    lon: np.ndarray,
    side_m: float = 100.0,
    retriever: dict | None = None,
) -> None:
    """An index folder that TileIndex.load and optimize_index read: fill writes the (n, dim) fp16 memory map."""
    folder.mkdir(parents=True, exist_ok=True)
    table = np.lib.format.open_memmap(folder / EMBEDDINGS, mode="w+", dtype=np.float16, shape=(n, dim))
    fill(table)
    table.flush()
    del table
    ids = [f"t{i:08d}" for i in range(n)]
    tiles = make_tiles_frame(
        ids, square_footprints(lat, lon, side_m), [f"/synthetic/{i}.png" for i in ids], lat, lon
    )
    tiles.assign(thumbnail=None).to_parquet(folder / TILES)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "retriever": retriever or {"family": "synthetic"},
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


def write_gallery(folder: Path, n: int, dim: int, clusters: int, latent: int = 64, seed: int = 0) -> float:
    """A synthetic index folder: n clustered unit vectors (fp16, written in chunks) and point tiles; seconds.

    Vectors: a cluster centre + a spread in a random latent-dim subspace + small isotropic noise (embeddings
    have a low intrinsic dimension); latent=0 gives isotropic noise, the worst case for PQ.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)  # (C, D)
    basis = rng.standard_normal((max(latent, 1), dim)).astype(np.float32) * (
        0.5 * math.sqrt(dim / max(latent, 1))
    )

    def fill(table: np.ndarray) -> None:
        for lo in tqdm(range(0, n, CHUNK), desc="writing vectors", unit="chunk"):
            hi = min(n, lo + CHUNK)
            x = centres[rng.integers(clusters, size=hi - lo)]  # (C', D)
            if latent:
                x += rng.standard_normal((hi - lo, latent), dtype=np.float32) @ basis  # (C', D)
                x += 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
            else:
                x += 0.7 * rng.standard_normal(x.shape, dtype=np.float32)
            table[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)

    lat, lon = 60.0 + rng.random(n) * 2, 24.0 + rng.random(n) * 4
    write_folder(folder, n, dim, fill, lat, lon)
    return time.perf_counter() - start


def demo_cached_n() -> int:
    from benchmarks.bench_ann_demo import cached_n

    return cached_n()


def write_demo_gallery(folder: Path, n: int, threads: int) -> tuple[np.ndarray, float]:
    """The demo embeddings (bench_ann_demo; embedded only where not cached) as an index folder; (Q, D) queries."""
    from benchmarks import bench_ann_demo as demo

    start = time.perf_counter()
    queries = demo.embed_queries(threads=threads)  # {set: (Q_s, D)}
    table, specs, fingerprint = demo.embed_gallery(n, threads=threads)  # (n, D) fp16, (n, 3)
    lat, lon = demo.lat_lon(specs)

    def fill(out: np.ndarray) -> None:
        out[:] = table

    write_folder(folder, len(table), table.shape[1], fill, lat, lon, demo.TILE_M, fingerprint)
    q = np.concatenate([queries[name] for name in demo.QUERY_FILES]).astype(np.float32)  # (Q, D)
    print(f"queries: { ({k: len(v) for k, v in queries.items()}) }", flush=True)
    return q, time.perf_counter() - start


def p50_ms(index: TileIndex, queries: np.ndarray, k: int = K) -> float:
    """Median wall time of one single-query search (Hits included), after one warm-up query."""
    index.search(queries[0], k)
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def exact_peer(folder: Path, queries: np.ndarray, lat_q: np.ndarray) -> tuple[np.ndarray, dict]:
    """Exact top-k ids of every query (Q, k) and the exact search's row: the peer of every ANN figure."""
    before = rss_gb()
    index = TileIndex.load(folder, exact=True)
    _, exact_ids = index.backend.topk(torch.from_numpy(queries), K, None)
    n, dim = index.n, index.dim
    row = {
        "method": "exact (faiss SQfp16 view of the fp16 mmap)",
        "params": "-",
        "rerank": 0,
        "n": n,
        "build_s": 0.0,
        "index_gb": round(n * dim * 2 / GB, 3),
        "p50_ms": round(p50_ms(index, lat_q), 3),
        "recall@10": 1.0,
        "rss_gb_added": round(rss_gb() - before, 2),
    }
    return exact_ids, row


def curve(
    folder: Path,
    factory: str,
    sweep: list[tuple[str, int]],
    queries: np.ndarray,
    lat_q: np.ndarray,
    exact_ids: np.ndarray,
    args: argparse.Namespace,
) -> list[dict]:
    """Build factory once (optimize_index), then recall@10 and p50 for each (params, rerank) of sweep."""
    faiss = import_faiss()
    before = rss_gb()
    params, rerank = sweep[0]
    entry = optimize_index(
        folder,
        factory,
        train_sample=args.train_sample,
        num_queries=args.queries,
        params=params,
        rerank=rerank,
    )
    print(json.dumps(entry), flush=True)
    index = TileIndex.load(folder)  # the ann.faiss just written, read into memory
    loaded = rss_gb() - before
    rows = []
    for params, rerank in sweep:
        faiss.ParameterSpace().set_index_parameters(index.backend.index, params)
        index.backend.rerank = rerank
        _, ids = index.backend.topk(torch.from_numpy(queries), K, None)
        rows.append(
            {
                "method": factory,
                "params": params,
                "rerank": rerank,
                "n": index.n,
                "build_s": entry["build_seconds"],
                "index_gb": round(entry["bytes"] / GB, 3),
                "p50_ms": round(p50_ms(index, lat_q), 3),
                "recall@10": round(recall_at_k(ids, exact_ids), 4),
                "rss_gb_added": round(loaded, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (folder / ANN_FILE).unlink()  # the next factory's build starts from a plain folder
    return rows


def default_row(
    folder: Path, queries: np.ndarray, lat_q: np.ndarray, exact_ids: np.ndarray, args: argparse.Namespace
) -> dict:
    """optimize_index without a factory: the rule's choice, its manifest recall and the measured one."""
    entry = optimize_index(folder, train_sample=args.train_sample, num_queries=args.queries)
    print(json.dumps(entry), flush=True)
    index = TileIndex.load(folder)
    _, ids = index.backend.topk(torch.from_numpy(queries), K, None)
    return {
        "method": f"default: {entry['factory']} ({entry['default_rule']})",
        "params": entry["params"],
        "rerank": entry["rerank"],
        "n": index.n,
        "build_s": entry["build_seconds"],
        "index_gb": round(entry["bytes"] / GB, 3),
        "p50_ms": round(p50_ms(index, lat_q), 3),
        "recall@10": round(recall_at_k(ids, exact_ids), 4),
        "manifest_recall": entry["recall@10"],
        "rss_gb_added": "-",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", choices=("synthetic", "demo"), default="synthetic")
    parser.add_argument("--n", type=int, help="rows (default: 1,000,000 synthetic; demo: all cached tiles)")
    parser.add_argument("--dim", type=int, default=1024, help="synthetic only")
    parser.add_argument("--clusters", type=int, default=1000, help="synthetic cluster centres")
    parser.add_argument("--latent-dim", type=int, default=64, help="intrinsic dimension; 0 = isotropic noise")
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--ivf", help="IVF-PQ factory (default: IVF{ivf_lists(N)},PQ{D/16})")
    parser.add_argument("--sq8", help="IVF-SQ8 factory (default: IVF{ivf_lists(N)},SQ8)")
    parser.add_argument("--hnsw", default="HNSW32", help="HNSW factory string")
    parser.add_argument(
        "--methods", default="ivfpq,ivfsq8,hnsw,default", help="comma list (exact always runs)"
    )
    parser.add_argument(
        "--hnsw-n", type=int, help="synthetic: build HNSW on the first rows only (default: all)"
    )
    parser.add_argument("--queries", type=int, default=500, help="noisy-row recall queries at build time")
    parser.add_argument("--latency-queries", type=int, default=300, help="queries timed one by one")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    parser.add_argument("--workdir", type=Path, help="where the index folders go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the index folders")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ann_"))
    rows: list[dict] = []
    try:
        if args.gallery == "demo":
            n = args.n or demo_cached_n() or 50_000  # default: what the cache holds, no embedding
            gallery = root / f"demo_{n}"
            queries, gen_s = write_demo_gallery(gallery, n, args.threads)  # (Q, D) text queries
        else:
            n = args.n or 1_000_000
            gallery = root / f"gallery_{n}"
            gen_s = write_gallery(gallery, n, args.dim, args.clusters, args.latent_dim)
            queries = recall_queries(np.load(gallery / EMBEDDINGS, mmap_mode="r"), args.queries, seed=123)
        n, dim = np.load(gallery / EMBEDDINGS, mmap_mode="r").shape
        print(f"{args.gallery}: {n} x {dim} fp16 ({n * dim * 2 / GB:.3f} GB) in {gen_s:.1f} s", flush=True)
        lat_q = queries[: args.latency_queries]  # (Q', D)

        exact_ids, row = exact_peer(gallery, queries, lat_q)
        rows.append(row)
        print(json.dumps(row), flush=True)
        lists = ivf_lists(n)
        nprobes = [p for p in NPROBES if p <= lists]
        methods = args.methods.split(",")
        if "ivfpq" in methods:
            factory = args.ivf or f"IVF{lists},PQ{dim // 16}"
            sweep = [(f"nprobe={p}", r) for r in PQ_RERANKS for p in nprobes]
            rows += curve(gallery, factory, sweep, queries, lat_q, exact_ids, args)
        if "ivfsq8" in methods:
            sweep = [(f"nprobe={p}", r) for r in SQ8_RERANKS for p in nprobes]
            rows += curve(gallery, args.sq8 or f"IVF{lists},SQ8", sweep, queries, lat_q, exact_ids, args)
        if "hnsw" in methods:
            hnsw_n = min(args.hnsw_n or n, n)
            folder, q, lq, ids = gallery, queries, lat_q, exact_ids
            if hnsw_n < n:  # same distribution, fewer rows: its own queries and exact peer
                folder = root / f"gallery_{hnsw_n}"
                write_gallery(folder, hnsw_n, dim, args.clusters, args.latent_dim)
                q = recall_queries(np.load(folder / EMBEDDINGS, mmap_mode="r"), args.queries, seed=123)
                lq = q[: args.latency_queries]
                ids, row = exact_peer(folder, q, lq)
                rows.append(row)
            sweep = [(f"efSearch={e}", 0) for e in EF_SEARCHES]
            rows += curve(folder, args.hnsw, sweep, q, lq, ids, args)
        if "default" in methods:
            print(f"default for N={n}, D={dim}: {default_ann(n, dim)}", flush=True)
            rows.append(default_row(gallery, queries, lat_q, exact_ids, args))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return report(rows, args.threads)


def report(rows: list[dict], threads: int) -> int:
    """Print the rows as a markdown table."""
    print(f"\n{threads} thread(s); recall@10 vs exact top-10; p50 of one-query searches (Hits included)")
    print("| method | params | rerank | N | build s | index GB | RSS added GB | p50 ms | recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        recall = r["recall@10"]
        if "manifest_recall" in r:
            recall = f"{recall} (manifest {r['manifest_recall']})"
        print(
            f"| {r['method']} | {r['params']} | {r['rerank']} | {r['n']:,} | {r['build_s']} | {r['index_gb']} | "
            f"{r['rss_gb_added']} | {r['p50_ms']} | {recall} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
