"""Contrastive losses and the GradCache step that makes a large batch fit on one device."""

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


def grad_cache_step(
    embed: Embed, query_chunks: Sequence[Any], tile_chunks: Sequence[Any], loss_fn: LossFn
) -> float:
    """Backward a contrastive loss over a batch that is embedded chunk by chunk (GradCache, Gao et al. 2021).

    Pass 1 embeds every chunk without a graph; the loss is backpropagated to the embeddings only; pass 2 re-embeds
    each chunk with a graph and pushes that chunk's slice of the embedding gradient through the model. Memory is
    that of one chunk, and the parameter gradients equal those of the unchunked loss.
    """

    def first_pass(chunks: Sequence[Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        states, embeddings = [], []
        for chunk in chunks:
            states.append(capture_rng())
            with torch.no_grad():
                embeddings.append(embed(chunk))
        return torch.cat(embeddings).detach().requires_grad_(), states

    queries, query_states = first_pass(query_chunks)  # (B, D)
    tiles, tile_states = first_pass(tile_chunks)  # (M, D)
    loss = loss_fn(queries, tiles)
    loss.backward()  # fills queries.grad, tiles.grad (and the temperature's grad)

    for chunks, states, cached in ((query_chunks, query_states, queries), (tile_chunks, tile_states, tiles)):
        offset = 0
        for chunk, state in zip(chunks, states):
            with replay_rng(state):
                embedding = embed(chunk)  # (b, D), with a graph this time
            grad = cached.grad[offset : offset + embedding.shape[0]]
            embedding.backward(grad)
            offset += embedding.shape[0]
    return float(loss.detach())


def plain_step(embed: Embed, query_batch: Any, tile_batch: Any, loss_fn: LossFn) -> float:
    """The unchunked reference: one forward of the whole batch, one backward."""
    loss = loss_fn(embed(query_batch), embed(tile_batch))
    loss.backward()
    return float(loss.detach())
