"""End-to-end evaluation with FakeRetriever on fake datasets: known answers, CLI, cache, unreadable images, hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retriever._cli as cli
from retriever.errors import DataFormatError
from retriever.evaluate import PROTOCOLS, RERANKERS, evaluate_with
from retriever.evaluate.__main__ import RERANKERS as CLI_RERANKERS
from retriever.evaluate.__main__ import main
from retriever.evaluate.data import read_cvgtext, read_geotext1652
from retriever.evaluate.metrics import cvg_metrics
from retriever.evaluate.reference import (
    cvg_metrics_reference,
    geotext_metrics_reference,
    official_cal_score,
)
from tests.data.cvgtext.data import make_cvgtext
from tests.data.geotext1652.data import make_geotext1652
from tests.fakes import FakeRetriever, solid_tile

REPO = Path(__file__).resolve().parents[2]


class CountingRetriever(FakeRetriever):
    """FakeRetriever that counts how many items it was asked to encode."""

    def __init__(self, name: str = "fake") -> None:
        super().__init__(name)
        self.encoded = {"texts": 0, "images": 0}

    def encode_queries(self, texts, batch_size=16, progress=None):
        self.encoded["texts"] += len(texts)
        return super().encode_queries(texts, batch_size, progress)

    def encode_tiles(self, images, batch_size=8, progress=None):
        self.encoded["images"] += len(images)
        return super().encode_tiles(images, batch_size, progress)


@pytest.fixture(scope="module")
def geotext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_geotext1652(tmp_path_factory.mktemp("geotext"))


@pytest.fixture(scope="module")
def cvg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cvgtext(tmp_path_factory.mktemp("cvg"))


def test_geotext_known_answers(geotext: Path) -> None:
    results = evaluate_with(FakeRetriever(), "geotext1652", {"data": geotext})
    m = results["metrics"]
    # 3 of 27 captions (building 0001's "green" ones) rank the three green images first, then the
    # red and blue images, all tied, higher index first: 8, 7, 6, 2 -> their first hit is at rank 6.
    assert m["t2i_r1"] == m["t2i_r5"] == 100.0 * 24 / 27
    assert m["t2i_r10"] == 100.0
    assert m["i2t_r1"] == m["i2t_r5"] == m["i2t_r10"] == 100.0  # the highest-index tied text is always right
    assert results["official"]["img_r1"] == m["t2i_r1"] and results["official"]["txt_r1"] == m["i2t_r1"]
    assert results["counts"] == {"texts": 27, "images": 9, "groups": 3}
    assert "higher index ranks first" in results["tie_rule"]


def test_geotext_official_quirks_flow_through(geotext: Path) -> None:
    results = evaluate_with(FakeRetriever(), "geotext1652", {"data": geotext, "official_quirks": True})
    pairs = read_geotext1652(geotext, official_quirks=True)
    fake = FakeRetriever()
    scores = fake.encode_queries(pairs.texts).numpy() @ fake.encode_tiles(pairs.images).numpy().T
    expected = geotext_metrics_reference(scores, pairs.text_image, pairs.image_label)
    assert results["metrics"] == expected
    assert results["metrics"]["t2i_r1"] == 100.0 * 18 / 27  # quirky labels: 9 more texts miss at rank 1
    assert results["dataset"] == "geotext1652/test+quirks"


def test_cvg_equals_literal_loop_and_known_answers(cvg: Path) -> None:
    results = evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg, "city": "NewYork", "view": "satellite"})
    pairs = read_cvgtext(cvg, "NewYork", "satellite")
    fake = FakeRetriever()
    expected = cvg_metrics_reference(
        fake.encode_queries(pairs.texts),
        fake.encode_tiles(pairs.images),
        pairs.text_image,
        pairs.text_latlon,
        pairs.image_latlon,
        subsets={k: pairs.text_kind == k for k in ("panorama", "single")},
    )
    m = results["metrics"]
    assert m == expected
    # 4 of 16 captions name a neighbour's colour: 3 neighbours are ~40 m away, one tile is ~146 m away.
    assert m["overall"]["R@1"] == 75.0
    assert m["overall"]["L@50"] == 100.0 * 15 / 16 and m["overall"]["L@150"] == 100.0
    assert (m["panorama"]["count"], m["single"]["count"]) == (10, 6)
    assert results["options"]["gallery_size"] == 100


def test_cli_end_to_end(geotext: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    loaded = []
    monkeypatch.setattr(cli, "load_retriever", lambda **kw: loaded.append(kw) or FakeRetriever())
    out = tmp_path / "results.json"
    code = main(
        ["--protocol", "geotext1652", "--data", str(geotext), "--model", "some/model", "--adapter", "runs/dora",
         "--out", str(out), "--markdown", "--no-progress", "--chunk-size", "2"]
    )  # fmt: skip
    assert code == 0
    assert loaded == [
        {"model": "some/model", "adapter": "runs/dora", "quantization": "none", "device": None, "dtype": None}
    ]
    results = json.loads(out.read_text())
    assert results["metrics"]["t2i_r1"] == pytest.approx(100.0 * 24 / 27)
    assert results["official"]["img_r1"] == results["metrics"]["t2i_r1"]
    assert results["options"]["chunk_size"] == 2 and results["label"] == "model+dora"
    printed = capsys.readouterr().out
    assert "img_r1=88.89" in printed and "txt_r1=100.00" in printed
    assert "| model+dora | 88.89 | 88.89 | 100.00 | 100.00 | 100.00 | 100.00 | 96.30 |" in printed
    assert "| Model | T→I R@1 |" in printed


def test_cli_cvg_writes_markdown_file(cvg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_retriever", lambda **kw: FakeRetriever())
    md = tmp_path / "table.md"
    argv = ["--protocol", "cvgtext", "--data", str(cvg), "--city", "NewYork", "--view", "osm", "--model", "m"]
    assert main([*argv, "--markdown", str(md), "--gallery-size", "3", "--no-progress"]) == 0
    lines = md.read_text().splitlines()
    assert lines[0].startswith(
        "| Model | Queries | R@1 | R@5 | R@10 | L@50 | L@100 | L@150 | Dev. (km) | N |"
    )
    assert [line.split(" | ")[1] for line in lines[2:]] == ["overall", "panorama", "single"]


def test_cache_reuse_skips_encoding(geotext: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = CountingRetriever()
    a = evaluate_with(first, "geotext1652", {"data": geotext}, cache_dir=cache)
    assert first.encoded == {"texts": 27, "images": 9} and a["cache"] == {"texts": "miss", "images": "miss"}
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json", ".npy", ".npy"]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]

    second = CountingRetriever()
    b = evaluate_with(second, "geotext1652", {"data": geotext, "official_quirks": True}, cache_dir=cache)
    assert second.encoded == {"texts": 0, "images": 0} and b["cache"] == {"texts": "hit", "images": "hit"}
    assert b["metrics"] != a["metrics"]  # same embeddings, different (quirky) labels

    other_model = CountingRetriever(name="another")
    evaluate_with(other_model, "geotext1652", {"data": geotext}, cache_dir=cache)
    assert other_model.encoded == {"texts": 27, "images": 9}  # a different fingerprint misses


def test_cache_without_manifest_is_ignored(geotext: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    evaluate_with(FakeRetriever(), "geotext1652", {"data": geotext}, cache_dir=cache)
    for manifest in cache.glob("images-*.json"):
        manifest.unlink()  # as if the run died between the array and its manifest
    again = CountingRetriever()
    evaluate_with(again, "geotext1652", {"data": geotext}, cache_dir=cache)
    assert again.encoded == {"texts": 0, "images": 9}


def test_unreadable_images_are_listed_then_skippable(tmp_path: Path) -> None:
    root = make_geotext1652(tmp_path / "g")
    for name in ("0002/image-02.jpeg", "0003/image-03.jpeg"):
        (root / "images" / "test" / name).write_bytes(b"not a jpeg")
    with pytest.raises(DataFormatError, match=r"2 of 9 images could not be decoded") as err:
        evaluate_with(FakeRetriever(), "geotext1652", {"data": root}, cache_dir=tmp_path / "cache")
    assert "test/0002/image-02.jpeg" in str(err.value) and "--skip-unreadable" in str(err.value)

    counting = CountingRetriever()
    results = evaluate_with(
        counting, "geotext1652", {"data": root}, cache_dir=tmp_path / "cache", skip_unreadable=True
    )
    assert counting.encoded == {"texts": 0, "images": 0}  # the good embeddings were cached by the failed run
    assert results["skipped_images"] == ["test/0002/image-02.jpeg", "test/0003/image-03.jpeg"]
    assert results["counts"]["texts"] == 21 and results["counts"]["images"] == 7
    assert results["metrics"]["t2i_r1"] == pytest.approx(100.0 * 18 / 21)


def test_rerank_hook_runs_inside_both_protocols(geotext: Path, cvg: Path) -> None:
    calls: dict[str, list[int]] = {"geotext1652": [], "cvgtext": []}

    def make_hook(protocol: str):
        def hook(query: int, candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
            calls[protocol].append(len(candidates))
            return candidates[::-1]

        return hook

    g = evaluate_with(FakeRetriever(), "geotext1652", {"data": geotext}, rerank=make_hook("geotext1652"))
    c = evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg}, rerank=make_hook("cvgtext"))
    assert calls["geotext1652"] == [5] * 27 and calls["cvgtext"] == [5] * 16
    # Reversing the top-5 puts the 5th image first: for GeoText that is another building for every text.
    assert g["metrics"]["t2i_r1"] == 0.0 and c["metrics"]["overall"]["R@1"] < 75.0

    calls["cvgtext"].clear()
    named = {"mine": lambda retriever, pairs: make_hook("cvgtext")}
    evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg}, rerank="mine", rerank_depth=3, rerankers=named)
    assert calls["cvgtext"] == [3] * 16
    with pytest.raises(ValueError, match="Unknown re-ranker 'erm'.*'none'"):
        evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg}, rerank="erm")  # the library alone has no ERM


def test_jsonl_protocol(tmp_path: Path) -> None:
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        solid_tile(colour).save(tmp_path / f"{i}.png")
        rows.append({"text": f"a {colour} tile", "image": f"{i}.png", "lat": 60.17 + i * 0.001, "lon": 24.94})
    rows.append({"text": "a green tile again", "image": "0.png", "lat": 60.17, "lon": 24.94})  # wrong colour
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    results = evaluate_with(FakeRetriever(), "jsonl", {"data": tmp_path / "pairs.jsonl"})
    overall = results["metrics"]["overall"]
    assert overall["R@1"] == 80.0 and overall["count"] == 5
    assert overall["L@150"] == 100.0 and overall["L@100"] == 80.0  # the miss lands ~111 m away
    for row in rows:
        row.pop("lat"), row.pop("lon")
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    plain = evaluate_with(FakeRetriever(), "jsonl", {"data": tmp_path / "plain.jsonl"})
    assert plain["metrics"]["overall"]["R@1"] == 80.0 and "L@50" not in plain["metrics"]["overall"]


def test_registries_and_bad_protocol() -> None:
    assert set(PROTOCOLS) == {"geotext1652", "cvgtext", "jsonl"}
    assert set(RERANKERS) == {"none"} and set(CLI_RERANKERS) == {"none", "erm"}  # the CLI wires ERM
    with pytest.raises(Exception, match="Unknown protocol"):
        evaluate_with(FakeRetriever(), "coco", {"data": "."})


def test_real_tiny_retriever_end_to_end(tiny_model_dir, geotext: Path, tmp_path: Path) -> None:
    from retriever import load_retriever

    retriever = load_retriever(tiny_model_dir("qwen2_vl"), device="cpu")
    results = evaluate_with(retriever, "geotext1652", {"data": geotext}, cache_dir=tmp_path, batch_size=4)
    pairs = read_geotext1652(geotext)
    texts = retriever.encode_queries(pairs.texts, batch_size=4)  # same batches and product as the evaluation
    scores = (texts @ retriever.encode_tiles(pairs.images, batch_size=4).T).numpy()
    assert results["metrics"] == geotext_metrics_reference(scores, pairs.text_image, pairs.image_label)
    assert results["retriever"]["family"] == "qwen2_vl" and results["cache"]["images"] == "miss"
    again = evaluate_with(retriever, "geotext1652", {"data": geotext}, cache_dir=tmp_path)
    assert again["cache"] == {"texts": "hit", "images": "hit"} and again["metrics"] == results["metrics"]


# ---------------------------------------------------------------------------------------------
# Single-subset CVG-Text versions (the official `--version NewYork-photos`, `Tokyo-photos`, ...)
# ---------------------------------------------------------------------------------------------

# version -> (the view type of every query, the subset left empty, R@1, L@50) on the fake city
SINGLE_SUBSETS = {
    # 6 single views: caption 0 names its neighbour's colour (40 m away); caption 5 names blue, which no single
    # view has, so every score ties and the nearest image, its own, ranks first.
    "NewYork-photos": ("single", "panorama", (5 / 6) * 100, 100.0),
    # 10 panoramas: captions 0 and 5 name their neighbour's colour, 40 m away.
    "NewYork": ("panorama", "single", 80.0, 100.0),
}


@pytest.mark.parametrize("version", sorted(SINGLE_SUBSETS))
def test_cvg_single_subset_equals_the_official_scorer(cvg: Path, version: str) -> None:
    kind, empty, r1, l50 = SINGLE_SUBSETS[version]
    results = evaluate_with(
        FakeRetriever(), "cvgtext", {"data": cvg, "version": version, "view": "satellite"}
    )
    pairs = read_cvgtext(cvg, version=version)
    assert set(pairs.text_kind) == {kind}  # gallery and queries of one view type only
    fake = FakeRetriever()
    texts, images = fake.encode_queries(pairs.texts), fake.encode_tiles(pairs.images)
    case = (texts, images, pairs.text_image, pairs.text_latlon, pairs.image_latlon)
    subsets = {k: pairs.text_kind == k for k in ("panorama", "single")}
    m = results["metrics"]
    assert m == cvg_metrics_reference(*case, subsets=subsets) == cvg_metrics(*case, subsets=subsets)
    assert m["overall"] == m[kind] and (m["overall"]["R@1"], m["overall"]["L@50"]) == (r1, l50)
    assert m[empty] == {"count": 0, "R@1": None, "R@5": None, "R@10": None, "L@50": None, "L@100": None,
                        "L@150": None, "deviation_km": None}  # fmt: skip

    # The official cal_score on the same embeddings: image x text similarities, paths below the data root.
    names = [p.relative_to(cvg).as_posix() for p in pairs.images]
    official = official_cal_score((images @ texts.T).numpy(), names, names)
    ours, theirs = m["overall"], official["overall"]
    assert {k: ours[k] for k in ("R@1", "R@5", "R@10", "L@50", "L@100", "L@150")} == {
        k: theirs[k] for k in ("R@1", "R@5", "R@10", "L@50", "L@100", "L@150")
    }
    assert ours["count"] == theirs["Count"] and ours["deviation_km"] == pytest.approx(
        theirs["Deviation"], rel=1e-12
    )
    assert (
        official["single_view" if empty == "single" else "panorama"]["Count"] == 0
    )  # it prints zero counters
    assert results["dataset"] == f"cvgtext/{version}/satellite/test" and results["counts"]["texts"] == len(
        names
    )


def test_cvg_single_subset_gallery_differs_from_the_mixed_one(cvg: Path) -> None:
    mixed = evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg, "version": "NewYork-mixed"})
    photos = evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg, "version": "NewYork-photos"})
    assert mixed["metrics"] == evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg})["metrics"]
    # In the mixed gallery single view 5 ("blue") finds the blue panorama ~146 m away; alone it cannot.
    assert (
        mixed["metrics"]["single"]["R@1"] == (4 / 6) * 100
        and photos["metrics"]["single"]["R@1"] == (5 / 6) * 100
    )
    with pytest.raises(DataFormatError, match="No CVG-Text annotation for city 'Tokyo'"):
        evaluate_with(FakeRetriever(), "cvgtext", {"data": cvg, "version": "Tokyo-photos"})


def test_cli_runs_a_single_subset_version(cvg: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "load_retriever", lambda **kw: FakeRetriever())
    out = tmp_path / "photos.json"
    argv = ["--protocol", "cvgtext", "--data", str(cvg), "--version", "NewYork-photos", "--model", "m"]
    assert main([*argv, "--view", "osm", "--out", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert results["dataset"] == "cvgtext/NewYork-photos/osm/test" and results["counts"]["texts"] == 6
    assert results["data"]["version"] == "NewYork-photos" and "city" not in results["data"]
    empty_row = next(line for line in capsys.readouterr().out.splitlines() if "panorama" in line)
    assert "–" in empty_row and empty_row.split()[-1] == "0"  # the empty subset: no numbers, N = 0


# ---------------------------------------------------------------------------------------------
# Exit codes: 2 and `error: ...` for a bad flag or a user error, never a traceback
# ---------------------------------------------------------------------------------------------


def test_cli_user_errors_exit_2(geotext: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "load_retriever", lambda **kw: FakeRetriever())
    missing = ["--protocol", "geotext1652", "--data", str(tmp_path / "nowhere"), "--model", "m"]
    assert main(missing) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No GeoText-1652 'test' annotation found") and "Traceback" not in err
    both = ["--protocol", "cvgtext", "--data", str(geotext), "--model", "m", "--city", "Tokyo"]
    assert main([*both, "--version", "NewYork-photos"]) == 2
    assert capsys.readouterr().err.startswith("error: --version NewYork-photos already names the city")
    with pytest.raises(SystemExit) as bad_flag:
        main(["--protocol", "coco", "--data", str(geotext), "--model", "m"])
    assert bad_flag.value.code == 2 and "invalid choice: 'coco'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantization", "nf4"], "argument --quantization: invalid choice: 'nf4'"),  # a bad flag
        (["--city", "NewYork", "--version", "NewYork"], "error: --version NewYork already names the city"),
    ],
)
def test_command_exits_2_without_a_traceback(tmp_path: Path, extra: list[str], message: str) -> None:
    argv = ["--protocol", "cvgtext", "--data", str(tmp_path), "--model", "m", *extra]
    done = subprocess.run(
        [sys.executable, "-m", "retriever.evaluate", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
