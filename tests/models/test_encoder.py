"""The retriever core on tiny random models of every family: shapes, norms, padding, adapters, 4-bit, errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from retriever import load_retriever
from retriever.errors import (
    AdapterMismatchError,
    ImageDecodeError,
    MissingDependencyError,
    RetrieverError,
    UnknownFamilyError,
)
from retriever.models.adapters import add_adapter, save_adapter
from retriever.models.backbones import FAMILIES
from retriever.models.pooling import pool_last, pool_mean

FAMILY_NAMES = tuple(FAMILIES)

TEXTS = ["a red church", "a small blue park opposite a cafe on the corner of the street", "tram stop"]


def tiles() -> list[Image.Image]:
    return [Image.new("RGB", (70, 50), (200, 20, 20)), Image.new("RGB", (64, 64), (20, 40, 210))]


def test_registry_covers_the_promised_families() -> None:
    assert set(FAMILY_NAMES) <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shapes_and_unit_norm(family: str, tiny_model_dir) -> None:
    r = load_retriever(tiny_model_dir(family))
    q = r.encode_queries(TEXTS)
    t = r.encode_tiles(tiles())
    assert q.shape == (3, r.dim) and t.shape == (2, r.dim)
    assert q.dtype == torch.float32 and q.device.type == "cpu"
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=1), torch.ones(2))
    assert not torch.allclose(t[0], t[1])  # different pixels, different embeddings


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_alone_equals_inside_a_padded_batch(family: str, pooling: str, tiny_model_dir) -> None:
    r = load_retriever(tiny_model_dir(family), pooling=pooling)
    batch = r.encode_queries(TEXTS, batch_size=3)
    for i, text in enumerate(TEXTS):
        alone = r.encode_queries([text])
        assert (alone[0] - batch[i]).abs().max() < 1e-5


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_pooler_finds_the_last_real_token(padding_side: str) -> None:
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)  # (B, T, H)
    if padding_side == "right":
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        expected = torch.tensor([[2.0], [9.0]])
    else:
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        expected = torch.tensor([[4.0], [9.0]])
    torch.testing.assert_close(pool_last(hidden, mask), expected)


def test_mean_pooler_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])  # the pad position holds a huge value
    torch.testing.assert_close(pool_mean(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0]]))


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_middle_layer_matches_hidden_states(family: str, tiny_model_dir) -> None:
    """pool_layer=k stops early, yet gives exactly the k-th hidden state of a full forward."""
    r = load_retriever(tiny_model_dir(family), pool_layer=2, pooling="mean")
    batch = r.tokenize_queries(TEXTS[:2])
    with torch.no_grad():
        full = r.trunk(**batch, output_hidden_states=True).hidden_states[2]  # (B, T, H)
    expected = torch.nn.functional.normalize(pool_mean(full, batch["attention_mask"]), dim=-1)
    torch.testing.assert_close(r.encode_queries(TEXTS[:2]), expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapter_save_and_reload_gives_identical_embeddings(
    family: str, tiny_model_dir, tmp_path: Path
) -> None:
    base = tiny_model_dir(family)
    r = load_retriever(base)
    add_adapter(r, "dora", rank=4, alpha=8)
    with torch.no_grad():  # a fresh LoRA is the identity; make it do something
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    q, t = r.encode_queries(TEXTS), r.encode_tiles(tiles())
    save_adapter(r, tmp_path / "adapter")
    reloaded = load_retriever(base, adapter=tmp_path / "adapter")
    torch.testing.assert_close(reloaded.encode_queries(TEXTS), q, atol=1e-6, rtol=0)
    torch.testing.assert_close(reloaded.encode_tiles(tiles()), t, atol=1e-6, rtol=0)
    plain = load_retriever(base)
    assert (plain.encode_queries(TEXTS) - q).abs().max() > 1e-3  # the adapter mattered
    assert reloaded.fingerprint()["adapter_hash"] == r.adapter_hash != plain.fingerprint()["adapter_hash"]


def test_adapter_restores_its_retrieval_config(tiny_model_dir, tmp_path: Path) -> None:
    base = tiny_model_dir("qwen2_vl")
    r = load_retriever(base, pooling="mean", query_prompt="Where? {text} Answer:")
    add_adapter(r, "lora", rank=2, alpha=4)
    save_adapter(r, tmp_path / "a")
    reloaded = load_retriever(base, adapter=tmp_path / "a")
    assert reloaded.config.pooling == "mean"
    assert reloaded.config.query_prompt == "Where? {text} Answer:"
    assert json.loads((tmp_path / "a" / "retrieval_config.json").read_text())["library_versions"]["torch"]


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_4bit_embeddings_stay_close_to_fp32(family: str, tiny_model_dir) -> None:
    path = tiny_model_dir(family)
    fp32, nf4 = load_retriever(path), load_retriever(path, quantization="4bit")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in nf4.model.modules())
    q_cos = (fp32.encode_queries(TEXTS) * nf4.encode_queries(TEXTS)).sum(1)
    t_cos = (fp32.encode_tiles(tiles()) * nf4.encode_tiles(tiles())).sum(1)
    # NF4 noise on random weights costs ~1%; a wrong pooling, prompt or layer would cost far more
    assert q_cos.min() > 0.97 and t_cos.min() > 0.97
    # the vision tower is kept out of 4-bit, as the family entry says
    vision = dict(nf4.model.named_modules())[FAMILIES[family].skip_4bit[0]]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in vision.modules())


def test_query_and_tile_prompts_are_applied(tiny_model_dir) -> None:
    r = load_retriever(
        tiny_model_dir("qwen2_vl"),
        query_prompt="Where am I? {text} In one word:",
        tile_prompt="{image} In one word:",
    )
    ids = r.tokenize_queries(["red church"])["input_ids"][0].tolist()
    decoded = r.tokenizer.decode(ids)
    assert decoded.startswith("Where am I?") and decoded.endswith("In one word:")
    tile_ids = r.process_tiles(tiles()[:1])["input_ids"][0].tolist()
    assert r.tokenizer.convert_tokens_to_ids("<|image_pad|>") in tile_ids
    assert r.tokenizer.decode(tile_ids).endswith("In one word:")
    raw = load_retriever(tiny_model_dir("qwen2_vl"))
    assert (raw.encode_queries(["red church"]) - r.encode_queries(["red church"])).abs().max() > 1e-3


def test_long_text_is_truncated_but_the_prompt_survives(tiny_model_dir) -> None:
    r = load_retriever(tiny_model_dir("idefics3"), max_text_tokens=8, query_prompt="{text} In one word:")
    ids = r.tokenize_queries(["red " * 500])["input_ids"][0].tolist()
    suffix = r.tokenizer.encode(" In one word:", add_special_tokens=False)
    assert len(ids) == 8 + len(suffix) and ids[-len(suffix) :] == suffix


def test_unknown_family_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnknownFamilyError, match="qwen2_vl"):
        load_retriever(tmp_path)


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(RetrieverError, match="not found"):
        load_retriever(tmp_path / "no" / "such" / "model")


def test_adapter_for_another_base_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    r = load_retriever(tiny_model_dir("qwen2_vl"))
    add_adapter(r, "lora", rank=2, alpha=4)
    save_adapter(r, tmp_path / "qwen-adapter")
    with pytest.raises(AdapterMismatchError, match=r"qwen2_vl.*idefics3|idefics3.*qwen2_vl"):
        load_retriever(tiny_model_dir("idefics3"), adapter=tmp_path / "qwen-adapter")


def test_missing_bitsandbytes_says_how_to_install(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(
        MissingDependencyError, match=re.escape("needs bitsandbytes: pip install 'bitsandbytes")
    ):
        load_retriever(tiny_model_dir("qwen2_vl"), quantization="4bit")


def test_undecodable_image_is_named(tiny_model_dir, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    r = load_retriever(tiny_model_dir("qwen2_vl"))
    with pytest.raises(ImageDecodeError, match=re.escape(str(bad))):
        r.encode_tiles([bad])
    from retriever.models.images import open_images

    good = tmp_path / "good.png"
    tiles()[0].save(good)
    images, failed = open_images([good, bad], skip_unreadable=True)
    assert len(images) == 1 and failed == [1]


def test_adapter_saved_in_half_precision_reloads_close(tiny_model_dir, tmp_path: Path) -> None:
    from safetensors import safe_open

    base = tiny_model_dir("idefics3")
    r = load_retriever(base)
    add_adapter(r, "lora", rank=4, alpha=8, modules_to_save=["connector"])
    with torch.no_grad():
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    q = r.encode_queries(TEXTS)
    save_adapter(r, tmp_path / "half", weights_dtype=torch.float16)
    with safe_open(str(tmp_path / "half" / "adapter_model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}  # noqa: SIM118
    reloaded = load_retriever(base, adapter=tmp_path / "half")
    assert {p.dtype for p in reloaded.model.parameters()} == {torch.float32}
    torch.testing.assert_close(reloaded.encode_queries(TEXTS), q, atol=2e-3, rtol=0)


def test_an_encode_waits_while_another_thread_has_the_adapter_off(tiny_model_dir) -> None:
    import threading

    r = load_retriever(tiny_model_dir("qwen2_vl"))
    add_adapter(r, "lora", rank=4, alpha=8)
    with torch.no_grad():
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    with_adapter = r.encode_queries(TEXTS)
    switched_off, release, got = threading.Event(), threading.Event(), {}

    def generate_with_adapter_off() -> None:
        with r.adapter_disabled():
            switched_off.set()
            release.wait(10)

    def search() -> None:
        got["q"] = r.encode_queries(TEXTS)

    holder = threading.Thread(target=generate_with_adapter_off)
    holder.start()
    assert switched_off.wait(10)
    searcher = threading.Thread(target=search)
    searcher.start()
    searcher.join(0.5)
    assert searcher.is_alive() and "q" not in got  # it waits instead of encoding with the adapter off
    release.set()
    holder.join(10)
    searcher.join(10)
    torch.testing.assert_close(got["q"], with_adapter, atol=1e-6, rtol=0)
