"""The GeoText web app: Gradio UI and Folium map on top of the `retriever` library."""

from app.config import AppConfig, load_backend, parse_config
from app.maps import hits_to_map, map_iframe
from app.ui import CSS, build_demo

__all__ = [
    "AppConfig",
    "CSS",
    "build_demo",
    "hits_to_map",
    "load_backend",
    "main",
    "map_iframe",
    "parse_config",
]


def main(argv: list[str] | None = None) -> None:
    """Parse flags and env vars, load the model and index (or explain what is missing), and serve."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its probing of CPU builds reads like errors
    config = parse_config(argv)
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
