"""Oracle item vectors from the synthetic ground truth: what early fusion could win on the data.

Both oracles see the traits users' preferences are drawn from in the crossed mode: the image-only ones
(colour, pattern, shape) and the text-only ones (brand, material, price band); not `category`, which both
modalities show. Each trait is a one-hot over its vocabulary; a modality's one-hots are concatenated
(image 17 dims, text 23) and L2-normalised.

- **additive** (40 dims): [image part, text part], unit as a whole (each part / sqrt(2) when both are
  present). What a sum of per-modality encoders can express: a user's history scores red+cotton as
  high as red+leather once red and leather both occur in it.
- **conjunction** (40 + 17 x 23 = 431 dims): [sqrt(0.3) x additive, sqrt(0.7) x outer(image part,
  text part) flattened], L2-normalised. The outer product is unit when both parts are, and has a 1 per
  (image trait value, text trait value) pair, so history on red+leather items scores red+leather
  above red+cotton: what early fusion can express.

A modality the item lacks (`has_image` / `has_text` False) contributes zeros, since an encoder could not
know it; so such an item has no conjunction part, and its conjunction row is its additive row padded
with zeros. Items of `item_ids` absent from `traits` get all-zero rows, which the cold-start protocol
never retrieves (`metrics.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from training.data.traits import TRAIT_KINDS, VOCAB

IMAGE_TRAITS = tuple(t for t, kind in TRAIT_KINDS.items() if kind == "image")
TEXT_TRAITS = tuple(t for t, kind in TRAIT_KINDS.items() if kind == "text")
CONJUNCTION_SHARE = 0.7  # squared weight of the outer-product part of a conjunction row with both modalities


def oracle_vectors(traits: pl.DataFrame, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The "additive" and "conjunction" oracle vectors of ``item_ids`` (see the module docstring).

    Args:
        traits: traits.parquet's frame: item_id, the six image- and text-only trait columns, has_image,
            has_text; other columns are ignored.
        item_ids: the rows of the result, in order; ids absent from ``traits`` get zero rows.

    Returns:
        {"additive": float32 (len(item_ids), 40), "conjunction": float32 (len(item_ids), 431)}; every
        row unit-norm or zero.

    Raises:
        ValueError: a column is missing, an item_id repeats in ``traits``, or a trait value of a present
            modality is null or not in the trait's vocabulary.
    """
    frame = _aligned(traits, item_ids)
    known = frame["_known"].to_numpy()
    image = _unit(_one_hots(frame, IMAGE_TRAITS, known & frame["has_image"].to_numpy()))  # (n, 17)
    text = _unit(_one_hots(frame, TEXT_TRAITS, known & frame["has_text"].to_numpy()))  # (n, 23)
    additive = _unit(np.concatenate([image, text], axis=1))
    outer = (image[:, :, None] * text[:, None, :]).reshape(len(frame), -1)  # (n, 17 * 23)
    conjunction = _unit(np.concatenate([math.sqrt(1 - CONJUNCTION_SHARE) * additive,
                                        math.sqrt(CONJUNCTION_SHARE) * outer], axis=1))
    return {"additive": additive.astype(np.float32), "conjunction": conjunction.astype(np.float32)}


def _aligned(traits: pl.DataFrame, item_ids: Sequence[str]) -> pl.DataFrame:
    """One row per item id, in order: the traits, flags False and `_known` False where the id is absent."""
    expected = ["item_id", *IMAGE_TRAITS, *TEXT_TRAITS, "has_image", "has_text"]
    missing = [c for c in expected if c not in traits.columns]
    if missing:
        raise ValueError(f"traits lacks columns {missing}; expected {expected} (traits.parquet)")
    traits = traits.select(expected).with_columns(pl.col("item_id").cast(pl.String), _known=pl.lit(True))
    repeated = traits.filter(pl.col("item_id").is_duplicated())["item_id"].unique().sort().head(3).to_list()
    if repeated:
        raise ValueError(f"traits repeats item_id {repeated}; expected one row per item")
    order = pl.DataFrame({"item_id": list(item_ids)}, schema={"item_id": pl.String}).with_row_index("_row")
    return (order.join(traits, on="item_id", how="left").sort("_row")
            .with_columns(pl.col("has_image", "has_text", "_known").fill_null(False)))


def _one_hots(frame: pl.DataFrame, names: Sequence[str], shown: np.ndarray) -> np.ndarray:
    """float64 (n, sum of vocabulary sizes): a 1 at each trait's value in rows where ``shown``, else 0."""
    rows = np.flatnonzero(shown)
    blocks = []
    for name in names:
        codes = (frame[name].cast(pl.String)
                 .replace_strict({v: i for i, v in enumerate(VOCAB[name])}, default=-1, return_dtype=pl.Int64)
                 .fill_null(-1).to_numpy())
        bad = rows[codes[rows] < 0]
        if len(bad):
            values = sorted({str(v) for v in frame[name].gather(bad[:3]).to_list()})
            item = frame["item_id"][int(bad[0])]
            raise ValueError(f"traits column {name!r} holds {values} for item {item!r}; "
                             f"expected one of {list(VOCAB[name])}")
        block = np.zeros((len(frame), len(VOCAB[name])))
        block[rows, codes[rows]] = 1.0
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
