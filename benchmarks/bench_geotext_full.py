"""GeoText-1652 at full test size on synthetic embeddings: peak RSS and wall time of the streamed metrics."""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from retriever.evaluate.metrics import default_chunk_rows, geotext_metrics

FULL_TEXTS, FULL_IMAGES, FULL_BUILDINGS = 154_065, 51_355, 951  # test_951_version.json


def rss_mb() -> float:
    """Current resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic(n_texts: int, n_images: int, n_buildings: int, dim: int, seed: int):
    """Unit image vectors, texts = their image + noise (3 per image), buildings in contiguous runs."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, dim, generator=gen)  # (I, D)
    images /= images.norm(dim=1, keepdim=True)
    text_image = np.minimum(np.arange(n_texts) // 3, n_images - 1)  # (T,)
    texts = torch.empty(n_texts, dim)  # (T, D), filled in blocks: no T x D temporaries
    for start in range(0, n_texts, 16_384):
        stop = min(start + 16_384, n_texts)
        block = (
            images[torch.from_numpy(text_image[start:stop])]
            + 6.0 * torch.randn(stop - start, dim, generator=gen) / dim**0.5
        )
        texts[start:stop] = block / block.norm(dim=1, keepdim=True)
    labels = np.sort(np.random.default_rng(seed).integers(0, n_buildings, n_images))  # (I,)
    return texts, images, text_image, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full texts and images")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, help="text rows per streamed block (default: ~256 MB)")
    parser.add_argument(
        "--max-chunks", type=int, help="score only the first N text chunks (all images); time is extrapolated"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    n_texts, n_images = round(FULL_TEXTS * args.scale), round(FULL_IMAGES * args.scale)
    n_buildings = max(2, round(FULL_BUILDINGS * args.scale))
    chunk = args.chunk_size or default_chunk_rows(n_images)
    print(
        f"GeoText-1652 streamed metrics: {n_texts:,} texts x {n_images:,} images, D={args.dim}, "
        f"chunk={chunk} rows, torch threads={args.threads}"
    )
    full_gb = n_texts * n_images * 4 / 2**30
    print(
        f"(the full T x I float32 score matrix would take {full_gb:.1f} GiB; the official code keeps two fp16 "
        f"copies plus the float similarity matrix)"
    )

    t = time.perf_counter()
    texts, images, text_image, labels = synthetic(n_texts, n_images, n_buildings, args.dim, args.seed)
    print(
        f"synthetic embeddings: {time.perf_counter() - t:.1f} s, "
        f"{(texts.nbytes + images.nbytes) / 2**20:,.0f} MiB, RSS now {rss_mb():,.0f} MiB"
    )

    scored = n_texts
    if args.max_chunks:
        scored = min(n_texts, args.max_chunks * chunk)
        texts, text_image = texts[:scored], text_image[:scored]
    rss_before = rss_mb()
    t = time.perf_counter()
    metrics = geotext_metrics(texts, images, text_image, labels, chunk_size=chunk, progress=True)
    wall = time.perf_counter() - t
    print(
        f"metrics wall time: {wall:.1f} s for {scored:,} texts"
        + (
            f" -> extrapolated to all {n_texts:,} texts: {wall * n_texts / scored:.0f} s"
            if scored < n_texts
            else ""
        )
    )
    print(
        f"RSS before metrics {rss_before:,.0f} MiB; peak RSS of the process {peak_rss_mb():,.0f} MiB "
        f"(limit 8,192 MiB)"
    )
    note = " (partial: only the scored texts; --max-chunks)" if scored < n_texts else ""
    print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items()) + note)


if __name__ == "__main__":
    main()
