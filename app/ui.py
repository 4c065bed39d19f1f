"""The Gradio Blocks: a description in, a gallery and a Folium map out; the wiring only, logic is in callbacks."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from app import callbacks, maps
from app.callbacks import DEFAULT_K, MAX_K, REASON_TOP, SearchState, View
from app.config import FALLBACK_EXAMPLES

log = logging.getLogger(__name__)

TITLE = "GeoText: where is this place?"
INTRO = (
    "# GeoText — where is this place?\n"
    "Describe what you see from the street: buildings, shops and their names, parks, tram lines, "
    "what is across the road. The model ranks overhead tiles by how well they match your description."
)
CSS = """
.geotext-status p{margin:.2em 0}
footer{display:none !important}
"""


def _out(value: Any) -> Any:
    """None in a View means 'leave this output as it is'."""
    return gr.skip() if value is None else value


def _outputs(view: View, fields: Sequence[str]) -> tuple[Any, ...]:
    return tuple(_out(getattr(view, name)) for name in fields)


SEARCH_FIELDS = ("gallery", "map_html", "status", "explanations", "files", "state")
EXPLAIN_FIELDS = ("map_html", "explanations", "files", "state")


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
    engine = callbacks.make_engine(retriever, index, explainer, hybrid_weight) if ready else None
    if not ready and notice is None:
        notice = "No model or index is loaded: start the app with `--model PATH --index PATH`."
    examples = list(examples) if examples else list(FALLBACK_EXAMPLES)

    def on_search(query: str, k: float, area: str) -> tuple[Any, ...]:
        try:
            view = callbacks.search(query, k, area, engine, basemap=basemap, notice=notice)
        except Exception:  # the callbacks already catch; this is the last line of defence
            view = callbacks.error_view(callbacks.internal_error("searching"))
        return _outputs(view, SEARCH_FIELDS)

    def on_explain(state: SearchState) -> Iterator[tuple[Any, ...]]:
        try:
            for view in callbacks.explain(state, engine, reason_top=reason_top):
                yield _outputs(view, EXPLAIN_FIELDS)
        except Exception:
            yield _outputs(View(explanations=callbacks.internal_error("explaining")), EXPLAIN_FIELDS)

    def on_select(state: SearchState, evt: gr.SelectData) -> tuple[str, SearchState | None]:
        try:
            return callbacks.focus(state, evt.index if isinstance(evt.index, int) else None)
        except Exception:
            log.exception("could not focus the map")
            return gr.skip(), state

    # analytics off: the app must work (and stay quiet) with no internet
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if notice:
            gr.Markdown(notice, elem_classes="geotext-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                query = gr.Textbox(
                    label="What do you see around you?",
                    placeholder="A red-brick church on a corner, a small park opposite, a café called Ekberg…",
                    lines=3,
                    max_lines=10,
                    elem_id="geotext-query",
                )
                with gr.Row():
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="Results (K)", elem_id="geotext-k")
                    area = gr.Textbox(
                        label="Limit to an area (optional)",
                        placeholder="w,s,e,n or lat,lon,radius_m",
                        elem_id="geotext-area",
                    )
                search_btn = gr.Button("Search", variant="primary", elem_id="geotext-search")
                status = gr.Markdown(label="Status", elem_classes="geotext-status", elem_id="geotext-status")
                gr.Examples(examples=[[e] for e in examples], inputs=[query], label="Example descriptions")
            with gr.Column(scale=3, min_width=360):
                map_html = gr.HTML(
                    value=maps.empty_map_iframe(),
                    label="Map",
                    elem_id="geotext-map",
                    min_height=maps.MAP_HEIGHT_PX,
                )
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
            explanations = gr.Markdown(label="Explanations", elem_id="geotext-explanations")
            files = gr.File(
                label="Download the results (GeoJSON, CSV)",
                file_count="multiple",
                interactive=False,
                elem_id="geotext-files",
            )
        heatmap = gr.Image(
            label="What drove the match: relevance over the selected tile (select a tile above)",
            type="pil",
            interactive=False,
            height=260,
            visible=engine is not None and engine.heatmap is not None,
            elem_id="geotext-heatmap",
        )
        state = gr.State(SearchState(basemap=basemap))

        search_outputs = [gallery, map_html, status, explanations, files, state]
        model_queue = {"concurrency_limit": concurrency, "concurrency_id": "model"}
        triggers = [search_btn.click, query.submit]
        for i, trigger in enumerate(triggers):
            searched = trigger(
                on_search,
                inputs=[query, k, area],
                outputs=search_outputs,
                api_name="search" if i == 0 else None,
                api_visibility="public" if i == 0 else "private",
                **model_queue,
            )
            if engine is not None and engine.confidence is not None:
                # A separate event: the ranking is on the page before any explanation starts.
                explained = searched.then(
                    on_explain,
                    inputs=[state],
                    outputs=[map_html, explanations, files, state],
                    api_visibility="private",
                    show_progress="hidden",
                    **model_queue,
                )
                # A new search stops the previous one's explanations, so they never overwrite it.
                trigger(None, cancels=[explained], api_visibility="private")
        gallery.select(on_select, inputs=[state], outputs=[map_html, state], api_visibility="private")
        if engine is not None and engine.heatmap is not None:

            def on_heatmap(state: SearchState, evt: gr.SelectData) -> Any:
                index = evt.index if isinstance(evt.index, int) else None
                return callbacks.relevance_heatmap(state, index, engine)

            # its own listener (a .then would not receive the selection), queued behind the model
            gallery.select(
                on_heatmap, inputs=[state], outputs=[heatmap], api_visibility="private", **model_queue
            )
    demo.queue(default_concurrency_limit=concurrency)
    return demo
