"""The demo jobs as commands: repository-anchored defaults, exit code 2 with `error:` on a user mistake, no
import-time side effects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import demo
from demo import build_gallery, evaluate_demo, osm, train_demo

JOBS = ("build_gallery", "train_demo", "evaluate_demo")


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=demo.REPO, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("job", JOBS)
def test_a_bad_flag_exits_2_without_a_traceback(job: str) -> None:
    done = _python("-m", f"demo.{job}", "--no-such-flag")
    assert done.returncode == 2
    assert "error:" in done.stderr and "--no-such-flag" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_inputs_exit_2_and_say_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-gallery"
    assert train_demo.main(["--gallery", str(missing), "--out", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "tiles.parquet does not exist" in err and "demo.build_gallery" in err

    assert evaluate_demo.main(["--gallery", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "descriptions_val.jsonl does not exist" in err

    adapter = tmp_path / "no-adapter"  # the committed gallery, but no adapter: refused before any model loads
    assert evaluate_demo.main(["--gallery", str(demo.GALLERY), "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(adapter) in err and "demo.train_demo" in err

    pbf = tmp_path / "missing.osm.pbf"
    assert build_gallery.main(["--out", str(tmp_path / "gallery"), "--pbf", str(pbf)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --pbf {pbf} does not exist")


def test_default_paths_are_anchored_at_the_repository() -> None:
    assert Path(__file__).resolve().parents[2] == demo.REPO
    assert build_gallery.build_parser().parse_args([]).out == demo.GALLERY
    train_args = train_demo.build_parser().parse_args([])
    assert (train_args.gallery, train_args.out) == (demo.GALLERY, demo.ADAPTER)
    eval_args = evaluate_demo.build_parser().parse_args([])
    assert (eval_args.gallery, eval_args.adapter, eval_args.index) == (demo.GALLERY, demo.ADAPTER, demo.INDEX)
    assert demo.GALLERY.is_absolute() and (demo.GALLERY / "tiles.parquet").is_file()


def test_osm_cache_lives_under_the_one_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEOTEXT_CACHE", str(tmp_path))
    assert osm.default_cache_dir() == tmp_path / "osm"  # $GEOTEXT_CACHE itself, nothing appended


def test_importing_the_renderer_leaves_the_matplotlib_backend_alone() -> None:
    code = "import demo.render, matplotlib; print(matplotlib.get_backend())"
    done = _python("-c", code, env={**os.environ, "MPLBACKEND": "svg"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
