"""The app's callbacks as pure functions of plain data: validate, rank, explain, export; no Gradio here."""

from __future__ import annotations

import html
import inspect
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app import heatmaps, maps
from app.gpu import on_gpu
from retriever.errors import EmptySelectionError, ReasonInterrupted, RetrieverError
from retriever.explain.calibration import DEFAULT_TEMPERATURE, similarity_probs

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # ~300 tokens, the retriever's text budget
MAX_K = 20
DEFAULT_K = 5
ERM_TOP = 5  # ERM re-ranks this many of the best hits (as fitted by demo.calibrate_explain)
REASON_TOP = 3  # reasons are slow on a CPU: the best few are explained on their own, others on request
MAX_REASON_CHARS = 1200
STREAM_INTERVAL_S = 0.25  # how often streamed reason text is pushed to the page
EXPORT_MAX_AGE_S = 3600
AREA_PATTERN = re.compile(r"\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?){2,3}\s*")


HEATMAP_REFERENCES = (  # varied street scenes: what "other descriptions" means for the heatmap
    "A red-brick church on a corner, a small park opposite, a café called Ekberg.",
    "Tram tracks run along a wide boulevard; across the street there is a hotel and a pharmacy.",
    "I stand by the harbour: the market square is on my left and ferries are moored to the right.",
    "A narrow street with restaurants on both sides, a bookshop and a bus stop in front of a school.",
    "A big railway station with a clock tower, buses waiting on the square in front.",
    "A quiet residential block with a courtyard, parked cars and a playground.",
)
EMPTY_AREA = "No tile's footprint touches that area. Widen it or clear the area box."
K_MESSAGE = f"K (the number of results) must be a number from 1 to {MAX_K}"


class UserInputError(ValueError):
    """A problem with what the user typed; its message is shown as is."""


# --- Who may use the model next ----------------------------------------------------------------
class ModelTurns:
    """Searches and heatmaps go before explanations: they announce themselves here, and a reason being
    written stops between two tokens while one is waiting (then starts again)."""

    def __init__(self, lock: Any = None) -> None:
        self.lock = lock if lock is not None else threading.RLock()  # the model's own lock when it has one
        self._waiting = 0
        self._guard = threading.Condition()

    @contextmanager
    def urgent(self) -> Iterator[None]:
        """Hold the model ahead of any explanation."""
        with self._guard:
            self._waiting += 1
        try:
            with self.lock:
                yield
        finally:
            with self._guard:
                self._waiting -= 1
                self._guard.notify_all()

    def pending(self) -> bool:
        return self._waiting > 0

    def wait_clear(self, timeout_s: float = 60.0) -> bool:
        """Block until no urgent call waits; False on timeout."""
        with self._guard:
            return self._guard.wait_for(lambda: self._waiting == 0, timeout=timeout_s)


class LatestSearch:
    """The newest search of each browser session: older explanations stop when a newer search arrives."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self._latest: OrderedDict[str, str] = OrderedDict()
        self._notes: dict[str, str] = {}  # session -> an input error shown since its latest search
        self._guard = threading.Lock()
        self.max_sessions = max_sessions  # bounded: a long-running server must not grow with its visitors

    def start(self, session: str | None, search_id: str) -> None:
        if not session:
            return
        with self._guard:
            self._latest[session] = search_id
            self._latest.move_to_end(session)
            self._notes.pop(session, None)
            while len(self._latest) > self.max_sessions:
                gone, _ = self._latest.popitem(last=False)
                self._notes.pop(gone, None)

    def note(self, session: str | None, text: str) -> None:
        """Remember an input error, so the status lines the running explanations send keep showing it."""
        if session:
            with self._guard:
                if session in self._latest:
                    self._notes[session] = text

    def note_for(self, session: str | None) -> str | None:
        with self._guard:
            return self._notes.get(session) if session else None

    def is_current(self, session: str | None, search_id: str) -> bool:
        if not session:
            return True
        with self._guard:
            return self._latest.get(session, search_id) == search_id


# --- The model-backed calls -------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    """The calls that touch the model; each runs under spaces.GPU on a ZeroGPU Space."""

    rank: Callable[[str, int, Any], list[Any]]  # (query, k, within) -> hits
    confidence: Callable[[str, list[Any]], list[float]] | None = None
    reason: Callable[[str, Any], Iterator[str]] | None = None
    heatmap: Callable[[str, Any], Image.Image] | None = None  # (query, hit) -> relevance picture
    evidence: Callable[[str, Any], list[tuple[str, str, str]]] | None = None  # -> (words, status, matched)
    ranking: str = "MLLM similarity (pixels only)"  # what the page says ranked the tiles
    turns: ModelTurns = field(default_factory=ModelTurns)
    gallery: maps.GalleryMap | None = None  # every tile, for the offline basemap and the extent
    reason_pauses: bool = False  # reasons pause between tokens for a search by themselves (own model copy)


def footprint_mask(index: Any, within: Any) -> Any:
    """The rows whose footprint intersects the area (a boolean mask), or None for no filter.

    A small area inside one tile, or between two centres, still finds the tiles that cover it.
    """
    if within is None:
        return None
    from retriever.index.spatial import select

    return select(index.tiles, within, how="intersects")  # EmptySelectionError when nothing touches it


def gallery_map(index: Any) -> maps.GalleryMap | None:
    """Every tile of the index as the offline basemap; None when the index cannot list them."""
    try:
        tiles = [index.hit(row, 0, 0.0) for row in range(len(index))]
    except Exception:  # an index without per-row hits (a stand-in): the map works without a basemap
        log.info("the index cannot list its tiles: no offline basemap")
        return None
    return maps.GalleryMap.from_tiles(tiles)


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def make_engine(
    retriever: Any,
    index: Any,
    explainer: Any = None,
    hybrid_weight: float | None = None,
    references: Sequence[str] | None = None,
) -> Engine:
    """Bind a retriever, an index and an optional explainer (`confidence`, `reason`) into an Engine.

    hybrid_weight in [0, 1] fuses the similarity with BM25 over the tiles' OSM context (1 = pixels only).
    references: other descriptions the heatmap compares each cell with (default: the fallback examples).
    """
    ranking = (
        f"hybrid: {hybrid_weight:g} × MLLM similarity + {1 - hybrid_weight:g} × BM25 over the tiles' OSM context"
        if hybrid_weight is not None
        else Engine.ranking
    )
    turns = ModelTurns(getattr(retriever, "model_lock", None))
    gallery = gallery_map(index)

    @on_gpu
    def ranked(query: str, k: int, within: Any) -> list[Any]:
        rows = footprint_mask(index, within)
        if hybrid_weight is not None:
            from retriever.index.hybrid import hybrid_search

            return hybrid_search(index, retriever, query, k, weight=hybrid_weight, within=rows)
        return list(index.search_text(retriever, [query], k=k, within=rows)[0])

    def searched(query: str, k: int, within: Any, started: Callable[[], None] | None = None) -> list[Any]:
        with turns.urgent():  # the explainer switches the adapter off: never encode meanwhile
            hits = ranked(query, k, within)
            if started is not None:  # before the model is handed back: older explanations see it on waking
                started()
            return hits

    others = [r for r in (references or HEATMAP_REFERENCES) if r.strip()]
    encoded: list[np.ndarray] = []  # the references' embeddings, computed on the first click

    @on_gpu
    def heatmap(query: str, hit: Any) -> Image.Image:
        with turns.urgent():
            if not encoded:
                encoded.append(_array(retriever.encode_queries(others)))
            keep = [i for i, other in enumerate(others) if other.strip() != query.strip()]  # never itself
            queries = np.concatenate([_array(retriever.encode_queries([query])), encoded[0][keep]])
            grid = heatmaps.relevance(retriever.encode_tiles, queries, hit.image_path)
        return heatmaps.picture(hit.image_path, grid)

    draws = heatmap if len(others) >= 2 and callable(getattr(retriever, "encode_tiles", None)) else None
    rank = searched
    if explainer is None:
        return Engine(rank=rank, heatmap=draws, ranking=ranking, turns=turns, gallery=gallery)
    if getattr(explainer, "reranks", False) is True:  # ERM helped on the human dev set: re-rank the top few
        ranking = f"{ranking}, top {ERM_TOP} re-ranked by confidence (ERM)"

        def rank(query: str, k: int, within: Any, started: Callable[[], None] | None = None) -> list[Any]:
            with turns.urgent():  # evidence only: CPU, no GPU call
                hits = explainer.rerank(query, searched(query, k, within), k=ERM_TOP)
                if started is not None:
                    started()
                return hits

    @on_gpu
    def confidence(query: str, hits: list[Any]) -> list[float]:
        return [float(c) for c in explainer.confidence(query, hits)]

    gives_way = "yield_to" in inspect.signature(explainer.reason).parameters
    pauses = gives_way and getattr(explainer, "own_model", False) is True

    @on_gpu
    def reason(query: str, hit: Any) -> Iterator[str]:
        if gives_way:  # between two tokens: a waiting search or heatmap goes first
            yield from explainer.reason(query, hit, yield_to=turns.pending)
        else:
            yield from explainer.reason(query, hit)

    def evidence(query: str, hit: Any) -> list[tuple[str, str, str]]:
        found = explainer.evidence(query, hit)
        return [(str(m.mention.surface), str(m.status), str(m.matched)) for m in found.matches]

    return Engine(
        rank=rank,
        confidence=confidence,
        reason=reason,
        heatmap=draws,
        ranking=ranking,
        evidence=evidence if callable(getattr(explainer, "evidence", None)) else None,
        turns=turns,
        gallery=gallery,
        reason_pauses=pauses,
    )


# --- Plain data in and out --------------------------------------------------------------------
@dataclass(frozen=True)
class SearchState:
    """What one search produced; kept per session so later callbacks can redraw it."""

    query: str = ""
    hits: list[Any] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    confidence_source: str = "similarity"
    reasons: dict[int, str] = field(default_factory=dict)  # rank -> text
    marks: dict[int, list[tuple[str, str, str]]] = field(default_factory=dict)  # rank -> evidence marks
    basemap: str = "offline"
    focus: int | None = None  # rank the user chose (gallery or marker)
    focus_seq: int = 0  # counts the user's choices: the map applies each one once
    search_id: str = ""
    summary: str = ""  # the status line of this search, without what is still running


@dataclass
class View:
    """One update of the page; None leaves that part unchanged."""

    gallery: list[tuple[str, str]] | None = None  # (image file, caption)
    map_html: str | None = None
    map_update: str | None = None  # JSON message for the map already on the page
    status: str | None = None
    explanations: str | None = None
    files: list[str] | None = None
    state: SearchState | None = None
    heatmap: Any = None  # CLEAR empties it
    explain_one: str | None = None  # label of the "explain this tile" button


CLEAR = object()  # a View value that empties its output (None leaves it as it is)


# --- Input checks -----------------------------------------------------------------------------
def clean_query(raw: str | None, max_chars: int = MAX_QUERY_CHARS) -> tuple[str, list[str]]:
    """Whitespace-normalised query and notices; raises UserInputError when there is nothing to search."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", " ", raw if isinstance(raw, str) else "")
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        raise UserInputError(
            "Please describe what you see first, for example: "
            "*a red-brick church on a corner, a small park opposite*."
        )
    notices = []
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut[max_chars // 2 :] else cut  # end on a word when possible
        notices.append(f"Your description was long, so only its first {len(text):,} characters were used.")
    return text, notices


def clamp_k(k: object) -> int:
    """K as a whole number in [1, MAX_K], rounded half up (2.5 -> 3, as the slider shows it).

    None (or NaN) means the default; anything that is not a number raises UserInputError.
    """
    if k is None or (isinstance(k, float) and math.isnan(k)):
        return DEFAULT_K
    if isinstance(k, bool):
        raise UserInputError(f"{K_MESSAGE}; got {isolated(k)}.")
    try:
        value = float(k.strip()) if isinstance(k, str) else float(k)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserInputError(f"{K_MESSAGE}; got {isolated(str(k)[:40])}.") from None
    if math.isnan(value):
        return DEFAULT_K
    if math.isinf(value):
        raise UserInputError(f"{K_MESSAGE}; got {isolated(value)}.")
    return max(1, min(MAX_K, math.floor(value + 0.5)))


def parse_area(spec: str | None) -> Any:
    """None for no filter; a shapely geometry for `w,s,e,n` or `lat,lon,radius_m`.

    Only numbers are accepted from the page: parse_within also reads files, which a visitor must not reach.
    """
    spec = (spec if isinstance(spec, str) else "").strip()
    if not spec:
        return None
    if not AREA_PATTERN.fullmatch(spec):
        raise UserInputError(
            "The area must be `west,south,east,north` in degrees or `lat,lon,radius_m`, "
            "for example `24.93,60.16,24.96,60.18` or `60.17,24.94,500`."
        )
    from retriever.index.spatial import parse_within

    try:
        return parse_within(spec)
    except Exception as error:  # the library's message says what is wrong with the numbers
        raise UserInputError(f"That area could not be used: {md_text(error)}") from error


# --- Display helpers --------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def md_text(value: object) -> str:
    """Text safe inside Markdown: no live HTML, no accidental formatting or links."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(value), quote=False))


FSI, PDI = "\u2068", "\u2069"  # first-strong isolate: user text cannot reorder what follows it
MARK_SYMBOLS = maps.MARK_SYMBOLS


def isolated(value: object) -> str:
    """md_text wrapped in Unicode isolates (bidi-safe): a right-to-left query cannot flip the marks."""
    return f"{FSI}{md_text(str(value).replace(FSI, '').replace(PDI, ''))}{PDI}"


def marks_md(marks: Sequence[tuple[str, str, str]] | None) -> str:
    """Evidence marks as Markdown: "✓ Stockmann · ≈ nearby Esplanadi · ✗ theatre", every word escaped."""
    return " · ".join(
        f"{MARK_SYMBOLS.get(status, '?')} {isolated(surface)}" for surface, status, _ in marks or []
    )


def caption(hit: Any) -> str:
    return f"#{int(hit.rank)} · {float(hit.score):.3f} · {float(hit.lat):.4f}, {float(hit.lon):.4f}"  # ~10 m


def tiles(n: int) -> str:
    """ "1 tile", "2 tiles"."""
    return f"{n} tile" if n == 1 else f"{n} tiles"


_placeholder: list[str] = []


def thumbnail_file(image_path: str | Path) -> str:
    """A small JPEG of the tile, named by its content (a grey square when the tile cannot be read).

    Gradio re-writes a PIL image's cache file on every request, so concurrent users of the same
    tile could read it half-written; a finished file that never changes avoids that.
    """
    found = maps.thumbnail_file(image_path)
    if found is not None:
        return found
    if not _placeholder:
        grey = maps.thumbs_root() / "placeholder-64.png"
        if not grey.exists():
            Image.new("RGB", (64, 64), (200, 200, 200)).save(grey)
        _placeholder.append(str(grey))
    return _placeholder[0]


def gallery_items(hits: Sequence[Any]) -> list[tuple[str, str]]:
    """(thumbnail file, caption) per hit, for gr.Gallery."""
    return [(thumbnail_file(hit.image_path), caption(hit)) for hit in hits]


def render_map(state: SearchState, gallery: maps.GalleryMap | None = None) -> str:
    """The map of a search, sent once per search: later changes go as map_update messages."""
    return maps.map_iframe(
        maps.hits_to_map(
            state.hits,
            query=state.query,
            confidences=state.confidences,
            reasons=state.reasons,
            marks=state.marks,
            basemap=state.basemap,
            gallery=gallery,
            search_id=state.search_id,
        )
    )


def map_update(state: SearchState, with_popups: bool = True) -> str:
    """The message that brings the map on the page up to date: popup contents and the user's focus."""
    message: dict[str, Any] = {"search": state.search_id, "focus": state.focus, "focus_seq": state.focus_seq}
    if with_popups:
        message["popups"] = maps.popups(
            state.hits, state.query, state.confidences, state.reasons, state.marks
        )
    return json.dumps(message, ensure_ascii=False)


EXPLANATIONS_API = (
    "API clients get the same explanations from the `/explain` endpoint (same inputs as `/search`)."
)


def explanations_md(state: SearchState, pending: Sequence[int] = (), explainer: bool = False) -> str:
    """The panel: confidence and reasons per tile, or what the confidence means when nothing explains."""
    if not state.hits:
        return ""
    if state.confidence_source == "similarity" and not state.reasons and not pending:
        if explainer:  # the explainer has not answered yet: say what will come, not that there is none
            return (
                "Confidence and reasons follow here once the ranking is shown. "
                f"Until then the confidence is the softmax of the similarity scores. {EXPLANATIONS_API}"
            )
        return (
            "Confidence is the softmax of the similarity scores over the results shown "
            f"(temperature {DEFAULT_TEMPERATURE}); no explanation model is loaded."
        )
    lines = ["**Why these tiles**", ""]
    if state.marks:
        lines += [
            "Evidence: ✓ in the tile · ≈ nearby (within 100 m) · ✗ not found, for the places the description "
            "names, checked against the OpenStreetMap data of each tile. Confidence: the chance that the tile "
            "lies within 150 m of the place described, fitted on human-written descriptions.",
            "",
        ]
    for hit, conf in zip(state.hits, state.confidences, strict=False):
        rank = int(hit.rank)
        if rank in state.reasons:
            body = isolated(state.reasons[rank])
        elif rank in pending:
            body = "*writing…*"
        else:
            continue
        marks = state.marks.get(rank)
        shown = f" · evidence: {marks_md(marks)}" if marks else ""
        lines.append(f"- **#{rank}** · confidence {conf:.2f}{shown} — {body}")
    unexplained = [
        int(h.rank) for h in state.hits if int(h.rank) not in state.reasons and int(h.rank) not in pending
    ]
    if unexplained and state.confidence_source == "explainer":
        lines += ["", "Other tiles: select one and press *Explain the selected tile*."]
    return "\n".join(lines)


def error_view(message: str, state: SearchState | None = None) -> View:
    """Only the status changes: the previous results stay on screen, and the status says so."""
    kept = state is not None and bool(state.hits)
    suffix = " The results below are still those of your previous search." if kept else ""
    return View(status=f"⚠️ {message}{suffix}")


def internal_error(where: str) -> str:
    """Log the traceback under a short reference; the page only gets the reference."""
    ref = uuid.uuid4().hex[:8]
    log.exception("error %s while %s", ref, where)
    return f"Something went wrong while {where}. It was logged as `{ref}`; please try again."


# --- Export -----------------------------------------------------------------------------------
def _export_root() -> Path:
    root = Path(tempfile.gettempdir()) / "geotext-app-exports"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _prune(root: Path, max_age_s: float = EXPORT_MAX_AGE_S) -> None:
    now = time.time()
    for folder in root.iterdir():
        try:
            if now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def result_rows(state: SearchState) -> list[dict[str, Any]]:
    rows = []
    for i, hit in enumerate(state.hits):
        west, south, east, north = (float(v) for v in hit.bbox)
        rows.append(
            {
                "rank": int(hit.rank),
                "tile_id": str(hit.tile_id),
                "score": round(float(hit.score), 6),
                "confidence": round(float(state.confidences[i]), 6) if i < len(state.confidences) else None,
                "lat": float(hit.lat),
                "lon": float(hit.lon),
                "west": west,
                "south": south,
                "east": east,
                "north": north,
                "osm_url": maps.osm_url(float(hit.lat), float(hit.lon)),
                "reason": state.reasons.get(int(hit.rank), ""),
                "evidence": "; ".join(
                    f"{MARK_SYMBOLS.get(status, '?')} {surface}"
                    for surface, status, _ in state.marks.get(int(hit.rank), [])
                ),
            }
        )
    return rows


def to_geojson(state: SearchState) -> dict[str, Any]:
    from shapely.geometry import box, mapping

    features = []
    for hit, row in zip(state.hits, result_rows(state), strict=True):
        footprint = getattr(hit, "footprint", None)
        footprint = box(*hit.bbox) if footprint is None else footprint
        properties = {k: v for k, v in row.items() if k not in ("west", "south", "east", "north")}
        properties["bbox"] = [row["west"], row["south"], row["east"], row["north"]]
        properties["image"] = Path(str(hit.image_path)).name  # the server's folders stay private
        properties["context"] = dict(getattr(hit, "context", None) or {})
        features.append({"type": "Feature", "geometry": mapping(footprint), "properties": properties})
    return {"type": "FeatureCollection", "query": state.query, "features": features}


def export_results(state: SearchState) -> list[str]:
    """GeoJSON and CSV of the results in a fresh folder; old exports are pruned."""
    if not state.hits:
        return []
    root = _export_root()
    _prune(root)
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    geojson_path = folder / "geotext-results.geojson"
    geojson_path.write_text(json.dumps(to_geojson(state), ensure_ascii=False, indent=1), encoding="utf-8")
    csv_path = folder / "geotext-results.csv"
    from retriever.index.hits import write_csv  # the library's one CSV writer: formula-safe cells

    write_csv(result_rows(state), csv_path)
    return [str(geojson_path), str(csv_path)]


# --- Callbacks --------------------------------------------------------------------------------
def search(
    query: str | None,
    k: object,
    area: str | None,
    engine: Engine | None,
    basemap: str = "offline",
    notice: str | None = None,
    previous: SearchState | None = None,
    search_id: str | None = None,
    on_ranked: Callable[[], None] | None = None,
) -> View:
    """Rank the tiles for a description; returns the whole page update. Never raises.

    On an input error only the status changes, so the previous results stay on screen. `on_ranked`
    is called once the ranking is done, while the model is still held (the engine's rank takes it).
    """
    if engine is None:
        return error_view(notice or "No model or index is loaded.")
    try:
        text, notices = clean_query(query)
        within = parse_area(area)
        k = clamp_k(k)
    except UserInputError as error:
        return error_view(str(error), previous)
    except Exception:
        return error_view(internal_error("reading the search settings"), previous)

    started = time.perf_counter()
    try:
        hits = (
            engine.rank(text, k, within)
            if on_ranked is None
            else engine.rank(text, k, within, started=on_ranked)
        )
    except Exception as error:
        if isinstance(error, EmptySelectionError):
            return error_view(EMPTY_AREA, previous)
        if isinstance(error, RetrieverError):  # the library's errors are written for users
            log.warning("search failed: %s", error)
            return error_view(f"The search failed: {md_text(error)}", previous)
        return error_view(internal_error("searching"), previous)
    elapsed = time.perf_counter() - started

    if not hits:
        if within is not None:
            return error_view(EMPTY_AREA, previous)
        return error_view("No tiles found: the index is empty.", previous)
    if len(hits) < k:
        notices.append(f"Only {tiles(len(hits))} matched, fewer than the {k} asked for.")
    state = SearchState(
        query=text,
        hits=list(hits),
        confidences=[float(p) for p in similarity_probs([float(h.score) for h in hits])],  # no explainer yet
        basemap=basemap,
        search_id=search_id or uuid.uuid4().hex,
    )
    state = replace(state, summary=summary_md(state, elapsed, notices, ranking=engine.ranking))
    explaining = engine.confidence is not None
    try:
        view = View(
            gallery=gallery_items(state.hits),
            map_html=render_map(state, engine.gallery),
            map_update=map_update(state, with_popups=False),
            status=status_md(state, "Explaining the best tiles…" if explaining else None),
            explanations=explanations_md(state, explainer=explaining),
            files=export_results(state),
            state=state,
            heatmap=CLEAR,
            explain_one=explain_one_label(state, engine),
        )
    except Exception:
        return error_view(internal_error("drawing the results"), previous)
    return view


def summary_md(
    state: SearchState, elapsed: float, notices: Sequence[str], ranking: str = Engine.ranking
) -> str:
    """What was found, for what, how fast and how: the query is escaped and bidi-isolated."""
    shown = state.query if len(state.query) <= 160 else state.query[:157] + "…"
    n = len(state.hits)
    count = f"**Top {tiles(n)}**" if n != 1 else "**The top tile**"
    lines = [
        f"{count} for “{isolated(shown)}” · {elapsed:.2f} s · ranked by {ranking}. "
        "Click a thumbnail or a numbered marker to inspect a tile."
    ]
    lines += [f"ℹ️ {md_text(n)}" for n in notices]
    return "\n\n".join(lines)


def status_md(state: SearchState, activity: str | None = None, note: str | None = None) -> str:
    """The one status line: the search's summary, an input error since (if any), and what is running now
    (cleared when done)."""
    return state.summary + (f"\n\n{note}" if note else "") + (f"\n\n⏳ {activity}" if activity else "")


def explain_one_label(state: SearchState, engine: Engine | None) -> str:
    if engine is None or engine.reason is None or state.focus is None:
        return "Explain the selected tile"
    return f"Explain tile #{state.focus}"


def _reason_text(
    state: SearchState,
    engine: Engine,
    hit: Any,
    is_current: Callable[[], bool],
    interval_s: float,
    pending: Sequence[int],
) -> Iterator[tuple[str, SearchState | None]]:
    """Stream one reason: (text so far, partial state to show or None); its first words at once (the evidence
    sentence). While a search or heatmap waits for the model, the reason pauses between two tokens (own model
    copy) or steps aside and is written again after it; it stops when a newer search came."""
    assert engine.reason is not None
    rank = int(hit.rank)
    while True:
        text = ""
        last = time.perf_counter()
        stream = engine.reason(state.query, hit)
        interrupted = False
        try:
            for chunk in stream:
                if not is_current():
                    return
                if engine.turns.pending() and not engine.reason_pauses:
                    interrupted = True
                    break
                first = not text
                text = (text + str(chunk))[:MAX_REASON_CHARS]
                if first or time.perf_counter() - last >= interval_s:  # throttle: a push re-sends the panel
                    last = time.perf_counter()
                    yield text, replace(state, reasons={**state.reasons, rank: text})
        except ReasonInterrupted:  # it gave the shared model to a search: written again once that is done
            interrupted = True
        except Exception:
            message = internal_error(f"explaining tile #{rank}")
            yield text or f"(no explanation: {message})", None
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # ends the generation at its next token and frees the model
        if not interrupted:
            yield text, None
            return
        engine.turns.wait_clear()
        if not is_current():
            return


def explain(
    state: SearchState | None,
    engine: Engine | None,
    reason_top: int = REASON_TOP,
    interval_s: float = STREAM_INTERVAL_S,
    is_current: Callable[[], bool] = lambda: True,
    ranks: Sequence[int] | None = None,
    note: Callable[[], str | None] = lambda: None,
) -> Iterator[View]:
    """After the ranking is on the page: confidence, then streamed reasons for the best few tiles
    (or for `ranks`). The status says what runs and clears at the end; map popups change by message."""
    if engine is None or state is None or not state.hits or engine.confidence is None:
        return
    if state.confidence_source != "explainer":
        try:
            confidences = engine.confidence(state.query, state.hits)
            if len(confidences) != len(state.hits):
                raise ValueError(f"explainer gave {len(confidences)} confidences for {len(state.hits)} hits")
            state = replace(
                state,
                confidences=[min(1.0, max(0.0, float(c))) for c in confidences],
                confidence_source="explainer",
            )
        except Exception:
            yield View(
                explanations=f"⚠️ {internal_error('estimating the confidence')}",
                status=status_md(state, note=note()),
            )
            return
        if engine.evidence is not None:
            try:
                marks = {int(h.rank): engine.evidence(state.query, h) for h in state.hits}
                state = replace(state, marks=marks)
            except Exception:  # marks are a nicety: the confidence and reasons still come
                log.exception("evidence failed")
    if not is_current():
        return
    wanted = list(ranks) if ranks is not None else [int(h.rank) for h in state.hits[: max(0, reason_top)]]
    by_rank = {int(h.rank): h for h in state.hits}
    todo = [r for r in wanted if r in by_rank and r not in state.reasons] if engine.reason else []

    def progress_view(current: SearchState, left: list[int]) -> View:
        """The map, panel and status while the reasons for `left` are still to come."""
        activity = (
            f"Writing {'a reason' if len(left) == 1 else 'reasons'} for {', '.join(f'#{r}' for r in left)}…"
        )
        return View(
            map_update=map_update(current),
            explanations=explanations_md(current, left, explainer=True),
            status=status_md(current, activity if left else None, note()),
            state=current,
        )

    yield progress_view(state, todo)
    for i, rank in enumerate(todo):
        pending = todo[i:]
        text = ""
        for written, partial in _reason_text(state, engine, by_rank[rank], is_current, interval_s, pending):
            text = written
            if partial is not None:
                yield View(explanations=explanations_md(partial, pending, explainer=True), state=partial)
        if not is_current():
            return
        state = replace(state, reasons={**state.reasons, rank: text.strip()})
        yield progress_view(state, todo[i + 1 :])
    yield View(files=export_results(state), status=status_md(state, note=note()), state=state)


def focus(state: SearchState | None, index: int | None) -> tuple[str | None, SearchState | None]:
    """The map message that zooms to the gallery item at `index` (0-based) and opens its popup.

    The map itself is not sent again: the user's zoom and popups stay as they are.
    """
    if state is None or not state.hits or index is None or not 0 <= int(index) < len(state.hits):
        return None, state
    state = replace(state, focus=int(state.hits[int(index)].rank), focus_seq=state.focus_seq + 1)
    return map_update(state), state


def relevance_heatmap(
    state: SearchState | None, index: int | None, engine: Engine | None
) -> Image.Image | None:
    """The relevance picture of the gallery item at `index` (0-based), or None when there is nothing to show."""
    if engine is None or engine.heatmap is None or state is None or index is None:
        return None
    if not 0 <= int(index) < len(state.hits):
        return None
    try:
        return engine.heatmap(state.query, state.hits[int(index)])
    except Exception:  # a heatmap is a nicety: log it, never break the page
        log.exception("heatmap failed")
        return None


def explain_api(query: str | None, k: object, area: str | None, engine: Engine | None) -> Iterator[str]:
    """The API's explanations: the search again, then the panel as it streams (its last value is final)."""
    view = search(query, k, area, engine)
    if view.state is None:
        yield view.status or ""
        return
    panel = view.explanations or ""
    yield panel
    for update in explain(view.state, engine):
        if update.explanations is not None:
            panel = update.explanations
            yield panel
