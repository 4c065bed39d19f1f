"""`python -m demo.evaluate_human`: the demo on human-written descriptions, with bootstrap 95% intervals.

The dev split (assets/demo/eval/human_dev.jsonl) is for choosing and fitting; `--split test` reads the final
held-out part, which is looked at once. Figures, per ranking and split by whether the query names the place:
L@100 / L@150 (the top-1 tile's centre within that many metres of the true point), hit@1 / hit@5 (a top-k
tile's footprint contains the true point) and the median top-1 error in metres.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from demo import ASSETS, GALLERY
from retriever._cli import run_cli
from retriever._io import write_json_atomic
from retriever.bm25 import ContextMatcher
from retriever.evaluate.metrics import haversine_km
from retriever.index.hybrid import fuse

EVAL = ASSETS / "eval"
SPLITS = {
    "dev": EVAL / "human_dev.jsonl",
    "test": EVAL / "human_test.jsonl",
    "generated": GALLERY / "descriptions_val.jsonl",  # our own held-out phrasings, in the same table
}
RANKING = ASSETS / "ranking.json"  # the app's default ranking for the demo (app/config.py reads it)
WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))  # hybrid weight grid
FIT_METRIC = "L@150"


@dataclass(frozen=True)
class HumanSet:
    """Human descriptions with their true points."""

    queries: list[str]
    lat: np.ndarray  # (Q,)
    lon: np.ndarray  # (Q,)
    has_name: np.ndarray  # (Q,) bool
    kind: list[str]


def read_human(path: Path) -> HumanSet:
    """Read a human_*.jsonl file (fields q, lat, lon, truth, kind, has_name)."""
    from retriever.evaluate.data import read_jsonl_records

    rows = read_jsonl_records(path, required=("q", "lat", "lon", "kind", "has_name"))
    return HumanSet(
        queries=[r["q"] for r in rows],
        lat=np.array([float(r["lat"]) for r in rows]),
        lon=np.array([float(r["lon"]) for r in rows]),
        has_name=np.array([bool(r["has_name"]) for r in rows]),
        kind=[r["kind"] for r in rows],
    )


def read_generated(path: Path) -> HumanSet:
    """Read the generator's held-out descriptions as a HumanSet; the look_* plans are the ones without a name."""
    from retriever.evaluate.data import read_jsonl_records

    rows = read_jsonl_records(path, required=("text", "lat", "lon", "template"))
    return HumanSet(
        queries=[r["text"] for r in rows],
        lat=np.array([float(r["lat"]) for r in rows]),
        lon=np.array([float(r["lon"]) for r in rows]),
        has_name=np.array([":look_" not in r["template"] for r in rows]),
        kind=[r["template"] for r in rows],
    )


READERS: dict[str, Callable[[Path], HumanSet]] = {
    "dev": read_human,
    "test": read_human,
    "generated": read_generated,
}


def footprint_hits(data: HumanSet, footprints: np.ndarray) -> np.ndarray:
    """(Q, N) bool: which of the N footprints (EPSG:4326 polygons) holds each query's true point."""
    points = shapely.points(data.lon, data.lat)  # (Q,)
    return np.stack([shapely.contains(footprints, p) for p in points])


def bm25_matrix(contexts: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """(Q, N) BM25 scores of every query against every tile context."""
    matcher = ContextMatcher(list(contexts))
    return np.stack([matcher.scores(q) for q in queries])


def per_query(order: np.ndarray, data: HumanSet, tiles) -> dict[str, np.ndarray]:
    """Per-query outcomes of a ranking `order` (Q, N) of gallery rows: error of top-1 and footprint hits."""
    top1 = order[:, 0]
    err_m = 1000.0 * haversine_km(
        data.lat, data.lon, tiles["lat"].to_numpy()[top1], tiles["lon"].to_numpy()[top1]
    )
    contains = footprint_hits(data, np.asarray(tiles.geometry.values))  # (Q, N)
    hit = np.take_along_axis(contains, order, axis=1)  # (Q, N), in rank order
    return {
        "L@100": err_m <= 100,
        "L@150": err_m <= 150,
        "hit@1": hit[:, :1].any(1),
        "hit@5": hit[:, :5].any(1),
        "err_m": err_m,
    }


def summarise(outcomes: dict[str, np.ndarray], rows: np.ndarray, boot: int = 2000, seed: int = 0) -> dict:
    """Mean (median for err_m) of each outcome over `rows`, with a bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {"n": int(len(rows))}
    if not len(rows):
        return out
    draws = rng.integers(0, len(rows), size=(boot, len(rows)))  # (B, n)
    for name, values in outcomes.items():
        v = values[rows].astype(float)
        stat: Callable[..., np.ndarray] = np.median if name == "err_m" else np.mean
        samples = stat(v[draws], axis=1)  # (B,)
        out[name] = [float(stat(v)), float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]
    return out


def order_of(scores: np.ndarray) -> np.ndarray:
    """Rows by descending score, ties by row order: (Q, N) -> (Q, N)."""
    return np.argsort(-scores, axis=1, kind="stable")


def fuse_all(similarity: np.ndarray, text_match: np.ndarray, weight: float) -> np.ndarray:
    """Row-wise hybrid.fuse: (Q, N), (Q, N) -> (Q, N)."""
    return np.stack([fuse(s, t, weight) for s, t in zip(similarity, text_match)])


def fit_weight(
    similarity: np.ndarray, text_match: np.ndarray, data: HumanSet, tiles, rows: np.ndarray
) -> float:
    """The grid weight with the best FIT_METRIC over `rows` (ties: the larger weight, more MLLM)."""
    best, best_w = -1.0, 1.0
    for w in WEIGHTS:
        value = per_query(
            order_of(fuse_all(similarity[rows], text_match[rows], w)), subset(data, rows), tiles
        )[FIT_METRIC].mean()
        if value >= best:
            best, best_w = value, w
    return best_w


def subset(data: HumanSet, rows: np.ndarray) -> HumanSet:
    return HumanSet(
        [data.queries[i] for i in rows],
        data.lat[rows],
        data.lon[rows],
        data.has_name[rows],
        [data.kind[i] for i in rows],
    )


def cross_validated_hybrid(
    similarity: np.ndarray, text_match: np.ndarray, data: HumanSet, tiles, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, list[float]]:
    """Each fold ranked at the weight fitted on the other folds: the honest figure for a fitted weight."""
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(len(data.queries)) % folds
    fused = np.zeros_like(similarity)
    weights = []
    for f in range(folds):
        train, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        w = fit_weight(similarity, text_match, data, tiles, train)
        weights.append(w)
        fused[held] = fuse_all(similarity[held], text_match[held], w)
    return fused, weights


def evaluate(
    similarity: np.ndarray, bm25: dict[str, np.ndarray], data: HumanSet, tiles, hybrid_weight: float | None
) -> dict:
    """Every ranking's figures: pixel-only MLLM, BM25 per context column ((Q, N) each), hybrids, and random."""
    rankings: dict[str, np.ndarray] = {"pixel-only MLLM": order_of(similarity)}
    for column, scores in bm25.items():
        rankings[f"BM25 over {column}"] = order_of(scores + 1e-9 * similarity)  # MLLM breaks BM25 ties
    report: dict[str, object] = {}
    hybrid_column = list(bm25)[-1]
    fused, fold_weights = cross_validated_hybrid(similarity, bm25[hybrid_column], data, tiles)
    rankings[f"hybrid over {hybrid_column}, weight cross-validated"] = order_of(fused)
    fitted = fit_weight(similarity, bm25[hybrid_column], data, tiles, np.arange(len(data.queries)))
    report["hybrid_weight_fitted"] = fitted
    report["hybrid_fold_weights"] = fold_weights
    if hybrid_weight is not None:
        rankings[f"hybrid over {hybrid_column}, weight {hybrid_weight}"] = order_of(
            fuse_all(similarity, bm25[hybrid_column], hybrid_weight)
        )
    rng = np.random.default_rng(0)
    random_scores = rng.random(similarity.shape)
    rankings["random"] = order_of(random_scores)
    groups = {
        "all": np.arange(len(data.queries)),
        "with name": np.flatnonzero(data.has_name),
        "no name": np.flatnonzero(~data.has_name),
    }
    table = {}
    for name, order in rankings.items():
        outcomes = per_query(order, data, tiles)
        table[name] = {group: summarise(outcomes, rows) for group, rows in groups.items()}
    report["rankings"] = table
    return report


REGRESSION_SLICE = 60  # the first dev queries a test re-scores with the committed model


def slice_figures(similarity: np.ndarray, bm25: np.ndarray, data: HumanSet, tiles, weight: float) -> dict:
    """L@150 and hit@5 with intervals on the first REGRESSION_SLICE queries: pixels only and the app default."""
    rows = np.arange(min(REGRESSION_SLICE, len(data.queries)))
    part = subset(data, rows)
    orders = {
        "pixel-only MLLM": order_of(similarity[rows]),
        "app default": order_of(fuse_all(similarity[rows], bm25[rows], weight)),
    }
    out = {}
    for name, order in orders.items():
        figures = summarise(per_query(order, part, tiles), np.arange(len(rows)))
        out[name] = {m: figures[m] for m in ("L@150", "hit@5")}
    return {"n": int(len(rows)), "weight": weight, "rankings": out}


def markdown(report: dict) -> str:
    """The report as a markdown table: value [low, high] per metric."""
    metrics = ("L@100", "L@150", "hit@1", "hit@5", "err_m")
    lines = [
        "| ranking | queries | n | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for name, groups in report["rankings"].items():
        for group, figures in groups.items():
            cells = []
            for m in metrics:
                v, lo, hi = figures.get(m, [float("nan")] * 3)
                cells.append(
                    f"{v:.0f} [{lo:.0f}, {hi:.0f}]" if m == "err_m" else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"
                )
            lines.append(f"| {name} | {group} | {figures['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def similarity_matrix(index_dir: Path, adapter: Path | None, data: HumanSet, quantization: str) -> tuple:
    """(Q, N) cosine similarities of the queries to the index rows, and the index's tile table."""
    from retriever.index import TileIndex
    from retriever.models.demo_base import DEMO_MODEL_ID
    from retriever.models.encoder import load_retriever

    retriever = load_retriever(DEMO_MODEL_ID, adapter=adapter, quantization=quantization)
    index = TileIndex.load(index_dir, retriever)
    queries = retriever.encode_queries(data.queries, batch_size=32).float().numpy()  # (Q, D)
    table = np.asarray(index.embeddings, dtype=np.float32)  # (N, D)
    return queries @ table.T, index.tiles


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.evaluate_human", description=__doc__)
    p.add_argument(
        "--split",
        choices=sorted(SPLITS),
        default="dev",
        help="test is the held-out part: look once; generated is our own phrasings (use the dev weight)",
    )
    p.add_argument("--index", type=Path, default=ASSETS / "index")
    p.add_argument("--adapter", type=Path, default=ASSETS / "adapter")
    p.add_argument("--quantization", choices=("none", "4bit"), default="none")
    p.add_argument("--context", action="append", help="tile context column(s) for BM25 (default: all known)")
    p.add_argument("--gallery", type=Path, help="take the tiles' context columns from this gallery folder")
    p.add_argument("--hybrid-weight", type=float, help="also rank at this fixed weight")
    p.add_argument("--out", type=Path, help="write the report as JSON")
    p.add_argument(
        "--write-ranking", action="store_true", help=f"write the dev set's choice to {RANKING.name}"
    )
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    data = READERS[args.split](SPLITS[args.split])
    similarity, tiles = similarity_matrix(args.index, args.adapter, data, args.quantization)
    if args.gallery is not None:  # context columns of a (re)built gallery, joined by tile id
        import geopandas as gpd

        extra = gpd.read_parquet(args.gallery / "tiles.parquet").set_index("tile_id")
        for column in ("features", "context"):
            if column in extra.columns:
                tiles = tiles.assign(**{column: extra.loc[tiles["tile_id"], column].to_numpy()})
    columns = args.context or [c for c in ("features", "context") if c in tiles.columns]
    missing = [c for c in columns if c not in tiles.columns]
    if missing:
        raise ValueError(f"the index has no column(s) {missing}; it has {list(tiles.columns)}")
    bm25 = {c: bm25_matrix([str(t) for t in tiles[c]], data.queries) for c in columns}  # (Q, N) each
    report = evaluate(similarity, bm25, data, tiles, args.hybrid_weight)
    report["split"] = args.split
    if args.split == "dev":
        weight = choose_ranking(report)["weight"]
        report["regression_slice"] = slice_figures(similarity, bm25[columns[-1]], data, tiles, weight)
    print(markdown(report))
    print(f"hybrid weight fitted on all of {args.split}: {report['hybrid_weight_fitted']}")
    if args.out:
        write_json_atomic(args.out, report)
    if args.write_ranking:
        if args.split != "dev":
            raise ValueError("--write-ranking chooses on the dev split only")
        choice = choose_ranking(report)
        write_json_atomic(RANKING, choice)
        print(f"wrote {RANKING}: {choice}")
    return report


def choose_ranking(report: dict) -> dict:
    """The app's default: the cross-validated hybrid when it beats pixels only on FIT_METRIC, else pixels."""
    table = report["rankings"]
    pixel = table["pixel-only MLLM"]["all"][FIT_METRIC][0]
    hybrid_name = next(name for name in table if name.endswith("weight cross-validated"))
    hybrid = table[hybrid_name]["all"][FIT_METRIC][0]
    chosen = "hybrid" if hybrid > pixel else "pixels"
    return {
        "ranking": chosen,
        "weight": float(report["hybrid_weight_fitted"]) if chosen == "hybrid" else 1.0,
        "fitted_on": "assets/demo/eval/human_dev.jsonl, 5-fold cross-validated",
        "metric": FIT_METRIC,
        "pixel_only": pixel,
        "hybrid_cross_validated": hybrid,
    }


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
