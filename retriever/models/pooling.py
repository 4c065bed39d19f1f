"""Registry of poolers that turn per-token hidden states into one embedding per sequence."""

from __future__ import annotations

from collections.abc import Callable

import torch

Pooler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last non-pad token of each row, wherever the padding is (left or right)."""
    # hidden: (B, T, H), mask: (B, T) with 1 on real tokens
    seq_len = mask.shape[1]
    last = seq_len - 1 - mask.flip(1).int().argmax(dim=1)  # (B,) index of the last 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over real tokens only: padding never enters the average."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)


POOLERS: dict[str, Pooler] = {"last": pool_last, "mean": pool_mean}


def get_pooler(name: str) -> Pooler:
    """Look a pooler up by name, listing the choices on a typo."""
    try:
        return POOLERS[name]
    except KeyError:
        raise ValueError(f"Unknown pooling {name!r}. Choose one of: {', '.join(POOLERS)}.") from None
