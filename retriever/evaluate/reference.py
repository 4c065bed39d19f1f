"""Literal transcriptions of the official GeoText-1652 and CVG-Text scorers: the oracles of tests and benchmarks."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from retriever.evaluate.metrics import (
    CVG_GALLERY_SIZE,
    CVG_KS,
    CVG_RADII_M,
    GEOTEXT_KS,
    ArrayLike,
    RerankFn,
    geotext_summary,
    haversine_km,
)

# The official CVG-Text scripts were read at yejy53/CVG-Text 5de54d18 (evaluate.py: cal_score,
# haversine, extract_lat_lon), GeoText-1652 at MultimodalGeo/GeoText-1652 0d22fe83 (re_bbox.itm_eval).


def _scores(text_emb: ArrayLike, image_emb: ArrayLike) -> np.ndarray:
    """(T, N) float32 similarities, one matrix product as the vectorised scorer does."""
    texts = torch.as_tensor(np.asarray(text_emb, dtype=np.float32))  # (T, D)
    images = torch.as_tensor(np.asarray(image_emb, dtype=np.float32))  # (N, D)
    return (texts @ images.T).numpy()


# ---------------------------------------------------------------------------------------------
# GeoText-1652
# ---------------------------------------------------------------------------------------------


def geotext_metrics_reference(
    scores: np.ndarray,
    text_image: Sequence[int],
    image_label: Sequence[int],
    ks: Sequence[int] = GEOTEXT_KS,
    *,
    rerank_fn: RerankFn | None = None,
    rerank_depth: int = 5,
) -> dict[str, float]:
    """A literal transcription of the official `itm_eval` on a full (T, I) score matrix, stable sort."""
    scores_t2i, scores_i2t = np.asarray(scores), np.asarray(scores).T
    t2i_ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind="stable")[::-1]
        if rerank_fn is not None:
            head = np.asarray(rerank_fn(index, inds[:rerank_depth].copy(), score[inds[:rerank_depth]].copy()))
            inds = np.concatenate([head, inds[rerank_depth:]])
        buildings = np.array([image_label[j] for j in inds])
        t2i_ranks[index] = np.where(buildings == image_label[text_image[index]])[0][0]
    i2t_ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind="stable")[::-1]
        buildings = np.array([image_label[text_image[j]] for j in inds])
        i2t_ranks[index] = np.where(buildings == image_label[index])[0][0]
    return geotext_summary(t2i_ranks, i2t_ranks, ks)


# ---------------------------------------------------------------------------------------------
# CVG-Text: our literal loop (index based, our haversine_km, None for an empty subset)
# ---------------------------------------------------------------------------------------------


def _empty_cvg(ks: Sequence[int], radii_m: Sequence[int]) -> dict:
    return {
        "count": 0,
        **{f"R@{k}": None for k in ks},
        **{f"L@{r}": None for r in radii_m},
        "deviation_km": None,
    }


def _local_ranking(
    sims: np.ndarray, i: int, latlon: tuple[float, float], image_latlon: Sequence[Sequence[float]], m: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The m nearest images by a stable sort on distance, ranked by a stable argsort(-sim)."""
    lat, lon = latlon
    distances = [
        (haversine_km(lat, lon, float(image_latlon[j][0]), float(image_latlon[j][1])), j)
        for j in range(sims.shape[1])
    ]
    distances.sort(key=lambda x: x[0])
    closest = [j for _, j in distances[:m]]
    sim = sims[i, closest]
    order = np.argsort(-sim, kind="stable")
    return [closest[p] for p in order], sim, order


def cvg_metrics_reference(
    text_emb: ArrayLike,
    image_emb: ArrayLike,
    text_image: Sequence[int],
    text_latlon: Sequence[Sequence[float]],
    image_latlon: Sequence[Sequence[float]],
    *,
    subsets: Mapping[str, Sequence[bool]] | None = None,
    gallery_size: int | None = CVG_GALLERY_SIZE,
    ks: Sequence[int] = CVG_KS,
    radii_m: Sequence[int] = CVG_RADII_M,
    rerank_fn: RerankFn | None = None,
    rerank_depth: int = 5,
) -> dict[str, dict]:
    """A literal per-query loop of the official CVG-Text `cal_score`, kept as the ground truth for tests."""
    sims = _scores(text_emb, image_emb)  # (T, N)
    m = gallery_size or sims.shape[1]
    masks = {"overall": [True] * len(text_image), **(subsets or {})}
    totals = {
        name: {"count": 0, "dev": 0.0, "R": dict.fromkeys(ks, 0), "L": dict.fromkeys(radii_m, 0)}
        for name in masks
    }
    for i, true_j in enumerate(text_image):
        lat, lon = float(text_latlon[i][0]), float(text_latlon[i][1])
        matches, sim, order = _local_ranking(sims, i, (lat, lon), image_latlon, m)
        if rerank_fn is not None:
            depth = min(rerank_depth, len(matches))
            head = rerank_fn(i, np.array(matches[:depth]), sim[order[:depth]].copy())
            matches = [int(j) for j in head] + matches[depth:]
        if matches[0] == true_j:
            deviation = 0.0
        else:
            top = image_latlon[matches[0]]
            deviation = float(haversine_km(lat, lon, float(top[0]), float(top[1])))
        for name, mask in masks.items():
            if not mask[i]:
                continue
            acc = totals[name]
            acc["count"] += 1
            acc["dev"] += deviation
            for k in ks:
                acc["R"][k] += int(true_j in matches[:k])
            for r in radii_m:
                acc["L"][r] += int(deviation <= r / 1000)
    out: dict[str, dict] = {}
    for name, acc in totals.items():
        count = acc["count"]
        if count == 0:
            out[name] = _empty_cvg(ks, radii_m)
            continue
        out[name] = {f"R@{k}": (acc["R"][k] / count) * 100 for k in ks}
        out[name].update({f"L@{r}": (acc["L"][r] / count) * 100 for r in radii_m})
        out[name]["deviation_km"] = acc["dev"] / count
        out[name]["count"] = count
    return out


# ---------------------------------------------------------------------------------------------
# CVG-Text: the official code itself (math module, file names, zero counters for an empty subset)
# ---------------------------------------------------------------------------------------------


def official_haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The official `haversine` (math module, R = 6371 km)."""
    r = 6371
    dlat = math.radians(lat2 - lat1)
    dlon = math.radians(lon2 - lon1)
    a = (
        math.sin(dlat / 2) ** 2
        + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2)) * math.sin(dlon / 2) ** 2
    )
    return r * 2 * math.atan2(math.sqrt(a), math.sqrt(1 - a))


def official_extract_lat_lon(filename: str) -> tuple[float, float]:
    """The official `extract_lat_lon`: the "lat,lon" prefix of the file's base name."""
    match = re.match(r"([-+]?[0-9]*\.?[0-9]+),([-+]?[0-9]*\.?[0-9]+)", os.path.basename(filename))
    return float(match.group(1)), float(match.group(2))


def official_is_panorama(filename: str) -> bool:
    """The official `is_panorama`: more than two "_"-separated parts of the string it is given (a whole path)."""
    return len(filename.split("_")) > 2


OFFICIAL_COUNTERS = ("R@1", "R@5", "R@10", "L@50", "L@100", "L@150", "Deviation", "Count")


def _official_average(metrics: dict) -> dict:
    """The official `calculate_average`: an empty subset keeps its zero counters."""
    count = metrics["Count"]
    if count == 0:
        return metrics
    out = {k: (metrics[k] / count) * 100 for k in OFFICIAL_COUNTERS[:6]}
    return {**out, "Deviation": metrics["Deviation"] / count, "Count": count}


def official_cal_score(
    similarities: np.ndarray, image_paths: Sequence[str], text_paths: Sequence[str], m: int = 100
) -> dict[str, dict]:
    """The official `cal_score`, transcribed: similarities (N images, T texts), text i belongs to text_paths[i].

    Returns {"overall", "panorama", "single_view"} with the official keys. Two readings: `np.argsort(-sim)` is
    taken as stable (the official call's quicksort leaves tie order unspecified), and nothing is printed.
    """
    totals = {name: dict.fromkeys(OFFICIAL_COUNTERS, 0) for name in ("overall", "panorama", "single_view")}
    for i in range(len(text_paths)):
        original_lat, original_lon = official_extract_lat_lon(text_paths[i])
        is_pano = official_is_panorama(text_paths[i])
        distances = []
        for j, image_filename in enumerate(image_paths):
            lat, lon = official_extract_lat_lon(image_filename)
            distances.append((official_haversine(original_lat, original_lon, lat, lon), j))
        distances.sort(key=lambda x: x[0])
        closest_indices = [idx for _, idx in distances[:m]]
        sim = np.asarray(similarities)[closest_indices, i]
        sorted_indices = np.argsort(-sim, kind="stable")
        best_matches = [os.path.basename(image_paths[closest_indices[idx]]) for idx in sorted_indices]
        original_image_name = os.path.basename(text_paths[i])
        best_matches = list(dict.fromkeys(best_matches))
        deviation = 0
        if best_matches[0] != original_image_name:
            lat_match, lon_match = official_extract_lat_lon(image_paths[closest_indices[sorted_indices[0]]])
            deviation = official_haversine(original_lat, original_lon, lat_match, lon_match)
        for metrics in (totals["overall"], totals["panorama" if is_pano else "single_view"]):
            metrics["Count"] += 1
            metrics["Deviation"] += deviation
            metrics["L@50"] += int(deviation <= 0.05)
            metrics["L@100"] += int(deviation <= 0.1)
            metrics["L@150"] += int(deviation <= 0.15)
            metrics["R@1"] += int(best_matches[0] == original_image_name)
            metrics["R@5"] += int(original_image_name in best_matches[:5])
            metrics["R@10"] += int(original_image_name in best_matches[:10])
    return {name: _official_average(metrics) for name, metrics in totals.items()}


__all__ = [
    "OFFICIAL_COUNTERS",
    "cvg_metrics_reference",
    "geotext_metrics_reference",
    "official_cal_score",
    "official_extract_lat_lon",
    "official_haversine",
    "official_is_panorama",
]
