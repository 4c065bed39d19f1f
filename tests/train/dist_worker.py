"""One rank of the distributed tests: `torchrun ... -m tests.train.dist_worker SPEC.json` runs the spec's jobs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from retriever.train import TrainConfig, Trainer
from retriever.train.distributed import joined_world
from retriever.train.toy import TRAIN_TEMPLATES, make_toy_pairs

CRASH_EXIT = 137  # what a SIGKILL looks like to the launcher


def adapter_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.retriever.model.named_parameters() if p.requires_grad}


def record_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The gradients each optimizer step sees (after the cross-rank sum), by parameter name, temperature included."""
    seen: list[dict[str, torch.Tensor]] = []
    named = [(n, p) for n, p in trainer.retriever.model.named_parameters() if p.requires_grad]
    named.append(("temperature", trainer.temperature.log_value))

    def record(*_: Any) -> None:
        seen.append({n: p.grad.clone() for n, p in named if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(record)
    return seen


def crash_after_checkpoint(trainer: Trainer, step: int) -> None:
    """Die like a killed process (no cleanup, no final save) right after the checkpoint of `step`."""
    save = trainer.save_checkpoint

    def save_then_die(folder: Path) -> None:
        save(folder)
        if trainer.state.step == step:
            sys.stdout.flush()
            os._exit(CRASH_EXIT)

    trainer.save_checkpoint = save_then_die  # type: ignore[method-assign]


def run_job(job: dict[str, Any], results: Path, rank: int) -> None:
    pairs = make_toy_pairs(job["toy"], n_colours=job.get("n_colours", 6))
    val = make_toy_pairs(job["toy"], templates=TRAIN_TEMPLATES[:1], n_colours=2) if job.get("val") else None
    trainer = Trainer(TrainConfig(**job["config"]), train_pairs=pairs, val_pairs=val)
    if job.get("crash_after"):
        crash_after_checkpoint(trainer, job["crash_after"])
    grads = record_grads(trainer)
    if job["mode"] == "steps":
        losses = [trainer.step() for _ in range(job["steps"])]
    else:
        trainer.fit(resume=job.get("resume", False), progress=False)
        losses = [h["loss"] for h in trainer.state.history]
    result = {
        "losses": losses,
        "grads": grads,
        "weights": adapter_weights(trainer),
        "temperature": float(trainer.temperature().detach()),
    }
    torch.save(result, results / f"{job['name']}.rank{rank}.pt")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = Path(spec["results"])
    with joined_world() as world:
        for job in spec["jobs"]:
            run_job(job, results, world.rank)


if __name__ == "__main__":
    main(sys.argv[1])
