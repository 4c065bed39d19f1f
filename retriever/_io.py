"""The project's invariants in one place: atomic writes, hashing, library versions and optional imports."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

EMBEDDING_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def cache_root() -> Path:
    """The geotext cache folder: $GEOTEXT_CACHE itself when set (nothing is appended), else
    ~/.cache/geotext-retriever. The assembled demo base model lives in <cache_root>/helsinki-smolvlm-base-v1,
    the OSM extract cache in <cache_root>/osm, compiled scan kernels in <cache_root>/native."""
    return Path(os.environ.get("GEOTEXT_CACHE", Path.home() / ".cache" / "geotext-retriever"))


# --- atomic writes: one complete version exists at every instant ----------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes it owner-only; an artefact is read by others (a Space, a web server)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a temporary binary file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON (indented, sorted keys) to `path` atomically: readers never see half a file."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def replace_dir(staging: str | Path, target: str | Path) -> Path:
    """Swap the complete folder `staging` in as `target`, so that one complete version exists at every instant.

    The old folder is first renamed aside (`.<name>.old`), then staging is renamed in, then the old copy goes.
    A crash between the two renames leaves the old copy complete under `.<name>.old`; `recover_dir` restores it.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        staging.rename(target)
        return target
    aside = target.with_name(f".{target.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    target.rename(aside)
    staging.rename(target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def recover_dir(target: str | Path) -> Path | None:
    """After a crash inside `replace_dir`: put the old copy back when the new one never arrived."""
    target = Path(target)
    aside = target.with_name(f".{target.name}.old")
    if aside.exists() and not target.exists():
        aside.rename(target)
    return target if target.exists() else None


# --- hashing ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Sequence[str | Path]) -> str:
    """One hex sha256 over the contents of the existing files among `paths`, in order."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if path.is_file():
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


# --- environment ------------------------------------------------------------------------------------------


def library_versions(packages: Sequence[str] = EMBEDDING_PACKAGES) -> dict[str, str | None]:
    """Versions of Python, this library and `packages` (None for one that is not installed)."""
    import importlib.metadata as md
    import platform

    from retriever import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "retriever": __version__}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def lazy_import(module: str, pip: str, purpose: str = "") -> ModuleType:
    """Import an optional dependency, or raise MissingDependencyError with the exact install line."""
    from retriever.errors import MissingDependencyError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f"{purpose} needs {module}" if purpose else f"{module} is not installed"
        raise MissingDependencyError(f"{what}: pip install {pip}") from exc


# --- devices ---------------------------------------------------------------------------------------------


def pick_device(device: Any = None) -> Any:
    """The requested torch device, or CUDA when present, else CPU (the one default-device rule)."""
    import torch  # lazy: writing files must not need torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
