"""The GeoText web app: Gradio UI and Folium map on top of the `retriever` library."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and env vars, load the model and index (or explain what is missing), and serve."""
    import logging

    from app.config import load_backend, parse_config  # imported here: `import app.config` stays light
    from app.ui import CSS, build_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its probing of CPU builds reads like errors
    config = parse_config(list(argv) if argv is not None else None)
    backend = load_backend(config)
    demo = build_demo(
        backend.retriever,
        backend.index,
        backend.explainer,
        config.examples,
        notice=backend.notice,
        basemap=config.basemap,
        concurrency=config.concurrency,
        hybrid_weight=config.hybrid,
    )
    demo.launch(server_name=config.host, server_port=config.port, css=CSS)


__all__ = ["main"]
