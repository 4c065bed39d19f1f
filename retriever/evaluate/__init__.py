"""Evaluate a retriever on GeoText-1652, CVG-Text or JSONL pairs: `python -m retriever.evaluate`."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever import __version__
from retriever.evaluate.data import PairSet, read_dataset
from retriever.errors import DataFormatError, ImageDecodeError, RetrieverError
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

ENCODE_BLOCK = 256  # items per encode call: the unit of progress, caching and failure isolation


class Encoder(Protocol):
    """What evaluation needs from a retriever (retriever.models.encoder.Retriever, or a test fake)."""

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = ..., progress: bool | None = ...
    ) -> torch.Tensor: ...

    def encode_tiles(
        self, images: Sequence[Any], batch_size: int = ..., progress: bool | None = ...
    ) -> torch.Tensor: ...

    def fingerprint(self) -> dict: ...


def load_retriever(
    model: str, adapter: str | None = None, quantization: str = "none", device: str | None = None
) -> Encoder:
    """Load the real retriever (imported lazily: transformers is heavy, and tests replace this)."""
    from retriever.models.encoder import load_retriever as _load

    return _load(model, adapter=adapter, quantization=quantization, device=device)


# ---------------------------------------------------------------------------------------------
# Re-ranking hooks
# ---------------------------------------------------------------------------------------------


def _erm_reranker(retriever: Encoder, pairs: PairSet) -> RerankFn:
    """The explanation module's confidence re-ranker (CrossText2Loc's ERM), from retriever.explain."""
    try:
        from retriever.explain import make_reranker
    except ImportError as err:
        raise RetrieverError(
            "--rerank erm needs retriever.explain.make_reranker(retriever, pairs) -> rerank_fn, "
            "which is not available in this installation."
        ) from err
    return make_reranker(retriever, pairs)


# name -> factory(retriever, pairs) -> rerank_fn(query_idx, candidate_indices, scores) -> re-ordered
# candidate indices, or None for no re-ranking. It is applied to the top `rerank_depth` images of
# every text query, inside both protocols, before any metric is computed.
RERANKERS: dict[str, Callable[[Encoder, PairSet], RerankFn | None]] = {
    "none": lambda retriever, pairs: None,
    "erm": _erm_reranker,
}


# ---------------------------------------------------------------------------------------------
# Protocols
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
        data_options=lambda a: {"city": a.city, "view": a.view, "split": a.split},
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
# Embedding cache
# ---------------------------------------------------------------------------------------------


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _relative(path: Path, root: Path | None) -> str:
    try:
        return str(path.relative_to(root)) if root else str(path)
    except ValueError:
        return str(path)


def cache_keys(retriever: Encoder, pairs: PairSet) -> dict[str, str]:
    """Cache keys of the text and the image embeddings: the retriever fingerprint plus the data.

    Texts are keyed by their content; images by path (relative to the data root, so a moved
    dataset still hits) and by size and mtime, so a fixed or replaced image invalidates them.
    """
    base = {
        "fingerprint": retriever.fingerprint(),
        "annotations": [_file_sha256(p) for p in pairs.sources],
    }
    texts = _sha256_bytes("\x1e".join(pairs.texts).encode("utf-8"))
    stats = []
    for p in pairs.images:
        st = p.stat() if p.exists() else None
        stats.append([_relative(p, pairs.root), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    images = _sha256_bytes(json.dumps(stats).encode("utf-8"))
    return {
        kind: _sha256_bytes(json.dumps({**base, "kind": kind, "content": content}, sort_keys=True).encode())[
            :24
        ]
        for kind, content in (("texts", texts), ("images", images))
    }


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_load(cache_dir: Path, kind: str, key: str, n: int) -> tuple[np.ndarray, dict] | None:
    manifest_path = cache_dir / f"{kind}-{key}.json"
    array_path = cache_dir / f"{kind}-{key}.npy"
    if not manifest_path.is_file() or not array_path.is_file():
        return None  # the manifest is written last: without it the entry is incomplete
    manifest = json.loads(manifest_path.read_text())
    array = np.load(array_path, mmap_mode="r")
    if array.shape[0] != n or manifest.get("rows") != n:
        return None
    return array, manifest


def _cache_store(cache_dir: Path, kind: str, key: str, array: np.ndarray, manifest: dict) -> None:
    _atomic_write_bytes(cache_dir / f"{kind}-{key}.npy", lambda f: np.save(f, array))
    text = json.dumps({**manifest, "rows": int(array.shape[0]), "dim": int(array.shape[1])}, indent=1)
    _atomic_write_bytes(cache_dir / f"{kind}-{key}.json", lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _encode_texts(retriever: Encoder, texts: list[str], batch_size: int, progress: bool | None) -> np.ndarray:
    blocks = range(0, len(texts), ENCODE_BLOCK)
    out = [
        retriever.encode_queries(texts[s : s + ENCODE_BLOCK], batch_size=batch_size, progress=False)
        for s in tqdm(
            blocks, desc="Encoding texts", unit="block", disable=progress is False or len(blocks) < 2
        )
    ]
    return torch.cat(out).float().numpy()  # (T, D)


def _encode_images(
    retriever: Encoder, images: list[Path], batch_size: int, progress: bool | None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Embed all images; an unreadable one is recorded as (index, reason) and left as a NaN row, not raised."""
    blocks = range(0, len(images), ENCODE_BLOCK)
    parts: list[np.ndarray | None] = []  # (b, D) per block, or (1, D) / None per image of a failing block
    failed: list[tuple[int, str]] = []
    for start in tqdm(
        blocks, desc="Encoding images", unit="block", disable=progress is False or len(blocks) < 2
    ):
        block = images[start : start + ENCODE_BLOCK]
        try:
            parts.append(retriever.encode_tiles(block, batch_size=batch_size, progress=False).float().numpy())
            continue
        except (ImageDecodeError, OSError, ValueError):
            pass
        for offset, path in enumerate(block):  # isolate the bad files of this block, keep the rest
            try:
                parts.append(retriever.encode_tiles([path], batch_size=1, progress=False).float().numpy())
            except (ImageDecodeError, OSError, ValueError) as err:
                failed.append((start + offset, f"{type(err).__name__}: {err}"))
                parts.append(None)
    dim = next((p.shape[1] for p in parts if p is not None), 0)
    rows = [p if p is not None else np.full((1, dim), np.nan, dtype=np.float32) for p in parts]
    return (np.concatenate(rows) if rows else np.empty((0, dim), dtype=np.float32)), failed


def embed_pairs(
    retriever: Encoder,
    pairs: PairSet,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]], dict[str, str]]:
    """Text (T, D) and image (I, D) embeddings, from the cache when it holds them.

    Returns the embeddings, the unreadable images as (index, reason) (their rows are NaN), and
    whether each modality was a cache "hit" or "miss".
    """
    keys = cache_keys(retriever, pairs) if cache_dir else {}
    cache = Path(cache_dir) if cache_dir else None
    status: dict[str, str] = {}
    manifest_base = {"fingerprint": retriever.fingerprint(), "dataset": pairs.name, "version": __version__}

    hit = _cache_load(cache, "texts", keys["texts"], len(pairs.texts)) if cache else None
    if hit is not None:
        texts, status["texts"] = hit[0], "hit"
    else:
        texts, status["texts"] = _encode_texts(retriever, pairs.texts, batch_size, progress), "miss"
        if cache:
            _cache_store(cache, "texts", keys["texts"], texts, manifest_base)

    hit = _cache_load(cache, "images", keys["images"], len(pairs.images)) if cache else None
    if hit is not None:
        images, status["images"] = hit[0], "hit"
        failed = [(int(i), str(reason)) for i, reason in hit[1].get("failed", [])]
    else:
        images, failed = _encode_images(retriever, pairs.images, batch_size, progress)
        status["images"] = "miss"
        if cache:
            _cache_store(cache, "images", keys["images"], images, {**manifest_base, "failed": failed})
    return texts, images, failed, status


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


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
    skip_unreadable: bool = False,
    progress: bool | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Run one protocol with any object that has encode_queries / encode_tiles / fingerprint.

    data_args: {"data": path, **reader options} (e.g. split, city, view, official_quirks).
    rerank: a RERANKERS name or a rerank_fn(query_idx, candidate_indices, scores) -> new order.
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
    skipped = [_relative(pairs.images[i], pairs.root) for i, _ in failed]
    if failed and not skip_unreadable:
        listing = [f"{_relative(pairs.images[i], pairs.root)} ({reason})" for i, reason in failed]
        shown = "\n  ".join(listing[:20]) + (
            f"\n  ... and {len(listing) - 20} more" if len(listing) > 20 else ""
        )
        raise DataFormatError(
            f"{len(failed)} of {len(pairs.images)} images could not be decoded:\n  {shown}\n"
            "Replace them, or pass --skip-unreadable to evaluate without them (their texts are dropped too). "
            "The other embeddings are cached."
        )
    if failed:
        keep = np.ones(len(pairs.images), dtype=bool)
        keep[[i for i, _ in failed]] = False
        text_keep = keep[pairs.text_image]
        pairs = pairs.subset_images(keep)
        texts, images = np.asarray(texts)[text_keep], np.asarray(images)[keep]
        print(f"warning: evaluated without {len(failed)} unreadable images and their texts", file=sys.stderr)

    rerank_fn = RERANKERS[rerank](retriever, pairs) if isinstance(rerank, str) else rerank
    opts = ScoreOptions(chunk_size, gallery_size, rerank_fn, rerank_depth, progress)
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
        "versions": {
            "retriever": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retriever.evaluate",
        description="Evaluate a retriever with the official GeoText-1652 or CVG-Text protocol, or on JSONL pairs.",
    )
    parser.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (or the JSONL file)")
    parser.add_argument("--split", default="test", help="annotation split (default: test)")
    parser.add_argument("--city", default="NewYork", help="CVG-Text city (NewYork, Brisbane, Tokyo)")
    parser.add_argument(
        "--view", default="satellite", choices=["satellite", "osm"], help="CVG-Text gallery view"
    )
    parser.add_argument("--image-root", type=Path, help="folder image paths are relative to (GeoText, JSONL)")
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument("--adapter", help="LoRA/DoRA adapter folder")
    parser.add_argument("--quantization", default="none", help="none | 4bit | 8bit")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    parser.add_argument(
        "--cache", type=Path, help="embedding cache folder: a re-run only recomputes the metrics"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--chunk-size", type=int, help="query rows per streamed score block (default: ~256 MB)"
    )
    parser.add_argument("--gallery-size", type=int, help="CVG-Text local gallery m (default 100; JSONL: all)")
    parser.add_argument(
        "--official-quirks",
        action="store_true",
        help="GeoText-1652: reproduce the official reader's off-by-one building labels",
    )
    parser.add_argument(
        "--rerank", default="none", choices=sorted(RERANKERS), help="re-rank each text's top-k"
    )
    parser.add_argument("--rerank-depth", type=int, default=5)
    parser.add_argument(
        "--skip-unreadable", action="store_true", help="drop undecodable images instead of failing"
    )
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        help="also write a markdown table (to PATH, or stdout without one)",
    )
    parser.add_argument("--label", help="model name in the tables (default: the model folder's name)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = PROTOCOLS[args.protocol]
    retriever = load_retriever(
        args.model, adapter=args.adapter, quantization=args.quantization, device=args.device
    )
    label = args.label or Path(args.model).name + (f"+{Path(args.adapter).name}" if args.adapter else "")
    results = evaluate_with(
        retriever,
        args.protocol,
        {"data": args.data, **spec.data_options(args)},
        cache_dir=args.cache,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        gallery_size=args.gallery_size,
        rerank=args.rerank,
        rerank_depth=args.rerank_depth,
        skip_unreadable=args.skip_unreadable,
        progress=False if args.no_progress else None,
        label=label,
    )
    print(f"{results['dataset']}  ({results['counts']['texts']} texts, {results['counts']['images']} images)")
    print(render(results))
    if "official" in results:
        print("official itm_eval keys (img_* = text→image, txt_* = image→text):")
        print("  " + "  ".join(f"{k}={v:.2f}" for k, v in results["official"].items()))
    if args.out:
        text = json.dumps(results, indent=2, ensure_ascii=False)
        _atomic_write_bytes(args.out, lambda f: f.write(text.encode("utf-8")))
        print(f"results written to {args.out}")
    if args.markdown == "-":
        print(render(results, markdown=True))
    elif args.markdown:
        Path(args.markdown).write_text(render(results, markdown=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
