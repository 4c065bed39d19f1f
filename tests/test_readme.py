"""The README quickstart runs as written, on a tiny model standing in for the hub id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    section = text.split("## Quickstart (Python)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_starts_with_the_two_commands() -> None:
    body = README.read_text().split("---", 2)[2]  # skip the Space front-matter
    first_block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def test_quickstart_runs(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = quickstart_code()
    assert 'load_retriever("Qwen/Qwen2-VL-2B-Instruct"' in code
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "tile.png")
    monkeypatch.chdir(tmp_path)
    code = code.replace("Qwen/Qwen2-VL-2B-Instruct", str(tiny_model_dir("qwen2_vl")))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["q"].shape == (1, namespace["r"].dim)
    assert namespace["scores"].shape == (1, 1)
    assert -1.0 <= float(namespace["scores"]) <= 1.0
