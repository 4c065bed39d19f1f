"""python -m retriever.demo.train_demo: train the demo's vision tower, connector and a LoRA on the top LM layers.

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

from ..adapters import add_adapter, save_adapter
from ..encoder import Retriever, load_retriever
from ..losses import LearnableTemperature, group_mask, info_nce
from ..pooling import get_pooler
from .model import TRAINED_MODULES

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
    truth = np.array([ids.index(d.tile_id) for d in val])
    first = (order == truth[:, None]).argmax(1)
    top_lat, top_lon = meta["lat"][order[:, 0]], meta["lon"][order[:, 0]]
    lat, lon = np.radians([d.lat for d in val]), np.radians([d.lon for d in val])
    a = (
        np.sin((np.radians(top_lat) - lat) / 2) ** 2
        + np.cos(lat) * np.cos(np.radians(top_lat)) * np.sin((np.radians(top_lon) - lon) / 2) ** 2
    )
    dist_m = 2 * 6371000 * np.arcsin(np.sqrt(a))
    return {**{f"r{k}": float((first < k).mean()) for k in (1, 5, 10)}, "l100": float((dist_m <= 100).mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m retriever.demo.train_demo", description=__doc__)
    p.add_argument("--gallery", type=Path, default=Path("assets/demo/gallery"))
    p.add_argument("--out", type=Path, default=Path("assets/demo/adapter"))
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--lora-layers", type=int, default=3, help="adapt this many layers just below the pooled one"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr-vision", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-limit", type=int, default=600, help="validation descriptions used during training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import geopandas as gpd

    meta_df = gpd.read_parquet(args.gallery / "tiles.parquet")
    tiles = {
        str(row.tile_id): Image.open(args.gallery / row.image_path).convert("RGB")
        for row in meta_df.itertuples()
    }
    meta = {"lat": meta_df["lat"].to_numpy(), "lon": meta_df["lon"].to_numpy()}
    train = [d for d in read_descriptions(args.gallery / "descriptions_train.jsonl") if d.tile_id in tiles]
    val = [d for d in read_descriptions(args.gallery / "descriptions_val.jsonl") if d.tile_id in tiles]
    val_subset = random.Random(args.seed).sample(val, min(args.val_limit, len(val)))
    by_tile: dict[str, list[int]] = {}
    for i, d in enumerate(train):
        by_tile.setdefault(d.tile_id, []).append(i)

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

    temperature = LearnableTemperature(args.temperature, learnable=True)
    vision_params = [p for n, p in r.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora_params = [p for n, p in r.model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": vision_params, "lr": args.lr_vision, "weight_decay": 0.01},
            {"params": lora_params, "lr": args.lr_lora, "weight_decay": 0.0},
            {"params": [temperature.log_value], "lr": 1e-3, "weight_decay": 0.0},
        ]
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    tile_ids = list(by_tile)
    budget_s = args.minutes * 60
    start_time = time.perf_counter()
    best = {"r1": -1.0}
    log = (args.out.parent / "train_log.jsonl").open("a") if args.out.parent.exists() else None
    step = 0
    bar = tqdm(total=args.max_steps, desc="Training demo", unit="step")
    while step < args.max_steps and time.perf_counter() - start_time < budget_s:
        progress = min(1.0, (time.perf_counter() - start_time) / budget_s)
        warm = min(1.0, (step + 1) / 30)
        for group, lr in zip(optimizer.param_groups, base_lrs):  # warmup, then cosine over the time budget
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        chosen = random.sample(tile_ids, min(args.batch_size, len(tile_ids)))
        picks = [random.choice(by_tile[t]) for t in chosen]
        r.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = query_path.embed([states[i] for i in picks])  # (B, D)
            t = r.embed(r.process_tiles([tiles[i] for i in chosen]))  # (B, D)
        loss = info_nce(q.float(), t.float(), temperature(), "symmetric", group_mask(chosen, chosen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision_params + lora_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tau=f"{temperature().item():.3f}")
        record: dict[str, Any] = {
            "step": step,
            "loss": loss.item(),
            "tau": temperature().item(),
            "elapsed_s": time.perf_counter() - start_time,
        }
        if step % args.eval_every == 0:
            metrics = validate(r, val_subset, tiles, meta)
            record["val"] = metrics
            print(f"step {step}: {metrics}")
            if metrics["r1"] > best["r1"]:
                best = {**metrics, "step": step}
                save_adapter(r, args.out, extra={"step": step, "val": metrics, "trained_from": DEMO_MODEL_ID})
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
    bar.close()
    final = validate(r, val_subset, tiles, meta)
    if final["r1"] > best["r1"]:
        best = {**final, "step": step}
        save_adapter(r, args.out, extra={"step": step, "val": final, "trained_from": DEMO_MODEL_ID})
    summary = {
        "steps": step,
        "minutes": (time.perf_counter() - start_time) / 60,
        "best": best,
        "final": final,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
