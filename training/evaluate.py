"""Cold-start evaluation: do a user's history vectors retrieve the held-out items nobody trained on?

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
  Both are averaged over users; 95% CIs are percentile bootstraps over users. Native versus each
  baseline is a paired bootstrap: the same resampled users for both, CI of the mean difference.
- **Models**: native (the unified encoder), text_only and image_only (the same encoder trained and
  embedded with one modality dropped), stitched (separate text and image towers, late fusion, same
  parameter count: embed/stitched.py) are trained by one `train` call each on the same data, steps
  and config; stitched_pretrained (training/baselines.py) is frozen MiniLM + EfficientNet-Lite0;
  popularity and random need no training.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embed.items import Item
from embed.load import load_encoder
from training.baselines import BaselineUnavailable, PretrainedStitchedEncoder
from training.config import TrainConfig
from training.data import iter_items, read_catalog, read_interactions, restrict_modalities
from training.reindex import embed_items as embed_batch
from training.report import write_report
from training.synthetic import TRAIT_KINDS

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 50)
HALF_LIFE_DAYS = 7.0  # as service/servicer.py HALF_LIFE_MS
MODELS = ("native", "text_only", "image_only", "stitched", "stitched_pretrained", "popularity", "random")
# trained model -> (TrainConfig.modalities, EncoderConfig.architecture)
TRAINED = {"native": ("both", "unified"), "text_only": ("text", "unified"), "image_only": ("image", "unified"),
           "stitched": ("both", "stitched")}
_CHUNK_CELLS = 1 << 22  # users x items per dense score block: about 50 MB of scratch


@dataclass(frozen=True)
class EvalData:
    """The files of one evaluation; `holdout` None means "split it off with holdout_items"."""

    catalog: Path
    interactions: Path
    holdout: Path | None = None
    traits: Path | None = None  # synthetic ground truth, optional
    preferences: Path | None = None

    @classmethod
    def from_dir(cls, root: Path) -> EvalData:
        """The files of a dataset directory (`onetower synth` layout); optional ones may be absent."""
        def maybe(name: str) -> Path | None:
            return root / name if (root / name).is_file() else None
        return cls(root / "catalog.parquet", root / "interactions.parquet", maybe("interactions_holdout.parquet"),
                   maybe("traits.parquet"), maybe("preferences.parquet"))


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
    half_life_ms = half_life_days * 86_400_000
    events = (events.join(user_row, on="user_id", how="inner")
              .with_columns(age=pl.col("ts").max().over("user") - pl.col("ts"))
              .with_columns(w=pl.col("weight") * (0.5 ** (pl.col("age") / half_life_ms))).sort("user"))
    cold = cold.join(user_row, on="user_id", how="inner").sort("user")
    hist = (events["user"].to_numpy(), events["row"].to_numpy(), events["w"].to_numpy().astype(np.float64))
    return users, hist, (cold["user"].to_numpy(), cold["row"].to_numpy()), cold["item_id"].n_unique()


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
    query = np.zeros((n, vectors.shape[1]), dtype=np.float64)  # (users, dim)
    np.add.at(query, h_user[a:b] - lo, h_weight[a:b, None] * vectors[h_item[a:b]])
    norm = np.linalg.norm(query, axis=1, keepdims=True)
    query = np.divide(query, norm, out=np.zeros_like(query), where=norm > 0).astype(np.float32)
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


def embed_items(encoder_dir: Path, items: Sequence[Item], modalities: str = "both", device: str = "cpu",
                batch_size: int = 64) -> np.ndarray:
    """Vectors of `items` through `ItemEncoder` (the serving path); zero rows for items it cannot embed."""
    encoder = load_encoder(encoder_dir, device=device, batch_size=batch_size)
    row_of = {it.item_id: i for i, it in enumerate(items)}
    kept = restrict_modalities(items, modalities)
    out = np.zeros((len(items), encoder.dim), dtype=np.float32)
    embedded = 0
    for start in range(0, len(kept), batch_size):
        batch = kept[start: start + batch_size]
        vectors, errors = embed_batch(encoder, batch)  # the reindex job's path: refused items are left out
        rows = [row_of[it.item_id] for it, err in zip(batch, errors, strict=True) if not err]
        out[rows] = vectors
        embedded += len(rows)
    if embedded < len(items):
        logger.info("%d of %d items have no vector under modalities=%s", len(items) - embedded, len(items),
                    modalities)
    return out


def run_evaluation(data: Path | EvalData, out_dir: Path, config: TrainConfig, models: Sequence[str] = MODELS,
                   seeds: Sequence[int] = (0,), ks: Sequence[int] = DEFAULT_KS, n_bootstrap: int = 200,
                   holdout_items: float | None = None, preset: str | None = None, device: str = "cpu",
                   progress_bar: bool = False, log_to_mlflow: bool = False) -> dict[str, Any]:
    """Train what `models` need, embed the catalog, score the cold-start protocol; write metrics, report, plots.

    Every trained model (native, text_only, image_only, stitched) is `train` with `config` (same data and
    steps), differing only in `modalities` or `architecture`; training runs log to the active MLflow
    tracking URI. A baseline whose optional packages are missing (stitched_pretrained) is reported as
    `{"skipped": reason}` instead of failing the run.

    Args:
        data: a dataset directory (`onetower synth` layout) or the files.
        holdout_items: hold out this fraction of the interacted items as cold (for data without a
            holdout file); the split goes to `out_dir/split/`.
        seeds: one training (and random-baseline) seed per run; per-user metrics are averaged over seeds.
        log_to_mlflow: also log every model's metrics and the report files as an MLflow run `evaluate-<preset>`.

    Returns:
        What `out_dir/metrics.json` holds: {"preset", "seeds", "ks", "models": {name: {"recall@20",
        "recall@20_ci", "ndcg@20", ..., "groups": {...}}}, "paired": {baseline: {"recall@20_diff",
        "recall@20_diff_ci", ...}}, ...}, plus "files" written.
    """
    data = EvalData.from_dir(Path(data)) if not isinstance(data, EvalData) else data
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise ValueError(f"models={list(models)}: choose among {list(MODELS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, train_frame, holdout_frame = _train_holdout(data, out_dir, holdout_items, seeds[0])
    items = list(iter_items(read_catalog(data.catalog), data.catalog.parent))
    item_ids = [it.item_id for it in items]
    groups = preference_groups(pl.read_parquet(data.preferences)) if data.preferences is not None else None
    runs: dict[str, list[UserMetrics]] = {name: [] for name in models}
    info: dict[str, dict[str, Any]] = {name: {"seconds": 0.0} for name in models}
    native: np.ndarray | None = None
    for seed in seeds:
        for name in models:
            if "skipped" in info[name]:
                continue
            started = time.perf_counter()
            try:
                vectors, extra = _model_vectors(name, seed, data.catalog, train_path, train_frame, items, out_dir,
                                                config, device, progress_bar)
            except BaselineUnavailable as e:
                logger.warning("%s skipped: %s", name, e)
                info[name] = {"skipped": str(e)}
                continue
            runs[name].append(user_metrics(vectors, item_ids, train_frame, holdout_frame, ks))
            info[name]["seconds"] += time.perf_counter() - started
            info[name].update(extra)
            if native is None and name == "native":
                native = vectors
            logger.info("%s (seed %d): recall@%d %.4f", name, seed, max(ks),
                        float(runs[name][-1].values[f"recall@{max(ks)}"].mean()))
    scored = [name for name in models if runs[name]]
    results = {name: {**_combine(runs[name], n_bootstrap, seeds[0], groups), **_rounded(info[name])}
               if runs[name] else info[name] for name in models}
    first = runs[scored[0]][0] if scored else user_metrics(np.zeros((len(items), 1)), item_ids, train_frame,
                                                           holdout_frame, ks)
    metrics: dict[str, Any] = {
        "preset": preset or config.encoder, "seeds": list(seeds), "ks": sorted(set(ks)),
        "n_users": len(first.user_ids), "n_items": first.n_items, "n_cold_items": first.n_cold_items,
        "protocol": {"history": f"event weight x 0.5 ** (age / {HALF_LIFE_DAYS} days), L2-normalised",
                     "candidates": "whole catalog minus the user's training history",
                     "targets": "the user's cold items", "ci": f"95% percentile bootstrap over users ({n_bootstrap} resamples): "
                           "user sampling only, not training-seed variance (see seed_std with several seeds)",
                     "paired": "native minus baseline, per user (means over seeds), the same bootstrap resamples "
                               "of users for both"},
        "config": asdict(config), "models": results,
        "paired": {name: paired_bootstrap(_seed_mean(runs["native"]), _seed_mean(runs[name]), n_bootstrap,
                                          seeds[0]) for name in scored if name != "native" and "native" in scored}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    cold = set(holdout_frame["item_id"].cast(pl.String).to_list()) - set(train_frame["item_id"].cast(pl.String).to_list())
    metrics["files"] = [str(p) for p in write_report(metrics, out_dir, native, items, _item_labels(data, items),
                                                     [it.item_id for it in items if it.item_id in cold])]
    if log_to_mlflow:
        _log_report(metrics, out_dir, config.experiment)
    return metrics


def _rounded(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in info.items()}


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


def _seed_mean(runs: Sequence[UserMetrics]) -> dict[str, np.ndarray]:
    return {k: np.mean([r.values[k] for r in runs], axis=0) for k in runs[0].values}


def _log_report(metrics: Mapping[str, Any], out_dir: Path, experiment: str) -> None:
    """An MLflow run `evaluate-<preset>` in `experiment` with every model's Recall@K/NDCG@K and the report files
    as artifacts. The experiment is named, not taken from MLflow's process-wide "active experiment", which
    may belong to another tracking store."""
    import mlflow

    from training.register import ensure_experiment

    with mlflow.start_run(run_name=f"evaluate-{metrics['preset']}", experiment_id=ensure_experiment(experiment)) as run:
        mlflow.log_params({"preset": metrics["preset"], "seeds": ",".join(map(str, metrics["seeds"])),
                           "n_users": metrics["n_users"], "n_cold_items": metrics["n_cold_items"]})
        mlflow.log_metrics({f"{model}.{k.replace('@', '_at_')}": float(v) for model, row in metrics["models"].items()
                            for k, v in row.items() if k.startswith(("recall@", "ndcg@")) and not k.endswith("_ci")})
        for path in metrics["files"]:
            mlflow.log_artifact(path, artifact_path="report")
        mlflow.log_artifact(str(out_dir / "metrics.json"), artifact_path="report")
        logger.info("logged the report to MLflow run %s", run.info.run_id)


def _train_holdout(data: EvalData, out_dir: Path, holdout_items: float | None, seed: int
                   ) -> tuple[Path, pl.DataFrame, pl.DataFrame]:
    """The training interactions' path and frame, and the holdout frame (split off when asked)."""
    if holdout_items is None:
        if data.holdout is None:
            raise ValueError(f"no holdout interactions beside {data.interactions}: pass holdout_items "
                             "(a fraction of items to hold out as cold)")
        return data.interactions, read_interactions(data.interactions), read_interactions(data.holdout)
    if data.holdout is not None:
        raise ValueError(f"{data.holdout} already holds out cold items; holdout_items={holdout_items} would "
                         "hold out more: pass one or the other")
    train_frame, holdout_frame = split_holdout_items(read_interactions(data.interactions), holdout_items, seed)
    split = out_dir / "split"
    split.mkdir(exist_ok=True)
    train_frame.write_parquet(split / "interactions_train.parquet")
    holdout_frame.write_parquet(split / "interactions_holdout.parquet")
    return split / "interactions_train.parquet", train_frame, holdout_frame


def _model_vectors(name: str, seed: int, catalog: Path, train_path: Path, train_frame: pl.DataFrame,
                   items: Sequence[Item], out_dir: Path, config: TrainConfig, device: str,
                   progress_bar: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Item vectors of one model (trained and embedded, or a baseline's) and facts about it (parameters)."""
    if name in TRAINED:
        modalities, architecture = TRAINED[name]
        cfg = config.replace(seed=seed, modalities=modalities,
                             encoder_overrides={**config.encoder_overrides, "architecture": architecture})
        from training.train import train  # Lightning: only when a model is trained

        result = train(catalog, train_path, out_dir / "models" / f"{name}-seed{seed}", cfg, progress_bar)
        encoder = load_encoder(result.encoder_dir)
        n_params = sum(p.numel() for p in encoder.model.parameters())
        return embed_items(result.encoder_dir, items, modalities, device), {"parameters": n_params}
    if name == "stitched_pretrained":
        return _pretrained_vectors(items, device)
    if name == "popularity":  # one dimension: the score is the training event count; unseen items get 0
        counts = dict(train_frame.group_by(pl.col("item_id").cast(pl.String)).len().iter_rows())
        return np.asarray([[counts.get(it.item_id, 0)] for it in items], dtype=np.float32), {}
    vectors = np.random.default_rng([seed, 1]).standard_normal((len(items), config.encoder_config().embed_dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), {}


# frozen models: one embedding pass serves every seed of a run
_PRETRAINED: dict[tuple[str, ...], tuple[np.ndarray, dict[str, Any]]] = {}


def _pretrained_vectors(items: Sequence[Item], device: str) -> tuple[np.ndarray, dict[str, Any]]:
    key = tuple(it.content_hash() for it in items)
    if key not in _PRETRAINED:
        encoder = PretrainedStitchedEncoder(device=device)
        n_params = (sum(p.numel() for p in encoder.image.model.parameters())
                    + sum(v.numel() for k, v in encoder.text.w.items() if k != "embeddings.position_ids"))
        _PRETRAINED.clear()
        _PRETRAINED[key] = (encoder.fit_encode(items),
                            {"parameters": n_params, "fusion": "concat of centred, L2-normalised parts"})
    return _PRETRAINED[key]


def _combine(runs: list[UserMetrics], n_bootstrap: int, seed: int, groups: Mapping[str, str] | None
             ) -> dict[str, Any]:
    """One model's summary: per-user values averaged over seeds, then bootstrapped over users."""
    mean = _seed_mean(runs)
    out = summarize(UserMetrics(runs[0].user_ids, mean, runs[0].n_items, runs[0].n_retrievable,
                                runs[0].n_cold_items), n_bootstrap, seed, groups)
    if len(runs) > 1:
        out["seed_std"] = {k: float(np.std([r.values[k].mean() for r in runs], ddof=1)) for k in mean}
    return out


def _item_labels(data: EvalData, items: Sequence[Item]) -> dict[str, list[str]]:
    """Per-item labels for the plots: "category" (ground truth or the `category` attribute) and, from
    synthetic ground truth, the image-only trait "colour"; absent where unknown."""
    if data.traits is not None:
        traits = pl.read_parquet(data.traits)
        out: dict[str, list[str]] = {}
        for column in ("category", "colour"):
            if column in traits.columns:
                value = dict(zip(traits["item_id"].to_list(), traits[column].to_list(), strict=True))
                out[column] = [str(value.get(it.item_id, "unknown")) for it in items]
        return out
    labels = [it.attributes.get("category") for it in items]
    return {"category": [lab or "unknown" for lab in labels]} if any(labels) else {}
