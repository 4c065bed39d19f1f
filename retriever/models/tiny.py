"""Tiny random models of every family, built from its Family entry's TinyRecipe in seconds (tests, benchmarks)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from retriever.models.backbones import Family

TinyParts = tuple[Any, Any, dict[str, Any]]  # (model config, image processor, processor_config.json extras)

# Words the on-the-fly tokenizer learns, so captions about colours, shapes and places are real tokens.
CORPUS_WORDS = [
    "a",
    "the",
    "and",
    "of",
    "on",
    "in",
    "at",
    "with",
    "near",
    "next",
    "to",
    "opposite",
    "across",
    "from",
    "street",
    "road",
    "corner",
    "park",
    "church",
    "cafe",
    "cafe",
    "restaurant",
    "shop",
    "hotel",
    "museum",
    "square",
    "market",
    "station",
    "tram",
    "bus",
    "stop",
    "bridge",
    "river",
    "harbour",
    "water",
    "tree",
    "trees",
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "white",
    "black",
    "orange",
    "purple",
    "circle",
    "square",
    "triangle",
    "cross",
    "stripe",
    "dot",
    "big",
    "small",
    "tall",
    "old",
    "new",
    "brick",
    "stone",
    "glass",
    "building",
    "tower",
    "house",
    "block",
    "left",
    "right",
    "side",
    "north",
    "south",
    "east",
    "west",
    "I",
    "see",
    "there",
    "is",
    "are",
    "a",
    "an",
    "my",
    "behind",
    "front",
    "Summarize",
    "above",
    "sentence",
    "image",
    "in",
    "one",
    "word",
    "Where",
    "am",
    "this",
    "place",
    "is",
    "Does",
    "tile",
    "match",
    "description",
    "yes",
    "no",
    "because",
    "it",
    "shows",
]

TEXT_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_IMAGE_SIDE = 56


def make_tokenizer(special_tokens: Sequence[str], out_dir: Path, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on the fly, with a family's special tokens (TinyRecipe)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    generator = torch.Generator().manual_seed(seed)
    lines = [
        " ".join(CORPUS_WORDS[i] for i in torch.randint(len(CORPUS_WORDS), (12,), generator=generator))
        for _ in range(400)
    ]
    tok.train_from_iterator(lines + [" ".join(CORPUS_WORDS)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token=specials[2],
        bos_token=None,
        unk_token=None,
        additional_special_tokens=specials[1:],
    )
    fast.save_pretrained(out_dir)
    return fast


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _token_ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def qwen2_vl(
    tokenizer: Any, vision_extra: dict[str, Any] | None = None, config_cls: str = "Qwen2VLConfig"
) -> TinyParts:
    """Qwen2-VL (and, with `vision_extra`, Qwen2.5-VL): 14-pixel patches merged 2x2."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_id, video_id, start_id, end_id = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    head_dim = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]
    text = {
        **TEXT_DIMS,
        **_token_ids(tokenizer),
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    }
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": TEXT_DIMS["hidden_size"],
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        **(vision_extra or {}),
    }
    config = getattr(transformers, config_cls)(
        text_config=text,
        vision_config=vision,
        image_token_id=image_id,
        video_token_id=video_id,
        vision_start_token_id=start_id,
        vision_end_token_id=end_id,
        tie_word_embeddings=False,
    )
    side2 = TINY_IMAGE_SIDE * TINY_IMAGE_SIDE
    processor = Qwen2VLImageProcessorPil(
        min_pixels=side2 // 4, max_pixels=side2 * 4, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return config, processor, {}


def qwen2_5_vl(tokenizer: Any) -> TinyParts:
    """Qwen2.5-VL: the Qwen2-VL recipe with a windowed vision tower."""
    vision = {
        "out_hidden_size": TEXT_DIMS["hidden_size"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return qwen2_vl(tokenizer, vision_extra=vision, config_cls="Qwen2_5_VLConfig")


def idefics3(tokenizer: Any) -> TinyParts:
    """Idefics3 / SmolVLM: 64-pixel tiles, 16-pixel patches, pixel shuffle 2 -> 4 image tokens."""
    from transformers import Idefics3Config
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    side, patch, scale = 64, 16, 2
    text = {**TEXT_DIMS, **_token_ids(tokenizer), "model_type": "llama", "max_position_embeddings": 1024}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": side,
        "patch_size": patch,
    }
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=scale,
        image_token_id=_ids(tokenizer, "<image>")[0],
        tie_word_embeddings=False,
    )
    processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
    )
    return config, processor, {"image_seq_len": (side // patch) ** 2 // scale**2}


def internvl(tokenizer: Any) -> TinyParts:
    """InternVL: 32-pixel tiles, 8-pixel patches, downsample 0.5 -> 4 image tokens."""
    from transformers import InternVLConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side, patch = 32, 8
    text = {**TEXT_DIMS, **_token_ids(tokenizer), "model_type": "qwen2", "max_position_embeddings": 1024}
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": [side, side],
        "patch_size": [patch, patch],
    }
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=_ids(tokenizer, "<IMG_CONTEXT>")[0],
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    processor = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=False)
    return config, processor, {"image_seq_length": (side // patch) ** 2 // 4}


def make_tiny_model(family: str | Family, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny model of `family` (weights, tokenizer, processor configs) that load_retriever loads.

    Everything family-specific comes from the Family entry: its TinyRecipe (special tokens and builder).
    """
    from retriever.models.backbones import get_family

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = get_family(family) if isinstance(family, str) else family
    tokenizer = make_tokenizer(spec.tiny.special_tokens, out_dir, seed)
    config, image_processor, processor_extras = spec.tiny.resolve_builder()(tokenizer)
    torch.manual_seed(seed)
    model = spec.resolve_model_class()(config).eval()
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(json.dumps(processor_extras))
    # A saved model records how it retrieves (as sentence-transformers does): tiny tiles are small.
    (out_dir / "retrieval_defaults.json").write_text(json.dumps({"image_side": TINY_IMAGE_SIDE}))
    return out_dir
