"""A real gRPC server on a free port over an untrained tiny encoder (local directory, no registry)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embed.config import preset
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from service.client import Client
from service.config import Limits, ServiceConfig
from service.registry import lookup_model
from service.server import RunningServer, start_server

N_ITEMS = 60


def png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def catalog() -> list[Item]:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "leather", "cotton", "bag", "shirt", "lamp", "mug", "Zorvane", "Lumetta"]
    items = []
    for i in range(N_ITEMS):
        title = " ".join(rng.choice(words, 3))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        items.append(Item(item_id=f"item-{i:03d}", title=title if i % 7 else "",
                          attributes={"category": ["bag", "shirt", "lamp"][i % 3]},
                          images=(png(colour),) if i % 5 else ()))
    return items


@dataclass(frozen=True)
class Served:
    root: Path
    encoder_dir: Path
    items: list[Item]


@pytest.fixture(scope="package")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("svc")
    items = catalog()
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([it.text for it in items], 300, min_frequency=1)
    config = preset("tiny", vocab_size=tokenizer.vocab_size)
    encoder_dir = save_encoder(root / "encoder", UnifiedEncoder(config), tokenizer)
    encoder = load_encoder(encoder_dir)
    vectors = encoder.encode(items)
    ids = IdMap([it.item_id for it in items], [it.content_hash() for it in items], [dict(it.attributes) for it in items])
    ref = lookup_model(str(encoder_dir))
    publish_index(root / "index", vectors, ids, IndexConfig(kind="flat"), ref.name, ref.version)
    return Served(root, encoder_dir, items)


def make_config(served: Served, **overrides: object) -> ServiceConfig:
    base: dict[str, object] = dict(model_uri=str(served.encoder_dir), index_root=served.root / "index", port=0,
                                   poll_seconds=0, cache_dir=served.root / "cache",
                                   limits=Limits(max_items=8, max_queries=8, max_k=50, max_text_chars=2000,
                                                 max_image_bytes=200_000, max_image_pixels=4_000_000,
                                                 max_message_bytes=4 * 1024 * 1024))
    base.update(overrides)
    return ServiceConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="package")
def server(served: Served) -> Iterator[RunningServer]:
    running = start_server(make_config(served))
    yield running
    running.stop(grace=1)


@pytest.fixture()
def client(server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", timeout=20) as c:
        yield c
