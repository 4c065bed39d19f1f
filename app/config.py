"""App settings from CLI flags and GEOTEXT_* environment variables, and loading what they name."""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.models.demo_base import DEMO_MODEL_ID

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "assets" / "demo"
DEMO_MODEL = DEMO_MODEL_ID  # assembled locally from PyPI packages on first use
DEMO_ADAPTER = DEMO_DIR / "adapter"  # the vision tower, connector and LoRA we trained (a few MB)
DEMO_INDEX = DEMO_DIR / "index"
DEMO_EXAMPLES = DEMO_DIR / "examples.txt"  # one description a line, optional
DEMO_RANKING = DEMO_DIR / "ranking.json"  # the ranking chosen on the human dev set (demo.evaluate_human)

# Setting -> environment variable; a CLI flag wins over the variable, the variable over the default.
ENV_VARS: dict[str, str] = {
    "model": "GEOTEXT_MODEL",
    "adapter": "GEOTEXT_ADAPTER",
    "quantization": "GEOTEXT_QUANTIZATION",
    "index": "GEOTEXT_INDEX",
    "explain": "GEOTEXT_EXPLAIN",
    "basemap": "GEOTEXT_BASEMAP",
    "concurrency": "GEOTEXT_CONCURRENCY",
    "host": "GEOTEXT_HOST",
    "port": "GEOTEXT_PORT",
    "hybrid": "GEOTEXT_HYBRID",
}
EXPLAIN_MODES = ("auto", "on", "off")
OWN_MODEL_MAX_PARAMS = 1_000_000_000  # up to this size the explainer writes on a copy of its own
BASEMAPS = ("offline", "osm", "satellite")  # keys of app.maps.BASEMAPS; kept here so parsing stays light

FALLBACK_EXAMPLES = [
    "A red-brick church on a corner, a small park opposite, a café called Ekberg.",
    "Tram tracks run along a wide boulevard; across the street there is a hotel and a pharmacy.",
    "I stand by the harbour: the market square is on my left and ferries are moored to the right.",
    "A narrow street with restaurants on both sides, a bookshop and a bus stop in front of a school.",
]


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to start; paths are kept as given (relative to the working dir)."""

    model: str | None = DEMO_MODEL
    adapter: str | None = str(DEMO_ADAPTER)
    quantization: str = "none"
    index: str | None = str(DEMO_INDEX)
    explain: str = "auto"
    basemap: str = "offline"
    concurrency: int = 1
    host: str | None = None  # None lets Gradio decide (GRADIO_SERVER_NAME on a Space)
    port: int | None = None
    examples: list[str] = field(default_factory=list)
    hybrid: float | None = None  # fuse with BM25 over the tiles' OSM context; None = pixels only


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py",
        description="GeoText: describe a street scene, get the overhead tiles where it probably is.",
        epilog="Each flag can also be set with its environment variable: "
        + ", ".join(f"--{k} {v}" for k, v in ENV_VARS.items()),
    )
    p.add_argument("--model", help=f"model folder or hub id (default: the bundled demo, {DEMO_MODEL})")
    p.add_argument(
        "--adapter", help="LoRA/DoRA adapter folder (default: the demo's with the demo model, else none)"
    )
    p.add_argument(
        "--quantization", help="none, 4bit or 8bit: the retriever's loader checks it (default: none)"
    )
    p.add_argument("--index", help=f"tile index folder (default: the bundled demo, {DEMO_INDEX})")
    p.add_argument("--explain", choices=EXPLAIN_MODES, help="MLLM reasons and confidence (default: auto)")
    p.add_argument("--basemap", choices=BASEMAPS, help="initial map background (default: offline)")
    p.add_argument("--concurrency", type=int, help="searches that may use the model at once (default: 1)")
    p.add_argument("--host", help="address to listen on (default: Gradio's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: Gradio's, 7860)")
    p.add_argument("--examples", help="text file with one example description a line")
    p.add_argument(
        "--hybrid",
        type=float,
        help="weight in [0, 1] of the MLLM score fused with BM25 over the "
        "tiles' context text (1 = pixels only; default: the demo's choice in assets/demo/ranking.json, "
        "else off)",
    )
    return p


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Flags over environment variables over defaults."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    defaults = AppConfig()
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        flag = getattr(args, name)
        raw = flag if flag is not None else environ.get(var) or None
        values[name] = getattr(defaults, name) if raw is None else raw
    model_given = args.model is not None or bool(environ.get(ENV_VARS["model"]))
    adapter_given = args.adapter is not None or bool(environ.get(ENV_VARS["adapter"]))
    if model_given and not adapter_given:  # the demo adapter belongs to the demo model only
        values["adapter"] = None
    for name in ("concurrency", "port"):
        if values[name] is not None:
            values[name] = int(values[name])
    if values["hybrid"] is None and values["index"] == str(DEMO_INDEX):
        values["hybrid"] = demo_ranking_weight()
    if values["hybrid"] is not None:
        values["hybrid"] = float(values["hybrid"])
        if not 0.0 <= values["hybrid"] <= 1.0:
            raise SystemExit("--hybrid must lie between 0 and 1")
    _check_choice("explain", values["explain"], EXPLAIN_MODES)
    _check_choice("basemap", values["basemap"], BASEMAPS)
    if values["concurrency"] < 1:
        raise SystemExit("--concurrency must be at least 1")
    values["examples"] = read_examples(args.examples)
    return AppConfig(**values)


def demo_ranking_weight(path: Path = DEMO_RANKING) -> float | None:
    """The demo's default hybrid weight, as chosen on the human dev set; None (pixels only) without a choice."""
    import json

    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return float(choice["weight"]) if choice.get("ranking") == "hybrid" else None


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SystemExit(
            f"{name}={value!r} is not one of {', '.join(choices)} (set by {ENV_VARS[name]} or --{name})"
        )


def read_examples(path: str | Path | None = None) -> list[str]:
    """Example descriptions: the given file, else the demo's, else a few generic ones."""
    candidate = Path(path) if path else DEMO_EXAMPLES
    if candidate.is_file():
        lines = [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if found:
            return found
    return list(FALLBACK_EXAMPLES)


@dataclass
class Backend:
    """What the UI searches with; `notice` says why a part is missing and what to pass."""

    retriever: Any = None
    index: Any = None
    explainer: Any = None
    notice: str | None = None


def missing_notice(config: AppConfig, problem: str) -> str:
    return (
        f"**The search is not available yet:** {problem}\n\n"
        "Start the app with a model and a tile index, for example\n\n"
        "`python app.py --model path/to/model --index path/to/index` "
        "(optionally `--adapter path/to/adapter --quantization 4bit`),\n\n"
        "or set `GEOTEXT_MODEL`, `GEOTEXT_INDEX` (and `GEOTEXT_ADAPTER`, `GEOTEXT_QUANTIZATION`). "
        f"Without them the app uses the bundled offline demo in `{_show(DEMO_DIR)}`. "
        "Build an index with `python -m retriever.index build --model M --tiles SOURCE --out INDEX`."
    )


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_backend(config: AppConfig) -> Backend:
    """Load the retriever, the index and (optionally) the explainer; never raises for a missing part."""
    for name in ("model", "index", "adapter"):
        value = getattr(config, name)
        if name == "adapter" and not value:
            continue
        if not value:
            return Backend(notice=missing_notice(config, f"no {name} was given."))
        if _is_missing(name, value):
            return Backend(notice=missing_notice(config, f"the {name} `{value}` does not exist."))
    try:
        from retriever import TileIndex, load_retriever

        retriever = load_retriever(config.model, adapter=config.adapter, quantization=config.quantization)
        index = TileIndex.load(config.index, retriever=retriever)
    except Exception as error:  # any failure here becomes a notice in the page, not a crash
        log.exception("could not load the model or the index")
        return Backend(notice=missing_notice(config, f"loading failed: {type(error).__name__}: {error}"))
    return Backend(retriever=retriever, index=index, explainer=load_explainer(config, retriever, index))


def _is_missing(name: str, value: str) -> bool:
    """A local path that is absent; a model given as a hub id (`org/name`) is left to the loader."""
    if Path(value).expanduser().exists():
        return False
    return not (name == "model" and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", value))


def wants_own_model(retriever: Any) -> bool:
    """Whether the explainer gets a private copy of the model: small and not quantized (the demo: +1.0 GB RSS).

    Then a search never waits for a reason being written (measured in benchmarks/bench_app_busy.py); a large
    or 4-bit model shares its one copy, and a reason stops between two tokens for a search instead.
    """
    model = getattr(retriever, "model", None)
    if model is None or getattr(retriever, "quantization", "none") != "none":
        return False
    return sum(p.numel() for p in model.parameters()) <= OWN_MODEL_MAX_PARAMS


def load_explainer(config: AppConfig, retriever: Any, index: Any = None) -> Any:
    """The Explainer when enabled and available; None otherwise (the app then shows similarity confidence)."""
    if config.explain == "off":
        return None
    try:
        from retriever.explain import Explainer
        from retriever.models.encoder import fast_bf16_cpu

        # The adapter is switched off for writing, as the explanations issue asks: measured on the demo, the
        # retrieval LoRA turns SmolLM2's reasons into gibberish. bf16 matmuls keep P(yes) of the top-5 under 1 s.
        # The index gives the evidence its neighbouring tiles (within 100 m) and the gallery's names.
        return Explainer(
            retriever,
            adapter_off=True,
            autocast_bf16=retriever.device.type == "cpu" and fast_bf16_cpu(),
            index=index,
            own_model=wants_own_model(retriever),
        )
    except Exception as error:
        if config.explain == "on":
            raise SystemExit(f"--explain on, but the explainer could not be loaded: {error}") from error
        log.info("explanations disabled: %s", error)
        return None
