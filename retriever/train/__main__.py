"""`python -m retriever.train` (or `torchrun ... -m retriever.train`): flags from TrainConfig; a user error exits 2."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from retriever._cli import run_cli
from retriever.train.distributed import env_world, joined_world
from retriever.train.trainer import TrainConfig, Trainer

LIST_FIELDS = ("targets", "train_modules")  # nargs="+"
INT_OR_NONE_FIELDS = ("max_steps", "pool_layer", "image_side", "max_text_tokens", "threads")  # default None


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (--val-buffer-m for val_buffer_m ...), all defaulting to "not given"."""
    p = argparse.ArgumentParser(
        prog="python -m retriever.train",
        description="Contrastive LoRA / DoRA / QLoRA fine-tuning with GradCache, validation and resume. "
        "Under torchrun or accelerate launch, data-parallel over the ranks (--batch-size is the global batch).",
    )
    p.add_argument(
        "--config", help="JSON file of options (a saved run_config.json reproduces a run); flags win"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in LIST_FIELDS:
            p.add_argument(flag, nargs="+", default=None)
        else:
            kind = int if f.name in INT_OR_NONE_FIELDS else {int: int, float: float}.get(type(default), str)
            p.add_argument(flag, type=kind, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config's options overridden by the flags given; --model and --data must be set by one of them."""
    options: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    if not isinstance(options, dict):
        raise ValueError(
            f"--config {args.config} must hold a JSON object of options, like a saved run_config.json"
        )
    options.update({k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None})
    config = TrainConfig.from_dict(options)
    if not config.model or not config.data:
        raise ValueError("--model and --data are required (directly or in --config)")
    return config


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, train, and return the run summary (what tests call; errors propagate)."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    with joined_world(config.device) as world:  # one process, or one rank of torchrun / accelerate launch
        logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, format="%(message)s")
        return Trainer(config).fit(resume=args.resume)


def _main(argv: Sequence[str] | None) -> int:
    summary = run(argv)
    if env_world()[0] == 0:  # one summary, rank 0's
        print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command: the summary on stdout, exit 0; `error: ...` on stderr and exit 2 for a user mistake."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
