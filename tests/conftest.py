"""Shared fixtures: tiny random models of each family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILY_NAMES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "internvl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A factory: family name -> folder of a tiny random model of that family (cached per session)."""
    from retriever.models.tiny import make_tiny_model

    built: dict[tuple[str, int], Path] = {}

    def build(family: str, seed: int = 0) -> Path:
        if (family, seed) not in built:
            built[family, seed] = make_tiny_model(
                family, tmp_path_factory.mktemp(f"{family}-{seed}"), seed=seed
            )
        return built[family, seed]

    return build
