"""Training throughput and peak memory on the CPU: GradCache chunks against the plain step; 1 vs N processes.

Run: python -m benchmarks.bench_train [--batches 16,64,256 --chunk 16]      GradCache chunks against plain steps
     python -m benchmarks.bench_train --processes 1,2 [--batch 32 --chunk 8] the same global batch on 1 and 2
     gloo ranks (torchrun, one thread each): samples/s, peak RSS per rank, and the shares of a step spent in
     collectives (all-gathers of the embeddings, the gradient sum) and waiting for the slower rank before them
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def timed_collectives() -> dict[str, float]:
    """Wrap World's collectives with stopwatches (in this benchmark process only); returns the running totals.

    A barrier first splits each collective's time into waiting for the slower rank and the transfer itself.
    """
    import torch.distributed as dist

    from retriever.train.distributed import World

    totals = {"wait": 0.0, "comm": 0.0}
    for name in ("gather_rows", "sum_grads"):
        original = getattr(World, name)

        def timed(self: World, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if self.enabled:
                dist.barrier()
            ready = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                totals["wait"] += ready - start
                totals["comm"] += time.perf_counter() - ready

        setattr(World, name, timed)
    return totals


def rank_run(model: str, batch: int, chunk: int, steps: int, out: str, data: str) -> None:
    """One rank of a `--processes` run (under torchrun); rank 0 prints every rank's figures as one JSON line."""
    import torch

    torch.set_num_threads(1)
    from retriever.train import TrainConfig, Trainer
    from retriever.train.toy import make_toy_pairs

    comm = timed_collectives()
    pairs = make_toy_pairs(data)
    pairs = (pairs * (batch // len(pairs) + 1))[: max(batch, len(pairs))]
    config = TrainConfig(
        model=model, out=out, adapter="lora", rank=8, alpha=16, dropout=0.0, batch_size=batch, chunk_size=chunk,
        max_steps=steps + 1, eval_every=10**9, save_every=10**9, warmup_steps=1,
    )  # fmt: skip
    trainer = Trainer(config, train_pairs=pairs)
    trainer.step()  # warm-up
    trainer.world.barrier()
    comm["wait"], comm["comm"], start = 0.0, 0.0, time.perf_counter()
    for _ in range(steps):
        trainer.step()
    seconds = time.perf_counter() - start
    mine = {
        "seconds": seconds,
        "wait_seconds": comm["wait"],
        "comm_seconds": comm["comm"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    ranks = trainer.world.gather_objects(mine)
    if trainer.world.is_main:
        slowest = max(r["seconds"] for r in ranks)
        print(
            json.dumps(
                {
                    "processes": trainer.world.size,
                    "samples_per_s": batch * steps / slowest,
                    "step_s": slowest / steps,
                    "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
                    "comm_share": [r["comm_seconds"] / r["seconds"] for r in ranks],
                    "wait_share": [r["wait_seconds"] / r["seconds"] for r in ranks],
                }
            )
        )
    from retriever.train.distributed import shutdown_world

    shutdown_world()


def compare_processes(args: argparse.Namespace) -> None:
    """The same global batch on 1, 2, ... processes, side by side."""
    from retriever.models.tiny import make_tiny_model

    counts = [int(n) for n in args.processes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(args.family, Path(tmp) / "model"))
        rows = []
        for n in counts:
            spec = {
                "model": model,
                "batch": args.batch,
                "chunk": args.chunk,
                "steps": args.steps,
                "out": f"{tmp}/run-{n}",
                "data": f"{tmp}/toy",
            }
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(n),
            ]
            done = subprocess.run(
                [*command, __file__, "--rank-child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
                env={
                    **os.environ,
                    "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                },
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"tiny {args.family}, LoRA r=8, global batch {args.batch}, GradCache chunk {args.chunk}, "
        f"{args.steps} timed steps, gloo on CPU, 1 thread per process ({os.cpu_count()} cores)"
    )
    print(f"{'processes':>9} {'samples/s':>10} {'speed-up':>9} {'step s':>7} {'peak RSS MB per rank':>22} "
          f"{'communication share':>21} {'waiting share':>15}")  # fmt: skip
    for r in rows:
        rss = " / ".join(f"{m:.0f}" for m in r["peak_rss_mb"])
        share = " / ".join(f"{100 * c:.1f}%" for c in r["comm_share"])
        wait = " / ".join(f"{100 * c:.1f}%" for c in r["wait_share"])
        speed_up = r["samples_per_s"] / rows[0]["samples_per_s"]
        print(
            f"{r['processes']:>9} {r['samples_per_s']:>10.1f} {speed_up:>8.2f}x {r['step_s']:>7.2f} "
            f"{rss:>22} {share:>21} {wait:>15}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--processes", help="e.g. 1,2: compare data-parallel process counts instead")
    parser.add_argument("--batch", type=int, default=32, help="the global batch of --processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(**json.loads(args.child))))
        return
    if args.rank_child:
        rank_run(**json.loads(args.rank_child))
        return
    if args.processes:
        compare_processes(args)
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
