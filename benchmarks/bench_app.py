"""App figures: cold start (import + load + build_demo) and p50/p95 search latency through the callback."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # run as `python -m benchmarks.bench_app` from the repository


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def fake_backend(folder: Path):
    """FakeRetriever and a 64-tile index: measures the app's own overhead, not a model."""
    import geopandas as gpd
    from shapely.geometry import box

    from retriever.index import TileIndex, build_index
    from tests.fakes import COLOURS, FakeRetriever, solid_tile

    retriever = FakeRetriever()
    rows = []
    for i in range(64):
        lat, lon = 60.160 + 0.0012 * (i // 8), 24.930 + 0.0024 * (i % 8)
        path = folder / f"tile_{i:03d}.png"
        solid_tile(COLOURS[i % len(COLOURS)], 256).save(path)
        rows.append(
            (f"t{i:03d}", lat, lon, str(path), box(lon - 0.0012, lat - 0.0006, lon + 0.0012, lat + 0.0006))
        )
    frame = gpd.GeoDataFrame(
        {"tile_id": [r[0] for r in rows], "lat": [r[1] for r in rows], "lon": [r[2] for r in rows]}
        | {"image_path": [r[3] for r in rows]},
        geometry=[r[4] for r in rows],
        crs="EPSG:4326",
    )
    index = TileIndex.load(
        build_index(retriever, frame, folder / "index", progress=False), retriever=retriever
    )
    return retriever, index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog="Other flags are the app's (python app.py --help)."
    )
    parser.add_argument("--n", type=int, default=40, help="searches to time (default 40)")
    parser.add_argument("--k", type=int, default=5, help="results per search (default 5)")
    parser.add_argument(
        "--fake", action="store_true", help="use the fake retriever even when a model is configured"
    )
    args, app_argv = parser.parse_known_args(argv)

    t0 = time.perf_counter()
    from app import callbacks
    from app.config import load_backend, parse_config
    from app.ui import build_demo

    t_import = time.perf_counter() - t0

    config = parse_config(app_argv)
    t1 = time.perf_counter()
    backend = None if args.fake else load_backend(config)
    what = f"model {config.model}, index {config.index}"
    if backend is None or backend.retriever is None:
        if backend is not None:
            print(f"configured backend unavailable, using the fake one ({what})")
        scratch = tempfile.TemporaryDirectory()
        retriever, index = fake_backend(Path(scratch.name))
        explainer, what = None, "fake retriever, 64-tile index (no model: app overhead only)"
    else:
        retriever, index, explainer = backend.retriever, backend.index, backend.explainer
    t_load = time.perf_counter() - t1

    t2 = time.perf_counter()
    demo = build_demo(retriever, index, explainer, config.examples)
    t_build = time.perf_counter() - t2
    engine = callbacks.make_engine(retriever, index, explainer, config.hybrid)  # the app's own ranking

    queries = [config.examples[i % len(config.examples)] for i in range(args.n)]
    callbacks.search(queries[0], args.k, "", engine)  # warm-up: first-call allocations and caches
    total, rank_only = [], []
    for query in queries:
        t = time.perf_counter()
        engine.rank(query, args.k, None)
        rank_only.append(time.perf_counter() - t)
        t = time.perf_counter()
        view = callbacks.search(query, args.k, "", engine)
        total.append(time.perf_counter() - t)
        assert view.state.hits, view.status

    print(f"backend: {what}")
    print(
        f"cold start: {t_import + t_load + t_build:.2f} s (import {t_import:.2f} s, load {t_load:.2f} s, build_demo {t_build:.2f} s)"
    )
    print(f"search, N={args.n} K={args.k}, through callbacks.search (rank + gallery + map + exports):")
    print(f"  p50 {statistics.median(total) * 1000:.1f} ms   p95 {percentile(total, 95) * 1000:.1f} ms")
    print(
        f"  of which ranking alone: p50 {statistics.median(rank_only) * 1000:.1f} ms   p95 {percentile(rank_only, 95) * 1000:.1f} ms"
    )
    print(f"map iframe size: {len(view.map_html) / 1024:.0f} KiB for K={args.k}")
    import resource

    print(f"ranking: {engine.ranking}; quantization {config.quantization}")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    del demo


if __name__ == "__main__":
    main()
