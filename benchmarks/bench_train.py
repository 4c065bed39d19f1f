"""Training throughput and peak memory on the CPU: GradCache chunks against the plain full-batch step, per batch size."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(model: str, batch: int, chunk: int, steps: int, out: str, data: str) -> dict:
    """Runs in a fresh process, so its peak RSS is the run's own."""
    import torch

    torch.set_num_threads(1)  # one thread: figures that survive a busy neighbour
    from retriever.train import TrainConfig, Trainer
    from retriever.train.toy import make_toy_pairs

    pairs = make_toy_pairs(data)
    pairs = (pairs * (batch // len(pairs) + 1))[: max(batch, len(pairs))]
    config = TrainConfig(
        model=model,
        out=out,
        adapter="lora",
        rank=8,
        alpha=16,
        dropout=0.0,
        batch_size=batch,
        chunk_size=chunk,
        max_steps=steps + 1,
        eval_every=10**9,
        save_every=10**9,
        warmup_steps=1,
    )
    trainer = Trainer(config, train_pairs=pairs)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "samples_per_s": batch * steps / seconds,
        "peak_rss_mb": peak / 1024,
        "step_rss_mb": (peak - base_rss) / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(**json.loads(args.child))))
        return
    from retriever.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(args.family, Path(tmp) / "model"))
        print(f"tiny {args.family}, LoRA r=8, 1 thread, CPU; peak RSS of a fresh process per run")
        print(
            f"{'batch':>6} {'mode':>18} {'samples/s':>10} {'peak RSS MB':>12} {'RSS growth in steps MB':>23}"
        )
        for batch in [int(b) for b in args.batches.split(",")]:
            for mode, chunk in (("plain (no chunks)", batch), (f"GradCache chunk {args.chunk}", args.chunk)):
                spec = {
                    "model": model,
                    "batch": batch,
                    "chunk": chunk,
                    "steps": args.steps,
                    "out": f"{tmp}/run-{batch}-{chunk}",
                    "data": f"{tmp}/toy",
                }
                result = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(result.stdout.strip().splitlines()[-1])
                print(
                    f"{batch:>6} {mode:>18} {r['samples_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f} "
                    f"{r['step_rss_mb']:>23.0f}"
                )


if __name__ == "__main__":
    main()
