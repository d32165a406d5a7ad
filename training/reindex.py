"""The batch reindex job: catalog parquet -> embeddings -> FAISS index -> verified, published directory."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embed.encoder import ItemEncoder
from embed.errors import InvalidItemError
from embed.items import Item
from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from training.data import iter_items, read_catalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReindexResult:
    """What a reindex published."""

    index_version: str
    path: Path
    count: int
    embedded: int
    skipped: int
    seconds: float


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


@dataclass(frozen=True)
class EmbeddedItem:
    """What the index keeps of an embedded item."""

    item_id: str
    content_hash: str
    attributes: dict[str, str]


def embed_catalog(encoder: ItemEncoder, items: Iterator[Item],
                  progress: Callable[[int], None] | None = None) -> tuple[list[EmbeddedItem], np.ndarray, int]:
    """Embed every item; items the encoder refuses are logged and skipped.

    Returns:
        The embedded items, their vectors (same order), and how many were skipped.
    """
    kept: list[EmbeddedItem] = []
    chunks: list[np.ndarray] = []
    skipped = 0
    for batch in _batches(items, encoder.batch_size):
        good = _encodable(encoder, batch)
        skipped += len(batch) - len(good)
        if good:
            chunks.append(encoder.encode(good))
            kept += [EmbeddedItem(it.item_id, it.content_hash(), dict(it.attributes)) for it in good]
        if progress is not None:
            progress(len(batch))
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)
    return kept, vectors, skipped


def _encodable(encoder: ItemEncoder, batch: Sequence[Item]) -> list[Item]:
    """The items of `batch` the encoder accepts (checked one by one only when the batch fails)."""
    try:
        encoder.prepare(batch)
        return list(batch)
    except InvalidItemError:
        pass
    good = []
    for item in batch:
        try:
            encoder.prepare([item])
            good.append(item)
        except InvalidItemError as e:
            logger.warning("skipping item %s: %s", item.item_id, e)
    return good


def reindex(catalog: Path, encoder: ItemEncoder, model_name: str, model_version: str, index_root: Path,
            index_config: IndexConfig, progress: Callable[[int], None] | None = None) -> ReindexResult:
    """Embed the whole catalog with `encoder` and publish a new index version under `index_root`."""
    started = time.perf_counter()
    frame = read_catalog(catalog)
    kept, vectors, skipped = embed_catalog(encoder, iter_items(frame, catalog.parent), progress)
    if not kept:
        raise ValueError(f"{catalog}: no item could be embedded ({skipped} skipped)")
    id_map = IdMap([it.item_id for it in kept], [it.content_hash for it in kept], [it.attributes for it in kept])
    published = publish_index(index_root, vectors, id_map, index_config, model_name, model_version)
    seconds = time.perf_counter() - started
    logger.info("published index %s: %d items (%d skipped) in %.1fs", published.manifest.index_version,
                len(kept), skipped, seconds)
    return ReindexResult(index_version=published.manifest.index_version, path=published.path, count=len(kept),
                         embedded=len(kept), skipped=skipped, seconds=seconds)
