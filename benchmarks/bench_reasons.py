"""Reasons on the human dev set x the top-3 hits: faithfulness, loops, whole sentences, LM share, latency.

`python -m benchmarks.bench_reasons --limit 40` (generation is slow on 2 cores). Each figure is printed next
to its target (issue 14). Faithfulness is measured twice: by the reason checker itself, and by a simpler,
independent rule (every capitalised word after a sentence's first must occur in the tile's or a neighbour's
context text or in the query).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ASSETS = Path("assets/demo")
DEV = ASSETS / "eval" / "human_dev.jsonl"
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")


def loops(text: str, n: int = 3, times: int = 3) -> bool:
    """Whether some word n-gram occurs `times` or more times."""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def independent_unfaithful(text: str, allowed_text: str) -> list[str]:
    """Capitalised words after a sentence's first that occur nowhere in the allowed text (folded)."""
    from retriever.vocabulary import fold

    allowed = fold(allowed_text)
    bad = []
    for sentence in re.findall(r"[^.!?;]+", text):
        words = re.findall(r"[^\W\d_]+", sentence)
        bad += [w for w in words[1:] if w[:1].isupper() and fold(w) not in allowed]
    return bad


def run(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from retriever.explain import Explainer
    from retriever.explain.evidence import unsupported_words
    from retriever.index import TileIndex
    from retriever.models.demo_base import DEMO_MODEL_ID
    from retriever.models.encoder import load_retriever

    rows = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()][: args.limit]
    retriever = load_retriever(DEMO_MODEL_ID, adapter=args.adapter)
    index = TileIndex.load(args.index, retriever=retriever)
    ex = Explainer(retriever, autocast_bf16=retriever.device.type == "cpu", index=index)
    tiles = index.tiles.set_index(index.tiles["tile_id"].astype(str))
    text_of = {
        t: " ".join(str(tiles.loc[t, c]) for c in ("features", "context") if c in tiles.columns)
        for t in tiles.index
    }
    records = []
    for row in rows:
        hits = index.search_text(retriever, [row["q"]], k=args.top)[0]
        for hit in hits:
            started = time.perf_counter()
            first = None
            shown = ""
            for chunk in ex.reason(row["q"], hit, max_new_tokens=args.max_new_tokens):
                first = first if first is not None else time.perf_counter() - started
                shown += chunk
            total = time.perf_counter() - started
            checked = ex.last_checked
            evidence = ex.evidence(row["q"], hit)
            allowed = " ".join(
                [row["q"], text_of.get(str(hit.tile_id), "")]
                + [text_of[t] for t in ex.finder.neighbours(str(hit.tile_id))]
            )
            records.append(
                {
                    "q": row["q"],
                    "tile_id": str(hit.tile_id),
                    "rank": int(hit.rank),
                    "shown": shown,
                    "raw": checked.raw,
                    "marks": [(m.mention.surface, m.status, m.matched) for m in evidence.matches],
                    "lm_sentences": len(checked.sentences),
                    "kept": len(checked.kept),
                    "replaced": checked.replaced,
                    "checker_bad": [
                        w
                        for s in checked.kept
                        for w in unsupported_words(s, evidence, ex.finder.vocabulary, ex.finder.gallery_names)
                    ],
                    "independent_bad": independent_unfaithful(shown, allowed),
                    "first_s": first or total,
                    "total_s": total,
                }
            )
            print(f"[{len(records)}] {total:.1f} s  {row['q'][:60]!r} -> {shown[:200]!r}", flush=True)
    n = len(records)
    first_s = np.array([r["first_s"] for r in records])
    total_s = np.array([r["total_s"] for r in records])
    lm_total = sum(r["lm_sentences"] for r in records)
    figures = {
        "reasons": n,
        "faithful (checker)": float(np.mean([not r["checker_bad"] for r in records])),
        "faithful (independent capitalised-name rule)": float(
            np.mean([not r["independent_bad"] for r in records])
        ),
        "loops, shown (3-gram >= 3 times)": float(np.mean([loops(r["shown"]) for r in records])),
        "loops, raw LM text": float(np.mean([loops(r["raw"]) for r in records])),
        "whole sentences, shown": float(np.mean([bool(SENTENCE_END.search(r["shown"])) for r in records])),
        "whole sentences, raw LM text": float(
            np.mean([bool(SENTENCE_END.search(r["raw"].strip())) for r in records])
        ),
        "share of shown sentences written by the LM": float(
            sum(r["kept"] for r in records) / max(1, sum(r["kept"] + 1 for r in records))
        ),
        "share of LM sentences dropped": float(1 - sum(r["kept"] for r in records) / max(1, lm_total)),
        "share of reasons with no LM sentence (replaced)": float(np.mean([r["replaced"] for r in records])),
        "first words, median s": float(np.median(first_s)),
        "first words, p90 s": float(np.percentile(first_s, 90)),
        "whole reason, median s": float(np.median(total_s)),
        "whole reason, p90 s": float(np.percentile(total_s, 90)),
    }
    targets = {
        "faithful (checker)": "100%",
        "faithful (independent capitalised-name rule)": "100%",
        "loops, shown (3-gram >= 3 times)": "0%",
        "loops, raw LM text": "0%",
        "whole sentences, shown": ">= 95%",
        "whole sentences, raw LM text": ">= 95% (before the cut)",
        "first words, median s": "<= 1 s",
        "first words, p90 s": "<= 1 s",
        "whole reason, median s": "<= 4 s",
        "whole reason, p90 s": "<= 4 s",
    }
    print()
    for name, value in figures.items():
        shown = f"{value:.3f}" if name.endswith(" s") or name == "reasons" else f"{100 * value:.1f}%"
        print(f"{name:48s} {shown:>10s}   target {targets.get(name, 'reported')}")
    if args.out:
        from retriever._io import write_json_atomic

        write_json_atomic(args.out, {"figures": figures, "records": records})
    return figures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_reasons", description=__doc__)
    p.add_argument("--limit", type=int, default=40, help="dev queries to explain (x --top hits each)")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--index", type=Path, default=ASSETS / "index")
    p.add_argument("--adapter", type=Path, default=ASSETS / "adapter")
    p.add_argument("--out", type=Path, help="write figures and every reason as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    from retriever._cli import run_cli

    raise SystemExit(run_cli(main))
