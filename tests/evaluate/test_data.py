"""Dataset readers on generated fake data: formats, the official label quirk, clear errors, leakage-free splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import DataFormatError
from retriever.evaluate.data import (
    DATASETS,
    carve_validation,
    cvg_is_panorama,
    cvg_latlon,
    cvg_version,
    official_geotext_labels,
    read_cvgtext,
    read_dataset,
    read_geotext1652,
    read_jsonl,
    read_jsonl_records,
)
from retriever.evaluate.metrics import haversine_km
from retriever.evaluate.reference import official_is_panorama
from tests.data.cvgtext.data import file_name, make_cvgtext
from tests.data.geotext1652.data import make_geotext1652
from tests.fakes import solid_tile


@pytest.fixture
def geotext(tmp_path: Path) -> Path:
    return make_geotext1652(tmp_path / "GeoText1652")


@pytest.fixture
def cvg(tmp_path: Path) -> Path:
    return make_cvgtext(tmp_path / "CVG-Text")


# ---------------------------------------------------------------------------------------------
# GeoText-1652
# ---------------------------------------------------------------------------------------------


def test_geotext_test_split(geotext: Path) -> None:
    pairs = read_geotext1652(geotext, "test")
    assert len(pairs.texts) == 27 and len(pairs.images) == 9
    assert pairs.text_image.tolist() == [i for i in range(9) for _ in range(3)]  # captions in file order
    assert pairs.image_label.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert pairs.group_names == ["0001", "0002", "0003"]
    assert pairs.images[4] == geotext / "images" / "test" / "0002" / "image-02.jpeg"
    assert pairs.texts[2].startswith("a green building")  # the confusing caption of building 0001
    assert pairs.sources == [geotext / "test_951_version.json"]


def test_official_quirks_change_exactly_the_first_image_of_each_later_building(geotext: Path) -> None:
    fixed = read_geotext1652(geotext, "test")
    quirky = read_geotext1652(geotext, "test", official_quirks=True)
    assert quirky.image_label.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    changed = np.flatnonzero(fixed.image_label != quirky.image_label).tolist()
    assert changed == [3, 6]  # 0002/image-01 and 0003/image-01
    assert [quirky.images[i].name for i in changed] == ["image-01.jpeg", "image-01.jpeg"]
    assert np.array_equal(fixed.image_group, quirky.image_group)  # the split groups stay true
    assert fixed.texts == quirky.texts and np.array_equal(fixed.text_image, quirky.text_image)


def test_official_labels_follow_the_running_counter() -> None:
    ids = ["0001/a", "0001/b", "0002/a", "0002/b", "0002/c", "0001/c"]
    assert official_geotext_labels(ids).tolist() == [0, 0, 0, 1, 1, 1]  # a revisited building counts as new
    assert official_geotext_labels(["0007/x"]).tolist() == [0]


def test_geotext_train_split_keeps_each_image_once(geotext: Path) -> None:
    pairs = read_geotext1652(geotext, "train")
    assert len(pairs.images) == 8 and len(pairs.texts) == 16
    assert np.bincount(pairs.text_image).tolist() == [2] * 8
    assert pairs.group_names == ["0101", "0102", "0103", "0104"]


def test_geotext_missing_images_are_listed_with_a_count(geotext: Path) -> None:
    (geotext / "images" / "test" / "0002" / "image-03.jpeg").unlink()
    (geotext / "images" / "test" / "0003" / "image-01.jpeg").unlink()
    with pytest.raises(DataFormatError, match=r"2 of 9 images .* missing") as err:
        read_geotext1652(geotext, "test")
    assert "0002/image-03.jpeg" in str(err.value) and "0003/image-01.jpeg" in str(err.value)


def test_geotext_layout_errors(tmp_path: Path, geotext: Path) -> None:
    with pytest.raises(DataFormatError, match="test_951_version.json"):
        read_geotext1652(tmp_path / "nowhere", "test")
    with pytest.raises(DataFormatError, match="image-root"):
        read_geotext1652(geotext, "test", image_root=tmp_path)
    entries = json.loads((geotext / "test_951_version.json").read_text())
    entries[1]["caption"] = [3]
    (geotext / "test_951_version.json").write_text(json.dumps(entries))
    with pytest.raises(DataFormatError, match="caption of '0001/image-02.jpeg'"):
        read_geotext1652(geotext, "test")
    (geotext / "test_951_version.json").write_text("[{")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_geotext1652(geotext, "test")


# ---------------------------------------------------------------------------------------------
# CVG-Text
# ---------------------------------------------------------------------------------------------


def test_cvg_filename_rules() -> None:
    assert cvg_latlon("-27.4698,153.0251_pano123_2019.jpg") == (-27.4698, 153.0251)
    assert cvg_latlon("folder/40.7,-74.0_90.jpg") == (40.7, -74.0)
    assert cvg_latlon("image.jpg") is None
    assert cvg_is_panorama("40.7,-74.0_pano_2019.jpg") and not cvg_is_panorama("40.7,-74.0_90.jpg")
    assert not cvg_is_panorama("/data/my_cvg_copy/40.7,-74.0_90.jpg")  # folders do not count


def test_official_panorama_rule_reads_the_whole_path() -> None:
    single, panorama, bare = "40.7,-74.0_90.jpg", "40.7,-74.0_pano0001_2019-06.jpg", "40.7,-74.0.jpg"
    assert [official_is_panorama(n) for n in (single, panorama, bare)] == [False, True, False]
    assert [cvg_is_panorama(n) for n in (single, panorama, bare)] == [False, True, False]  # names alone agree
    # One "_" in the folders flips the single views whose own name holds a "_", and only those ...
    assert official_is_panorama(f"/data/my_copy/{single}") and not official_is_panorama(
        f"/data/my_copy/{bare}"
    )
    # ... two or more flip every query. Ours reads the file name only.
    assert all(official_is_panorama(f"/my_data/cvg_copy/{n}") for n in (single, panorama, bare))
    assert not any(cvg_is_panorama(f"/my_data/cvg_copy/{n}") for n in (single, bare))


def test_cvg_versions_name_the_official_subsets() -> None:
    assert cvg_version("NewYork") == ("NewYork", ("{city}",))
    assert cvg_version("Tokyo-photos") == ("Tokyo", ("{city}-photos",))
    assert cvg_version("Brisbane-mixed") == ("Brisbane", ("{city}", "{city}-photos"))
    with pytest.raises(DataFormatError, match="names no city"):
        cvg_version("-photos")


def test_cvg_single_subset_versions(cvg: Path) -> None:
    photos = read_cvgtext(cvg, version="NewYork-photos")
    assert len(photos.texts) == len(photos.images) == 6 and set(photos.text_kind) == {"single"}
    assert {p.parent.name for p in photos.images} == {"NewYork-photos-satellite"}
    assert photos.name == "cvgtext/NewYork-photos/satellite/test"
    panoramas = read_cvgtext(cvg, city="ignored", version="NewYork", view="osm")
    assert len(panoramas.images) == 10 and {p.parent.name for p in panoramas.images} == {"NewYork-OSM"}
    mixed = read_cvgtext(cvg, version="NewYork-mixed")
    assert mixed.texts == read_cvgtext(cvg, "NewYork").texts and len(mixed.images) == 16
    (cvg / "CVG-text" / "NewYork-photos" / "test.json").unlink()
    assert len(read_cvgtext(cvg, "NewYork").images) == 10  # without a version: whatever subsets exist
    with pytest.raises(DataFormatError, match=r"city 'NewYork' \(subset NewYork-photos\)"):
        read_cvgtext(cvg, version="NewYork-mixed")  # a version needs every subset it names


def test_cvg_mixed_subsets(cvg: Path) -> None:
    pairs = read_cvgtext(cvg, "NewYork", "satellite", "test")
    assert len(pairs.texts) == len(pairs.images) == 16
    assert pairs.summary()["texts_panorama"] == 10 and pairs.summary()["texts_single"] == 6
    assert pairs.images[0].parent.name == "NewYork-satellite"
    assert pairs.images[10].parent.name == "NewYork-photos-satellite"
    assert pairs.image_latlon[0].tolist() == [40.7, -74.0]
    assert np.array_equal(pairs.text_latlon, pairs.image_latlon)
    assert pairs.text_image.tolist() == list(range(16))
    osm = read_cvgtext(cvg, "NewYork", "osm", "test")
    assert osm.images[0].parent.name == "NewYork-OSM" and osm.texts == pairs.texts
    only_panoramas = read_cvgtext(cvg, "NewYork", subsets=("{city}",))
    assert len(only_panoramas.texts) == 10


def test_cvg_json_and_folder_mismatch_is_counted(cvg: Path) -> None:
    (cvg / "NewYork-satellite" / file_name(3, False)).unlink()
    with pytest.raises(DataFormatError, match=r"do not match: 1 of 10 images") as err:
        read_cvgtext(cvg, "NewYork", "satellite")
    assert file_name(3, False) in str(err.value)
    assert len(read_cvgtext(cvg, "NewYork", "osm").texts) == 16  # the other view is intact


def test_cvg_layout_errors(cvg: Path) -> None:
    with pytest.raises(DataFormatError, match="No CVG-Text annotation for city 'Tokyo'"):
        read_cvgtext(cvg, "Tokyo")
    with pytest.raises(DataFormatError, match="view must be one of"):
        read_cvgtext(cvg, "NewYork", "ground")
    ann = cvg / "CVG-text" / "NewYork" / "test.json"
    ann.write_text(json.dumps({"no-coordinates.jpg": "a caption"}))
    with pytest.raises(DataFormatError, match="do not start with 'lat,lon'"):
        read_cvgtext(cvg, "NewYork")
    ann.write_text(json.dumps(["not", "a", "mapping"]))
    with pytest.raises(DataFormatError, match="image_filename: caption"):
        read_cvgtext(cvg, "NewYork")
    for p in (cvg / "NewYork-photos-OSM").iterdir():
        p.unlink()
    (cvg / "NewYork-photos-OSM").rmdir()
    with pytest.raises(DataFormatError, match="NewYork-photos-OSM .* does not exist"):
        read_cvgtext(cvg, "NewYork", "osm", subsets=("{city}-photos",))


# ---------------------------------------------------------------------------------------------
# JSONL and the registry
# ---------------------------------------------------------------------------------------------


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    for row in rows:
        if not (folder / row["image"]).exists():
            (folder / row["image"]).parent.mkdir(parents=True, exist_ok=True)
            solid_tile("red").save(folder / row["image"])
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_pairs(tmp_path: Path) -> None:
    rows = [
        {"text": "a red roof", "image": "tiles/a.png", "lat": 60.17, "lon": 24.94, "group": "harbour"},
        {
            "text": "the red roof again",
            "image": "tiles/a.png",
            "lat": 60.17,
            "lon": 24.94,
            "group": "harbour",
        },
        {"text": "a green park", "image": "tiles/b.png", "lat": 60.18, "lon": 24.95, "group": "park"},
    ]
    pairs = read_jsonl(write_jsonl(tmp_path, rows))
    assert pairs.text_image.tolist() == [0, 0, 1] and len(pairs.images) == 2
    assert pairs.image_latlon.tolist() == [[60.17, 24.94], [60.18, 24.95]]
    assert pairs.text_latlon.tolist() == [[60.17, 24.94], [60.17, 24.94], [60.18, 24.95]]
    assert pairs.group_names == ["harbour", "park"]
    assert read_dataset("jsonl", tmp_path / "pairs.jsonl").texts == pairs.texts
    assert set(DATASETS) == {"geotext1652", "cvgtext", "jsonl"}
    tiles = [{"text": "a", "image": "a.png", "tile_id": "t7"}, {"text": "b", "image": "b.png"}]
    (tmp_path / "tiles").mkdir(exist_ok=True)
    by_tile = read_jsonl(write_jsonl(tmp_path / "tiles", tiles))
    assert by_tile.group_names == ["t7", "b.png"]  # the group: `group`, else `tile_id`, else the image


def test_jsonl_errors_name_the_lines(tmp_path: Path) -> None:
    rows = [
        {"text": "a", "image": "x.png", "lat": 1.0, "lon": 2.0},
        {"text": "b", "image": "x.png", "lat": 1.5, "lon": 2.0},
        {"image": "y.png"},
    ]
    path = write_jsonl(tmp_path, rows[:2] + [{"text": "c", "image": "x.png", "lat": 1.0, "lon": 2.0}])
    path.write_text(path.read_text() + json.dumps(rows[2]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match="3 problems") as err:
        read_jsonl(path)
    message = str(err.value)
    assert "line 2: x.png repeats with a different lat/lon" in message
    assert "line 4: needs string fields" in message and "line 5: not JSON" in message
    path.write_text(json.dumps({"text": "d", "image": "x.png", "lat": "north", "lon": 2.0}) + "\n")
    with pytest.raises(DataFormatError, match="line 1: lat and lon must be numbers"):
        read_jsonl(path)
    with pytest.raises(DataFormatError, match="Unknown dataset"):
        read_dataset("coco", path)


def test_jsonl_records_list_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "human.jsonl"
    path.write_text('{"q": "by the church", "lat": 60.1}\n\n[1, 2]\n{"q": "x"\n{"lat": 60.2}\n')
    with pytest.raises(DataFormatError, match="3 problems") as err:
        read_jsonl_records(path, required=("q", "lat"))
    assert "line 3: not a JSON object" in str(err.value) and "line 4: not JSON" in str(err.value)
    assert "line 5: lacks q" in str(err.value)
    path.write_text('{"q": "by the church", "lat": 60.1}\n\n{"q": "at the pier", "lat": 60.2}\n')
    assert [r["q"] for r in read_jsonl_records(path, required=("q",))] == ["by the church", "at the pier"]
    with pytest.raises(DataFormatError, match="JSONL file not found"):
        read_jsonl_records(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------


def test_carve_validation_by_building(geotext: Path) -> None:
    pairs = read_geotext1652(geotext, "train")
    split = carve_validation(pairs, fraction=0.25, seed=1)
    train_buildings = {split.train.group_names[g] for g in split.train.image_group}
    val_buildings = {split.val.group_names[g] for g in split.val.image_group}
    assert len(val_buildings) == 1 and len(train_buildings) == 3 and not train_buildings & val_buildings
    assert len(split.train.texts) + len(split.val.texts) == len(pairs.texts)
    assert not {p for p in split.train.images} & {p for p in split.val.images}
    # The renumbered indices still point each text at its own image.
    for part in (split.train, split.val):
        for text, image in zip(part.texts, part.text_image, strict=True):
            original = pairs.texts.index(text)
            assert part.images[image] == pairs.images[pairs.text_image[original]]
    assert carve_validation(pairs, 0.25, seed=1).val.images == split.val.images  # deterministic


def test_carve_validation_by_location_with_buffer(cvg: Path) -> None:
    pairs = read_cvgtext(cvg, "NewYork", split="test", cell_m=100.0)
    split = carve_validation(pairs, fraction=0.3, seed=0, buffer_m=50.0)
    assert split.dropped > 0
    train, val = split.train.image_latlon, split.val.image_latlon
    d = haversine_km(train[:, :1], train[:, 1:], val[None, :, 0], val[None, :, 1])  # (train, val)
    assert len(train) and d.min() * 1000 > 50.0
    assert len(split.train.images) + len(split.val.images) + split.dropped == len(pairs.images)
    with pytest.raises(ValueError):
        carve_validation(pairs, fraction=1.5)
