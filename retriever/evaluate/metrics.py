"""Retrieval metrics of the GeoText-1652 and CVG-Text protocols: tie-exact, streamed and memory-bounded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever.protocols import RerankFn  # rerank_fn(query_idx, (k,) candidates, (k,) scores) -> re-ordered

EARTH_RADIUS_KM = 6371.0  # the constant of the official CVG-Text scorer
CHUNK_BYTES = 256 << 20  # default size of one streamed block of the score matrix
GEOTEXT_KS = (1, 5, 10)
CVG_KS = (1, 5, 10)
CVG_RADII_M = (50, 100, 150)
CVG_GALLERY_SIZE = 100

Ties = Literal["high", "low"]
ArrayLike = np.ndarray | torch.Tensor


class TopK(NamedTuple):
    """The best k entries of each row, best first."""

    scores: torch.Tensor  # (R, k)
    indices: torch.Tensor  # (R, k) int64


# ---------------------------------------------------------------------------------------------
# Tie-exact top-k
# ---------------------------------------------------------------------------------------------


def _lexsort(values: torch.Tensor, indices: torch.Tensor, largest: bool, ties: Ties) -> torch.Tensor:
    """Column order that sorts each row by value, then by index: two stable sorts, secondary key first."""
    by_index = torch.argsort(indices, dim=1, descending=ties == "high", stable=True)  # (R, k)
    by_value = torch.argsort(values.gather(1, by_index), dim=1, descending=largest, stable=True)
    return by_index.gather(1, by_value)


def topk_ordered(
    values: torch.Tensor, k: int, *, largest: bool = True, ties: Ties = "high", check_nan: bool = True
) -> TopK:
    """The first k entries of each row under a strict total order: by value, then by index.

    ties="high": among equal values the larger index comes first. This is what the stable
    descending sort `np.argsort(v, kind="stable")[::-1]` gives (the GeoText-1652 rule).
    ties="low": among equal values the smaller index comes first, as Python's stable `sorted`
    and `np.argsort(-v, kind="stable")` do (the CVG-Text rule).
    `torch.topk` alone leaves the order of ties unspecified: the k selected are re-sorted by
    (value, index), and rows whose (k+1)-th value equals the k-th are re-selected exactly with
    an integer key. check_nan=False skips the NaN scan when the caller knows the input is finite.
    """
    n_rows, n = values.shape
    k = min(k, n)
    if k == 0 or n_rows == 0:
        return TopK(values.new_empty((n_rows, k)), torch.empty((n_rows, k), dtype=torch.long))
    if check_nan and torch.isnan(values).any():
        raise ValueError("scores contain NaN: the ranking is undefined (check the embeddings)")
    if 2 * k >= n:  # most of the row is wanted: one stable sort beats select-then-sort
        flip = ties == "high"  # reversed columns make "stable" keep the higher index first
        order = torch.argsort(values.flip(1) if flip else values, dim=1, descending=largest, stable=True)
        order = n - 1 - order[:, :k] if flip else order[:, :k]
        return TopK(values.gather(1, order), order)
    top = torch.topk(values, k + 1, dim=1, largest=largest, sorted=True)  # one extra, to see boundary ties
    sel = top.indices[:, :k]
    kth = top.values[:, k - 1 : k]  # (R, 1)
    tied_rows = (top.values[:, k] == kth[:, 0]).nonzero().squeeze(1)  # topk's choice among ties matters here
    if tied_rows.numel():
        v, t = values[tied_rows], kth[tied_rows]  # (S, N), (S, 1)
        pos = torch.arange(n)
        tie_key = pos if ties == "high" else n - 1 - pos  # which tied index wins
        strictly_better = v > t if largest else v < t
        key = torch.where(strictly_better, tie_key + n, torch.where(v == t, tie_key, -1))  # (S, N)
        sel = sel.clone()
        sel[tied_rows] = torch.topk(key, k, dim=1).indices
    sel_values = values.gather(1, sel)  # (R, k)
    order = _lexsort(sel_values, sel, largest, ties)
    return TopK(sel_values.gather(1, order), sel.gather(1, order))


def _merge_topk(a: TopK, b: TopK, k: int, *, largest: bool = True, ties: Ties = "high") -> TopK:
    """Top-k of the union of two disjoint candidate lists per row (same strict order as topk_ordered)."""
    values = torch.cat([a.scores, b.scores], dim=1)  # (R, ka + kb)
    indices = torch.cat([a.indices, b.indices], dim=1)
    order = _lexsort(values, indices, largest, ties)[:, :k]
    return TopK(values.gather(1, order), indices.gather(1, order))


# ---------------------------------------------------------------------------------------------
# Streaming over the score matrix
# ---------------------------------------------------------------------------------------------


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    """A float32 CPU tensor; copies numpy input (it may be a read-only memmap)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def _require_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} embeddings contain NaN or inf: the ranking is undefined")


def default_chunk_rows(n_cols: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of a float32 score block of about chunk_bytes."""
    return max(1, chunk_bytes // (4 * max(1, n_cols)))


def _show(progress: bool | None, n_steps: int) -> bool:
    return bool(progress) if progress is not None else n_steps > 4


def stream_topk(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    *,
    columns: bool = True,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> tuple[TopK, TopK | None]:
    """Top-k of every row, and of every column, of queries @ gallery.T, never holding the whole matrix.

    Rows are scored chunk_size queries at a time. The row top-k (each query ranks the gallery)
    is final per chunk; the column top-k (each gallery item ranks the queries) is merged across
    chunks. Both come from the same score block, so both directions see identical floats.
    Ties are broken as in `topk_ordered(ties="high")`. Peak extra memory is about three
    (chunk_size, G) float32 blocks.
    """
    g = _as_float_tensor(gallery)  # (G, D)
    _require_finite(g, "gallery")
    n_queries, n_gallery = len(queries), g.shape[0]
    chunk = chunk_size or default_chunk_rows(n_gallery)
    k_rows, k_cols = min(k, n_gallery), min(k, n_queries)
    row_scores = torch.empty((n_queries, k_rows))  # (Q, k)
    row_idx = torch.empty((n_queries, k_rows), dtype=torch.long)
    cols: TopK | None = None
    starts = range(0, n_queries, chunk)
    for start in tqdm(starts, desc="scoring", unit="chunk", disable=not _show(progress, len(starts))):
        stop = min(start + chunk, n_queries)
        q = _as_float_tensor(queries[start:stop])  # (c, D)
        _require_finite(q, "query")
        scores = q @ g.T  # (c, G), finite because both factors are
        rows = topk_ordered(scores, k_rows, check_nan=False)
        row_scores[start:stop], row_idx[start:stop] = rows.scores, rows.indices
        if columns:
            block = topk_ordered(
                scores.T, k_cols, check_nan=False
            )  # (G, min(k, c)), chunk-local query indices
            block = TopK(block.scores, block.indices + start)
            cols = block if cols is None else _merge_topk(cols, block, k_cols)
        del scores
    return TopK(row_scores, row_idx), cols


def apply_rerank(
    ranked: TopK, rerank_fn: RerankFn, depth: int, query_ids: Sequence[int] | None = None
) -> TopK:
    """Let rerank_fn re-order the first `depth` candidates of every row; deeper ranks stay put."""
    indices = ranked.indices.clone()
    depth = min(depth, indices.shape[1])
    for row in range(indices.shape[0]):
        candidates = indices[row, :depth].numpy().copy()
        scores = ranked.scores[row, :depth].numpy().copy()
        query = row if query_ids is None else int(query_ids[row])
        new = np.asarray(rerank_fn(query, candidates, scores), dtype=np.int64)
        if new.shape != candidates.shape or not np.array_equal(np.sort(new), np.sort(candidates)):
            raise ValueError(
                f"rerank_fn must return a permutation of the {depth} candidate indices it was given; "
                f"for query {query} it got {candidates.tolist()} and returned {new.tolist()}"
            )
        indices[row, :depth] = torch.from_numpy(np.ascontiguousarray(new))
    return TopK(ranked.scores, indices)


def _first_true(hits: np.ndarray) -> np.ndarray:
    """0-based column of the first True in each row of hits (R, n); n for a row without one."""
    return np.where(hits.any(1), hits.argmax(1), hits.shape[1])


def first_relevant(order: ArrayLike, relevant: ArrayLike) -> np.ndarray:
    """0-based position of the first relevant column in each row of `order` (Q, n); n when there is none.

    `relevant` (Q, G) marks the relevant gallery columns of each query; `order` holds gallery columns.
    This is the one definition of "first relevant rank": every R@k in the project is computed from it.
    """
    order = np.asarray(order)
    relevant = np.asarray(relevant, dtype=bool)
    return _first_true(np.take_along_axis(relevant, order, axis=1))  # (Q, n) -> (Q,)


def recall_at_k(first: ArrayLike, k: int) -> float:
    """Share (0..1) of queries whose first relevant item is ranked within the top k (NaN for no queries)."""
    first = np.asarray(first)
    return float((first < k).mean()) if len(first) else float("nan")


def first_hit_rank(ranked: torch.Tensor, query_label: ArrayLike, gallery_label: ArrayLike) -> np.ndarray:
    """0-based position of the first relevant item in each row of ranked (R, k); k when none is relevant."""
    hits = np.asarray(gallery_label)[np.asarray(ranked)] == np.asarray(query_label)[:, None]  # (R, k)
    return _first_true(hits)


# ---------------------------------------------------------------------------------------------
# GeoText-1652
# ---------------------------------------------------------------------------------------------


def recall_percent(ranks: np.ndarray, k: int) -> float:
    """Official formula: 100 * |{rank < k}| / n (in that order, so the floats equal the official code's)."""
    return 100.0 * int((np.asarray(ranks) < k).sum()) / len(ranks) if len(ranks) else float("nan")


def geotext_summary(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray, ks: Sequence[int] = GEOTEXT_KS) -> dict:
    """R@k per direction, their means and the overall mean, in percent (official arithmetic)."""
    out: dict[str, float] = {}
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        values = [recall_percent(ranks, k) for k in ks]
        out.update({f"{direction}_r{k}": v for k, v in zip(ks, values, strict=True)})
        out[f"{direction}_mean"] = sum(values) / len(values)
    out["mean"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


# Official itm_eval keys -> ours. Its `img_*` is text->image, its `txt_*` image->text.
OFFICIAL_GEOTEXT_KEYS = {
    "img_r1": "t2i_r1",
    "img_r5": "t2i_r5",
    "img_r10": "t2i_r10",
    "img_r_mean": "t2i_mean",
    "txt_r1": "i2t_r1",
    "txt_r5": "i2t_r5",
    "txt_r10": "i2t_r10",
    "txt_r_mean": "i2t_mean",
    "r_mean": "mean",
}


def official_geotext_keys(metrics: Mapping[str, float]) -> dict[str, float]:
    """The same numbers under the key names of the official `itm_eval`."""
    return {official: metrics[ours] for official, ours in OFFICIAL_GEOTEXT_KEYS.items() if ours in metrics}


def geotext_metrics(
    text_emb: ArrayLike,
    image_emb: ArrayLike,
    text_image: ArrayLike,
    image_label: ArrayLike,
    *,
    ks: Sequence[int] = GEOTEXT_KS,
    chunk_size: int | None = None,
    rerank_fn: RerankFn | None = None,
    rerank_depth: int = 5,
    progress: bool | None = None,
) -> dict[str, float]:
    """Building-level R@k of GeoText-1652 in both directions, from one streamed pass over texts x images.

    text_image (T,) is each text's image; image_label (I,) its building. A text->image query
    hits when any of its top-k images has the text's building; an image->text query when any
    of its top-k texts does. This equals the official "rank of the first correct item < k".
    rerank_fn, if given, re-orders the top `rerank_depth` images of every text query.
    """
    image_label = np.asarray(image_label)
    text_label = image_label[np.asarray(text_image)]  # (T,)
    keep = max(max(ks), rerank_depth if rerank_fn else 0)
    t2i, i2t = stream_topk(text_emb, image_emb, keep, chunk_size=chunk_size, progress=progress)
    assert i2t is not None
    if rerank_fn is not None:
        t2i = apply_rerank(t2i, rerank_fn, rerank_depth)
    return geotext_summary(
        first_hit_rank(t2i.indices, text_label, image_label),
        first_hit_rank(i2t.indices, image_label, text_label),
        ks,
    )


# ---------------------------------------------------------------------------------------------
# CVG-Text
# ---------------------------------------------------------------------------------------------


def haversine_km(
    lat1: ArrayLike | float, lon1: ArrayLike | float, lat2: ArrayLike | float, lon2: ArrayLike | float
):
    """Great-circle distance in km: the official CVG-Text formula, on numpy scalars or broadcast arrays.

    Squares are written as products: Python's `x ** 2` goes through libm `pow`, numpy's does not,
    and the two differ in the last bit for ~0.1 % of inputs. Written this way the scalar and the
    array paths give bit-identical results (the official `math` version agrees within 1 ulp).
    """
    dlat = np.radians(np.subtract(lat2, lat1))
    dlon = np.radians(np.subtract(lon2, lon1))
    s_lat, s_lon = np.sin(dlat / 2), np.sin(dlon / 2)
    a = s_lat * s_lat + np.cos(np.radians(lat1)) * np.cos(np.radians(lat2)) * (s_lon * s_lon)
    return EARTH_RADIUS_KM * (2 * np.arctan2(np.sqrt(a), np.sqrt(1 - a)))


def unit_vectors(latlon: np.ndarray) -> np.ndarray:
    """(N, 2) degrees -> (N, 3) points on the unit sphere."""
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.column_stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


NEAREST_SLACK = 16  # extra candidates per row beyond m, so near-ties at the cut rarely need the wide path


def _order_by_distance(
    query_latlon: np.ndarray, gallery_latlon: np.ndarray, pick: np.ndarray, keep: np.ndarray, m: int
) -> np.ndarray:
    """The m of the picked gallery indices (b, W) nearest each query, by (haversine_km, index).

    pick must ascend along each row: a stable sort on distance then breaks ties by index. Rows
    without ties among their first m + 1 distances take a faster unstable sort (same result).
    """
    lat, lon = gallery_latlon[pick, 0], gallery_latlon[pick, 1]  # (b, W)
    dist = np.where(keep, haversine_km(query_latlon[:, :1], query_latlon[:, 1:], lat, lon), np.inf)  # (b, W)
    order = np.argsort(dist, axis=1)
    row = np.arange(len(pick))[:, None]
    head = dist[row, order[:, : m + 1]]
    tied = ((head[:, 1:] == head[:, :-1]) & np.isfinite(head[:, 1:])).any(1)
    if tied.any():
        order[tied] = np.argsort(dist[tied], axis=1, kind="stable")
    return pick[row, order[:, :m]]


def nearest_by_haversine(
    query_latlon: np.ndarray, gallery_latlon: np.ndarray, m: int, gallery_unit_t: np.ndarray | None = None
) -> np.ndarray:
    """Indices (b, m) of the m gallery points nearest each query, ordered by (haversine_km, index).

    Identical to sorting every query-gallery distance, but haversine_km runs only on candidates.
    The cosine of the central angle, one (b, 3) @ (3, N) product with error ~1e-15, ranks the
    gallery cheaply; every point whose haversine term a = (1 - cos) / 2 lies within a margin
    (1e-9 relative + 1e-12) of the m-th best is a candidate. The margin is far above the
    estimate's error, so no point that could be among the m nearest is lost, and the final
    order comes from haversine_km itself.
    """
    query_latlon, gallery_latlon = np.asarray(query_latlon), np.asarray(gallery_latlon)
    n, b = len(gallery_latlon), len(query_latlon)
    m = min(m, n)
    g_t = (
        gallery_unit_t if gallery_unit_t is not None else np.ascontiguousarray(unit_vectors(gallery_latlon).T)
    )
    cos_c = unit_vectors(query_latlon) @ g_t  # (b, N), larger is nearer
    width = min(n, m + NEAREST_SLACK)
    pick = np.argpartition(cos_c, n - width, axis=1)[:, n - width :]  # (b, W) the W nearest by the estimate
    picked = cos_c[np.arange(b)[:, None], pick]  # (b, W)
    kth = np.partition(picked, width - m, axis=1)[:, width - m : width - m + 1]  # (b, 1) m-th largest cosine
    floor = kth - 2 * ((1 - kth) / 2 * 1e-9 + 1e-12)  # the margin on a, in cosine units
    # Every picked point a candidate and points left out: candidates may lie beyond the picked ones.
    wide = (picked.min(1) >= floor[:, 0]) & (width < n)
    pick = np.sort(pick, axis=1)  # ascending index per row
    keep = cos_c[np.arange(b)[:, None], pick] >= floor  # (b, W)
    if not wide.any():  # the usual case: no row copies
        return _order_by_distance(query_latlon, gallery_latlon, pick, keep, m)
    out = np.empty((b, m), dtype=np.int64)
    narrow = ~wide
    if narrow.any():
        out[narrow] = _order_by_distance(query_latlon[narrow], gallery_latlon, pick[narrow], keep[narrow], m)
    for row in np.flatnonzero(wide):  # rare: more than NEAREST_SLACK points tie with the m-th
        cand = np.flatnonzero(cos_c[row] >= floor[row])[None, :]  # (1, C), ascending
        one = query_latlon[row : row + 1]
        out[row] = _order_by_distance(one, gallery_latlon, cand, np.ones(cand.shape, dtype=bool), m)
    return out


def _summarise_cvg(
    ranks: np.ndarray, deviation_km: np.ndarray, mask: np.ndarray, ks: Sequence[int], radii_m: Sequence[int]
) -> dict:
    """One subset's percentages and mean deviation, with the official arithmetic."""
    count = int(mask.sum())
    if count == 0:
        return {
            "count": 0,
            **{f"R@{k}": None for k in ks},
            **{f"L@{r}": None for r in radii_m},
            "deviation_km": None,
        }
    r, dev = ranks[mask], deviation_km[mask]
    out: dict = {f"R@{k}": (int((r < k).sum()) / count) * 100 for k in ks}
    # The official check is `deviation <= 0.05` in km; 50 / 1000 is that same double.
    out.update({f"L@{m}": (int((dev <= m / 1000).sum()) / count) * 100 for m in radii_m})
    # Sequential sum (add.accumulate), like the official running total, so the bits agree.
    out["deviation_km"] = float(np.add.accumulate(dev)[-1]) / count
    out["count"] = count
    return out


def cvg_metrics(
    text_emb: ArrayLike,
    image_emb: ArrayLike,
    text_image: ArrayLike,
    text_latlon: ArrayLike,
    image_latlon: ArrayLike,
    *,
    subsets: Mapping[str, np.ndarray] | None = None,
    gallery_size: int | None = CVG_GALLERY_SIZE,
    ks: Sequence[int] = CVG_KS,
    radii_m: Sequence[int] = CVG_RADII_M,
    batch_size: int | None = None,
    rerank_fn: RerankFn | None = None,
    rerank_depth: int = 5,
    progress: bool | None = None,
) -> dict[str, dict]:
    """CVG-Text metrics: each text ranks only the `gallery_size` images nearest its true location.

    The local gallery is the m nearest images by haversine distance (ties: lower image index
    first, as the official stable `list.sort`). Within it images are ranked by score (ties:
    the nearer gallery position first, a stable `argsort(-sim)`). R@k: the true image is in
    the top k. L@r: the top-1 image lies within r metres of the text's location. Deviation:
    the top-1 distance in km, 0 when the top-1 is the true image. gallery_size=None ranks the
    whole gallery. subsets maps a name to a (T,) bool mask; "overall" is always reported.
    """
    t = _as_float_tensor(text_emb)  # (T, D)
    g = _as_float_tensor(image_emb)  # (N, D)
    truth = np.asarray(text_image, dtype=np.int64)  # (T,)
    q_ll = np.asarray(text_latlon, dtype=np.float64)  # (T, 2)
    g_ll = np.asarray(image_latlon, dtype=np.float64)  # (N, 2)
    n_texts, n_images = t.shape[0], g.shape[0]
    m = min(gallery_size or n_images, n_images)
    g_unit_t = np.ascontiguousarray(unit_vectors(g_ll).T)  # (3, N)
    keep = min(max(max(ks), rerank_depth if rerank_fn else 0), m)
    ranks = np.empty(n_texts, dtype=np.int64)
    top1 = np.empty(n_texts, dtype=np.int64)
    batch = batch_size or max(64, min(1024, (1 << 19) // max(1, n_images)))  # ~0.5M pairs per batch
    starts = range(0, n_texts, batch)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not _show(progress, len(starts))):
        stop = min(start + batch, n_texts)
        local = torch.from_numpy(nearest_by_haversine(q_ll[start:stop], g_ll, m, g_unit_t))  # (b, m)
        scores = (t[start:stop] @ g.T).gather(1, local)  # (b, m)
        best = topk_ordered(scores, keep, largest=True, ties="low")  # positions within the local gallery
        ranked = TopK(best.scores, local.gather(1, best.indices))  # (b, keep) global image indices
        if rerank_fn is not None:
            ranked = apply_rerank(ranked, rerank_fn, rerank_depth, query_ids=range(start, stop))
        ranks[start:stop] = first_hit_rank(ranked.indices, truth[start:stop], np.arange(n_images))
        top1[start:stop] = ranked.indices[:, 0].numpy()
    top1_km = haversine_km(q_ll[:, 0], q_ll[:, 1], g_ll[top1, 0], g_ll[top1, 1])  # (T,)
    deviation = np.where(top1 == truth, 0.0, top1_km)
    masks = {"overall": np.ones(n_texts, dtype=bool), **(subsets or {})}
    return {
        name: _summarise_cvg(ranks, deviation, np.asarray(mask), ks, radii_m) for name, mask in masks.items()
    }


__all__ = [
    "EARTH_RADIUS_KM",
    "OFFICIAL_GEOTEXT_KEYS",
    "RerankFn",
    "TopK",
    "apply_rerank",
    "cvg_metrics",
    "default_chunk_rows",
    "first_hit_rank",
    "first_relevant",
    "geotext_metrics",
    "geotext_summary",
    "haversine_km",
    "nearest_by_haversine",
    "official_geotext_keys",
    "recall_at_k",
    "recall_percent",
    "stream_topk",
    "topk_ordered",
]
