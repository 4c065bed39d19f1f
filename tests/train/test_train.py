"""Contrastive training on tiny models: it learns, GradCache is exact, resume is exact, QLoRA trains adapters only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retriever import load_retriever
from retriever.evaluate.metrics import haversine_km
from retriever.train import (
    TrainConfig,
    Trainer,
    lr_lambda,
    nearest_other_places,
    pairs_to_pairset,
    train_val_split,
    validate,
)
from retriever.train.__main__ import main, run
from retriever.train.losses import grad_cache_step, group_mask, info_nce, plain_step
from retriever.train.pairs import Pair
from retriever.train.toy import TRAIN_TEMPLATES, make_toy_pairs

REPO = Path(__file__).resolve().parents[2]


def toy_config(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        out=str(out),
        adapter="lora",
        rank=8,
        alpha=16,
        dropout=0.0,
        batch_size=24,
        chunk_size=8,
        lr=5e-3,
        warmup_steps=2,
        max_steps=30,
        eval_every=10,
        save_every=10,
        temperature=0.05,
    )
    return TrainConfig(**{**base, **kw})


def test_toy_retrieval_goes_from_chance_to_solved(tiny_model_dir, tmp_path: Path) -> None:
    train = make_toy_pairs(tmp_path / "toy")
    # the captions of the first template: a random 3-layer LM cannot be expected to generalise to new phrasing
    val = make_toy_pairs(tmp_path / "toy", templates=TRAIN_TEMPLATES[:1])
    config = toy_config(tiny_model_dir("qwen2_vl"), tmp_path / "run", max_steps=60, eval_every=20)
    trainer = Trainer(config, train_pairs=train, val_pairs=val)
    before = validate(trainer.retriever, val)["r1"]
    summary = trainer.fit(progress=False)
    after = validate(trainer.retriever, val)["r1"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert before < 0.3 and after >= 0.9, (before, after)
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5])
    assert summary["best_val"] >= 0.9
    best = load_retriever(tiny_model_dir("qwen2_vl"), adapter=tmp_path / "run" / "best")
    assert validate(best, val)["r1"] == pytest.approx(summary["best_val"])


@pytest.mark.parametrize("direction", ["t2i", "symmetric"])
def test_grad_cache_gradients_equal_the_plain_loss(tiny_model_dir, tmp_path: Path, direction: str) -> None:
    pairs = make_toy_pairs(tmp_path / "toy")[:12]
    grads = []
    for chunked in (False, True):
        trainer = Trainer(
            toy_config(
                tiny_model_dir("idefics3"),
                tmp_path / f"r{chunked}",
                chunk_size=5,
                learnable_temperature=True,
                loss=direction,
            ),
            train_pairs=pairs,
        )
        r = trainer.retriever
        with torch.no_grad():  # a non-trivial adapter, identical in both runs
            for name, p in r.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
        texts, images = [p.text for p in pairs], [p.image for p in pairs]
        negatives = group_mask([p.group for p in pairs], [p.group for p in pairs])

        def loss_fn(q, t, trainer=trainer):
            return info_nce(q, t, trainer.temperature(), direction, negatives)

        r.model.train()
        if chunked:
            grad_cache_step(
                r.embed,
                trainer.chunks(texts, r.tokenize_queries),
                trainer.chunks(images, r.process_tiles),
                loss_fn,
            )
        else:
            plain_step(r.embed, r.tokenize_queries(texts), r.process_tiles(images), loss_fn)
        named = {n: p.grad.clone() for n, p in r.model.named_parameters() if p.requires_grad}
        named["temperature"] = trainer.temperature.log_value.grad.clone()
        grads.append(named)
    plain, cached = grads
    assert plain.keys() == cached.keys() and len(plain) > 4
    assert any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_resume_continues_exactly(tiny_model_dir, tmp_path: Path) -> None:
    pairs = make_toy_pairs(tmp_path / "toy")
    model = tiny_model_dir("qwen2_vl")
    full = Trainer(
        toy_config(model, tmp_path / "full", max_steps=6, batch_size=8, dropout=0.1, save_every=3),
        train_pairs=pairs,
    )
    full.fit(progress=False)
    full_losses = [h["loss"] for h in full.state.history]

    config = toy_config(model, tmp_path / "cut", max_steps=6, batch_size=8, dropout=0.1, save_every=3)
    first = Trainer(config, train_pairs=pairs)
    for _ in range(3):
        first.step()
    first.save_checkpoint(tmp_path / "cut" / "checkpoint")
    del first
    resumed = Trainer(config, train_pairs=pairs)
    resumed.fit(resume=True, progress=False)
    resumed_losses = [h["loss"] for h in resumed.state.history]
    assert resumed.state.step == 6 and len(resumed_losses) == 3
    assert resumed_losses == pytest.approx(full_losses[3:], rel=1e-5, abs=1e-6)


def test_a_crash_mid_swap_keeps_a_complete_checkpoint(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    pairs = make_toy_pairs(tmp_path / "toy")
    model = tiny_model_dir("qwen2_vl")

    def config(out: str) -> TrainConfig:
        return toy_config(model, tmp_path / out, max_steps=6, batch_size=8, dropout=0.1, save_every=3)

    full = Trainer(config("full"), train_pairs=pairs)
    full.fit(progress=False)
    first = Trainer(config("cut"), train_pairs=pairs)
    for _ in range(3):
        first.step()
    checkpoint = tmp_path / "cut" / "checkpoint"
    first.save_checkpoint(checkpoint)
    first.step()
    rename = Path.rename

    def crash_on_swap_in(self: Path, target: Path) -> Path:
        if self.name.startswith(".ckpt-"):  # the second rename of the swap: staging -> checkpoint
            raise OSError("simulated crash between the two renames")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_swap_in)
    with pytest.raises(OSError, match="simulated crash"):
        first.save_checkpoint(checkpoint)
    monkeypatch.undo()
    aside = checkpoint.with_name(".checkpoint.old")  # the old checkpoint, renamed aside first, is complete
    assert not checkpoint.exists() and json.loads((aside / "DONE.json").read_text()) == {"step": 3}
    assert not list(checkpoint.parent.glob(".ckpt-*"))
    del first

    resumed = Trainer(config("cut"), train_pairs=pairs)
    resumed.fit(resume=True, progress=False)  # finds the aside copy and continues from step 3
    assert resumed.state.step == 6 and not aside.exists() and (checkpoint / "DONE.json").is_file()
    losses = [h["loss"] for h in resumed.state.history]
    assert losses == pytest.approx([h["loss"] for h in full.state.history][3:], rel=1e-5, abs=1e-6)


def test_qlora_step_updates_only_adapter_weights(tiny_model_dir, tmp_path: Path) -> None:
    pairs = make_toy_pairs(tmp_path / "toy")[:8]
    config = toy_config(
        tiny_model_dir("qwen2_vl"), tmp_path / "q", quantization="4bit", batch_size=8, max_steps=1
    )
    trainer = Trainer(config, train_pairs=pairs)
    r = trainer.retriever
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in r.model.modules())
    r.encode_queries(["a red circle"])  # an eval forward first: the CPU repacking pitfall would strike here
    before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    loss = trainer.step()
    assert torch.isfinite(torch.tensor(loss))
    changed = {n for n, p in r.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_saved_adapter_reloads_to_the_in_memory_embeddings(tiny_model_dir, tmp_path: Path) -> None:
    pairs = make_toy_pairs(tmp_path / "toy")
    trainer = Trainer(
        toy_config(tiny_model_dir("internvl"), tmp_path / "run", max_steps=3, adapter="dora"),
        train_pairs=pairs,
    )
    trainer.fit(progress=False)
    texts, images = [p.text for p in pairs[:4]], [p.image for p in pairs[:4]]
    reloaded = load_retriever(tiny_model_dir("internvl"), adapter=tmp_path / "run" / "final")
    torch.testing.assert_close(
        reloaded.encode_queries(texts), trainer.retriever.encode_queries(texts), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        reloaded.encode_tiles(images), trainer.retriever.encode_tiles(images), atol=1e-6, rtol=0
    )


def test_cli_writes_a_reproducible_run(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    summary = run(
        [
            "--model",
            str(tiny_model_dir("qwen2_vl")),
            "--data",
            f"toy:{tmp_path / 'toy'}",
            "--out",
            str(out),
            "--adapter",
            "lora",
            "--rank",
            "4",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--eval-every",
            "1",
            "--val-fraction",
            "0.25",
            "--no-bf16",
        ]
    )
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["rank"] == 4 and saved["max_steps"] == 2 and saved["bf16"] is False
    assert summary["steps"] == 2 and (out / "best" / "retrieval_config.json").is_file()
    again = run(["--config", str(out / "run_config.json"), "--out", str(tmp_path / "again")])
    assert again["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-5)


def test_validation_split_never_shares_a_group() -> None:
    pairs = [Pair(text=f"t{i}", image=f"i{i // 3}", group=f"g{i // 3}") for i in range(60)]  # no coordinates
    train, val = train_val_split(pairs_to_pairset(pairs), TrainConfig(val_fraction=0.2))
    assert {p.group for p in train}.isdisjoint({p.group for p in val})
    assert len(train) + len(val) == 60 and len({p.group for p in val}) == 4
    assert train_val_split(pairs_to_pairset(pairs), TrainConfig(val_fraction=0.0))[1] == []


def test_validation_split_keeps_a_buffer_around_validation_places() -> None:
    # 20 places 60 m apart on a meridian, two texts each: the default 150 m buffer drops train neighbours.
    pairs = [
        Pair(f"t{i}", f"i{i // 2}", f"g{i // 2}", lat=60.0 + (i // 2) * 0.00054, lon=25.0) for i in range(40)
    ]
    config = TrainConfig(val_fraction=0.2, seed=3)
    train, val = train_val_split(pairs_to_pairset(pairs), config)
    assert config.val_buffer_m == 150.0 and len({p.image for p in val}) == 4
    d_km = haversine_km(
        np.array([[p.lat] for p in train]), np.array([[p.lon] for p in train]),
        np.array([[p.lat for p in val]]), np.array([[p.lon for p in val]]),
    )  # fmt: skip
    assert d_km.min() * 1000 > 150.0 and len(train) + len(val) < 40
    assert {p.leakage_key for p in train}.isdisjoint({p.leakage_key for p in val})


def test_hard_negatives_are_the_nearest_other_places() -> None:
    pairs = [Pair(text="", image=f"{i}", group=f"g{i}", lat=60.0 + 0.001 * i, lon=25.0) for i in range(10)]
    pairs.append(Pair(text="", image="x", group="g3", lat=60.0031, lon=25.0))  # same place as #3
    neighbours = nearest_other_places(pairs, pool=2)
    assert sorted(neighbours[3].tolist()) == [2, 4]  # never #10, which shows the same place
    assert sorted(neighbours[0].tolist()) == [1, 2]


def test_trains_on_geotext_format_without_touching_test(tiny_model_dir, tmp_path: Path) -> None:
    from retriever.errors import DataFormatError
    from retriever.train import load_pairs, load_pairset
    from tests.data.geotext1652.data import make_geotext1652

    root = make_geotext1652(tmp_path / "geotext")
    train, val = train_val_split(load_pairset(f"geotext1652:{root}"), TrainConfig(val_fraction=0.3))
    assert {p.leakage_key for p in train}.isdisjoint({p.leakage_key for p in val}) and val
    assert len(load_pairs(f"geotext1652:{root}")) == len(train) + len(val)  # no coordinates: no buffer drops
    with pytest.raises(DataFormatError, match="test"):
        load_pairs(f"geotext1652:{root}:split=test")
    summary = run(
        [
            "--model",
            str(tiny_model_dir("qwen2_vl")),
            "--data",
            f"geotext1652:{root}",
            "--out",
            str(tmp_path / "run"),
            "--adapter",
            "lora",
            "--rank",
            "2",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--val-fraction",
            "0.3",
            "--eval-every",
            "1",
        ]
    )
    assert summary["steps"] == 2 and 0.0 <= summary["best_val"] <= 1.0


def test_lr_schedule_names_its_choices() -> None:
    factor = lr_lambda("linear", warmup=2, total=6)
    assert [factor(s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="schedule must be one of cosine, linear, constant"):
        lr_lambda("step", 1, 10)


# -- the command: exit 2 and `error: ...` for a bad flag or a user error, never a traceback ----------------------
def test_cli_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["--model", "m"]) == 2
    assert capsys.readouterr().err.startswith("error: --model and --data are required")
    assert main(["--model", "m", "--data", f"nope:{tmp_path}"]) == 2  # the data is read before the model
    assert capsys.readouterr().err.startswith("error: --data must be KIND:PATH with KIND one of cvgtext")
    (tmp_path / "run.json").write_text(json.dumps({"rank": 4, "colour": "red"}))
    assert main(["--config", str(tmp_path / "run.json")]) == 2
    assert capsys.readouterr().err.startswith("error: Unknown training options: colour")
    with pytest.raises(SystemExit) as bad_flag:
        main(["--rank", "four"])
    assert bad_flag.value.code == 2 and "invalid int value: 'four'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "toy:unused"], "error: --model and --data are required"),  # a user error
        (["--model", "m", "--bogus"], "unrecognized arguments: --bogus"),  # a bad flag
    ],
)
def test_command_exits_2_without_a_traceback(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "retriever.train", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
