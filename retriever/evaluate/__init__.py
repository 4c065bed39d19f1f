"""The benchmark protocols of GeoText-1652, CVG-Text and JSONL pairs; the CLI is `python -m retriever.evaluate`."""

from retriever.evaluate.cache import Encoder, cache_keys, embed_pairs
from retriever.evaluate.data import DATASETS, PairSet, Split, carve_validation, read_dataset
from retriever.evaluate.protocols import (
    PROTOCOLS,
    RERANKERS,
    ProtocolSpec,
    RerankFactory,
    ScoreOptions,
    evaluate_with,
    format_table,
    markdown_table,
    render,
)

__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "RERANKERS",
    "Encoder",
    "PairSet",
    "ProtocolSpec",
    "RerankFactory",
    "ScoreOptions",
    "Split",
    "cache_keys",
    "carve_validation",
    "embed_pairs",
    "evaluate_with",
    "format_table",
    "markdown_table",
    "read_dataset",
    "render",
]
