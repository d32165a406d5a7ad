"""The stitched late-fusion baseline: parameter budget, late fusion, and the unified encoder's interfaces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from embed.build import build_encoder
from embed.config import EncoderConfig, preset
from embed.encoder import ItemEncoder
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.stitched import StitchedEncoder, count_parameters, tower_width
from embed.tokens import TextTokenizer

from .conftest import CATALOG_TEXTS


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_parameter_count_matches_the_unified_encoder(size: str) -> None:
    config = preset(size)
    with torch.device("meta"):
        unified = count_parameters(UnifiedEncoder(config))
        stitched = count_parameters(build_encoder(dataclasses.replace(config, architecture="stitched")))
    assert abs(stitched - unified) / unified < 0.05
    assert tower_width(config) % config.heads == 0 and tower_width(config) < config.width


@pytest.fixture
def stitched(tiny_config: EncoderConfig) -> StitchedEncoder:
    torch.manual_seed(0)
    model = build_encoder(dataclasses.replace(tiny_config, architecture="stitched"))
    assert isinstance(model, StitchedEncoder)
    return model.eval()


def test_towers_never_see_each_other(stitched: StitchedEncoder, tokenizer: TextTokenizer,
                                     random_png: Callable[[int], bytes]) -> None:
    """Late fusion: head(concat(text, image)) is the sum of a text part and an image part."""
    encoder = ItemEncoder(stitched, tokenizer)
    items = [Item("ti", title="red leather handbag", images=(random_png(1),)),
             Item("t", title="red leather handbag"), Item("i", images=(random_png(1),))]
    batch = encoder.prepare(items)
    with torch.inference_mode():
        states, keep = stitched.hidden_states(batch)
        pooled = stitched.pool(states, keep, batch.token_ids.shape[1])  # (3, 2W)
    w = stitched.width
    torch.testing.assert_close(pooled[0, :w], pooled[1, :w])  # the text part ignores the image
    torch.testing.assert_close(pooled[0, w:], pooled[2, w:])  # and the image part the text
    assert pooled[1, w:].abs().sum() == 0 and pooled[2, :w].abs().sum() == 0  # a missing side adds nothing
    vectors = encoder.encode(items)
    assert vectors.shape == (3, stitched.config.embed_dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1)


def test_saved_stitched_encoder_loads_as_stitched(stitched: StitchedEncoder, tokenizer: TextTokenizer,
                                                  random_png: Callable[[int], bytes], tmp_path: Path) -> None:
    items = [Item("a", title="blue cotton shirt", images=(random_png(2),)), Item("b", images=(random_png(3),))]
    before = ItemEncoder(stitched, tokenizer).encode(items)
    loaded = load_encoder(save_encoder(tmp_path / "enc", stitched, tokenizer))
    assert isinstance(loaded.model, StitchedEncoder)
    np.testing.assert_allclose(loaded.encode(items), before, atol=1e-6)


def test_stitched_trains_through_the_recommendation_stage(tiny_config: EncoderConfig, tokenizer: TextTokenizer,
                                                          random_png: Callable[[int], bytes]) -> None:
    """Stage 3 as `onetower train` runs it (Lightning Trainer, co-engagement pairs): both towers and the head learn."""
    import pytorch_lightning as pl

    from training.data.features import ItemFeatures, PairCollator
    from training.fitting.stages import RecommendationStage

    config = dataclasses.replace(tiny_config, architecture="stitched")
    with pytest.raises(ValueError, match="architecture"):
        EncoderConfig(architecture="late")
    pl.seed_everything(0)
    stage = RecommendationStage(dataclasses.asdict(config), lr=1e-2, weight_decay=0.0, warmup_steps=1,
                                max_steps=3, temperature=0.1)
    assert isinstance(stage.encoder, StitchedEncoder)
    items = [Item(f"i{n}", title=text, images=(random_png(n),)) for n, text in enumerate(CATALOG_TEXTS[:8])]
    features = ItemFeatures(items, tokenizer, config)
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7), (1, 0), (3, 2), (5, 4), (7, 6)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, shuffle=False, collate_fn=PairCollator(features))
    before = {name: p.detach().clone() for name, p in stage.encoder.named_parameters()}
    trainer = pl.Trainer(max_steps=3, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stage, loader)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = {name.split(".")[0] for name, p in stage.encoder.named_parameters()
             if not torch.equal(p.detach(), before[name])}
    assert moved == {"text", "image", "head"}  # gradients reach both towers through the fused vector
