"""Write a tiny fake CVG-Text city (annotation JSONs, satellite and OSM folders) with known answers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fakes import COLOURS, solid_tile

LAT0, LON0 = 40.7000, -74.0000
STEP_DEG = 0.00036  # about 40 m of latitude between neighbouring locations


def location(i: int, single: bool) -> tuple[float, float]:
    """Locations on two parallel north-south lines: panoramas at LON0, single views ~84 m east."""
    return round(LAT0 + i * STEP_DEG, 6), round(LON0 + (0.001 if single else 0.0), 6)


def file_name(i: int, single: bool) -> str:
    """Panoramas have three '_'-separated parts, single views two (the official panorama rule)."""
    lat, lon = location(i, single)
    return (
        f"{lat:.6f},{lon:.6f}_{i * 30 % 360}.jpg"
        if single
        else f"{lat:.6f},{lon:.6f}_pano{i:04d}_2019-06.jpg"
    )


def colour_of(i: int, single: bool) -> str:
    return COLOURS[(i + (4 if single else 0)) % len(COLOURS)]


def caption(i: int, single: bool, confused: bool) -> str:
    """A street-level description naming the tile's colour, or with confused the next location's colour."""
    colour = colour_of(i + 1, single) if confused else colour_of(i, single)
    return f"Street view: a {colour} facade by the corner, a tram stop, house {i}."


def make_cvgtext(
    root: str | Path,
    city: str = "NewYork",
    *,
    n_panorama: int = 10,
    n_single: int = 6,
    train_offset: int = 100,
    n_train: int = 4,
    confuse_every: int = 5,
    size: int = 16,
) -> Path:
    """Write test (and a small train) split for one city under root; return root.

    Test location i of each subset is painted COLOURS[(i + offset) % 8] in both views. Every
    `confuse_every`-th caption (i = 0, 5, ...) names the colour of location i + 1 instead: its
    top-1 is then that neighbour, about 40 m away (an L@50 hit, an R@1 miss).
    Train locations start at index train_offset, far from the test ones.
    """
    root = Path(root)
    for single, subset, n in ((False, city, n_panorama), (True, f"{city}-photos", n_single)):
        for split, indices in (("test", range(n)), ("train", range(train_offset, train_offset + n_train))):
            mapping = {}
            for i in indices:
                confused = split == "test" and confuse_every > 0 and i % confuse_every == 0
                mapping[file_name(i, single)] = caption(i, single, confused)
                for view in ("satellite", "OSM"):
                    path = root / f"{subset}-{view}" / file_name(i, single)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    solid_tile(colour_of(i, single), size).save(path, format="JPEG", quality=95)
            ann = root / "CVG-text" / subset / f"{split}.json"
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(json.dumps(mapping, indent=1))
    return root
