"""The retrieval config: how a model turns texts and tiles into embeddings, saved next to every adapter."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from retriever._io import library_versions, write_json_atomic

# The adapter folder's format, one list of file names (as sentence-transformers' config_file_name).
CONFIG_FILE = "retrieval_config.json"
TRAINING_INFO_FILE = "training_info.json"  # how the adapter was trained (written by save_adapter)
CALIBRATION_FILE = "explain_calibration.json"  # fitted confidence calibration (retriever.explain)
QUANTIZATIONS = ("none", "4bit", "8bit")  # "4bit" is NF4 with double quantization
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute dtypes a model can be loaded in
DEFAULTS_FILE = (
    "retrieval_defaults.json"  # optional, in a base model folder: its preferred retrieval settings
)


@dataclass
class RetrievalConfig:
    """Prompts, pooling and sizes: everything besides the weights that decides an embedding."""

    family: str
    base_model: str
    revision: str | None = None
    query_prompt: str = "{text}"  # "{text}" is replaced by the (truncated) description
    tile_prompt: str = "{image}"  # "{image}" is replaced by the family's image placeholder
    pooling: str = "last"
    pool_layer: int = -1  # -1: the final normed output; k >= 0: the hidden state after k decoder layers
    max_text_tokens: int = 300
    image_side: int = 448  # tiles are resized to image_side x image_side before the processor
    base_signature: dict[str, Any] = field(default_factory=dict)  # architecture facts an adapter must match

    def __post_init__(self) -> None:
        if "{text}" not in self.query_prompt:
            raise ValueError(f"query_prompt must contain '{{text}}': {self.query_prompt!r}")
        if "{image}" not in self.tile_prompt:
            raise ValueError(f"tile_prompt must contain '{{image}}': {self.tile_prompt!r}")
        if self.max_text_tokens < 1 or self.image_side < 8:
            raise ValueError("max_text_tokens must be >= 1 and image_side >= 8")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | Path) -> Path:
        """Write retrieval_config.json atomically, with the library versions that produced it."""
        payload = {**self.to_dict(), "library_versions": library_versions()}
        return write_json_atomic(Path(folder) / CONFIG_FILE, payload)

    @classmethod
    def load(cls, folder: str | Path) -> RetrievalConfig:
        return cls.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()))
