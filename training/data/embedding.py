"""Embed batches of items for the reindex job and the evaluation: refused items are left out and reported."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embed.encoder import Features, ItemEncoder
from embed.errors import InvalidItemError
from embed.items import Item

logger = logging.getLogger(__name__)


def featurize_items(encoder: ItemEncoder, items: Sequence[Item]) -> tuple[list[Features], list[str]]:
    """Decode and tokenise one batch; items the encoder refuses are logged and left out.

    Returns:
        The accepted items' features in order, and per item the reason it was refused ("" when accepted).
    """
    try:
        return encoder.featurize(items), [""] * len(items)
    except InvalidItemError:
        features: list[Features] = []
        errors: list[str] = []
        for item in items:
            try:
                features += encoder.featurize([item])
                errors.append("")
            except InvalidItemError as e:
                reason = f"{e.reason}: {e.field} {e.detail}"
                logger.warning("skipping item %s: %s", item.item_id, reason)
                errors.append(reason)
        return features, errors


def _encode_features(encoder: ItemEncoder, features: Sequence[Features]) -> np.ndarray:
    if not features:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return encoder.encode_features(features)


def embed_batch(encoder: ItemEncoder, items: Sequence[Item]) -> tuple[np.ndarray, list[str]]:
    """Embed one batch; items the encoder refuses are logged and left out.

    Returns:
        Vectors of the accepted items in order (float32 (accepted, dim)), and per item the
        reason it was refused ("" when it was embedded).
    """
    features, errors = featurize_items(encoder, items)
    return _encode_features(encoder, features), errors


def embed_pipelined(encoder: ItemEncoder, batches: Sequence[Sequence[Item]],
                    done: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """`embed_batch` over several batches, decoding and tokenising batch i+1 in a second thread while
    the model runs batch i (Pillow, the tokenizer and torch release the GIL): the job keeps the model
    busy instead of waiting for image decoding. `done(n)` after each batch but the last.
    """
    if not batches:
        return np.zeros((0, encoder.dim), dtype=np.float32), []
    vectors: list[np.ndarray] = []
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onetower-featurize") as pool:
        ahead = pool.submit(featurize_items, encoder, batches[0])
        for j, batch in enumerate(batches):
            features, batch_errors = ahead.result()
            if j + 1 < len(batches):
                ahead = pool.submit(featurize_items, encoder, batches[j + 1])
            vectors.append(_encode_features(encoder, features))
            errors += batch_errors
            if done is not None and j + 1 < len(batches):
                done(len(batch))
    return np.concatenate(vectors), errors


