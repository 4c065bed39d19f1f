"""Street-scene descriptions generated from OSM features, split by phrasing, plus BM25 and random baselines."""

from __future__ import annotations

import functools
import json
import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import Point
from shapely.ops import nearest_points
from tqdm import tqdm

from demo import require
from demo.osm import METRIC_CRS, Layers, named_features
from retriever.bm25 import ContextMatcher  # one BM25 for the baseline and the app's hybrid mode
from retriever.errors import DataFormatError
from retriever.evaluate.metrics import first_relevant, haversine_km, recall_at_k

SPLITS = ("train", "val")
STREET_CLASSES = (
    "primary",
    "secondary",
    "tertiary",
    "residential",
    "pedestrian",
    "service",
    "footway",
    "cycleway",
)
STREET_REACH_M = 25.0  # a street further than this is not "the street I'm on"
THING_REACH_M = 45.0  # how far a pedestrian reads signs
AREA_REACH_M = 60.0  # parks, squares and water are visible from further away
CROSS_REACH_M = 30.0  # a second street this close makes a corner
LANDMARK_REACH_M = 150.0  # a big or distinctive building is seen from across the tile
SURROUND_REACH_M = 200.0  # the water, a park or a square is named from further away
CHAT_P = 0.3  # share written as phone chat: lower case, little punctuation
LANDMARK_CATEGORIES = {"worship", "culture", "transport", "hotel", "education"}
ON_STREET_P = 0.85  # share of locations on a street; the rest anywhere in the tile (parks, squares, yards)
ENGLISH_NAME_P = 0.35  # share of mentions of a feature with a name:en that use it: many visitors read English

# Which description feature type each named feature counts as (coverage is tested per type).
FEATURE_TYPES: tuple[str, ...] = (
    "street",
    "cross_street",
    "poi:food",
    "poi:shop",
    "poi:culture",
    "poi:hotel",
    "poi:worship",
    "poi:education",
    "poi:health",
    "poi:transport",
    "poi:other",
    "park",
    "water",
    "square",
    "building",
    "tram",
    "rail",
)
AREA_TYPES: dict[str, str] = {"green": "park", "water": "water", "squares": "square"}

# --- phrasing: every pool is split in two, train and held-out validation -------------------------------------

# Synonyms a pedestrian uses for a kind. The canonical kind word (from osm.py) is shared by both splits,
# as real people say "restaurant"; the alternatives are disjoint, so validation measures paraphrase.
SYNONYMS: dict[str, dict[str, list[str]]] = {
    "café": {
        "train": ["coffee shop", "cafe", "coffee bar"],
        "val": ["coffee place", "coffeehouse", "espresso bar"],
    },
    "restaurant": {
        "train": ["eatery", "place to eat", "dining spot"],
        "val": ["bistro", "diner", "spot for dinner"],
    },
    "fast food place": {
        "train": ["burger joint", "takeaway", "fast-food joint"],
        "val": ["snack bar", "quick-food counter"],
    },
    "pub": {"train": ["bar", "boozer"], "val": ["tavern", "drinking spot"]},
    "bar": {"train": ["cocktail bar", "drinks place"], "val": ["lounge", "watering hole"]},
    "nightclub": {"train": ["club", "disco"], "val": ["dance club", "night spot"]},
    "bakery": {"train": ["bakers"], "val": ["bread shop"]},
    "clothes shop": {"train": ["clothing store", "fashion store"], "val": ["apparel shop", "boutique"]},
    "shoe shop": {"train": ["shoe store"], "val": ["footwear shop"]},
    "jewellery shop": {"train": ["jeweller", "jewelry store"], "val": ["jewelers"]},
    "hairdresser": {"train": ["barber", "hair salon"], "val": ["barbershop", "salon"]},
    "beauty salon": {"train": ["beauty parlour"], "val": ["spa", "nail salon"]},
    "bookshop": {"train": ["bookstore"], "val": ["book shop"]},
    "supermarket": {"train": ["grocery store", "grocery"], "val": ["food store", "market hall shop"]},
    "convenience store": {"train": ["corner shop", "minimarket"], "val": ["24h shop", "small grocery"]},
    "kiosk": {"train": ["R-kiosk style kiosk", "newsstand"], "val": ["little booth", "news kiosk"]},
    "department store": {"train": ["big department store"], "val": ["large store"]},
    "shopping centre": {"train": ["mall", "shopping mall"], "val": ["shopping arcade", "shopping complex"]},
    "hotel": {"train": ["inn", "place to stay"], "val": ["lodging", "accommodation"]},
    "hostel": {"train": ["backpackers"], "val": ["budget hotel"]},
    "church": {"train": ["chapel", "church building"], "val": ["house of worship", "old church"]},
    "museum": {"train": ["exhibition building"], "val": ["museum building"]},
    "art gallery": {"train": ["gallery"], "val": ["art space"]},
    "artwork": {"train": ["statue", "sculpture"], "val": ["public art piece", "monument-like sculpture"]},
    "memorial": {"train": ["memorial stone", "plaque"], "val": ["commemorative marker"]},
    "theatre": {"train": ["playhouse"], "val": ["stage"]},
    "library": {"train": ["public library"], "val": ["reading room"]},
    "fountain": {"train": ["water fountain"], "val": ["spouting fountain"]},
    "pharmacy": {"train": ["chemist", "apteekki"], "val": ["drugstore", "apotek"]},
    "school": {"train": ["schoolhouse"], "val": ["school building"]},
    "university": {"train": ["university building", "campus"], "val": ["college building"]},
    "tram stop": {"train": ["tram station", "tram shelter"], "val": ["streetcar stop", "tram platform"]},
    "metro entrance": {
        "train": ["subway entrance", "metro stairs"],
        "val": ["underground entrance", "metro station entrance"],
    },
    "railway station": {"train": ["train station"], "val": ["central station"]},
    "city bike station": {"train": ["bike rental", "city bikes"], "val": ["bike-share dock"]},
    "taxi stand": {"train": ["taxi rank"], "val": ["cab stand"]},
    "car park": {"train": ["parking lot", "parking"], "val": ["parking garage"]},
    "bank": {"train": ["bank branch"], "val": ["bank office"]},
    "cash machine": {"train": ["ATM"], "val": ["cashpoint"]},
    "embassy": {"train": ["consulate"], "val": ["diplomatic mission"]},
    "park": {"train": ["green area", "little park"], "val": ["greenery", "public garden"]},
    "garden": {"train": ["botanical garden"], "val": ["gardens"]},
    "playground": {"train": ["play area"], "val": ["kids' playground"]},
    "sea": {"train": ["the harbour", "the seaside"], "val": ["the seafront", "open water"]},
    "bay": {"train": ["the sea", "the shoreline"], "val": ["the inlet", "the shore"]},
    "water": {"train": ["a pond", "the lake"], "val": ["a pool of water", "the waterside"]},
    "basin": {"train": ["a pond"], "val": ["an ornamental pool"]},
    "square": {"train": ["plaza", "open square"], "val": ["piazza", "open space"]},
    "building": {"train": ["big building"], "val": ["large block"]},
}
# Kinds said with their own article ("the bay", not "a bay").
CANONICAL: dict[str, str] = {"sea": "the sea", "bay": "the bay", "water": "the water", "strait": "the strait"}
# Words both splits may use as they are: the bare sides and the empty opener/closer.
SHARED_WORDS = {"", "left", "right"}
# When a kind has no entry above: a word for its whole category.
CATEGORY_WORDS: dict[str, dict[str, list[str]]] = {
    "food": {"train": ["place to grab food"], "val": ["food place"]},
    "shop": {"train": ["store"], "val": ["storefront"]},
    "culture": {"train": ["sight"], "val": ["landmark"]},
    "hotel": {"train": ["place to sleep"], "val": ["lodging house"]},
    "worship": {"train": ["chapel"], "val": ["place of prayer"]},
    "education": {"train": ["schoolhouse"], "val": ["educational building"]},
    "health": {"train": ["clinic"], "val": ["medical place"]},
    "transport": {"train": ["transit stop"], "val": ["transport stop"]},
    "other": {"train": ["office"], "val": ["business"]},
}

PHRASEBOOK: dict[str, dict[str, list[str]]] = {
    "train": {
        "opener": ["", "", "", "Hi!", "Okay, here goes.", "Help, I'm a bit lost.", "Quick one:"],
        "closer": ["", "", "", " Where am I?", " Can you find me?", " Where is this?"],
        "street": [
            "I'm standing on {street}.",
            "I'm walking along {street}.",
            "This is {street}, I think.",
            "The street sign says {street}.",
            "I'm somewhere on {street}.",
            "I'm on {street}.",
        ],
        "corner": [
            "I'm at the corner of {street} and {cross}.",
            "Standing where {street} meets {cross}.",
            "{street} crosses {cross} right here.",
            "Corner of {street} and {cross}.",
        ],
        "side": [
            "On my {side} there's {thing}.",
            "To my {side} I can see {thing}.",
            "{Thing} is on my {side}.",
            "There is {thing} on the {side}.",
        ],
        "across": [
            "Across the street there's {thing}.",
            "On the other side of the road I see {thing}.",
            "Opposite me is {thing}.",
            "Across the road: {thing}.",
        ],
        "ahead": [
            "Further down the street there's {thing}.",
            "Up ahead I can see {thing}.",
            "A little way ahead is {thing}.",
        ],
        "behind": ["Behind me is {thing}.", "I just walked past {thing}."],
        "signs": [
            "I can see signs for {names}.",
            "Shop signs around me: {names}.",
            "Nearby there's {things}.",
            "Around me: {things}.",
            "I see {things}.",
        ],
        "one_thing": [
            "Right next to me is {thing}.",
            "I'm standing in front of {thing}.",
            "I'm right by {thing}.",
            "There's {thing} right here.",
        ],
        "area_named": [
            "{name} is {where}.",
            "There's {kind_a} {where}, {name}.",
            "I can see {name} {where}.",
        ],
        "area_unnamed": ["There's {kind_a} {where}.", "I can see {kind_a} {where}."],
        "building": [
            "There's a big building with {name} written on it.",
            "The building {where} is {name}.",
            "{name} is the building {where}.",
        ],
        "tram": [
            "Tram tracks run along the street.",
            "There are tram rails in the road.",
            "A tram line goes past here.",
        ],
        "rail": [
            "I can see railway tracks nearby.",
            "Train tracks are close by.",
            "There's a railway right next to me.",
        ],
        "road_primary": ["It's a wide, busy road with lots of traffic.", "Big avenue, several lanes."],
        "road_secondary": ["A fairly busy street.", "There's quite a lot of traffic."],
        "road_quiet": ["A quiet side street.", "Not much traffic here."],
        "road_pedestrian": ["It's a pedestrian street, no cars.", "Car-free street."],
        "road_path": ["I'm on a footpath.", "It's just a path, no cars."],
        "hedge": ["I think", "maybe", "probably"],
        "partial": ["something like {part}...", "{part}-something", "{part}... can't read the rest"],
        "no_name": ["{kind_a}", "{kind_a} (can't read the name)", "some {kind}"],
        "named": [
            "{kind_a} called {name}",
            "{name} ({kind})",
            "a {kind} with a sign saying {name}",
            "{name}",
            "the {name} {kind}",
        ],
        "left": ["left", "left-hand side"],
        "right": ["right", "right-hand side"],
        "where_left": ["on my left", "to the left"],
        "where_right": ["on my right", "to the right"],
        "where_across": ["across the street", "on the opposite side"],
        "where_near": ["right here", "next to me", "nearby"],
        "joiner": [" and ", ", and ", " plus "],
        "landmark": [
            "I'm standing near {thing}.",
            "There's {thing} {where}.",
            "I'm looking at {thing}.",
            "In front of me is {thing}.",
            "I can see {thing} from here.",
        ],
        "surroundings": [
            "There's {area} nearby.",
            "Not far away is {area}.",
            "{area} is close by.",
            "It's by {area}.",
        ],
    },
    "val": {
        "opener": ["", "", "", "Hello.", "Need help locating myself.", "Here's what I see:"],
        "closer": ["", "", "", " Any idea where this is?", " Which spot is this?"],
        "street": [
            "The sign on the corner reads {street}.",
            "My street is {street}.",
            "Currently on {street}.",
            "Looks like I'm on {street}.",
        ],
        "corner": [
            "Right at the junction of {street} with {cross}.",
            "{cross} branches off {street} here.",
            "Intersection: {street} / {cross}.",
        ],
        "side": [
            "Off to my {side}: {thing}.",
            "{Thing} sits to the {side} of me.",
            "Over on the {side} stands {thing}.",
        ],
        "across": [
            "Over the road from me there's {thing}.",
            "Facing me across the street: {thing}.",
            "On the far side of the street is {thing}.",
        ],
        "ahead": ["A bit further on there's {thing}.", "In front of me, down the block, {thing}."],
        "behind": ["Back the way I came there's {thing}."],
        "signs": [
            "The signs I can read: {names}.",
            "Storefronts here say {names}.",
            "Close by I notice {things}.",
        ],
        "one_thing": ["I'm next to {thing}.", "Beside me there's {thing}.", "Directly by me: {thing}."],
        "area_named": ["{name} lies {where}.", "{where_cap} is {kind_a} - {name}."],
        "area_unnamed": ["{where_cap} there's {kind_a}.", "Spotted {kind_a} {where}."],
        "building": [
            "A large block {where} has {name} on its facade.",
            "The lettering on the building {where} says {name}.",
        ],
        "tram": ["Streetcar rails in the middle of the road.", "Trams pass by on this street."],
        "rail": ["Railway lines are visible close by.", "Trains run just next to here."],
        "road_primary": ["Main road, heavy traffic.", "Very broad street with many lanes."],
        "road_secondary": ["Moderate traffic on this street."],
        "road_quiet": ["Calm little street.", "Hardly any cars around."],
        "road_pedestrian": ["Walking street, closed to cars."],
        "road_path": ["Only a walkway here."],
        "hedge": ["I guess", "perhaps", "not sure but"],
        "partial": ["starts with {part}", "{part}-something, partly hidden"],
        "no_name": ["{kind_a} without a readable sign", "what looks like {kind_a}", "an unnamed {kind}"],
        "named": [
            "{kind_a} named {name}",
            "{name}, some sort of {kind}",
            "a sign for {name}",
            "{kind_a} - the sign reads {name}",
        ],
        "left": ["left", "left side"],
        "right": ["right", "right side"],
        "where_left": ["off to my left", "on the left side"],
        "where_right": ["off to my right", "on the right side"],
        "where_across": ["over the road", "on the far side"],
        "where_near": ["just by me", "close by"],
        "joiner": [" & ", ", then ", " as well as "],
        "landmark": ["Right by {thing}.", "{thing} stands {where}.", "Facing {thing}."],
        "surroundings": ["Just beyond is {area}.", "With {area} a short walk away.", "Next to {area}."],
    },
}

ROAD_SAY: dict[str, str] = {
    "primary": "road_primary",
    "secondary": "road_secondary",
    "tertiary": "road_secondary",
    "residential": "road_quiet",
    "service": "road_quiet",
    "pedestrian": "road_pedestrian",
    "footway": "road_path",
    "cycleway": "road_path",
}

# Templates: the order in which a pedestrian says things. Names and plans are disjoint between splits.


@dataclass(frozen=True)
class Plan:
    """A template: how often it is drawn, and the slots it says in order (a slot with nothing to say is skipped)."""

    weight: float
    slots: tuple[str, ...]


PLANS: dict[str, dict[str, Plan]] = {
    "train": {
        "walk": Plan(3, ("opener", "street", "side", "across", "signs", "closer")),
        "corner_signs": Plan(3, ("corner", "signs")),
        "signs_first": Plan(2, ("signs", "street", "area")),
        "landmark": Plan(2, ("area", "street", "side", "across")),
        "minimal": Plan(0.5, ("one_thing",)),
        "transit": Plan(1.5, ("street", "transit", "across", "side")),
        "ahead": Plan(1.5, ("street", "road", "ahead", "side", "across")),
        "facade": Plan(1.5, ("building", "across", "street", "signs")),
        "rich": Plan(2, ("opener", "corner", "side", "across", "area", "transit", "signs", "closer")),
        "list": Plan(1, ("signs",)),
        "lost_in_park": Plan(1, ("opener", "area", "one_thing", "signs", "closer")),
        "landmark_first": Plan(2, ("landmark", "surroundings", "street")),
        "look_landmark": Plan(3, ("landmark", "surroundings", "transit")),
        "look_around": Plan(2, ("one_thing", "surroundings", "road", "across")),
    },
    "val": {
        "across_first": Plan(3, ("across", "street", "signs")),
        "area_story": Plan(2, ("opener", "area", "side", "corner", "closer")),
        "terse": Plan(0.7, ("one_thing", "transit")),
        "sign_corner": Plan(3, ("signs", "corner", "ahead")),
        "detailed": Plan(2.5, ("street", "road", "building", "side", "across", "area", "behind", "closer")),
        "checklist": Plan(1, ("signs", "area")),
        "landmark_view": Plan(2, ("landmark", "across", "surroundings")),
        "look_scene": Plan(3, ("surroundings", "landmark", "road")),
    },
}

KEYBOARD_NEIGHBOURS: dict[str, str] = {
    "a": "qsz", "b": "vgn", "c": "xdv", "d": "sfe", "e": "wrd", "f": "dgr", "g": "fht", "h": "gjy", "i": "uok",
    "j": "hku", "k": "jli", "l": "kop", "m": "nj", "n": "bmh", "o": "ipl", "p": "ol", "q": "wa", "r": "etf",
    "s": "adw", "t": "rgy", "u": "yij", "v": "cbf", "w": "qes", "x": "zcs", "y": "tuh", "z": "xa",
}  # fmt: skip


# --- scenes: what a pedestrian at a point can see -----------------------------------------------------------


def _text(value: object) -> str | None:
    """A name cell as str, or None for a missing one (NaN, None)."""
    return value if isinstance(value, str) else None


@dataclass
class Thing:
    """One feature as seen from the pedestrian's spot."""

    name: str | None
    name_sv: str | None
    kind: str
    category: str
    ftype: str  # one of FEATURE_TYPES
    dist: float
    lateral: float  # metres to the left (+) or right (-) of the walking direction
    along: float  # metres ahead (+) or behind (-)
    across: bool  # on the other side of the street from the pedestrian
    preset: str | None = None  # its iD tagging-schema preset (retriever.vocabulary)
    looks: str = ""  # adjectives from its descriptive tags ("tall white domed")
    name_en: str | None = None  # its name:en, as tourist maps print it ("Senate Square")


@dataclass
class Scene:
    """Everything a description may draw on, for one location."""

    x: float
    y: float
    street: Thing | None
    street_class: str | None
    cross: list[Thing] = field(default_factory=list)
    things: list[Thing] = field(default_factory=list)  # POIs and named buildings, nearest first
    areas: list[Thing] = field(default_factory=list)  # parks, squares, water, nearest first
    tram: bool = False
    rail: bool = False
    landmarks: list[Thing] = field(
        default_factory=list
    )  # what stands out in the tile, up to LANDMARK_REACH_M
    surroundings: list[Thing] = field(default_factory=list)  # parks, squares, water up to SURROUND_REACH_M


def is_landmark(row: pd.Series) -> bool:
    """Prominent enough to describe from anywhere in the tile: a named building, a distinctive look, a sight."""
    looks = row.get("looks")
    if isinstance(looks, str) and looks:
        return True
    if row["layer"] == "buildings":
        return isinstance(row["name"], str)
    return row["category"] in LANDMARK_CATEGORIES


class SceneBuilder:
    """Answers "what is around (x, y)" from the OSM layers, restricted to what one tile shows."""

    def __init__(self, layers: Layers) -> None:
        feats = named_features(layers)
        roads = layers["roads"]
        roads = roads[
            roads["name"].notna() & ~roads["tunnel"].astype(bool) & roads["category"].isin(STREET_CLASSES)
        ]
        self.streets = roads.reset_index(drop=True)
        self.street_tree = shapely.STRtree(self.streets.geometry.values)
        pois = layers["pois"]
        unnamed = pois[pois["name"].isna()]  # kiosks, tram stops...: said without a name
        things = pd.concat(
            [feats[feats["layer"].isin(["pois", "buildings"])], unnamed.assign(layer="pois")],
            ignore_index=True,
        )
        self.things = gpd.GeoDataFrame(things, geometry="geometry", crs=METRIC_CRS)
        self.thing_tree = shapely.STRtree(self.things.geometry.values)
        green = layers["green"]
        areas = pd.concat(
            [
                green[green["category"].isin(["park", "garden", "playground"])].assign(layer="green"),
                layers["water"][layers["water"].geometry.area > 50].assign(layer="water"),
                layers["squares"].assign(layer="squares"),
            ],
            ignore_index=True,
        )
        self.areas = gpd.GeoDataFrame(areas, geometry="geometry", crs=METRIC_CRS)
        self.area_tree = shapely.STRtree(self.areas.geometry.values)
        rail = layers["rail"]
        rail = rail[~rail["tunnel"].astype(bool)]
        self.tram = (
            rail[rail["category"] == "tram"].geometry.union_all()
            if (rail["category"] == "tram").any()
            else None
        )
        self.rail = (
            rail[rail["category"] == "rail"].geometry.union_all()
            if (rail["category"] == "rail").any()
            else None
        )

    def add_view(
        self, scene: Scene, p: Point, footprint: shapely.Geometry, seen: Callable[..., Thing]
    ) -> None:
        """The far view: landmarks up to LANDMARK_REACH_M and surroundings up to SURROUND_REACH_M, in the tile."""
        for i in self.thing_tree.query(p.buffer(LANDMARK_REACH_M), predicate="intersects"):
            row = self.things.iloc[i]
            if row.geometry.intersects(footprint) and is_landmark(row):
                ftype = "building" if row["layer"] == "buildings" else f"poi:{row['category']}"
                scene.landmarks.append(seen(row.geometry, row, ftype))
        for i in self.area_tree.query(p.buffer(SURROUND_REACH_M), predicate="intersects"):
            row = self.areas.iloc[i]
            if row.geometry.intersects(footprint):
                scene.surroundings.append(seen(row.geometry, row, AREA_TYPES[row["layer"]]))
        scene.landmarks.sort(key=lambda t: (t.dist, t.name or "", t.kind))
        scene.surroundings.sort(key=lambda t: (t.dist, t.name or "", t.kind))

    def street_spots(self, region: shapely.Geometry) -> list[shapely.Geometry]:
        """Street lines clipped to `region`: where pedestrians stand."""
        idx = self.street_tree.query(region, predicate="intersects")
        parts = [self.streets.geometry.iloc[i].intersection(region) for i in sorted(idx)]
        return [p for p in parts if not p.is_empty and p.length > 1]

    def scene(self, x: float, y: float, footprint: shapely.Geometry, rng: random.Random) -> Scene:
        """The scene at (x, y); only features that intersect `footprint` (the tile) are kept."""
        p = Point(x, y)
        street, cls, qx, qy, fx, fy = None, None, x, y, 1.0, 0.0
        idx = self.street_tree.query(p.buffer(STREET_REACH_M), predicate="intersects")
        if len(idx):
            dists = [
                (self.streets.geometry.iloc[i].distance(p), self.streets["name"].iloc[i], i) for i in idx
            ]
            _, _, best = min(dists)
            line = self.streets.geometry.iloc[best]
            at = line.project(p)
            q, a, b = (
                line.interpolate(at),
                line.interpolate(max(at - 2, 0)),
                line.interpolate(min(at + 2, line.length)),
            )
            norm = math.hypot(b.x - a.x, b.y - a.y) or 1.0
            sign = rng.choice((1.0, -1.0))  # which way the pedestrian walks
            qx, qy, fx, fy = q.x, q.y, sign * (b.x - a.x) / norm, sign * (b.y - a.y) / norm
            row = self.streets.iloc[best]
            street = Thing(
                row["name"],
                row["name_sv"],
                row["kind"],
                row["category"],
                "street",
                p.distance(line),
                0,
                0,
                False,
                name_en=_text(row.get("name_en")),
            )
            cls = row["category"]
        else:
            fx, fy = rng.choice(((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)))
        my_side = (x - qx) * -fy + (y - qy) * fx  # > 0: the pedestrian stands left of the centre line
        if abs(my_side) < 0.5:
            my_side = rng.choice((1.0, -1.0))

        def seen(geom: shapely.Geometry, row: pd.Series, ftype: str) -> Thing:
            near = nearest_points(geom, p)[0] if geom.geom_type != "Point" else geom
            vx, vy = near.x - qx, near.y - qy
            lateral, along = vx * -fy + vy * fx, vx * fx + vy * fy
            across = street is not None and abs(lateral) > 4 and (lateral > 0) != (my_side > 0)
            look = row.get("looks")
            return Thing(
                _text(row["name"]),
                _text(row.get("name_sv")),
                row["kind"],
                row["category"],
                ftype,
                geom.distance(p),
                lateral,
                along,
                across,
                _text(row.get("preset")),
                look if isinstance(look, str) else "",
                _text(row.get("name_en")),
            )

        scene = Scene(x, y, street, cls)
        if street is not None:
            seen_names = {street.name}
            for i in sorted(idx, key=lambda i: (self.streets.geometry.iloc[i].distance(p), i)):
                row = self.streets.iloc[i]
                geom = row.geometry
                if (
                    row["name"] in seen_names
                    or geom.distance(p) > CROSS_REACH_M
                    or not geom.intersects(footprint)
                ):
                    continue
                seen_names.add(row["name"])
                scene.cross.append(seen(geom, row, "cross_street"))
        for i in self.thing_tree.query(p.buffer(THING_REACH_M), predicate="intersects"):
            row = self.things.iloc[i]
            if not row.geometry.intersects(footprint):
                continue
            ftype = "building" if row["layer"] == "buildings" else f"poi:{row['category']}"
            scene.things.append(seen(row.geometry, row, ftype))
        for i in self.area_tree.query(p.buffer(AREA_REACH_M), predicate="intersects"):
            row = self.areas.iloc[i]
            if row.geometry.intersects(footprint):
                scene.areas.append(seen(row.geometry, row, AREA_TYPES[row["layer"]]))
        self.add_view(scene, p, footprint, seen)
        scene.things.sort(key=lambda t: (t.dist, t.ftype == "building", t.name or "", t.kind))
        names: set[str] = set()
        unique = []
        for t in scene.things:  # a church is often both a building and a POI of the same name: say it once
            if t.name is None or t.name.lower() not in names:
                unique.append(t)
                names.add((t.name or "").lower())
        scene.things = unique
        scene.areas.sort(key=lambda t: (t.dist, t.name or "", t.kind))
        scene.tram = self.tram is not None and self.tram.distance(p) < 15 and self.tram.intersects(footprint)
        scene.rail = self.rail is not None and self.rail.distance(p) < 60 and self.rail.intersects(footprint)
        return scene


# --- rendering a scene as text -------------------------------------------------------------------------------


class Writer:
    """Turns one Scene into one description in a split's phrasing, tracking which feature types it mentions."""

    def __init__(self, scene: Scene, split: str, rng: random.Random) -> None:
        self.scene, self.split, self.rng = scene, split, rng
        self.book = PHRASEBOOK[split]
        self.used: set[int] = set()  # ids of things already said
        self.mentions: list[str] = []
        self.vague = rng.random() < 0.25  # this speaker hedges and skips names more often
        self.no_names = False  # set by the landmark plans: a visitor who describes, reads no sign

    def pick(self, key: str) -> str:
        return self.rng.choice(self.book[key])

    def kind_word(self, thing: Thing) -> str:
        roll = self.rng.random()
        words = preset_words(thing.preset, self.split)
        if words and roll < PRESET_WORD_P:  # the words people search the map with (iD's names and terms)
            word = self.rng.choice(words)
        else:
            pools = SYNONYMS.get(thing.kind) or CATEGORY_WORDS.get(thing.category)
            if pools and roll < PRESET_WORD_P + 0.3:
                word = self.rng.choice(pools[self.split])
            else:
                word = CANONICAL.get(thing.kind, thing.kind)
        if thing.looks and self.rng.random() < LOOKS_P:
            word = f"{thing.looks} {word}"
        return word

    def name_of(self, thing: Thing, partial: bool = True) -> str | None:
        if thing.name is None or self.no_names:
            return None
        if thing.name_en and thing.name_en != thing.name and self.rng.random() < ENGLISH_NAME_P:
            return thing.name_en  # visitors read the English name off a tourist map
        if thing.name_sv and thing.name_sv != thing.name and self.rng.random() < 0.1:
            return thing.name_sv  # Helsinki's signs are bilingual: some read the Swedish line
        if partial and len(thing.name) > 7 and self.rng.random() < (0.15 if self.vague else 0.04):
            cut = self.rng.randint(4, max(4, len(thing.name) // 2 + 1))
            return self.pick("partial").format(part=thing.name[:cut])
        return thing.name

    def thing(self, thing: Thing) -> str:
        self.used.add(id(thing))
        self.mentions.append(thing.ftype)
        kind = self.kind_word(thing)
        name = self.name_of(thing)
        skip_name = thing.ftype != "building" and self.rng.random() < (0.25 if self.vague else 0.07)
        if name is None or skip_name:
            return self.pick("no_name").format(kind=kind, kind_a=_a(kind))
        text = self.pick("named").format(kind=kind, kind_a=_a(kind), name=name)
        if self.vague and self.rng.random() < 0.3:
            text = f"{self.pick('hedge')} {text}"
        return text

    def where(self, thing: Thing) -> str:
        if thing.across:
            return self.pick("where_across")
        if abs(thing.lateral) < 3 or self.scene.street is None and thing.dist < 10:
            return self.pick("where_near")
        return self.pick("where_left" if thing.lateral > 0 else "where_right")

    def fresh(
        self, pool: Sequence[Thing], k: int = 1, where: Callable[[Thing], bool] | None = None
    ) -> list[Thing]:
        """Up to k unused things, nearer ones more likely."""
        cands = [t for t in pool if id(t) not in self.used and (where is None or where(t))]
        out: list[Thing] = []
        while cands and len(out) < k:
            weights = [1.0 / (5.0 + t.dist) for t in cands]
            choice = self.rng.choices(range(len(cands)), weights=weights)[0]
            out.append(cands.pop(choice))
        return out

    def street_name(self, thing: Thing) -> str:
        self.mentions.append(thing.ftype)
        return self.name_of(thing, partial=False) or thing.kind

    # Slots: each returns a sentence, or None when the scene has nothing for it.
    def s_opener(self) -> str | None:
        return self.pick("opener").strip() or None

    def s_closer(self) -> str | None:
        return self.pick("closer").strip() or None

    def s_street(self) -> str | None:
        if self.scene.street is None or "street" in self.mentions:
            return None
        return self.pick("street").format(street=self.street_name(self.scene.street))

    def s_road(self) -> str | None:
        if self.scene.street_class is None:
            return None
        return self.pick(ROAD_SAY[self.scene.street_class])

    def s_corner(self) -> str | None:
        if self.scene.street is None or not self.scene.cross or "street" in self.mentions:
            return self.s_street()
        cross = self.scene.cross[0]
        text = self.pick("corner").format(
            street=self.street_name(self.scene.street), cross=self.street_name(cross)
        )
        return text[0].upper() + text[1:]

    def _about(self, key: str, where: Callable[[Thing], bool], k: int) -> str | None:
        picked = self.fresh(self.scene.things, k=k, where=where)
        if not picked:
            return None
        said = self.pick("joiner").join(self.thing(t) for t in picked)
        side = "left" if picked[0].lateral > 0 else "right"
        text = self.pick(key)
        return text.format(thing=said, Thing=said[0].upper() + said[1:], side=self.pick(side))

    def s_side(self) -> str | None:
        return self._about("side", lambda t: not t.across and abs(t.lateral) >= 3, self.rng.choice((1, 1, 2)))

    def s_across(self) -> str | None:
        return self._about("across", lambda t: t.across, self.rng.choice((1, 1, 2)))

    def s_ahead(self) -> str | None:
        return self._about("ahead", lambda t: t.along > 15, 1)

    def s_behind(self) -> str | None:
        return self._about("behind", lambda t: t.along < -15, 1)

    def s_one_thing(self) -> str | None:
        return self._about("one_thing", lambda t: t.ftype != "building", 1)

    def s_signs(self) -> str | None:
        picked = self.fresh(self.scene.things, k=self.rng.randint(2, 4), where=lambda t: t.name is not None)
        if not picked:
            return None
        key = self.pick("signs")
        if "{names}" in key:
            for t in picked:
                self.used.add(id(t))
                self.mentions.append(t.ftype)
            names = [self.name_of(t) or t.kind for t in picked]
            return key.format(names=_join(names, self.pick("joiner")))
        return key.format(things=_join([self.thing(t) for t in picked], self.pick("joiner")))

    def s_area(self) -> str | None:
        picked = self.fresh(self.scene.areas, k=1)
        if not picked:
            return None
        area = picked[0]
        self.used.add(id(area))
        self.mentions.append(area.ftype)
        kind = self.kind_word(area)
        where = self.where(area)
        name = self.name_of(area)
        kind_a = _a(kind)
        if name is None or (self.vague and self.rng.random() < 0.3):
            text = self.pick("area_unnamed").format(
                kind_a=kind_a, where=where, where_cap=where[0].upper() + where[1:]
            )
        else:
            text = self.pick("area_named").format(
                name=name, kind_a=kind_a, where=where, where_cap=where[0].upper() + where[1:]
            )
        return text[0].upper() + text[1:]

    def s_building(self) -> str | None:
        picked = self.fresh(self.scene.things, k=1, where=lambda t: t.ftype == "building")
        if not picked:
            return None
        self.used.add(id(picked[0]))
        self.mentions.append("building")
        return self.pick("building").format(name=self.name_of(picked[0]), where=self.where(picked[0]))

    def s_transit(self) -> str | None:
        options = [k for k, on in (("tram", self.scene.tram), ("rail", self.scene.rail)) if on]
        if not options:
            return None
        key = self.rng.choice(options)
        self.mentions.append(key)
        return self.pick(key)

    def s_landmark(self) -> str | None:
        """Landmark first: the most prominent thing in view, by kind and look."""
        picked = self.fresh(self.scene.landmarks, k=1)
        if not picked:
            return None
        text = self.pick("landmark").format(thing=self.thing(picked[0]), where=self.where(picked[0]))
        return text[0].upper() + text[1:]

    def s_surroundings(self) -> str | None:
        """What lies around, up to SURROUND_REACH_M: the water, a park, the square below."""
        picked = self.fresh(self.scene.surroundings, k=1)
        if not picked:
            return None
        area = picked[0]
        self.used.add(id(area))
        self.mentions.append(area.ftype)
        name = self.name_of(area)
        kind = self.kind_word(area)
        said = f"{_a(kind)} ({name})" if name and self.rng.random() < 0.5 else _a(kind)
        text = self.pick("surroundings").format(area=said, kind=kind)
        return text[0].upper() + text[1:]

    def write(self, plan: Sequence[str]) -> str:
        sentences = [s for s in (getattr(self, f"s_{slot}")() for slot in plan) if s]
        if not any(m != "street" for m in self.mentions):  # a street alone rarely pins a place: add a sign
            extra = self.s_signs() or self.s_area() or self.s_one_thing()
            if extra:
                sentences.append(extra)
        return " ".join(sentences)


PRESET_WORD_P = 0.45  # share of kind words taken from the feature's preset
LOOKS_P = 0.6  # share of kind words that carry the feature's looks, when OSM records any
VAL_TERM_SHARE = 3  # one preset term in 3 is held out for validation phrasings (by a stable hash)


@functools.cache
def preset_words(preset_id: str | None, split: str) -> tuple[str, ...]:
    """The preset's name (both splits) and its terms in this split: held-out terms measure paraphrase."""
    from retriever.vocabulary import Vocabulary

    vocabulary = Vocabulary.load()
    if preset_id is None or preset_id not in vocabulary:
        return ()
    name, *terms = (w.lower() for w in vocabulary.words(preset_id))
    terms = [w for w in terms if w.split()[-1] in PLACE_NOUNS][:PRESET_TERMS]
    held_out = [w for w in terms if zlib.crc32(w.encode()) % VAL_TERM_SHARE == 0]
    kept = held_out if split == "val" else [w for w in terms if w not in held_out]
    generic = "(" in name or "/" in name or "feature" in name
    return tuple(([] if generic else [name]) + kept)


PRESET_TERMS = 8
# iD's search terms mix names of places ("cathedral", "coffeehouse") with what one finds there ("bras",
# "latte", "drive-in"); a pedestrian names the place, so only terms whose head word is a kind of place count.
PLACE_NOUNS = frozenset(
    """store shop church cathedral chapel basilica abbey station stop restaurant cafe café bar pub hotel inn
    hostel lodge museum gallery theatre theater cinema library park garden square plaza hall market building
    tower statue sculpture memorial monument fountain bank pharmacy chemist drugstore apothecary school
    university college office embassy consulate kiosk newsstand newsagent mall centre center platform tramway
    railway railroad entrance metro subway parking dentist salon hairdresser barber pizzeria coffeehouse bistro
    tavern club discotheque nightclub bookstore bookshop bookseller jeweler jeweller optician supermarket
    grocery bakery bodega superette boutique lawn meadow harbour harbor port pier terminal bay cove inlet shore
    water pond playground court pitch temple synagogue mosque clinic hospital toilets restroom atm""".split()
)


def _a(word: str) -> str:
    if word.split(" ", 1)[0].lower() in ("a", "an", "the"):
        return word
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _join(items: Sequence[str], joiner: str) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + joiner + items[-1]


def add_typos(text: str, rng: random.Random, n: int) -> str:
    """Up to n keyboard slips (swap, drop, double, neighbour key) in words of 4+ letters."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 4]
    # Capitalised words (mostly names, copied off a sign) are mistyped less often than ordinary words.
    weights = [0.35 if words[i][:1].isupper() else 1.0 for i in candidates]
    chosen: list[int] = []
    while candidates and len(chosen) < n:
        k = rng.choices(range(len(candidates)), weights=weights)[0]
        chosen.append(candidates.pop(k))
        weights.pop(k)
    for i in chosen:
        w = words[i]
        letters = [j for j, c in enumerate(w) if c.isalpha()]
        j = rng.choice(letters[1:-1] or letters)
        op = rng.choice(("swap", "drop", "double", "near"))
        if op == "swap" and j + 1 < len(w):
            w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
        elif op == "drop":
            w = w[:j] + w[j + 1 :]
        elif op == "double":
            w = w[:j] + w[j] + w[j:]
        else:
            near = KEYBOARD_NEIGHBOURS.get(w[j].lower())
            w = w[:j] + (rng.choice(near) if near else w[j]) + w[j + 1 :]
        words[i] = w
    return " ".join(words)


def describe(scene: Scene, split: str, rng: random.Random) -> tuple[str, str, list[str]]:
    """(text, template name, mentioned feature types) for one scene in one split's phrasing."""
    names = sorted(PLANS[split])
    plan_name = rng.choices(names, weights=[PLANS[split][n].weight for n in names])[0]
    writer = Writer(scene, split, rng)
    writer.no_names = plan_name.startswith("look_")
    text = writer.write(PLANS[split][plan_name].slots)
    roll = rng.random()
    if roll < 0.3:
        text = add_typos(text, rng, rng.randint(1, max(1, len(text.split()) // 12)))
    if rng.random() < CHAT_P:  # phone chat: lower case, little punctuation
        text = text.lower().replace(". ", " ").replace(", ", " ")
    if rng.random() < 0.2:
        text = text.rstrip(".")
    return text, plan_name, writer.mentions


# --- sampling locations and generating the sets ----------------------------------------------------------------


def _core(tile_geom: shapely.Geometry, stride_m: float) -> shapely.Geometry:
    """The central stride × stride square: points there are nearest to this tile's centre."""
    c = tile_geom.centroid
    h = stride_m / 2
    return shapely.box(c.x - h, c.y - h, c.x + h, c.y + h).intersection(tile_geom)


def _sample_point(builder: SceneBuilder, core: shapely.Geometry, rng: random.Random) -> tuple[float, float]:
    spots = builder.street_spots(core) if rng.random() < ON_STREET_P else []
    if spots:
        line = rng.choices(spots, weights=[s.length for s in spots])[0]
        q = line.interpolate(rng.random() * line.length)
        # Step off the centre line onto a pavement, staying inside the core.
        for _ in range(5):
            x, y = q.x + rng.uniform(-6, 6), q.y + rng.uniform(-6, 6)
            if core.contains(Point(x, y)):
                return x, y
        return q.x, q.y
    minx, miny, maxx, maxy = core.bounds
    return rng.uniform(minx, maxx), rng.uniform(miny, maxy)


def generate_descriptions(
    layers: Layers,
    tiles: gpd.GeoDataFrame,
    split: str,
    per_tile: int,
    seed: int = 0,
    stride_m: float = 100.0,
    progress: bool = False,
) -> list[dict]:
    """`per_tile` descriptions for every tile, deterministic under `seed`.

    `tiles` is in METRIC_CRS with columns tile_id and geometry (the footprint). Each record holds text, the true
    location (lat, lon: a point in the tile's core, not its centre), tile_id (the tile whose centre is nearest),
    tile_ids (every tile whose footprint contains the point), template and mentions (feature types said).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    builder = SceneBuilder(layers)
    tree = shapely.STRtree(tiles.geometry.values)
    ids = tiles["tile_id"].tolist()
    records: list[dict] = []
    points: list[tuple[float, float]] = []
    loop = zip(ids, tiles.geometry, strict=True)
    for tile_id, footprint in tqdm(loop, total=len(ids), desc=f"{split} descriptions", disable=not progress):
        core = _core(footprint, stride_m)
        for i in range(per_tile):
            rng = random.Random(f"{seed}:{split}:{tile_id}:{i}")
            for _attempt in range(8):  # resample spots where nothing nameable is in sight (yards, rail yards)
                x, y = _sample_point(builder, core, rng)
                text, template, mentions = describe(builder.scene(x, y, footprint, rng), split, rng)
                if mentions:
                    break
            if not mentions:
                continue
            records.append(
                {"text": text, "tile_id": tile_id, "template": f"{split}:{template}", "mentions": mentions}
            )
            points.append((x, y))
    if records:
        lonlat = gpd.GeoSeries([Point(xy) for xy in points], crs=METRIC_CRS).to_crs("EPSG:4326")
        lat, lon = lonlat.y.round(7).to_numpy(), lonlat.x.round(7).to_numpy()
        # Membership from the rounded coordinates as written, so readers recompute exactly the same sets.
        written = gpd.GeoSeries.from_xy(lon, lat, crs="EPSG:4326").to_crs(METRIC_CRS)
        for rec, la, lo, pt in zip(records, lat, lon, written, strict=True):
            rec["lat"], rec["lon"] = float(la), float(lo)
            rec["tile_ids"] = sorted(ids[j] for j in tree.query(pt, predicate="intersects")) or [
                rec["tile_id"]
            ]
    return [
        {k: r[k] for k in ("text", "lat", "lon", "tile_id", "tile_ids", "template", "mentions")}
        for r in records
    ]


def read_records(path: Path) -> list[dict]:
    """The records of a descriptions_*.jsonl file, as generate_descriptions wrote them (one object per line)."""
    text = require(Path(path), "build the gallery first: python -m demo.build_gallery").read_text(
        encoding="utf-8"
    )
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}, line {line_no}: not JSON ({err.msg})") from err
    return records


# --- baselines ---------------------------------------------------------------------------------------------------


def bm25_scores(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """(Q, T) BM25 scores of each query against each tile's context text (the app's ContextMatcher)."""
    matcher = ContextMatcher(documents)
    return np.stack([matcher.scores(q) for q in queries]) if queries else np.zeros((0, len(documents)))


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres (the evaluation protocols' formula)."""
    return haversine_km(lat1, lon1, lat2, lon2) * 1000.0


def evaluate_scores(
    scores: np.ndarray, queries: Sequence[dict], tiles: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Retrieval figures for a (Q, T) score matrix whose columns follow the rows of `tiles`.

    R@k: a top-k tile contains the true location (its `tile_ids`); R@k_strict: the top-k holds the primary
    `tile_id` (nearest centre). L@d: the top-1 tile's centre lies within d metres of the true location.
    Ties are broken by tile order, so a constant score is no better than chance would make it.
    """
    index = {t: i for i, t in enumerate(tiles["tile_id"])}
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, T)
    contains = np.zeros(scores.shape, dtype=bool)  # (Q, T): the tile's footprint holds the location
    nearest = np.zeros(scores.shape, dtype=bool)  # (Q, T): the tile's centre is the nearest one
    for q, rec in enumerate(queries):
        contains[q, [index[t] for t in rec["tile_ids"]]] = True
        nearest[q, index[rec["tile_id"]]] = True
    first, first_strict = first_relevant(order, contains), first_relevant(order, nearest)  # (Q,), (Q,)
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = recall_at_k(first, k) if len(queries) else 0.0
        out[f"R@{k}_strict"] = recall_at_k(first_strict, k) if len(queries) else 0.0
    lat = np.array([r["lat"] for r in queries])
    lon = np.array([r["lon"] for r in queries])
    best = order[:, 0]
    dist = haversine_m(lat, lon, tiles["lat"].to_numpy()[best], tiles["lon"].to_numpy()[best])
    for d in (50, 100, 150):
        out[f"L@{d}"] = float(np.mean(dist <= d)) if len(dist) else 0.0
    out["mean_dev_km"] = float(np.mean(dist) / 1000) if len(dist) else 0.0
    out["n_queries"] = len(queries)
    return out


def baselines(tiles: pd.DataFrame, queries: Sequence[dict], seed: int = 0, random_trials: int = 50) -> dict:
    """BM25 over each tile's `features` text, and random ranking averaged over `random_trials` draws."""
    bm25 = evaluate_scores(
        bm25_scores([q["text"] for q in queries], tiles["features"].tolist()), queries, tiles
    )
    rng = np.random.default_rng(seed)
    trials = [
        evaluate_scores(rng.random((len(queries), len(tiles))), queries, tiles) for _ in range(random_trials)
    ]
    rand = {k: float(np.mean([t[k] for t in trials])) for k in trials[0]} if trials else {}
    return {
        "bm25": bm25,
        "random": rand,
        "n_tiles": len(tiles),
        "definitions": {
            "R@k": "a top-k tile's footprint contains the true location",
            "R@k_strict": "the top-k holds the tile whose centre is nearest the true location",
            "L@d": "the top-1 tile's centre lies within d metres of the true location",
            "bm25": "rank_bm25.BM25Okapi over tiles.parquet `features`, accent-folded word tokens",
        },
    }
