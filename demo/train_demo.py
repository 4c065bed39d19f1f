"""python -m demo.train_demo: train the demo's vision tower, connector and a LoRA on the top LM layers.

The base is SmolLM2 inside SmolVLM's architecture, pooled (mean) after layer 9 of 30. The LoRA sits on the last
few of those 9 layers only, so the hidden states of each description below the LoRA never change: they are
computed once and cached, and a training step runs just the adapted layers for the descriptions. The tiles go
through the whole path (vision tower -> connector -> 9 LM layers). The saved adapter is an ordinary peft folder
(LoRA + the vision tower and connector in full) that load_retriever() loads like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from retriever.models.adapters import add_adapter, save_adapter
from retriever.models.encoder import Retriever, load_retriever
from retriever.train.losses import LearnableTemperature
from retriever.evaluate.metrics import haversine_km
from retriever.models.pooling import get_pooler
from retriever.models.demo_base import TRAINED_MODULES

DEMO_MODEL_ID = "geotext/helsinki-smolvlm-base-v1"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Description:
    text: str
    tile_id: str
    lat: float
    lon: float


def read_descriptions(path: Path) -> list[Description]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Description(r["text"], str(r["tile_id"]), float(r["lat"]), float(r["lon"])) for r in rows]


def lora_targets(first_layer: int, last_layer: int) -> str:
    """A peft regex for the projections of text-model layers first_layer..last_layer-1."""
    layers = "|".join(str(i) for i in range(first_layer, last_layer))
    return rf".*text_model\.layers\.({layers})\.(self_attn|mlp)\.({'|'.join(PROJECTIONS)})$"


class CachedQueryPath:
    """Descriptions embedded from cached hidden states: only the adapted layers run in a training step."""

    def __init__(self, retriever: Retriever, first_trainable_layer: int) -> None:
        self.r = retriever
        self.start = first_trainable_layer  # states are cached after this many layers
        self.stop = retriever.config.pool_layer
        self.text_model = retriever.base_model.model.text_model
        self.pool = get_pooler(retriever.config.pooling)

    @torch.no_grad()
    def cache(self, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Hidden states after `start` layers, one (T_i, H) bf16 tensor per text, padding dropped."""
        states: list[torch.Tensor] = []
        layer = self.text_model.layers[self.start - 1]
        for s in tqdm(range(0, len(texts), batch_size), desc="Caching description states", unit="batch"):
            batch = self.r.tokenize_queries(texts[s : s + batch_size])
            captured: dict[str, torch.Tensor] = {}

            def hook(_m: Any, _i: Any, out: Any, captured: dict = captured) -> None:
                captured["h"] = out[0] if isinstance(out, tuple) else out
                raise StopIteration

            handle = layer.register_forward_hook(hook)
            try:
                self.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except StopIteration:
                pass
            finally:
                handle.remove()
            lengths = batch["attention_mask"].sum(1).tolist()
            states += [h[:n].to(torch.bfloat16).clone() for h, n in zip(captured["h"], lengths)]
        return states

    def embed(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run layers start..stop-1 on right-padded cached states and pool: -> (B, D) unit vectors."""
        lengths = torch.tensor([s.shape[0] for s in states])
        hidden = torch.nn.utils.rnn.pad_sequence([s.float() for s in states], batch_first=True)  # (B, T, H)
        mask = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
        positions = torch.arange(hidden.shape[1])[None, :].expand(hidden.shape[0], -1)
        rotary = self.text_model.rotary_emb(hidden, positions)
        for layer in self.text_model.layers[self.start : self.stop]:
            # causal attention with right padding: real tokens never see the pads, so no mask is needed
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return torch.nn.functional.normalize(self.pool(hidden.float(), mask), dim=-1)


def validate(
    r: Retriever, val: Sequence[Description], tiles: dict[str, Image.Image], meta: dict[str, Any]
) -> dict:
    """R@1/5/10 and L@100 of held-out descriptions against the whole gallery (the app's real task)."""
    ids = list(tiles)
    t = r.encode_tiles([tiles[i] for i in ids], batch_size=32, progress=False)  # (G, D)
    q = r.encode_queries([d.text for d in val], batch_size=64, progress=False)  # (Q, D)
    order = (q @ t.T).argsort(dim=1, descending=True, stable=True).numpy()  # (Q, G)
    position = {tile_id: i for i, tile_id in enumerate(ids)}
    truth = np.array([position[d.tile_id] for d in val])
    first = (order == truth[:, None]).argmax(1)
    top_lat, top_lon = meta["lat"][order[:, 0]], meta["lon"][order[:, 0]]
    dist_m = 1000.0 * haversine_km([d.lat for d in val], [d.lon for d in val], top_lat, top_lon)
    return {**{f"r{k}": float((first < k).mean()) for k in (1, 5, 10)}, "l100": float((dist_m <= 100).mean())}


def _schedule(optimizer: torch.optim.Optimizer, base_lrs: list[float], step: int, progress: float) -> None:
    """Warmup over 30 steps, then cosine decay over the stage's time budget."""
    warm = min(1.0, (step + 1) / 30)
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Stage:
    """A time-boxed optimisation loop with a progress bar and a JSONL log."""

    def __init__(self, name: str, minutes: float, max_steps: int, log: Any) -> None:
        self.name, self.budget_s, self.max_steps, self.log = name, minutes * 60, max_steps, log
        self.start = time.perf_counter()
        self.step = 0
        self.bar = tqdm(total=max_steps, desc=name, unit="step")

    @property
    def progress(self) -> float:
        return (time.perf_counter() - self.start) / self.budget_s

    def running(self) -> bool:
        if self.step < self.max_steps and self.progress < 1.0:
            return True
        self.bar.close()
        return False

    def record(self, **values: Any) -> None:
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if isinstance(v, float)})
        self.log.write(
            json.dumps(
                {
                    "stage": self.name,
                    "step": self.step,
                    **values,
                    "elapsed_s": time.perf_counter() - self.start,
                }
            )
            + "\n"
        )
        self.log.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m demo.train_demo", description=__doc__)
    p.add_argument("--gallery", type=Path, default=Path("assets/demo/gallery"))
    p.add_argument("--out", type=Path, default=Path("assets/demo/adapter"))
    p.add_argument("--log", type=Path, default=None, help="JSONL log (default: OUT/../train_log.jsonl)")
    p.add_argument(
        "--query-minutes", type=float, default=12.0, help="stage 1: query LoRA + free tile vectors"
    )
    p.add_argument("--vision-minutes", type=float, default=25.0, help="stage 2: pixels -> tile vectors")
    p.add_argument("--max-steps", type=int, default=100_000, help="per stage")
    p.add_argument("--query-batch", type=int, default=128)
    p.add_argument("--tile-batch", type=int, default=48)
    p.add_argument(
        "--lora-layers", type=int, default=3, help="adapt this many layers just below the pooled one"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr-vision", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--lr-tiles", type=float, default=1e-2)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--val-limit", type=int, default=539, help="validation descriptions used during training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import geopandas as gpd

    meta_df = gpd.read_parquet(args.gallery / "tiles.parquet")
    tile_ids = [str(t) for t in meta_df["tile_id"]]
    tiles = {
        t: Image.open(args.gallery / path).convert("RGB") for t, path in zip(tile_ids, meta_df["image_path"])
    }
    meta = {"lat": meta_df["lat"].to_numpy(), "lon": meta_df["lon"].to_numpy()}
    train = [d for d in read_descriptions(args.gallery / "descriptions_train.jsonl") if d.tile_id in tiles]
    val = [d for d in read_descriptions(args.gallery / "descriptions_val.jsonl") if d.tile_id in tiles]
    val = random.Random(args.seed).sample(val, min(args.val_limit, len(val)))
    target = torch.tensor([tile_ids.index(d.tile_id) for d in train])  # (N,) tile of each description

    r = load_retriever(DEMO_MODEL_ID, device="cpu")
    stop = r.config.pool_layer
    start = stop - args.lora_layers
    add_adapter(
        r,
        "lora",
        rank=args.rank,
        alpha=2 * args.rank,
        dropout=0.0,
        targets=lora_targets(start, stop),
        modules_to_save=TRAINED_MODULES,
    )
    query_path = CachedQueryPath(r, start)
    states = query_path.cache([d.text for d in train])
    with (
        torch.no_grad()
    ):  # the fast path must agree with the ordinary encoder, or training optimises the wrong thing
        check = [d.text for d in train[:4]]
        gap = (query_path.embed(query_path.cache(check)) - r.encode_queries(check)).abs().max().item()
    print(f"cached-path check: max |diff| = {gap:.2e} over 4 descriptions")
    log_path = args.log or args.out.parent / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("a")
    lora_params = [p for n, p in r.model.named_parameters() if p.requires_grad and "lora_" in n]
    vision_params = [p for n, p in r.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    temperature = LearnableTemperature(args.temperature, learnable=True)

    # Stage 1: the query side (LoRA) against one free vector per tile, initialised from each tile's OSM context.
    # No pixels here, so a step costs only the adapted layers: thousands of steps fit in minutes.
    with torch.no_grad():
        context_states = query_path.cache([str(f)[:400] for f in meta_df["features"]])
        tile_vectors = torch.nn.Parameter(query_path.embed(context_states).float())  # (G, D)
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": args.lr_lora, "weight_decay": 0.0},
            {"params": [tile_vectors], "lr": args.lr_tiles, "weight_decay": 0.0},
            {"params": [temperature.log_value], "lr": 1e-3, "weight_decay": 0.0},
        ]
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stage = Stage("stage 1: query side", args.query_minutes, args.max_steps, log)
    r.model.train()
    while stage.running():
        _schedule(optimizer, base_lrs, stage.step, stage.progress)
        picks = random.sample(range(len(train)), min(args.query_batch, len(train)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = query_path.embed([states[i] for i in picks])  # (B, D)
        logits = q.float() @ torch.nn.functional.normalize(tile_vectors, dim=-1).T / temperature()  # (B, G)
        loss = torch.nn.functional.cross_entropy(logits, target[picks])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + [tile_vectors], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stage.record(loss=loss.item(), tau=temperature().item())
    teacher = torch.nn.functional.normalize(tile_vectors.detach(), dim=-1)  # (G, D)
    with torch.no_grad():
        q_val = query_path.embed(query_path.cache([d.text for d in val]))
    free_r1 = float(
        ((q_val @ teacher.T).argmax(1) == torch.tensor([tile_ids.index(d.tile_id) for d in val]))
        .float()
        .mean()
    )
    print(
        f"stage 1 done after {stage.step} steps: held-out R@1 against the free tile vectors = {free_r1:.3f}"
    )

    # Stage 2: pixels -> the tile vectors. The LoRA is frozen so the query side stays where stage 1 put it.
    for param in lora_params:
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW([{"params": vision_params, "lr": args.lr_vision, "weight_decay": 0.01}])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stage = Stage("stage 2: vision tower", args.vision_minutes, args.max_steps, log)
    best: dict[str, Any] = {"r1": -1.0}

    def keep_if_better(metrics: dict[str, float], step: int, best: dict[str, Any]) -> dict[str, Any]:
        """Save the adapter when validation R@1 improves; half precision, since it is committed."""
        if metrics["r1"] <= best["r1"]:
            return best
        best = {**metrics, "step": step}
        extra = {"val": best, "trained_from": DEMO_MODEL_ID, "free_r1": free_r1}
        save_adapter(r, args.out, weights_dtype=torch.float16, extra=extra)
        return best

    while stage.running():
        _schedule(optimizer, base_lrs, stage.step, stage.progress)
        chosen = random.sample(range(len(tile_ids)), min(args.tile_batch, len(tile_ids)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t = r.embed(r.process_tiles([tiles[tile_ids[i]] for i in chosen]))  # (B, D)
        t = t.float()
        logits = t @ teacher.T / 0.05  # (B, G): each tile must land on its own vector, not a neighbour's
        loss = (
            torch.nn.functional.cross_entropy(logits, torch.tensor(chosen))
            + (1 - (t * teacher[chosen]).sum(1)).mean()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stage.record(loss=loss.item())
        if stage.step % args.eval_every == 0:
            metrics = validate(r, val, tiles, meta)
            print(f"stage 2 step {stage.step}: {metrics}")
            log.write(json.dumps({"stage": "stage 2 eval", "step": stage.step, "val": metrics}) + "\n")
            best = keep_if_better(metrics, stage.step, best)
    final = validate(r, val, tiles, meta)
    best = keep_if_better(final, stage.step, best)
    summary = {"stage1_free_vector_r1": free_r1, "best": best, "final": final}
    print(json.dumps(summary, indent=2))
    log.close()
    return summary


if __name__ == "__main__":
    main()
