"""ZeroGPU support: model calls run under `spaces.GPU` when that package is importable, unchanged elsewhere."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)


def _spaces() -> ModuleType | None:
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def on_gpu(fn: F | None = None, *, duration: int | None = None) -> F | Callable[[F], F]:
    """Decorator: `spaces.GPU(duration=...)` on a ZeroGPU Space, a no-op everywhere else.

    Use bare (`@on_gpu`) or with a budget in seconds (`@on_gpu(duration=120)`).
    """

    def wrap(f: F) -> F:
        spaces = _spaces()
        if spaces is None or not hasattr(spaces, "GPU"):
            return f
        log.info("wrapping %s with spaces.GPU", getattr(f, "__name__", f))
        return spaces.GPU(duration=duration)(f) if duration else spaces.GPU(f)

    return wrap if fn is None else wrap(fn)
