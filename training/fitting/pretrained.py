"""Frozen-backbone features for training the pretrained architectures, computed once per item and cached.

`native_pretrained` and `stitched_twin` (embed/pretrained.py, embed/twin.py) run in two halves: the frozen
MiniLM + EfficientNet-Lite0 `extract` (the costly part, identical for every model and seed over the same
catalog) and the trainable `fuse`. Training only ever needs `extract`'s output, so it is computed once per
item and kept as one safetensors file per item under a cache folder, named by a hash of the item's content
and of what shapes the features (backbone weights, image size, text length, images per item). A second
run over the same catalog reads the files; an item whose content changed gets a new name, so it is
extracted again (and the stale file is simply never read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embed.build import PretrainedEncoder, build_pretrained
from embed.config import EncoderConfig
from embed.encoder import ItemEncoder
from embed.features import PretrainedFeatures
from embed.items import Item
from embed.tokens import TextTokenizer
from training.data.catalog import iter_items, read_catalog, restrict_modalities
from training.data.embedding import featurize_items
from training.fitting.config import TrainConfig

logger = logging.getLogger(__name__)

TENSORS = ("text_states", "text_mask", "image_tokens", "image_mask")


def feature_key(model: PretrainedEncoder) -> str:
    """What the cached features depend on besides an item's content: the frozen weights and the geometry."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):  # the frozen parts only
        weights.update(name.encode())
        weights.update(tensor.detach().float().flatten()[:64].numpy().tobytes())  # a fingerprint, not a full hash
    c = model.config
    fields = {"weights": weights.hexdigest()[:16], "image_size": c.image_size, "max_text_tokens": c.max_text_tokens,
              "max_images": c.max_images}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """Per-item `PretrainedFeatures` (float16, CPU) of one backbone, as files under `folder/<feature key>/`."""

    def __init__(self, folder: Path, model: PretrainedEncoder, tokenizer: TextTokenizer, batch_size: int = 32) -> None:
        self.model = model
        self.folder = folder / feature_key(model)
        self.encoder = ItemEncoder(model, tokenizer, batch_size=batch_size)  # featurize + collate, as served
        self.hits = self.misses = 0
        self.seconds = 0.0  # spent reading and extracting

    def path(self, item: Item) -> Path:
        digest = item.content_hash()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def features(self, items: Sequence[Item], progress: Callable[[int], None] | None = None
                 ) -> list[PretrainedFeatures | None]:
        """Each item's features (None for an item the encoder refuses), extracting only what is not cached."""
        started = time.perf_counter()
        out: list[PretrainedFeatures | None] = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            cached = self._read(self.path(item))
            if cached is not None:
                out[i] = cached
                self.hits += 1
            else:
                todo.append(i)
        size = self.encoder.batch_size
        for lo in range(0, len(todo), size):
            rows = todo[lo: lo + size]
            for i, feats in zip(rows, self._extract([items[i] for i in rows]), strict=True):
                out[i] = feats
            if progress is not None:
                progress(len(rows))
        self.misses += len(todo)
        self.seconds += time.perf_counter() - started
        logger.info("pretrained features: %d items from the cache in %s, %d extracted, in %.1fs",
                    len(items) - len(todo), self.folder, len(todo), time.perf_counter() - started)
        return out

    @staticmethod
    def _read(path: Path) -> PretrainedFeatures | None:
        """The features in `path`, or None when absent or unreadable (extracted again, then replaced)."""
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            return PretrainedFeatures(*(tensors[name] for name in TENSORS))
        except (SafetensorError, KeyError) as e:
            logger.warning("extracting again: %s is unreadable (%s)", path, e)
            return None

    @torch.inference_mode()
    def _extract(self, items: Sequence[Item]) -> list[PretrainedFeatures | None]:
        featurized, errors = featurize_items(self.encoder, items)  # refused items are logged and left out
        per_item = iter(self.model.extract(self.encoder.collate(featurized)).split() if featurized else [])
        out: list[PretrainedFeatures | None] = []
        for item, error in zip(items, errors, strict=True):
            if error:
                out.append(None)
                continue
            feats = next(per_item)
            path = self.path(item)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")  # a killed run leaves no half-written file
            save_file({name: getattr(feats, name).contiguous() for name in TENSORS}, str(partial))
            os.replace(partial, path)
            out.append(feats)
        return out


class CachedItemFeatures:
    """The training view of cached features: catalog rows, `row_of`, and padded batches for `fuse`.

    Duck-types `training.data.features.ItemFeatures` where the pair loader needs it (`row_of`, `batch`,
    `len`); items the encoder refuses have no row.
    """

    def __init__(self, items: Sequence[Item], features: Sequence[PretrainedFeatures | None]) -> None:
        kept = [(item, f) for item, f in zip(items, features, strict=True) if f is not None]
        self.item_ids = [item.item_id for item, _ in kept]
        self.row_of = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.features = [f for _, f in kept]

    def __len__(self) -> int:
        return len(self.item_ids)

    def batch(self, rows: Sequence[int]) -> PretrainedFeatures:
        return PretrainedFeatures.collate([self.features[r] for r in rows])


def prepare_pretrained(catalog: Path, config: TrainConfig, cache_dir: Path
                       ) -> tuple[TextTokenizer, EncoderConfig, CachedItemFeatures, PretrainedEncoder]:
    """A fresh pretrained-architecture encoder (backbones from the installed packages), its tokenizer, and
    the catalog's cached features under `config.modalities`.

    Raises:
        PretrainedUnavailable: the packages holding the pretrained weights are not installed.
    """
    enc_config = config.encoder_config()
    model, tokenizer = build_pretrained(enc_config)
    items = restrict_modalities(iter_items(read_catalog(catalog), catalog.parent,
                                           with_images=config.modalities != "text"), config.modalities)
    cache = FeatureCache(cache_dir, model, tokenizer)
    return tokenizer, enc_config, CachedItemFeatures(items, cache.features(items)), model


@torch.inference_mode()
def encode_cached(model: PretrainedEncoder, features: Sequence[PretrainedFeatures | None],
                  batch_size: int = 256) -> np.ndarray:
    """Unit vectors float32 (len(features), embed_dim) by `model.fuse` of cached features; zero rows for None."""
    out = np.zeros((len(features), model.config.embed_dim), dtype=np.float32)
    rows = [i for i, f in enumerate(features) if f is not None]
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo: lo + batch_size]
            batch = PretrainedFeatures.collate([features[i] for i in chunk])  # type: ignore[misc]
            out[chunk] = model.fuse(batch).float().numpy()
    finally:
        model.train(was_training)
    return out
