"""The unified encoder (`embed.model`), its config presets and batch collation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from embed.batch import collate
from embed.config import PRESETS, EncoderConfig, preset
from embed.images import patchify, to_tensor
from embed.load import load_model, save_encoder
from embed.model import EncoderInput, UnifiedEncoder
from embed.moe import (
    ModalityMoE,
    auxiliary_loss,
    load_balancing_loss,
    moe_layers,
    reset_routing,
    routing_distance,
    routing_usage,
)
from embed.tokens import TextTokenizer


def _pixels(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    # (torch.testing.assert_close costs a second of lazy imports on its first call)
    assert a.shape == b.shape
    return float((a - b).abs().max())


def _encode(model: UnifiedEncoder, tokens: list[list[int]], images: list[list[np.ndarray]]) -> torch.Tensor:
    with torch.inference_mode():
        return model(collate(tokens, images, model.config))


def test_tiny_preset_shapes_the_model(tiny_config: EncoderConfig, model: UnifiedEncoder) -> None:
    assert tiny_config == PRESETS["tiny"]
    assert (tiny_config.depth, tiny_config.width, tiny_config.embed_dim) == (2, 64, 64)
    assert len(model.blocks) == tiny_config.depth
    assert model.token_embed.weight.shape == (tiny_config.vocab_size, tiny_config.width)
    assert model.patch_proj.in_features == tiny_config.patch_dim == 3 * 8 * 8
    assert model.patch_pos.shape == (1, tiny_config.width, tiny_config.grid, tiny_config.grid)
    assert model.head.out_features == tiny_config.embed_dim
    deeper = UnifiedEncoder(preset("tiny", depth=3, width=32, heads=2))
    assert len(deeper.blocks) == 3 and deeper.norm.normalized_shape == (32,)


def test_preset_and_config_validation() -> None:
    assert preset("tiny", embed_dim=32).embed_dim == 32
    with pytest.raises(ValueError, match="unknown encoder size 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        EncoderConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        EncoderConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="depth=0"):
        EncoderConfig(depth=0)
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        EncoderConfig.from_dict({"widht": 3})
    cfg = preset("small")
    assert EncoderConfig.from_json(cfg.to_json()) == cfg


def test_output_is_unit_norm_with_shape_batch_by_embed_dim(model: UnifiedEncoder) -> None:
    size = model.config.image_size
    out = _encode(model, [[10, 11, 12], [], [13]], [[], [_pixels(0, size)], [_pixels(1, size), _pixels(2, size)]])
    assert out.shape == (3, model.config.embed_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_text_only_image_only_and_both_are_finite_and_distinct(model: UnifiedEncoder) -> None:
    pixels = _pixels(3, model.config.image_size)
    text, image, both = _encode(model, [[20, 21, 22], [], [20, 21, 22]], [[], [pixels], [pixels]])
    for v in (text, image, both):
        assert torch.isfinite(v).all()
        assert abs(float(v.norm()) - 1) < 1e-5
    assert not torch.allclose(text, image, atol=1e-3)
    assert not torch.allclose(both, text, atol=1e-3)
    assert not torch.allclose(both, image, atol=1e-3)


def test_vectors_depend_on_content(model: UnifiedEncoder) -> None:
    size = model.config.image_size
    a, b, c, d = _encode(model, [[20, 21], [21, 20], [], []], [[], [], [_pixels(4, size)], [_pixels(5, size)]])
    assert not torch.allclose(a, b, atol=1e-4)  # word order matters (positions)
    assert not torch.allclose(c, d, atol=1e-4)


def test_padding_does_not_change_an_items_vector(model: UnifiedEncoder) -> None:
    size = model.config.image_size
    short_text, long_text = [30, 31], list(range(40, 40 + model.config.max_text_tokens))
    one_image, two_images = [_pixels(6, size)], [_pixels(7, size), _pixels(8, size)]
    alone = _encode(model, [short_text, short_text, []], [[], one_image, one_image])
    batched = _encode(model, [short_text, long_text, short_text, [], long_text],
                      [[], two_images, one_image, one_image, []])
    assert _max_diff(batched[0], alone[0]) <= 1e-5
    assert _max_diff(batched[2], alone[1]) <= 1e-5
    assert _max_diff(batched[3], alone[2]) <= 1e-5


def test_only_max_images_are_read(model: UnifiedEncoder) -> None:
    size, m = model.config.image_size, model.config.max_images
    images = [_pixels(i, size) for i in range(m + 2)]
    batch = collate([[]], [images], model.config)
    assert batch.patches.shape[1] == m
    assert _max_diff(_encode(model, [[]], [images]), _encode(model, [[]], [images[:m]])) <= 1e-6


def test_collate_layout(tiny_config: EncoderConfig) -> None:
    size = tiny_config.image_size
    batch = collate([[7, 8, 9], []], [[], [_pixels(0, size)]], tiny_config)
    assert batch.token_ids.tolist() == [[2, 7, 8, 9, 3], [2, 0, 0, 0, 0]]  # [CLS] ... [SEP], [PAD] = 0
    assert batch.text_mask.tolist() == [[True] * 5, [True] + [False] * 4]
    assert batch.patches.shape == (2, 1, tiny_config.grid ** 2, tiny_config.patch_dim)
    assert batch.image_mask.tolist() == [[False], [True]]
    assert torch.equal(batch.patches[1, 0], patchify(to_tensor(_pixels(0, size)[None]), tiny_config.patch_size)[0])
    assert len(batch) == 2
    with pytest.raises(ValueError, match="2 token lists but 1 image lists"):
        collate([[1], [2]], [[]], tiny_config)


def test_other_image_sizes_use_interpolated_positions(model: UnifiedEncoder) -> None:
    cfg = model.config
    assert torch.equal(model._patch_positions(cfg.grid ** 2), model.patch_pos.flatten(2).transpose(1, 2)[0])
    for side in (cfg.image_size // 2, cfg.image_size * 2 - cfg.patch_size * 2, cfg.image_size * 2):
        grid = side // cfg.patch_size
        positions = model._patch_positions(grid * grid)
        assert positions.shape == (grid * grid, cfg.width)
        pixels = torch.stack([to_tensor(_pixels(s, side)) for s in (9, 10)])  # (2, 3, side, side)
        tiles = patchify(pixels, cfg.patch_size)[:, None]  # (2, 1, N, 3*P*P)
        batch = EncoderInput(token_ids=torch.tensor([[2], [2]]), text_mask=torch.ones(2, 1, dtype=torch.bool),
                             patches=tiles, image_mask=torch.ones(2, 1, dtype=torch.bool))
        with torch.inference_mode():
            out = model(batch)
        assert out.shape == (2, cfg.embed_dim)
        assert torch.isfinite(out).all()
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
        assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_eval_is_deterministic_even_with_dropout(tiny_config: EncoderConfig) -> None:
    torch.manual_seed(1)
    model = UnifiedEncoder(dataclasses.replace(tiny_config, dropout=0.5)).eval()
    first, second = _encode(model, [[5, 6, 7]], [[]]), _encode(model, [[5, 6, 7]], [[]])
    assert torch.equal(first, second)


def test_gradients_reach_both_modalities(model: UnifiedEncoder) -> None:
    model.train()
    batch = collate([[20, 21]], [[_pixels(0, model.config.image_size)]], model.config)
    model(batch).sum().backward()
    assert model.token_embed.weight.grad is not None and model.token_embed.weight.grad[20].abs().sum() > 0
    assert model.patch_proj.weight.grad is not None and model.patch_proj.weight.grad.abs().sum() > 0
    assert model.token_embed.weight.grad[0].abs().sum() == 0  # [PAD] never used


def test_modality_pooling_means_each_modality_apart_zero_when_missing_and_ignores_padding(
        tiny_config: EncoderConfig) -> None:
    model = UnifiedEncoder(dataclasses.replace(tiny_config, pool="modality")).eval()
    d = tiny_config.width
    assert model.head.in_features == 2 * d
    # T = 4 text positions, then 2 images x 2 patches; rows: text only, image only, both
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    patch_keep = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    keep = torch.cat([text_mask, patch_keep], dim=1)  # (3, 8)
    states = torch.full((3, 8, d), 1e6)  # padding: would dominate any mean it leaked into
    states[0, :3], states[1, 0], states[1, 4:6] = torch.tensor([1.0, 2.0, 3.0])[:, None], 7.0, 4.0
    states[2, :2], states[2, 4:] = torch.tensor([5.0, 7.0])[:, None], torch.tensor([1.0, 3.0, 5.0, 7.0])[:, None]
    pooled = model.pool(states, keep, n_text=4)  # (3, 2D)
    assert pooled.shape == (3, 2 * d)
    expected = torch.tensor([[2.0, 0.0], [0.0, 4.0], [6.0, 4.0]])  # (text mean, image mean); [CLS] alone: no text
    assert torch.equal(pooled.view(3, 2, d), expected[:, :, None].expand(3, 2, d))
    with pytest.raises(ValueError, match="needs n_text"):
        model.pool(states, keep)
    assert UnifiedEncoder(tiny_config).pool(states[:, :4], text_mask).shape == (3, d)  # "mean" unchanged
    assert torch.equal(UnifiedEncoder(dataclasses.replace(tiny_config, pool="cls")).pool(states, keep), states[:, 0])


def test_modality_pooling_encoder_is_padding_invariant_and_round_trips(
        tiny_config: EncoderConfig, tokenizer: TextTokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UnifiedEncoder(dataclasses.replace(tiny_config, pool="modality", vocab_size=tokenizer.vocab_size)).eval()
    size = tiny_config.image_size
    one_image, two_images = [_pixels(6, size)], [_pixels(7, size), _pixels(8, size)]
    alone = _encode(model, [[30, 31], [30, 31], []], [[], one_image, one_image])
    batched = _encode(model, [[30, 31], list(range(40, 60)), [30, 31], [], [40, 41]],
                      [[], two_images, one_image, one_image, []])
    for i, j in ((0, 0), (2, 1), (3, 2)):
        assert _max_diff(batched[i], alone[j]) <= 1e-5
    text, image, both = alone[0], alone[2], alone[1]
    assert not torch.allclose(both, text, atol=1e-3) and not torch.allclose(both, image, atol=1e-3)
    save_encoder(tmp_path, model, tokenizer)
    loaded, _ = load_model(tmp_path)
    assert loaded.config.pool == "modality"
    assert _max_diff(_encode(loaded.eval(), [[30, 31], []], [one_image, one_image]), alone[1:]) <= 1e-6  # type: ignore[arg-type]


def _moe_model(tiny_config: EncoderConfig, **overrides: int) -> UnifiedEncoder:
    torch.manual_seed(0)
    return UnifiedEncoder(dataclasses.replace(tiny_config, moe_experts=4, moe_top_k=2, **overrides))


def test_moe_blocks_follow_moe_every(tiny_config: EncoderConfig) -> None:
    every = _moe_model(tiny_config)
    assert [isinstance(b.mlp, ModalityMoE) for b in every.blocks] == [True, True]
    other = _moe_model(tiny_config, moe_every=2)
    assert [isinstance(b.mlp, ModalityMoE) for b in other.blocks] == [False, True]
    layer = other.blocks[1].mlp
    assert (len(layer.experts), len(layer.shared), layer.top_k) == (4, 1, 2)
    with pytest.raises(ValueError, match=r"moe_top_k=5 must be in \[1, 4\]"):
        dataclasses.replace(tiny_config, moe_experts=4, moe_top_k=5)
    with pytest.raises(ValueError, match=r"moe_top_k=3 must be in \[1, 2\]"):
        dataclasses.replace(tiny_config, moe_experts=4, moe_top_k=3, moe_routing="grouped")
    with pytest.raises(ValueError, match="moe_experts=3 must be even"):
        dataclasses.replace(tiny_config, moe_experts=3, moe_routing="grouped")
    with pytest.raises(ValueError, match="moe_every=0"):
        dataclasses.replace(tiny_config, moe_experts=4, moe_every=0)


def test_moe_encoder_is_unit_norm_padding_invariant_and_counts_routing_per_modality(
        tiny_config: EncoderConfig) -> None:
    model = _moe_model(tiny_config).eval()
    size = tiny_config.image_size
    alone = _encode(model, [[30, 31]], [[_pixels(6, size)]])
    reset_routing(model)
    batched = _encode(model, [list(range(40, 40 + tiny_config.max_text_tokens)), [30, 31], []],
                      [[], [_pixels(6, size)], [_pixels(7, size), _pixels(8, size)]])
    assert torch.allclose(batched.norm(dim=1), torch.ones(3), atol=1e-5)
    assert _max_diff(batched[1], alone[0]) <= 1e-5  # padding and batch-mates change no routing
    usage = torch.stack([layer.stats.usage for layer in moe_layers(model)])  # (L, 2, E) assignment counts
    n_text = (tiny_config.max_text_tokens + 2) + 4 + 1  # [CLS] tokens [SEP] per text row (the third has [CLS])
    n_patches = 3 * tiny_config.grid ** 2  # three images' patches
    assert usage[:, 0].sum(-1).tolist() == [2.0 * n_text] * 2  # top-2: two assignments per real token
    assert usage[:, 1].sum(-1).tolist() == [2.0 * n_patches] * 2
    shares = routing_usage(model)
    assert shares is not None and torch.allclose(shares.sum(-1), torch.ones(2, 2))


def test_moe_gradients_reach_every_expert_router_and_modality_bias(tiny_config: EncoderConfig) -> None:
    model = _moe_model(tiny_config).train()
    batch = collate([[20, 21, 22]], [[_pixels(0, tiny_config.image_size)]], tiny_config)
    reset_routing(model)
    out = model(batch)
    aux = auxiliary_loss(model)
    assert aux is not None and aux.requires_grad
    (out.sum() + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # unused experts still get (zero) gradients: DDP needs no unused-parameter scan
    layer = model.blocks[0].mlp
    assert layer.router.weight.grad.abs().sum() > 0 and layer.modality_bias.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed() -> None:
    uniform = torch.full((8, 4), 0.25)
    chosen = torch.arange(8).remainder(4)[:, None]  # two tokens on each expert
    assert float(load_balancing_loss(uniform, chosen)) == pytest.approx(1.0)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(8, 4)
    assert float(load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long))) == pytest.approx(3.88)
    usage = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    assert routing_distance(usage).tolist() == [1.0, 0.0]


def test_grouped_routing_keeps_text_and_image_tokens_in_their_own_experts(tiny_config: EncoderConfig) -> None:
    torch.manual_seed(0)
    model = UnifiedEncoder(dataclasses.replace(tiny_config, moe_experts=4, moe_top_k=1, moe_routing="grouped"))
    size = tiny_config.image_size
    batch = collate([[20, 21, 22], [], [23]], [[], [_pixels(0, size)], [_pixels(1, size), _pixels(2, size)]],
                    tiny_config)
    reset_routing(model)
    out = model.train()(batch)
    usage = torch.stack([layer.stats.usage for layer in moe_layers(model)])  # (L, 2, E) counts
    assert usage[:, 0, 2:].sum() == 0 and usage[:, 1, :2].sum() == 0  # no token crosses to the other group
    assert usage[:, 0, :2].sum() > 0 and usage[:, 1, 2:].sum() > 0
    aux = auxiliary_loss(model)
    assert aux is not None and 1.0 <= float(aux) / len(model.blocks) <= 2.0  # per-group Switch loss: 1 = balanced
    (out.sum() + aux).backward()
    assert all(p.grad is not None for p in model.parameters())
