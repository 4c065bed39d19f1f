"""The numbers of explanations, numpy only: similarity softmax, confidence calibration, ECE, ERM, the fits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from retriever._io import write_json_atomic
from retriever.errors import DataFormatError
from retriever.models.config import CALIBRATION_FILE

DEFAULT_TEMPERATURE = 0.05  # similarity softmax temperature (cosine scores of a contrastive model)
DEFAULT_RERANK_WEIGHT = 0.5  # ERM: share of the similarity in the combined score (1 = similarity only)
LOGIT_CLIP = 1e-6  # probabilities are clipped to [eps, 1 - eps] before a logit
TEMPERATURE_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # fit_calibration's search
WEIGHT_GRID = tuple(float(w) for w in np.round(np.linspace(0.0, 1.0, 21), 2))  # fit_rerank_weight's search
CALIBRATION_VERSION = 2  # 1: the fixed w_* columns of confidence_features; 2: named HIT_FEATURES with coef
NO_MENTION_CAP = 0.05  # a query that mentions nothing the map data could check gets at most this confidence


# -- similarity evidence and log-odds ------------------------------------------------------------------------


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def similarity_probs(scores: np.ndarray, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Softmax of the top-K similarity scores at a temperature: (k,) -> (k,), sums to 1."""
    s = np.asarray(scores, dtype=np.float64) / temperature
    e = np.exp(s - s.max()) if s.size else s
    return e / e.sum() if s.size else e


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of |mean confidence - accuracy| x share of items."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.size == 0:
        return 0.0
    which = np.minimum((conf * bins).astype(int), bins - 1)  # (N,) bin of each item; 1.0 joins the top bin
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(conf[inside].mean() - hit[inside].mean())
    return float(ece)


# -- ERM: expected-relevance re-ranking ----------------------------------------------------------------------


def erm_scores(
    similarity: np.ndarray, p_yes: np.ndarray, weight: float, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """ERM score of each candidate: w * s / T + (1 - w) * logit(P(yes)).

    Both terms are log-odds: s / T is the log of the similarity softmax up to a constant shared by the
    candidates of one query, so only its differences matter, as for ranking. w = 1 keeps the similarity order.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the ERM weight must lie in [0, 1], got {weight}")
    s = np.asarray(similarity, dtype=np.float64) / temperature
    return weight * s + (1.0 - weight) * logit(p_yes)


def erm_order(
    similarity: np.ndarray, p_yes: np.ndarray, weight: float, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """Positions of the candidates, best first, under the ERM score; ties keep the incoming order."""
    return np.argsort(-erm_scores(similarity, p_yes, weight, temperature), kind="stable")


# -- calibration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValExample:
    """One validation query: its top-k similarity scores, the MLLM's P(yes) and which candidates are right."""

    scores: np.ndarray  # (k,) similarity, best first
    p_yes: np.ndarray  # (k,)
    relevant: np.ndarray  # (k,) bool


@dataclass
class Calibration:
    """confidence = sigmoid(w_sim * logit(softmax(s / T)) + w_yes * logit(P(yes)) + bias); plus the ERM weight.

    The defaults (1, 1, 0) multiply the two odds: a naive product of experts until fitted on validation.
    Saved as CALIBRATION_FILE next to the adapter (or in the model folder), where Explainer looks first.
    """

    temperature: float = DEFAULT_TEMPERATURE
    w_sim: float = 1.0
    w_yes: float = 1.0
    bias: float = 0.0
    rerank_weight: float = DEFAULT_RERANK_WEIGHT
    report: dict[str, Any] = field(default_factory=dict)  # how it was fitted: ECE / R@1 before and after, n
    w_margin: float = 0.0  # x (s_i - best other s) / T: how far this hit stands out from the rest
    w_share: float = 0.0  # x the evidence support share of the hit (retriever.explain.evidence)
    w_relative: float = 0.0  # x (its share - the best share among the other hits)
    w_names: float = 0.0  # x the share of the query's names and streets that the tile supports
    # version 2: confidence = sigmoid(coef . hit_features(features) + bias), in raw units of HIT_FEATURES
    version: int = 1
    features: tuple[str, ...] = ()
    coef: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.features, self.coef = tuple(self.features), tuple(float(c) for c in self.coef)
        if self.version > CALIBRATION_VERSION or self.version < 1:
            raise DataFormatError(
                f"calibration format version {self.version} is not known here (this code reads 1 to "
                f"{CALIBRATION_VERSION}); refit it with `python -m demo.calibrate_explain`, or update the code"
            )
        if self.version >= 2:
            unknown = [f for f in self.features if f not in HIT_FEATURES]
            if unknown or len(self.features) != len(self.coef):
                raise DataFormatError(
                    f"calibration version {self.version}: unknown features {unknown} or {len(self.coef)} "
                    f"weights for {len(self.features)} features; known: {', '.join(HIT_FEATURES)}"
                )

    @property
    def uses_p_yes(self) -> bool:
        if self.version >= 2:
            return any(f == "p_yes" and c != 0.0 for f, c in zip(self.features, self.coef, strict=True))
        return self.w_yes != 0.0

    @property
    def uses_evidence(self) -> bool:
        if self.version >= 2:
            return any(f not in ("sim", "sim_margin", "p_yes") for f in self.features)
        return any(w != 0.0 for w in (self.w_share, self.w_margin, self.w_relative, self.w_names))

    @property
    def uses_bm25(self) -> bool:
        """Whether the confidence reads each hit's BM25 z-score over the gallery (HitInputs.bm25_z)."""
        return self.version >= 2 and any(f.startswith("bm25") for f in self.features)

    def confidence_of(self, hits: HitInputs) -> np.ndarray:
        """(k,) confidence of one query's top-k from everything known about them; capped at NO_MENTION_CAP
        when the query mentions nothing checkable (HitInputs.mentions all 0)."""
        if self.version >= 2:
            conf = sigmoid(
                hit_features(hits, self.features, self.temperature) @ np.array(self.coef) + self.bias
            )
        else:
            conf = self.confidence(hits.scores, hits.p_yes, hits.share, hits.name_share)
        if hits.mentions is not None and not np.any(np.asarray(hits.mentions) > 0):
            conf = np.minimum(conf, NO_MENTION_CAP)
        return conf

    def confidence(
        self,
        scores: np.ndarray,
        p_yes: np.ndarray | None = None,
        share: np.ndarray | None = None,
        name_share: np.ndarray | None = None,
    ) -> np.ndarray:
        """(k,) similarity scores of one query's top-k, (k,) P(yes), (k,) support and name shares -> (k,).

        Each of P(yes) and the shares may be None when its weight is 0 (it then counts as 0). A version 2
        calibration reads more (confidence_of); here the inputs it is not given count as 0.
        """
        if self.version >= 2:
            return self.confidence_of(HitInputs(np.asarray(scores), share, name_share, p_yes=p_yes))
        x = confidence_features(scores, self.temperature, share, p_yes, name_share)  # (k, 7)
        return sigmoid(x @ self.weights)

    @property
    def weights(self) -> np.ndarray:
        """(7,) in the column order of confidence_features."""
        return np.array(
            [self.w_sim, self.w_margin, self.w_share, self.w_relative, self.w_names, self.w_yes, self.bias]
        )

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON, atomically."""
        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a saved calibration (format version 1 or 2); other keys are ignored, a newer version fails."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise DataFormatError(f"{path}: a calibration is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def find(cls, folders: Sequence[str | Path | None]) -> Calibration | None:
        """The calibration saved in the first of `folders` holding CALIBRATION_FILE; None when none does."""
        for folder in folders:
            if folder and (Path(folder) / CALIBRATION_FILE).is_file():
                return cls.load(Path(folder) / CALIBRATION_FILE)
        return None


def margins(scores: np.ndarray) -> np.ndarray:
    """(k,) -> (k,): each score less the best of the others (positive only for a top-1 that stands out)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 2:
        return np.zeros_like(s)
    order = np.argsort(-s, kind="stable")
    best, second = s[order[0]], s[order[1]]
    return s - np.where(np.arange(s.size) == order[0], second, best)


FEATURE_NAMES = ("w_sim", "w_margin", "w_share", "w_relative", "w_names", "w_yes", "bias")

# Version 2's features of a hit among one query's top-k, by name (Calibration.features picks a few).
HIT_FEATURES: dict[str, str] = {
    "sim": "logit of the similarity softmax at the calibration's temperature",
    "sim_margin": "(similarity - the best other hit's) / temperature",
    "bm25_z": "BM25 of the tile's context, z-scored over the gallery (retriever.explain.signals)",
    "bm25_margin": "bm25_z - the best other hit's",
    "support": "share of the query's mentions the tile supports (nearby counts half)",
    "support_margin": "support - the best other hit's",
    "name_share": "support share of the query's names, streets and crossings alone",
    "name_hit": "1 when a name, street or crossing of the query is in the tile",
    "has_name": "1 when the query names a place, street or crossing at all",
    "miss_share": "share of the query's mentions found neither in the tile nor nearby",
    "query_words": "log(1 + content words of the query)",
    "p_yes": "logit of the MLLM's P(yes)",
}


@dataclass(frozen=True)
class HitInputs:
    """What the confidence of one query's top-k can read, each (k,) (query_words a count); None counts as 0."""

    scores: np.ndarray  # MLLM similarity
    share: np.ndarray | None = None  # Evidence.support_share
    name_share: np.ndarray | None = None  # Evidence.name_share
    bm25_z: np.ndarray | None = None
    name_hit: np.ndarray | None = None
    has_name: np.ndarray | None = None
    miss_share: np.ndarray | None = None
    mentions: np.ndarray | None = None  # number of checkable mentions (0 for an HTML probe or emoji)
    query_words: int = 0
    p_yes: np.ndarray | None = None


def hit_features(hits: HitInputs, names: Sequence[str], temperature: float) -> np.ndarray:
    """(k, len(names)): the HIT_FEATURES columns `names` of one query's top-k."""
    s = np.asarray(hits.scores, dtype=np.float64)

    def arr(value: np.ndarray | None) -> np.ndarray:
        return np.zeros_like(s) if value is None else np.asarray(value, dtype=np.float64).reshape(s.shape)

    columns = {
        "sim": lambda: logit(similarity_probs(s, temperature)),
        "sim_margin": lambda: margins(s) / temperature,
        "bm25_z": lambda: arr(hits.bm25_z),
        "bm25_margin": lambda: margins(arr(hits.bm25_z)),
        "support": lambda: arr(hits.share),
        "support_margin": lambda: margins(arr(hits.share)),
        "name_share": lambda: arr(hits.name_share),
        "name_hit": lambda: arr(hits.name_hit),
        "has_name": lambda: arr(hits.has_name),
        "miss_share": lambda: arr(hits.miss_share),
        "query_words": lambda: np.full_like(s, np.log1p(hits.query_words)),
        "p_yes": lambda: np.zeros_like(s) if hits.p_yes is None else logit(hits.p_yes),
    }
    return np.stack([columns[n]() for n in names], axis=1) if names else np.zeros((s.size, 0))


def confidence_features(
    scores: np.ndarray,
    temperature: float,
    share: np.ndarray | None = None,
    p_yes: np.ndarray | None = None,
    name_share: np.ndarray | None = None,
) -> np.ndarray:
    """(k,) -> (k, 7): logit softmax(s / T), margin / T, share, share - best other share, name share,
    logit P(yes), 1 (the columns of FEATURE_NAMES)."""
    s = np.asarray(scores, dtype=np.float64)
    zeros = np.zeros_like(s)
    sh = zeros if share is None else np.asarray(share, dtype=np.float64)
    return np.stack(
        [
            logit(similarity_probs(s, temperature)),
            margins(s) / temperature,
            sh,
            margins(sh),
            zeros if name_share is None else np.asarray(name_share, dtype=np.float64),
            zeros if p_yes is None else logit(p_yes),
            np.ones_like(s),
        ],
        axis=1,
    )


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted half; nan without both."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    sorted_x = x[order]
    i = 0
    while i < x.size:  # average ranks over ties
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """L2-regularised logistic regression (last column the unpenalised bias): (N, F), (N,) -> (F,)."""
    return _fit_logistic(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), l2=l2)


def fit_standardised(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float, np.ndarray]:
    """L2 logistic regression on z-scored columns (so one l2 suits every unit), folded back to raw units.

    (N, F), (N,) -> (coef (F,), bias, the standardised coef (F,), comparable across features).
    """
    x = np.asarray(x, dtype=np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant column gets weight 0 through the penalty
    z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    w = _fit_logistic(z, np.asarray(y, dtype=np.float64), l2=l2)
    coef = w[:-1] / scale
    return coef, float(w[-1] - coef @ mean), w[:-1]


def _flatten(examples: Sequence[ValExample]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    scores = [np.asarray(e.scores, dtype=np.float64) for e in examples]
    p_yes = np.concatenate([np.asarray(e.p_yes, dtype=np.float64) for e in examples])
    relevant = np.concatenate([np.asarray(e.relevant, dtype=bool) for e in examples])
    return scores, p_yes, relevant


def _features(scores: list[np.ndarray], p_yes: np.ndarray, temperature: float) -> np.ndarray:
    sim = np.concatenate([logit(similarity_probs(s, temperature)) for s in scores])
    return np.stack([sim, logit(p_yes), np.ones_like(sim)], axis=1)  # (N, 3)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Newton's method on the L2-regularised log-loss (the bias unpenalised): (N, 3), (N,) -> (3,)."""
    w = np.zeros(x.shape[1])
    penalty = np.diag([l2] * (x.shape[1] - 1) + [0.0])
    for _ in range(steps):
        p = sigmoid(x @ w)
        grad = x.T @ (p - y) / len(y) + penalty @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _log_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(sigmoid(x @ w), 1e-12, 1 - 1e-12)  # (N,)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def calibration_ece(calibration: Calibration, examples: Sequence[ValExample], bins: int = 10) -> float:
    """ECE of a calibration's confidences over every candidate of every example."""
    if not examples:
        return 0.0
    conf = np.concatenate([calibration.confidence(e.scores, e.p_yes) for e in examples])
    return expected_calibration_error(conf, _flatten(examples)[2], bins)


def fit_calibration(
    val_examples: Sequence[ValExample],
    temperatures: Sequence[float] = TEMPERATURE_GRID,
    base: Calibration | None = None,
    bins: int = 10,
) -> Calibration:
    """Fit the temperature (grid, by log-loss) and the logistic weights on validation examples.

    report holds the ECE of `base` (the uncalibrated defaults when None) and of the fit, both on these
    examples; measure on held-out examples with calibration_ece. The rerank weight is carried over.
    """
    if not val_examples:
        raise ValueError("fit_calibration needs at least one validation example")
    base = base or Calibration()
    scores, p_yes, relevant = _flatten(val_examples)
    y = relevant.astype(np.float64)
    if y.min() == y.max():
        raise ValueError("fit_calibration needs both relevant and irrelevant candidates")
    fits = []  # (log-loss, temperature, weights), in grid order: the first of equal losses wins
    for t in temperatures:
        x = _features(scores, p_yes, t)
        w = _fit_logistic(x, y)
        fits.append((_log_loss(x, y, w), t, w))
    loss, t, w = min(fits, key=lambda fit: fit[0])
    fitted = Calibration(
        temperature=float(t),
        w_sim=float(w[0]),
        w_yes=float(w[1]),
        bias=float(w[2]),
        rerank_weight=base.rerank_weight,
        report={**base.report},
    )
    fitted.report.update(
        ece_before=calibration_ece(base, val_examples, bins),
        ece_after=calibration_ece(fitted, val_examples, bins),
        log_loss=loss,
        n_queries=len(val_examples),
        n_candidates=int(y.size),
    )
    return fitted


# -- the ERM weight ------------------------------------------------------------------------------------------


def _first_relevant_rank(example: ValExample, weight: float, temperature: float) -> int:
    """0-based rank of the first relevant candidate under ERM; k when none is (the project's one R@k)."""
    from retriever.evaluate.metrics import first_relevant  # on use: this module loads with numpy alone

    order = erm_order(example.scores, example.p_yes, weight, temperature)  # (k,) positions, best first
    return int(first_relevant(order[None], np.asarray(example.relevant, dtype=bool)[None])[0])


def recall_at_1(examples: Sequence[ValExample], weight: float, temperature: float) -> float:
    """Share (in %) of queries whose ERM top-1 is relevant; weight 1 is the similarity ranking."""
    from retriever.evaluate.metrics import recall_at_k

    if not examples:
        return 0.0
    first = [_first_relevant_rank(e, weight, temperature) for e in examples]  # (Q,)
    return 100.0 * recall_at_k(first, 1)


@dataclass(frozen=True)
class RerankFit:
    weight: float
    r1_before: float  # similarity order
    r1_after: float  # ERM order at the fitted weight


def fit_rerank_weight(
    val_examples: Sequence[ValExample],
    temperature: float = DEFAULT_TEMPERATURE,
    grid: Sequence[float] = WEIGHT_GRID,
) -> RerankFit:
    """The ERM weight with the best validation R@1; ties go to the larger weight (closer to no re-ranking)."""
    if not val_examples:
        raise ValueError("fit_rerank_weight needs at least one validation example")
    results = [(recall_at_1(val_examples, float(w), temperature), float(w)) for w in grid]
    r1, weight = max(results)  # max over (r1, w): the largest weight among the best
    return RerankFit(weight, recall_at_1(val_examples, 1.0, temperature), r1)


# -- both, with held-out figures -----------------------------------------------------------------------------


def _held_out(examples: Sequence[ValExample], seed: int) -> dict[str, float]:
    """ECE and R@1 before and after, each fitted on one half and measured on the other (2 folds, averaged)."""
    if len(examples) < 4:
        return {}
    folds = np.random.default_rng(seed).permutation(len(examples)) % 2  # (Q,) fold of each example
    held: dict[str, list[float]] = {"ece_before": [], "ece_after": [], "r1_before": [], "r1_after": []}
    for f in (0, 1):
        fit_on = [e for e, g in zip(examples, folds, strict=True) if g != f]
        test_on = [e for e, g in zip(examples, folds, strict=True) if g == f]
        try:
            cal = fit_calibration(fit_on)
        except ValueError:  # a fold with only relevant (or only irrelevant) candidates
            continue
        weight = fit_rerank_weight(fit_on, cal.temperature).weight
        held["ece_before"].append(calibration_ece(Calibration(), test_on))
        held["ece_after"].append(calibration_ece(cal, test_on))
        held["r1_before"].append(recall_at_1(test_on, 1.0, cal.temperature))
        held["r1_after"].append(recall_at_1(test_on, weight, cal.temperature))
    return {k: float(np.mean(v)) for k, v in held.items() if v}


def fit_all(examples: Sequence[ValExample], seed: int = 0) -> Calibration:
    """Calibration and ERM weight fitted on all examples; report adds held-out figures from a 2-fold split."""
    held_out = _held_out(examples, seed)
    cal = fit_calibration(examples)
    rerank = fit_rerank_weight(examples, cal.temperature)
    cal.rerank_weight = rerank.weight
    cal.report.update(r1_before=rerank.r1_before, r1_after=rerank.r1_after)
    cal.report["held_out"] = held_out
    return cal
