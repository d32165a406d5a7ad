"""Item features for training: tokens and decoded images of every catalog item, and co-engagement pairs."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from embed.batch import collate
from embed.config import EncoderConfig
from embed.errors import InvalidItemError
from embed.images import decode_image
from embed.items import Item
from embed.model import EncoderInput
from embed.tokens import TextTokenizer

logger = logging.getLogger(__name__)


def _decode_images(blobs: Sequence[bytes], size: int, item_id: str) -> tuple[list[np.ndarray], list[str]]:
    """One item's images decoded at `size`, and a message per image that could not be (module level: picklable)."""
    decoded, errors = [], []
    for j, data in enumerate(blobs):
        try:
            decoded.append(decode_image(data, size, f"images[{j}]"))
        except InvalidItemError as e:
            errors.append(f"item {item_id}: {e}")
    return decoded, errors


class ItemFeatures:
    """Tokens and decoded images per catalog row, so training batches are cheap to assemble.

    With `workers > 0` images are decoded in that many worker processes, started with `spawn` (never
    `fork`: the parent holds torch's and OpenMP's threads, which a forked child inherits half-initialised).
    """

    def __init__(self, items: Sequence[Item], tokenizer: TextTokenizer, config: EncoderConfig,
                 progress: Callable[[int], None] | None = None, workers: int = 0) -> None:
        self.config = config
        self.item_ids = [it.item_id for it in items]
        self.row_of = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.tokens = tokenizer.encode_batch([it.text for it in items], config.max_text_tokens)
        blobs = [it.images[: config.max_images] for it in items]
        size = [config.image_size] * len(items)
        self.images: list[list[np.ndarray]] = []
        errors: list[str] = []
        with contextlib.ExitStack() as stack:
            if workers > 0 and any(blobs):
                pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
                results = pool.map(_decode_images, blobs, size, self.item_ids, chunksize=32)
            else:
                results = map(_decode_images, blobs, size, self.item_ids)
            for decoded, failed in results:
                self.images.append(decoded)
                errors += failed
                if progress is not None:
                    progress(1)
        for message in errors:
            logger.warning("%s", message)
        if errors:
            logger.warning("%d images could not be decoded and were left out", len(errors))

    def __len__(self) -> int:
        return len(self.item_ids)

    def batch(self, rows: Sequence[int]) -> EncoderInput:
        return collate([self.tokens[r] for r in rows], [self.images[r] for r in rows], self.config)

    def text_only(self, rows: Sequence[int]) -> EncoderInput:
        return collate([self.tokens[r] for r in rows], [[] for _ in rows], self.config)

    def image_only(self, rows: Sequence[int]) -> EncoderInput:
        return collate([[] for _ in rows], [self.images[r] for r in rows], self.config)


@dataclass(frozen=True)
class Pairs:
    """Co-engagement pairs (catalog rows) and each row's sampling log-probability as a positive."""

    anchors: np.ndarray  # int64 [P]
    positives: np.ndarray  # int64 [P]
    log_q: np.ndarray  # float32 [n_items]


def co_engagement_pairs(interactions: pl.DataFrame, row_of: dict[str, int], window: int,
                        n_items: int) -> Pairs:
    """Pairs of distinct items a user engaged with within `window` events of each other (both orders)."""
    known = pl.DataFrame({"item_id": list(row_of), "row": list(row_of.values())},
                         schema={"item_id": pl.String, "row": pl.Int64})
    events = (interactions.join(known, on="item_id", how="inner").sort("user_id", "ts")
              .select("user_id", "row").with_columns(pl.int_range(pl.len()).over("user_id").alias("pos")))
    parts = []
    for offset in range(1, window + 1):
        shifted = events.with_columns((pl.col("pos") - offset).alias("pos")).rename({"row": "other"})
        parts.append(events.join(shifted, on=["user_id", "pos"], how="inner").select("row", "other"))
    pairs = pl.concat(parts).filter(pl.col("row") != pl.col("other"))
    if pairs.height == 0:
        raise ValueError("the interactions give no co-engagement pairs: need users with >= 2 known items")
    a = np.concatenate([pairs["row"].to_numpy(), pairs["other"].to_numpy()])
    p = np.concatenate([pairs["other"].to_numpy(), pairs["row"].to_numpy()])
    counts = np.bincount(p, minlength=n_items).astype(np.float64) + 1.0  # +1: never log(0)
    log_q = np.log(counts / counts.sum()).astype(np.float32)
    logger.info("%d co-engagement pairs over %d items", len(a), int((counts > 1).sum()))
    return Pairs(anchors=a.astype(np.int64), positives=p.astype(np.int64), log_q=log_q)


def count_pairs(interactions: pl.DataFrame, window: int) -> int:
    """How many pairs `co_engagement_pairs` would make (both orders, before dropping repeats of one item):
    per user with n events, 2 x sum over offsets 1..window of max(0, n - offset)."""
    sizes = interactions.group_by("user_id").len()["len"].to_numpy().astype(np.int64)  # u32: n - offset may go below 0
    return int(sum(2 * np.clip(sizes - offset, 0, None).sum() for offset in range(1, window + 1)))


class PairDataset(torch.utils.data.Dataset[tuple[int, int]]):
    """Index -> (anchor row, positive row)."""

    def __init__(self, pairs: Pairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.anchors)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.pairs.anchors[i]), int(self.pairs.positives[i])


class BatchSource(Protocol):
    """Catalog rows -> a model batch: `ItemFeatures`, or cached pretrained features."""

    def batch(self, rows: Sequence[int]) -> Any: ...


class PairCollator:
    """Collate (anchor, positive) rows into two model batches plus the rows themselves."""

    def __init__(self, features: BatchSource) -> None:
        self.features = features

    def __call__(self, rows: list[tuple[int, int]]) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        a = [r[0] for r in rows]
        p = [r[1] for r in rows]
        return self.features.batch(a), self.features.batch(p), torch.tensor(a), torch.tensor(p)


class RowDataset(torch.utils.data.Dataset[int]):
    """Index -> catalog row, over a fixed list of rows."""

    def __init__(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return self.rows[i]


def rows_with(features: ItemFeatures, text: bool, image: bool) -> list[int]:
    """Catalog rows that have text (if `text`) and a decoded image (if `image`)."""
    return [r for r in range(len(features))
            if (not text or len(features.tokens[r]) > 0) and (not image or len(features.images[r]) > 0)]


class UnimodalCollator:
    """Collate item rows into (text-only view of those with text, image-only view of those with images)."""

    def __init__(self, features: ItemFeatures) -> None:
        self.features = features

    def __call__(self, rows: list[int]) -> tuple[EncoderInput, EncoderInput]:
        f = self.features
        return (f.text_only([r for r in rows if len(f.tokens[r]) > 0]),
                f.image_only([r for r in rows if len(f.images[r]) > 0]))


class AlignmentCollator:
    """Collate rows of items with both modalities into (image-only, text-only, joint views, rows)."""

    def __init__(self, features: ItemFeatures) -> None:
        self.features = features

    def __call__(self, rows: list[int]) -> tuple[EncoderInput, EncoderInput, EncoderInput, torch.Tensor]:
        f = self.features
        return f.image_only(rows), f.text_only(rows), f.batch(rows), torch.tensor(rows)
