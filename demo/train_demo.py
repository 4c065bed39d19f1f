"""python -m demo.train_demo: train the demo's vision tower, connector and a LoRA on the top LM layers.

The base is SmolLM2 inside SmolVLM's architecture, pooled (mean) after layer 9 of 30. The LoRA sits on the last
few of those 9 layers only, so the hidden states of each description below the LoRA never change: they are
computed once and cached, and a training step runs just the adapted layers for the descriptions. The tiles go
through the whole path (vision tower -> connector -> 9 LM layers). The saved adapter is an ordinary peft folder
(LoRA + the vision tower and connector in full) that load_retriever() loads like any other.

Stage 1 (stage_query_side) fits the LoRA against one free vector per tile; stage 2 (stage_vision) teaches the
vision tower to put each tile's pixels on its vector.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from demo import ADAPTER, ASSETS, GALLERY, require
from demo.descriptions import read_records
from demo.evaluate_human import HumanSet, footprint_hits, read_human
from retriever._cli import run_cli
from retriever.evaluate.metrics import first_relevant, haversine_km, recall_at_k
from retriever.models.adapters import add_adapter, save_adapter
from retriever.models.backbones import LLM_PROJECTIONS, get_attr_path
from retriever.models.demo_base import DEMO_MODEL_ID, TRAINED_MODULES
from retriever.models.encoder import Retriever, fast_bf16_cpu, load_retriever
from retriever.models.pooling import get_pooler
from retriever.train.losses import LearnableTemperature

BUILD_HINT = "build the gallery first: python -m demo.build_gallery"


@dataclass
class Description:
    text: str
    tile_id: str
    lat: float
    lon: float


def read_descriptions(path: Path) -> list[Description]:
    """The descriptions of one descriptions_*.jsonl file, with their true tile and location."""
    return [
        Description(r["text"], str(r["tile_id"]), float(r["lat"]), float(r["lon"]))
        for r in read_records(path)
    ]


@dataclass
class Gallery:
    """What training reads from a gallery folder: tiles (in parquet order), their context and descriptions."""

    tile_ids: list[str]
    images: dict[str, Image.Image]
    meta: dict[str, np.ndarray]  # "lat", "lon": (G,) tile centres, in tile_ids order
    contexts: list[str]  # (G,) each tile's named-feature text
    train: list[Description]
    val: list[Description]
    human: HumanDev | None = None  # human-written dev descriptions, for model selection only


@dataclass
class HumanDev:
    """Human-written dev descriptions and the gallery tiles whose footprint holds each true point."""

    data: HumanSet
    relevant: np.ndarray  # (Q, G) bool


def load_human_dev(path: Path, footprints: np.ndarray) -> HumanDev:
    """Read human_dev.jsonl; `footprints` are the tiles' polygons in tile_ids order."""
    data = read_human(path)
    return HumanDev(data, footprint_hits(data, footprints))


def load_gallery(folder: Path, val_limit: int, seed: int, human_dev: Path | None = None) -> Gallery:
    """Read a built gallery; validation keeps a seeded sample of at most `val_limit` descriptions."""
    import geopandas as gpd

    meta_df = gpd.read_parquet(require(folder / "tiles.parquet", BUILD_HINT))
    tile_ids = [str(t) for t in meta_df["tile_id"]]
    images = {t: Image.open(folder / path).convert("RGB") for t, path in zip(tile_ids, meta_df["image_path"])}
    train = [d for d in read_descriptions(folder / "descriptions_train.jsonl") if d.tile_id in images]
    val = [d for d in read_descriptions(folder / "descriptions_val.jsonl") if d.tile_id in images]
    return Gallery(
        tile_ids=tile_ids,
        images=images,
        meta={"lat": meta_df["lat"].to_numpy(), "lon": meta_df["lon"].to_numpy()},
        contexts=[str(f) for f in meta_df["context" if "context" in meta_df.columns else "features"]],
        train=train,
        val=random.Random(seed).sample(val, min(val_limit, len(val))),
        human=load_human_dev(human_dev, np.asarray(meta_df.geometry.values)) if human_dev else None,
    )


def lora_targets(decoder_attr: str, first_layer: int, last_layer: int) -> str:
    """A peft regex for the projections of decoder layers first_layer..last_layer-1.

    `decoder_attr` is the family's language_model_attr ("model.text_model"); its last name anchors the regex.
    """
    decoder = re.escape(decoder_attr.rsplit(".", 1)[-1])
    layers = "|".join(str(i) for i in range(first_layer, last_layer))
    return rf".*{decoder}\.layers\.({layers})\.(self_attn|mlp)\.({'|'.join(LLM_PROJECTIONS)})$"


class CachedQueryPath:
    """Descriptions embedded from cached hidden states: only the adapted layers run in a training step."""

    def __init__(self, retriever: Retriever, first_trainable_layer: int) -> None:
        self.r = retriever
        self.start = first_trainable_layer  # states are cached after this many layers
        self.stop = retriever.config.pool_layer
        self.decoder = get_attr_path(retriever.base_model, retriever.family.language_model_attr)
        self.layers = retriever.decoder_layers()
        self.pool = get_pooler(retriever.config.pooling)

    @torch.no_grad()
    def cache(self, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Hidden states after `start` layers, one (T_i, H) bf16 tensor per text, padding dropped."""
        states: list[torch.Tensor] = []
        for s in tqdm(range(0, len(texts), batch_size), desc="Caching description states", unit="batch"):
            batch = self.r.tokenize_queries(texts[s : s + batch_size])
            hidden = self._hidden_after_start(batch)  # (B, T, H)
            lengths = batch["attention_mask"].sum(1).tolist()
            states += [h[:n].to(torch.bfloat16).clone() for h, n in zip(hidden, lengths)]
        return states

    def _hidden_after_start(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the decoder on a tokenized batch and stop it once layer `start` is done: -> (B, T, H)."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: Any, _i: Any, out: Any) -> None:
            captured["h"] = out[0] if isinstance(out, tuple) else out
            raise StopIteration  # the layers above are not needed

        handle = self.layers[self.start - 1].register_forward_hook(hook)
        try:
            self.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        except StopIteration:
            pass
        finally:
            handle.remove()
        return captured["h"]

    def embed(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run layers start..stop-1 on right-padded cached states and pool: -> (B, D) unit vectors."""
        lengths = torch.tensor([s.shape[0] for s in states])
        hidden = torch.nn.utils.rnn.pad_sequence([s.float() for s in states], batch_first=True)  # (B, T, H)
        mask = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
        positions = torch.arange(hidden.shape[1])[None, :].expand(hidden.shape[0], -1)
        rotary = self.decoder.rotary_emb(hidden, positions)
        for layer in self.layers[self.start : self.stop]:
            # causal attention with right padding: real tokens never see the pads, so no mask is needed
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return torch.nn.functional.normalize(self.pool(hidden.float(), mask), dim=-1)


def validate(r: Retriever, val: Sequence[Description], gallery: Gallery) -> dict:
    """R@1/5/10 and L@100 of held-out descriptions against the whole gallery (the app's real task)."""
    ids = gallery.tile_ids
    t = r.encode_tiles([gallery.images[i] for i in ids], batch_size=32, progress=False)  # (G, D)
    q = r.encode_queries([d.text for d in val], batch_size=64, progress=False)  # (Q, D)
    order = (q @ t.T).argsort(dim=1, descending=True, stable=True).numpy()  # (Q, G)
    position = {tile_id: i for i, tile_id in enumerate(ids)}
    relevant = np.zeros(order.shape, dtype=bool)  # (Q, G): each description's own tile
    relevant[np.arange(len(val)), [position[d.tile_id] for d in val]] = True
    first = first_relevant(order, relevant)  # (Q,)
    top_lat, top_lon = gallery.meta["lat"][order[:, 0]], gallery.meta["lon"][order[:, 0]]
    dist_m = 1000.0 * haversine_km([d.lat for d in val], [d.lon for d in val], top_lat, top_lon)
    metrics = {**{f"r{k}": recall_at_k(first, k) for k in (1, 5, 10)}, "l100": float((dist_m <= 100).mean())}
    if gallery.human is not None:
        metrics.update(validate_human(r, gallery.human, t, gallery))
    return metrics


def validate_human(r: Retriever, human: HumanDev, tiles: torch.Tensor, gallery: Gallery) -> dict[str, float]:
    """hit@1/5 (a top-k footprint holds the true point) and L@150 on the human dev descriptions."""
    q = r.encode_queries(human.data.queries, batch_size=64, progress=False)  # (Q, D)
    order = (q @ tiles.T).argsort(dim=1, descending=True, stable=True).numpy()  # (Q, G)
    first = first_relevant(order, human.relevant)  # (Q,)
    top = order[:, 0]
    lat, lon = human.data.lat, human.data.lon
    dist_m = 1000.0 * haversine_km(lat, lon, gallery.meta["lat"][top], gallery.meta["lon"][top])
    return {
        "human_hit1": recall_at_k(first, 1),
        "human_hit5": recall_at_k(first, 5),
        "human_l150": float((dist_m <= 150).mean()),
    }


def _schedule(optimizer: torch.optim.Optimizer, base_lrs: list[float], step: int, progress: float) -> None:
    """Warmup over 30 steps times a cosine decay over the stage's time budget (progress = elapsed / budget).

    Not retriever.train.lr_lambda: that one is step-based and decays only after the warmup, while a stage here
    ends on a clock, and its warmup and decay overlap.
    """
    warm = min(1.0, (step + 1) / 30)
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Stage:
    """A time-boxed optimisation loop with a progress bar and a JSONL log."""

    def __init__(self, name: str, minutes: float, max_steps: int, log: IO[str]) -> None:
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
        elapsed = time.perf_counter() - self.start
        self.log.write(
            json.dumps({"stage": self.name, "step": self.step, **values, "elapsed_s": elapsed}) + "\n"
        )
        self.log.flush()


def _trainable(r: Retriever, marker: str) -> list[torch.nn.Parameter]:
    return [p for n, p in r.model.named_parameters() if p.requires_grad and marker in n]


def stage_query_side(
    r: Retriever,
    query_path: CachedQueryPath,
    states: list[torch.Tensor],
    gallery: Gallery,
    lora_params: list[torch.nn.Parameter],
    args: argparse.Namespace,
    log: IO[str],
) -> tuple[torch.Tensor, float]:
    """Stage 1: the query side (LoRA) against one free vector per tile.

    The vectors start from each tile's OSM context, or, when warm-starting from a trained adapter, from the
    tiles' pixel embeddings, so that stage 2 only has to follow the change. No pixels are run in a step, so a
    step costs only the adapted layers. Returns the learnt tile vectors, (G, D) unit rows, and the held-out R@1
    of the descriptions against them.
    """
    target = torch.tensor([gallery.tile_ids.index(d.tile_id) for d in gallery.train])  # (N,) tile of each
    temperature = LearnableTemperature(args.temperature, learnable=True)
    with torch.no_grad():
        if args.init_from:
            start_vectors = r.encode_tiles([gallery.images[i] for i in gallery.tile_ids], batch_size=32)
        else:
            start_vectors = query_path.embed(query_path.cache([c[:400] for c in gallery.contexts]))
        tile_vectors = torch.nn.Parameter(
            start_vectors.clone().float()
        )  # (G, D); clone: out of inference mode
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
        picks = random.sample(range(len(states)), min(args.query_batch, len(states)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16_cpu()):
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
        q_val = query_path.embed(query_path.cache([d.text for d in gallery.val]))  # (Q, D)
    truth = torch.tensor([gallery.tile_ids.index(d.tile_id) for d in gallery.val])  # (Q,)
    free_r1 = float(((q_val @ teacher.T).argmax(1) == truth).float().mean())
    print(
        f"stage 1 done after {stage.step} steps: held-out R@1 against the free tile vectors = {free_r1:.3f}"
    )
    return teacher, free_r1


def _keep_if_better(
    r: Retriever, out: Path, metrics: dict[str, float], step: int, best: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """Save the adapter when the selection metric improves; half precision, since it is committed."""
    key = SELECT_KEY if SELECT_KEY in metrics else "r1"
    if metrics[key] <= best.get(key, -1.0):
        return best
    best = {**metrics, "step": step}
    save_adapter(r, out, weights_dtype=torch.float16, extra={"val": best, **extra})
    return best


SELECT_KEY = "human_l150"  # model selection on the human dev set when given, else generated R@1


def stage_vision(
    r: Retriever,
    gallery: Gallery,
    teacher: torch.Tensor,
    vision_params: list[torch.nn.Parameter],
    args: argparse.Namespace,
    log: IO[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Stage 2: pixels -> the tile vectors `teacher` (G, D), with the LoRA frozen so the query side stays put.

    Validates every `--eval-every` steps and at the end, saving the adapter (with `extra` in its training info)
    whenever R@1 improves. Returns {"best": ..., "final": ...}.
    """
    optimizer = torch.optim.AdamW([{"params": vision_params, "lr": args.lr_vision, "weight_decay": 0.01}])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stage = Stage("stage 2: vision tower", args.vision_minutes, args.max_steps, log)
    best: dict[str, Any] = {"r1": -1.0}
    ids = gallery.tile_ids
    while stage.running():
        _schedule(optimizer, base_lrs, stage.step, stage.progress)
        chosen = random.sample(range(len(ids)), min(args.tile_batch, len(ids)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16_cpu()):
            t = r.embed(r.process_tiles([gallery.images[ids[i]] for i in chosen]))  # (B, D)
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
            metrics = validate(r, gallery.val, gallery)
            print(f"stage 2 step {stage.step}: {metrics}")
            log.write(json.dumps({"stage": "stage 2 eval", "step": stage.step, "val": metrics}) + "\n")
            best = _keep_if_better(r, args.out, metrics, stage.step, best, extra)
    final = validate(r, gallery.val, gallery)
    best = _keep_if_better(r, args.out, final, stage.step, best, extra)
    return {"best": best, "final": final}


def warm_start(r: Retriever, adapter: Path) -> None:
    """Load a trained adapter's weights (LoRA and the saved vision tower and connector) into the fresh adapter.

    The adapter must have the same rank and adapted layers; any missing or unexpected tensor is an error.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = require(
        Path(adapter) / "adapter_model.safetensors", "--init-from needs a trained adapter folder"
    )
    result = set_peft_model_state_dict(r.model, {k: v.float() for k, v in load_file(weights).items()})
    if result.unexpected_keys:
        raise ValueError(
            f"{adapter} does not fit this adapter (rank / layers differ): {result.unexpected_keys[:3]} ..."
        )
    print(f"warm start from {adapter}")


def _check_cached_path(r: Retriever, query_path: CachedQueryPath, texts: Sequence[str]) -> None:
    """The fast path must agree with the ordinary encoder, or training optimises the wrong thing."""
    with torch.no_grad():
        gap = (query_path.embed(query_path.cache(texts)) - r.encode_queries(texts)).abs().max().item()
    print(f"cached-path check: max |diff| = {gap:.2e} over {len(texts)} descriptions")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Both stages from parsed flags; returns the summary it prints."""
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gallery = load_gallery(args.gallery, args.val_limit, args.seed, args.select_on)

    r = load_retriever(DEMO_MODEL_ID, device="cpu")
    stop = r.config.pool_layer
    if not 0 < args.lora_layers < stop:
        raise ValueError(f"--lora-layers must lie in 1..{stop - 1} (the model pools after layer {stop})")
    start = stop - args.lora_layers
    add_adapter(
        r,
        "lora",
        rank=args.rank,
        alpha=2 * args.rank,
        dropout=0.0,
        targets=lora_targets(r.family.language_model_attr, start, stop),
        modules_to_save=TRAINED_MODULES,
    )
    if args.init_from:
        warm_start(r, args.init_from)
    query_path = CachedQueryPath(r, start)
    states = query_path.cache([d.text for d in gallery.train])
    _check_cached_path(r, query_path, [d.text for d in gallery.train[:4]])
    log_path = args.log or args.out.parent / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        lora_params, vision_params = _trainable(r, "lora_"), _trainable(r, "modules_to_save")
        teacher, free_r1 = stage_query_side(r, query_path, states, gallery, lora_params, args, log)
        for param in lora_params:
            param.requires_grad_(False)
        extra = {
            "trained_from": DEMO_MODEL_ID,
            "free_r1": free_r1,
            "warm_start": bool(args.init_from),  # from the previously committed adapter
            "recipe": {
                k: v for k, v in vars(args).items() if isinstance(v, int | float) and not isinstance(v, bool)
            },
        }
        result = stage_vision(r, gallery, teacher, vision_params, args, log, extra)
    summary = {"stage1_free_vector_r1": free_r1, **result}
    print(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo.train_demo", description=__doc__)
    p.add_argument("--gallery", type=Path, default=GALLERY, help="built gallery folder (default %(default)s)")
    p.add_argument("--out", type=Path, default=ADAPTER, help="adapter folder to write (default %(default)s)")
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
    p.add_argument(
        "--select-on",
        type=Path,
        default=ASSETS / "eval" / "human_dev.jsonl",
        help="human dev descriptions to select the checkpoint on (L@150); '' selects on generated R@1",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm-start from this trained adapter folder (same rank/layers)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `argv` and train; returns the summary (for tests and notebooks)."""
    return train(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m demo.train_demo`: 0 when trained; a user mistake prints `error: ...` and returns 2."""

    def job(args: Sequence[str] | None) -> int:
        run(args)
        return 0

    return run_cli(job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
