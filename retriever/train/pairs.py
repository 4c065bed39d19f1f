"""The unit of training data: one description paired with one tile, its group and its place."""

from __future__ import annotations

from dataclasses import dataclass


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
