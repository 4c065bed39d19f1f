"""The retrieval config: how a model turns texts and tiles into embeddings, saved next to every adapter."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FILE = "retrieval_config.json"
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


EMBEDDING_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def library_versions(packages: Sequence[str] = EMBEDDING_PACKAGES) -> dict[str, str | None]:
    """Versions of Python, this library and `packages` (None for one that is not installed)."""
    import importlib.metadata as md
    import platform

    from . import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "retriever": __version__}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path
