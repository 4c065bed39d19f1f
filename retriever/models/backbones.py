"""Registry of model families: one entry knows how to load, prompt, adapt and quantize one MLLM architecture."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, ProcessorMixin

from retriever.errors import RetrieverError, UnknownFamilyError

# E5-V style one-word prompts: squeezing the meaning into the next token makes last-token pooling work.
PROMPT_STYLES: dict[str, tuple[str, str]] = {
    "raw": ("{text}", "{image}"),
    "e5v": (
        "{text}\nSummarize above sentence in one word:",
        "{image}\nSummarize above image in one word:",
    ),
    "where": (
        'Where am I? "{text}" In one word, this place is:',
        "{image}\nIn one word, this place is:",
    ),
}

# LoRA targets: the language model's attention and MLP projections (the published recipe: all of them).
# The one list of projection names: families, adapters and the demo's training all read it from here.
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (model config, the processed batch of one tile) -> (rows, cols) of its image tokens
ImageGrid = Callable[[Any, Mapping[str, Any]], tuple[int, int]]


def language_model_targets(projections: Sequence[str] = LLM_PROJECTIONS) -> str:
    """A peft regex that matches the projections of the language model only, never the vision tower."""
    return r".*(language_model|text_model).*\.(" + "|".join(projections) + r")$"


def get_attr_path(root: Any, path: str) -> Any:
    """Follow a dotted attribute path ("model.text_model") from `root`."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass(frozen=True)
class TinyRecipe:
    """How to build a tiny random model of a family (retriever.models.tiny) for tests and benchmarks.

    `builder` is a "module:function" path, resolved on use, so the registry never imports the test models:
    builder(tokenizer) -> (model config, image processor, processor_config.json extras).
    """

    special_tokens: tuple[str, ...]  # the tokenizer's chat and image tokens: [0] pads, [2] ends a turn
    builder: str

    def resolve_builder(self) -> Callable[[Any], tuple[Any, Any, dict[str, Any]]]:
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """Everything that differs between MLLM architectures, as data: a new family is one FAMILIES entry."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values that belong to this family
    model_class: str  # transformers class name, resolved lazily
    build_processor: Callable[[str | Path, dict[str, Any]], ProcessorMixin]
    image_placeholder: str  # what a tile prompt's "{image}" becomes before the processor expands it
    image_grid: ImageGrid  # where each image token sits on the tile (relevance heatmaps)
    tiny: TinyRecipe  # a tiny random model of this family
    prompt_style: str = "raw"
    projections: tuple[str, ...] = LLM_PROJECTIONS  # the language model's LoRA projections
    lora_targets: str | tuple[str, ...] = ""  # peft target_modules; "" -> `projections` of the language model
    skip_4bit: tuple[str, ...] = ("lm_head",)  # full module paths kept out of 4-bit
    vision_modules: tuple[str, ...] = ()  # attribute paths of the vision tower + connector
    default_image_side: int = 448  # tiles are resized to a square of this side
    language_model_attr: str = "model.language_model"  # attribute path of the decoder (for layer hooks)
    processor_image_kwargs: dict[str, Any] = field(default_factory=dict)  # tiles: one crop, no splitting

    def __post_init__(self) -> None:
        if not self.lora_targets:
            object.__setattr__(self, "lora_targets", language_model_targets(self.projections))

    @property
    def query_prompt(self) -> str:
        return PROMPT_STYLES[self.prompt_style][0]

    @property
    def tile_prompt(self) -> str:
        return PROMPT_STYLES[self.prompt_style][1]

    def resolve_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)


# ---------------------------------------------------------------------------------------------------------
# Processors without torchvision: Qwen2-VL, Qwen2.5-VL and InternVL processors insist on a video processor,
# which needs torchvision. These subclasses drop the video half and keep everything else of the original.


def _no_video_processor(base: type, image_token_attrs: Callable[[Any, Any], None]) -> type:
    """Subclass a transformers processor so that it takes only an image processor and a tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: ANN001
        image_token_attrs(self, tokenizer, **kwargs)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(base.__name__ + "NoVideo", (base,), {"__init__": __init__})


def _qwen_token_attrs(self: Any, tokenizer: Any, **_: Any) -> None:
    self.image_token = "<|image_pad|>"
    self.video_token = "<|video_pad|>"
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)


def _internvl_token_attrs(self: Any, tokenizer: Any, image_seq_length: int = 256, **_: Any) -> None:
    import re

    self.image_seq_length = image_seq_length
    self.start_image_token, self.end_image_token = "<img>", "</img>"
    self.image_token, self.video_token = "<IMG_CONTEXT>", "<video>"
    self.start_image_token_id = tokenizer.convert_tokens_to_ids(self.start_image_token)
    self.end_image_token_id = tokenizer.convert_tokens_to_ids(self.end_image_token)
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.multimodal_pattern = re.compile(
        f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
    )


def _read_json(folder: str | Path, name: str) -> dict[str, Any]:
    import json

    from transformers.utils import cached_file

    path = cached_file(str(folder), name, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(path).read_text()) if path else {}


def _build_qwen2_vl(folder: str | Path, opts: dict[str, Any]) -> ProcessorMixin:
    from transformers.models.qwen2_vl import processing_qwen2_vl
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls = _no_video_processor(processing_qwen2_vl.Qwen2VLProcessor, _qwen_token_attrs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, **opts)
    tokenizer = AutoTokenizer.from_pretrained(folder, **opts)
    return cls(image_processor, tokenizer)


def _build_qwen2_5_vl(folder: str | Path, opts: dict[str, Any]) -> ProcessorMixin:
    from transformers.models.qwen2_5_vl import processing_qwen2_5_vl
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls = _no_video_processor(processing_qwen2_5_vl.Qwen2_5_VLProcessor, _qwen_token_attrs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, **opts)
    tokenizer = AutoTokenizer.from_pretrained(folder, **opts)
    return cls(image_processor, tokenizer)


def idefics3_image_seq_len(folder: str | Path, opts: dict[str, Any]) -> int:
    """Image tokens per tile of an Idefics3 / SmolVLM folder: what its vision tower makes of one image.

    config.json decides the count, (image_size / patch_size)^2 / scale_factor^2; processor_config.json's
    image_seq_len, when present, must agree, or the prompt and the image features would not line up.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **opts)
    side, patch = int(config.vision_config.image_size), int(config.vision_config.patch_size)
    scale = int(config.scale_factor)
    derived = (side // patch) ** 2 // scale**2
    stated = _read_json(folder, "processor_config.json").get("image_seq_len")
    if stated is not None and int(stated) != derived:
        raise RetrieverError(
            f"{folder}: processor_config.json says image_seq_len {stated}, but config.json makes "
            f"{derived} image features per tile ((image_size {side} / patch_size {patch})^2 / scale_factor "
            f"{scale}^2). The model follows config.json: fix whichever of the two files is wrong."
        )
    return derived


def _build_idefics3(folder: str | Path, opts: dict[str, Any]) -> ProcessorMixin:
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil.from_pretrained(folder, **opts)
    tokenizer = AutoTokenizer.from_pretrained(folder, **opts)
    seq_len = idefics3_image_seq_len(folder, opts)
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=seq_len)


def _build_internvl(folder: str | Path, opts: dict[str, Any]) -> ProcessorMixin:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl import processing_internvl

    cls = _no_video_processor(processing_internvl.InternVLProcessor, _internvl_token_attrs)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(folder, **opts)
    tokenizer = AutoTokenizer.from_pretrained(folder, **opts)
    seq_len = _read_json(folder, "processor_config.json").get("image_seq_length", 256)
    return cls(image_processor, tokenizer, image_seq_length=seq_len)


# ---------------------------------------------------------------------------------------------------------
# Image-token grids: (model config, the processed batch of one tile) -> (rows, cols) of its image tokens,
# in the order the language model receives them.


def _qwen_grid(config: Any, batch: Mapping[str, Any]) -> tuple[int, int]:
    """Qwen2-VL / 2.5-VL: image_grid_thw patches, merged merge x merge into one token, row-major."""
    _, h, w = (int(v) for v in batch["image_grid_thw"][0])
    merge = int(config.vision_config.spatial_merge_size)
    return h // merge, w // merge


def _idefics3_grid(config: Any, batch: Mapping[str, Any]) -> tuple[int, int]:
    """Idefics3 / SmolVLM without splitting: (side / patch / scale)^2 tokens, pixel-shuffled row-major."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    n = side // int(config.scale_factor)
    return n, n


def _internvl_grid(config: Any, batch: Mapping[str, Any]) -> tuple[int, int]:
    """InternVL: (side / patch * downsample_ratio)^2 tokens after the pixel shuffle, row-major."""
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    size = size[0] if isinstance(size, list | tuple) else size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    n = int(int(size) // int(patch) * float(config.downsample_ratio))
    return n, n


# Special tokens of the tiny tokenizers: the chat and image tokens each family's processor expects.
_QWEN_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_IDEFICS3_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
)
_INTERNVL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
_TINY = "retriever.models.tiny"

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            model_class="Qwen2VLForConditionalGeneration",
            build_processor=_build_qwen2_vl,
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            image_grid=_qwen_grid,
            tiny=TinyRecipe(_QWEN_TOKENS, f"{_TINY}:qwen2_vl"),
            skip_4bit=("model.visual", "lm_head"),
            vision_modules=("model.visual",),
        ),
        Family(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            model_class="Qwen2_5_VLForConditionalGeneration",
            build_processor=_build_qwen2_5_vl,
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            image_grid=_qwen_grid,
            tiny=TinyRecipe(_QWEN_TOKENS, f"{_TINY}:qwen2_5_vl"),
            skip_4bit=("model.visual", "lm_head"),
            vision_modules=("model.visual",),
        ),
        Family(
            name="idefics3",  # SmolVLM-256M/500M and Idefics3-8B
            model_types=("idefics3",),
            model_class="Idefics3ForConditionalGeneration",
            build_processor=_build_idefics3,
            image_placeholder="<image>",
            image_grid=_idefics3_grid,
            tiny=TinyRecipe(_IDEFICS3_TOKENS, f"{_TINY}:idefics3"),
            skip_4bit=("model.vision_model", "model.connector", "lm_head"),
            vision_modules=("model.vision_model", "model.connector"),
            default_image_side=512,
            language_model_attr="model.text_model",
            processor_image_kwargs={"do_image_splitting": False},
        ),
        Family(
            name="internvl",  # InternVL3 / 3.5 in the transformers format (the "-hf" repos)
            model_types=("internvl",),
            model_class="InternVLForConditionalGeneration",
            build_processor=_build_internvl,
            image_placeholder="<IMG_CONTEXT>",
            image_grid=_internvl_grid,
            tiny=TinyRecipe(_INTERNVL_TOKENS, f"{_TINY}:internvl"),
            skip_4bit=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
            vision_modules=("model.vision_tower", "model.multi_modal_projector"),
            processor_image_kwargs={"crop_to_patches": False},
        ),
    )
}
MODEL_TYPE_TO_FAMILY: dict[str, str] = {mt: f.name for f in FAMILIES.values() for mt in f.model_types}


def get_family(name: str) -> Family:
    """Look a family up by its name, with an error that lists the supported ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"Unknown model family {name!r}. Supported: {', '.join(sorted(FAMILIES))}."
        ) from None


def family_for_model_type(model_type: str) -> Family:
    """Map a checkpoint's config.model_type onto its family."""
    try:
        return FAMILIES[MODEL_TYPE_TO_FAMILY[model_type]]
    except KeyError:
        raise UnknownFamilyError(
            f"Model type {model_type!r} is not supported. Supported model types: "
            f"{', '.join(sorted(MODEL_TYPE_TO_FAMILY))} (families: {', '.join(sorted(FAMILIES))})."
        ) from None
