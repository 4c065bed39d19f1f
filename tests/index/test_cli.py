"""The index and search CLIs: exit code 2 with `error:` for user mistakes, formula-safe CSV, a quiet faiss loader."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import shapely

import retriever._cli as cli_mod
import retriever.index.__main__ as index_cli
from retriever import search as search_mod
from retriever.errors import CorruptIndexError
from retriever.index import FORMAT_VERSION, MANIFEST, Hit, TileIndex, build_index, csv_cell, hits_to_csv
from retriever.index.tiles import make_tiles_frame, square_footprints
from tests.fakes import FakeRetriever, solid_tile

FORMULAS = ['=HYPERLINK("http://evil","x")', "+1", "-2+3", "@SUM(A1)"]


@pytest.fixture(scope="module")
def formula_index(tmp_path_factory) -> Path:
    """Four red tiles west of Greenwich whose ids and context cells look like spreadsheet formulas."""
    root = tmp_path_factory.mktemp("formulas")
    paths = []
    for i in range(len(FORMULAS)):
        solid_tile("red", size=16).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    lat, lon = [60.17 + 0.001 * i for i in range(4)], [-24.94] * 4
    tiles = make_tiles_frame(FORMULAS, square_footprints(lat, lon, 80.0), paths, lat, lon)
    tiles["note"] = FORMULAS[::-1]
    load_args = {"model": "fake", "adapter": None, "quantization": "none"}
    return build_index(FakeRetriever(), tiles, root / "idx", thumbnail_px=0, load_args=load_args)


@pytest.fixture
def fake_loader(monkeypatch) -> list[dict]:
    """retriever._cli.load_retriever replaced by a FakeRetriever factory; records its keyword arguments."""
    calls: list[dict] = []
    monkeypatch.setattr(
        cli_mod, "load_retriever", lambda **kw: calls.append(kw) or FakeRetriever(kw["model"])
    )
    return calls


def assert_user_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "Traceback" not in err, err
    assert all(f in err for f in fragments), err


def test_csv_cell_guards_text_only() -> None:
    assert [csv_cell(f) for f in FORMULAS] == ["'" + f for f in FORMULAS]
    assert csv_cell("\tx") == "'\tx" and csv_cell("\rx") == "'\rx"
    assert csv_cell("red tile") == "red tile" and csv_cell("") == ""
    assert (
        csv_cell(-24.94) == -24.94 and csv_cell(-3) == -3 and csv_cell(None) is None
    )  # numbers stay numbers


def test_hits_to_csv_writes_formula_safe_cells() -> None:
    footprint = shapely.box(-24.95, 60.16, -24.93, 60.18)
    hit = Hit(1, FORMULAS[0], -0.25, 60.17, -24.94, footprint.bounds, "/x.png", footprint, {"note": "+1"})
    buffer = io.StringIO()
    hits_to_csv([hit], buffer, queries=["-2+3"])
    row = next(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert (row["tile_id"], row["note"], row["query"]) == ("'" + FORMULAS[0], "'+1", "'-2+3")
    assert (float(row["score"]), float(row["lon"]), float(row["west"])) == (-0.25, -24.94, -24.95)
    assert row["lon"] == "-24.94"  # a negative number is written as a number


def test_search_cli_csv_is_formula_safe(formula_index: Path, tmp_path: Path, fake_loader) -> None:
    out = tmp_path / "hits.csv"
    argv = ["--index", str(formula_index), "-q", "@SUM red", "-k", "4", "--csv", str(out)]
    assert search_mod.main(argv) == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert sorted(r["tile_id"] for r in rows) == sorted("'" + f for f in FORMULAS)
    assert sorted(r["note"] for r in rows) == sorted("'" + f for f in FORMULAS)
    assert {r["query"] for r in rows} == {"'@SUM red"}
    assert all(r["lon"] == "-24.94" and float(r["score"]) > 0 for r in rows)


def test_index_build_rejects_an_unknown_quantization(tmp_path: Path, capsys) -> None:
    argv = ["build", "--model", "m", "--tiles", str(tmp_path), "--out", str(tmp_path / "i")]
    with pytest.raises(SystemExit) as exited:
        index_cli.main([*argv, "--quantization", "nf4"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'nf4'" in err and "'4bit'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["build", "--model", "m", "--out", "x"],  # --tiles missing
        ["build", "--model", "m", "--tiles", "t", "--out", "x", "--dtype", "float64"],
        ["info"],
        ["optimize"],  # INDEX missing (--faiss is optional: the default rule picks one)
        ["nonsense"],
    ],
)
def test_index_cli_bad_flags_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        index_cli.main(argv)
    assert exited.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-q", "red"], ["--index", "x"], ["--index", "x", "-q", "r", "-k", "two"]])
def test_search_cli_bad_flags_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        search_mod.main(argv)
    assert exited.value.code == 2 and "Traceback" not in capsys.readouterr().err


def broken_copies(index: Path, root: Path) -> dict[str, Path]:
    """A missing folder, an unparsable manifest and a manifest from a newer release."""
    corrupt, newer = root / "corrupt", root / "newer"
    shutil.copytree(index, corrupt)
    shutil.copytree(index, newer)
    (corrupt / MANIFEST).write_text("{not json")
    manifest = json.loads((newer / MANIFEST).read_text())
    (newer / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    return {"missing": root / "nowhere", "corrupt": corrupt, "newer": newer}


@pytest.mark.parametrize(
    "case,says", [("missing", "does not exist"), ("corrupt", "not valid JSON"), ("newer", "upgrade")]
)
def test_user_errors_exit_2_with_error_line(formula_index, tmp_path, fake_loader, capsys, case, says) -> None:
    folder = str(broken_copies(formula_index, tmp_path)[case])
    assert_user_error(capsys, index_cli.main(["info", folder]), says)
    assert_user_error(capsys, index_cli.main(["optimize", folder, "--faiss", "Flat", "--no-progress"]), says)
    assert_user_error(capsys, search_mod.main(["--index", folder, "-q", "red"]), says)
    assert_user_error(capsys, search_mod.main(["--index", folder, "-q", "red", "--model", "fake"]), says)


def test_build_of_a_missing_source_exits_2(tmp_path: Path, fake_loader, capsys) -> None:
    argv = ["build", "--model", "fake", "--tiles", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]
    assert_user_error(capsys, index_cli.main(argv))


def test_a_newer_format_version_is_refused_and_older_ones_are_read(
    formula_index: Path, tmp_path: Path
) -> None:
    newer = broken_copies(formula_index, tmp_path)["newer"]
    with pytest.raises(CorruptIndexError, match=f"format_version {FORMAT_VERSION + 1}.*upgrade"):
        TileIndex.load(newer)
    older = tmp_path / "older"
    shutil.copytree(formula_index, older)
    manifest = json.loads((older / MANIFEST).read_text())
    del manifest["format_version"]  # written before the field existed: version 1
    (older / MANIFEST).write_text(json.dumps(manifest))
    assert len(TileIndex.load(older)) == len(FORMULAS)


def test_clis_keep_the_faiss_loader_quiet(formula_index: Path, fake_loader, capsys) -> None:
    loader = logging.getLogger("faiss.loader")
    loader.setLevel(logging.NOTSET)
    assert index_cli.main(["info", str(formula_index)]) == 0
    assert loader.level == logging.WARNING
    loader.setLevel(logging.NOTSET)
    assert search_mod.main(["--index", str(formula_index), "-q", "red", "--backend", "faiss"]) == 0
    assert loader.level == logging.WARNING
    assert "Could not load library" not in capsys.readouterr().err
