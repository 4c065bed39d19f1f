"""`python -m retriever.explain`: fit the confidence calibration and the ERM weight on a validation split."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from retriever._cli import add_model_args, fail, retriever_from_args, run_cli
from retriever.evaluate.cache import embed_pairs
from retriever.evaluate.data import CVG_VIEWS, PairSet, read_dataset
from retriever.evaluate.protocols import PROTOCOLS
from retriever.explain.calibration import Calibration, ValExample, fit_all
from retriever.explain.explainer import Explainer
from retriever.models.config import CALIBRATION_FILE


def validation_examples(
    explainer: Explainer,
    pairs: PairSet,
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    k: int = 5,
    max_queries: int | None = None,
    seed: int = 0,
) -> list[ValExample]:
    """Top-k over the whole gallery for (a sample of) the texts; relevant = same label as the true image."""
    sims = (
        torch.from_numpy(np.asarray(text_emb, dtype=np.float32))
        @ torch.from_numpy(np.asarray(image_emb, dtype=np.float32)).T
    )  # (T, I)
    top = torch.topk(sims, min(k, sims.shape[1]), dim=1)  # (T, k)
    rows = np.arange(len(pairs.texts))
    if max_queries is not None and len(rows) > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
    labels = np.asarray(pairs.image_label)
    out = []
    for t in rows:
        cand = top.indices[t].numpy()  # (k,)
        truth = labels[int(pairs.text_image[t])]
        p = explainer.p_yes(pairs.texts[t], [pairs.images[int(c)] for c in cand])
        out.append(ValExample(top.values[t].numpy().astype(np.float64), p, labels[cand] == truth))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retriever.explain",
        description="Fit the explanation confidence calibration and the ERM weight on a validation split.",
    )
    parser.add_argument(
        "--protocol", required=True, choices=sorted(PROTOCOLS), help="as in retriever.evaluate"
    )
    parser.add_argument("--data", required=True, type=Path, help="the dataset folder (or JSONL file)")
    parser.add_argument("--split", default="val", help="annotation split to fit on (never test)")
    parser.add_argument("--city", help="CVG-Text city, both subsets (default: NewYork)")
    parser.add_argument("--version", help="CVG-Text official version instead of --city, e.g. Tokyo-photos")
    parser.add_argument("--view", default="satellite", choices=sorted(CVG_VIEWS))
    parser.add_argument("--image-root", type=Path)
    parser.add_argument("--official-quirks", action="store_true")
    add_model_args(parser)
    parser.add_argument("--k", type=int, default=5, help="candidates per query (the ERM depth)")
    parser.add_argument(
        "--max-queries", type=int, default=300, help="sample of texts (P(yes) costs a forward each)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, help=f"calibration JSON (default: {CALIBRATION_FILE} in the adapter folder)"
    )
    return parser


def report(cal: Calibration, n_queries: int, k: int, out: Path) -> None:
    """Print the fitted numbers and where they went."""
    rep = cal.report
    print(
        f"{n_queries} queries, top-{k}: T={cal.temperature}, w_sim={cal.w_sim:.3f}, "
        f"w_yes={cal.w_yes:.3f}, bias={cal.bias:.3f}, ERM weight={cal.rerank_weight}"
    )
    print(f"ECE before {rep['ece_before']:.4f} -> after {rep['ece_after']:.4f} (in-sample)")
    print(f"R@1 similarity {rep['r1_before']:.2f} -> ERM {rep['r1_after']:.2f} (in-sample)")
    if rep["held_out"]:
        print("held-out (2-fold): " + ", ".join(f"{k}={v:.4f}" for k, v in rep["held_out"].items()))
    print(f"calibration written to {out}")


def fit(argv: Sequence[str] | None = None) -> int:
    """Embed the split, ask the MLLM about each query's top-k, fit, save next to the adapter (or --out)."""
    args = build_parser().parse_args(argv)
    if args.split == "test":
        return fail("Fit on a validation split, never on test (pass --split val or train).")
    if not args.data.exists():
        return fail(f"No dataset at {args.data}: pass --data the {args.protocol} folder (or JSONL file).")
    out = args.out or Path(args.adapter or args.model) / CALIBRATION_FILE
    if args.out is None and out.is_file() and Calibration.load(out).uses_evidence:
        # that one was fitted with OSM evidence (python -m demo.calibrate_explain); this CLI has no evidence
        return fail(
            f"{out} holds an evidence-based calibration, which this command cannot refit; "
            "pass --out to write the similarity / P(yes) calibration elsewhere."
        )
    spec = PROTOCOLS[args.protocol]
    pairs = read_dataset(spec.dataset, args.data, **spec.data_options(args))
    retriever = retriever_from_args(args)
    texts, images, failed, _ = embed_pairs(retriever, pairs, batch_size=args.batch_size)
    if failed:
        return fail(f"{len(failed)} images could not be decoded, e.g. {pairs.images[failed[0][0]]}")
    explainer = Explainer(retriever, calibration=Calibration())
    examples = validation_examples(explainer, pairs, texts, images, args.k, args.max_queries, args.seed)
    cal = fit_all(examples, args.seed)
    cal.save(out)
    report(cal, len(examples), args.k, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: exit code 0, or 2 with `error: <message>` on a user mistake (argparse: on a bad flag)."""
    return run_cli(fit, argv)


if __name__ == "__main__":
    raise SystemExit(main())
