"""Decoding tile images with errors that name the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from retriever.errors import ImageDecodeError

ImageLike = Image.Image | str | Path


def open_image(source: ImageLike) -> Image.Image:
    """Decode one image to RGB, or raise ImageDecodeError naming the file."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise ImageDecodeError(f"Image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside the model
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageDecodeError(f"Cannot decode image {path}: {err}") from err


def open_images(
    sources: Sequence[ImageLike], skip_unreadable: bool = False
) -> tuple[list[Image.Image], list[int]]:
    """Decode many images; return the decoded ones and the indices that failed (only when skipping)."""
    images: list[Image.Image] = []
    failed: list[int] = []
    for i, source in enumerate(sources):
        try:
            images.append(open_image(source))
        except ImageDecodeError:
            if not skip_unreadable:
                raise
            failed.append(i)
    return images, failed
