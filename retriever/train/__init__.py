"""Contrastive LoRA / DoRA / QLoRA fine-tuning with GradCache, validation, resume, torchrun; `python -m retriever.train`."""

from retriever.train.pairs import Pair, pairs_to_pairset, pairset_to_pairs
from retriever.train.sources import TRAIN_SOURCES, load_pairs, load_pairset
from retriever.train.trainer import (
    TrainConfig,
    Trainer,
    TrainState,
    load_train_val,
    lr_lambda,
    nearest_other_places,
    train_val_split,
    validate,
)

__all__ = [
    "TRAIN_SOURCES",
    "Pair",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "load_pairs",
    "load_pairset",
    "load_train_val",
    "lr_lambda",
    "nearest_other_places",
    "pairs_to_pairset",
    "pairset_to_pairs",
    "train_val_split",
    "validate",
]
