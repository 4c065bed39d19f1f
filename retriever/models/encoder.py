"""load_retriever(...) and the Retriever: one MLLM that embeds descriptions and tiles into the same space."""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from retriever._io import lazy_import, sha256_files
from retriever.errors import AdapterMismatchError, RetrieverError
from retriever.models.backbones import Family, family_for_model_type, get_attr_path
from retriever.models.config import CONFIG_FILE, DEFAULTS_FILE, DTYPE_NAMES, QUANTIZATIONS, RetrievalConfig
from retriever.models.demo_base import DEMO_MODEL_ID, demo_base_model
from retriever.models.images import ImageLike, open_image
from retriever.models.pooling import get_pooler

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
PROGRESS_MIN_BATCHES = 4  # show a bar when an input spans more batches than this
BITSANDBYTES = "'bitsandbytes>=0.50'"  # the install line's requirement for quantization

# Model ids that are assembled locally instead of downloaded: id -> builder returning the folder.
MODEL_ALIASES: dict[str, Callable[[], Path]] = {DEMO_MODEL_ID: demo_base_model}


class _EarlyExit(Exception):
    """Raised by a forward hook to stop the language model once the pooled layer is computed."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class Retriever:
    """An MLLM used as an embedding model: texts and tiles in, L2-normalised vectors out."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        config: RetrievalConfig,
        family: Family,
        *,
        device: torch.device,
        dtype: torch.dtype,
        quantization: str = "none",
        adapter_path: str | None = None,
        adapter_hash: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.family = family
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        self.adapter_path = adapter_path
        self.adapter_hash = adapter_hash
        self._pooler = get_pooler(config.pooling)
        # One lock around the model: generation with the adapter switched off must not overlap an encode.
        self.model_lock = threading.RLock()
        self._query_prefix, self._query_suffix = config.query_prompt.split("{text}", 1)
        self.dim = int(self.base_model.config.get_text_config().hidden_size)

    # -- model plumbing ---------------------------------------------------------------------------------------
    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model, underneath a peft wrapper if there is one."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def trunk(self) -> torch.nn.Module:
        """The multimodal backbone without the LM head: embedding needs no vocabulary projection."""
        return self.base_model.model

    def decoder_layers(self) -> torch.nn.ModuleList:
        return get_attr_path(self.base_model, self.family.language_model_attr).layers

    @contextmanager
    def _stop_after_pool_layer(self) -> Iterator[None]:
        """Skip the layers above the pooled one: a middle layer costs only the layers below it."""
        k = self.config.pool_layer
        if k < 0:
            yield
            return
        if k == 0:
            raise ValueError("pool_layer=0 would pool raw token embeddings; use k >= 1 or -1")

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            raise _EarlyExit(output[0] if isinstance(output, tuple) else output)

        handle = self.decoder_layers()[k - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A processed batch on the model's device, with floating pixel values in the model's dtype."""
        batch = {k: v.to(self.device) for k, v in dict(batch).items()}
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward one processed batch and pool: (B, T) inputs -> (B, D) unit vectors. Keeps the graph."""
        batch = self.to_device(batch)
        try:
            with self._stop_after_pool_layer():
                hidden = self.trunk(**batch).last_hidden_state  # (B, T, H)
        except _EarlyExit as stop:
            hidden = stop.hidden  # (B, T, H)
        pooled = self._pooler(hidden.float(), batch["attention_mask"])  # (B, H)
        return torch.nn.functional.normalize(pooled, dim=-1)

    # -- inputs -----------------------------------------------------------------------------------------------
    def tokenize_queries(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompt and tokenize descriptions; only the description is truncated, never the prompt around it."""
        encode = self.tokenizer.encode
        prefix = encode(self._query_prefix, add_special_tokens=False) if self._query_prefix else []
        suffix = encode(self._query_suffix, add_special_tokens=False) if self._query_suffix else []
        rows = [
            prefix + encode(t, add_special_tokens=False)[: self.config.max_text_tokens] + suffix
            for t in texts
        ]
        return self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")

    def process_tiles(
        self,
        images: Sequence[ImageLike],
        prompts: Sequence[str] | None = None,
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode, resize to the configured square and run the family's processor: (N,) tiles -> (N, T) batch.

        `prompts` (one per tile, each holding the family's image placeholder once) default to the tile
        prompt; `padding_side` defaults to the tokenizer's. The batch stays on the CPU (see to_device).
        """
        side = self.config.image_side
        decoded = [open_image(img).resize((side, side), Image.Resampling.BICUBIC) for img in images]
        if prompts is None:
            prompt = self.config.tile_prompt.replace("{image}", self.family.image_placeholder)
            prompts = [prompt] * len(decoded)
        padding = {"padding_side": padding_side} if padding_side else {}
        return dict(
            self.processor(
                text=list(prompts),
                images=[[img] for img in decoded],
                padding=True,
                return_tensors="pt",
                **padding,
                **self.family.processor_image_kwargs,
            )
        )

    # -- public API -------------------------------------------------------------------------------------------
    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 16, progress: bool | None = None
    ) -> torch.Tensor:
        """Embed descriptions: (N,) strings -> (N, D) float32 on the CPU, L2-normalised, in input order."""
        if isinstance(texts, str):
            raise TypeError("encode_queries takes a list of strings, not one string")
        return self._encode(list(texts), self.tokenize_queries, batch_size, progress, "queries")

    def encode_tiles(
        self, images: Sequence[ImageLike], batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor:
        """Embed tile images (PIL images or paths): (N,) -> (N, D) float32 on the CPU, L2-normalised."""
        return self._encode(list(images), self.process_tiles, batch_size, progress, "tiles")

    @torch.inference_mode()
    def _encode(
        self,
        items: list,
        prepare: Callable[[list], dict[str, torch.Tensor]],
        batch_size: int,
        progress: bool | None,
        what: str,
    ) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not items:
            return torch.empty(0, self.dim)
        starts = range(0, len(items), batch_size)
        show = progress if progress is not None else len(starts) > PROGRESS_MIN_BATCHES
        with self.model_lock:  # never while another thread has the adapter switched off (adapter_disabled)
            was_training = self.model.training
            self.model.eval()
            try:
                out = [
                    self.embed(prepare(items[s : s + batch_size])).cpu()
                    for s in tqdm(starts, desc=f"Encoding {what}", disable=not show, unit="batch")
                ]
            finally:
                self.model.train(was_training)
        return torch.cat(out)  # (N, D)

    def fingerprint(self) -> dict[str, Any]:
        """What an index built with this retriever must match to be searched with it."""
        return {
            "family": self.config.family,
            "model": self.config.base_model,
            "revision": self.config.revision,
            "adapter_hash": self.adapter_hash,
            "query_prompt": self.config.query_prompt,
            "tile_prompt": self.config.tile_prompt,
            "pooling": self.config.pooling,
            "pool_layer": self.config.pool_layer,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "dim": self.dim,
            "image_side": self.config.image_side,
            "max_text_tokens": self.config.max_text_tokens,
        }

    @contextmanager
    def adapter_disabled(self) -> Iterator[torch.nn.Module]:
        """The base model without the retrieval adapter, e.g. for generation."""
        with self.model_lock:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield self.base_model
            else:
                yield self.base_model


# -------------------------------------------------------------------------------------------------------------
# Loading


@functools.cache
def fast_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16).

    Elsewhere oneDNN emulates bf16 and a matmul is about 100x slower than in fp32 (measured on this project's
    2-core CI machine), so CPU autocast must be switched on only where this is true.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume emulation, the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.count("\\") > 0


def _read_model_config(model: str, revision: str | None) -> Any:
    from transformers import AutoConfig

    if not Path(model).exists() and _looks_like_path(model):
        raise RetrieverError(f"Model folder not found: {model}")
    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except OSError as err:
        raise RetrieverError(
            f"Cannot load the model config of {model!r}: {err}. Pass a local folder, or a hub id with network access "
            "(or with the model already in the Hugging Face cache)."
        ) from err
    except ValueError as err:  # unknown model_type in this transformers version
        raise RetrieverError(f"Cannot read the config of {model!r}: {err}") from err


def base_signature(config: Any) -> dict[str, Any]:
    """Architecture facts that an adapter trained on this base depends on."""
    text = config.get_text_config()
    return {
        "model_type": config.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
    }


def file_hash(
    folder: str | Path, names: Sequence[str] = ("adapter_model.safetensors", "adapter_model.bin")
) -> str:
    """A short sha256 of an adapter's weights: two adapters with equal hashes embed identically."""
    return sha256_files([Path(folder) / name for name in names])[:16]


def _quantization_config(quantization: str, family: Family, compute_dtype: torch.dtype) -> Any:
    if quantization == "none":
        return None
    lazy_import("bitsandbytes", pip=BITSANDBYTES, purpose=f"quantization={quantization!r}")
    from transformers import BitsAndBytesConfig

    skip = list(family.skip_4bit)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _check_adapter(adapter: Path, saved: dict[str, Any], live: RetrievalConfig) -> None:
    """Refuse an adapter trained on another base: the weights would load but embed nonsense."""
    theirs = saved.get("base_signature") or {}
    ours = live.base_signature
    differing = {k: (theirs[k], ours.get(k)) for k in theirs if theirs[k] != ours.get(k)}
    if saved.get("family") and saved["family"] != live.family:
        differing["family"] = (saved["family"], live.family)
    if differing:
        details = "; ".join(f"{k}: adapter {a!r} vs base {b!r}" for k, (a, b) in differing.items())
        raise AdapterMismatchError(
            f"Adapter {adapter} was trained for base model {saved.get('base_model')!r}, "
            f"not for {live.base_model!r} ({details})."
        )


ADAPTER_SETTINGS = ("query_prompt", "tile_prompt", "pooling", "pool_layer", "max_text_tokens", "image_side")


def _adapter_settings(adapter: Path) -> dict[str, Any]:
    """The retrieval config saved with an adapter ({} for a bare peft folder); refuses a folder without one."""
    if not (adapter / "adapter_config.json").is_file():
        raise RetrieverError(f"No adapter at {adapter}: expected adapter_config.json (saved by peft) there.")
    return json.loads((adapter / CONFIG_FILE).read_text()) if (adapter / CONFIG_FILE).is_file() else {}


def _retrieval_config(
    model: str, model_id: str, revision: str | None, hf_config: Any, adapter: Path | None, overrides: dict
) -> RetrievalConfig:
    """Family defaults < the model folder's retrieval_defaults.json < the adapter's config < overrides."""
    family = family_for_model_type(hf_config.model_type)
    settings: dict[str, Any] = {
        "family": family.name,
        "base_model": model_id,  # the id the user gave: stable across machines, unlike a cache path
        "revision": revision,
        "query_prompt": family.query_prompt,
        "tile_prompt": family.tile_prompt,
        "image_side": family.default_image_side,
    }
    defaults_file = Path(model) / DEFAULTS_FILE
    if defaults_file.is_file():
        settings.update(json.loads(defaults_file.read_text()))
    saved = _adapter_settings(adapter) if adapter is not None else {}
    settings.update({k: v for k, v in saved.items() if k in ADAPTER_SETTINGS})
    settings.update(overrides)
    settings["base_signature"] = base_signature(hf_config)
    config = RetrievalConfig.from_dict(settings)
    if adapter is not None:
        _check_adapter(adapter, saved, config)
    return config


def _load_base(
    model: str,
    family: Family,
    quantization: str,
    dtype: torch.dtype,
    device: torch.device,
    revision: str | None,
) -> torch.nn.Module:
    """The transformers model on `device`, quantized by bitsandbytes when asked."""
    quant_config = _quantization_config(quantization, family, dtype)
    load_kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
    if quant_config is not None:
        load_kwargs.update(quantization_config=quant_config, device_map={"": str(device)})
    hf_model = family.resolve_model_class().from_pretrained(model, **load_kwargs)
    if quant_config is None:
        hf_model.to(device)
    return hf_model


def load_retriever(
    model: str | Path,
    adapter: str | Path | None = None,
    quantization: str = "none",
    device: str | torch.device | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    **overrides: Any,
) -> Retriever:
    """Load any supported MLLM (hub id or folder), optionally with a LoRA/DoRA adapter, as a Retriever.

    `overrides` set RetrievalConfig fields (query_prompt, tile_prompt, pooling, pool_layer, max_text_tokens,
    image_side); precedence: family defaults < the model folder's retrieval_defaults.json < the adapter's
    retrieval_config.json < overrides.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    model_id = str(model)
    model = str(MODEL_ALIASES[model_id]()) if model_id in MODEL_ALIASES else model_id
    device = default_device(device)
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    hf_config = _read_model_config(model, revision)
    family = family_for_model_type(hf_config.model_type)
    adapter = Path(adapter) if adapter is not None else None
    config = _retrieval_config(model, model_id, revision, hf_config, adapter, overrides)
    hf_model = _load_base(model, family, quantization, torch_dtype, device, revision)
    processor = family.build_processor(model, {"revision": revision})

    adapter_hash = None
    if adapter is not None:
        from peft import PeftModel

        hf_model = PeftModel.from_pretrained(hf_model, str(adapter), is_trainable=False)
        adapter_hash = file_hash(adapter)
    hf_model.eval()
    return Retriever(
        hf_model,
        processor,
        config,
        family,
        device=device,
        dtype=torch_dtype,
        quantization=quantization,
        adapter_path=str(adapter) if adapter is not None else None,
        adapter_hash=adapter_hash,
    )
