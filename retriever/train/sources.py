"""Training data: "kind:path" -> a PairSet, every file-based kind read by a retriever.evaluate.data reader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from retriever.errors import DataFormatError
from retriever.evaluate.data import PairSet, read_dataset, read_jsonl
from retriever.train.pairs import Pair, pairs_to_pairset, pairset_to_pairs


def _toy_source(path: str) -> PairSet:
    """The colour/shape toy set, drawn into the folder `path`."""
    from retriever.train.toy import make_toy_pairs  # lazy: only this kind draws images

    return pairs_to_pairset(make_toy_pairs(path), name=f"toy/{Path(path).name}")


def _jsonl_source(path: str) -> PairSet:
    """Plain JSONL pairs (see read_jsonl). For training a JSONL group is one place: relevance is by group."""
    pairs = read_jsonl(path)
    return replace(pairs, image_label=pairs.image_group)


def _options(spec: str, text: str) -> dict[str, str]:
    items = [item for item in text.split(",") if item]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise DataFormatError(
            f"Options after the path are key=value pairs separated by ','; got {bad} in {spec!r}"
        )
    return dict(item.split("=", 1) for item in items)


def _benchmark_source(name: str) -> Callable[[str], PairSet]:
    """A reader for "PATH[:key=value,...]" of a retriever.evaluate.data dataset (split defaults to train)."""

    def read(spec: str) -> PairSet:
        path, _, options_text = spec.partition(":")
        options = {"split": "train", **_options(spec, options_text)}
        if options["split"] == "test":
            raise DataFormatError("Training never reads the test split; validation is carved from train.")
        return read_dataset(name, path, **options)

    return read


# kind -> reader("path[:options]") -> PairSet, e.g. --data geotext1652:/data/GeoText1652
TRAIN_SOURCES: dict[str, Callable[[str], PairSet]] = {
    "toy": _toy_source,
    "jsonl": _jsonl_source,
    "geotext1652": _benchmark_source("geotext1652"),
    "cvgtext": _benchmark_source("cvgtext"),
}


def load_pairset(spec: str) -> PairSet:
    """Read training data from "kind:path" (kinds: TRAIN_SOURCES)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in TRAIN_SOURCES:
        raise DataFormatError(
            f"--data must be KIND:PATH with KIND one of {', '.join(sorted(TRAIN_SOURCES))}; got {spec!r}"
        )
    pairs = TRAIN_SOURCES[kind](path)
    if not pairs.texts:
        raise DataFormatError(f"No training pairs in {spec}")
    return pairs


def load_pairs(spec: str) -> list[Pair]:
    """Training pairs from "kind:path", one Pair per text."""
    return pairset_to_pairs(load_pairset(spec))
