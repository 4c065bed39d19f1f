"""`python -m retriever.index build|info|optimize`: cut and embed a tile source, check an index, add ANN or SQ8."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import geopandas as gpd

from retriever._cli import add_model_args, retriever_factory, retriever_from_args, run_cli
from retriever.index.ann import compress_index, optimize_index
from retriever.index.backends import SQ8_SCANS
from retriever.index.build import build_index
from retriever.index.layout import DTYPES, portable_path
from retriever.index.tile_index import TileIndex
from retriever.index.tiles import SOURCES, load_tiles


def _build_local(args: argparse.Namespace, tiles: gpd.GeoDataFrame, out: Path, options: dict) -> Path:
    return build_index(retriever_from_args(args), tiles, out, **options)


def _build_ray(args: argparse.Namespace, tiles: gpd.GeoDataFrame, out: Path, options: dict) -> Path:
    from retriever.index.ray_build import ray_build_index  # lazy: ray is an optional dependency

    return ray_build_index(
        retriever_factory(args),
        tiles,
        out,
        num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker,
        ray_address=args.ray_address,
        **options,
    )


# Embedding engines for `build`: in this process, or on Ray actors (local mode or a cluster).
ENGINES: dict[str, Callable[[argparse.Namespace, gpd.GeoDataFrame, Path, dict], Path]] = {
    "local": _build_local,
    "ray": _build_ray,
}


def _cmd_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    progress = False if args.no_progress else None
    tiles = load_tiles(
        args.tiles,
        args.kind,
        tile_size_m=args.tile_size_m,
        stride_m=args.stride_m,
        footprint_m=args.footprint_m,
        out_dir=args.tiles_dir or out / "source_tiles",
        tile_px=args.tile_px,
        progress=progress,
    )
    print(f"{len(tiles)} tiles from {args.tiles}", file=sys.stderr)
    load_args = {
        "model": portable_path(args.model, out),
        "adapter": portable_path(args.adapter, out),
        "quantization": args.quantization,
    }
    options = {
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "dtype": args.store_dtype,
        "thumbnail_px": args.thumbnail_px,
        "progress": progress,
        "load_args": load_args,
    }
    ENGINES[args.engine](args, tiles, out, options)
    print(f"index written to {out} ({len(tiles)} tiles)", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    index = TileIndex.load(args.index, verify=args.verify)
    print(json.dumps({**index.manifest, "ok": True}, indent=2))
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    if args.sq8:
        entry = compress_index(
            args.index,
            rerank_factor=args.rerank_factor,
            num_queries=args.recall_queries,
            seed=args.seed,
            scan=args.sq8_scan,
        )
        print(json.dumps(entry, indent=2))
        return 0
    entry = optimize_index(
        args.index,
        args.faiss,
        train_sample=args.train_sample,
        params=args.params,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        rerank=args.rerank,
        num_queries=args.recall_queries,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    print(json.dumps(entry, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": _cmd_build,
    "info": _cmd_info,
    "optimize": _cmd_optimize,
}


def _add_build(build: argparse.ArgumentParser) -> None:
    add_model_args(build, required=True, help_model="base model id or folder")
    build.add_argument(
        "--tiles", required=True, help="GeoTIFF, z/x/y folder, '<lat>,<lon>_*.jpg' folder or sidecar"
    )
    build.add_argument("--kind", choices=sorted(SOURCES), help="source kind (default: detected)")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--tile-size-m", type=float, default=150.0, help="GeoTIFF tile side in metres")
    build.add_argument(
        "--stride-m", type=float, help="GeoTIFF step between tiles in metres (default: tile size)"
    )
    build.add_argument(
        "--footprint-m", type=float, default=150.0, help="footprint side for point-located images"
    )
    build.add_argument("--tile-px", type=int, help="GeoTIFF tile side in pixels (default: native resolution)")
    build.add_argument("--tiles-dir", help="where GeoTIFF tiles are written (default: OUT/source_tiles)")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--shard-size", type=int, default=1024, help="tiles per resumable shard")
    build.add_argument(
        "--dtype",
        dest="store_dtype",
        choices=sorted(DTYPES),
        default="fp16",
        help="stored embedding precision",
    )
    build.add_argument("--thumbnail-px", type=int, default=256, help="thumbnail side; 0 = none")
    build.add_argument("--no-progress", action="store_true")
    build.add_argument("--engine", choices=sorted(ENGINES), default="local", help="where tiles are embedded")
    build.add_argument("--ray-address", help="Ray cluster address, e.g. auto (default: local mode)")
    build.add_argument("--num-workers", type=int, default=1, help="Ray actors, one retriever replica each")
    build.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor")


def _add_optimize(opt: argparse.ArgumentParser) -> None:
    opt.add_argument("index", help="index folder written by build")
    mode = opt.add_mutually_exclusive_group()
    mode.add_argument(
        "--faiss",
        help='faiss factory string, e.g. "IVF4096,PQ64" or "HNSW32" '
        "(default: chosen from N and D by retriever.index.ann.default_ann, with its params and re-rank)",
    )
    mode.add_argument(
        "--sq8",
        action="store_true",
        help="write int8 codes: small batches scan them, then re-rank exactly (recall measured, recorded)",
    )
    opt.add_argument(
        "--rerank-factor",
        type=int,
        default=10,
        help="with --sq8: re-rank k x R candidates with the fp16 rows",
    )
    opt.add_argument(
        "--sq8-scan",
        choices=list(SQ8_SCANS),
        help="with --sq8: native (AVX2 kernel compiled on first use, zero-copy), int8-gemm (fbgemm; packs the "
        "codes into RAM at load) or faiss (float query, zero-copy); default: native where it runs, else "
        "int8-gemm where torch has it and the codes fit 4 GiB, else faiss",
    )
    opt.add_argument("--train-sample", type=int, default=500_000, help="vectors sampled for training")
    knob = opt.add_mutually_exclusive_group()
    knob.add_argument("--nprobe", type=int, help="IVF lists probed per query (default 32)")
    knob.add_argument("--ef-search", type=int, help="HNSW search breadth (default 128)")
    knob.add_argument(
        "--params", help='raw faiss ParameterSpace string, e.g. "nprobe=16,quantizer_efSearch=64"'
    )
    opt.add_argument(
        "--rerank",
        type=int,
        help="re-score k x RERANK candidates exactly (0 = off; 10 for PQ; default: 0, or the default rule's)",
    )
    opt.add_argument("--recall-queries", type=int, default=1000, help="queries for the recall@10 check")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retriever.index", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # "resolve": build's --dtype (the stored precision, as before) replaces the model group's compute --dtype,
    # so the retriever loads in its default compute dtype.
    build = sub.add_parser(
        "build",
        help="cut a tile source and embed it into an index folder (resumable)",
        conflict_handler="resolve",
    )
    _add_build(build)
    info = sub.add_parser("info", help="check an index folder and print its manifest")
    info.add_argument("index")
    info.add_argument("--verify", action="store_true", help="also check the embeddings' sha256")
    _add_optimize(
        sub.add_parser(
            "optimize",
            help="train a faiss ANN index (--faiss, or the default for N) or write SQ8 codes (--sq8); "
            "search then uses it by default",
        )
    )
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; a user mistake prints `error: ...` and returns 2 (a bad flag exits 2 through argparse)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
