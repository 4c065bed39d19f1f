"""The Ray Data engine: a local-mode build equals the single-process build, shard for shard."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

pytest.importorskip("ray")

import retriever._cli as cli_mod  # noqa: E402
import retriever.index.__main__ as index_cli  # noqa: E402
from retriever.index import MANIFEST, build_index  # noqa: E402
from retriever.index.ray_build import ray_build_index  # noqa: E402
from retriever.index.tiles import make_tiles_frame, square_footprints  # noqa: E402
from tests.fakes import COLOURS, FakeRetriever, solid_tile  # noqa: E402
from tests.index.ray_fakes import MarkingRetriever, load_fake  # noqa: E402


def colour_tiles(folder: Path, n: int = 22) -> gpd.GeoDataFrame:
    """n solid tiles cycling through the palette (PNG files), along a line of latitudes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"tile{i:03d}.png"
        solid_tile(COLOURS[(i * 3) % len(COLOURS)]).save(path)
        paths.append(str(path))
    lat, lon = 60.1 + 0.001 * np.arange(n), np.full(n, 24.9)
    ids = [f"t{i:03d}" for i in range(n)]
    return make_tiles_frame(ids, square_footprints(lat, lon, 100.0), paths, lat, lon)


def test_ray_build_equals_single_process_build(tmp_path: Path) -> None:
    tiles = colour_tiles(tmp_path / "images")
    single = build_index(FakeRetriever(), tiles, tmp_path / "single", shard_size=4, thumbnail_px=32)
    ray = ray_build_index(
        FakeRetriever,
        tiles,
        tmp_path / "ray",
        num_workers=2,
        cpus_per_worker=0.5,
        shard_size=4,
        thumbnail_px=32,
    )
    a, b = np.load(single / "embeddings.npy"), np.load(ray / "embeddings.npy")
    assert a.shape == (22, FakeRetriever.dim) and len(np.unique(a.argmax(1))) == len(COLOURS)
    np.testing.assert_array_equal(a, b)  # same embeddings, same order
    ma, mb = json.loads((single / MANIFEST).read_text()), json.loads((ray / MANIFEST).read_text())
    assert ma["retriever"] == mb["retriever"] and ma["embeddings"]["sha256"] == mb["embeddings"]["sha256"]
    assert gpd.read_parquet(ray / "tiles.parquet")["tile_id"].tolist() == tiles["tile_id"].tolist()
    assert len(list((ray / "thumbnails").glob("*.jpg"))) == 22
    assert not (ray / ".shards").exists()


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray session for the module, shut down after it (no workers leak into other tests)."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def test_interrupted_ray_build_resumes_without_recomputing_finished_shards(tmp_path: Path) -> None:
    tiles = colour_tiles(tmp_path / "images")
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "ray"
    options = {"num_workers": 2, "cpus_per_worker": 0.5, "shard_size": 4, "thumbnail_px": 0}
    with pytest.raises(Exception, match="simulated worker failure"):  # shard 3 (tiles 12-15) fails
        ray_build_index(partial(MarkingRetriever, str(marks), "tile013"), tiles, out, **options)
    assert not (out / MANIFEST).exists()
    finished = {p.name for p in (out / ".shards").glob("*.npz")}
    assert "000003.npz" not in finished
    first_run = {p.name.split(".")[0] for p in marks.iterdir()}
    for p in marks.iterdir():
        p.unlink()

    ray_build_index(partial(MarkingRetriever, str(marks)), tiles, out, **options)
    second_run = sorted(p.name.split(".")[0] for p in marks.iterdir())
    missing = sorted(f"tile{4 * int(name[:6]):03d}" for name in {f"{i:06d}.npz" for i in range(6)} - finished)
    assert second_run == missing and "tile012" in second_run  # only the unfinished shards, each once
    assert not set(second_run) & {f"tile{4 * int(n[:6]):03d}" for n in finished}
    assert first_run >= {f"tile{4 * int(n[:6]):03d}" for n in finished}
    single = build_index(FakeRetriever(), tiles, tmp_path / "single", shard_size=4, thumbnail_px=0)
    np.testing.assert_array_equal(np.load(single / "embeddings.npy"), np.load(out / "embeddings.npy"))


def test_index_cli_builds_on_ray(tmp_path: Path, monkeypatch) -> None:
    colour_tiles(tmp_path / "images", n=6)
    sidecar = tmp_path / "tiles.csv"
    lines = ["image,lat,lon"] + [
        f"{p},{60.1 + 0.001 * i},24.9" for i, p in enumerate(sorted((tmp_path / "images").iterdir()))
    ]
    sidecar.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cli_mod, "load_retriever", load_fake)
    argv = [
        "build",
        "--model",
        "fake",
        "--tiles",
        str(sidecar),
        "--out",
        str(tmp_path / "idx"),
        "--engine",
        "ray",
    ]
    assert index_cli.main([*argv, "--shard-size", "4", "--thumbnail-px", "0", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["n"] == 6 and manifest["retriever"]["model"] == "fake"
    assert manifest["load"] == {"model": "fake", "adapter": None, "quantization": "none"}
