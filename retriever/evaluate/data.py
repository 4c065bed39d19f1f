"""Readers for GeoText-1652, CVG-Text and plain JSONL pairs, and a validation split carved without leakage."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from retriever.errors import DataFormatError

MAX_LISTED = 10  # how many offending items an error message names before it just counts
LATLON_PREFIX = re.compile(r"([-+]?[0-9]*\.?[0-9]+),([-+]?[0-9]*\.?[0-9]+)")  # the official CVG-Text regex


@dataclass
class PairSet:
    """Texts, a gallery of images, and the ground truth that links them."""

    name: str
    texts: list[str]  # (T,)
    images: list[Path]  # (I,) the gallery
    text_image: np.ndarray  # (T,) int64: index of each text's true image
    image_label: np.ndarray  # (I,) int64: relevance class (GeoText: the building)
    image_group: np.ndarray  # (I,) int64: leakage group for validation splits (building, location cell)
    group_names: list[str]  # image_group id -> a readable name
    image_latlon: np.ndarray | None = None  # (I, 2) float64 degrees
    text_latlon: np.ndarray | None = None  # (T, 2) float64 degrees
    text_kind: np.ndarray | None = None  # (T,) str, e.g. "panorama" / "single"
    sources: list[Path] = field(default_factory=list)  # annotation files the set was read from
    root: Path | None = None  # image paths are reported relative to this

    def __len__(self) -> int:
        return len(self.texts)

    def subset_images(self, keep: np.ndarray, name: str | None = None) -> PairSet:
        """The pairs whose image is kept (keep: (I,) bool), with indices renumbered."""
        keep = np.asarray(keep, dtype=bool)
        new_index = np.cumsum(keep) - 1  # (I,) old image index -> new, valid where kept
        text_keep = keep[self.text_image]  # (T,)
        return replace(
            self,
            name=name or self.name,
            texts=[t for t, k in zip(self.texts, text_keep, strict=True) if k],
            images=[p for p, k in zip(self.images, keep, strict=True) if k],
            text_image=new_index[self.text_image[text_keep]],
            image_label=self.image_label[keep],
            image_group=self.image_group[keep],
            image_latlon=None if self.image_latlon is None else self.image_latlon[keep],
            text_latlon=None if self.text_latlon is None else self.text_latlon[text_keep],
            text_kind=None if self.text_kind is None else self.text_kind[text_keep],
        )

    def summary(self) -> dict[str, Any]:
        """Counts for logs and result files."""
        out: dict[str, Any] = {
            "texts": len(self.texts),
            "images": len(self.images),
            "groups": len(np.unique(self.image_group)),
        }
        if self.text_kind is not None:
            kinds, counts = np.unique(self.text_kind, return_counts=True)
            out.update({f"texts_{k}": int(c) for k, c in zip(kinds, counts, strict=True)})
        return out


# ---------------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------------


def _listing(items: Sequence[Any]) -> str:
    shown = "\n  ".join(str(i) for i in items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path} is not valid JSON ({err}). Re-download or re-export the file."
        ) from err


def require_images(paths: Sequence[Path], what: str) -> None:
    """Raise one DataFormatError that lists (and counts) every missing image."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataFormatError(
            f"{len(missing)} of {len(paths)} images listed in {what} are missing:{_listing(missing)}\n"
            "Check the image root, or that the annotation file belongs to these image folders."
        )


def _dense_ids(keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Integer ids in order of first appearance, and the names."""
    ids: dict[str, int] = {}
    out = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    return out, list(ids)


def location_cells(latlon: np.ndarray, cell_m: float) -> tuple[np.ndarray, list[str]]:
    """Group locations into square cells of about cell_m metres (equirectangular grid)."""
    latlon = np.asarray(latlon, dtype=np.float64)  # (N, 2)
    metres_per_degree = 111_320.0
    lat0 = math.radians(float(latlon[:, 0].mean())) if len(latlon) else 0.0
    row = np.floor(latlon[:, 0] * metres_per_degree / cell_m).astype(np.int64)
    col = np.floor(latlon[:, 1] * metres_per_degree * math.cos(lat0) / cell_m).astype(np.int64)
    return _dense_ids([f"cell:{r},{c}" for r, c in zip(row, col, strict=True)])


# ---------------------------------------------------------------------------------------------
# GeoText-1652
# ---------------------------------------------------------------------------------------------

GEOTEXT_ANNOTATIONS = {"train": ("train.json",), "test": ("test_951_version.json", "test.json")}
GEOTEXT_IMAGE_ROOTS = ("images", ".")  # tried in order, relative to the data folder


def geotext_building(image_id: str) -> str:
    """The building of an image: the first 4 characters of its image_id ("0839/image-43.jpeg" -> "0839")."""
    return image_id[:4]


def official_geotext_labels(image_ids: Sequence[str]) -> np.ndarray:
    """Building labels exactly as the official test reader (`re_eval_dataset`) assigns them.

    It stores the running counter *before* noticing that the building changed, so the first
    image of every building after the first gets the previous building's label.
    """
    labels = np.empty(len(image_ids), dtype=np.int64)
    building_id, current = 0, None
    for i, image_id in enumerate(image_ids):
        building = geotext_building(image_id)
        if current is None:
            current = building
        labels[i] = building_id  # assigned before the increment below: the quirk
        if building != current:
            current = building
            building_id += 1
    return labels


def _find_annotation(data: Path, names: Sequence[str], what: str) -> Path:
    if data.is_file():
        return data
    tried = [data / n for n in names]
    for path in tried:
        if path.is_file():
            return path
    raise DataFormatError(f"No {what} annotation found. Tried:{_listing(tried)}")


def _find_image_root(data: Path, first_image: str, image_root: str | Path | None) -> Path:
    candidates = [Path(image_root)] if image_root else [data / r for r in GEOTEXT_IMAGE_ROOTS]
    for root in candidates:
        if (root / first_image).is_file():
            return root
    raise DataFormatError(
        f"Cannot find image {first_image!r} under any image root. Tried:{_listing(candidates)}\n"
        "Pass image_root (CLI: --image-root) pointing at the folder the 'image' fields are relative to."
    )


def _geotext_entries(ann_path: Path) -> list[dict]:
    """The entries of a GeoText-1652 annotation file, each checked for image_id, image and caption."""
    entries = _load_json(ann_path)
    if not isinstance(entries, list) or not entries:
        raise DataFormatError(f"{ann_path} should hold a non-empty JSON list of entries")
    bad = [
        i
        for i, e in enumerate(entries)
        if not isinstance(e, dict) or not {"image_id", "image", "caption"} <= set(e)
    ]
    if bad:
        raise DataFormatError(
            f"{len(bad)} entries of {ann_path} lack image_id/image/caption: entries{_listing(bad)}"
        )
    return entries


def read_geotext1652(
    data: str | Path,
    split: str = "test",
    *,
    official_quirks: bool = False,
    image_root: str | Path | None = None,
    check_images: bool = True,
) -> PairSet:
    """GeoText-1652 `train.json` / `test_951_version.json`: one text per caption, relevance by building.

    The test file has one entry per image with a list of captions; the train file a string
    caption per entry (an image may repeat). Both carry `sentences` and `bboxes` (region
    grounding), which retrieval does not use. official_quirks=True reproduces the official test
    reader's off-by-one building labels (see `official_geotext_labels`); by default each image is
    labelled with its true building, the first 4 characters of `image_id`.
    """
    data = Path(data)
    if split not in GEOTEXT_ANNOTATIONS and not data.is_file():
        raise DataFormatError(f"GeoText-1652 has splits {sorted(GEOTEXT_ANNOTATIONS)}, not {split!r}")
    ann_path = _find_annotation(data, GEOTEXT_ANNOTATIONS.get(split, ()), f"GeoText-1652 {split!r}")
    entries = _geotext_entries(ann_path)
    root = _find_image_root(ann_path.parent, entries[0]["image"], image_root)
    dedup = split == "train"  # train entries repeat an image; the official test reader keeps every entry
    seen: dict[str, int] = {}
    images: list[Path] = []
    image_ids: list[str] = []
    texts: list[str] = []
    text_image: list[int] = []
    for entry in entries:
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not all(isinstance(c, str) for c in captions):
            raise DataFormatError(
                f"{ann_path}: caption of {entry['image_id']!r} must be a string or list of strings"
            )
        index = seen.get(entry["image"]) if dedup else None
        if index is None:
            index = len(images)
            images.append(root / entry["image"])
            image_ids.append(entry["image_id"])
            seen[entry["image"]] = index
        texts.extend(captions)
        text_image.extend([index] * len(captions))
    if check_images:
        require_images(images, str(ann_path))

    group, names = _dense_ids([geotext_building(i) for i in image_ids])
    label = official_geotext_labels(image_ids) if official_quirks else group
    return PairSet(
        name=f"geotext1652/{split}" + ("+quirks" if official_quirks else ""),
        texts=texts,
        images=images,
        text_image=np.asarray(text_image, dtype=np.int64),
        image_label=label,
        image_group=group,
        group_names=names,
        sources=[ann_path],
        root=root,
    )


# ---------------------------------------------------------------------------------------------
# CVG-Text
# ---------------------------------------------------------------------------------------------

CVG_VIEWS = {"satellite": "satellite", "osm": "OSM"}  # --view -> image folder suffix
CVG_ANNOTATIONS = (
    "CVG-text/{subset}/{split}.json",
    "annotations/{subset}/{split}.json",
    "{subset}/{split}.json",
)
CVG_SUBSETS = ("{city}", "{city}-photos")  # panoramas, single views: together the official "-mixed"
# The official `--version` suffix -> the subsets it reads; a bare city name is its panoramas only.
CVG_VERSION_SUFFIXES: dict[str, tuple[str, ...]] = {"-mixed": CVG_SUBSETS, "-photos": ("{city}-photos",)}
CVG_CELL_M = 500.0  # validation split: locations in one cell never straddle train and val


def cvg_latlon(filename: str) -> tuple[float, float] | None:
    """(lat, lon) from a CVG-Text filename that starts with "lat,lon", else None."""
    match = LATLON_PREFIX.match(Path(filename).name)
    return (float(match.group(1)), float(match.group(2))) if match else None


def cvg_is_panorama(filename: str) -> bool:
    """The official rule: more than two "_"-separated parts. Applied to the file name only (the
    official code splits the whole path, which miscounts when a folder name holds "_")."""
    return len(Path(filename).name.split("_")) > 2


def cvg_version(version: str) -> tuple[str, tuple[str, ...]]:
    """An official CVG-Text `--version` -> (city, subset patterns).

    "NewYork" is the panorama set alone, "NewYork-photos" the single views alone (gallery and
    queries of one view type), "NewYork-mixed" both in one gallery.
    """
    city, subsets = version, ("{city}",)
    for suffix, patterns in CVG_VERSION_SUFFIXES.items():
        if version.endswith(suffix):
            city, subsets = version[: -len(suffix)], patterns
    if not city:
        raise DataFormatError(
            f"CVG-Text version {version!r} names no city; use e.g. NewYork, NewYork-photos or NewYork-mixed"
        )
    return city, subsets


def _find_cvg_subsets(
    data: Path, city: str, view: str, split: str, subsets: Sequence[str], require_all: bool
) -> list[tuple[Path, Path]]:
    """(annotation JSON, image folder) of every subset found; all of them when require_all."""
    found: list[tuple[Path, Path]] = []
    tried: list[Path] = []
    absent: list[str] = []
    for pattern in subsets:
        subset = pattern.format(city=city)
        candidates = [data / p.format(subset=subset, split=split) for p in CVG_ANNOTATIONS]
        tried.extend(candidates)
        ann = next((c for c in candidates if c.is_file()), None)
        if ann is None:
            absent.append(subset)
        else:
            found.append((ann, data / f"{subset}-{CVG_VIEWS[view]}"))
    if not found or (require_all and absent):
        raise DataFormatError(
            f"No CVG-Text annotation for city {city!r} (subset {', '.join(absent)}), split {split!r}. "
            f"Tried:{_listing(tried)}"
        )
    return found


def _read_cvg_subset(ann: Path, folder: Path, view: str, check_images: bool) -> tuple[list[str], list[Path]]:
    """The captions and image paths of one subset's {image_filename: caption} JSON."""
    mapping = _load_json(ann)
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataFormatError(f"{ann} should be a JSON object {{image_filename: caption}}")
    if not folder.is_dir():
        raise DataFormatError(
            f"Image folder {folder} (for {ann}) does not exist. Expected `{{subset}}-{CVG_VIEWS[view]}` next "
            f"to the annotations; is --view {view} right?"
        )
    unnamed = [name for name in mapping if cvg_latlon(name) is None]
    if unnamed:
        raise DataFormatError(
            f"{len(unnamed)} file names in {ann} do not start with 'lat,lon':{_listing(unnamed)}"
        )
    paths = [folder / name for name in mapping]
    missing = [p.name for p in paths if not p.is_file()] if check_images else []
    if missing:
        raise DataFormatError(
            f"{ann} and {folder} do not match: {len(missing)} of {len(paths)} images in the JSON are not in "
            f"the folder:{_listing(missing)}"
        )
    return list(mapping.values()), paths


def read_cvgtext(
    data: str | Path,
    city: str = "NewYork",
    view: str = "satellite",
    split: str = "test",
    *,
    version: str | None = None,
    subsets: Sequence[str] = CVG_SUBSETS,
    cell_m: float = CVG_CELL_M,
    check_images: bool = True,
) -> PairSet:
    """CVG-Text: per split a JSON {image_filename: caption}, images in `{subset}-satellite` / `{subset}-OSM`.

    Without `version`, every subset pattern that exists for the city is read (by default the
    panorama set `{city}` and the single-view set `{city}-photos`, which the official code
    evaluates together as "-mixed"). `version` is the official name instead ("Tokyo-photos",
    "NewYork", "NewYork-mixed", see `cvg_version`): it overrides city and subsets, and every
    subset it names must exist. Text i describes image i; the gallery is all images read.
    """
    data = Path(data)
    if view not in CVG_VIEWS:
        raise DataFormatError(f"view must be one of {sorted(CVG_VIEWS)}, not {view!r}")
    if version is not None:
        city, subsets = cvg_version(version)
    found = _find_cvg_subsets(data, city, view, split, subsets, require_all=version is not None)
    texts: list[str] = []
    images: list[Path] = []
    for ann, folder in found:
        captions, paths = _read_cvg_subset(ann, folder, view, check_images)
        texts.extend(captions)
        images.extend(paths)
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataFormatError(f"{len(dupes)} image names occur in more than one subset:{_listing(dupes)}")

    latlon = np.array([cvg_latlon(n) for n in names], dtype=np.float64).reshape(-1, 2)  # (N, 2)
    group, group_names = location_cells(latlon, cell_m)
    return PairSet(
        name=f"cvgtext/{version or city}/{view}/{split}",
        texts=texts,
        images=images,
        text_image=np.arange(len(texts), dtype=np.int64),
        image_label=np.arange(len(images), dtype=np.int64),
        image_group=group,
        group_names=group_names,
        image_latlon=latlon,
        text_latlon=latlon.copy(),
        text_kind=np.array(["panorama" if cvg_is_panorama(n) else "single" for n in names]),
        sources=[ann for ann, _ in found],
        root=data,
    )


# ---------------------------------------------------------------------------------------------
# Plain JSONL pairs
# ---------------------------------------------------------------------------------------------


class _JsonlRow(NamedTuple):
    line: int
    text: str
    image: str
    group: str
    latlon: tuple[float, float] | None


def _jsonl_objects(path: Path) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """(line number, parsed value) of every non-blank line that is JSON, and (line number, problem) of the rest."""
    objects: list[tuple[int, Any]] = []
    problems: list[tuple[int, str]] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objects.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append((line_no, f"not JSON ({err.msg})"))
    return objects, problems


def _line_problems(path: Path, problems: Sequence[tuple[int, str]]) -> DataFormatError:
    listed = [f"line {line}: {problem}" for line, problem in sorted(problems)]
    return DataFormatError(f"{len(problems)} problems in {path}:{_listing(listed)}")


def read_jsonl_records(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """The objects of a JSONL file, one per non-blank line; one error lists every line that is not an
    object or lacks a `required` field."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"JSONL file not found: {path}")
    objects, problems = _jsonl_objects(path)
    for line_no, row in objects:
        missing = [k for k in required if k not in row] if isinstance(row, dict) else None
        if missing is None:
            problems.append((line_no, "not a JSON object"))
        elif missing:
            problems.append((line_no, f"lacks {', '.join(missing)}"))
    if problems:
        raise _line_problems(path, problems)
    return [row for _, row in objects]


def _jsonl_rows(path: Path) -> tuple[list[_JsonlRow], list[tuple[int, str]]]:
    """Every well-formed pair line as a row, and (line number, problem) for every malformed one."""
    objects, problems = _jsonl_objects(path)
    rows: list[_JsonlRow] = []
    for line_no, row in objects:
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or not isinstance(row.get("image"), str)
        ):
            problems.append((line_no, "needs string fields 'text' and 'image'"))
            continue
        try:
            latlon = (float(row["lat"]), float(row["lon"])) if "lat" in row and "lon" in row else None
        except (TypeError, ValueError):
            problems.append((line_no, "lat and lon must be numbers"))
            continue
        group = str(row.get("group", row.get("tile_id", row["image"])))
        rows.append(_JsonlRow(line_no, row["text"], row["image"], group, latlon))
    return rows, problems


def read_jsonl(
    data: str | Path, *, image_root: str | Path | None = None, check_images: bool = True
) -> PairSet:
    """One JSON object per line: {"text", "image", "lat"?, "lon"?, "group"?}; images relative to the file.

    Images repeat freely (several texts per image); lat/lon go with the image and must agree
    wherever it repeats. `group` (else `tile_id`, else the image) keeps related pairs on one
    side of a validation split.
    """
    path = Path(data)
    if not path.is_file():
        raise DataFormatError(f"JSONL file not found: {path}")
    root = Path(image_root) if image_root else path.parent
    rows, problems = _jsonl_rows(path)
    texts: list[str] = []
    text_image: list[int] = []
    image_of: dict[Path, int] = {}
    coords: list[tuple[float, float] | None] = []
    groups: list[str] = []
    for row in rows:
        image = root / row.image
        if image not in image_of:
            image_of[image] = len(image_of)
            coords.append(row.latlon)
            groups.append(row.group)
        elif coords[image_of[image]] != row.latlon:
            problems.append((row.line, f"{row.image} repeats with a different lat/lon"))
        texts.append(row.text)
        text_image.append(image_of[image])
    if problems:
        raise _line_problems(path, problems)
    if not texts:
        raise DataFormatError(f"{path} holds no pairs")
    images = list(image_of)
    if check_images:
        require_images(images, str(path))
    with_ll = [c is not None for c in coords]
    if any(with_ll) and not all(with_ll):
        raise DataFormatError(
            f"{path}: give lat and lon for every image or for none ({sum(with_ll)} of {len(coords)} have them)"
        )
    latlon = np.array(coords, dtype=np.float64) if all(with_ll) else None
    group, names = _dense_ids(groups)
    text_image_arr = np.asarray(text_image, dtype=np.int64)
    return PairSet(
        name=f"jsonl/{path.stem}",
        texts=texts,
        images=images,
        text_image=text_image_arr,
        image_label=np.arange(len(images), dtype=np.int64),
        image_group=group,
        group_names=names,
        image_latlon=latlon,
        text_latlon=None if latlon is None else latlon[text_image_arr],
        sources=[path],
        root=root,
    )


# name -> reader(data, **options) -> PairSet
DATASETS: dict[str, Callable[..., PairSet]] = {
    "geotext1652": read_geotext1652,
    "cvgtext": read_cvgtext,
    "jsonl": read_jsonl,
}


def read_dataset(name: str, data: str | Path, **options: Any) -> PairSet:
    """Read a dataset by registry name."""
    if name not in DATASETS:
        raise DataFormatError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](data, **options)


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------


class Split(NamedTuple):
    """A train / validation split, and how many train images the buffer removed."""

    train: PairSet
    val: PairSet
    dropped: int


def carve_validation(pairs: PairSet, fraction: float = 0.1, *, seed: int = 0, buffer_m: float = 0.0) -> Split:
    """Move whole groups (buildings, location cells, JSONL groups) to a validation set.

    No group is on both sides, so no image or building is shared. With buffer_m > 0 and
    coordinates, train images within buffer_m metres of any validation image are dropped too,
    so neighbouring cells do not leak the same place.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    groups = np.unique(pairs.image_group)
    if len(groups) < 2:
        raise DataFormatError(
            f"{pairs.name} has {len(groups)} group(s); a leakage-free split needs at least 2"
        )
    n_val = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    val_groups = np.random.default_rng(seed).permutation(groups)[:n_val]
    val = np.isin(pairs.image_group, val_groups)  # (I,)
    near = np.zeros_like(val)
    if buffer_m > 0 and pairs.image_latlon is not None and val.any():
        from retriever.evaluate.metrics import haversine_km

        ll = pairs.image_latlon
        val_ll = ll[val]
        for start in range(0, len(ll), 1024):  # bounded (1024, V) distance blocks
            block = ll[start : start + 1024]
            d = haversine_km(block[:, :1], block[:, 1:], val_ll[None, :, 0], val_ll[None, :, 1])  # (b, V)
            near[start : start + 1024] = (d * 1000 <= buffer_m).any(1)
        near &= ~val
    train = pairs.subset_images(~val & ~near, name=f"{pairs.name}:train")
    return Split(train, pairs.subset_images(val, name=f"{pairs.name}:val"), int(near.sum()))


__all__ = [
    "CVG_VIEWS",
    "DATASETS",
    "PairSet",
    "Split",
    "carve_validation",
    "cvg_is_panorama",
    "cvg_latlon",
    "cvg_version",
    "geotext_building",
    "location_cells",
    "official_geotext_labels",
    "read_cvgtext",
    "read_dataset",
    "read_geotext1652",
    "read_jsonl",
    "read_jsonl_records",
    "require_images",
]
