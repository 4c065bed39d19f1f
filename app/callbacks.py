"""The app's callbacks as pure functions of plain data: validate, rank, explain, export; no Gradio here."""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from app import maps
from app.gpu import on_gpu
from retriever.errors import EmptySelectionError, RetrieverError
from retriever.explain.calibration import DEFAULT_TEMPERATURE, similarity_probs

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # ~300 tokens, the retriever's text budget
MAX_K = 20
DEFAULT_K = 5
ERM_TOP = 5  # ERM re-ranks this many of the best hits (as fitted by demo.calibrate_explain)
REASON_TOP = 3  # reasons are slow on a CPU: explain the best few only
MAX_REASON_CHARS = 1200
STREAM_INTERVAL_S = 0.25  # how often streamed reason text is pushed to the page
EXPORT_MAX_AGE_S = 3600
AREA_PATTERN = re.compile(r"\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?){2,3}\s*")


EMPTY_AREA = "No tiles lie inside that area. Widen it or clear the area box."


class UserInputError(ValueError):
    """A problem with what the user typed; its message is shown as is."""


# --- The model-backed calls -------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    """The calls that touch the model; each runs under spaces.GPU on a ZeroGPU Space."""

    rank: Callable[[str, int, Any], list[Any]]  # (query, k, within) -> hits
    confidence: Callable[[str, list[Any]], list[float]] | None = None
    reason: Callable[[str, Any], Iterator[str]] | None = None
    heatmap: Callable[[str, Any], Image.Image] | None = None  # (query, hit) -> relevance overlay
    evidence: Callable[[str, Any], list[tuple[str, str, str]]] | None = None  # -> (words, status, matched)
    ranking: str = "MLLM similarity (pixels only)"  # what the page says ranked the tiles


def make_engine(
    retriever: Any, index: Any, explainer: Any = None, hybrid_weight: float | None = None
) -> Engine:
    """Bind a retriever, an index and an optional explainer (`confidence`, `reason`) into an Engine.

    hybrid_weight in [0, 1] fuses the similarity with BM25 over the tiles' OSM context (1 = pixels only).
    """
    ranking = (
        f"hybrid: {hybrid_weight:g} × MLLM similarity + {1 - hybrid_weight:g} × BM25 over the tiles' OSM context"
        if hybrid_weight is not None
        else Engine.ranking
    )

    @on_gpu
    def rank(query: str, k: int, within: Any) -> list[Any]:
        if hybrid_weight is not None:
            from retriever.index.hybrid import hybrid_search

            return hybrid_search(index, retriever, query, k, weight=hybrid_weight, within=within)
        return list(index.search_text(retriever, [query], k=k, within=within)[0])

    if explainer is None:
        return Engine(rank=rank, ranking=ranking)
    if getattr(explainer, "reranks", False) is True:  # ERM helped on the human dev set: re-rank the top few
        searched = rank
        ranking = f"{ranking}, top {ERM_TOP} re-ranked by confidence (ERM)"

        def rank(query: str, k: int, within: Any) -> list[Any]:  # evidence only: CPU, no GPU call
            return explainer.rerank(query, searched(query, k, within), k=ERM_TOP)

    @on_gpu
    def confidence(query: str, hits: list[Any]) -> list[float]:
        return [float(c) for c in explainer.confidence(query, hits)]

    @on_gpu
    def reason(query: str, hit: Any) -> Iterator[str]:
        yield from explainer.reason(query, hit)

    @on_gpu
    def heatmap(query: str, hit: Any) -> Image.Image:
        return explainer.heatmap(query, hit)

    def evidence(query: str, hit: Any) -> list[tuple[str, str, str]]:
        found = explainer.evidence(query, hit)
        return [(str(m.mention.surface), str(m.status), str(m.matched)) for m in found.matches]

    has_heatmap = callable(getattr(explainer, "heatmap", None))
    return Engine(
        rank=rank,
        confidence=confidence,
        reason=reason,
        heatmap=heatmap if has_heatmap else None,
        ranking=ranking,
        evidence=evidence if callable(getattr(explainer, "evidence", None)) else None,
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
    focus: int | None = None  # rank shown zoomed in


@dataclass
class View:
    """One update of the page; None leaves that part unchanged."""

    gallery: list[tuple[str, str]] | None = None  # (image file, caption)
    map_html: str | None = None
    status: str | None = None
    explanations: str | None = None
    files: list[str] | None = None
    state: SearchState | None = None


# --- Input checks -----------------------------------------------------------------------------
def clean_query(raw: str | None, max_chars: int = MAX_QUERY_CHARS) -> tuple[str, list[str]]:
    """Whitespace-normalised query and notices; raises UserInputError when there is nothing to search."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", " ", raw or "")
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


def clamp_k(k: float | int | None) -> int:
    if k is None or (isinstance(k, float) and math.isnan(k)):
        return DEFAULT_K
    return max(1, min(MAX_K, int(round(float(k)))))


def parse_area(spec: str | None) -> Any:
    """None for no filter; a shapely geometry for `w,s,e,n` or `lat,lon,radius_m`.

    Only numbers are accepted from the page: parse_within also reads files, which a visitor must not reach.
    """
    spec = (spec or "").strip()
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
        raise UserInputError(f"That area could not be used: {error}") from error


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


def _thumbs_root() -> Path:
    root = Path(tempfile.gettempdir()) / "geotext-app-thumbs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _placeholder_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 200, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def thumbnail_file(image_path: str | Path) -> str:
    """A small JPEG of the tile in the temp dir, named by its content and written atomically.

    Gradio re-writes a PIL image's cache file on every request, so concurrent users of the same
    tile can read it half-written; a finished file that never changes avoids that, and the temp
    dir is one Gradio serves whatever folder the index lives in.
    """
    data = maps.thumbnail_jpeg(image_path) or _placeholder_jpeg()
    target = _thumbs_root() / f"{hashlib.sha256(data).hexdigest()[:32]}.jpg"
    if not target.exists():
        fd, staging = tempfile.mkstemp(dir=target.parent, prefix=".thumb-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, target)
    return str(target)


def gallery_items(hits: Sequence[Any]) -> list[tuple[str, str]]:
    """(thumbnail file, caption) per hit, for gr.Gallery."""
    return [(thumbnail_file(hit.image_path), caption(hit)) for hit in hits]


def render_map(state: SearchState) -> str:
    return maps.map_iframe(
        maps.hits_to_map(
            state.hits,
            query=state.query,
            confidences=state.confidences,
            reasons=state.reasons,
            marks=state.marks,
            focus=state.focus,
            basemap=state.basemap,
        )
    )


def explanations_md(state: SearchState, pending: Sequence[int] = ()) -> str:
    if not state.hits:
        return ""
    if state.confidence_source == "similarity" and not state.reasons and not pending:
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
    return "\n".join(lines)


def error_view(message: str, state: SearchState | None = None) -> View:
    return View(
        gallery=[],
        map_html=maps.empty_map_iframe(),
        status=f"⚠️ {message}",
        explanations="",
        files=[],
        state=state or SearchState(),
    )


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
    k: float | int | None,
    area: str | None,
    engine: Engine | None,
    basemap: str = "offline",
    notice: str | None = None,
) -> View:
    """Rank the tiles for a description; returns the whole page update. Never raises."""
    if engine is None:
        return error_view(notice or "No model or index is loaded.")
    try:
        text, notices = clean_query(query)
        within = parse_area(area)
        k = clamp_k(k)
    except UserInputError as error:
        return error_view(str(error))
    except Exception:
        return error_view(internal_error("reading the search settings"))

    started = time.perf_counter()
    try:
        hits = engine.rank(text, k, within)
    except Exception as error:
        if isinstance(error, EmptySelectionError):
            return error_view(EMPTY_AREA)
        if isinstance(error, RetrieverError):  # the library's errors are written for users
            log.warning("search failed: %s", error)
            return error_view(f"The search failed: {md_text(error)}")
        return error_view(internal_error("searching"))
    elapsed = time.perf_counter() - started

    if not hits:
        if within is not None:
            return error_view(EMPTY_AREA)
        return error_view("No tiles found: the index is empty.")
    if len(hits) < k:
        notices.append(f"Only {len(hits)} tiles matched, fewer than the {k} asked for.")
    state = SearchState(
        query=text,
        hits=list(hits),
        confidences=[float(p) for p in similarity_probs([float(h.score) for h in hits])],  # no explainer yet
        basemap=basemap,
    )
    try:
        view = View(
            gallery=gallery_items(state.hits),
            map_html=render_map(state),
            status=status_md(
                state, elapsed, notices, explaining=engine.reason is not None, ranking=engine.ranking
            ),
            explanations=explanations_md(state),
            files=export_results(state),
            state=state,
        )
    except Exception:
        return error_view(internal_error("drawing the results"))
    return view


def status_md(
    state: SearchState,
    elapsed: float,
    notices: Sequence[str],
    explaining: bool,
    ranking: str = Engine.ranking,
) -> str:
    shown = state.query if len(state.query) <= 160 else state.query[:157] + "…"
    count = f"**Top {len(state.hits)} tiles**" if len(state.hits) != 1 else "**The top tile**"
    lines = [
        f"{count} for “{md_text(shown)}” · {elapsed:.2f} s · ranked by {ranking}. "
        "Click a thumbnail or a numbered marker to inspect a tile."
    ]
    if explaining:
        lines.append("Explanations are being written and will appear below and in the map popups.")
    lines += [f"ℹ️ {md_text(n)}" for n in notices]
    return "\n\n".join(lines)


def explain(
    state: SearchState | None,
    engine: Engine | None,
    reason_top: int = REASON_TOP,
    interval_s: float = STREAM_INTERVAL_S,
) -> Iterator[View]:
    """After the ranking is on the page: confidence, then streamed reasons for the best few tiles."""
    if engine is None or state is None or not state.hits or engine.confidence is None:
        return
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
        yield View(explanations=f"⚠️ {internal_error('estimating the confidence')}")
        return
    if engine.evidence is not None:
        try:
            marks = {int(h.rank): engine.evidence(state.query, h) for h in state.hits}
            state = replace(state, marks=marks)
        except Exception:  # marks are a nicety: the confidence and reasons still come
            log.exception("evidence failed")
    todo = [int(h.rank) for h in state.hits[: max(0, reason_top)]] if engine.reason else []
    yield View(map_html=render_map(state), explanations=explanations_md(state, todo), state=state)

    for hit in state.hits[: len(todo)]:
        rank = int(hit.rank)
        pending = todo[todo.index(rank) :]
        text = ""
        last = time.perf_counter()
        try:
            for chunk in engine.reason(state.query, hit):
                text = (text + str(chunk))[:MAX_REASON_CHARS]
                if time.perf_counter() - last >= interval_s:  # throttle: every push re-sends the panel
                    last = time.perf_counter()
                    partial = replace(state, reasons={**state.reasons, rank: text})
                    yield View(explanations=explanations_md(partial, pending), state=partial)
        except Exception:
            message = internal_error(f"explaining tile #{rank}")
            text = text or f"(no explanation: {message})"
        state = replace(state, reasons={**state.reasons, rank: text.strip()})
        yield View(map_html=render_map(state), explanations=explanations_md(state, pending[1:]), state=state)
    yield View(files=export_results(state), state=state)


def focus(state: SearchState | None, index: int | None) -> tuple[str, SearchState | None]:
    """Zoom the map to the gallery item at `index` (0-based) and open its popup."""
    if state is None or not state.hits or index is None or not 0 <= int(index) < len(state.hits):
        return (render_map(state) if state and state.hits else maps.empty_map_iframe()), state
    state = replace(state, focus=int(state.hits[int(index)].rank))
    return render_map(state), state


def relevance_heatmap(
    state: SearchState | None, index: int | None, engine: Engine | None
) -> Image.Image | None:
    """The relevance overlay of the gallery item at `index` (0-based), or None when there is nothing to show."""
    if engine is None or engine.heatmap is None or state is None or index is None:
        return None
    if not 0 <= int(index) < len(state.hits):
        return None
    try:
        return engine.heatmap(state.query, state.hits[int(index)])
    except Exception:  # a heatmap is a nicety: log it, never break the page
        log.exception("heatmap failed")
        return None
