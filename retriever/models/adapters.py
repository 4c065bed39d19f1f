"""LoRA / DoRA / QLoRA adapters: attach to a Retriever, save atomically with the retrieval config."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retriever._io import replace_dir, write_json_atomic
from retriever.models.config import TRAINING_INFO_FILE, RetrievalConfig
from retriever.models.encoder import Retriever, file_hash

# Adapter kinds differ only in peft options; QLoRA is LoRA/DoRA on a 4-bit base (chosen by quantization).
ADAPTER_KINDS: dict[str, dict[str, Any]] = {
    "lora": {"use_dora": False},
    "dora": {"use_dora": True},
}


def disable_avx512_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference, which breaks later training steps."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def add_adapter(
    retriever: Retriever,
    kind: str = "dora",
    rank: int = 16,
    alpha: int = 128,
    dropout: float = 0.1,
    targets: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
) -> Retriever:
    """Wrap the retriever's model in a fresh trainable adapter (in place); the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if kind not in ADAPTER_KINDS:
        raise ValueError(f"Unknown adapter kind {kind!r}. Choose one of: {', '.join(ADAPTER_KINDS)}.")
    if hasattr(retriever.model, "peft_config"):
        raise ValueError(
            "This retriever already has an adapter; load the base model without one to add another."
        )
    model = retriever.model
    if retriever.quantization != "none":
        disable_avx512_repack(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets if targets is not None else retriever.family.lora_targets,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
        **ADAPTER_KINDS[kind],
    )
    retriever.model = get_peft_model(model, peft_config)
    retriever.adapter_hash = "untrained"
    return retriever


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating-point tensors in `dtype` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(cast, str(path), metadata=metadata)


def save_adapter(
    retriever: Retriever,
    folder: str | Path,
    extra: dict[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Save adapter weights + retrieval_config.json into `folder`, atomically (written aside, then swapped in).

    weights_dtype stores the weights in that precision (e.g. float16 halves a committed adapter); loading
    casts them back to the model's dtype.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    retriever.model.save_pretrained(staging)
    if weights_dtype is not None:
        cast_safetensors(staging / "adapter_model.safetensors", weights_dtype)
    config: RetrievalConfig = retriever.config
    config.save(staging)
    if extra:
        write_json_atomic(staging / TRAINING_INFO_FILE, extra)
    replace_dir(staging, folder)
    retriever.adapter_hash = file_hash(folder)
    return folder
