"""Cold-start metrics: do a user's history vectors retrieve the held-out items nobody trained on?

Pure functions over vectors and interaction frames (no models, no files); `run.py` trains and embeds.

Protocol (DESIGN.md section 3, "Evaluation"):

- **Cold items**: items with holdout events that never occur in the training interactions. Holdout
  events on items that do occur in training are not cold and are ignored.
- **Test users**: users with >= 1 holdout event on a cold catalog item and >= 1 training event on a
  catalog item. The set depends on the data alone, so every model is scored on the same users.
- **History vector**: the rule of the service's `RecommendForUser`: the mean of the vectors of the
  user's training events, each weighted by its event weight x 0.5 ** (age / half-life), the age
  measured in time from the user's newest training event (half-life 7 days); then L2-normalised.
- **Retrieval**: inner product over the whole catalog minus the user's training-history items. An
  item whose vector is all zeros has no representation under the model (a unimodal baseline's item
  that lacks the modality, popularity's never-seen items) and is never retrieved; a user whose
  history vector is zero gets nothing (misses). Ties are broken arbitrarily.
- **Metrics**: targets are the user's distinct cold items. Recall@K = hits in the top K / targets;
  NDCG@K has binary gains, 1/log2(rank + 1) discounts and the ideal of min(K, targets) hits first.
  Both are averaged over users; 95% CIs are percentile bootstraps over users. A model versus each
  rival is a paired bootstrap: the same resampled users for both, CI of the mean difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from training.data.synthetic import TRAIT_KINDS

DEFAULT_KS = (10, 20, 50)
HALF_LIFE_DAYS = 7.0  # as service/servicer.py HALF_LIFE_MS
_CHUNK_CELLS = 1 << 22  # users x items per dense score block: about 50 MB of scratch


def protocol_summary(n_bootstrap: int, reference: str = "native") -> dict[str, str]:
    """The protocol in words, as `metrics.json` records it beside the numbers."""
    return {"history": f"event weight x 0.5 ** (age / {HALF_LIFE_DAYS} days), L2-normalised",
            "candidates": "whole catalog minus the user's training history",
            "targets": "the user's cold items",
            "ci": f"95% percentile bootstrap over users ({n_bootstrap} resamples): user sampling only, not "
                  "training-seed variance (see seed_std with several seeds)",
            "paired": f"{reference} minus each other model, per user (means over seeds), the same bootstrap "
                      "resamples of users for both"}


@dataclass(frozen=True)
class UserMetrics:
    """Per-user metric values over the test users (same order in every array)."""

    user_ids: list[str]
    values: dict[str, np.ndarray]  # "recall@20" -> float64 [n_users]
    n_items: int
    n_retrievable: int
    n_cold_items: int


def evaluate_embeddings(vectors: np.ndarray, item_ids: Sequence[str], train_interactions: pl.DataFrame,
                        holdout_interactions: pl.DataFrame, ks: Sequence[int] = DEFAULT_KS, n_bootstrap: int = 200,
                        seed: int = 0, user_groups: Mapping[str, str] | None = None,
                        half_life_days: float = HALF_LIFE_DAYS) -> dict[str, Any]:
    """Recall@K and NDCG@K (with bootstrap 95% CIs) of cold items under the protocol in the module docstring.

    Args:
        vectors: float [n_items, dim], row i is `item_ids[i]`; all-zero rows are never retrieved.
        train_interactions, holdout_interactions: `user_id`, `item_id`, optional `ts` and `weight`.
        user_groups: user_id -> group name (e.g. `preference_groups`); adds per-group metrics.

    Returns:
        {"n_users", "n_items", "n_retrievable", "n_cold_items", "recall@K", "recall@K_ci", "ndcg@K",
        "ndcg@K_ci", ..., "groups": {name: {"n_users", "recall@K", ...}}}
    """
    per_user = user_metrics(vectors, item_ids, train_interactions, holdout_interactions, ks, half_life_days)
    return summarize(per_user, n_bootstrap, seed, user_groups)


def user_metrics(vectors: np.ndarray, item_ids: Sequence[str], train_interactions: pl.DataFrame,
                 holdout_interactions: pl.DataFrame, ks: Sequence[int] = DEFAULT_KS,
                 half_life_days: float = HALF_LIFE_DAYS) -> UserMetrics:
    """Recall@K and NDCG@K of every test user (see `evaluate_embeddings`)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(item_ids):
        raise ValueError(f"vectors has shape {vectors.shape}; expected ({len(item_ids)}, dim), one row per item id")
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks={list(ks)} must be positive cut-offs")
    if half_life_days <= 0:
        raise ValueError(f"half_life_days={half_life_days} must be positive")
    users, hist, targets, n_cold = _protocol(item_ids, train_interactions, holdout_interactions, half_life_days)
    retrievable = np.abs(vectors).sum(axis=1) > 0
    k_max = min(max(ks), len(item_ids))
    hits = np.zeros((len(users), k_max), dtype=bool)
    n_targets = np.bincount(targets[0], minlength=len(users)).astype(np.float64)
    chunk = max(1, _CHUNK_CELLS // max(1, len(item_ids)))
    for lo in range(0, len(users), chunk):
        hi = min(len(users), lo + chunk)
        hits[lo:hi] = _chunk_hits(vectors, retrievable, hist, targets, lo, hi, k_max)
    values: dict[str, np.ndarray] = {}
    discount = 1.0 / np.log2(np.arange(k_max) + 2.0)
    ideal = np.cumsum(discount)
    for k in sorted(set(ks)):
        top = hits[:, : min(k, k_max)]
        values[f"recall@{k}"] = top.sum(axis=1) / n_targets
        best = ideal[np.minimum(n_targets, min(k, k_max)).astype(np.int64) - 1]
        values[f"ndcg@{k}"] = (top * discount[: top.shape[1]]).sum(axis=1) / best
    return UserMetrics(users, values, len(item_ids), int(retrievable.sum()), n_cold)


def _protocol(item_ids: Sequence[str], train: pl.DataFrame, holdout: pl.DataFrame, half_life_days: float
              ) -> tuple[list[str], tuple[np.ndarray, ...], tuple[np.ndarray, np.ndarray], int]:
    """Test users; their history events (user row, item row, weight); their cold targets (user row, item row)."""
    rows = pl.DataFrame({"item_id": list(item_ids), "row": np.arange(len(item_ids))},
                        schema={"item_id": pl.String, "row": pl.Int64})
    if rows["item_id"].is_duplicated().any():
        raise ValueError("item_ids must be unique")
    events = _events(train).join(rows, on="item_id", how="inner")
    trained = train.select(pl.col("item_id").cast(pl.String)).unique()
    cold = (holdout.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
            .join(trained, on="item_id", how="anti").join(rows, on="item_id", how="inner").unique())
    users = sorted(set(cold["user_id"].to_list()) & set(events["user_id"].to_list()))
    user_row = pl.DataFrame({"user_id": users, "user": np.arange(len(users))},
                            schema={"user_id": pl.String, "user": pl.Int64})
    events = _recency_weighted(events.join(user_row, on="user_id", how="inner"), half_life_days).sort("user")
    cold = cold.join(user_row, on="user_id", how="inner").sort("user")
    hist = (events["user"].to_numpy(), events["row"].to_numpy(), events["w"].to_numpy().astype(np.float64))
    return users, hist, (cold["user"].to_numpy(), cold["row"].to_numpy()), cold["item_id"].n_unique()


def _recency_weighted(events: pl.DataFrame, half_life_days: float) -> pl.DataFrame:
    """Adds `w`: the event's weight x 0.5 ** (age / half-life), the age from the user's newest event."""
    half_life_ms = half_life_days * 86_400_000
    return (events.with_columns(age=pl.col("ts").max().over("user_id") - pl.col("ts"))
            .with_columns(w=pl.col("weight") * (0.5 ** (pl.col("age") / half_life_ms))))


def user_vectors(vectors: np.ndarray, item_ids: Sequence[str], interactions: pl.DataFrame,
                 half_life_days: float = HALF_LIFE_DAYS) -> dict[str, np.ndarray]:
    """The query vector the protocol scores for each user of `interactions` (items not in `item_ids`
    skipped; users with none left out): what `RecommendForUser` must serve for the same history."""
    rows = pl.DataFrame({"item_id": list(item_ids), "row": np.arange(len(item_ids))},
                        schema={"item_id": pl.String, "row": pl.Int64})
    events = _recency_weighted(_events(interactions).join(rows, on="item_id", how="inner"), half_life_days)
    users = sorted(set(events["user_id"].to_list()))
    events = events.join(pl.DataFrame({"user_id": users, "user": np.arange(len(users))},
                                      schema={"user_id": pl.String, "user": pl.Int64}), on="user_id")
    query = _query(vectors, events["user"].to_numpy(), events["row"].to_numpy(),
                   events["w"].to_numpy().astype(np.float64), len(users))
    return {u: query[i] for i, u in enumerate(users)}


def _query(vectors: np.ndarray, user: np.ndarray, row: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """Per user 0..n-1, the L2-normalised weighted sum of its history's vectors (zeros when it sums to 0)."""
    query = np.zeros((n, vectors.shape[1]), dtype=np.float64)  # (users, dim)
    np.add.at(query, user, weight[:, None] * vectors[row])
    norm = np.linalg.norm(query, axis=1, keepdims=True)
    return np.divide(query, norm, out=np.zeros_like(query), where=norm > 0).astype(np.float32)


def _events(frame: pl.DataFrame) -> pl.DataFrame:
    """user_id, item_id, ts (float ms; datetimes by epoch, numbers taken as ms), weight (default 1)."""
    ts: pl.Expr = pl.lit(0.0)
    if "ts" in frame.columns:
        dtype = frame.schema["ts"]
        ts = pl.col("ts").dt.epoch("ms") if dtype.is_temporal() else pl.col("ts")
        ts = ts.cast(pl.Float64)
    weight = pl.col("weight").cast(pl.Float64).fill_null(1.0) if "weight" in frame.columns else pl.lit(1.0)
    return frame.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String),
                        ts.alias("ts"), weight.alias("weight")).with_columns(pl.col("ts").fill_null(pl.col("ts").max()))


def _chunk_hits(vectors: np.ndarray, retrievable: np.ndarray, hist: tuple[np.ndarray, ...],
                targets: tuple[np.ndarray, np.ndarray], lo: int, hi: int, k_max: int) -> np.ndarray:
    """Hits (bool [hi - lo, k_max]) of users lo..hi: is the item at each rank a cold target?"""
    h_user, h_item, h_weight = hist
    a, b = np.searchsorted(h_user, [lo, hi])
    n = hi - lo
    query = _query(vectors, h_user[a:b] - lo, h_item[a:b], h_weight[a:b], n)
    norm = np.linalg.norm(query, axis=1, keepdims=True)
    scores = query @ vectors.T  # (users, items)
    scores[:, ~retrievable] = -np.inf
    scores[h_user[a:b] - lo, h_item[a:b]] = -np.inf  # the user's history is never recommended
    top = np.argpartition(-scores, k_max - 1, axis=1)[:, :k_max] if k_max < scores.shape[1] \
        else np.tile(np.arange(scores.shape[1]), (n, 1))
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    t_user, t_item = targets
    c, d = np.searchsorted(t_user, [lo, hi])
    is_target = np.zeros(scores.shape, dtype=bool)
    is_target[t_user[c:d] - lo, t_item[c:d]] = True
    hits = np.take_along_axis(is_target, top, 1) & np.isfinite(np.take_along_axis(scores, top, 1))
    hits[norm[:, 0] == 0] = False  # nothing in the history is representable: no recommendations
    return hits


def summarize(metrics: UserMetrics, n_bootstrap: int = 200, seed: int = 0,
              user_groups: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Means with percentile-bootstrap 95% CIs over users, overall and per group of `user_groups`."""
    out: dict[str, Any] = {"n_items": metrics.n_items, "n_retrievable": metrics.n_retrievable,
                           "n_cold_items": metrics.n_cold_items}
    out.update(_bootstrap(metrics.values, np.arange(len(metrics.user_ids)), n_bootstrap, seed))
    if user_groups is not None:
        names = np.asarray([user_groups.get(u, "unknown") for u in metrics.user_ids], dtype=object)
        out["groups"] = {g: _bootstrap(metrics.values, np.flatnonzero(names == g), n_bootstrap, seed)
                         for g in sorted(set(names.tolist()))}
    return out


def _bootstrap(values: Mapping[str, np.ndarray], rows: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n_users": len(rows)}
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(rows), len(rows)) for _ in range(n_bootstrap)] if len(rows) else []
    for name, per_user in values.items():
        sample = per_user[rows]
        out[name] = float(sample.mean()) if len(rows) else float("nan")
        means = np.asarray([sample[d].mean() for d in draws])
        out[f"{name}_ci"] = ([float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
                             if len(means) else [out[name], out[name]])
    return out


def preference_groups(preferences: pl.DataFrame) -> dict[str, str]:
    """Group synthetic users by the image-side trait of their preferred conjunctions (preferences.parquet).

    "image_trait": every conjunction pairs an image-only trait (colour, pattern, shape) with a text trait;
    "shared_trait": every one uses the category, which shows in both image and text; "mixed": some of each.
    """
    kinds = (preferences.select(pl.col("user_id").cast(pl.String),
                                pl.col("trait_a").replace_strict(TRAIT_KINDS, default="unknown").alias("kind"))
             .group_by("user_id").agg(pl.col("kind").unique()))
    names = {("image",): "image_trait", ("shared",): "shared_trait"}
    return {u: names.get(tuple(sorted(k)), "mixed") for u, k in kinds.iter_rows()}


def paired_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_bootstrap: int = 200,
                     seed: int = 0) -> dict[str, Any]:
    """Mean per-user difference a - b of every metric with a 95% CI from resampling users (the same draws
    for a and b), and the share of resamples in which a is ahead."""
    out: dict[str, Any] = {}
    for name in a:
        diff = a[name] - b[name]  # (users,)
        rng = np.random.default_rng(seed)
        means = np.asarray([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_bootstrap)]) \
            if len(diff) else np.zeros(0)
        out[f"{name}_diff"] = float(diff.mean()) if len(diff) else float("nan")
        out[f"{name}_diff_ci"] = ([float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
                                  if len(means) else [out[f"{name}_diff"]] * 2)
        out[f"{name}_ahead"] = float((means > 0).mean()) if len(means) else float("nan")
    return out


def seed_mean(runs: Sequence[UserMetrics]) -> dict[str, np.ndarray]:
    return {k: np.mean([r.values[k] for r in runs], axis=0) for k in runs[0].values}


def combine(runs: list[UserMetrics], n_bootstrap: int, seed: int, groups: Mapping[str, str] | None
             ) -> dict[str, Any]:
    """One model's summary: per-user values averaged over seeds, then bootstrapped over users."""
    mean = seed_mean(runs)
    out = summarize(UserMetrics(runs[0].user_ids, mean, runs[0].n_items, runs[0].n_retrievable,
                                runs[0].n_cold_items), n_bootstrap, seed, groups)
    if len(runs) > 1:
        out["seed_std"] = {k: float(np.std([r.values[k].mean() for r in runs], ddof=1)) for k in mean}
    return out


