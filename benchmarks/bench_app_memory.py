"""Resident memory of the served app over many searches with explanations, printed as a curve.

Starts the app in this process on a loopback port and drives it through its API as visitors would: each
search is a new client (a new session) calling /search, then /explain (the same search, then its confidence
and reasons, as the page gets them). Memory is read from /proc/self/status after every --every searches;
the figure the issue bounds is the growth from after the first 10 searches to after the last (<= 300 MB).
Run: python -m benchmarks.bench_app_memory [--n 500] [--every 25] [--fake] [other app flags]
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import gc  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

MB = 1e6
BOUND_MB = 300.0
WORDS = ["red", "green", "blue", "yellow", "church", "park", "tram", "harbour", "café", "school"]


def rss_mb() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / MB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(examples: list[str], i: int) -> str:
    """A different description each time (no cache answers it), built from the examples."""
    extra = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 3))
    return f"{examples[i % len(examples)]} {extra} {i}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog="Other flags are the app's (python app.py --help)."
    )
    parser.add_argument("--n", type=int, default=500, help="searches with explanations (default 500)")
    parser.add_argument("--every", type=int, default=25, help="read the memory every this many searches")
    parser.add_argument("--k", type=int, default=5, help="results per search (default 5)")
    parser.add_argument(
        "--fake", action="store_true", help="fake retriever and explainer: the app's own memory"
    )
    args, app_argv = parser.parse_known_args(argv)
    if args.n < 10:
        parser.error("--n must be at least 10 (the curve starts after 10 searches)")

    from gradio_client import Client

    from app.config import load_backend, parse_config
    from app.ui import build_demo

    config = parse_config(app_argv)
    if args.fake:
        from benchmarks.bench_app import fake_backend
        from tests.app.test_app import FakeExplainer

        scratch = tempfile.TemporaryDirectory()
        retriever, index = fake_backend(Path(scratch.name))
        explainer, what = FakeExplainer(), "fake retriever and explainer, 64-tile index"
    else:
        backend = load_backend(config)
        if backend.retriever is None:
            raise SystemExit(f"the backend could not be loaded: {backend.notice}")
        retriever, index, explainer = backend.retriever, backend.index, backend.explainer
        what = f"model {config.model}, index {config.index}, explainer {'on' if explainer else 'off'}"
    hybrid = None if args.fake else config.hybrid  # the fake index has no context text
    demo = build_demo(retriever, index, explainer, config.examples, hybrid_weight=hybrid)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    has_explain = explainer is not None

    print(f"backend: {what}")
    print(f"after start: {rss_mb():.0f} MB")
    curve: list[tuple[int, float, float]] = []
    started = time.perf_counter()
    try:
        for i in range(1, args.n + 1):
            client = Client(url, verbose=False)  # a new visitor: a new session each time
            text = query(config.examples, i)
            _gallery, _map, status, _panel, _files = client.predict(text, args.k, "", api_name="/search")
            if "⚠️" in status:
                raise SystemExit(f"search {i} failed: {status}")
            if has_explain:
                panel = client.predict(text, args.k, "", api_name="/explain")
                if "Why these tiles" not in panel:
                    raise SystemExit(f"explanations of search {i} missing: {panel[:200]}")
            client.close()
            if i == 10 or i % args.every == 0 or i == args.n:
                gc.collect()
                curve.append((i, rss_mb(), time.perf_counter() - started))
                print(f"after {i:>4} searches: {curve[-1][1]:7.0f} MB   ({curve[-1][2]:6.0f} s)", flush=True)
    finally:
        demo.close()
    base = next(mb for n, mb, _ in curve if n == 10)
    growth = curve[-1][1] - base
    print("curve (searches, MB):", ", ".join(f"{n}: {mb:.0f}" for n, mb, _ in curve))
    verdict = "within" if growth <= BOUND_MB else "OVER"
    print(
        f"growth from 10 to {curve[-1][0]} searches: {growth:+.0f} MB ({verdict} the {BOUND_MB:.0f} MB bound)"
    )


if __name__ == "__main__":
    main()
