"""The frozen-backbone feature cache: extracted once, reused by a second run, redone when an item changes."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embed.build import build_pretrained
from embed.config import preset
from embed.encoder import ItemEncoder
from embed.items import Item
from training.fitting.pretrained import CachedItemFeatures, FeatureCache, encode_cached


@pytest.fixture(scope="module")
def pretrained(baselines_extra: None) -> tuple[object, object]:
    torch.manual_seed(0)
    model, tokenizer = build_pretrained(preset("pretrained", image_size=64, patch_size=64))
    return model.eval(), tokenizer


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + np.asarray(rgb, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


ITEMS = [Item("a", title="Zorvane leather bag", images=(_png((215, 35, 35)),)),
         Item("b", title="Brakka cotton shirt", description="A budget pick."),
         Item("c", images=(_png((35, 75, 215)), _png((30, 160, 60))))]


def test_features_are_extracted_once_then_read_back_and_redone_when_content_changes(
        pretrained: tuple, tmp_path: Path) -> None:
    model, tokenizer = pretrained
    first = FeatureCache(tmp_path, model, tokenizer, batch_size=2)
    extracted = first.features(ITEMS)
    assert (first.hits, first.misses) == (0, 3) and len(list(tmp_path.rglob("*.safetensors"))) == 3
    again = FeatureCache(tmp_path, model, tokenizer)
    read = again.features(ITEMS)
    assert (again.hits, again.misses) == (3, 0)
    for x, y in zip(extracted, read, strict=True):
        assert x is not None and y is not None
        assert torch.equal(x.text_states, y.text_states) and torch.equal(x.image_tokens, y.image_tokens)
    changed = [ITEMS[0], dataclasses.replace(ITEMS[1], title="Brakka linen shirt"), ITEMS[2]]
    third = FeatureCache(tmp_path, model, tokenizer)
    redone = third.features(changed)
    assert (third.hits, third.misses) == (2, 1)
    assert redone[1] is not None and not torch.equal(redone[1].text_states, read[1].text_states)  # type: ignore[union-attr]
    # a file cut short (a run killed in an older version, a full disk) is extracted again, not fatal
    damaged = third.path(ITEMS[0])
    cut = damaged.with_suffix(".cut")
    cut.write_bytes(damaged.read_bytes()[:100])
    cut.replace(damaged)  # a new file: earlier reads hold memory maps of the old one
    fourth = FeatureCache(tmp_path, model, tokenizer)
    healed = fourth.features(ITEMS[:1])
    assert (fourth.hits, fourth.misses) == (0, 1) and healed[0] is not None
    assert torch.equal(healed[0].image_tokens, extracted[0].image_tokens)  # type: ignore[union-attr]
    assert FeatureCache(tmp_path, model, tokenizer).features(ITEMS[:1])[0] is not None
    assert not list(tmp_path.rglob("*.partial"))


def test_cached_features_give_the_serving_path_vectors_and_refused_items_no_row(
        pretrained: tuple, tmp_path: Path) -> None:
    model, tokenizer = pretrained
    broken = Item("d", title="a damaged photo", images=(b"\x89PNG not really",))
    features = FeatureCache(tmp_path, model, tokenizer).features([*ITEMS, broken])
    assert features[3] is None
    cached = encode_cached(model, features)
    served = ItemEncoder(model, tokenizer).encode(ITEMS)
    assert np.abs(cached[3]).sum() == 0
    np.testing.assert_allclose(np.sum(cached[:3] * served, axis=1), 1.0, atol=1e-3)  # fp16 cache: cosine ~1
    view = CachedItemFeatures([*ITEMS, broken], features)
    assert view.item_ids == ["a", "b", "c"] and len(view.batch([0, 2])) == 2
