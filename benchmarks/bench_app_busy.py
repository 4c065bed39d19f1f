"""The bundled demo served on loopback: a search while reasons stream, next to an idle search and the bare ranking.

`python -m benchmarks.bench_app_busy [--repeats 3]` prints, side by side in one run:
- the bare ranking in-process (encode the query + hybrid search over the index): the floor for any search;
- an idle search through the app's API (/search), the peer;
- a search made while another client's reasons are being written (/explain), the figure the app issue budgets
  at 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

QUERIES = (
    "market hall by the harbour",
    "stockmann on aleksanterinkatu",
    "a big white church on a square",
    "tram stop outside the railway station",
)
EXPLAINED = "the railway station with the clock tower"


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_app_busy", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=7997)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds into the reasons before searching")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from app.config import demo_ranking_weight, load_backend, parse_config, read_examples
    from app.ui import build_demo
    from retriever.index.hybrid import hybrid_search

    backend = load_backend(parse_config([]))
    if backend.retriever is None:
        raise SystemExit(f"the demo did not load: {backend.notice}")
    weight = demo_ranking_weight()
    demo = build_demo(
        backend.retriever, backend.index, backend.explainer, read_examples(), hybrid_weight=weight
    )
    demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{args.port}/"
    try:
        client = Client(url, verbose=False)
        client.predict(QUERIES[0], 5, "", api_name="/search")  # warm-up
        bare, idle, busy = [], [], []
        for i in range(args.repeats):
            query = QUERIES[i % len(QUERIES)]
            bare.append(
                _timed(lambda: hybrid_search(backend.index, backend.retriever, query, 5, weight or 0.5))
            )
            idle.append(_timed(lambda: client.predict(query, 5, "", api_name="/search")))
            writer = Client(url, verbose=False)
            writer.predict(EXPLAINED, 5, "", api_name="/search")
            job = writer.submit(EXPLAINED, 5, "", api_name="/explain")
            time.sleep(args.delay)
            still_writing = not job.done()
            busy.append(_timed(lambda: Client(url, verbose=False).predict(query, 5, "", api_name="/search")))
            job.result()
            print(f"repeat {i + 1}: reasons still being written when the search was sent: {still_writing}")
        print("| search | median s | max s |")
        print("|---|---|---|")
        for name, values in (
            ("bare ranking in-process (floor)", bare),
            ("idle, through /search (peer)", idle),
            ("while reasons stream (budget 1.5 s)", busy),
        ):
            print(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} |")
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
