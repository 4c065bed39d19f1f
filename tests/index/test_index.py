"""The tile index: exact search equals brute force, manifest checks, resumable builds, exports and the CLIs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import retriever._cli as cli_mod
import retriever.index.__main__ as index_cli
from retriever import search as search_mod
from retriever.errors import CorruptIndexError, IndexMismatchError
from retriever.index import MANIFEST, TileIndex, build_index, exact_topk, hits_to_csv, hits_to_geojson
from retriever.index.backends import NativeScan, ThreadedScan
from retriever.index.spatial import parse_within
from retriever.index.tiles import load_tiles, make_tiles_frame, square_footprints
from tests.fakes import COLOURS, FakeRetriever, solid_tile

N, D = 1500, 24


class TableRetriever(FakeRetriever):
    """Tiles get fixed random unit vectors looked up by file stem; counts encode calls."""

    def __init__(
        self, vectors: dict[str, np.ndarray], name: str = "table", fail_after: int | None = None
    ) -> None:
        super().__init__(name)
        self.vectors, self.fail_after, self.calls, self.encoded = vectors, fail_after, 0, 0
        self.dim = len(next(iter(vectors.values())))

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "dim": self.dim}

    def encode_tiles(
        self, images: Sequence, batch_size: int = 8, progress: bool | None = None
    ) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.encoded += len(images)
        return torch.from_numpy(np.stack([self.vectors[Path(p).stem] for p in images]))


def random_gallery(n: int = N, dim: int = D, seed: int = 0) -> tuple[gpd.GeoDataFrame, dict[str, np.ndarray]]:
    """n tiles scattered over ~10 km around Helsinki with seeded random unit vectors (no image files)."""
    rng = np.random.default_rng(seed)
    lat, lon = 60.10 + rng.random(n) * 0.1, 24.85 + rng.random(n) * 0.2
    ids = [f"t{i:05d}" for i in range(n)]
    tiles = make_tiles_frame(
        ids, square_footprints(lat, lon, 100.0), [f"/nowhere/{i}.png" for i in ids], lat, lon
    )
    tiles["district"] = np.where(lon < 24.95, "west", "east")
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return tiles, dict(zip(ids, vectors, strict=True))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The random gallery indexed once in fp16 and once in fp32."""
    tiles, vectors = random_gallery()
    root = tmp_path_factory.mktemp("indexes")
    return {
        dtype: build_index(
            TableRetriever(vectors), tiles, root / dtype, dtype=dtype, shard_size=400, thumbnail_px=0
        )
        for dtype in ("fp16", "fp32")
    }


def brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None):
    rows = np.arange(len(embeddings)) if rows is None else rows
    scores = queries @ embeddings[rows].astype(np.float32).T  # (Q, R)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), rows[order]


def queries(q: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((q, D)).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_rows,block_rows", [(97, 300), (512, 1 << 16), (4096, 4096)])
@pytest.mark.parametrize("num_q", [1, 7, 33])
def test_exact_topk_equals_brute_force(dtype, chunk_rows, block_rows, num_q):
    table = torch.randn(N, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    qs = queries(num_q)
    rows = np.sort(np.random.default_rng(2).choice(N, 700, replace=False))
    for restrict in (None, rows):
        want_s, want_i = brute_force(table.float().numpy(), qs, 10, restrict)
        got_s, got_i = exact_topk(
            table,
            torch.from_numpy(qs),
            10,
            None if restrict is None else torch.from_numpy(restrict),
            chunk_rows,
            block_rows,
        )
        assert np.array_equal(got_i.numpy(), want_i)
        assert np.allclose(got_s.numpy(), want_s, atol=1e-4)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("num_q", [1, 5])  # 1: the zero-copy faiss scan of the torch backend; 5: GEMM
def test_index_search_equals_brute_force(built, dtype, backend, num_q):
    index = TileIndex.load(built[dtype], backend=backend)
    stored = np.load(built[dtype] / "embeddings.npy")
    assert stored.dtype == {"fp16": np.float16, "fp32": np.float32}[dtype] and stored.shape == (N, D)
    qs = queries(num_q)
    want_s, want_i = brute_force(stored, qs, 10)
    hits = index.search(qs, 10)
    assert [[h.tile_id for h in per_q] for per_q in hits] == [[f"t{i:05d}" for i in row] for row in want_i]
    assert np.allclose([[h.score for h in per_q] for per_q in hits], want_s, atol=1e-4)
    assert [h.rank for h in hits[0]] == list(range(1, 11))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_small_batches_scan_the_memory_map_without_copying(built, dtype):
    index = TileIndex.load(built[dtype])
    scan = index.backend.threaded
    assert isinstance(index.embeddings, np.memmap)
    if isinstance(scan, NativeScan):  # fp16 where the kernel runs: it reads the memory-mapped file itself
        assert dtype == "fp16" and np.shares_memory(scan.scan.table, index.embeddings)
    else:  # faiss views whose codes are the memory-mapped file's own bytes
        assert isinstance(scan, ThreadedScan) and all(not view.codes.is_owned for view in scan.views)
        assert sum(view.ntotal for view in scan.views) == N
    qs = queries(2)
    got_s, got_i = index.backend.topk(torch.from_numpy(qs), 7, None)
    want_s, want_i = brute_force(np.asarray(index.embeddings), qs, 7)
    assert np.array_equal(got_i, want_i) and np.allclose(got_s, want_s, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("num_q", [1, 3])  # torch backend, 1 query: faiss scan with a bitmap of the area
def test_filtered_search_is_exact(built, backend, num_q):
    index = TileIndex.load(built["fp16"], backend=backend)
    stored = np.load(built["fp16"] / "embeddings.npy")
    area = "60.15,24.95,2500"  # a 2.5 km circle inside the gallery
    inside = np.flatnonzero(
        parse_within(area).contains(gpd.points_from_xy(index.tiles.lon, index.tiles.lat)).astype(bool)
    )
    assert N // 16 < len(inside) < N // 2
    qs = queries(num_q)
    want_s, want_i = brute_force(stored, qs, 10, inside)
    hits = index.search(torch.from_numpy(qs), 10, within=area)
    assert [[int(h.tile_id[1:]) for h in per_q] for per_q in hits] == want_i.tolist()
    assert np.allclose([[h.score for h in per_q] for per_q in hits], want_s, atol=1e-4)
    # A bbox given as a geometry, and the same rows as a mask, agree.
    box = parse_within("24.9,60.12,25.0,60.16")
    mask = box.contains(gpd.points_from_xy(index.tiles.lon, index.tiles.lat))
    by_box = index.search(qs[0], 5, within=box)[0]
    by_mask = index.search(qs[0], 5, within=np.asarray(mask, dtype=bool))[0]
    assert [h.tile_id for h in by_box] == [h.tile_id for h in by_mask]
    assert all(24.9 <= h.lon <= 25.0 and 60.12 <= h.lat <= 60.16 for h in by_box)


@pytest.mark.parametrize(
    "factory,params", [("IVF16,Flat", "nprobe=16"), ("HNSW32", "efSearch=64"), ("SQfp16", None)]
)
def test_faiss_factory_indexes_find_stored_vectors(built, factory, params):
    index = TileIndex.load(built["fp32"], backend="faiss", factory=factory, params=params)
    probes = np.load(built["fp32"] / "embeddings.npy")[:50]  # each probe is a stored tile
    hits = index.search(probes, 3)
    assert [per_q[0].tile_id for per_q in hits] == [f"t{i:05d}" for i in range(50)]
    assert all(per_q[0].score == pytest.approx(1.0, abs=1e-3) for per_q in hits)  # SQfp16 rounds


def test_k_is_checked_and_clamped(built, caplog):
    index = TileIndex.load(built["fp32"])
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries(1), 0)
    with caplog.at_level(logging.WARNING, logger="retriever.index"):
        hits = index.search(queries(1), 10, within="60.15,24.95,300")
    assert 0 < len(hits[0]) < 10
    assert f"returning all {len(hits[0])}" in caplog.text
    assert len(index.search(queries(1), N + 5)[0]) == N


def test_hits_carry_geometry_context_and_export(built):
    index = TileIndex.load(built["fp16"])
    hit = index.search(queries(1), 3)[0][0]
    row = index.tiles.set_index("tile_id").loc[hit.tile_id]
    assert (hit.lat, hit.lon) == (row.lat, row.lon)
    assert hit.bbox == row.geometry.bounds and hit.footprint.equals(row.geometry)
    assert hit.context == {"district": row.district}
    record = json.loads(json.dumps(hit.to_dict()))
    assert record["bbox"] == list(row.geometry.bounds) and record["footprint"]["type"] == "Polygon"

    hits = index.search(queries(2), 3)
    collection = hits_to_geojson(hits, ["first", "second"])
    assert len(collection["features"]) == 6
    feature = collection["features"][3]
    assert feature["properties"]["query"] == "second" and feature["properties"]["rank"] == 1
    assert feature["properties"]["district"] == hits[1][0].context["district"]
    assert feature["geometry"]["coordinates"][0][0] == list(hits[1][0].footprint.exterior.coords[0])

    buffer = io.StringIO()
    hits_to_csv(hits[0], buffer)
    table = pd.read_csv(io.StringIO(buffer.getvalue()))
    assert table["tile_id"].tolist() == [h.tile_id for h in hits[0]]
    assert table[["west", "south", "east", "north"]].to_numpy() == pytest.approx(
        np.array([h.bbox for h in hits[0]])
    )
    assert "district" in table.columns


def test_manifest_records_the_build(built):
    manifest = json.loads((built["fp16"] / MANIFEST).read_text())
    assert (manifest["n"], manifest["dim"], manifest["dtype"]) == (N, D, "fp16")
    assert manifest["retriever"]["model"] == "table"
    assert manifest["embeddings"]["bytes"] == (built["fp16"] / "embeddings.npy").stat().st_size
    assert manifest["versions"]["numpy"] == np.__version__
    assert not (built["fp16"] / ".shards").exists()


def test_a_different_retriever_is_refused(built):
    tiles, vectors = random_gallery()
    TileIndex.load(built["fp16"], TableRetriever(vectors))  # the builder is accepted
    other = TableRetriever(vectors, name="other-model")
    with pytest.raises(IndexMismatchError) as refused:
        TileIndex.load(built["fp16"], other)
    assert "model: index='table', live='other-model'" in str(refused.value)
    assert "pooling" not in str(refused.value)  # only differing keys are listed
    index = TileIndex.load(built["fp16"])
    with pytest.raises(IndexMismatchError):
        index.search_text(other, ["red"], 3)


def copy_index(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        if file.is_file():
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_truncated_or_damaged_embeddings_are_detected(built, tmp_path):
    truncated = copy_index(built["fp16"], tmp_path / "truncated")
    data = (truncated / "embeddings.npy").read_bytes()
    (truncated / "embeddings.npy").write_bytes(data[:-D])
    with pytest.raises(CorruptIndexError, match="truncated"):
        TileIndex.load(truncated)

    headless = copy_index(built["fp16"], tmp_path / "headless")
    (headless / "embeddings.npy").write_bytes(b"\0" * 16 + data[16:])
    with pytest.raises(CorruptIndexError, match="not a readable"):
        TileIndex.load(headless)

    flipped = copy_index(built["fp16"], tmp_path / "flipped")
    (flipped / "embeddings.npy").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    TileIndex.load(flipped)  # same size: only the hash can tell
    with pytest.raises(CorruptIndexError, match="sha256"):
        TileIndex.load(flipped, verify=True)

    unfinished = copy_index(built["fp16"], tmp_path / "unfinished")
    (unfinished / MANIFEST).unlink()
    with pytest.raises(CorruptIndexError, match="did not finish"):
        TileIndex.load(unfinished)


def test_an_interrupted_build_resumes(tmp_path):
    tiles, vectors = random_gallery(n=10)
    first = TableRetriever(vectors, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        build_index(first, tiles, tmp_path / "idx", shard_size=4, thumbnail_px=0)
    assert first.calls == 1 and not (tmp_path / "idx" / MANIFEST).exists()
    with pytest.raises(CorruptIndexError):
        TileIndex.load(tmp_path / "idx")

    again = TableRetriever(vectors)
    build_index(again, tiles, tmp_path / "idx", shard_size=4, thumbnail_px=0)
    assert (again.calls, again.encoded) == (2, 6)  # shards 2 and 3 only
    stored = np.load(tmp_path / "idx" / "embeddings.npy").astype(np.float32)
    assert np.allclose(stored, np.stack([vectors[t] for t in tiles.tile_id]), atol=1e-3)

    # Leftover shards of another retriever are not reused.
    stale = TableRetriever(vectors, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        build_index(stale, tiles, tmp_path / "idx2", shard_size=4, thumbnail_px=0)
    renamed = TableRetriever(vectors, name="retrained")
    build_index(renamed, tiles, tmp_path / "idx2", shard_size=4, thumbnail_px=0)
    assert renamed.calls == 3


def colour_gallery(root: Path) -> gpd.GeoDataFrame:
    """One solid tile per palette colour, named CVG-Text style along a street."""
    folder = root / "tiles"
    folder.mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        solid_tile(colour, size=40).save(folder / f"{60.17 + i * 0.001:.6f},24.940000_{colour}.png")
    return load_tiles(folder)


def test_fake_retriever_finds_the_named_colour_with_thumbnails(tmp_path):
    tiles = colour_gallery(tmp_path)
    out = build_index(FakeRetriever(), tiles, tmp_path / "idx", thumbnail_px=16)
    index = TileIndex.load(out, FakeRetriever())
    hits = index.search_text(FakeRetriever(), ["a blue roof", "something green"], k=3)
    assert [per_q[0].tile_id.split("_")[1] for per_q in hits] == ["blue", "green"]
    thumb = Path(hits[0][0].image_path)
    assert thumb.is_absolute() and thumb.parent == out / "thumbnails"
    with Image.open(thumb) as image:
        assert max(image.size) == 16


def test_search_cli_prints_documented_json(tmp_path, monkeypatch, capsys):
    tiles = colour_gallery(tmp_path)
    build_index(
        FakeRetriever(),
        tiles,
        tmp_path / "idx",
        load_args={"model": "fake", "adapter": None, "quantization": "none"},
    )
    loaded = []
    monkeypatch.setattr(
        cli_mod, "load_retriever", lambda **kw: loaded.append(kw) or FakeRetriever(kw["model"])
    )

    args = ["--index", str(tmp_path / "idx"), "-q", "red", "-q", "yellow", "-k", "2", "--json"]
    assert (
        search_mod.main(args + ["--geojson", str(tmp_path / "h.geojson"), "--csv", str(tmp_path / "h.csv")])
        == 0
    )
    assert loaded == [
        {"model": "fake", "adapter": None, "quantization": "none", "device": None, "dtype": None}
    ]
    result = json.loads(capsys.readouterr().out)
    assert [len(per_q) for per_q in result] == [2, 2]
    first = result[0][0]
    assert {"rank", "tile_id", "score", "lat", "lon", "bbox", "image_path"} <= set(first)
    assert first["tile_id"].endswith("_red") and first["rank"] == 1 and len(first["bbox"]) == 4
    assert result[1][0]["tile_id"].endswith("_yellow")
    assert len(json.loads((tmp_path / "h.geojson").read_text())["features"]) == 4
    assert pd.read_csv(tmp_path / "h.csv")["query"].tolist() == ["red", "red", "yellow", "yellow"]

    # --within keeps only the tiles near the first two; a far-away area is a clear error.
    assert (
        search_mod.main(
            ["--index", str(tmp_path / "idx"), "-q", "red", "--json", "--within", "60.1705,24.94,100"]
        )
        == 0
    )
    near = json.loads(capsys.readouterr().out)[0]
    assert sorted(h["tile_id"].split("_")[1] for h in near) == ["green", "red"]
    assert search_mod.main(["--index", str(tmp_path / "idx"), "-q", "red", "--within", "0,0,1,1"]) == 2
    assert "selects no tile" in capsys.readouterr().err

    documented = search_mod.build_parser().format_help()
    assert all(f"  {key} " in documented for key in ("rank", "tile_id", "score", "bbox", "image_path"))
    assert "[west, south, east, north]" in documented


def test_index_cli_builds_and_records_how_to_reload(tmp_path, monkeypatch):
    tiles = colour_gallery(tmp_path)
    monkeypatch.setattr(cli_mod, "load_retriever", lambda **kw: FakeRetriever(kw["model"]))
    argv = ["build", "--model", "fake", "--tiles", str(tmp_path / "tiles"), "--out", str(tmp_path / "idx")]
    assert index_cli.main(argv + ["--footprint-m", "80", "--dtype", "fp32", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["load"] == {"model": "fake", "adapter": None, "quantization": "none"}
    assert manifest["n"] == len(tiles) and manifest["dtype"] == "fp32"
    assert (
        index_cli.main(
            ["build", "--model", "fake", "--tiles", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
