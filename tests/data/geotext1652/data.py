"""Write a tiny fake GeoText-1652 (train.json, test_951_version.json, solid-colour images) with known answers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fakes import COLOURS, solid_tile

# Test buildings, in file order, and the palette colour of all their images.
TEST_BUILDINGS = ("0001", "0002", "0003")
TRAIN_BUILDINGS = ("0101", "0102", "0103", "0104")


def _entry(building: str, n: int, split: str, caption: str | list[str]) -> dict:
    image_id = f"{building}/image-{n:02d}.jpeg"
    return {
        "image_id": image_id,
        "image": f"{split}/{image_id}",
        "caption": caption,
        "sentences": ["the roof", "a courtyard", None],
        "bboxes": [[0.1, 0.1, 0.5, 0.5], [0.3, 0.4, 0.2, 0.2], None],
    }


def captions_for(building_index: int, image_n: int, captions_per_image: int, confuse: bool) -> list[str]:
    """Captions naming the building's colour; with confuse, the last one of building 0 names building 1's."""
    colour = COLOURS[building_index]
    out = [f"a {colour} building seen from the drone, view {image_n}.{c}" for c in range(captions_per_image)]
    if confuse and building_index == 0:
        out[-1] = f"a {COLOURS[1]} building seen from the drone, view {image_n}.x"
    return out


def make_geotext1652(
    root: str | Path,
    *,
    images_per_building: int = 3,
    captions_per_image: int = 3,
    confuse: bool = True,
    size: int = 16,
) -> Path:
    """Write the dataset under root and return root.

    Test: buildings 0001/0002/0003 painted red/green/blue, `images_per_building` drone images
    each, `captions_per_image` captions per image naming the colour. With confuse=True the last
    caption of every image of 0001 says "green" instead, so those texts retrieve 0002 first.
    Train: four more buildings (yellow, cyan, magenta, white), two images, one caption per entry
    and two entries per image (as in the real train.json, where images repeat).
    """
    root = Path(root)
    test, train = [], []
    for b, building in enumerate(TEST_BUILDINGS):
        for n in range(1, images_per_building + 1):
            entry = _entry(building, n, "test", captions_for(b, n, captions_per_image, confuse))
            test.append(entry)
            _write(root / "images" / entry["image"], COLOURS[b], size)
    for b, building in enumerate(TRAIN_BUILDINGS, start=len(TEST_BUILDINGS)):
        for n in range(1, 3):
            for c in range(2):
                entry = _entry(building, n, "train", f"a {COLOURS[b]} campus building, photo {n}, text {c}")
                train.append(entry)
            _write(root / "images" / entry["image"], COLOURS[b], size)
    (root / "test_951_version.json").write_text(json.dumps(test, indent=1))
    (root / "train.json").write_text(json.dumps(train, indent=1))
    return root


def _write(path: Path, colour: str, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    solid_tile(colour, size).save(path, format="JPEG", quality=95)
