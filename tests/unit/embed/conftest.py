"""Shared fixtures of the encoder tests: a tiny trained tokenizer, a seeded tiny model, image bytes."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from embed.config import EncoderConfig, preset
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer

CATALOG_TEXTS = [
    "red leather handbag with gold zip",
    "blue cotton shirt, slim fit",
    "green wool scarf for winter",
    "black leather boots with laces",
    "white cotton socks, pack of five",
    "red cotton dress with pattern",
    "blue denim jeans, straight leg",
    "yellow rain jacket with hood",
] * 3


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: with several OpenMP threads on a busy CPU every op waits on a barrier (~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CATALOG_TEXTS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_config() -> EncoderConfig:
    return preset("tiny")


@pytest.fixture
def model(tiny_config: EncoderConfig) -> UnifiedEncoder:
    torch.manual_seed(0)
    return UnifiedEncoder(tiny_config).eval()


@pytest.fixture(scope="session")
def encode_image() -> Callable[..., bytes]:
    """Encode a PIL image (or a uint8 array) into bytes of the given format."""

    def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        return buf.getvalue()

    return encode


@pytest.fixture(scope="session")
def random_png(encode_image: Callable[..., bytes]) -> Callable[[int], bytes]:
    """A seeded 48x40 RGB PNG; different seeds give different pictures."""

    def make(seed: int) -> bytes:
        rng = np.random.default_rng(seed)
        return encode_image(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))

    return make
