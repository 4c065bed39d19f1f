"""CVG-Text scorer: the vectorised metrics against per-query Python loops, side by side, on synthetic data."""

from __future__ import annotations

import argparse
import math
import os
import re
import time

import numpy as np
import torch

from retriever.evaluate.metrics import cvg_metrics
from retriever.evaluate.reference import cvg_metrics_reference


def official_haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The official CVG-Text evaluate.py haversine (math module)."""
    dlat = math.radians(lat2 - lat1)
    dlon = math.radians(lon2 - lon1)
    a = (
        math.sin(dlat / 2) ** 2
        + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2)) * math.sin(dlon / 2) ** 2
    )
    return 6371 * (2 * math.atan2(math.sqrt(a), math.sqrt(1 - a)))


def extract_lat_lon(filename: str) -> tuple[float, float]:
    match = re.match(r"([-+]?[0-9]*\.?[0-9]+),([-+]?[0-9]*\.?[0-9]+)", os.path.basename(filename))
    return float(match.group(1)), float(match.group(2))


def official_cal_score(similarities: np.ndarray, names: list[str], m: int = 100) -> dict:
    """The official `cal_score` loop (overall numbers only), transcribed: image x text similarities."""
    totals = {"R@1": 0, "R@5": 0, "R@10": 0, "L@50": 0, "L@100": 0, "L@150": 0, "Deviation": 0.0}
    for i in range(len(names)):
        lat0, lon0 = extract_lat_lon(names[i])
        distances = []
        for j, image in enumerate(names):
            lat, lon = extract_lat_lon(image)
            distances.append((official_haversine(lat0, lon0, lat, lon), j))
        distances.sort(key=lambda x: x[0])
        closest = [j for _, j in distances[:m]]
        sim = similarities[closest, i]
        order = np.argsort(-sim, kind="stable")
        best = [names[closest[p]] for p in order]
        deviation = 0 if best[0] == names[i] else official_haversine(lat0, lon0, *extract_lat_lon(best[0]))
        totals["Deviation"] += deviation
        for r in (50, 100, 150):
            totals[f"L@{r}"] += int(deviation <= r / 1000)
        for k in (1, 5, 10):
            totals[f"R@{k}"] += int(names[i] in best[:k])
    n = len(names)
    out = {k: (v / n) * 100 for k, v in totals.items() if k != "Deviation"}
    out["deviation_km"] = totals["Deviation"] / n
    return out


def synthetic(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """n locations over ~3 x 3 km of Manhattan; texts = their image embedding + noise."""
    rng = np.random.default_rng(seed)
    lat = np.round(40.70 + rng.uniform(0, 0.027, n), 6)
    lon = np.round(-74.01 + rng.uniform(0, 0.035, n), 6)
    names = [
        f"{a:.6f},{b:.6f}_pano{i:05d}_2019.jpg" if i % 2 else f"{a:.6f},{b:.6f}_{i % 360}.jpg"
        for i, (a, b) in enumerate(zip(lat, lon, strict=True))
    ]
    latlon = np.array([extract_lat_lon(s) for s in names])
    images = rng.standard_normal((n, dim)).astype(np.float32)
    texts = images + 6.0 * rng.standard_normal((n, dim)).astype(np.float32)  # hard enough that R@1 < 100
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return norm(texts).astype(np.float32), norm(images).astype(np.float32), names, latlon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1200, help="queries = images")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="runs of the vectorised scorer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts, images, names, latlon = synthetic(args.n, args.dim, args.seed)
    truth = np.arange(args.n)
    panorama = np.array([len(s.split("_")) > 2 for s in names])
    subsets = {"panorama": panorama, "single": ~panorama}
    print(
        f"CVG-Text scorer, {args.n} queries x {args.n} images, D={args.dim}, m=100, torch threads={args.threads}"
    )

    cvg_metrics(texts[:10], images, truth[:10], latlon[:10], latlon)  # warm-up (imports, allocator)
    # Wall time suffers from other jobs on a shared machine; CPU time of this process much less.
    runs = []
    for _ in range(args.repeats):
        clock = (time.perf_counter(), time.process_time())
        fast = cvg_metrics(texts, images, truth, latlon, latlon, subsets=subsets, progress=False)
        runs.append((time.perf_counter() - clock[0], time.process_time() - clock[1]))
    fast_wall, fast_cpu = (float(np.median([r[i] for r in runs])) for i in (0, 1))

    clock = (time.perf_counter(), time.process_time())
    literal = cvg_metrics_reference(texts, images, truth, latlon, latlon, subsets=subsets)
    literal_wall, literal_cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]

    clock = (time.perf_counter(), time.process_time())
    similarities = (torch.from_numpy(images) @ torch.from_numpy(texts).T).numpy()  # as evaluate_clip does
    official = official_cal_score(similarities, names)
    official_wall, official_cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]

    print(f"{'scorer':<42}{'wall s':>9}{'CPU s':>9}{'x wall':>9}{'x CPU':>9}")
    rows = [
        (f"vectorised cvg_metrics (median of {args.repeats})", fast_wall, fast_cpu),
        ("literal loop (cvg_metrics_reference)", literal_wall, literal_cpu),
        ("official cal_score loop (math, regex)", official_wall, official_cpu),
    ]
    for name, wall, cpu in rows:
        print(f"{name:<42}{wall:>9.3f}{cpu:>9.3f}{wall / fast_wall:>9.1f}{cpu / fast_cpu:>9.1f}")
    print()
    keys = ["R@1", "R@5", "R@10", "L@50", "L@100", "L@150", "deviation_km"]
    print(f"{'metric':<14}{'vectorised':>22}{'literal loop':>22}{'official loop':>22}")
    for k in keys:
        print(f"{k:<14}{fast['overall'][k]!r:>22}{literal['overall'][k]!r:>22}{official[k]!r:>22}")
    print()
    print(f"vectorised == literal loop, every subset and digit: {fast == literal}")
    same = all(fast["overall"][k] == official[k] for k in keys[:-1])
    dev = abs(fast["overall"]["deviation_km"] - official["deviation_km"])
    print(
        f"vectorised vs official math loop: R@k and L@r identical: {same}; |deviation difference| = {dev:.3g} km"
    )
    for name in ("panorama", "single"):
        s = fast[name]
        print(
            f"{name:<9} n={s['count']:<5} R@1={s['R@1']:.2f} L@50={s['L@50']:.2f} dev={s['deviation_km']:.4f} km"
        )


if __name__ == "__main__":
    main()
