"""The Explainer: P(yes) (cached), calibrated confidence, ERM re-ranking, streamed reasons (adapter off)."""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image

from retriever.errors import ReasonInterrupted, RetrieverError
from retriever.explain import heatmap as heatmaps
from retriever.explain.calibration import Calibration, ValExample, erm_order, logit
from retriever.explain.evidence import CheckedReason, Evidence, EvidenceFinder, check_reason
from retriever.explain.prompts import (
    PLAIN_LEADS,
    build_prompt,
    evidence_request,
    evidence_text,
    match_question,
    yes_no_token_ids,
)
from retriever.models.images import ImageLike
from retriever.models.pooling import pool_last
from retriever.protocols import HitLike, RerankFn

if TYPE_CHECKING:
    from transformers import TextIteratorStreamer

    from retriever.explain.signals import LexicalScores
    from retriever.models.encoder import Retriever

REASON_TOKENS = 40  # the LM's sentence: cut back to its last sentence end
NO_REPEAT_NGRAM = 3  # no word 3-gram twice: no "a cinema, a cinema, a cinema"
REPETITION_PENALTY = 1.3
ANSWER_START = "The tile shows"  # the LM's sentence opens so, which keeps a small LM on the tile
REASON_MAX_S = 3.0  # the LM's time budget per reason (the evidence sentence is shown before it starts)
NO_MENTION_CAP = 0.05  # confidence of a query that mentions nothing the map data could check
P_YES_CACHE_SIZE = 64  # (query, tiles) -> P(yes): confidence and rerank of one search share a forward
PAUSE_POLL_S = 0.01  # how often a paused reason looks whether the search it gave way to is done
MLLM_PARTS = ("model", "processor", "tokenizer", "family", "config")  # what an explained retriever must have


class PairsLike(Protocol):
    """The texts and images of an evaluation dataset (retriever.evaluate.data.PairSet)."""

    texts: Sequence[str]
    images: Sequence[ImageLike]


def _tile(hit: HitLike | ImageLike) -> ImageLike:
    """The image of a hit (its image_path), or the hit itself when it is already an image or a path."""
    if isinstance(hit, Image.Image | str | Path):
        return hit
    path = getattr(hit, "image_path", None)
    if path is None:
        raise RetrieverError(f"{type(hit).__name__} has no image_path: cannot show its tile to the MLLM")
    return path


def _context(hit: HitLike | ImageLike) -> dict[str, Any]:
    context = getattr(hit, "context", None)
    return dict(context) if isinstance(context, dict) else {}


def _with_rank(hit: HitLike, rank: int) -> HitLike:
    if is_dataclass(hit) and not isinstance(hit, type):
        return replace(hit, rank=rank)
    clone = type(hit).__new__(type(hit))
    clone.__dict__.update(vars(hit))
    clone.rank = rank
    return clone


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(retriever: Retriever) -> threading.RLock:
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


class _GiveWay:
    """A StoppingCriteria that gives the model to something more urgent (a search) between two tokens.

    With a private copy of the model (own_model) it pauses until the urgent call is done and then goes on,
    losing nothing. On the retriever's shared model it stops (the urgent call needs the model, with the
    adapter on), and the reason ends with ReasonInterrupted for its caller to write again later.
    """

    def __init__(self, yield_to: Callable[[], bool], pause: bool) -> None:
        self.yield_to, self.pause, self.stopped = yield_to, pause, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        while self.pause and self.yield_to():
            time.sleep(PAUSE_POLL_S)
        self.stopped = not self.pause and bool(self.yield_to())
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


class _SentenceEnd:
    """A StoppingCriteria that ends generation once the new tokens hold a complete sentence of >= 3 words,
    or a line break (after which a small LM starts lists, numbers and footnotes)."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        stripped = text.strip()
        done = len(text.split()) >= 3 and (
            bool(re.search(r"[.!?](\s|$)", stripped + " ")) or "\n" in stripped
        )
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Explainer:
    """Reasons, confidence, ERM re-ranking and heatmaps for the hits of a Retriever.

    The MLLM parts (P(yes), reasons) run the base model with the retrieval adapter switched off
    (adapter_off=True), since the adapter was trained to embed, not to talk. Heatmaps explain the
    retrieval itself, so they use the retriever as it embeds (adapter on).
    """

    def __init__(
        self,
        retriever: Retriever,
        *,
        yes_token: str = "yes",
        no_token: str = "no",
        weight: float | None = None,
        temperature: float | None = None,
        calibration: Calibration | str | Path | None = None,
        adapter_off: bool = True,
        cache_size: int = P_YES_CACHE_SIZE,
        autocast_bf16: bool = False,
        index: Any = None,
        vocabulary: Any = None,
        own_model: bool = False,
    ) -> None:
        missing = [a for a in MLLM_PARTS if not hasattr(retriever, a)]
        if missing:
            raise RetrieverError(
                f"Explanations need an MLLM retriever (retriever.load_retriever); {type(retriever).__name__} "
                f"has no {', '.join(missing)}."
            )
        self.retriever = retriever
        self.adapter_off = adapter_off
        self.autocast_bf16 = autocast_bf16  # bf16 matmuls on CPU: ~2.7x faster P(yes), embeddings untouched
        self.yes_ids, self.no_ids = yes_no_token_ids(retriever.tokenizer, yes_token, no_token)
        if not self.yes_ids or not self.no_ids:
            raise RetrieverError(f"{yes_token!r} and {no_token!r} share their tokens in this tokenizer")
        self.calibration = self._load_calibration(calibration)
        if weight is not None:
            self.calibration.rerank_weight = float(weight)
        if temperature is not None:
            self.calibration.temperature = float(temperature)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        # a TileIndex or its tile table: neighbours within 100 m and the gallery's names, for the evidence
        self._index_tiles = getattr(index, "tiles", index)
        self._vocabulary = vocabulary
        self._finder: EvidenceFinder | None = None
        self._lexical: LexicalScores | None = None  # BM25 z-scores over the gallery, for the confidence
        self._finder_lock = threading.Lock()
        self.reason_max_s = REASON_MAX_S
        self.answer_start = ANSWER_START
        self.last_checked: CheckedReason | None = None  # the latest reason's check, for benchmarks
        # own_model: P(yes) and reasons run on a private copy (one more model in memory) with the adapter off
        # for good, so they need no lock: a search never waits for them, and a reason pauses for a search
        # instead of stopping.
        self._own_model = self._copy_model() if own_model else None

    def _copy_model(self) -> torch.nn.Module:
        """A private, eval-mode copy of the retriever's model for writing, its adapter switched off once."""
        if getattr(self.retriever, "quantization", "none") != "none":
            raise RetrieverError("own_model copies the model: not for a quantized base; use the shared model")
        with model_lock(self.retriever):
            model = copy.deepcopy(self.retriever.model).eval().requires_grad_(False)
        tuner = getattr(model, "base_model", None)
        if self.adapter_off and hasattr(model, "get_base_model") and hasattr(tuner, "disable_adapter_layers"):
            tuner.disable_adapter_layers()  # what peft's disable_adapter() does, kept: nothing to switch back
            return model.get_base_model()
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def own_model(self) -> bool:
        """Whether writing runs on a private copy of the model (searches never wait for it)."""
        return self._own_model is not None

    @property
    def finder(self) -> EvidenceFinder:
        """The evidence finder over the index's tiles, built on first use (it loads the vocabulary)."""
        with self._finder_lock:
            if self._finder is None:
                self._finder = EvidenceFinder(self._index_tiles, self._vocabulary)
            return self._finder

    @property
    def reranks(self) -> bool:
        """Whether the calibration asks for ERM by the evidence confidence (fitted, and it helped on dev)."""
        return self.calibration.uses_evidence and self.calibration.rerank_weight < 1.0

    def evidence(self, query: str, hit: HitLike) -> Evidence:
        """What the hit's tile (and its neighbours within 100 m) supports of the query, and what it misses."""
        return self.finder.evidence(query, hit)

    def _load_calibration(self, calibration: Calibration | str | Path | None) -> Calibration:
        """A copy of the given calibration, the one saved with the adapter or the model, or the defaults."""
        if isinstance(calibration, Calibration):
            return replace(calibration, report=dict(calibration.report))
        if calibration is not None:
            return Calibration.load(calibration)
        folders = [getattr(self.retriever, "adapter_path", None), self.retriever.config.base_model]
        return Calibration.find(folders) or Calibration()

    # -- plumbing -------------------------------------------------------------------------------------------
    @contextmanager
    def _generator(self) -> Iterator[torch.nn.Module]:
        """The model that answers and writes, in eval mode (no dropout): the base model with the adapter off,
        or the retriever's own model. Holds the model lock: the adapter switch is global to the model."""
        device_type = getattr(getattr(self.retriever, "device", None), "type", "cpu")
        autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast_bf16)
        if self._own_model is not None:  # nothing is switched on this copy: no lock, searches never wait
            with autocast:
                yield self._own_model
            return
        switch = (
            self.retriever.adapter_disabled() if self.adapter_off else nullcontext(self.retriever.base_model)
        )
        with model_lock(self.retriever):
            was_training = self.retriever.model.training
            self.retriever.model.eval()
            try:
                with switch as model, autocast:
                    yield model
            finally:
                self.retriever.model.train(was_training)

    def _inputs(
        self, tiles: Sequence[ImageLike], bodies: Sequence[str], lead: str, answer_start: str = ""
    ) -> dict[str, torch.Tensor]:
        """Prompts (image + text) for k tiles as one right-padded batch on the model's device; `answer_start`
        opens the model's answer (it continues from there)."""
        r = self.retriever
        texts = [build_prompt(r.tokenizer, r.family.image_placeholder, body, lead) for body in bodies]
        if answer_start:
            texts = [t + ("" if t.endswith(("\n", " ")) else " ") + answer_start for t in texts]
        # right padding: real tokens keep positions 0..L-1, so a row alone equals the row in a batch
        return r.to_device(r.process_tiles(tiles, prompts=texts, padding_side="right"))

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

    def _cache_key(self, query: str, hits: Sequence[HitLike | ImageLike]) -> tuple | None:
        tiles = [_tile(h) for h in hits]
        if not all(isinstance(t, str | Path) for t in tiles):
            return None  # in-memory images have no stable key
        contexts = tuple(json.dumps(_context(h), sort_keys=True, default=str) for h in hits)
        return (query, tuple(str(t) for t in tiles), contexts)

    def _remember(self, key: tuple | None, p_yes: np.ndarray) -> None:
        """Keep the latest cache_size answers, the least recently used going first."""
        if key is None or self.cache_size <= 0:
            return
        self._cache[key] = p_yes.copy()
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- public API -----------------------------------------------------------------------------------------
    def p_yes(
        self, query: str, hits: Sequence[HitLike | ImageLike], batch_size: int | None = None
    ) -> np.ndarray:
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
        bodies = [match_question(query, _context(h)) for h in hits]
        step = batch_size or len(hits)
        lead = PLAIN_LEADS["question"]
        out = np.concatenate(
            [
                self._p_yes_batch(self._inputs(tiles[s : s + step], bodies[s : s + step], lead))
                for s in range(0, len(hits), step)
            ]
        )  # (k,)
        self._remember(key, out)
        return out

    def confidence(self, query: str, hits: Sequence[HitLike]) -> list[float]:
        """Calibrated confidence in [0, 1] per hit from the calibration's features: similarity softmax and
        margin, BM25 over the gallery, the evidence, the query's length, P(yes) (retriever.explain.calibration).

        P(yes) is computed only when the calibration gives it a weight. A query that mentions nothing the
        map data can check gets at most NO_MENTION_CAP.
        """
        from retriever.explain.signals import LexicalScores, hit_inputs

        if not hits:
            return []
        scores = np.array([float(h.score) for h in hits])  # (k,)
        cal = self.calibration
        p_yes = self.p_yes(query, hits) if cal.uses_p_yes else None
        found = [self.evidence(query, h) for h in hits]
        bm25_z = None  # without the index's tiles, each hit counts as the gallery's mean
        if cal.uses_bm25 and self._index_tiles is not None:
            if self._lexical is None:  # BM25 over the gallery, built on first use
                self._lexical = LexicalScores(self._index_tiles)
            bm25_z = self._lexical.z(query, [str(getattr(h, "tile_id", "")) for h in hits])
        conf = cal.confidence_of(hit_inputs(query, scores, found, bm25_z, p_yes))
        if not any(e.matches for e in found):  # nothing checkable: low, whatever the similarity says
            conf = np.minimum(conf, NO_MENTION_CAP)
        return [float(c) for c in conf]

    def rerank(self, query: str, hits: Sequence[HitLike], k: int = 5) -> list[HitLike]:
        """ERM: re-order the top-k by erm_scores (weight and temperature from the calibration); ranks renumbered.

        Hits beyond k keep their order; each hit keeps its similarity score.
        """
        hits = list(hits)
        k = min(k, len(hits))
        if k < 2:
            return [_with_rank(h, i + 1) for i, h in enumerate(hits)]
        head = hits[:k]
        scores = np.array([float(h.score) for h in head])  # (k,)
        cal = self.calibration
        if cal.rerank_weight >= 1.0:
            return [_with_rank(h, i + 1) for i, h in enumerate(hits)]
        if cal.uses_evidence:  # ERM with the calibrated confidence standing in for P(yes)
            conf = np.array(self.confidence(query, head))  # (k,)
            combined = cal.rerank_weight * scores / cal.temperature + (1 - cal.rerank_weight) * logit(conf)
            order = np.argsort(-combined, kind="stable")
        else:
            order = erm_order(scores, self.p_yes(query, head), cal.rerank_weight, cal.temperature)
        return [_with_rank(h, i + 1) for i, h in enumerate([head[j] for j in order] + hits[k:])]

    def reason(
        self,
        query: str,
        hit: HitLike | ImageLike,
        max_new_tokens: int = REASON_TOKENS,
        do_sample: bool = False,
        yield_to: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Stream a reason grounded in the evidence: yields text increments.

        yield_to() is True while something more urgent waits for the model: generation pauses between two
        tokens (own_model), or stops and raises ReasonInterrupted after the evidence sentence (shared model).

        First the sentence built from the evidence (what matches, what is nearby, what does not: true by
        construction, so it shows at once); then the LM's one sentence, written with the adapter off from the
        tile image, the description and the evidence, if check_reason finds every name and kind it states
        supported. Plain text, never HTML; escape it where it is displayed. The check is in last_checked.
        """
        found = self.evidence(query, hit)
        checked = check_reason("", found, self.finder.vocabulary)
        yield checked.plain
        text = "".join(self.write(query, hit, found, max_new_tokens, do_sample, yield_to))
        checked = check_reason(text, found, self.finder.vocabulary, self.finder.gallery_names)
        self.last_checked = checked
        if checked.kept:
            yield " " + " ".join(checked.kept)

    def write(
        self,
        query: str,
        hit: HitLike | ImageLike,
        found: Evidence,
        max_new_tokens: int = REASON_TOKENS,
        do_sample: bool = False,
        yield_to: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """The LM's raw text for a hit, streamed: the chat template with the image, the description and the
        evidence; an n-gram ban and a repetition penalty; stops after its first complete sentence."""
        from transformers import TextIteratorStreamer

        def label(m: Any) -> str:
            return m.matched if m.mention.kind in ("name", "street") else f"{m.mention.surface} ({m.matched})"

        facts = evidence_text(
            [label(m) for m in found.supported],
            [label(m) for m in found.nearby],
            [m.mention.surface for m in found.misses],
            list(found.tile_features[:3]),
        )
        start = self.answer_start
        batch = self._inputs([_tile(hit)], [evidence_request(query, facts)], PLAIN_LEADS["reason"], start)
        if start:
            yield start
        streamer = TextIteratorStreamer(self.retriever.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []
        give_way = _GiveWay(yield_to, pause=self.own_model) if yield_to is not None else None
        worker = threading.Thread(
            target=self._generate,
            args=(batch, streamer, stop, failure, max_new_tokens, do_sample, give_way),
            daemon=True,
        )
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
        if give_way is not None and give_way.stopped:
            raise ReasonInterrupted("the reason gave the model to a more urgent call; write it again later")

    def _generate(
        self,
        batch: dict[str, torch.Tensor],
        streamer: TextIteratorStreamer,
        stop: threading.Event,
        failure: list[BaseException],
        max_new_tokens: int,
        do_sample: bool,
        give_way: _GiveWay | None = None,
    ) -> None:
        """The reason's worker thread: owns the model lock and the adapter switch for the whole run."""
        from transformers import StoppingCriteriaList

        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "num_beams": 1,
            "no_repeat_ngram_size": NO_REPEAT_NGRAM,
            "repetition_penalty": REPETITION_PENALTY,
            "max_time": self.reason_max_s,
        }
        length = int(batch["input_ids"].shape[1])
        if not do_sample:  # a checkpoint's sampling defaults would only warn under greedy decoding
            options.update(temperature=None, top_p=None, top_k=None)
        try:
            with self._generator() as model, torch.inference_mode():
                model.generate(
                    **batch,
                    **options,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList(
                        [_StopFlag(stop), _SentenceEnd(self.retriever.tokenizer, length)]
                        + ([give_way] if give_way is not None else [])
                    ),
                    pad_token_id=self.retriever.tokenizer.pad_token_id,
                )
        except BaseException as error:  # re-raised in the consumer's thread
            failure.append(error)
            streamer.end()

    def relevance_grid(self, query: str, hit: HitLike | ImageLike) -> np.ndarray:
        """Gradient x input of the query-tile cosine similarity at each image token: (gh, gw), signed.

        Adapter on, and under the model lock: no other explanation call passes through the hook meanwhile.
        """
        with model_lock(self.retriever):
            return heatmaps.relevance_grid(self.retriever, query, _tile(hit))

    def heatmap(self, query: str, hit: HitLike | ImageLike, alpha: float = 0.6) -> Image.Image:
        """The positive relevance, scaled to its maximum, upsampled and blended over the tile: an RGBA image."""
        return heatmaps.overlay(_tile(hit), self.relevance_grid(query, hit), alpha)

    # -- validation -----------------------------------------------------------------------------------------
    def examples(
        self,
        queries: Sequence[str],
        hits: Sequence[Sequence[HitLike | ImageLike]],
        scores: Sequence[Sequence[float]],
        relevant: Sequence[Sequence[bool]],
    ) -> list[ValExample]:
        """ValExamples for fit_calibration / fit_rerank_weight: one batched P(yes) forward per query."""
        return [
            ValExample(np.asarray(s, dtype=np.float64), self.p_yes(q, h), np.asarray(rel, dtype=bool))
            for q, h, s, rel in zip(queries, hits, scores, relevant, strict=True)
        ]


def make_reranker(retriever: Retriever, pairs: PairsLike, explainer: Explainer | None = None) -> RerankFn:
    """rerank_fn(query_idx, candidate_indices, scores) for retriever.evaluate: ERM on pairs' texts and images."""
    explainer = explainer or Explainer(retriever)
    cal = explainer.calibration

    def erm(query_idx: int, candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
        tiles = [pairs.images[int(c)] for c in candidates]
        p = explainer.p_yes(pairs.texts[int(query_idx)], tiles)  # (k,)
        return np.asarray(candidates)[erm_order(scores, p, cal.rerank_weight, cal.temperature)]

    return erm
