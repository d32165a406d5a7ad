"""Hold out items as cold-start targets: every event of a random share of the interacted items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

TRAIN_FILE, HOLDOUT_FILE = "interactions_train.parquet", "interactions_holdout.parquet"


def split_holdout_items(interactions: pl.DataFrame, fraction: float, seed: int = 0
                        ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Hold out `fraction` of the interacted items, all their events, as cold: (train, holdout)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction={fraction} must be in (0, 1)")
    items = interactions["item_id"].cast(pl.String).unique().sort().to_numpy()
    n_cold = round(fraction * len(items))
    if n_cold == 0 or n_cold == len(items):
        raise ValueError(f"holding out {fraction} of {len(items)} items leaves no cold or no training items")
    cold = pl.Series("item_id", np.random.default_rng(seed).permutation(items)[:n_cold], dtype=pl.String)
    is_cold = pl.col("item_id").cast(pl.String).is_in(cold.implode())
    return interactions.filter(~is_cold), interactions.filter(is_cold)


def write_split(train: pl.DataFrame, holdout: pl.DataFrame, folder: Path) -> tuple[Path, Path]:
    """Write a split as `folder/interactions_train.parquet` and `folder/interactions_holdout.parquet`."""
    folder.mkdir(parents=True, exist_ok=True)
    train.write_parquet(folder / TRAIN_FILE)
    holdout.write_parquet(folder / HOLDOUT_FILE)
    return folder / TRAIN_FILE, folder / HOLDOUT_FILE
