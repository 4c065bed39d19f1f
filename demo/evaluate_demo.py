"""python -m demo.evaluate_demo: the demo's quality on held-out phrasings, next to BM25, random and hybrid."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from demo import ADAPTER, GALLERY, INDEX, require
from demo.descriptions import baselines, bm25_scores, evaluate_scores, read_records
from retriever._cli import run_cli
from retriever._io import write_json_atomic
from retriever.index import TileIndex
from retriever.index.hybrid import fuse
from retriever.models.demo_base import DEMO_MODEL_ID
from retriever.models.encoder import fast_bf16_cpu, load_retriever

HEADLINE = ("R@1", "R@5", "R@10", "L@100", "R@1_strict", "R@10_strict", "mean_dev_km")


def chosen_weight() -> float:
    """The hybrid weight chosen on the human dev set (1.0, pixels only, when none was chosen)."""
    import json

    from demo.evaluate_human import RANKING

    try:
        return float(json.loads(RANKING.read_text())["weight"])
    except (OSError, ValueError, KeyError):
        return 1.0


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| ranking | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in HEADLINE) + " |")
    return "\n".join(lines)


def erm_rows(
    retriever: Any, index: TileIndex, queries: list[dict], similarity: np.ndarray, limit: int
) -> dict[str, dict[str, float]]:
    """Pixels-only figures and ERM re-ranking of the top 5, both on the first `limit` queries (rows of the
    (Q, G) `similarity`)."""
    from retriever.explain import Explainer

    queries, similarity = queries[:limit], similarity[:limit]

    explainer = Explainer(retriever, adapter_off=True, autocast_bf16=fast_bf16_cpu())  # as the app does
    tiles = index.tiles
    position = {t: i for i, t in enumerate(tiles["tile_id"])}
    reranked = similarity.copy()  # (Q, G)
    for row, query in enumerate(queries):
        top = index.search_text(retriever, [query["text"]], k=5)[0]
        # push the re-ranked five above everything, in their new order
        for rank, hit in enumerate(explainer.rerank(query["text"], top, k=5)):
            reranked[row, position[hit.tile_id]] = 10.0 - rank
    return {
        f"MLLM, pixels only (first {limit})": evaluate_scores(similarity, queries, tiles),
        f"MLLM + ERM top-5 (first {limit})": evaluate_scores(reranked, queries, tiles),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.evaluate_demo", description=__doc__)
    p.add_argument("--gallery", type=Path, default=GALLERY, help="built gallery folder (default %(default)s)")
    p.add_argument("--adapter", type=Path, default=ADAPTER, help="trained adapter (default %(default)s)")
    p.add_argument("--index", type=Path, default=INDEX, help="the gallery's index (default %(default)s)")
    p.add_argument(
        "--hybrid-weight",
        type=float,
        help="fusion weight (default: the one chosen on the human dev set, assets/demo/ranking.json)",
    )
    p.add_argument(
        "--erm", type=int, default=0, help="also measure ERM re-ranking of the top-5 on this many queries"
    )
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate and print the table; returns the figures (also written to --out when given)."""
    args = build_parser().parse_args(argv)
    val = read_records(args.gallery / "descriptions_val.jsonl")
    require(args.adapter, "train it first: python -m demo.train_demo")
    require(
        args.index,
        f"build it first: python -m retriever.index build --model {DEMO_MODEL_ID} --adapter {args.adapter} "
        f"--tiles {args.gallery} --out {args.index}",
    )
    retriever = load_retriever(DEMO_MODEL_ID, adapter=args.adapter, device="cpu")
    index = TileIndex.load(args.index, retriever=retriever)
    tiles = index.tiles
    embeddings = np.asarray(index.embeddings, dtype=np.float32)  # (G, D)
    column = "context" if "context" in tiles.columns else "features"
    contexts = [str(c) for c in tiles[column]]

    def similarity(queries: list[dict]) -> np.ndarray:
        return retriever.encode_queries([q["text"] for q in queries], batch_size=64).numpy() @ embeddings.T

    sim_val = similarity(val)  # (Q, G)
    bm25_val = bm25_scores([q["text"] for q in val], contexts)  # (Q, G)
    # Never fitted on training descriptions (the model is over-confident there): the human dev set chooses it.
    weight = args.hybrid_weight if args.hybrid_weight is not None else chosen_weight()
    reference = baselines(tiles, val)
    rows = {
        "random (mean of 50)": reference["random"],
        f"BM25 over tile {column} (reads metadata)": evaluate_scores(bm25_val, val, tiles),
        "MLLM, pixels only": evaluate_scores(sim_val, val, tiles),
        f"hybrid MLLM + BM25 (w={weight})": evaluate_scores(
            np.stack([fuse(s, b, weight) for s, b in zip(sim_val, bm25_val)]), val, tiles
        ),
    }
    if args.erm:
        rows.update(erm_rows(retriever, index, val, sim_val, args.erm))
    print(f"{len(val)} held-out descriptions (phrasings never trained on), {len(tiles)} tiles\n")
    print(table(rows))
    result = {"n_queries": len(val), "n_tiles": len(tiles), "hybrid_weight": weight, "rows": rows}
    if args.out:
        write_json_atomic(args.out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m demo.evaluate_demo`: 0 when evaluated; a user mistake prints `error: ...` and returns 2."""

    def job(args: Sequence[str] | None) -> int:
        run(args)
        return 0

    return run_cli(job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
