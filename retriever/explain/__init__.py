"""Explanations of a ranking: MLLM-written reasons, calibrated confidence, ERM re-ranking and relevance heatmaps."""

from __future__ import annotations

import argparse
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retriever._io import write_json_atomic
from retriever.errors import RetrieverError
from retriever.models.images import ImageLike, open_image
from retriever.models.pooling import pool_last

CALIBRATION_FILE = "explain_calibration.json"  # looked up next to the adapter, then in the model folder
DEFAULT_TEMPERATURE = 0.05  # similarity softmax temperature (cosine scores of a contrastive model)
DEFAULT_RERANK_WEIGHT = 0.5  # ERM: share of the similarity in the combined score (1 = similarity only)
LOGIT_CLIP = 1e-6  # probabilities are clipped to [eps, 1 - eps] before a logit
MAX_CONTEXT_CHARS = 600  # tile context given to the MLLM: enough for a list of OSM features
P_YES_CACHE_SIZE = 64  # (query, tiles) -> P(yes): confidence and rerank of one search share a forward

MATCH_QUESTION = (
    "Does this tile match the description?\nDescription: {description}\n{context}Answer yes or no."
)
REASON_REQUEST = (
    "This is an overhead map or satellite tile.\nDescription of a place, written from the street: "
    "{description}\n{context}In one to three sentences, say what in the tile matches the description "
    "and what does not."
)
# What follows the prompt when the tokenizer has no chat template: the model then continues the text.
PLAIN_LEADS = {"question": "Answer:", "reason": "Explanation:"}

Hit = Any  # retriever.index.Hit or anything with score, image_path and (optionally) context and rank
RerankFn = Callable[[int, np.ndarray, np.ndarray], Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Numbers: similarity evidence, calibration, ECE, ERM
# ---------------------------------------------------------------------------------------------


def logit(p: np.ndarray) -> np.ndarray:
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
    """

    temperature: float = DEFAULT_TEMPERATURE
    w_sim: float = 1.0
    w_yes: float = 1.0
    bias: float = 0.0
    rerank_weight: float = DEFAULT_RERANK_WEIGHT
    report: dict[str, Any] = field(default_factory=dict)  # how it was fitted: ECE / R@1 before and after, n

    def confidence(self, scores: np.ndarray, p_yes: np.ndarray) -> np.ndarray:
        """(k,) similarity scores of one query's top-k and (k,) P(yes) -> (k,) confidences in [0, 1]."""
        z = (
            self.w_sim * logit(similarity_probs(scores, self.temperature))
            + self.w_yes * logit(p_yes)
            + self.bias
        )
        return sigmoid(z)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


def calibration_ece(calibration: Calibration, examples: Sequence[ValExample], bins: int = 10) -> float:
    """ECE of a calibration's confidences over every candidate of every example."""
    if not examples:
        return 0.0
    conf = np.concatenate([calibration.confidence(e.scores, e.p_yes) for e in examples])
    return expected_calibration_error(conf, _flatten(examples)[2], bins)


def fit_calibration(
    val_examples: Sequence[ValExample],
    temperatures: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
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
    best: tuple[float, float, np.ndarray] | None = None
    for t in temperatures:
        x = _features(scores, p_yes, t)
        w = _fit_logistic(x, y)
        p = np.clip(sigmoid(x @ w), 1e-12, 1 - 1e-12)
        loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        if best is None or loss < best[0]:
            best = (loss, t, w)
    assert best is not None
    loss, t, w = best
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


def recall_at_1(examples: Sequence[ValExample], weight: float, temperature: float) -> float:
    """Share (in %) of queries whose ERM top-1 is relevant; weight 1 is the similarity ranking."""
    if not examples:
        return 0.0
    firsts = [bool(e.relevant[erm_order(e.scores, e.p_yes, weight, temperature)[0]]) for e in examples]
    return 100.0 * float(np.mean(firsts))


@dataclass(frozen=True)
class RerankFit:
    weight: float
    r1_before: float  # similarity order
    r1_after: float  # ERM order at the fitted weight


def fit_rerank_weight(
    val_examples: Sequence[ValExample],
    temperature: float = DEFAULT_TEMPERATURE,
    grid: Sequence[float] = tuple(np.round(np.linspace(0.0, 1.0, 21), 2)),
) -> RerankFit:
    """The ERM weight with the best validation R@1; ties go to the larger weight (closer to no re-ranking)."""
    if not val_examples:
        raise ValueError("fit_rerank_weight needs at least one validation example")
    results = [(recall_at_1(val_examples, float(w), temperature), float(w)) for w in grid]
    r1, weight = max(results)  # max over (r1, w): the largest weight among the best
    return RerankFit(weight, recall_at_1(val_examples, 1.0, temperature), r1)


# ---------------------------------------------------------------------------------------------
# Prompts and tiles
# ---------------------------------------------------------------------------------------------


def context_text(context: dict[str, Any] | None, max_chars: int = MAX_CONTEXT_CHARS) -> str:
    """A tile's context columns as prompt lines ("Map features: ...\\n"); empty without any."""
    parts = []
    for key, value in (context or {}).items():
        if value is None or value == "" or value == []:
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{str(key).replace('_', ' ')}: {shown}")
    if not parts:
        return ""
    text = "; ".join(parts)
    text = text if len(text) <= max_chars else text[: max_chars - 3].rsplit(" ", 1)[0] + "..."
    return f"Known from the map of this tile: {text}\n"


def build_prompt(tokenizer: Any, placeholder: str, body: str, lead: str) -> str:
    """The user turn with the image first, through the chat template when it keeps the image placeholder.

    Templates differ: some take a list of typed parts (Qwen2-VL, SmolVLM), some plain strings (SmolLM2).
    Without a usable template the prompt is plain text ending in `lead`, which the model continues.
    """
    if getattr(tokenizer, "chat_template", None):
        parts = [{"type": "image"}, {"type": "text", "text": body}]
        for content in (parts, f"{placeholder}\n{body}"):
            try:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
            except Exception:  # a template that cannot render this content shape: try the next one
                continue
            if isinstance(text, str) and text.count(placeholder) == 1:
                return text
    return f"{placeholder}\n{body}\n{lead}"


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids that start the answer `word`: its single-token spellings ("yes", " yes", "Yes", " Yes")."""
    variants = dict.fromkeys([word, " " + word, word.capitalize(), " " + word.capitalize()])
    singles = {ids[0] for v in variants if len(ids := tokenizer.encode(v, add_special_tokens=False)) == 1}
    if not singles:  # no single-token spelling: the first piece of the plain word
        first = tokenizer.encode(word, add_special_tokens=False)
        singles = {first[0]} if first else set()
    return sorted(singles)


def _tile(hit: Hit | ImageLike) -> ImageLike:
    """The image of a hit (its image_path), or the hit itself when it is already an image or a path."""
    if isinstance(hit, Image.Image | str | Path):
        return hit
    path = getattr(hit, "image_path", None)
    if path is None:
        raise RetrieverError(f"{type(hit).__name__} has no image_path: cannot show its tile to the MLLM")
    return path


def _context(hit: Any) -> dict[str, Any]:
    context = getattr(hit, "context", None)
    return dict(context) if isinstance(context, dict) else {}


def _with_rank(hit: Hit, rank: int) -> Hit:
    if is_dataclass(hit) and not isinstance(hit, type):
        return replace(hit, rank=rank)
    clone = type(hit).__new__(type(hit))
    clone.__dict__.update(vars(hit))
    clone.rank = rank
    return clone


# ---------------------------------------------------------------------------------------------
# Relevance grids: which image token sits where on the tile, per family
# ---------------------------------------------------------------------------------------------


def _qwen_grid(config: Any, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Qwen2-VL / 2.5-VL: image_grid_thw patches, merged merge x merge into one token, row-major."""
    _, h, w = (int(v) for v in batch["image_grid_thw"][0])
    merge = int(config.vision_config.spatial_merge_size)
    return h // merge, w // merge


def _idefics3_grid(config: Any, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Idefics3 / SmolVLM without splitting: (side / patch / scale)^2 tokens, pixel-shuffled row-major."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    n = side // int(config.scale_factor)
    return n, n


def _internvl_grid(config: Any, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """InternVL: (side / patch * downsample_ratio)^2 tokens after the pixel shuffle, row-major."""
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    size = size[0] if isinstance(size, list | tuple) else size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    n = int(int(size) // int(patch) * float(config.downsample_ratio))
    return n, n


# family name -> (model config, processed batch of one tile) -> (rows, cols) of its image tokens
GRID_SHAPES: dict[str, Callable[[Any, dict[str, torch.Tensor]], tuple[int, int]]] = {
    "qwen2_vl": _qwen_grid,
    "qwen2_5_vl": _qwen_grid,
    "idefics3": _idefics3_grid,
    "internvl": _internvl_grid,
}


def _get_attr_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _heat_colours(heat: np.ndarray, alpha: float) -> np.ndarray:
    """A red -> yellow ramp whose opacity grows with the relevance: (H, W) in [0, 1] -> (H, W, 4) uint8."""
    rgba = np.empty((*heat.shape, 4), dtype=np.float64)
    rgba[..., 0] = 255.0
    rgba[..., 1] = 230.0 * heat
    rgba[..., 2] = 0.0
    rgba[..., 3] = 255.0 * alpha * heat
    return np.round(rgba).astype(np.uint8)


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(retriever: Any) -> threading.RLock:
    """The lock explanation calls take on a retriever's model: its own `model_lock` if it has one, else ours.

    Switching the adapter off is global to the model, so while one call runs with it off, another must not
    run (a heatmap, or a search if the retriever takes the same lock) expecting it on.
    """
    own = getattr(retriever, "model_lock", None)
    if own is not None:
        return own
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(retriever, threading.RLock())


class _StopFlag:
    """A StoppingCriteria that ends generation once the consumer of a streamed reason has gone."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


# ---------------------------------------------------------------------------------------------
# The explainer
# ---------------------------------------------------------------------------------------------


class Explainer:
    """Reasons, confidence, ERM re-ranking and heatmaps for the hits of a Retriever.

    The MLLM parts (P(yes), reasons) run the base model with the retrieval adapter switched off
    (adapter_off=True), since the adapter was trained to embed, not to talk. Heatmaps explain the
    retrieval itself, so they use the retriever as it embeds (adapter on).
    """

    def __init__(
        self,
        retriever: Any,
        *,
        yes_token: str = "yes",
        no_token: str = "no",
        weight: float | None = None,
        temperature: float | None = None,
        calibration: Calibration | str | Path | None = None,
        adapter_off: bool = True,
        cache_size: int = P_YES_CACHE_SIZE,
        autocast_bf16: bool = False,
    ) -> None:
        missing = [
            a for a in ("model", "processor", "tokenizer", "family", "config") if not hasattr(retriever, a)
        ]
        if missing:
            raise RetrieverError(
                f"Explanations need an MLLM retriever (retriever.load_retriever); {type(retriever).__name__} "
                f"has no {', '.join(missing)}."
            )
        self.retriever = retriever
        self.adapter_off = adapter_off
        self.autocast_bf16 = autocast_bf16  # bf16 matmuls on CPU: ~2.7x faster P(yes), embeddings untouched
        tokenizer = retriever.tokenizer
        yes, no = answer_token_ids(tokenizer, yes_token), answer_token_ids(tokenizer, no_token)
        self.yes_ids = [i for i in yes if i not in no]
        self.no_ids = [i for i in no if i not in yes]
        if not self.yes_ids or not self.no_ids:
            raise RetrieverError(f"{yes_token!r} and {no_token!r} share their tokens in this tokenizer")
        self.calibration = self._load_calibration(calibration)
        if weight is not None:
            self.calibration.rerank_weight = float(weight)
        if temperature is not None:
            self.calibration.temperature = float(temperature)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def _load_calibration(self, calibration: Calibration | str | Path | None) -> Calibration:
        if isinstance(calibration, Calibration):
            return replace(calibration, report=dict(calibration.report))
        if calibration is not None:
            return Calibration.load(calibration)
        folders = [getattr(self.retriever, "adapter_path", None), self.retriever.config.base_model]
        for folder in folders:
            if folder and (Path(folder) / CALIBRATION_FILE).is_file():
                return Calibration.load(Path(folder) / CALIBRATION_FILE)
        return Calibration()

    # -- plumbing -------------------------------------------------------------------------------------------
    @contextmanager
    def _generator(self) -> Iterator[torch.nn.Module]:
        """The model that answers and writes, in eval mode (no dropout): the base model with the adapter off,
        or the retriever's own model. Holds the model lock: the adapter switch is global to the model."""
        switch = (
            self.retriever.adapter_disabled() if self.adapter_off else nullcontext(self.retriever.base_model)
        )
        device_type = getattr(getattr(self.retriever, "device", None), "type", "cpu")
        autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast_bf16)
        with model_lock(self.retriever):
            was_training = self.retriever.model.training
            self.retriever.model.eval()
            try:
                with switch as model, autocast:
                    yield model
            finally:
                self.retriever.model.train(was_training)

    def _inputs(
        self, tiles: Sequence[ImageLike], bodies: Sequence[str], lead: str
    ) -> dict[str, torch.Tensor]:
        """Prompts (image + text) for k tiles as one right-padded batch on the model's device."""
        r = self.retriever
        side = r.config.image_side
        images = [open_image(t).resize((side, side), Image.Resampling.BICUBIC) for t in tiles]
        texts = [build_prompt(r.tokenizer, r.family.image_placeholder, body, lead) for body in bodies]
        batch = r.processor(
            text=texts,
            images=[[img] for img in images],
            padding=True,
            padding_side="right",  # real tokens keep positions 0..L-1: a row alone equals the row in a batch
            return_tensors="pt",
            **r.family.processor_image_kwargs,
        )
        batch = {k: v.to(r.device) for k, v in dict(batch).items()}
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(r.dtype)
        return batch

    @torch.inference_mode()
    def _p_yes_batch(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """One forward; P(yes) from the next-token logits at each row's last real token."""
        with self._generator() as model:
            hidden = model.model(**batch).last_hidden_state  # (B, T, H)
            last = pool_last(hidden, batch["attention_mask"])  # (B, H)
            logits = model.get_output_embeddings()(last).float()  # (B, V)
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=1)  # (B,) all spellings of "yes" together
        no = torch.logsumexp(logits[:, self.no_ids], dim=1)
        return torch.sigmoid(yes - no).cpu().numpy().astype(np.float64)  # softmax over [yes, no]

    def _cache_key(self, query: str, hits: Sequence[Any]) -> tuple | None:
        tiles = [_tile(h) for h in hits]
        if not all(isinstance(t, str | Path) for t in tiles):
            return None  # in-memory images have no stable key
        contexts = tuple(json.dumps(_context(h), sort_keys=True, default=str) for h in hits)
        return (query, tuple(str(t) for t in tiles), contexts)

    # -- public API -----------------------------------------------------------------------------------------
    def p_yes(self, query: str, hits: Sequence[Hit | ImageLike], batch_size: int | None = None) -> np.ndarray:
        """P("yes") to "Does this tile match the description?" for each hit: (k,) in [0, 1].

        Read from the next-token logits as softmax([logit_yes, logit_no])[0], each logit pooled (logsumexp)
        over the single-token spellings of the word. All k tiles go through one batched forward unless
        batch_size says otherwise; hits may also be image paths or PIL images.
        """
        hits = list(hits)
        if not hits:
            return np.empty(0)
        key = self._cache_key(query, hits)
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].copy()
        tiles = [_tile(h) for h in hits]
        bodies = [
            MATCH_QUESTION.format(description=query.strip(), context=context_text(_context(h))) for h in hits
        ]
        step = batch_size or len(hits)
        out = np.concatenate(
            [
                self._p_yes_batch(
                    self._inputs(tiles[s : s + step], bodies[s : s + step], PLAIN_LEADS["question"])
                )
                for s in range(0, len(hits), step)
            ]
        )
        if key is not None and self.cache_size > 0:
            self._cache[key] = out.copy()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def confidence(self, query: str, hits: Sequence[Hit]) -> list[float]:
        """Calibrated confidence in [0, 1] per hit, from the similarity softmax over these hits and P(yes)."""
        if not hits:
            return []
        scores = np.array([float(h.score) for h in hits])
        return [float(c) for c in self.calibration.confidence(scores, self.p_yes(query, hits))]

    def rerank(self, query: str, hits: Sequence[Hit], k: int = 5) -> list[Hit]:
        """ERM: re-order the top-k by erm_scores (weight and temperature from the calibration); ranks renumbered.

        Hits beyond k keep their order; each hit keeps its similarity score.
        """
        hits = list(hits)
        k = min(k, len(hits))
        if k < 2:
            return [_with_rank(h, i + 1) for i, h in enumerate(hits)]
        head = hits[:k]
        scores = np.array([float(h.score) for h in head])
        cal = self.calibration
        order = erm_order(scores, self.p_yes(query, head), cal.rerank_weight, cal.temperature)
        return [_with_rank(h, i + 1) for i, h in enumerate([head[j] for j in order] + hits[k:])]

    def reason(
        self, query: str, hit: Hit | ImageLike, max_new_tokens: int = 60, do_sample: bool = False
    ) -> Iterator[str]:
        """Stream 1-3 sentences on what in the tile matches the description: yields text increments.

        Greedy unless do_sample. Plain text, never HTML; escape it where it is displayed. Generation runs
        in a thread; leaving the loop early stops it at the next token.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        body = REASON_REQUEST.format(description=query.strip(), context=context_text(_context(hit)))
        batch = self._inputs([_tile(hit)], [body], PLAIN_LEADS["reason"])
        tokenizer = self.retriever.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": 1}
        if not do_sample:  # a checkpoint's sampling defaults would only warn under greedy decoding
            options.update(temperature=None, top_p=None, top_k=None)

        def generate() -> None:  # the worker owns the model lock and the adapter switch for the whole run
            try:
                with self._generator() as model, torch.inference_mode():
                    model.generate(
                        **batch,
                        **options,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]),
                        pad_token_id=tokenizer.pad_token_id,
                    )
            except BaseException as error:  # re-raised in the consumer's thread
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            for text in streamer:
                if text:
                    yield text
        finally:
            stop.set()
            worker.join()
        if failure:
            raise failure[0]

    def relevance_grid(self, query: str, hit: Hit | ImageLike) -> np.ndarray:
        """Gradient x input of the query-tile cosine similarity at each image token: (gh, gw), signed.

        The image tokens are the visual features the language model receives; the grid places them on the
        tile as the family's vision encoder laid them out (GRID_SHAPES). Positive cells raised the match.
        """
        r = self.retriever
        if r.family.name not in GRID_SHAPES:
            raise RetrieverError(f"No relevance grid for family {r.family.name!r}; add it to GRID_SHAPES")
        batch = r.process_tiles([_tile(hit)])
        config = r.base_model.config
        image_token_id = int(config.image_token_id)
        captured: dict[str, torch.Tensor] = {}

        def leaf_inputs(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise RetrieverError("the language model was called without inputs_embeds")
            captured["embeds"] = embeds.detach().requires_grad_(True)  # (1, T, H)
            return args, {**kwargs, "inputs_embeds": captured["embeds"]}

        language_model = _get_attr_path(r.base_model, r.family.language_model_attr)
        with model_lock(r):  # adapter on, and no other explanation call passing through the hook
            query_emb = r.encode_queries([query]).to(r.device).clone()  # (1, D); clone leaves inference mode
            handle = language_model.register_forward_pre_hook(leaf_inputs, with_kwargs=True)
            was_training = r.model.training
            r.model.eval()
            try:
                with torch.enable_grad():
                    tile_emb = r.embed(batch)  # (1, D)
                    similarity = (tile_emb * query_emb).sum()
                    (grad,) = torch.autograd.grad(similarity, captured["embeds"])
            finally:
                handle.remove()
                r.model.train(was_training)
        relevance = (grad * captured["embeds"].detach()).float().sum(-1)[0]  # (T,)
        on_image = batch["input_ids"][0].to(relevance.device) == image_token_id  # (T,)
        gh, gw = GRID_SHAPES[r.family.name](config, batch)
        if int(on_image.sum()) != gh * gw:
            raise RetrieverError(
                f"{int(on_image.sum())} image tokens do not fill the {gh}x{gw} grid of {r.family.name}; "
                "was the tile split into crops?"
            )
        return relevance[on_image].reshape(gh, gw).detach().cpu().numpy().astype(np.float64)

    def heatmap(self, query: str, hit: Hit | ImageLike, alpha: float = 0.6) -> Image.Image:
        """The positive relevance, scaled to its maximum, upsampled and blended over the tile: an RGBA image."""
        grid = np.clip(self.relevance_grid(query, hit), 0.0, None)  # (gh, gw)
        top = grid.max()
        grid = grid / top if top > 0 else grid
        thumb = open_image(_tile(hit)).convert("RGBA")
        small = Image.fromarray(np.round(grid * 255).astype(np.uint8), mode="L")
        heat = np.asarray(small.resize(thumb.size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
        overlay = Image.fromarray(_heat_colours(heat, alpha), mode="RGBA")  # (H, W, 4)
        return Image.alpha_composite(thumb, overlay)

    # -- validation -----------------------------------------------------------------------------------------
    def examples(
        self,
        queries: Sequence[str],
        hits: Sequence[Sequence[Hit | ImageLike]],
        scores: Sequence[Sequence[float]],
        relevant: Sequence[Sequence[bool]],
    ) -> list[ValExample]:
        """ValExamples for fit_calibration / fit_rerank_weight: one batched P(yes) forward per query."""
        return [
            ValExample(np.asarray(s, dtype=np.float64), self.p_yes(q, h), np.asarray(rel, dtype=bool))
            for q, h, s, rel in zip(queries, hits, scores, relevant, strict=True)
        ]


# ---------------------------------------------------------------------------------------------
# Evaluation hook: `python -m retriever.evaluate --rerank erm`
# ---------------------------------------------------------------------------------------------


def make_reranker(retriever: Any, pairs: Any, explainer: Explainer | None = None) -> RerankFn:
    """rerank_fn(query_idx, candidate_indices, scores) for retriever.evaluate: ERM on pairs' texts and images."""
    explainer = explainer or Explainer(retriever)
    cal = explainer.calibration

    def erm(query_idx: int, candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
        tiles = [pairs.images[int(c)] for c in candidates]
        p = explainer.p_yes(pairs.texts[int(query_idx)], tiles)
        return np.asarray(candidates)[erm_order(scores, p, cal.rerank_weight, cal.temperature)]

    return erm


# ---------------------------------------------------------------------------------------------
# Fitting on a validation split: `python -m retriever.explain`
# ---------------------------------------------------------------------------------------------


def validation_examples(
    explainer: Explainer,
    pairs: Any,
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    k: int = 5,
    max_queries: int | None = None,
    seed: int = 0,
) -> list[ValExample]:
    """Top-k over the whole gallery for (a sample of) the texts; relevant = same label as the true image."""
    sims = (
        torch.from_numpy(np.asarray(text_emb, dtype=np.float32))
        @ torch.from_numpy(np.asarray(image_emb, dtype=np.float32)).T
    )  # (T, I)
    top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    rows = np.arange(len(pairs.texts))
    if max_queries is not None and len(rows) > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
    labels = np.asarray(pairs.image_label)
    out = []
    for t in rows:
        cand = top.indices[t].numpy()
        truth = labels[int(pairs.text_image[t])]
        p = explainer.p_yes(pairs.texts[t], [pairs.images[int(c)] for c in cand])
        out.append(ValExample(top.values[t].numpy().astype(np.float64), p, labels[cand] == truth))
    return out


def fit_all(examples: Sequence[ValExample], seed: int = 0) -> Calibration:
    """Calibration and ERM weight fitted on all examples; report adds held-out figures from a 2-fold split."""
    folds = np.random.default_rng(seed).permutation(len(examples)) % 2
    held: dict[str, list[float]] = {"ece_before": [], "ece_after": [], "r1_before": [], "r1_after": []}
    if len(examples) >= 4:
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
    cal = fit_calibration(examples)
    rerank = fit_rerank_weight(examples, cal.temperature)
    cal.rerank_weight = rerank.weight
    cal.report.update(r1_before=rerank.r1_before, r1_after=rerank.r1_after)
    cal.report["held_out"] = {k: float(np.mean(v)) for k, v in held.items() if v}
    return cal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retriever.explain",
        description="Fit the explanation confidence calibration and the ERM weight on a validation split.",
    )
    parser.add_argument(
        "--protocol", required=True, help="geotext1652 | cvgtext | jsonl (as in retriever.evaluate)"
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="val", help="annotation split to fit on (never test)")
    parser.add_argument("--city", default="NewYork")
    parser.add_argument("--view", default="satellite", choices=["satellite", "osm"])
    parser.add_argument("--image-root", type=Path)
    parser.add_argument("--official-quirks", action="store_true")
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--device")
    parser.add_argument("--k", type=int, default=5, help="candidates per query (the ERM depth)")
    parser.add_argument(
        "--max-queries", type=int, default=300, help="sample of texts (P(yes) costs a forward each)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, help=f"calibration JSON (default: {CALIBRATION_FILE} in the adapter folder)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    import retriever.evaluate as evaluate
    from retriever.evaluate.data import read_dataset

    args = build_parser().parse_args(argv)
    if args.split == "test":
        raise SystemExit("Fit on a validation split, never on test (pass --split val or train).")
    if args.protocol not in evaluate.PROTOCOLS:
        raise SystemExit(f"Unknown protocol {args.protocol!r}; known: {sorted(evaluate.PROTOCOLS)}")
    spec = evaluate.PROTOCOLS[args.protocol]
    pairs = read_dataset(spec.dataset, args.data, **spec.data_options(args))
    retriever = evaluate.load_retriever(args.model, args.adapter, args.quantization, args.device)
    texts, images, failed, _ = evaluate.embed_pairs(retriever, pairs, batch_size=args.batch_size)
    if failed:
        raise SystemExit(f"{len(failed)} images could not be decoded, e.g. {pairs.images[failed[0][0]]}")
    explainer = Explainer(retriever, calibration=Calibration())
    examples = validation_examples(explainer, pairs, texts, images, args.k, args.max_queries, args.seed)
    cal = fit_all(examples, args.seed)
    out = args.out or Path(args.adapter or args.model) / CALIBRATION_FILE
    cal.save(out)
    rep = cal.report
    print(
        f"{len(examples)} queries, top-{args.k}: T={cal.temperature}, w_sim={cal.w_sim:.3f}, "
        f"w_yes={cal.w_yes:.3f}, bias={cal.bias:.3f}, ERM weight={cal.rerank_weight}"
    )
    print(f"ECE before {rep['ece_before']:.4f} -> after {rep['ece_after']:.4f} (in-sample)")
    print(f"R@1 similarity {rep['r1_before']:.2f} -> ERM {rep['r1_after']:.2f} (in-sample)")
    if rep["held_out"]:
        print("held-out (2-fold): " + ", ".join(f"{k}={v:.4f}" for k, v in rep["held_out"].items()))
    print(f"calibration written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
