"""The contrastive trainer: batches, hard negatives, GradCache, validation, checkpoint and resume, on 1 or N ranks."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retriever._io import recover_dir, replace_dir, write_json_atomic
from retriever.errors import DataFormatError
from retriever.evaluate.data import PairSet, carve_validation
from retriever.evaluate.metrics import first_relevant, haversine_km, recall_at_k
from retriever.models.adapters import add_adapter, save_adapter, trainable_parameters
from retriever.models.encoder import Retriever, load_retriever
from retriever.train.distributed import World, init_world, rank_device
from retriever.train.losses import (
    Gather,
    LearnableTemperature,
    dense_codes,
    grad_cache_step,
    group_mask,
    info_nce,
    plain_step,
)
from retriever.train.pairs import Pair, pairset_to_pairs
from retriever.train.sources import load_pairs, load_pairset

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"  # OUT/checkpoint: the one complete checkpoint; `--resume` continues from it
STAGING_PREFIX = ".ckpt-"  # a checkpoint being written, beside OUT/checkpoint
# The linear warmup's decay after it, by TrainConfig.schedule: progress 0..1 -> factor.
DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "linear": lambda p: 1 - p,
    "constant": lambda p: 1.0,
}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as run_config.json so `--config` reproduces it."""

    model: str = ""
    data: str = ""  # "kind:path", see retriever.train.sources.TRAIN_SOURCES
    out: str = "runs/run"
    val_data: str | None = None  # explicit validation pairs; otherwise carved from train by group
    val_fraction: float = 0.1
    # Carved validation: also drop train images within this distance of a validation image (located
    # data only), so a neighbouring cell cannot leak the place. 150 m = the widest L@ radius of CVG-Text.
    val_buffer_m: float = 150.0
    quantization: str = "none"
    adapter: str = "dora"
    rank: int = 16
    alpha: int = 128
    dropout: float = 0.1
    targets: list[str] | None = None  # default: the family's LoRA targets
    train_modules: list[str] | None = None  # trained in full (e.g. a vision tower trained from scratch)
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
    batch_size: int = 64  # the global batch: across N processes each embeds a shard of it
    chunk_size: int = 16  # GradCache chunk; the batch may be far larger than what fits at once
    grad_cache: bool = True  # False: one plain forward and backward of the (per-rank) batch, no chunks
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # see DECAYS
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
            raise ValueError(
                f"Unknown training options: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


# -------------------------------------------------------------------------------------------------------------
# Data: one split for training and evaluation (retriever.evaluate.data.carve_validation)


def train_val_split(pairs: PairSet, config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Carve validation from train by whole groups (buildings, location cells), with the config's buffer."""
    if config.val_fraction <= 0:
        return pairset_to_pairs(pairs), []
    split = carve_validation(pairs, config.val_fraction, seed=config.seed, buffer_m=config.val_buffer_m)
    if split.dropped:
        log.info("validation buffer of %s m: %d train images dropped", config.val_buffer_m, split.dropped)
    return pairset_to_pairs(split.train), pairset_to_pairs(split.val)


def load_train_val(config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """The train and validation pairs a config names (--data, and --val-data or a carved split)."""
    pairs = load_pairset(config.data)
    if config.val_data:
        return pairset_to_pairs(pairs), load_pairs(config.val_data)
    return train_val_split(pairs, config)


def nearest_other_places(pairs: Sequence[Pair], pool: int) -> np.ndarray:
    """(N, pool) indices of the nearest pairs of another group, by great-circle distance."""
    lat = torch.tensor([p.lat for p in pairs], dtype=torch.float64).deg2rad()
    lon = torch.tensor([p.lon for p in pairs], dtype=torch.float64).deg2rad()
    if torch.isnan(lat).any() or torch.isnan(lon).any():
        raise DataFormatError(
            "Hard negatives need lat/lon on every pair; set --hard-negatives 0 for this data"
        )
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
    """Text->tile retrieval over the validation gallery (one tile per image): R@1/5/10, and L@100 when located."""
    tiles: dict[str, Pair] = {}
    for p in pairs:
        tiles.setdefault(p.image, p)
    gallery = list(tiles.values())
    q = retriever.encode_queries([p.text for p in pairs], batch_size=batch_size)  # (Q, D)
    t = retriever.encode_tiles([p.image for p in gallery], batch_size=batch_size)  # (G, D)
    order = (q @ t.T).argsort(dim=1, descending=True, stable=True).numpy()  # (Q, G)
    relevant = np.array([p.group for p in pairs])[:, None] == np.array([g.group for g in gallery])[None, :]
    first = first_relevant(order, relevant)  # (Q,)
    metrics = {f"r{k}": recall_at_k(first, k) for k in (1, 5, 10)}
    lat, lon = np.array([g.lat for g in gallery]), np.array([g.lon for g in gallery])
    if not np.isnan(lat).any():
        top = order[:, 0]
        dist_km = haversine_km(
            np.array([p.lat for p in pairs]), np.array([p.lon for p in pairs]), lat[top], lon[top]
        )
        metrics["l100"] = float((np.asarray(dist_km) * 1000 <= 100).mean())
    return metrics


# -------------------------------------------------------------------------------------------------------------
# The trainer


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Step -> learning-rate factor: linear warmup over `warmup` steps, then the schedule's decay to `total`."""
    if schedule not in DECAYS:
        raise ValueError(f"schedule must be one of {', '.join(DECAYS)}, not {schedule!r}")
    decay = DECAYS[schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(min(1.0, (step - warmup) / max(1, total - warmup)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_model(config: TrainConfig, device: str | None) -> Retriever:
    """The base retriever with the config's retrieval overrides, on this rank's device."""
    names = ("pooling", "pool_layer", "query_prompt", "tile_prompt", "image_side", "max_text_tokens")
    overrides = {k: getattr(config, k) for k in names if getattr(config, k) is not None}
    return load_retriever(config.model, quantization=config.quantization, device=device, **overrides)


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, python (and CUDA) generator states."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    step: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """One run: builds the model, steps through batches, validates, checkpoints, resumes.

    Under torchrun / accelerate launch (WORLD_SIZE > 1) it joins the process group, and every rank embeds a
    disjoint shard of each global batch; the loss is over the gathered global batch and the summed gradients
    equal the single-process step's. Rank 0 alone validates, logs and writes files; the others wait for it.
    """

    def __init__(
        self,
        config: TrainConfig,
        retriever: Retriever | None = None,
        train_pairs: Sequence[Pair] | None = None,
        val_pairs: Sequence[Pair] | None = None,
    ) -> None:
        self.config = config
        self.out = Path(config.out)
        self.world: World = init_world(config.device)  # World() in a plain process
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        # rank 0 draws / downloads first, the others read its cache; data first: a data error costs no model
        # load (and draws no random numbers)
        with self.world.main_first():
            if train_pairs is None:
                train_pairs, val_pairs = load_train_val(config)
            self.train_pairs, self.val_pairs = list(train_pairs), list(val_pairs or [])
            if len(self.train_pairs) < 2:
                raise DataFormatError("Need at least 2 training pairs for in-batch negatives")
            device = rank_device(config.device, self.world.local_rank)  # cuda:LOCAL_RANK under torchrun
            self.retriever = retriever or _load_model(config, device)
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
        self.batch_size = min(config.batch_size, len(self.train_pairs))
        if self.batch_size < self.world.size:
            raise ValueError(
                f"--batch-size {self.batch_size} is the global batch: it needs at least one pair for each of the "
                f"{self.world.size} processes"
            )
        self.steps_per_epoch = len(self.train_pairs) // self.batch_size
        self.total_steps = config.max_steps or max(1, int(config.epochs * self.steps_per_epoch))
        self.neighbours = (
            nearest_other_places(self.train_pairs, config.hard_pool) if config.hard_negatives > 0 else None
        )
        self.temperature = LearnableTemperature(config.temperature, config.learnable_temperature)
        self.params = list(trainable_parameters(self.retriever.model).values())
        if self.world.enabled:
            self.world.broadcast_params(self.params)  # identical replicas, whatever each rank initialised
            torch.manual_seed(config.seed + 1 + self.world.rank)  # ... but each rank its own dropout masks
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
                # a neighbour that is some query's positive is not a negative
                if self.train_pairs[j].group not in taken:
                    chosen.append(int(j))
        return chosen

    def chunks(self, items: Sequence[Any], prepare: Callable[[Sequence[Any]], Any]) -> list[Any]:
        size = self.config.chunk_size
        return [prepare(items[s : s + size]) for s in range(0, len(items), size)]

    def gatherer(self, n: int) -> Gather | None:
        """The all-gather of n global rows sharded over the ranks (None on one process)."""
        if not self.world.enabled:
            return None
        sizes, own = self.world.sizes(n), self.world.shard(n)

        def gather(local: torch.Tensor, keep_grad: bool) -> tuple[torch.Tensor, slice]:
            return self.world.gather_rows(local, sizes, keep_grad), own  # (n, D)

        return gather

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step over one (possibly huge) batch; across ranks, over this rank's shard of it."""
        r = self.retriever
        # Every rank draws the same global batch, negatives and mask from the step: nothing to communicate.
        batch = self.batch_indices(self.state.step)
        negatives = self.hard_negative_indices(self.state.step, batch)
        pairs = [self.train_pairs[i] for i in batch]
        tile_pairs = pairs + [self.train_pairs[j] for j in negatives]
        false_negatives = group_mask([p.group for p in pairs], [p.group for p in tile_pairs])  # (B, M)
        # This rank's contiguous rows: gathered in rank order they are the global rows in order.
        texts = [p.text for p in pairs[self.world.shard(len(pairs))]]
        images = [p.image for p in tile_pairs[self.world.shard(len(tile_pairs))]]
        gather_queries, gather_tiles = self.gatherer(len(pairs)), self.gatherer(len(tile_pairs))

        def loss_fn(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return info_nce(q, t, self.temperature(), self.config.loss, false_negatives)

        r.model.train()
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=r.device.type == "cuda" and self.config.bf16
        )
        with autocast:
            if self.config.grad_cache:
                loss = grad_cache_step(
                    r.embed,
                    self.chunks(texts, r.tokenize_queries),
                    self.chunks(images, r.process_tiles),
                    loss_fn,
                    gather_queries,
                    gather_tiles,
                )
            else:
                loss = plain_step(
                    r.embed,
                    r.tokenize_queries(texts),
                    r.process_tiles(images),
                    loss_fn,
                    gather_queries,
                    gather_tiles,
                )
        # Sum, not mean: each rank's gradient is the global loss through its own rows. The temperature's is
        # already global (every rank computed the whole loss), so it is left alone.
        self.world.sum_grads(self.params)
        if self.config.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return loss

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: Path) -> None:
        """Adapter + optimizer + scheduler + RNG (every rank's) + step, written aside and swapped in (_io.replace_dir).

        One complete checkpoint exists at every instant: a crash mid-swap leaves the previous one
        aside, where `resume` finds it (`recover_dir`). Across ranks, rank 0 writes it alone (the replicas are
        identical but for their RNG, which it gathers) while the others wait.
        """
        # [rank 0's, rank 1's, ...] on rank 0, None elsewhere
        rank_rng = self.world.gather_objects(rng_state())
        try:
            if self.world.is_main:
                self._write_checkpoint(folder, rank_rng)
        finally:
            self.world.barrier()

    def _write_checkpoint(self, folder: Path, rank_rng: list[dict[str, Any]]) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=STAGING_PREFIX))
        try:
            save_adapter(self.retriever, staging / "adapter")
            torch.save(self._trainer_state(rank_rng), staging / "trainer_state.pt")
            # written last: proves completeness
            write_json_atomic(staging / "DONE.json", {"step": self.state.step})
            replace_dir(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless the swap failed

    def _trainer_state(self, rank_rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        rank_rng = rank_rng or [rng_state()]
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "temperature": self.temperature.state_dict(),
            "state": asdict(self.state),
            "rng": rank_rng[0],
        }
        if len(rank_rng) > 1:
            state["rank_rng"] = rank_rng  # one per rank, in rank order
        return state

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint; across ranks rank 0 reads it and sends it to the others (no shared disk needed)."""
        payload: dict[str, Any] | None = None
        error: Exception | None = None
        if self.world.is_main:
            try:
                payload = self._read_checkpoint(folder)
            except Exception as exc:  # every rank raises it, rather than the others waiting forever
                error = exc
        payload, error = self.world.broadcast_object((payload, error))
        if error is not None:
            raise error
        self._apply_checkpoint(payload)

    def _read_checkpoint(self, folder: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        if not (folder / "DONE.json").is_file():
            raise DataFormatError(
                f"No complete checkpoint in {folder} (DONE.json missing); delete it to start over without --resume"
            )
        return {
            "adapter": load_file(folder / "adapter" / "adapter_model.safetensors"),
            "trainer": torch.load(folder / "trainer_state.pt", weights_only=False),
        }

    def _apply_checkpoint(self, payload: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.retriever.model, payload["adapter"])
        saved = payload["trainer"]
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.temperature.load_state_dict(saved["temperature"])
        self.state = TrainState(**saved["state"])
        rank_rng = saved.get("rank_rng", [saved["rng"]])
        if len(rank_rng) == self.world.size:
            set_rng_state(rank_rng[self.world.rank])
        else:  # the batches depend on the step only; just the dropout masks will not replay
            log.warning(
                "checkpoint written by %d process(es), resumed on %d: dropout masks are reseeded",
                len(rank_rng),
                self.world.size,
            )
            if self.world.rank < len(rank_rng):
                set_rng_state(rank_rng[self.world.rank])
            else:
                torch.manual_seed(self.config.seed + 1 + self.world.rank + self.state.step)

    def resume(self) -> bool:
        """Continue from OUT/checkpoint, or from the copy a crash mid-swap left aside; False when there is none."""
        found: Path | None = None
        if self.world.is_main:
            for stale in self.out.glob(f"{STAGING_PREFIX}*"):  # half-written checkpoints of a crashed run
                shutil.rmtree(stale, ignore_errors=True)
            found = recover_dir(self.out / CHECKPOINT)
        found = self.world.broadcast_object(found)
        if found is None:
            return False
        self.load_checkpoint(found)
        return True

    # -- the loop ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        return validate(self.retriever, self.val_pairs, batch_size=self.config.chunk_size)

    def _maybe_validate(self, record: dict[str, Any]) -> None:
        """Validate on schedule, and keep the adapter that scores best (select on validation, never on test).

        Across ranks rank 0 validates (the replicas are identical) while the others wait at a barrier.
        """
        last = self.state.step == self.total_steps
        if not self.val_pairs or (self.state.step % self.config.eval_every != 0 and not last):
            return
        if self.world.is_main:
            self._validate_and_select(record)
        self.world.barrier()

    def _validate_and_select(self, record: dict[str, Any]) -> None:
        metrics = self.evaluate()
        record["val"] = metrics
        score = metrics[self.config.select_metric]
        if score > self.state.best_metric:
            self.state.best_metric, self.state.best_step = score, self.state.step
            save_adapter(self.retriever, self.out / "best", extra={"step": self.state.step, "val": metrics})

    def _train_one(self, log_file: IO[str] | None) -> float:
        """One step, its validation when due, its log line, then its checkpoint when due; returns the loss."""
        t0 = time.perf_counter()
        loss = self.step()
        record = {
            "step": self.state.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "temperature": float(self.temperature().detach()),
            "samples_per_s": self.batch_size / (time.perf_counter() - t0),
        }
        self._maybe_validate(record)
        self.state.history.append({"step": self.state.step, "loss": loss})
        if log_file is not None:  # rank 0's
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if self.state.step % self.config.save_every == 0 or self.state.step == self.total_steps:
            self.save_checkpoint(self.out / CHECKPOINT)
        return loss

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        main = self.world.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "run_config.json", asdict(self.config))
        if resume:
            self.resume()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="Training",
            unit="step",
            disable=not progress or not main,  # one bar, rank 0's
        )
        start, samples = time.perf_counter(), 0
        with (self.out / "log.jsonl").open("a") if main else nullcontext() as log_file:
            while self.state.step < self.total_steps:
                loss = self._train_one(log_file)
                samples += self.batch_size
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
        bar.close()
        return self._finish(time.perf_counter() - start, samples)

    def _finish(self, seconds: float, samples: int) -> dict[str, Any]:
        """Save the final adapter (also as best when nothing was validated) and the run summary (rank 0)."""
        self.state = self.world.broadcast_object(self.state)  # rank 0's best_* on every rank
        if not self.world.is_main:
            self.world.barrier()
            return self._summary(seconds, samples)
        final = save_adapter(self.retriever, self.out / "final", extra={"step": self.state.step})
        if not (self.out / "best").exists():  # no validation: the final adapter is the one to use
            shutil.copytree(final, self.out / "best")
        summary = self._summary(seconds, samples)
        write_json_atomic(self.out / "summary.json", summary)
        self.world.barrier()
        return summary

    def _summary(self, seconds: float, samples: int) -> dict[str, Any]:
        return {
            "steps": self.state.step,
            "best_step": self.state.best_step,
            "best_val": self.state.best_metric,
            "final_loss": self.state.history[-1]["loss"] if self.state.history else None,
            "seconds": seconds,
            "samples_per_s": samples / seconds if seconds else 0.0,
            "adapter": str(self.out / "best"),
            "processes": self.world.size,
        }
