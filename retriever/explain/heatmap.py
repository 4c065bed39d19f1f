"""Relevance heatmaps (adapter on): gradient x input per image token, and occlusion against other descriptions."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from retriever.errors import RetrieverError
from retriever.models.backbones import get_attr_path
from retriever.models.images import ImageLike, open_image

GRID = 4  # cells per side of the occlusion map: the demo model reads a tile as a 4 x 4 grid of image tokens
BLANK_RGB = (242, 239, 233)  # the demo style's land colour: what a painted-over cell shows

if TYPE_CHECKING:
    from retriever.models.encoder import Retriever


@contextmanager
def _leaf_inputs_embeds(language_model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the language model's inputs_embeds become a leaf that requires grad, kept in the dict."""
    captured: dict[str, torch.Tensor] = {}

    def leaf_inputs(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RetrieverError("the language model was called without inputs_embeds")
        captured["embeds"] = embeds.detach().requires_grad_(True)  # (1, T, H)
        return args, {**kwargs, "inputs_embeds": captured["embeds"]}

    handle = language_model.register_forward_pre_hook(leaf_inputs, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _token_relevance(retriever: Retriever, query: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gradient x input of the cosine similarity, summed over the hidden size: (T,) per token of the tile."""
    language_model = get_attr_path(retriever.base_model, retriever.family.language_model_attr)
    query_emb = (
        retriever.encode_queries([query]).to(retriever.device).clone()
    )  # (1, D), out of inference mode
    was_training = retriever.model.training
    retriever.model.eval()
    try:
        with _leaf_inputs_embeds(language_model) as captured, torch.enable_grad():
            tile_emb = retriever.embed(batch)  # (1, D)
            similarity = (tile_emb * query_emb).sum()
            (grad,) = torch.autograd.grad(similarity, captured["embeds"])  # (1, T, H)
    finally:
        retriever.model.train(was_training)
    return (grad * captured["embeds"].detach()).float().sum(-1)[0]  # (T,)


def relevance_grid(retriever: Retriever, query: str, tile: ImageLike) -> np.ndarray:
    """Gradient x input of the query-tile cosine similarity at each image token: (gh, gw), signed.

    The image tokens are the visual features the language model receives; the family's `image_grid` places
    them on the tile as its vision encoder laid them out. Positive cells raised the match. The caller holds
    the model lock (Explainer.relevance_grid does): the hook sits on the shared language model.
    """
    family = retriever.family
    batch = retriever.process_tiles([tile])
    config = retriever.base_model.config
    relevance = _token_relevance(retriever, query, batch)  # (T,)
    on_image = batch["input_ids"][0].to(relevance.device) == int(config.image_token_id)  # (T,)
    gh, gw = family.image_grid(config, batch)
    if int(on_image.sum()) != gh * gw:
        raise RetrieverError(
            f"{int(on_image.sum())} image tokens do not fill the {gh}x{gw} grid of {family.name}; "
            "was the tile split into crops? (the family's processor_image_kwargs should prevent it)"
        )
    return relevance[on_image].reshape(gh, gw).detach().cpu().numpy().astype(np.float64)


def _heat_colours(heat: np.ndarray, alpha: float) -> np.ndarray:
    """A red -> yellow ramp whose opacity grows with the relevance: (H, W) in [0, 1] -> (H, W, 4) uint8."""
    rgba = np.empty((*heat.shape, 4), dtype=np.float64)
    rgba[..., 0] = 255.0
    rgba[..., 1] = 230.0 * heat
    rgba[..., 2] = 0.0
    rgba[..., 3] = 255.0 * alpha * heat
    return np.round(rgba).astype(np.uint8)


def overlay(tile: ImageLike, grid: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """The positive part of a (gh, gw) relevance grid, scaled to its maximum, upsampled and blended over the
    tile: an RGBA image of the tile's size."""
    grid = np.clip(grid, 0.0, None)  # (gh, gw)
    top = grid.max()
    grid = grid / top if top > 0 else grid
    thumb = open_image(tile).convert("RGBA")
    small = Image.fromarray(np.round(grid * 255).astype(np.uint8), mode="L")
    heat = np.asarray(small.resize(thumb.size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0  # (H, W)
    return Image.alpha_composite(thumb, Image.fromarray(_heat_colours(heat, alpha), mode="RGBA"))


# -- occlusion, compared with other descriptions ---------------------------------------------------------
# Why the comparison: the model reads the image tokens row by row and its embedding leans on the first
# rows for any description. On the demo, painting over a top-row cell costs 2.6x the similarity a
# bottom-row cell does, for every description; the gradient x input map has the same tilt. The plain drop
# put the hot spot in the top row in 16 of 32 query/tile pairs (8 by chance). Dividing each cell's extra
# drop by the others' typical drop at that same cell cancels the position weight: 4 of 32, and the mean
# magnitude is flat across rows (16 human dev descriptions x their top 2 tiles).


def occluded(image: Image.Image, grid: int = GRID) -> list[Image.Image]:
    """The tile, then one copy per cell (row by row) with that cell painted blank."""
    width, height = image.size
    out = [image]
    for i in range(grid):
        for j in range(grid):
            copy = image.copy()
            copy.paste(
                BLANK_RGB,
                (j * width // grid, i * height // grid, (j + 1) * width // grid, (i + 1) * height // grid),
            )
            out.append(copy)
    return out


def contrast_grid(effects: np.ndarray, grid: int = GRID) -> np.ndarray:
    """effects (cells, 1 + R): the similarity drop per cell for the query (column 0) and R other descriptions.

    Returns (grid, grid): the query's drop beyond the others' mean drop, in units of the others' typical
    (mean absolute) drop at that cell; a position weight the model gives a cell for any description cancels.
    A tile whose cells change nothing (a blank one) gives zeros.
    """
    effects = np.asarray(effects, dtype=np.float64)
    query, others = effects[:, 0], effects[:, 1:]
    scale = max(float(np.abs(effects).max()), 1e-12)
    typical = np.abs(others).mean(axis=1) + 0.01 * scale  # a small floor: no division by nothing
    return ((query - others.mean(axis=1)) / typical).reshape(grid, grid)


def occlusion_relevance(
    encode_tiles: Callable[[Sequence[Image.Image]], Any],
    query_embeddings: Any,
    image_path: str,
    grid: int = GRID,
) -> np.ndarray:
    """(grid, grid) contrast for the first of query_embeddings (Q, D) against the rest, by occlusion."""
    with Image.open(image_path) as image:
        variants = occluded(image.convert("RGB"), grid)
    tiles = np.asarray(encode_tiles(variants), dtype=np.float64)  # (1 + cells, D)
    queries = np.asarray(query_embeddings, dtype=np.float64)  # (1 + R, D)
    similarity = tiles @ queries.T  # (1 + cells, 1 + R)
    return contrast_grid(similarity[0][None, :] - similarity[1:], grid)
