"""python -m demo.evaluate_demo: the demo's quality on held-out phrasings, next to BM25, random and hybrid."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from retriever._io import write_json_atomic
from retriever.models.encoder import load_retriever
from retriever.index.hybrid import ContextMatcher, fuse
from retriever.index import TileIndex
from demo.descriptions import baselines, evaluate_scores
from demo.train_demo import DEMO_MODEL_ID

HEADLINE = ("R@1", "R@5", "R@10", "L@100", "R@1_strict", "R@10_strict", "mean_dev_km")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit_hybrid_weight(
    similarity: np.ndarray, text_match: np.ndarray, queries: list[dict], tiles: Any
) -> float:
    """The fusion weight with the best R@1 on training descriptions (never on the reported set)."""

    def r1(weight: float) -> float:
        fused = np.stack([fuse(s, b, weight) for s, b in zip(similarity, text_match)])
        return evaluate_scores(fused, queries, tiles)["R@1"]

    grid = [round(w, 2) for w in np.linspace(0, 1, 11)]
    return max(grid, key=lambda w: (r1(w), w))


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| ranking | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in HEADLINE) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m demo.evaluate_demo", description=__doc__)
    p.add_argument("--gallery", type=Path, default=Path("assets/demo/gallery"))
    p.add_argument("--adapter", type=Path, default=Path("assets/demo/adapter"))
    p.add_argument("--index", type=Path, default=Path("assets/demo/index"))
    p.add_argument(
        "--fit-queries", type=int, default=500, help="training descriptions used to fit the hybrid weight"
    )
    p.add_argument(
        "--erm", type=int, default=0, help="also measure ERM re-ranking of the top-5 on this many queries"
    )
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    retriever = load_retriever(DEMO_MODEL_ID, adapter=args.adapter, device="cpu")
    index = TileIndex.load(args.index, retriever=retriever)
    tiles = index.tiles
    val = read_jsonl(args.gallery / "descriptions_val.jsonl")
    fit = random.Random(0).sample(read_jsonl(args.gallery / "descriptions_train.jsonl"), args.fit_queries)
    embeddings = np.asarray(index.embeddings, dtype=np.float32)  # (G, D)
    matcher = ContextMatcher([str(c) for c in tiles["features"]])

    def similarity(queries: list[dict]) -> np.ndarray:
        return (
            retriever.encode_queries([q["text"] for q in queries], batch_size=64).numpy() @ embeddings.T
        )  # (Q, G)

    sim_val, sim_fit = similarity(val), similarity(fit)
    bm25_val = np.stack([matcher.scores(q["text"]) for q in val])
    bm25_fit = np.stack([matcher.scores(q["text"]) for q in fit])
    weight = fit_hybrid_weight(sim_fit, bm25_fit, fit, tiles)
    reference = baselines(tiles, val)
    rows = {
        "random (mean of 50)": reference["random"],
        "BM25 over tile context (reads metadata)": evaluate_scores(bm25_val, val, tiles),
        "MLLM, pixels only": evaluate_scores(sim_val, val, tiles),
        f"hybrid MLLM + BM25 (w={weight})": evaluate_scores(
            np.stack([fuse(s, b, weight) for s, b in zip(sim_val, bm25_val)]), val, tiles
        ),
    }
    if args.erm:
        from retriever.explain import Explainer

        explainer = Explainer(retriever, adapter_off=True, autocast_bf16=True)  # as the app does
        subset = val[: args.erm]
        position = {t: i for i, t in enumerate(tiles["tile_id"])}
        reranked = sim_val[: args.erm].copy()
        for row, query in enumerate(subset):
            top = index.search_text(retriever, [query["text"]], k=5)[0]
            new_order = explainer.rerank(query["text"], top, k=5)
            for rank, hit in enumerate(
                new_order
            ):  # push the re-ranked five above everything, in their new order
                reranked[row, position[hit.tile_id]] = 10.0 - rank
        rows[f"MLLM, pixels only (first {args.erm})"] = evaluate_scores(sim_val[: args.erm], subset, tiles)
        rows[f"MLLM + ERM top-5 (first {args.erm})"] = evaluate_scores(reranked, subset, tiles)
    print(f"{len(val)} held-out descriptions (phrasings never trained on), {len(tiles)} tiles\n")
    print(table(rows))
    result = {"n_queries": len(val), "n_tiles": len(tiles), "hybrid_weight": weight, "rows": rows}
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
