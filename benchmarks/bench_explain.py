"""Explanation latency on the CPU: confidence of the top-5 (one batched forward vs one per hit), first words of a reason."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from retriever import load_retriever
from retriever.explain import Explainer
from retriever.models.backbones import FAMILIES
from retriever.models.tiny import make_tiny_model

QUERY = "a red-brick church on a corner, a small park opposite, a cafe called Ekberg across the street"
CONTEXTS = [
    {"features": ["church", "park", "tram stop"]},
    {"features": ["cafe Ekberg", "residential street"]},
    {},
    {"features": ["harbour", "market square", "hotel"]},
    {"features": ["school"]},
]


@dataclass(frozen=True)
class BenchHit:
    rank: int
    score: float
    image_path: str
    context: dict = field(default_factory=dict)


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def first_words_ms(explainer: Explainer, hit: BenchHit, max_new_tokens: int) -> tuple[float, float, str]:
    """Milliseconds to the first streamed chunk with a letter in it, to the end, and the text."""
    start = time.perf_counter()
    first = None
    text = ""
    for chunk in explainer.reason(QUERY, hit, max_new_tokens=max_new_tokens):
        text += chunk
        if first is None and any(c.isalnum() for c in chunk):
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return 1000 * (first if first is not None else total), 1000 * total, text


def bench(name: str, path: Path, hits: list[BenchHit], args: argparse.Namespace) -> None:
    r = load_retriever(path, adapter=args.adapter) if args.adapter else load_retriever(path)
    ex = Explainer(r, cache_size=0)  # no cache: every call runs the model
    batched = best_ms(lambda: ex.confidence(QUERY, hits), args.repeats)
    naive = best_ms(lambda: ex.p_yes(QUERY, hits, batch_size=1), args.repeats)
    heat = best_ms(lambda: ex.heatmap(QUERY, hits[0]), args.repeats)
    first_words_ms(ex, hits[0], 4)  # warm-up
    first, total, text = first_words_ms(ex, hits[0], args.max_new_tokens)
    print(
        f"{name:<14}{batched:>14.1f}{naive:>14.1f}{naive / batched:>9.1f}x"
        f"{first:>14.1f}{total:>12.1f}{heat:>12.1f}   {text[:40]!r}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="measure this model folder instead of the tiny models")
    parser.add_argument("--adapter", type=Path, help="with --model: its adapter")
    parser.add_argument("--threads", type=int, default=1, help="1: stable figures on a shared CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"top-5 confidence and reasons, {args.threads} threads, CPU, best of {args.repeats} (ms)")
    print(
        f"{'model':<14}{'conf batched':>14}{'conf 1-by-1':>14}{'speedup':>10}"
        f"{'first words':>14}{f'reason {args.max_new_tokens}t':>12}{'heatmap':>12}   text"
    )
    with tempfile.TemporaryDirectory() as tmp:
        hits = []
        for i, context in enumerate(CONTEXTS):
            path = Path(tmp) / f"tile{i}.png"
            Image.new("RGB", (256, 256), (40 * i, 120, 200 - 30 * i)).save(path)
            hits.append(BenchHit(i + 1, 0.6 - 0.03 * i, str(path), context))
        if args.model:
            bench(args.model.name[:14], args.model, hits, args)
            return
        for family in FAMILIES:
            bench(family, make_tiny_model(family, Path(tmp) / family), hits, args)


if __name__ == "__main__":
    main()
