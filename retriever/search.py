"""Search a tile index with text: python -m retriever.search --index gallery/ --query "..." -k 10."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retriever._cli import add_model_args, retriever_from_args, run_cli
from retriever._io import write_text_atomic
from retriever.errors import RetrieverError
from retriever.index import Hit, TileIndex, hits_to_csv, hits_to_geojson, read_manifest, resolve_load_path
from retriever.index.spatial import parse_within

JSON_OUTPUT = """\
JSON output (--json, printed to stdout): a list with one entry per --query, in order; each entry is
the list of that query's hits, best first. Each hit is an object:
  rank        int    1-based position
  tile_id     str    the tile's id in the index
  score       float  cosine similarity between the query and the tile (higher is better)
  lat, lon    float  tile centre, EPSG:4326 degrees
  bbox        [west, south, east, north]  the footprint's bounds, EPSG:4326 degrees
  image_path  str    absolute path of the tile thumbnail (or source image)
  footprint   GeoJSON geometry of the tile footprint (EPSG:4326)
  context     object optional per-tile context columns of the index (may be empty)
Example: [[{"rank": 1, "tile_id": "city_r0003_c0012", "score": 0.41, "lat": 60.17, "lon": 24.94,
            "bbox": [24.939, 60.169, 24.941, 60.171], "image_path": "/.../thumbnails/0000042.jpg",
            "footprint": {"type": "Polygon", "coordinates": [...]}, "context": {}}]]
--within keeps tiles whose centre lies in the area: "west,south,east,north", "lat,lon,radius_m"
(a geodesic circle) or a .geojson file. k larger than the candidates is clamped, with a warning on stderr.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retriever.search",
        description="Rank the tiles of an index for street-level descriptions.",
        epilog=JSON_OUTPUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--index", required=True, help="index folder written by `python -m retriever.index build`"
    )
    parser.add_argument("--query", "-q", action="append", required=True, help="a description (repeatable)")
    parser.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument("--within", help="'west,south,east,north' | 'lat,lon,radius_m' | area.geojson")
    parser.add_argument("--json", action="store_true", help="print hits as JSON (format below)")
    parser.add_argument("--geojson", type=Path, help="also write the hits' footprints as a GeoJSON file")
    parser.add_argument("--csv", type=Path, help="also write the hits as CSV (formula-safe cells)")
    add_model_args(
        parser, required=False, help_model="retriever to load instead of the one recorded in the index"
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "faiss", "ann"],
        help="search backend (default: ann when `optimize` built one, else torch = exact)",
    )
    parser.add_argument(
        "--exact", action="store_true", help="exact search even when the index has an ANN index"
    )
    return parser


def _print_table(queries: list[str], hits: list[list[Hit]]) -> None:
    for query, query_hits in zip(queries, hits, strict=True):
        print(f"# {query}")
        for hit in query_hits:
            print(f"{hit.rank:>4}  {hit.score:+.4f}  {hit.lat:10.6f} {hit.lon:11.6f}  {hit.tile_id}")


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    """How to load the retriever: --model and its flags, else the recipe recorded in the index's manifest."""
    if args.model:
        return {}  # the model flags as given
    recipe = read_manifest(args.index).get("load")
    if not recipe:
        raise RetrieverError(f"{args.index} does not record how to load its retriever; pass --model")
    return {**recipe, **{k: resolve_load_path(recipe.get(k), args.index) for k in ("model", "adapter")}}


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    area = parse_within(args.within) if args.within else None
    retriever = retriever_from_args(args, **_recipe(args))
    index = TileIndex.load(args.index, retriever, device=args.device, backend=args.backend, exact=args.exact)
    hits = index.search_text(retriever, args.query, args.k, within=area)

    if args.json:
        print(json.dumps([[hit.to_dict() for hit in query_hits] for query_hits in hits], indent=1))
    else:
        _print_table(args.query, hits)
    if args.geojson:
        write_text_atomic(args.geojson, json.dumps(hits_to_geojson(hits, args.query)))
    if args.csv:
        hits_to_csv(hits, args.csv, args.query)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search; a user mistake prints `error: ...` and returns 2 (a bad flag exits 2 through argparse)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
