"""`ItemEncoder` batching and errors, and the encoder's save/load round trip (`embed.encoder`, `embed.load`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from embed.config import EncoderConfig, preset
from embed.encoder import ItemEncoder, native_bf16, resolve_precision
from embed.errors import InvalidItemError
from embed.items import Item
from embed.load import (
    CONFIG_FILE,
    ENCODER_FILES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    load_encoder,
    load_model,
    save_encoder,
)
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer


@pytest.fixture
def items(random_png: Callable[[int], bytes]) -> list[Item]:
    return [
        Item("a", title="Red leather handbag", description="with a gold zip", attributes={"brand": "acme"}),
        Item("b", images=(random_png(1),)),
        Item("c", title="blue cotton shirt", images=(random_png(2), random_png(3))),
        Item("d", title="green wool scarf for winter, very long description " * 4),
        Item("e", attributes={"material": "leather"}),
        Item("f", title="yellow rain jacket", images=(random_png(4),)),
        Item("g", images=(random_png(5), random_png(6), random_png(7))),
    ]


@pytest.fixture
def encoder(model: UnifiedEncoder, tokenizer: TextTokenizer) -> ItemEncoder:
    return ItemEncoder(model, tokenizer, batch_size=64)


def test_encode_returns_unit_float32_rows(encoder: ItemEncoder, items: list[Item]) -> None:
    out = encoder.encode(items)
    assert out.shape == (len(items), encoder.dim) == (7, 64)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert len({row.tobytes() for row in out}) == len(items)


def test_encode_matches_the_model_on_one_collated_batch(encoder: ItemEncoder, items: list[Item]) -> None:
    with torch.inference_mode():
        direct = encoder.model(encoder.prepare(items)).numpy()
    np.testing.assert_allclose(encoder.encode(items), direct, atol=1e-6)


def test_batch_size_does_not_change_vectors(model: UnifiedEncoder, tokenizer: TextTokenizer,
                                            items: list[Item]) -> None:
    big = ItemEncoder(model, tokenizer, batch_size=64).encode(items)
    seen: list[int] = []
    small = ItemEncoder(model, tokenizer, batch_size=2).encode(items, progress=seen.append)
    assert seen == [2, 2, 2, 1]
    np.testing.assert_allclose(small, big, atol=1e-5, rtol=0)
    one = ItemEncoder(model, tokenizer, batch_size=1).encode(items)
    np.testing.assert_allclose(one, big, atol=1e-5, rtol=0)


def test_encode_of_nothing(encoder: ItemEncoder) -> None:
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_item_without_text_or_images_is_refused_with_its_index(model: UnifiedEncoder, tokenizer: TextTokenizer,
                                                               items: list[Item]) -> None:
    bad = [*items[:4], Item("empty", title="  ", attributes={"colour": " "}), *items[4:]]
    for batch_size in (64, 3):
        with pytest.raises(InvalidItemError) as info:
            ItemEncoder(model, tokenizer, batch_size=batch_size).encode(bad)
        assert (info.value.reason, info.value.item_index) == ("item_empty", 4)
        assert str(info.value).startswith("item_empty: items[4] ")


@pytest.mark.parametrize("batch_size", [64, 2])
def test_bad_image_error_names_the_item_and_image(model: UnifiedEncoder, tokenizer: TextTokenizer,
                                                   items: list[Item], batch_size: int) -> None:
    bad = list(items)
    bad[3] = Item("d", title="scarf", images=(b"not an image at all",))
    with pytest.raises(InvalidItemError) as info:
        ItemEncoder(model, tokenizer, batch_size=batch_size).encode(bad)
    err = info.value
    assert (err.reason, err.item_index, err.field) == ("image_undecodable", 3, "images[0]")
    assert err.path() == "items[3].images[0]"
    assert str(err).startswith("image_undecodable: items[3].images[0] ")


def test_second_bad_image_is_named(encoder: ItemEncoder, random_png: Callable[[int], bytes]) -> None:
    with pytest.raises(InvalidItemError) as info:
        encoder.featurize([Item("x", title="t"), Item("y", images=(random_png(0), b""))])
    assert info.value.path() == "items[1].images[1]" and info.value.reason == "image_empty"


def test_encoder_checks_its_arguments(model: UnifiedEncoder, tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        ItemEncoder(model, tokenizer, batch_size=0)
    small = UnifiedEncoder(preset("tiny", vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size=300"):
        ItemEncoder(small, tokenizer)


def test_save_and_load_round_trip_gives_identical_vectors(encoder: ItemEncoder, items: list[Item],
                                                          tmp_path: Path) -> None:
    directory = save_encoder(tmp_path / "enc", encoder.model, encoder.tokenizer)
    assert sorted(p.name for p in directory.iterdir()) == sorted(ENCODER_FILES)
    assert EncoderConfig.from_json((directory / CONFIG_FILE).read_text()) == encoder.config
    loaded = load_encoder(directory, batch_size=3)
    assert loaded.config == encoder.config and loaded.batch_size == 3
    assert np.array_equal(loaded.encode(items), ItemEncoder(encoder.model, encoder.tokenizer, batch_size=3)
                          .encode(items))
    assert loaded.tokenizer.encode_batch(["red leather"], 10) == encoder.tokenizer.encode_batch(["red leather"], 10)


def test_load_finds_the_encoder_below_a_root(encoder: ItemEncoder, tmp_path: Path) -> None:
    save_encoder(tmp_path / "artifacts" / "model" / "encoder", encoder.model, encoder.tokenizer)
    model, _ = load_model(tmp_path / "artifacts")
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_load_refuses_missing_or_mismatched_files(encoder: ItemEncoder, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_model(tmp_path)
    directory = save_encoder(tmp_path / "enc", encoder.model, encoder.tokenizer)
    (directory / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        load_model(directory)
    encoder.tokenizer.save(directory / TOKENIZER_FILE)
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, "width": 32, "heads": 2}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(directory)
    (directory / CONFIG_FILE).write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        load_model(directory)


def test_item_text_and_hash(random_png: Callable[[int], bytes]) -> None:
    item = Item("a", title=" Bag ", description="leather", attributes={"z": "1", "a": "2", "empty": " "})
    assert item.text == "Bag . leather . a: 2 . z: 1"
    assert item.modalities == ["text"]
    assert Item("b", images=(random_png(0),)).modalities == ["image"]
    same = Item("other-id", title=" Bag ", description="leather", attributes={"a": "2", "z": "1", "empty": " "})
    assert item.content_hash() == same.content_hash()
    assert item.content_hash() != Item("a", title="Bag", description="leathe").content_hash()
    assert Item("s", title="lone \ud800").content_hash() != Item("s", title="lone ?").content_hash()
    back = Item.from_content("a", item.to_content())
    assert back.content_hash() == item.content_hash()


def test_bf16_vectors_stay_close_to_fp32(model: UnifiedEncoder, tokenizer: TextTokenizer, items: list[Item]) -> None:
    """bf16 autocast (matmuls in bfloat16, norms and the output in float32): same neighbours, unit rows."""
    fp32 = ItemEncoder(model, tokenizer).encode(items)
    bf16_encoder = ItemEncoder(model, tokenizer, precision="bf16")
    assert bf16_encoder.precision == "bf16"
    bf16 = bf16_encoder.encode(items)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert np.sum(fp32 * bf16, axis=1).min() > 0.99
    nearest_other = [(v @ v.T).argsort(axis=1)[:, -2] for v in (fp32, bf16)]  # [:, -1] is the item itself
    assert (nearest_other[0] == nearest_other[1]).mean() >= 0.8


def test_precision_choices(model: UnifiedEncoder, tokenizer: TextTokenizer) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    with pytest.raises(ValueError, match="precision 'fp16' must be one of"):
        ItemEncoder(model, tokenizer, precision="fp16")
