"""`python -m retriever.evaluate`: score a retriever with a benchmark's official protocol; a user error exits 2."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retriever._cli import add_model_args, retriever_from_args, run_cli
from retriever._io import write_text_atomic
from retriever.errors import RetrieverError
from retriever.evaluate import protocols
from retriever.evaluate.cache import Encoder
from retriever.evaluate.data import CVG_VIEWS, PairSet
from retriever.evaluate.metrics import RerankFn
from retriever.evaluate.protocols import PROTOCOLS, RerankFactory, evaluate_with, render


def _erm_reranker(retriever: Encoder, pairs: PairSet) -> RerankFn:
    """The explanation package's confidence re-ranker (CrossText2Loc's ERM): wired here, the composition root."""
    try:
        from retriever.explain import make_reranker
    except ImportError as err:
        raise RetrieverError(
            "--rerank erm needs retriever.explain.make_reranker(retriever, pairs) -> rerank_fn, "
            "which is not available in this installation."
        ) from err
    return make_reranker(retriever, pairs)


RERANKERS: dict[str, RerankFactory] = {**protocols.RERANKERS, "erm": _erm_reranker}


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    group.add_argument("--data", required=True, type=Path, help="dataset folder (or the JSONL file)")
    group.add_argument("--split", default="test", help="annotation split (default: test)")
    group.add_argument("--city", help="CVG-Text city, both subsets in one gallery (default: NewYork)")
    group.add_argument(
        "--version",
        help="CVG-Text official version instead of --city: NewYork (panoramas only), NewYork-photos "
        "(single views only), NewYork-mixed (both), Tokyo-photos, ...",
    )
    group.add_argument("--view", default="satellite", choices=sorted(CVG_VIEWS), help="CVG-Text gallery view")
    group.add_argument("--image-root", type=Path, help="folder image paths are relative to (GeoText, JSONL)")
    group.add_argument(
        "--official-quirks",
        action="store_true",
        help="GeoText-1652: reproduce the official reader's off-by-one building labels",
    )


def _add_scoring_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--cache", type=Path, help="embedding cache folder: a re-run only recomputes the metrics"
    )
    group.add_argument("--batch-size", type=int, default=16)
    group.add_argument(
        "--chunk-size", type=int, help="query rows per streamed score block (default: ~256 MB)"
    )
    group.add_argument("--gallery-size", type=int, help="CVG-Text local gallery m (default 100; JSONL: all)")
    group.add_argument(
        "--rerank", default="none", choices=sorted(RERANKERS), help="re-rank each text's top-k"
    )
    group.add_argument("--rerank-depth", type=int, default=5)
    group.add_argument(
        "--skip-unreadable", action="store_true", help="drop undecodable images instead of failing"
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, help="write the results JSON here")
    group.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        help="also write a markdown table (to PATH, or stdout without one)",
    )
    group.add_argument("--label", help="model name in the tables (default: the model folder's name)")
    group.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retriever.evaluate",
        description="Evaluate a retriever with the official GeoText-1652 or CVG-Text protocol, or on JSONL pairs.",
    )
    _add_data_args(parser)
    add_model_args(parser, required=True)
    _add_scoring_args(parser)
    _add_output_args(parser)
    return parser


def _report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The table on stdout, the official GeoText keys, and the files --out and --markdown ask for."""
    print(f"{results['dataset']}  ({results['counts']['texts']} texts, {results['counts']['images']} images)")
    print(render(results))
    if "official" in results:
        print("official itm_eval keys (img_* = text→image, txt_* = image→text):")
        print("  " + "  ".join(f"{k}={v:.2f}" for k, v in results["official"].items()))
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=2, ensure_ascii=False))
        print(f"results written to {args.out}")
    if args.markdown == "-":
        print(render(results, markdown=True))
    elif args.markdown:
        write_text_atomic(args.markdown, render(results, markdown=True) + "\n")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # before the model loads, so a flag conflict costs nothing
    data_options = PROTOCOLS[args.protocol].data_options(args)
    retriever = retriever_from_args(args)
    label = args.label or Path(args.model).name + (f"+{Path(args.adapter).name}" if args.adapter else "")
    results = evaluate_with(
        retriever,
        args.protocol,
        {"data": args.data, **data_options},
        cache_dir=args.cache,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        gallery_size=args.gallery_size,
        rerank=args.rerank,
        rerank_depth=args.rerank_depth,
        rerankers=RERANKERS,
        skip_unreadable=args.skip_unreadable,
        progress=False if args.no_progress else None,
        label=label,
    )
    _report(results, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 on success; `error: ...` on stderr and 2 for a user mistake (argparse exits 2 itself)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
