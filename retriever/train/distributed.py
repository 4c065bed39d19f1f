"""Data-parallel plumbing for the trainer: the process group from torchrun's env, batch shards, gathers, grad sums."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 validates and writes checkpoints while the others wait at a barrier: give it time.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / accelerate launch set them; (0, 1, 0) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def backend_for(device: str | None) -> str:
    """nccl when the processes train on CUDA, gloo on the CPU."""
    on_cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    return "gloo" if on_cpu else "nccl"


def rank_device(device: str | None, local_rank: int) -> str | None:
    """The device of this rank: CUDA runs get cuda:LOCAL_RANK (one GPU per process); anything else is kept."""
    if backend_for(device) == "nccl" and (device is None or device == "cuda"):
        return f"cuda:{local_rank}"
    return device


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; every collective is a no-op when size == 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- sharding ---------------------------------------------------------------------------------------------
    def bounds(self, n: int) -> list[int]:
        """Row boundaries of n rows split into `size` contiguous shards differing by at most one row."""
        return [n * r // self.size for r in range(self.size + 1)]

    def sizes(self, n: int) -> list[int]:
        b = self.bounds(n)
        return [b[r + 1] - b[r] for r in range(self.size)]

    def shard(self, n: int) -> slice:
        """This rank's rows of n: concatenating the shards of ranks 0, 1, ... gives rows 0..n-1 in order."""
        b = self.bounds(n)
        return slice(b[self.rank], b[self.rank + 1])

    # -- collectives ------------------------------------------------------------------------------------------
    def gather_rows(self, local: torch.Tensor, sizes: Sequence[int], keep_grad: bool = False) -> torch.Tensor:
        """Every rank's rows, in rank order: (sizes[rank], D) -> (sum(sizes), D).

        all_gather carries no gradient; with keep_grad this rank's slice is `local` itself, so the gradient of a
        loss over the gathered rows flows back into the rank that produced each row (each rank backpropagates
        its own rows, and the parameter gradients are summed across ranks afterwards).
        """
        if not self.enabled:
            return local
        biggest = max(sizes)
        padded = local.new_zeros((biggest, *local.shape[1:]))  # (max b, D): all_gather wants equal shapes
        padded[: local.shape[0]] = local.detach()
        buckets = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(buckets, padded)
        parts = [bucket[:n] for bucket, n in zip(buckets, sizes, strict=True)]
        if keep_grad:
            parts[self.rank] = local
        return torch.cat(parts)  # (sum(sizes), D)

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the parameters' gradients over ranks, one flat all_reduce per dtype (missing grads count as 0).

        Each rank's gradient is the global loss backpropagated through its own rows only, so the sum (not the
        mean) is the gradient of the single-process step on the whole global batch.
        """
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])  # (sum numel,)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Make every replica start from rank 0's weights."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's object, as a list on rank 0 (None elsewhere)."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (downloads, drawing toy images), then the others, from its cache."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


def current_world() -> World:
    """The World of an initialised process group, or the single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(
        rank=rank, size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", str(rank)))
    )


def init_world(device: str | None = None) -> World:
    """Join the process group torchrun / accelerate launch describe (env://), once; a plain process stays alone."""
    if dist.is_available() and dist.is_initialized():
        return current_world()
    rank, world, local_rank = env_world()
    if world <= 1:
        return World()
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return World(rank=rank, size=world, local_rank=local_rank)


def shutdown_world() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def joined_world(device: str | None = None) -> Iterator[World]:
    """The process group for the block: joined from the env if need be, and left after only if joined here."""
    joined_here = dist.is_available() and not dist.is_initialized()
    world = init_world(device)
    try:
        yield world
    finally:
        if joined_here:
            shutdown_world()
