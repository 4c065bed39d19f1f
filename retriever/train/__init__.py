"""python -m retriever.train: contrastive LoRA / DoRA / QLoRA fine-tuning with GradCache, validation and resume."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever.models.adapters import add_adapter, disable_avx512_repack, save_adapter, trainable_parameters
from retriever._io import write_json_atomic
from retriever.models.encoder import Retriever, load_retriever
from retriever.errors import DataFormatError
from retriever.train.losses import LearnableTemperature, dense_codes, grad_cache_step, group_mask, info_nce
from retriever.train.pairs import Pair

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as run_config.json so `--config` reproduces it."""

    model: str = ""
    data: str = ""  # "kind:path", see TRAIN_SOURCES
    out: str = "runs/run"
    val_data: str | None = None  # explicit validation pairs; otherwise carved from train by group
    val_fraction: float = 0.1
    quantization: str = "none"
    adapter: str = "dora"
    rank: int = 16
    alpha: int = 128
    dropout: float = 0.1
    targets: list[str] | None = None  # default: the family's LoRA targets
    train_modules: list[str] | None = (
        None  # modules trained in full (e.g. a vision tower trained from scratch)
    )
    pooling: str | None = None
    pool_layer: int | None = None
    query_prompt: str | None = None
    tile_prompt: str | None = None
    image_side: int | None = None
    max_text_tokens: int | None = None
    loss: str = "t2i"
    temperature: float = 0.02
    learnable_temperature: bool = False
    hard_negatives: int = 0  # extra tiles per query, drawn from the geographically nearest other places
    hard_pool: int = 16  # ... among this many nearest
    batch_size: int = 64
    chunk_size: int = 16  # GradCache chunk; the batch may be far larger than what fits at once
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    epochs: float = 1.0
    max_steps: int | None = None
    clip_grad: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = True  # autocast on GPU only
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    select_metric: str = "r1"
    device: str | None = None
    threads: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown training options: {', '.join(sorted(unknown))}")
        return cls(**data)


# -------------------------------------------------------------------------------------------------------------
# Data


def _toy_source(path: str) -> list[Pair]:
    from retriever.train.toy import make_toy_pairs

    return make_toy_pairs(path)


def _jsonl_source(path: str) -> list[Pair]:
    """Plain pairs: one {"text", "image", "group"?, "lat"?, "lon"?} per line; image paths relative to the file."""
    file = Path(path)
    if not file.is_file():
        raise DataFormatError(f"JSONL pairs file not found: {file}")
    pairs = []
    for line_no, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            image = row["image"] if os.path.isabs(row["image"]) else str(file.parent / row["image"])
            pairs.append(
                Pair(
                    text=row["text"],
                    image=image,
                    group=str(row.get("group", row.get("tile_id", image))),
                    lat=float(row.get("lat", "nan")),
                    lon=float(row.get("lon", "nan")),
                )
            )
        except KeyError as err:
            raise DataFormatError(
                f"{file}:{line_no}: missing key {err}; each line needs 'text' and 'image'"
            ) from None
    return pairs


TRAIN_SOURCES: dict[str, Callable[[str], list[Pair]]] = {
    "toy": _toy_source,
    "jsonl": _jsonl_source,
}


def register_source(name: str, reader: Callable[[str], list[Pair]]) -> None:
    TRAIN_SOURCES[name] = reader


def load_pairs(spec: str) -> list[Pair]:
    """Read training pairs from "kind:path" (kinds: TRAIN_SOURCES)."""
    _register_dataset_sources()
    kind, sep, path = spec.partition(":")
    if not sep or kind not in TRAIN_SOURCES:
        raise DataFormatError(
            f"--data must be KIND:PATH with KIND one of {', '.join(sorted(TRAIN_SOURCES))}; got {spec!r}"
        )
    pairs = TRAIN_SOURCES[kind](path)
    if not pairs:
        raise DataFormatError(f"No training pairs in {spec}")
    return pairs


def pairset_to_pairs(pair_set: Any) -> list[Pair]:
    """Flatten a retriever.evaluate.data.PairSet: relevance by image label, splits by its leakage group."""
    latlon = pair_set.image_latlon
    pairs = []
    for text, image in zip(pair_set.texts, pair_set.text_image.tolist()):
        lat, lon = (
            (float(latlon[image, 0]), float(latlon[image, 1])) if latlon is not None else (math.nan, math.nan)
        )
        pairs.append(
            Pair(
                text=text,
                image=str(pair_set.images[image]),
                group=f"label-{pair_set.image_label[image]}",
                lat=lat,
                lon=lon,
                split_group=pair_set.group_names[pair_set.image_group[image]],
            )
        )
    return pairs


def _benchmark_source(name: str) -> Callable[[str], list[Pair]]:
    """A reader for "PATH[:key=value,...]" of a retriever.evaluate.data dataset (split defaults to train)."""

    def read(spec: str) -> list[Pair]:
        from retriever.evaluate.data import read_dataset

        path, _, options_text = spec.partition(":")
        options = dict(item.split("=", 1) for item in options_text.split(",") if item)
        options.setdefault("split", "train")
        if options["split"] == "test":
            raise DataFormatError("Training never reads the test split; validation is carved from train.")
        return pairset_to_pairs(read_dataset(name, path, **options))

    return read


def _register_dataset_sources() -> None:
    """The benchmark readers of retriever.evaluate.data, e.g. --data geotext1652:/data/GeoText1652."""
    for name in ("geotext1652", "cvgtext"):
        TRAIN_SOURCES.setdefault(name, _benchmark_source(name))


def split_by_group(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Carve validation from train by leakage group (building, location cell), so no place is seen in both."""
    groups = sorted({p.leakage_key for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_val = max(1, round(len(groups) * val_fraction)) if val_fraction > 0 else 0
    val_groups = set(groups[:n_val])
    return (
        [p for p in pairs if p.leakage_key not in val_groups],
        [p for p in pairs if p.leakage_key in val_groups],
    )


def nearest_other_places(pairs: Sequence[Pair], pool: int) -> np.ndarray:
    """(N, pool) indices of the nearest pairs of another group, by great-circle distance."""
    lat = torch.tensor([p.lat for p in pairs], dtype=torch.float64).deg2rad()
    lon = torch.tensor([p.lon for p in pairs], dtype=torch.float64).deg2rad()
    if torch.isnan(lat).any() or torch.isnan(lon).any():
        raise DataFormatError("Hard negatives need lat/lon on every pair")
    xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=1)  # (N, 3)
    codes = torch.tensor(dense_codes([p.group for p in pairs]))
    out = []
    for start in range(0, len(pairs), 4096):
        chord = torch.cdist(xyz[start : start + 4096], xyz)  # (b, N), monotone in great-circle distance
        chord[codes[start : start + 4096, None] == codes[None, :]] = float("inf")
        out.append(chord.topk(min(pool, len(pairs) - 1), largest=False).indices)
    return torch.cat(out).numpy()


# -------------------------------------------------------------------------------------------------------------
# Validation


def validate(retriever: Retriever, pairs: Sequence[Pair], batch_size: int = 32) -> dict[str, float]:
    """Text->tile retrieval over the validation gallery (one tile per group): R@1/5/10, and L@100 when located."""
    tiles: dict[str, Pair] = {}
    for p in pairs:
        tiles.setdefault(p.image, p)
    gallery = list(tiles.values())
    q = retriever.encode_queries([p.text for p in pairs], batch_size=batch_size)  # (Q, D)
    t = retriever.encode_tiles([p.image for p in gallery], batch_size=batch_size)  # (G, D)
    order = (q @ t.T).argsort(dim=1, descending=True, stable=True)  # (Q, G)
    gallery_groups = np.array([g.group for g in gallery])
    hit = gallery_groups[order.numpy()] == np.array([p.group for p in pairs])[:, None]  # (Q, G)
    first = np.where(hit.any(1), hit.argmax(1), hit.shape[1])
    metrics = {f"r{k}": float((first < k).mean()) for k in (1, 5, 10)}
    lat = np.array([g.lat for g in gallery])
    if not np.isnan(lat).any():
        from retriever.evaluate.metrics import haversine_km

        top = order[:, 0].numpy()
        dist_km = haversine_km(
            np.array([p.lat for p in pairs]),
            np.array([p.lon for p in pairs]),
            lat[top],
            np.array([g.lon for g in gallery])[top],
        )
        metrics["l100"] = float((np.asarray(dist_km) * 1000 <= 100).mean())
    return metrics


# -------------------------------------------------------------------------------------------------------------
# The trainer


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay to zero."""
    decays: dict[str, Callable[[float], float]] = {
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "linear": lambda p: 1 - p,
        "constant": lambda p: 1.0,
    }
    decay = decays[schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(min(1.0, (step - warmup) / max(1, total - warmup)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    step: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """One run: builds the model, steps through batches, validates, checkpoints, resumes."""

    def __init__(
        self,
        config: TrainConfig,
        retriever: Retriever | None = None,
        train_pairs: Sequence[Pair] | None = None,
        val_pairs: Sequence[Pair] | None = None,
    ) -> None:
        self.config = config
        self.out = Path(config.out)
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        overrides = {
            k: getattr(config, k)
            for k in ("pooling", "pool_layer", "query_prompt", "tile_prompt", "image_side", "max_text_tokens")
            if getattr(config, k) is not None
        }
        self.retriever = retriever or load_retriever(
            config.model, quantization=config.quantization, device=config.device, **overrides
        )
        add_adapter(
            self.retriever,
            config.adapter,
            config.rank,
            config.alpha,
            config.dropout,
            targets=config.targets,
            modules_to_save=config.train_modules,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        if train_pairs is None:
            pairs = load_pairs(config.data)
            if config.val_data:
                train_pairs, val_pairs = pairs, load_pairs(config.val_data)
            else:
                train_pairs, val_pairs = split_by_group(pairs, config.val_fraction, config.seed)
        self.train_pairs, self.val_pairs = list(train_pairs), list(val_pairs or [])
        if len(self.train_pairs) < 2:
            raise DataFormatError("Need at least 2 training pairs for in-batch negatives")
        self.batch_size = min(config.batch_size, len(self.train_pairs))
        self.steps_per_epoch = len(self.train_pairs) // self.batch_size
        self.total_steps = config.max_steps or max(1, int(config.epochs * self.steps_per_epoch))
        self.neighbours = (
            nearest_other_places(self.train_pairs, config.hard_pool) if config.hard_negatives > 0 else None
        )
        self.temperature = LearnableTemperature(config.temperature, config.learnable_temperature)
        self.params = list(trainable_parameters(self.retriever.model).values())
        extra = [self.temperature.log_value] if config.learnable_temperature else []
        self.optimizer = torch.optim.AdamW(
            self.params + extra, lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, config.warmup_steps, self.total_steps)
        )
        self.state = TrainState()

    # -- batches ----------------------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """The pairs of a step: a fresh seeded permutation per epoch, so resuming needs only the step."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(self.config.seed + epoch).permutation(len(self.train_pairs))
        return order[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def hard_negative_indices(self, step: int, batch: Sequence[int]) -> list[int]:
        if self.neighbours is None:
            return []
        rng = np.random.default_rng((self.config.seed, step))
        taken = {self.train_pairs[i].group for i in batch}
        chosen = []
        for i in batch:
            for j in rng.permutation(self.neighbours[i])[: self.config.hard_negatives]:
                if (
                    self.train_pairs[j].group not in taken
                ):  # a neighbour that is some query's positive is not negative
                    chosen.append(int(j))
        return chosen

    def chunks(self, items: Sequence[Any], prepare: Callable[[Sequence[Any]], Any]) -> list[Any]:
        size = self.config.chunk_size
        return [prepare(items[s : s + size]) for s in range(0, len(items), size)]

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step over one (possibly huge) batch."""
        r = self.retriever
        batch = self.batch_indices(self.state.step)
        negatives = self.hard_negative_indices(self.state.step, batch)
        pairs = [self.train_pairs[i] for i in batch]
        tile_pairs = pairs + [self.train_pairs[j] for j in negatives]
        false_negatives = group_mask([p.group for p in pairs], [p.group for p in tile_pairs])

        def loss_fn(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return info_nce(q, t, self.temperature(), self.config.loss, false_negatives)

        r.model.train()
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=r.device.type == "cuda" and self.config.bf16
        )
        with autocast:
            loss = grad_cache_step(
                r.embed,
                self.chunks([p.text for p in pairs], r.tokenize_queries),
                self.chunks([p.image for p in tile_pairs], r.process_tiles),
                loss_fn,
            )
        if self.config.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return loss

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: Path) -> None:
        """Adapter + optimizer + scheduler + RNG + step, written aside and renamed into place."""
        self.out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.out, prefix=".ckpt-"))
        save_adapter(self.retriever, staging / "adapter")
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "temperature": self.temperature.state_dict(),
                "state": asdict(self.state),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            },
            staging / "trainer_state.pt",
        )
        write_json_atomic(
            staging / "DONE.json", {"step": self.state.step}
        )  # written last: proves completeness
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)

    def load_checkpoint(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not (folder / "DONE.json").is_file():
            raise DataFormatError(f"No complete checkpoint in {folder} (DONE.json missing); cannot resume")
        set_peft_model_state_dict(
            self.retriever.model, load_file(folder / "adapter" / "adapter_model.safetensors")
        )
        saved = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.temperature.load_state_dict(saved["temperature"])
        self.state = TrainState(**saved["state"])
        torch.set_rng_state(saved["rng"]["torch"])
        np.random.set_state(saved["rng"]["numpy"])
        random.setstate(saved["rng"]["python"])
        if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])

    # -- the loop ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        return validate(self.retriever, self.val_pairs, batch_size=self.config.chunk_size)

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "run_config.json", asdict(self.config))
        if resume and (self.out / "checkpoint").exists():
            self.load_checkpoint(self.out / "checkpoint")
        log_file = (self.out / "log.jsonl").open("a")
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="Training",
            unit="step",
            disable=not progress,
        )
        start = time.perf_counter()
        samples = 0
        while self.state.step < self.total_steps:
            t0 = time.perf_counter()
            loss = self.step()
            samples += self.batch_size
            record = {
                "step": self.state.step,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "temperature": float(self.temperature()),
                "samples_per_s": self.batch_size / (time.perf_counter() - t0),
            }
            last = self.state.step == self.total_steps
            if self.val_pairs and (self.state.step % self.config.eval_every == 0 or last):
                metrics = self.evaluate()
                record["val"] = metrics
                score = metrics[self.config.select_metric]
                if score > self.state.best_metric:  # select on validation, never on test
                    self.state.best_metric, self.state.best_step = score, self.state.step
                    save_adapter(
                        self.retriever, self.out / "best", extra={"step": self.state.step, "val": metrics}
                    )
            self.state.history.append({"step": self.state.step, "loss": loss})
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if self.state.step % self.config.save_every == 0 or last:
                self.save_checkpoint(self.out / "checkpoint")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.close()
        log_file.close()
        final = save_adapter(self.retriever, self.out / "final", extra={"step": self.state.step})
        if not (self.out / "best").exists():  # no validation: the final adapter is the one to use
            shutil.copytree(final, self.out / "best")
        summary = {
            "steps": self.state.step,
            "best_step": self.state.best_step,
            "best_val": self.state.best_metric,
            "final_loss": self.state.history[-1]["loss"] if self.state.history else None,
            "seconds": time.perf_counter() - start,
            "samples_per_s": samples / (time.perf_counter() - start),
            "adapter": str(self.out / "best"),
        }
        write_json_atomic(self.out / "summary.json", summary)
        return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retriever.train", description=__doc__)
    p.add_argument(
        "--config", help="JSON file of options (a saved run_config.json reproduces a run); flags win"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in ("targets", "train_modules"):
            p.add_argument(flag, nargs="+", default=None)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in ("max_steps", "pool_layer", "image_side", "max_text_tokens", "threads"):
                kind = int
            p.add_argument(flag, type=kind, default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    options.update({k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None})
    config = TrainConfig.from_dict(options)
    if not config.model or not config.data:
        raise SystemExit("--model and --data are required (directly or in --config)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = Trainer(config).fit(resume=args.resume)
    print(json.dumps(summary, indent=2))
    return summary


__all__ = ["TRAIN_SOURCES", "TrainConfig", "Trainer", "disable_avx512_repack", "main", "validate"]

if __name__ == "__main__":
    main()
