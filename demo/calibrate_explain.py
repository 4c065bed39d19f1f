"""`python -m demo.calibrate_explain`: fit the explainer's confidence and ERM on the human dev set, 5-fold CV.

The confidence of a hit is a logistic model of its similarity softmax (logit), its margin over the best other
hit, and the share of the query's mentions that its tile supports (retriever.explain.evidence); the label is
"this hit's centre lies within 150 m of the true point". Held-out AUROC and ECE are reported for the top-1
(the issue's target) and for every top-5 hit; ERM re-ranking by the new confidence is measured the same way
and kept off unless it helps. P(yes) is left out (weight 0): the committed fit gave it -0.13, and one forward
per hit costs minutes here. Writes explain_calibration.json into the adapter folder, atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from demo import ASSETS
from demo.evaluate_human import RANKING, SPLITS, fuse_all, order_of, read_human, similarity_matrix
from retriever._cli import run_cli
from retriever.evaluate.metrics import haversine_km
from retriever.explain.calibration import (
    FEATURE_NAMES,
    Calibration,
    auroc,
    confidence_features,
    expected_calibration_error,
    fit_logistic,
    logit,
    sigmoid,
    similarity_probs,
)
from retriever.explain.evidence import EvidenceFinder
from retriever.models.config import CALIBRATION_FILE

TOP_K = 5
RADIUS_M = 150.0
FOLDS = 5
TEMPERATURES = (0.02, 0.05, 0.1)
# columns of confidence_features: similarity, margin, share, relative share, name share, bias (P(yes) left out)
FEATURES = (0, 1, 2, 3, 4, 6)
ERM_MIN_GAIN = 0.02  # ERM goes on only for at least this held-out L@150 gain (1 query of 199 is noise)
ERM_GRID = tuple(round(w, 1) for w in np.linspace(0.0, 1.0, 11))


class _Hit:
    """What EvidenceFinder reads of a hit: its tile id (the context comes from the tile table)."""

    def __init__(self, tile_id: str) -> None:
        self.tile_id = tile_id
        self.context: dict = {}


def _weights(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logistic weights on the FEATURES columns, as a full (7,) vector with P(yes) at 0."""
    w = np.zeros(x.shape[-1])
    w[list(FEATURES)] = fit_logistic(x[..., list(FEATURES)].reshape(-1, len(FEATURES)), y.ravel())
    return w


def _erm(scores: np.ndarray, conf: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """(Q, k) positions best first under weight * s / T + (1 - weight) * logit(confidence)."""
    return np.argsort(-(weight * scores / temperature + (1 - weight) * logit(conf)), axis=1, kind="stable")


def run(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    data = read_human(SPLITS["dev"])
    similarity, tiles = similarity_matrix(args.index, args.adapter, data, "none")  # (Q, N)
    if args.gallery is not None:  # richer context columns of a rebuilt gallery, joined by tile id
        import geopandas as gpd

        extra = gpd.read_parquet(args.gallery / "tiles.parquet").set_index("tile_id")
        for column in ("features", "context", "categories"):
            if column in extra.columns:
                tiles = tiles.assign(**{column: extra.loc[tiles["tile_id"], column].to_numpy()})
    ranking = json.loads(RANKING.read_text()) if RANKING.is_file() else {"ranking": "pixels"}
    ranked = similarity
    if ranking.get("ranking") == "hybrid":  # rank as the app does; hits keep their MLLM similarity
        from retriever.index.bm25 import ContextMatcher

        column = "context" if "context" in tiles.columns else "features"
        matcher = ContextMatcher([str(t) for t in tiles[column]])
        bm25 = np.stack([matcher.scores(q) for q in data.queries])
        ranked = fuse_all(similarity, bm25, float(ranking["weight"]))
    top = order_of(ranked)[:, :TOP_K]  # (Q, k) tile rows
    scores = np.take_along_axis(similarity, top, axis=1)  # (Q, k)
    err_m = 1000.0 * haversine_km(
        data.lat[:, None], data.lon[:, None], tiles["lat"].to_numpy()[top], tiles["lon"].to_numpy()[top]
    )  # (Q, k)
    label = err_m <= RADIUS_M  # (Q, k)
    import shapely

    footprints = np.asarray(tiles.geometry.values)[top]  # (Q, k)
    inside = shapely.contains(
        footprints, shapely.points(data.lon, data.lat)[:, None]
    )  # (Q, k) hit@1 per rank
    finder = EvidenceFinder(tiles)
    ids = tiles["tile_id"].astype(str).to_numpy()
    evidence = [[finder.evidence(q, _Hit(ids[r])) for r in rows] for q, rows in zip(data.queries, top)]
    share = np.array([[e.support_share for e in row] for row in evidence])  # (Q, k)
    names = np.array([[e.name_share for e in row] for row in evidence])  # (Q, k)
    no_mentions = np.array([not row[0].matches for row in evidence])  # (Q,)
    print(f"evidence of {len(data.queries)} x {TOP_K} hits: {time.perf_counter() - started:.0f} s so far")

    fold_of = np.random.default_rng(0).permutation(len(data.queries)) % FOLDS
    before = np.stack([similarity_probs(s) for s in scores])  # what the app showed: the similarity softmax
    results = {}
    for temperature in TEMPERATURES:
        x = np.stack(
            [confidence_features(s, temperature, sh, None, n) for s, sh, n in zip(scores, share, names)]
        )  # (Q, k, 7)
        for fit_on in ("top1", "all"):
            held = np.zeros_like(scores)
            for f in range(FOLDS):
                train = fold_of != f
                xs, ys = (x[train, :1], label[train, :1]) if fit_on == "top1" else (x[train], label[train])
                held[~train] = sigmoid(x[~train] @ _weights(xs, ys.astype(float)))
            p1 = np.clip(held[:, 0], 1e-6, 1 - 1e-6)
            loss = float(-(label[:, 0] * np.log(p1) + (~label[:, 0]) * np.log(1 - p1)).mean())
            results[(temperature, fit_on)] = (loss, held, x)
    (temperature, fit_on), (loss, held, x) = min(results.items(), key=lambda item: item[1][0])
    xs, ys = (x[:, :1], label[:, :1]) if fit_on == "top1" else (x, label)
    w = _weights(xs, ys.astype(float))
    held = np.where(no_mentions[:, None], np.minimum(held, 0.05), held)  # as the Explainer caps it

    figures = {
        "top1": {
            "auroc_before": auroc(before[:, 0], label[:, 0]),
            "ece_before": expected_calibration_error(before[:, 0], label[:, 0]),
            "auroc_after": auroc(held[:, 0], label[:, 0]),
            "ece_after": expected_calibration_error(held[:, 0], label[:, 0]),
            "auroc_similarity_only": auroc(scores[:, 0], label[:, 0]),
        },
        "top5": {
            "auroc_before": auroc(before.ravel(), label.ravel()),
            "ece_before": expected_calibration_error(before.ravel(), label.ravel()),
            "auroc_after": auroc(held.ravel(), label.ravel()),
            "ece_after": expected_calibration_error(held.ravel(), label.ravel()),
        },
    }

    # ERM: the weight chosen on the other folds by hit@1-within-150 m, applied to the held-out fold
    def top1_ok(order: np.ndarray, rows: np.ndarray, truth: np.ndarray = label) -> np.ndarray:
        return np.take_along_axis(truth[rows], order[:, :1], axis=1)[:, 0]

    erm_held = np.zeros(len(data.queries), dtype=bool)
    erm_hit = np.zeros(len(data.queries), dtype=bool)
    fold_weights = []
    for f in range(FOLDS):
        train, test = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        best = max(
            ERM_GRID,
            key=lambda wt: (top1_ok(_erm(scores[train], held[train], wt, temperature), train).mean(), wt),
        )
        fold_weights.append(float(best))
        order = _erm(scores[test], held[test], best, temperature)
        erm_held[test] = top1_ok(order, test)
        erm_hit[test] = top1_ok(order, test, inside)
    erm = {
        "L@150_before": float(label[:, 0].mean()),
        "L@150_after": float(erm_held.mean()),
        "hit@1_before": float(inside[:, 0].mean()),
        "hit@1_after": float(erm_hit.mean()),
        "fold_weights": fold_weights,
    }
    rerank_weight = 1.0
    if erm["L@150_after"] >= erm["L@150_before"] + ERM_MIN_GAIN and erm["hit@1_after"] >= erm["hit@1_before"]:
        rerank_weight = float(np.median(fold_weights))
    report = {
        "fitted_on": f"all of assets/demo/eval/human_dev.jsonl, {'top-1' if fit_on == 'top1' else 'top-5'} hits; "
        "the held_out figures are 5-fold cross-validated",
        "label": f"hit centre within {RADIUS_M:.0f} m of the true point",
        "ranking": ranking,
        "fit_on": fit_on,
        "held_out": figures,
        "erm": erm,
        "no_mention_queries": int(no_mentions.sum()),
        "n_queries": len(data.queries),
        "seconds": round(time.perf_counter() - started, 1),
    }
    cal = Calibration(
        temperature=float(temperature),
        rerank_weight=rerank_weight,
        report=report,
        **{name: float(v) for name, v in zip(FEATURE_NAMES, w)},
    )
    print(_summary(cal))
    if not args.dry_run:
        path = cal.save(args.adapter / CALIBRATION_FILE)
        print(f"wrote {path}")
    return report


def _summary(cal: Calibration) -> str:
    r = cal.report
    t1, t5, erm = r["held_out"]["top1"], r["held_out"]["top5"], r["erm"]
    return "\n".join(
        [
            f"T={cal.temperature} fit on {r['fit_on']}: "
            + " ".join(f"{n}={getattr(cal, n):.3f}" for n in FEATURE_NAMES)
            + " (P(yes) left out)",
            f"top-1 held out: AUROC {t1['auroc_before']:.3f} -> {t1['auroc_after']:.3f} (target >= 0.85), "
            f"ECE {t1['ece_before']:.3f} -> {t1['ece_after']:.3f} (target <= 0.05); "
            f"similarity alone AUROC {t1['auroc_similarity_only']:.3f}",
            f"top-5 held out: AUROC {t5['auroc_before']:.3f} -> {t5['auroc_after']:.3f}, "
            f"ECE {t5['ece_before']:.3f} -> {t5['ece_after']:.3f}",
            f"ERM (cross-validated): L@150 {erm['L@150_before']:.3f} -> {erm['L@150_after']:.3f}, "
            f"hit@1 {erm['hit@1_before']:.3f} -> {erm['hit@1_after']:.3f}, fold weights "
            f"{erm['fold_weights']}; rerank_weight {cal.rerank_weight} ({'on' if cal.rerank_weight < 1 else 'off'})",
            f"queries with no checkable mention: {r['no_mention_queries']} of {r['n_queries']}; {r['seconds']} s",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.calibrate_explain", description=__doc__)
    p.add_argument("--index", type=Path, default=ASSETS / "index")
    p.add_argument("--adapter", type=Path, default=ASSETS / "adapter")
    p.add_argument("--gallery", type=Path, help="take the tiles' context columns from this gallery folder")
    p.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
