"""The family registry: every Family has all its facts; an Idefics3 folder's image-token count is derived."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from retriever import load_retriever
from retriever.errors import RetrieverError
from retriever.models.backbones import FAMILIES, get_attr_path, idefics3_image_seq_len
from retriever.models.tiny import make_tiny_model

HUB_CONFIGS = Path("/work/shared/hub-configs")  # real checkpoint files (no weights), read in place
SMOLVLM_256M = HUB_CONFIGS / "HuggingFaceTB__SmolVLM-256M-Instruct"
SMOLVLM_500M = HUB_CONFIGS / "HuggingFaceTB__SmolVLM-500M-Instruct"  # vendored with scale_factor 1: wrong


def one_tile() -> Image.Image:
    return Image.new("RGB", (40, 40), (200, 40, 40))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_all_its_facts(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    assert callable(family.image_grid) and callable(family.tiny.resolve_builder())
    assert family.projections and family.language_model_attr
    assert all(p in family.lora_targets for p in family.projections)
    # a renamed copy: nothing keyed by the family's name elsewhere is needed to build its tiny model
    folder = make_tiny_model(dataclasses.replace(family, name=f"{name}-copy"), tmp_path)
    r = load_retriever(folder)
    assert r.family == family
    assert all(len(r.tokenizer.encode(t, add_special_tokens=False)) == 1 for t in family.tiny.special_tokens)

    layers = r.decoder_layers()  # language_model_attr leads to the decoder
    assert len(layers) == r.base_model.config.get_text_config().num_hidden_layers
    for path in family.vision_modules:
        assert isinstance(get_attr_path(r.base_model, path), torch.nn.Module)

    targets = [n for n, _ in r.model.named_modules() if re.fullmatch(family.lora_targets, n)]
    assert {n.rsplit(".", 1)[1] for n in targets} == set(family.projections)  # every projection, nothing else
    assert not any(n.startswith(family.vision_modules) for n in targets)  # never the vision tower

    batch = r.process_tiles([one_tile()])
    rows, cols = family.image_grid(r.base_model.config, batch)
    assert rows * cols == int((batch["input_ids"][0] == r.base_model.config.image_token_id).sum())


def tiny_idefics3_copy(tiny_model_dir, folder: Path) -> Path:
    shutil.copytree(tiny_model_dir("idefics3"), folder)
    return folder


def test_idefics3_without_processor_config_derives_its_image_tokens(tiny_model_dir, tmp_path: Path) -> None:
    folder = tiny_idefics3_copy(tiny_model_dir, tmp_path / "no-processor-config")
    (folder / "processor_config.json").unlink()
    r = load_retriever(folder)
    assert r.processor.image_seq_len == 4  # (64 / 16)^2 / 2^2, not the old hard-coded 64
    vectors = r.encode_tiles([one_tile()])  # used to fail: "Image features and image tokens do not match"
    assert vectors.shape == (1, r.dim)


def test_idefics3_processor_config_that_disagrees_is_named(tiny_model_dir, tmp_path: Path) -> None:
    folder = tiny_idefics3_copy(tiny_model_dir, tmp_path / "disagreeing")
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 9}))
    with pytest.raises(
        RetrieverError, match=r"processor_config.json says image_seq_len 9.*config.json makes 4"
    ):
        load_retriever(folder)


def test_real_smolvlm_files_give_the_stated_image_tokens() -> None:
    stated = json.loads((SMOLVLM_256M / "processor_config.json").read_text())["image_seq_len"]
    assert idefics3_image_seq_len(SMOLVLM_256M, {}) == stated == 64  # (512 / 16)^2 / 4^2
    assert FAMILIES["idefics3"].build_processor(SMOLVLM_256M, {}).image_seq_len == stated


def test_real_smolvlm_folder_with_an_edited_config_is_refused() -> None:
    with pytest.raises(RetrieverError, match=r"image_seq_len 64, but config.json makes 1024"):
        idefics3_image_seq_len(SMOLVLM_500M, {})
