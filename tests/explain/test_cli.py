"""`python -m retriever.explain`: fitting writes a calibration; user mistakes exit 2 with `error:`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from retriever.explain import Calibration
from retriever.explain.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def test_fit_cli_writes_a_calibration(tiny_model_dir, tmp_path: Path, capsys) -> None:
    from tests.data.cvgtext.data import make_cvgtext

    data = make_cvgtext(tmp_path / "data", n_train=4)
    out = tmp_path / "cal.json"
    model = str(tiny_model_dir("qwen2_vl"))
    code = main(
        ["--protocol", "cvgtext", "--data", str(data), "--split", "train", "--model", model, "--k", "3"]
        + ["--out", str(out)]
    )
    assert code == 0
    cal = Calibration.load(out)
    assert cal.report["n_queries"] == 8 and 0.0 <= cal.rerank_weight <= 1.0
    assert "ECE before" in capsys.readouterr().out
    code = main(["--protocol", "cvgtext", "--data", str(data), "--split", "test", "--model", model])
    assert code == 2 and "error: Fit on a validation split, never on test" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--protocol", "cvgtext", "--data", "x", "--model", "m", "--no-such-flag"],
            "unrecognized arguments",
        ),
        (
            ["--protocol", "cvgtext", "--data", "/no/such/dataset", "--model", "m"],
            "No dataset at /no/such/dataset",
        ),
    ],
    ids=["bad-flag", "missing-data"],
)
def test_python_m_explain_exits_2_with_error(argv: list[str], says: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "retriever.explain", *argv], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and says in done.stderr
    assert "Traceback" not in done.stderr


def test_fit_cli_never_overwrites_an_evidence_calibration(tiny_model_dir, tmp_path: Path, capsys) -> None:
    from retriever.models.config import CALIBRATION_FILE
    from tests.data.cvgtext.data import make_cvgtext

    data = make_cvgtext(tmp_path / "data", n_train=4)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    saved = Calibration(w_share=1.5, w_names=2.0, report={"fit_on": "top1"}).save(adapter / CALIBRATION_FILE)
    before = saved.read_bytes()
    model = str(tiny_model_dir("qwen2_vl"))
    argv = ["--protocol", "cvgtext", "--data", str(data), "--split", "train", "--model", model]
    code = main([*argv, "--adapter", str(adapter)])
    assert code == 2 and "evidence-based calibration" in capsys.readouterr().err
    assert saved.read_bytes() == before
