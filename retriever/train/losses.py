"""Contrastive losses and the GradCache step that makes a large batch fit on one device (or a shard per rank)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


def dense_codes(values: Sequence[str]) -> list[int]:
    """Each distinct value -> 0, 1, 2, ... in order of first appearance."""
    ids: dict[str, int] = {}
    return [ids.setdefault(v, len(ids)) for v in values]


def group_mask(query_groups: Sequence[str], tile_groups: Sequence[str]) -> torch.Tensor:
    """(B, M) True where tile j shows the same place as query i but is not its own positive (j != i)."""
    codes = torch.tensor(dense_codes([*query_groups, *tile_groups]))
    q, t = codes[: len(query_groups)], codes[len(query_groups) :]
    same = q[:, None] == t[None, :]  # (B, M)
    same[torch.arange(len(q)), torch.arange(len(q))] = False
    return same


def _t2i(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _symmetric(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    n = logits.shape[0]
    # image->text uses only the positive tiles as queries: hard negatives have no caption in the batch
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :n].T, targets))


LOSS_DIRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "t2i": _t2i,
    "symmetric": _symmetric,
}


def info_nce(
    queries: torch.Tensor,
    tiles: torch.Tensor,
    temperature: torch.Tensor | float,
    direction: str = "t2i",
    false_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over in-batch (and hard) negatives; query i's positive is tile i."""
    # queries: (B, D), tiles: (M, D) with M >= B; rows are unit vectors
    logits = queries @ tiles.T / temperature  # (B, M)
    if false_negatives is not None:  # another caption's tile of the same building is not a negative
        logits = logits.masked_fill(false_negatives.to(logits.device), float("-inf"))
    targets = torch.arange(queries.shape[0], device=queries.device)
    return LOSS_DIRECTIONS[direction](logits, targets)


class LearnableTemperature(torch.nn.Module):
    """A temperature kept in log space and clamped, as in CLIP."""

    def __init__(self, initial: float, learnable: bool, minimum: float = 0.005, maximum: float = 1.0) -> None:
        super().__init__()
        self.log_value = torch.nn.Parameter(torch.tensor(float(initial)).log(), requires_grad=learnable)
        self.minimum, self.maximum = minimum, maximum

    def forward(self) -> torch.Tensor:
        return self.log_value.exp().clamp(self.minimum, self.maximum)


@contextmanager
def replay_rng(state: dict[str, Any] | None):
    """Run the block with a saved RNG state, so a re-run draws the same dropout masks."""
    if state is None:
        yield
        return
    saved = capture_rng()
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    try:
        yield
    finally:
        torch.set_rng_state(saved["cpu"])
        if saved.get("cuda") is not None:
            torch.cuda.set_rng_state_all(saved["cuda"])


def capture_rng() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


Embed = Callable[[Any], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# This rank's rows (b, D) -> every rank's rows (B, D) and the slice of them that is this rank's
# (retriever.train.distributed.World.gather_rows); gradient flows back through the rank's own slice.
Gather = Callable[[torch.Tensor, bool], tuple[torch.Tensor, slice]]


def grad_cache_step(
    embed: Embed,
    query_chunks: Sequence[Any],
    tile_chunks: Sequence[Any],
    loss_fn: LossFn,
    gather_queries: Gather | None = None,
    gather_tiles: Gather | None = None,
) -> float:
    """Backward a contrastive loss over a batch that is embedded chunk by chunk (GradCache, Gao et al. 2021).

    Pass 1 embeds every chunk without a graph; the loss is backpropagated to the embeddings only; pass 2 re-embeds
    each chunk with a graph and pushes that chunk's slice of the embedding gradient through the model. Memory is
    that of one chunk, and the parameter gradients equal those of the unchunked loss.

    Across ranks (gather_queries / gather_tiles given) the chunks are this rank's shard: the pass-1 embeddings of
    every rank are gathered, the loss is over the global batch, and each rank keeps the gradient of its own rows.
    """

    def first_pass(
        chunks: Sequence[Any], gather: Gather | None
    ) -> tuple[torch.Tensor, slice, list[dict[str, Any]]]:
        states, embeddings = [], []
        for chunk in chunks:
            states.append(capture_rng())
            with torch.no_grad():
                embeddings.append(embed(chunk))
        local = torch.cat(embeddings).detach()  # (b, D)
        full, own = gather(local, False) if gather is not None else (local, slice(None))  # (B, D)
        return full.detach().requires_grad_(), own, states

    queries, query_own, query_states = first_pass(query_chunks, gather_queries)  # (B, D)
    tiles, tile_own, tile_states = first_pass(tile_chunks, gather_tiles)  # (M, D)
    loss = loss_fn(queries, tiles)
    loss.backward()  # fills queries.grad, tiles.grad (and the temperature's grad)

    for chunks, states, cached in (
        (query_chunks, query_states, queries.grad[query_own]),
        (tile_chunks, tile_states, tiles.grad[tile_own]),
    ):
        offset = 0
        for chunk, state in zip(chunks, states):
            with replay_rng(state):
                embedding = embed(chunk)  # (b, D), with a graph this time
            grad = cached[offset : offset + embedding.shape[0]]
            embedding.backward(grad)
            offset += embedding.shape[0]
    return float(loss.detach())


def plain_step(
    embed: Embed,
    query_batch: Any,
    tile_batch: Any,
    loss_fn: LossFn,
    gather_queries: Gather | None = None,
    gather_tiles: Gather | None = None,
) -> float:
    """The unchunked reference: one forward of the whole batch, one backward (across ranks: of this rank's shard,
    gathered with a differentiable all-gather)."""
    queries, tiles = embed(query_batch), embed(tile_batch)  # (b, D), (m, D)
    if gather_queries is not None:
        queries = gather_queries(queries, True)[0]  # (B, D)
    if gather_tiles is not None:
        tiles = gather_tiles(tiles, True)[0]  # (M, D)
    loss = loss_fn(queries, tiles)
    loss.backward()
    return float(loss.detach())
