"""The benchmark protocols: which reader, how each one scores and tabulates, and `evaluate_with` to run one."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retriever._io import library_versions
from retriever.errors import DataFormatError, RetrieverError
from retriever.evaluate.cache import Encoder, embed_pairs, relative_path
from retriever.evaluate.data import PairSet, read_dataset
from retriever.evaluate.metrics import (
    CVG_GALLERY_SIZE,
    RerankFn,
    apply_rerank,
    cvg_metrics,
    first_hit_rank,
    geotext_metrics,
    official_geotext_keys,
    recall_percent,
    stream_topk,
)

# factory(retriever, pairs) -> rerank_fn(query_idx, candidate_indices, scores) -> re-ordered candidate
# indices, or None for no re-ranking. It is applied to the top `rerank_depth` images of every text
# query, inside both protocols, before any metric is computed.
RerankFactory = Callable[[Encoder, PairSet], RerankFn | None]
# The library's own re-rankers. `python -m retriever.evaluate` adds "erm" (retriever.explain) on top:
# the CLI is the composition root, so this package never imports the explanation package.
RERANKERS: dict[str, RerankFactory] = {"none": lambda retriever, pairs: None}
MAX_LISTED_IMAGES = 20  # unreadable images named in the error before it only counts


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreOptions:
    """Knobs of the metric computation (not of the data)."""

    chunk_size: int | None = None
    gallery_size: int | None = None
    rerank_fn: RerankFn | None = None
    rerank_depth: int = 5
    progress: bool | None = None


def _score_geotext(pairs: PairSet, texts: np.ndarray, images: np.ndarray, opts: ScoreOptions) -> dict:
    metrics = geotext_metrics(
        texts,
        images,
        pairs.text_image,
        pairs.image_label,
        chunk_size=opts.chunk_size,
        rerank_fn=opts.rerank_fn,
        rerank_depth=opts.rerank_depth,
        progress=opts.progress,
    )
    return {"metrics": metrics, "official": official_geotext_keys(metrics)}


def _score_cvg(pairs: PairSet, texts: np.ndarray, images: np.ndarray, opts: ScoreOptions) -> dict:
    subsets = {}
    if pairs.text_kind is not None:
        subsets = {kind: pairs.text_kind == kind for kind in ("panorama", "single")}
    metrics = cvg_metrics(
        texts,
        images,
        pairs.text_image,
        pairs.text_latlon,
        pairs.image_latlon,
        subsets=subsets,
        gallery_size=opts.gallery_size or CVG_GALLERY_SIZE,
        rerank_fn=opts.rerank_fn,
        rerank_depth=opts.rerank_depth,
        progress=opts.progress,
    )
    return {"metrics": metrics}


def _score_pairs(pairs: PairSet, texts: np.ndarray, images: np.ndarray, opts: ScoreOptions) -> dict:
    """JSONL pairs: with coordinates the CVG-Text metrics over the whole gallery (or the m nearest
    with --gallery-size); without, image-level R@k of text->image retrieval."""
    if pairs.image_latlon is not None:
        metrics = cvg_metrics(
            texts,
            images,
            pairs.text_image,
            pairs.text_latlon,
            pairs.image_latlon,
            gallery_size=opts.gallery_size,
            rerank_fn=opts.rerank_fn,
            rerank_depth=opts.rerank_depth,
            progress=opts.progress,
        )
        return {"metrics": metrics}
    keep = max(10, opts.rerank_depth if opts.rerank_fn else 0)
    ranked, _ = stream_topk(
        texts, images, keep, columns=False, chunk_size=opts.chunk_size, progress=opts.progress
    )
    if opts.rerank_fn is not None:
        ranked = apply_rerank(ranked, opts.rerank_fn, opts.rerank_depth)
    ranks = first_hit_rank(ranked.indices, pairs.text_image, np.arange(len(pairs.images)))
    return {
        "metrics": {
            "overall": {**{f"R@{k}": recall_percent(ranks, k) for k in (1, 5, 10)}, "count": len(ranks)}
        }
    }


# ---------------------------------------------------------------------------------------------
# Result tables
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _table_geotext(results: dict) -> tuple[list[str], list[list[str]]]:
    m = results["metrics"]
    header = ["Model", "T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10", "Mean"]
    keys = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean"]
    return header, [[results["label"], *(_fmt(m[k]) for k in keys)]]


def _table_cvg(results: dict) -> tuple[list[str], list[list[str]]]:
    subsets = results["metrics"]
    first = next(iter(subsets.values()))
    columns = [k for k in first if k != "count"]
    names = {"deviation_km": "Dev. (km)"}
    header = ["Model", "Queries", *(names.get(c, c) for c in columns), "N"]
    rows = [
        [results["label"], name, *(_fmt(s[c]) for c in columns), _fmt(s["count"])]
        for name, s in subsets.items()
    ]
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain, aligned text table."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub / paper-ready markdown table (numbers right-aligned)."""
    align = ["---", *("---:" for _ in header[1:])]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in [header, align, *rows])


def render(results: dict, markdown: bool = False) -> str:
    """The results table of a protocol, as text or markdown."""
    header, rows = PROTOCOLS[results["protocol"]].table(results)
    return markdown_table(header, rows) if markdown else format_table(header, rows)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def _cvg_options(args: argparse.Namespace) -> dict[str, Any]:
    """--version (official name, e.g. Tokyo-photos) or --city (both subsets), with --view and --split."""
    version, city = getattr(args, "version", None), getattr(args, "city", None)
    if version and city:
        raise ValueError(f"--version {version} already names the city: drop --city {city}")
    place = {"version": version} if version else {"city": city or "NewYork"}
    return {**place, "view": args.view, "split": args.split}


@dataclass(frozen=True)
class ProtocolSpec:
    """One evaluation protocol: which reader, which CLI options it takes, how it scores and tabulates."""

    dataset: str  # a retriever.evaluate.data.DATASETS name
    data_options: Callable[[argparse.Namespace], dict[str, Any]]
    score: Callable[[PairSet, np.ndarray, np.ndarray, ScoreOptions], dict]  # texts (T, D), images (I, D)
    table: Callable[[dict], tuple[list[str], list[list[str]]]]
    tie_rule: str


PROTOCOLS: dict[str, ProtocolSpec] = {
    "geotext1652": ProtocolSpec(
        dataset="geotext1652",
        data_options=lambda a: {
            "split": a.split,
            "official_quirks": a.official_quirks,
            "image_root": a.image_root,
        },
        score=_score_geotext,
        table=_table_geotext,
        tie_rule="equal scores: the higher index ranks first (stable np.argsort(score)[::-1], as itm_eval)",
    ),
    "cvgtext": ProtocolSpec(
        dataset="cvgtext",
        data_options=_cvg_options,
        score=_score_cvg,
        table=_table_cvg,
        tie_rule="equal distances: lower image index first; equal scores: the nearer gallery image first",
    ),
    "jsonl": ProtocolSpec(
        dataset="jsonl",
        data_options=lambda a: {"image_root": a.image_root},
        score=_score_pairs,
        table=_table_cvg,
        tie_rule="with lat/lon as cvgtext; without, equal scores: the higher image index first (as geotext1652)",
    ),
}


# ---------------------------------------------------------------------------------------------
# Running a protocol
# ---------------------------------------------------------------------------------------------


def _drop_unreadable(
    pairs: PairSet, texts: np.ndarray, images: np.ndarray, failed: list[tuple[int, str]], skip: bool
) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """Raise one error naming every unreadable image, or (skip) evaluate without them and their texts."""
    if not failed:
        return pairs, texts, images
    if not skip:
        listing = [f"{relative_path(pairs.images[i], pairs.root)} ({reason})" for i, reason in failed]
        shown = "\n  ".join(listing[:MAX_LISTED_IMAGES])
        if len(listing) > MAX_LISTED_IMAGES:
            shown += f"\n  ... and {len(listing) - MAX_LISTED_IMAGES} more"
        raise DataFormatError(
            f"{len(failed)} of {len(pairs.images)} images could not be decoded:\n  {shown}\n"
            "Replace them, or pass --skip-unreadable to evaluate without them (their texts are dropped too). "
            "The other embeddings are cached."
        )
    keep = np.ones(len(pairs.images), dtype=bool)  # (I,)
    keep[[i for i, _ in failed]] = False
    text_keep = keep[pairs.text_image]  # (T,)
    print(f"warning: evaluated without {len(failed)} unreadable images and their texts", file=sys.stderr)
    return pairs.subset_images(keep), np.asarray(texts)[text_keep], np.asarray(images)[keep]


def _rerank_fn(
    rerank: str | RerankFn | None, retriever: Encoder, pairs: PairSet, rerankers: Mapping[str, RerankFactory]
) -> RerankFn | None:
    if not isinstance(rerank, str):
        return rerank
    if rerank not in rerankers:
        raise ValueError(
            f"Unknown re-ranker {rerank!r}; known here: {sorted(rerankers)}. Pass rerankers=... or a "
            "rerank_fn (python -m retriever.evaluate also knows 'erm')."
        )
    return rerankers[rerank](retriever, pairs)


def evaluate_with(
    retriever: Encoder,
    protocol: str,
    data_args: dict[str, Any],
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    chunk_size: int | None = None,
    gallery_size: int | None = None,
    rerank: str | RerankFn | None = "none",
    rerank_depth: int = 5,
    rerankers: Mapping[str, RerankFactory] = RERANKERS,
    skip_unreadable: bool = False,
    progress: bool | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Run one protocol with any object that has encode_queries / encode_tiles / fingerprint.

    data_args: {"data": path, **reader options} (e.g. split, city or version, view, official_quirks).
    rerank: a name in `rerankers` or a rerank_fn(query_idx, candidate_indices, scores) -> new order.
    Unreadable images are all listed in one DataFormatError after encoding, unless
    skip_unreadable, which drops them and their texts and records them in the result.
    """
    if protocol not in PROTOCOLS:
        raise RetrieverError(f"Unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    spec = PROTOCOLS[protocol]
    args = dict(data_args)
    pairs = read_dataset(spec.dataset, args.pop("data"), **args)

    t0 = time.perf_counter()
    texts, images, failed, cache_status = embed_pairs(
        retriever, pairs, cache_dir=cache_dir, batch_size=batch_size, progress=progress
    )
    t1 = time.perf_counter()
    skipped = [relative_path(pairs.images[i], pairs.root) for i, _ in failed]
    pairs, texts, images = _drop_unreadable(pairs, texts, images, failed, skip_unreadable)
    opts = ScoreOptions(
        chunk_size, gallery_size, _rerank_fn(rerank, retriever, pairs, rerankers), rerank_depth, progress
    )
    scored = spec.score(pairs, texts, images, opts)  # arrays may be memmaps: the metrics copy chunk by chunk
    t2 = time.perf_counter()

    fingerprint = retriever.fingerprint()
    return {
        "protocol": protocol,
        "label": label or Path(str(fingerprint.get("model", "model"))).name,
        "dataset": pairs.name,
        "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in data_args.items()},
        "counts": pairs.summary(),
        **scored,
        "options": {
            "gallery_size": gallery_size if protocol != "cvgtext" else gallery_size or CVG_GALLERY_SIZE,
            "chunk_size": chunk_size,
            "rerank": rerank if isinstance(rerank, str) else getattr(rerank, "__name__", "custom"),
            "rerank_depth": rerank_depth,
        },
        "tie_rule": spec.tie_rule,
        "retriever": fingerprint,
        "skipped_images": skipped,
        "cache": cache_status,
        "timing_s": {"encode": round(t1 - t0, 3), "metrics": round(t2 - t1, 3)},
        "versions": library_versions(("torch", "numpy")),
    }


__all__ = [
    "PROTOCOLS",
    "RERANKERS",
    "ProtocolSpec",
    "RerankFactory",
    "ScoreOptions",
    "evaluate_with",
    "format_table",
    "markdown_table",
    "render",
]
