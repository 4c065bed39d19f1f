"""Real embeddings for bench_ann: the demo area rendered at a fine stride, offsets and rotations, embedded once.

The demo area (central Helsinki, demo/osm.py layers, demo/render.py) is rendered as one canvas. Tiles of the
demo's 150 m / 256 px are cut at every STRIDE_M metres, each centre jittered by up to half a stride and each
position taken at ANGLES rotations; the specs are shuffled so any prefix is a uniform sample of the whole
set. Tiles are embedded in memory with the committed demo model (assets/demo/adapter on the demo base,
offline; LoRA merged into the base weights, the same function at ~1.5x the speed) and cached under --cache
in chunks of CHUNK tiles, so a run can stop at any chunk and a rerun resumes. The description sets
(descriptions_val.jsonl, human_dev.jsonl) are embedded with the same model's query path.
Run: python -m benchmarks.bench_ann_demo [--n 50000] [--threads 1] [--measure 64]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
import torch
from PIL import Image
from pyproj import Transformer
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "assets" / "demo"
QUERY_FILES = {
    "val": DEMO / "gallery" / "descriptions_val.jsonl",
    "human_dev": DEMO / "eval" / "human_dev.jsonl",
}
CACHE = Path("/tmp/bench_ann_demo")
TILE_M, PX = (
    150.0,
    256,
)  # the committed demo gallery's tile side and pixels (assets/demo/gallery/gallery.json)
GRID_STRIDE_M = 100.0  # the committed grid: its extent (and the layer cache's bbox) is reused
STRIDE_M = 12.5  # 65 x 113 positions over the 950 m x 1550 m grid extent
ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)  # 8 x 7,345 = 58,760 specs; --n takes a shuffled prefix
CANVAS_MARGIN_M = 40.0  # a 45-degree tile reaches 150 (sqrt 2 - 1) / 2 = 31 m past its upright square
CHUNK = 1000  # tiles per cached chunk: ~1 min of embedding, the unit a run can stop and resume at
SEED = 0


def tile_specs(extent: tuple[float, float, float, float], seed: int = SEED) -> np.ndarray:
    """(S, 3) float64 rows (centre x, centre y in EPSG:3067 metres, angle in degrees), shuffled."""
    x0, y0, x1, y1 = extent
    half = TILE_M / 2
    xs = np.arange(x0 + half, x1 - half + 1e-6, STRIDE_M)
    ys = np.arange(y0 + half, y1 - half + 1e-6, STRIDE_M)
    cx, cy, angle = (a.ravel() for a in np.meshgrid(xs, ys, np.asarray(ANGLES, float), indexing="ij"))
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(-STRIDE_M / 2, STRIDE_M / 2, size=(len(cx), 2))  # offsets off the stride grid
    cx = np.clip(cx + jitter[:, 0], x0 + half, x1 - half)
    cy = np.clip(cy + jitter[:, 1], y0 + half, y1 - half)
    return np.stack([cx, cy, angle], axis=1)[rng.permutation(len(cx))]


def grid_extent() -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """The committed demo grid's extent (EPSG:3067) and the lon/lat bbox its layers were cached for."""
    from demo.build_gallery import LOAD_MARGIN_M, make_grid
    from demo.osm import DEFAULT_BBOX, METRIC_CRS

    grid = make_grid(DEFAULT_BBOX, TILE_M, GRID_STRIDE_M)
    load_bbox = tuple(
        gpd.GeoSeries([shapely.box(*grid.total_bounds).buffer(LOAD_MARGIN_M)], crs=METRIC_CRS)
        .to_crs("EPSG:4326")
        .total_bounds
    )
    return tuple(grid.total_bounds), load_bbox


def canvas(cache: Path, extent: tuple[float, float, float, float], load_bbox: tuple) -> Image.Image:
    """The demo area rendered once (cached as PNG): the grid extent plus CANVAS_MARGIN_M on each side."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "canvas.png"
    if path.is_file():
        return Image.open(path).convert("RGB")
    from demo.osm import load_layers
    from demo.render import render_canvas

    layers = load_layers(load_bbox)  # the demo build's cached layers: no .pbf parse
    x0, y0, x1, y1 = extent
    m = CANVAS_MARGIN_M
    image = render_canvas(layers, (x0 - m, y0 - m, x1 + m, y1 + m), PX / TILE_M)
    image.save(path)
    return image


def cut(image: Image.Image, canvas_extent: tuple[float, ...], spec: np.ndarray) -> Image.Image:
    """One PX x PX tile centred on spec's point, rotated by spec's angle (the map turned, as a heading would)."""
    cx, cy, angle = spec
    scale = image.width / (canvas_extent[2] - canvas_extent[0])  # px per metre
    side = math.ceil(PX * math.sqrt(2)) + 4 if angle % 90 else PX  # room for the corners a rotation sweeps in
    left = round((cx - canvas_extent[0]) * scale - side / 2)
    top = round((canvas_extent[3] - cy) * scale - side / 2)
    tile = image.crop((left, top, left + side, top + side))
    if angle % 90:
        tile = tile.rotate(angle, resample=Image.Resampling.BICUBIC)
        off = (side - PX) // 2
        return tile.crop((off, off, off + PX, off + PX))
    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    return tile.transpose(turns[int(angle)]) if angle else tile


def load_demo_retriever(threads: int):  # -> retriever.models.encoder.Retriever
    """The committed demo model (demo base + assets/demo/adapter), offline, LoRA merged for speed."""
    from app.config import DEMO_ADAPTER, DEMO_MODEL
    from retriever import load_retriever

    torch.set_num_threads(threads)
    retriever = load_retriever(DEMO_MODEL, adapter=DEMO_ADAPTER)
    fingerprint = retriever.fingerprint()  # the adapter's, kept: merging changes no function
    retriever.model = retriever.model.merge_and_unload()  # LoRA's extra matmuls gone (max |diff| ~2e-7)
    return retriever, fingerprint


def measure_rate(retriever, tiles: list[Image.Image], batch_size: int) -> float:
    """Tiles per second of encode_tiles on these images (one warm-up batch first)."""
    retriever.encode_tiles(tiles[:batch_size], batch_size=batch_size, progress=False)
    start = time.perf_counter()
    retriever.encode_tiles(tiles, batch_size=batch_size, progress=False)
    return len(tiles) / (time.perf_counter() - start)


def embed_gallery(
    n: int, cache: Path = CACHE, threads: int = 1, batch_size: int = 16, measure: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(n, D) fp16 tile embeddings, (n, 3) specs and the model fingerprint; embeds only uncached chunks."""
    cache.mkdir(parents=True, exist_ok=True)
    extent, load_bbox = grid_extent()
    specs = tile_specs(extent)
    if n > len(specs):
        raise ValueError(
            f"--n {n} > the {len(specs)} tile specs (stride {STRIDE_M} m x {len(ANGLES)} angles)"
        )
    chunks = [cache / f"tiles_{i:04d}.npy" for i in range(math.ceil(n / CHUNK))]
    meta_path = cache / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    todo = [i for i, c in enumerate(chunks) if not c.is_file()]
    if todo or measure:
        image = canvas(cache, extent, load_bbox)
        m = CANVAS_MARGIN_M
        canvas_extent = (extent[0] - m, extent[1] - m, extent[2] + m, extent[3] + m)
        retriever, fingerprint = load_demo_retriever(threads)
        meta = {"fingerprint": fingerprint, "stride_m": STRIDE_M, "angles": list(ANGLES), "chunk": CHUNK}
        meta_path.write_text(json.dumps(meta, indent=1))
        if measure:
            sample = [cut(image, canvas_extent, s) for s in specs[:measure]]
            rate = measure_rate(retriever, sample, batch_size)
            print(
                f"embedding rate: {rate:.1f} tiles/s at {threads} thread(s), batch {batch_size}", flush=True
            )
            print(f"{n} tiles would take {n / rate / 60:.1f} min", flush=True)
        with tqdm(total=len(todo) * CHUNK, desc="embedding tiles", unit="tile") as bar:
            for i in todo:
                rows = specs[i * CHUNK : (i + 1) * CHUNK]
                tiles = [cut(image, canvas_extent, s) for s in rows]
                out = retriever.encode_tiles(tiles, batch_size=batch_size, progress=False)  # (C, D) fp32
                tmp = chunks[i].with_suffix(".tmp.npy")
                np.save(tmp, out.numpy().astype(np.float16))
                tmp.rename(chunks[i])  # a chunk file exists only complete
                bar.update(len(rows))
    table = np.concatenate([np.load(c) for c in chunks])[:n]  # (n, D) fp16
    return table, specs[:n], meta.get("fingerprint", {})


def cached_n(cache: Path = CACHE) -> int:
    """Tiles embedded so far: the complete chunks in a row from the first."""
    chunks = 0
    while (cache / f"tiles_{chunks:04d}.npy").is_file():
        chunks += 1
    return chunks * CHUNK


def read_queries() -> dict[str, list[str]]:
    """The description sets' texts: {"val": 540 generated, "human_dev": 199 written by people}."""
    out = {}
    for name, path in QUERY_FILES.items():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[name] = [r.get("text") or r["q"] for r in rows]
    return out


def embed_queries(cache: Path = CACHE, threads: int = 1) -> dict[str, np.ndarray]:
    """{set name: (Q, D) fp32 unit query vectors}, cached next to the tiles."""
    path = cache / "queries.npz"
    if path.is_file():
        return dict(np.load(path))
    cache.mkdir(parents=True, exist_ok=True)
    retriever, _ = load_demo_retriever(threads)
    out = {
        name: retriever.encode_queries(texts, progress=True).numpy() for name, texts in read_queries().items()
    }
    np.savez(path, **out)
    return out


def lat_lon(specs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tile centres in degrees: (n,) lat, (n,) lon."""
    from demo.osm import METRIC_CRS

    lon, lat = Transformer.from_crs(METRIC_CRS, "EPSG:4326", always_xy=True).transform(
        specs[:, 0], specs[:, 1]
    )
    return np.asarray(lat), np.asarray(lon)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--n", type=int, default=50_000, help="tiles to embed (a prefix of the shuffled specs)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--measure", type=int, default=0, help="first time this many tiles, then embed")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    queries = embed_queries(args.cache, args.threads)  # first: seconds, and the benchmark needs them whole
    table, specs, _ = embed_gallery(args.n, args.cache, args.threads, args.batch_size, args.measure)
    print(
        f"{table.shape} tile embeddings, queries { ({k: v.shape for k, v in queries.items()}) }, "
        f"in {time.perf_counter() - start:.0f} s -> {args.cache}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
