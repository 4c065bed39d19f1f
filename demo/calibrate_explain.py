"""`python -m demo.calibrate_explain`: fit the explainer's confidence and ERM on the human dev set, nested 5-fold CV.

The confidence of a hit is a small L2 logistic model (calibration format version 2) of named HIT_FEATURES: the
MLLM similarity softmax and margin, the tile's BM25 z-score over the gallery (retriever.explain.signals; like
the lexical half of the app's hybrid ranking, with the vocabulary's stopwords), the evidence (share of the query's mentions the tile supports, its margin over the other hits,
the share of names found, misses) and the query's length. The label is "this hit's centre lies within 150 m of
the true point". The feature set, the L2 strength, the temperature and whether to fit on the top-1 or on all
top-5 hits are chosen by inner 5-fold CV (top-1 log-loss); every figure is from the outer folds, with bootstrap
95% intervals over queries. ERM re-ranking of the top 5 by the confidence is chosen and measured the same way
and kept only if it helps. P(yes) is left out: the last fit gave it a negative weight, and one MLLM forward per
hit costs minutes here. Only assets/demo/eval/human_dev.jsonl is read. Writes explain_calibration.json into
the adapter folder, atomically.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from demo import ASSETS
from demo.evaluate_human import RANKING, SPLITS, fuse_all, order_of, read_human, similarity_matrix
from retriever._cli import run_cli
from retriever.evaluate.metrics import haversine_km
from retriever.explain.calibration import (
    CALIBRATION_VERSION,
    NO_MENTION_CAP,
    Calibration,
    HitInputs,
    auroc,
    confidence_features,
    expected_calibration_error,
    fit_logistic,
    fit_standardised,
    hit_features,
    logit,
    sigmoid,
    similarity_probs,
)
from retriever.explain.evidence import EvidenceFinder
from retriever.explain.signals import LexicalScores, hit_inputs
from retriever.models.config import CALIBRATION_FILE

TOP_K = 5
RADIUS_M = 150.0
FOLDS = 5
SEED = 0
BOOTSTRAP = 2000
# Candidate feature sets (HIT_FEATURES names), smallest first; inner CV picks one per outer fold.
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "similarity+evidence": ("sim", "sim_margin", "support", "support_margin", "name_share"),
    "+bm25+length": ("sim", "sim_margin", "bm25_z", "support_margin", "name_share", "query_words"),
    "+bm25+length+names": (
        "sim", "sim_margin", "bm25_z", "bm25_margin", "support", "support_margin", "name_share", "has_name",
        "miss_share", "query_words",
    ),
}  # fmt: skip
L2_GRID = (1e-3, 1e-2, 1e-1)  # on z-scored features
TEMPERATURES = (0.05, 0.1)
FIT_ON = ("top1", "all")
ERM_MIN_GAIN = 0.02  # ERM goes on only for at least this held-out L@150 gain (1 query of 199 is noise)
ERM_GRID = tuple(round(w, 1) for w in np.linspace(0.0, 1.0, 11))
# The committed version-1 model (session 3), refitted under the same outer folds for a like-for-like "before".
PREVIOUS = {"temperature": 0.1, "columns": (0, 1, 2, 3, 4, 6), "l2": 1e-2}

Candidate = tuple[str, float, float, str]  # feature set, l2, temperature, fit on


class _Hit:
    """What EvidenceFinder reads of a hit: its tile id (the context comes from the tile table)."""

    def __init__(self, tile_id: str) -> None:
        self.tile_id = tile_id
        self.context: dict = {}


# -- the fit ------------------------------------------------------------------------------------------------


class _Designs:
    """The (Q, k, F) feature arrays of every candidate set and temperature, computed once."""

    def __init__(self, inputs: Sequence[HitInputs], label: np.ndarray) -> None:
        self.inputs, self.label = inputs, label
        self.capped = np.array([not np.any(h.mentions) for h in inputs])  # (Q,) the no-mention cap applies
        self._x: dict[tuple[str, float], np.ndarray] = {}

    def x(self, name: str, temperature: float) -> np.ndarray:
        key = (name, temperature)
        if key not in self._x:
            self._x[key] = np.stack([hit_features(h, FEATURE_SETS[name], temperature) for h in self.inputs])
        return self._x[key]

    def fit(self, rows: np.ndarray, candidate: Candidate) -> tuple[np.ndarray, float, np.ndarray]:
        """coef, bias and standardised coef of one candidate, fitted on the queries `rows`."""
        name, l2, temperature, fit_on = candidate
        x, y = self.x(name, temperature)[rows], self.label[rows]  # (R, k, F), (R, k)
        if fit_on == "top1":
            x, y = x[:, :1], y[:, :1]
        return fit_standardised(x.reshape(-1, x.shape[-1]), y.ravel().astype(float), l2)

    def predict(self, rows: np.ndarray, candidate: Candidate, coef: np.ndarray, bias: float) -> np.ndarray:
        """(R, k) confidences as Calibration.confidence_of gives them (the no-mention cap included)."""
        conf = sigmoid(self.x(candidate[0], candidate[2])[rows] @ coef + bias)
        return np.where(self.capped[rows, None], np.minimum(conf, NO_MENTION_CAP), conf)


def _folds(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % FOLDS


def _out_of_fold(designs: _Designs, rows: np.ndarray, candidate: Candidate, seed: int) -> np.ndarray:
    """(R, k) confidences of `rows`, each predicted by a fit on the other folds of `rows`."""
    fold = _folds(len(rows), seed)
    out = np.zeros((len(rows), designs.label.shape[1]))
    for f in range(FOLDS):
        coef, bias, _ = designs.fit(rows[fold != f], candidate)
        out[fold == f] = designs.predict(rows[fold == f], candidate, coef, bias)
    return out


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _select(designs: _Designs, rows: np.ndarray, seed: int) -> tuple[Candidate, np.ndarray]:
    """The candidate with the lowest out-of-fold top-1 log-loss on `rows`, and its out-of-fold confidences."""
    best: tuple[float, Candidate, np.ndarray] | None = None
    for candidate in itertools.product(FEATURE_SETS, L2_GRID, TEMPERATURES, FIT_ON):
        held = _out_of_fold(designs, rows, candidate, seed)
        loss = _log_loss(held[:, 0], designs.label[rows, 0])
        if best is None or loss < best[0] - 1e-12:  # grid order breaks ties: the smaller set, the lower l2
            best = (loss, candidate, held)
    assert best is not None
    return best[1], best[2]


# -- ERM ----------------------------------------------------------------------------------------------------


def _erm(scores: np.ndarray, conf: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """(Q, k) positions best first under weight * s / T + (1 - weight) * logit(confidence), as Explainer.rerank."""
    return np.argsort(-(weight * scores / temperature + (1 - weight) * logit(conf)), axis=1, kind="stable")


def _first(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, order[:, :1], axis=1)[:, 0]


def _erm_weight(scores: np.ndarray, conf: np.ndarray, label: np.ndarray, temperature: float) -> float:
    """The grid weight with the best top-1 within 150 m; ties go to the larger weight (less re-ranking)."""
    return max(ERM_GRID, key=lambda w: (_first(_erm(scores, conf, w, temperature), label).mean(), w))


# -- figures ------------------------------------------------------------------------------------------------


def erm_pays(
    gain: np.ndarray, hit1_before: np.ndarray, hit1_after: np.ndarray, shown_auroc_holds: bool
) -> bool:
    """ERM goes on for a held-out L@150 gain (Q,) of ERM_MIN_GAIN or more, when hit@1 does not fall, and when
    the shown top-1 confidence still tells right from wrong as well (ERM picks that top-1 by the same
    confidence: on the 2026-12-01 model +0.025 L@150 cost 0.871 -> 0.844 AUROC, so it stayed off)."""
    return bool(gain.mean() >= ERM_MIN_GAIN and hit1_after.mean() >= hit1_before.mean() and shown_auroc_holds)


def _interval(stat: Callable[[np.ndarray], float], n: int, seed: int = SEED) -> list[float]:
    """Point value and 95% percentile bootstrap interval of stat(rows) over queries resampled with replacement."""
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)])
    draws = draws[np.isfinite(draws)]
    return [float(stat(np.arange(n))), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def _confidence_figures(conf: np.ndarray, correct: np.ndarray) -> dict[str, list[float]]:
    """AUROC and ECE of (Q,) or (Q, k) confidences, each with its bootstrap interval over queries."""
    return {
        "auroc": _interval(lambda r: auroc(conf[r], correct[r]), len(conf)),
        "ece": _interval(lambda r: expected_calibration_error(conf[r], correct[r]), len(conf)),
    }


def _ece_floor(conf: np.ndarray, draws: int = BOOTSTRAP) -> list[float]:
    """ECE that perfectly calibrated confidences would still show on this many queries: labels drawn as
    Bernoulli(confidence). Mean and 95% range."""
    rng = np.random.default_rng(SEED)
    values = np.array([expected_calibration_error(conf, rng.random(conf.shape) < conf) for _ in range(draws)])
    return [float(values.mean()), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[list[float]]:
    """[bin low edge, items, mean confidence, share correct] per non-empty equal-width bin."""
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return [
        [b / bins, int((which == b).sum()), float(conf[which == b].mean()), float(correct[which == b].mean())]
        for b in range(bins)
        if (which == b).any()
    ]


def _calibration(
    candidate: Candidate, coef: np.ndarray, bias: float, rerank_weight: float, report: dict
) -> Calibration:
    name, _, temperature, _ = candidate
    return Calibration(
        version=CALIBRATION_VERSION,
        temperature=float(temperature),
        features=FEATURE_SETS[name],
        coef=tuple(float(c) for c in coef),
        bias=float(bias),
        w_sim=0.0,
        w_yes=0.0,
        rerank_weight=float(rerank_weight),
        report=report,
    )


# -- the run ------------------------------------------------------------------------------------------------


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
        from retriever.bm25 import ContextMatcher

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
    lexical = LexicalScores(tiles)
    ids = tiles["tile_id"].astype(str).to_numpy()
    inputs = [
        hit_inputs(q, s, [finder.evidence(q, _Hit(ids[r])) for r in rows], lexical.z(q, list(ids[rows])))
        for q, s, rows in zip(data.queries, scores, top, strict=True)
    ]
    designs = _Designs(inputs, label)
    no_mentions = designs.capped  # (Q,)
    n = len(data.queries)
    print(f"evidence of {n} x {TOP_K} hits: {time.perf_counter() - started:.0f} s so far")

    # nested CV: per outer fold, the candidate and the ERM weight are chosen on the other folds alone
    outer = _folds(n, SEED)
    held = np.zeros(label.shape)
    erm_top1 = np.zeros(n, dtype=int)  # position (in the hybrid top-k) of the ERM top-1, held out
    chosen: list[dict] = []
    for f in range(FOLDS):
        train, test = np.flatnonzero(outer != f), np.flatnonzero(outer == f)
        candidate, inner_held = _select(designs, train, SEED + 1 + f)
        coef, bias, _ = designs.fit(train, candidate)
        held[test] = designs.predict(test, candidate, coef, bias)
        weight = _erm_weight(scores[train], inner_held, label[train], candidate[2])
        erm_top1[test] = _erm(scores[test], held[test], weight, candidate[2])[:, 0]
        chosen.append({"candidate": list(candidate), "erm_weight": float(weight)})
    print(f"nested CV: {time.perf_counter() - started:.0f} s so far; {chosen}")

    # the previous model (version 1 features, committed settings) under the same outer folds
    prev_x = np.stack(
        [confidence_features(h.scores, PREVIOUS["temperature"], h.share, None, h.name_share) for h in inputs]
    )[..., list(PREVIOUS["columns"])]  # (Q, k, 6)
    prev = np.zeros(label.shape)
    for f in range(FOLDS):
        train = outer != f
        w = fit_logistic(prev_x[train, 0], label[train, 0].astype(float), l2=PREVIOUS["l2"])
        prev[~train] = sigmoid(prev_x[~train] @ w)
    prev = np.where(no_mentions[:, None], np.minimum(prev, NO_MENTION_CAP), prev)
    softmax = np.stack([similarity_probs(s) for s in scores])  # what the app showed with no calibration

    # the final fit on all of dev, chosen by the same rule; ERM weight: the median of the outer folds'
    candidate, all_held = _select(designs, np.arange(n), SEED)
    coef, bias, standardised = designs.fit(np.arange(n), candidate)
    rows = np.arange(n)[:, None]
    l150 = {"before": label[:, 0], "after": label[rows, erm_top1[:, None]][:, 0]}
    hit1 = {"before": inside[:, 0], "after": inside[rows, erm_top1[:, None]][:, 0]}
    weights = [c["erm_weight"] for c in chosen]
    gain = l150["after"].astype(float) - l150["before"]
    erm_shown = held[rows, erm_top1[:, None]][:, 0]  # (Q,) the confidence of ERM's top-1
    erm_ranks_as_well = auroc(erm_shown, l150["after"]) >= auroc(held[:, 0], l150["before"])
    erm_on = args.erm == "auto" and erm_pays(gain, hit1["before"], hit1["after"], erm_ranks_as_well)
    rerank_weight = float(np.median(weights)) if erm_on else 1.0
    shown = erm_shown if erm_on else held[:, 0]  # the app's top-1 and its confidence
    shown_ok = l150["after"] if erm_on else l150["before"]
    figures = {
        "top1_similarity_softmax": _confidence_figures(softmax[:, 0], label[:, 0]),
        "top1_previous_v1": _confidence_figures(prev[:, 0], label[:, 0]),
        "top1_after": _confidence_figures(held[:, 0], label[:, 0]),
        "top1_as_shown": _confidence_figures(shown, shown_ok),
        "top5_previous_v1": _confidence_figures(prev, label),
        "top5_after": _confidence_figures(held, label),
        "ece_if_perfectly_calibrated_top1": _ece_floor(held[:, 0]),
        "reliability_top1_after": _reliability(held[:, 0], label[:, 0]),
    }
    erm = {
        "L@150_before": _interval(lambda r: l150["before"][r].mean(), n),
        "L@150_after": _interval(lambda r: l150["after"][r].mean(), n),
        "L@150_gain": _interval(lambda r: gain[r].mean(), n),
        "hit@1_before": _interval(lambda r: hit1["before"][r].mean(), n),
        "hit@1_after": _interval(lambda r: hit1["after"][r].mean(), n),
        "fold_weights": weights,
        "on": bool(erm_on),
        "rule": f"on when the held-out L@150 gain >= {ERM_MIN_GAIN}, hit@1 does not fall and the shown top-1 "
        f"confidence's AUROC does not fall (--erm {args.erm})",
        "shown_auroc_holds": bool(erm_ranks_as_well),
    }
    report = {
        "version": CALIBRATION_VERSION,
        "fitted_on": "all of assets/demo/eval/human_dev.jsonl; figures are nested 5-fold cross-validated "
        "([value, bootstrap 2.5%, 97.5%] over queries)",
        "label": f"hit centre within {RADIUS_M:.0f} m of the true point",
        "ranking": ranking,
        "chosen": {
            "features": candidate[0],
            "l2": candidate[1],
            "temperature": candidate[2],
            "fit_on": candidate[3],
        },
        "outer_folds": chosen,
        "standardised_coef": dict(zip(FEATURE_SETS[candidate[0]], map(float, standardised), strict=True)),
        "cv_log_loss_top1": _log_loss(all_held[:, 0], label[:, 0]),
        "held_out": figures,
        "erm": erm,
        "no_mention_queries": int(no_mentions.sum()),
        "n_queries": n,
        "seconds": round(time.perf_counter() - started, 1),
    }
    cal = _calibration(candidate, coef, bias, rerank_weight, report)
    fitted = designs.predict(np.arange(n), candidate, coef, bias)
    if not np.allclose([cal.confidence_of(h) for h in inputs], fitted, atol=1e-9):
        raise AssertionError("the saved calibration does not reproduce the fitted confidences")
    print(_summary(cal))
    if not args.dry_run:
        path = cal.save(args.adapter / CALIBRATION_FILE)
        print(f"wrote {path}")
    return report


def _fmt(v: list[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _summary(cal: Calibration) -> str:
    r = cal.report
    h, erm, c = r["held_out"], r["erm"], r["chosen"]
    lines = [
        f"chosen: {c['features']} (l2 {c['l2']}, T {c['temperature']}, fit on {c['fit_on']}); "
        f"outer folds chose {[o['candidate'][0] for o in r['outer_folds']]}",
        "coef: "
        + ", ".join(f"{f}={w:+.3f}" for f, w in zip(cal.features, cal.coef, strict=True))
        + f", bias={cal.bias:+.3f}",
        "standardised: " + ", ".join(f"{f}={w:+.2f}" for f, w in r["standardised_coef"].items()),
    ]
    for name in ("top1_similarity_softmax", "top1_previous_v1", "top1_after", "top1_as_shown", "top5_previous_v1",
                 "top5_after"):  # fmt: skip
        lines.append(f"{name:24s} AUROC {_fmt(h[name]['auroc'])}  ECE {_fmt(h[name]['ece'])}")
    lines += [
        f"ECE of perfectly calibrated top-1 confidences on {r['n_queries']} queries: "
        f"{_fmt(h['ece_if_perfectly_calibrated_top1'])}",
        f"ERM (nested CV): L@150 {_fmt(erm['L@150_before'])} -> {_fmt(erm['L@150_after'])} "
        f"(gain {_fmt(erm['L@150_gain'])}); hit@1 {_fmt(erm['hit@1_before'])} -> {_fmt(erm['hit@1_after'])}; "
        f"fold weights {erm['fold_weights']}; rerank_weight {cal.rerank_weight} ({'on' if erm['on'] else 'off'})",
        f"queries with no checkable mention: {r['no_mention_queries']} of {r['n_queries']}; {r['seconds']} s",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.calibrate_explain", description=__doc__)
    p.add_argument("--index", type=Path, default=ASSETS / "index")
    p.add_argument("--adapter", type=Path, default=ASSETS / "adapter")
    p.add_argument("--gallery", type=Path, help="take the tiles' context columns from this gallery folder")
    p.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    p.add_argument(
        "--erm",
        choices=("auto", "off"),
        default="auto",
        help=f"auto: re-rank the top {TOP_K} only for a held-out L@150 gain of {ERM_MIN_GAIN} or more (default)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
