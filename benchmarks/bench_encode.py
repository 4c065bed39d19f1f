"""Encode throughput of tiny models on the CPU: batched vs one-at-a-time, and early exit vs full forward."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from retriever import load_retriever
from retriever.models.backbones import FAMILIES
from retriever.models.tiny import make_tiny_model

TEXT = "a red-brick church on a corner, a small park opposite, a cafe called Ekberg across the street"


def rate(fn, n: int, repeats: int = 3) -> float:
    """Items per second, best of `repeats` (after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="texts and tiles per measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    texts = [f"{TEXT} number {i}" for i in range(args.n)]
    images = [Image.new("RGB", (96, 96), (i * 3 % 255, 80, 160)) for i in range(args.n)]
    print(f"tiny models, {args.n} items, {args.threads} threads, CPU")
    print(
        f"{'family':<12}{'texts/s b16':>13}{'texts/s b1':>12}{'tiles/s b8':>12}{'tiles/s b1':>12}"
        f"{'mid-layer early exit':>22}{'mid-layer full fwd':>20}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            path = make_tiny_model(family, Path(tmp) / family)
            r = load_retriever(path)
            mid = load_retriever(path, pool_layer=1, pooling="mean")

            def full_forward_mid() -> None:  # the peer: all layers, then pick hidden_states[1]
                with torch.inference_mode():
                    for s in range(0, len(texts), 16):
                        batch = mid.tokenize_queries(texts[s : s + 16])
                        mid.trunk(**batch, output_hidden_states=True).hidden_states[1]

            cols = [
                rate(lambda: r.encode_queries(texts, batch_size=16, progress=False), len(texts)),
                rate(lambda: r.encode_queries(texts, batch_size=1, progress=False), len(texts)),
                rate(lambda: r.encode_tiles(images, batch_size=8, progress=False), len(images)),
                rate(lambda: r.encode_tiles(images, batch_size=1, progress=False), len(images)),
                rate(lambda: mid.encode_queries(texts, batch_size=16, progress=False), len(texts)),
                rate(full_forward_mid, len(texts)),
            ]
            print(f"{family:<12}" + "".join(f"{c:>{w}.0f}" for c, w in zip(cols, (13, 12, 12, 12, 22, 20))))


if __name__ == "__main__":
    main()
