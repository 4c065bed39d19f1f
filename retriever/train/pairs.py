"""The unit of training data: one description paired with one tile, its group and its place; and PairSet <-> pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever.evaluate.data import PairSet
from retriever.train.losses import dense_codes


@dataclass(frozen=True)
class Pair:
    """A description and the tile it describes; pairs of one group are never each other's negatives."""

    text: str
    image: str  # path to the tile image
    group: str  # the building (GeoText-1652), location (CVG-Text) or tile id: relevance is by group
    lat: float = float("nan")
    lon: float = float("nan")
    split_group: str = ""  # what a validation split keeps together (building, location cell); default: group

    @property
    def leakage_key(self) -> str:
        return self.split_group or self.group


def pairset_to_pairs(pair_set: PairSet) -> list[Pair]:
    """Flatten a PairSet: relevance by image label, splits by its leakage group."""
    latlon = pair_set.image_latlon  # (I, 2) or None
    pairs = []
    for text, image in zip(pair_set.texts, pair_set.text_image.tolist(), strict=True):
        lat, lon = (
            (float(latlon[image, 0]), float(latlon[image, 1])) if latlon is not None else (math.nan, math.nan)
        )
        pairs.append(
            Pair(
                text=text,
                image=str(pair_set.images[image]),
                group=f"label-{pair_set.image_label[image]}",
                lat=lat,
                lon=lon,
                split_group=pair_set.group_names[pair_set.image_group[image]],
            )
        )
    return pairs


def pairs_to_pairset(pairs: Sequence[Pair], name: str = "pairs") -> PairSet:
    """The columnar view of pairs: each distinct image once, labelled by group, split-grouped by leakage key."""
    first: dict[str, Pair] = {}  # image -> the first pair that shows it
    for p in pairs:
        first.setdefault(p.image, p)
    gallery = list(first.values())
    index = {image: i for i, image in enumerate(first)}
    leakage = [p.leakage_key for p in gallery]
    latlon = np.array([[p.lat, p.lon] for p in gallery], dtype=np.float64).reshape(-1, 2)  # (I, 2)
    located = bool(len(latlon)) and bool(np.isfinite(latlon).all())
    text_image = np.array([index[p.image] for p in pairs], dtype=np.int64)  # (T,)
    return PairSet(
        name=name,
        texts=[p.text for p in pairs],
        images=[Path(p.image) for p in gallery],
        text_image=text_image,
        image_label=np.array(dense_codes([p.group for p in gallery]), dtype=np.int64),
        image_group=np.array(dense_codes(leakage), dtype=np.int64),
        group_names=list(dict.fromkeys(leakage)),
        image_latlon=latlon if located else None,
        text_latlon=latlon[text_image] if located else None,
    )
