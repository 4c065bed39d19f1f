"""The Gradio Blocks: a description in, a gallery and a Folium map out; the wiring only, logic is in callbacks."""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from app import callbacks, heatmaps, maps
from app.callbacks import DEFAULT_K, MAX_K, REASON_TOP, SearchState, View
from app.config import FALLBACK_EXAMPLES

log = logging.getLogger(__name__)

TITLE = "GeoText: where is this place?"
INTRO = (
    "# GeoText — where is this place?\n"
    "Describe what you see from the street: buildings, shops and their names, parks, tram lines, "
    "what is across the road. The model ranks overhead tiles by how well they match your description."
)
QUERY_HINT = "Enter searches · Shift+Enter adds a line"
CSS = """
.geotext-status p{margin:.2em 0}
footer{display:none !important}
"""

# Runs once in the page: Enter searches and Shift+Enter adds a line (Gradio's multi-line box does the
# opposite), and map updates are handed to the map's iframe by message, so the map is never redrawn
# for them. The iframe says when it is ready; the latest update is then sent again.
PAGE_JS = """
() => {
  if (window.__geotextReady) return;
  window.__geotextReady = true;
  function onEnter(e) {
    var box = e.target && e.target.closest ? e.target.closest('#geotext-query') : null;
    if (!box || e.key !== 'Enter' || e.isComposing) return;
    e.stopImmediatePropagation();  // capture phase: Gradio's own key handlers never see Enter here
    if (!e.shiftKey) {
      e.preventDefault();
      var button = document.querySelector('#geotext-search');
      if (button && e.type === 'keydown') button.click();
    }
  }
  document.addEventListener('keydown', onEnter, true);
  document.addEventListener('keypress', onEnter, true);
  var latest = null;
  function send() {
    var frame = document.querySelector('#geotext-map iframe');
    if (frame && frame.contentWindow && latest) frame.contentWindow.postMessage(latest, '*');
  }
  window.geotextMapUpdate = function (text) {
    if (!text) return;
    try { latest = JSON.parse(text); } catch (err) { return; }
    send();
  };
  window.addEventListener('message', function (e) {
    if (e.data && e.data.geotext === 'ready') send();
  });
}
"""
RELAY_JS = "(text) => { if (window.geotextMapUpdate) window.geotextMapUpdate(text); }"


def k_slider(**kwargs: Any) -> gr.Slider:
    """The K slider, whose value reaches the callback unchecked: callbacks.clamp_k rounds it half up and
    answers a value that is not a number (from the API) with a message that says what K must be.

    An instance attribute rather than a subclass: Gradio writes a .pyi file beside any module that
    defines a component class.
    """
    slider = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, **kwargs)
    slider.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return slider


def _out(value: Any) -> Any:
    """None in a View means 'leave this output as it is'; CLEAR empties it."""
    if value is callbacks.CLEAR:
        return None
    return gr.skip() if value is None else value


def _outputs(view: View, fields: Sequence[str]) -> tuple[Any, ...]:
    return tuple(_out(getattr(view, name)) for name in fields)


SEARCH_FIELDS = ("gallery", "map_html", "map_update", "status", "explanations", "files", "state", "heatmap")
API_SEARCH_FIELDS = ("gallery", "map_html", "status", "explanations", "files")
EXPLAIN_FIELDS = ("map_update", "status", "explanations", "files", "state")


class _Claims:
    """Search ids whose explanations have started: each search is explained once (bounded)."""

    def __init__(self, size: int = 10_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.size = size

    def claim(self, search_id: str) -> bool:
        if not search_id or search_id in self._ids:
            return False
        self._ids[search_id] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


def build_demo(
    retriever: Any,
    index: Any,
    explainer: Any = None,
    examples: Sequence[str] | None = None,
    *,
    notice: str | None = None,
    basemap: str = "offline",
    concurrency: int = 1,
    reason_top: int = REASON_TOP,
    hybrid_weight: float | None = None,
) -> gr.Blocks:
    """The app. With no retriever or index it still starts, and shows `notice` (what to pass) instead."""
    ready = retriever is not None and index is not None
    examples = list(examples) if examples else list(FALLBACK_EXAMPLES)
    references = list(dict.fromkeys([*examples, *callbacks.HEATMAP_REFERENCES]))  # the heatmap's "others"
    engine = callbacks.make_engine(retriever, index, explainer, hybrid_weight, references) if ready else None
    if not ready and notice is None:
        notice = "No model or index is loaded: start the app with `--model PATH --index PATH`."
    gallery_map = engine.gallery if engine is not None else None
    gr.set_static_paths([str(p) for p in maps.static_dirs()])  # Leaflet and the thumbnails, by URL
    latest = callbacks.LatestSearch()
    claims = _Claims()
    explains = engine is not None and engine.confidence is not None

    def session(request: gr.Request | None) -> str | None:
        return getattr(request, "session_hash", None) if request is not None else None

    def run_search(query: str, k: Any, area: str, previous: SearchState | None, who: str | None) -> View:
        search_id = uuid.uuid4().hex
        try:
            view = callbacks.search(
                query,
                k,
                area,
                engine,
                basemap=basemap,
                notice=notice,
                previous=previous,
                search_id=search_id,
                on_ranked=lambda: latest.start(who, search_id),  # older explanations of this session stop
            )
        except Exception:  # the callbacks already catch; this is the last line of defence
            view = callbacks.error_view(callbacks.internal_error("searching"), previous)
        if view.state is None and view.status:
            latest.note(who, view.status)  # the explanations still running keep this message in the status
        return view

    def on_search(
        query: str, k: Any, area: str, previous: SearchState, request: gr.Request
    ) -> tuple[Any, ...]:
        return _outputs(run_search(query, k, area, previous, session(request)), SEARCH_FIELDS)

    def api_search(query: str, k: Any, area: str) -> tuple[Any, ...]:
        view = run_search(query, k, area, None, None)
        if view.state is not None and explains:  # the page's "explaining…" line is not true for an API call
            view.status = view.state.summary + "\n\n" + callbacks.EXPLANATIONS_API
        if view.state is None:  # an API call has no previous results to keep: empty, with the message
            view = View(
                gallery=[],
                map_html=maps.empty_map_iframe(gallery=gallery_map),
                status=view.status,
                explanations="",
                files=[],
            )
        return _outputs(view, API_SEARCH_FIELDS)

    def api_explain(query: str, k: Any, area: str) -> Iterator[str]:
        try:
            yield from callbacks.explain_api(query, k, area, engine)
        except Exception:
            yield callbacks.internal_error("explaining")

    def on_explain(state: SearchState, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        if state is None or not claims.claim(state.search_id):
            return
        who = session(request)

        def current() -> bool:
            return latest.is_current(who, state.search_id)

        try:
            for view in callbacks.explain(
                state, engine, reason_top=reason_top, is_current=current, note=lambda: latest.note_for(who)
            ):
                yield _outputs(view, EXPLAIN_FIELDS)
        except Exception:
            yield _outputs(View(explanations=callbacks.internal_error("explaining")), EXPLAIN_FIELDS)

    def on_explain_one(
        state: SearchState, selected: int | None, request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        if state is None or not state.hits or selected is None:
            yield _outputs(
                View(status=callbacks.status_md(state or SearchState(), "Select a tile first.")),
                EXPLAIN_FIELDS,
            )
            return
        who = session(request)
        search_id = state.search_id

        def current() -> bool:
            return latest.is_current(who, search_id)

        try:
            for view in callbacks.explain(
                state, engine, is_current=current, ranks=[int(selected)], note=lambda: latest.note_for(who)
            ):
                yield _outputs(view, EXPLAIN_FIELDS)
        except Exception:
            yield _outputs(View(explanations=callbacks.internal_error("explaining")), EXPLAIN_FIELDS)

    def on_select(state: SearchState, evt: gr.SelectData) -> tuple[Any, ...]:
        try:
            index = evt.index if isinstance(evt.index, int) else None
            message, focused = callbacks.focus(state, index)
            if message is None or focused is None:
                return gr.skip(), gr.skip(), gr.skip()
            label = callbacks.explain_one_label(focused, engine)
            return message, focused.focus, gr.update(value=label, interactive=True)
        except Exception:
            log.exception("could not focus the map")
            return gr.skip(), gr.skip(), gr.skip()

    # analytics off: the app must work (and stay quiet) with no internet
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if notice:
            gr.Markdown(notice, elem_classes="geotext-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                query = gr.Textbox(
                    label="What do you see around you?",
                    info=QUERY_HINT,
                    placeholder="A red-brick church on a corner, a small park opposite, a café called Ekberg…",
                    lines=1,  # grows to max_lines; with one line Gradio's own key handling is Enter = submit
                    max_lines=10,
                    elem_id="geotext-query",
                )
                with gr.Row():
                    k = k_slider(label="Results (K)", elem_id="geotext-k")
                    area = gr.Textbox(
                        label="Limit to an area (optional)",
                        info="Tiles whose footprint touches the area",
                        placeholder="w,s,e,n or lat,lon,radius_m",
                        elem_id="geotext-area",
                    )
                search_btn = gr.Button("Search", variant="primary", elem_id="geotext-search")
                status = gr.Markdown(label="Status", elem_classes="geotext-status", elem_id="geotext-status")
                gr.Examples(examples=[[e] for e in examples], inputs=[query], label="Example descriptions")
            with gr.Column(scale=3, min_width=360):
                map_html = gr.HTML(
                    value=maps.empty_map_iframe(gallery=gallery_map),
                    label="Map",
                    elem_id="geotext-map",
                    min_height=maps.MAP_HEIGHT_PX,
                )
                map_update = gr.Textbox(visible="hidden", elem_id="geotext-map-update")
        gallery = gr.Gallery(
            label="Top-K tiles (#rank · score · lat, lon): select one to show it on the map",
            columns=5,
            height=290,  # "auto" means a fixed 450 px in Gradio 6; more rows scroll
            object_fit="cover",
            allow_preview=False,
            interactive=False,
            elem_id="geotext-gallery",
        )
        with gr.Row(equal_height=False):
            with gr.Column():
                explanations = gr.Markdown(label="Explanations", elem_id="geotext-explanations")
                explain_btn = gr.Button(
                    "Explain the selected tile",
                    size="sm",
                    interactive=False,
                    visible=engine is not None and engine.reason is not None,
                    elem_id="geotext-explain-one",
                )
            files = gr.File(
                label="Download the results (GeoJSON, CSV)",
                file_count="multiple",
                interactive=False,
                elem_id="geotext-files",
            )
        has_heatmap = engine is not None and engine.heatmap is not None
        with gr.Column(visible=has_heatmap):
            heatmap = gr.Image(
                label="What drove the match: relevance over the selected tile (select a tile above)",
                type="pil",
                interactive=False,
                height=300,
                elem_id="geotext-heatmap",
            )
            gr.Markdown(heatmaps.CAPTION, elem_id="geotext-heatmap-caption")
        state = gr.State(SearchState(basemap=basemap))
        selected = gr.State(None)  # the rank the user chose; explanations never overwrite it
        api_k = k_slider(visible=False)

        demo.load(None, js=PAGE_JS)
        map_update.change(None, inputs=[map_update], js=RELAY_JS, queue=False)
        model_queue = {"concurrency_limit": concurrency, "concurrency_id": "model"}
        # Explanations have their own queue: a search or a heatmap never waits behind them.
        explain_queue = {"concurrency_limit": concurrency, "concurrency_id": "explain"}
        # The page script turns Enter into a click; before it has loaded, the box's own submit does it.
        for trigger in (search_btn.click, query.submit):
            searched = trigger(
                on_search,
                inputs=[query, k, area, state],
                outputs=[gallery, map_html, map_update, status, explanations, files, state, heatmap],
                api_visibility="private",
                **model_queue,
            )
            if explains:
                searched.then(
                    on_explain,
                    inputs=[state],
                    outputs=[map_update, status, explanations, files, state],
                    api_visibility="private",
                    show_progress="hidden",
                    trigger_mode="always_last",  # a newer search's explanations start once the older stop
                    **explain_queue,
                )
        if explains:
            explain_btn.click(
                on_explain_one,
                inputs=[state, selected],
                outputs=[map_update, status, explanations, files, state],
                api_visibility="private",
                show_progress="minimal",
                **explain_queue,
            )
        # The API: the same search, and the explanations the page shows after it.
        api_trigger = gr.Button(visible=False)
        api_trigger.click(
            api_search,
            inputs=[query, api_k, area],
            outputs=[gallery, map_html, status, explanations, files],
            api_name="search",
            api_visibility="public",
            **model_queue,
        )
        if explains:
            explain_trigger = gr.Button(visible=False)
            explain_trigger.click(
                api_explain,
                inputs=[query, api_k, area],
                outputs=[explanations],
                api_name="explain",
                api_visibility="public",
                **explain_queue,
            )
        gallery.select(
            on_select,
            inputs=[state],
            outputs=[map_update, selected, explain_btn],
            api_visibility="private",
            show_progress="hidden",
            trigger_mode="multiple",
            concurrency_limit=None,
            concurrency_id="select",
        )
        if has_heatmap:

            def on_heatmap(state: SearchState, evt: gr.SelectData) -> Any:
                index = evt.index if isinstance(evt.index, int) else None
                return callbacks.relevance_heatmap(state, index, engine)

            # its own listener (a .then would not receive the selection); it goes ahead of the explanations
            gallery.select(
                on_heatmap,
                inputs=[state],
                outputs=[heatmap],
                api_visibility="private",
                trigger_mode="always_last",
                **model_queue,
            )
    demo.queue(default_concurrency_limit=concurrency)
    return demo
