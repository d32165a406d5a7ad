"""`onetower evaluate`'s runner: train the rivals on the same data and steps, embed the catalog, score, report.

Models: native (the unified encoder), text_only and image_only (the same encoder trained and embedded
with one modality dropped), stitched (separate text and image towers, late fusion, same parameter
count: embed/stitched.py) are trained by one `train` call each on the same data, steps and config;
stitched_pretrained (training/evaluation/baselines.py) is frozen MiniLM + EfficientNet-Lite0;
popularity and random need no training. The protocol and metrics are in `metrics.py`.
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

from embed.errors import PretrainedUnavailable
from embed.items import Item
from embed.load import load_encoder, load_model
from embed.pretrained import PretrainedNativeEncoder
from embed.twin import StitchedTwinEncoder
from training.data.catalog import iter_items, read_catalog, read_interactions, restrict_modalities
from training.data.embedding import embed_batch
from training.evaluation.baselines import BaselineUnavailable, frozen_baseline_vectors
from training.evaluation.metrics import (
    DEFAULT_KS,
    UserMetrics,
    combine,
    paired_bootstrap,
    preference_groups,
    protocol_summary,
    seed_mean,
    user_metrics,
)
from training.evaluation.oracles import oracle_vectors
from training.evaluation.report import write_report
from training.evaluation.split import split_holdout_items, write_split
from training.fitting.config import TrainConfig
from training.fitting.pretrained import FeatureCache, encode_cached

logger = logging.getLogger(__name__)

MODELS = ("native", "native_pretrained", "text_only", "image_only", "stitched", "stitched_twin", "stitched_twin_mlp",
          "stitched_pretrained_adapter", "stitched_pretrained", "popularity", "random")
ORACLES = ("additive", "conjunction")
REFERENCES = ("native_pretrained", "native")  # the first evaluated is `paired_reference`
# trained model -> (TrainConfig.modalities, EncoderConfig.architecture)
TRAINED = {"native": ("both", "unified"), "text_only": ("text", "unified"), "image_only": ("image", "unified"),
           "stitched": ("both", "stitched")}
# trained over the frozen MiniLM + EfficientNet-Lite0 features (the `pretrained` size, the config's embed_dim):
# native early fusion, and the stitched twin with a linear head (additive late fusion), with an MLP head
# (non-additive late fusion), and with no tower blocks (a linear adapter over the pooled frozen features)
PRETRAINED_TRAINED: dict[str, dict[str, Any]] = {
    "native_pretrained": {"architecture": "native_pretrained"},
    "stitched_twin": {"architecture": "stitched_twin", "twin_head": "linear"},
    "stitched_twin_mlp": {"architecture": "stitched_twin", "twin_head": "mlp"},
    "stitched_pretrained_adapter": {"architecture": "stitched_twin", "twin_head": "linear", "depth": 0, "pool": "mean"},
}


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


def embed_catalog(encoder_dir: Path, items: Sequence[Item], modalities: str = "both", device: str = "cpu",
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
                   progress_bar: bool = False, recipe: Recipe | None = None) -> dict[str, Any]:
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
        recipe: how the native encoders train (curriculum, mixture of experts); default stage 3, dense.

    Returns:
        What `out_dir/metrics.json` holds: {"preset", "seeds", "ks", "models": {name: {"recall@20",
        "recall@20_ci", "ndcg@20", ..., "groups": {...}}}, "paired": {baseline: {"recall@20_diff",
        "recall@20_diff_ci", ...}}, "split": {"catalog", "train", "holdout"} (the files scored), ...}, plus
        "files" written.
    """
    data = EvalData.from_dir(Path(data)) if not isinstance(data, EvalData) else data
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise ValueError(f"models={list(models)}: choose among {list(MODELS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out_dir.mkdir(parents=True, exist_ok=True)
    split = _train_holdout(data, out_dir, holdout_items, seeds[0])
    items = list(iter_items(read_catalog(data.catalog), data.catalog.parent))
    groups = preference_groups(pl.read_parquet(data.preferences)) if data.preferences is not None else None
    recipe = recipe or Recipe()
    runs, info, native = _score_models(data, split, items, out_dir, config, models, seeds, ks, device, progress_bar,
                                       recipe)
    metrics = _summary(runs, info, groups, items, split, config, seeds, ks, n_bootstrap, preset)
    metrics["recipe"] = asdict(recipe)
    metrics["split"] = {"catalog": str(data.catalog), "train": str(split.train_path), "holdout": str(split.holdout_path)}
    metrics["oracles"] = _oracles(data, items, split, ks, n_bootstrap, seeds[0], groups)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    train_ids = set(split.train["item_id"].cast(pl.String).to_list())
    cold = set(split.holdout["item_id"].cast(pl.String).to_list()) - train_ids
    metrics["files"] = [str(p) for p in write_report(metrics, out_dir, native, items, _item_labels(data, items),
                                                     [it.item_id for it in items if it.item_id in cold])]
    return metrics


@dataclass(frozen=True)
class Recipe:
    """How the native encoders train, for measuring what the seeds' other parts are worth.

    `curriculum`: the from-scratch native encoder runs stages 1 and 2 (masked tokens and patches; image-text
    alignment) before stage 3, each stage `config.steps_for` steps (the pretrained one starts pretrained).
    `moe_experts` > 0: native and native_pretrained get a modality-aware mixture of experts in every block.
    """

    curriculum: bool = False
    moe_experts: int = 0

    def apply(self, model: str, config: TrainConfig) -> TrainConfig:
        """`config` for `model` under this recipe."""
        if self.moe_experts and model in ("native", "native_pretrained"):
            return config.replace(encoder_overrides={**config.encoder_overrides, "moe_experts": self.moe_experts})
        return config


@dataclass(frozen=True)
class _Split:
    """The training interactions (file and frame) and the holdout (file and frame) of one evaluation."""

    train_path: Path
    train: pl.DataFrame
    holdout: pl.DataFrame
    holdout_path: Path


def _score_models(data: EvalData, split: _Split, items: Sequence[Item], out_dir: Path, config: TrainConfig,
                  models: Sequence[str], seeds: Sequence[int], ks: Sequence[int], device: str, progress_bar: bool,
                  recipe: Recipe) -> tuple[dict[str, list[UserMetrics]], dict[str, dict[str, Any]], np.ndarray | None]:
    """Per-user metrics of every model and seed; facts about each model (seconds, parameters, or skipped);
    the native model's first vectors (for the plots)."""
    item_ids = [it.item_id for it in items]
    runs: dict[str, list[UserMetrics]] = {name: [] for name in models}
    info: dict[str, dict[str, Any]] = {name: {"seconds": 0.0} for name in models}
    native: np.ndarray | None = None
    for seed in seeds:
        for name in models:
            if "skipped" in info[name]:
                continue
            started = time.perf_counter()
            try:
                vectors, extra = _model_vectors(name, seed, data.catalog, split.train_path, split.train, items,
                                                out_dir, recipe.apply(name, config), device, progress_bar,
                                                recipe.curriculum and name == "native")
            except (BaselineUnavailable, PretrainedUnavailable) as e:
                logger.warning("%s skipped: %s", name, e)
                info[name] = {"skipped": str(e)}
                continue
            except ValueError as e:  # e.g. image_only on a catalog without images: no pairs to learn from
                logger.warning("%s cannot apply to this data, skipped: %s", name, e, exc_info=logger.isEnabledFor(10))
                info[name] = {"skipped": f"cannot apply to this data: {e}"}
                continue
            runs[name].append(user_metrics(vectors, item_ids, split.train, split.holdout, ks))
            info[name]["seconds"] += time.perf_counter() - started
            info[name].update(extra)
            if native is None and name == reference_model(models):
                native = vectors
            logger.info("%s (seed %d): recall@%d %.4f", name, seed, max(ks),
                        float(runs[name][-1].values[f"recall@{max(ks)}"].mean()))
    return runs, info, native


def _summary(runs: Mapping[str, list[UserMetrics]], info: Mapping[str, dict[str, Any]],
             groups: Mapping[str, str] | None, items: Sequence[Item], split: _Split, config: TrainConfig,
             seeds: Sequence[int], ks: Sequence[int], n_bootstrap: int, preset: str | None) -> dict[str, Any]:
    """What metrics.json holds: every model's summary, and the reference model minus each other one, paired."""
    scored = [name for name in runs if runs[name]]
    reference = reference_model(scored)
    results = {name: {**combine(runs[name], n_bootstrap, seeds[0], groups), **_rounded(info[name])}
               if runs[name] else info[name] for name in runs}
    first = runs[scored[0]][0] if scored else user_metrics(np.zeros((len(items), 1)), [it.item_id for it in items],
                                                           split.train, split.holdout, ks)
    paired = {name: paired_bootstrap(seed_mean(runs[reference]), seed_mean(runs[name]), n_bootstrap, seeds[0])
              for name in scored if reference is not None and name != reference}
    return {"preset": preset or config.encoder, "seeds": list(seeds), "ks": sorted(set(ks)),
            "n_users": len(first.user_ids), "n_items": first.n_items, "n_cold_items": first.n_cold_items,
            "protocol": protocol_summary(n_bootstrap, reference or "native"), "config": asdict(config),
            "models": results, "paired_reference": reference, "paired": paired}


def _oracles(data: EvalData, items: Sequence[Item], split: _Split, ks: Sequence[int], n_bootstrap: int, seed: int,
             groups: Mapping[str, str] | None) -> dict[str, Any]:
    """The data's ceilings: the protocol scored with item vectors built from the true traits (`oracles.py`)."""
    if data.traits is None:
        reason = "the catalog has no true traits (traits.parquet): only synthetic data does"
        return {name: {"skipped": reason} for name in ORACLES}
    vectors = oracle_vectors(pl.read_parquet(data.traits), [it.item_id for it in items])
    return {name: combine([user_metrics(vectors[name], [it.item_id for it in items], split.train, split.holdout, ks)],
                          n_bootstrap, seed, groups) for name in ORACLES}


def reference_model(models: Sequence[str]) -> str | None:
    """The model the paired differences are taken from: native_pretrained when evaluated, else native."""
    return next((m for m in REFERENCES if m in models), None)


def _rounded(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in info.items()}


def _train_holdout(data: EvalData, out_dir: Path, holdout_items: float | None, seed: int) -> _Split:
    """The training interactions' path and frame, and the holdout frame (split off when asked)."""
    if holdout_items is None:
        if data.holdout is None:
            raise ValueError(f"no holdout interactions beside {data.interactions}: pass holdout_items "
                             "(a fraction of items to hold out as cold)")
        return _Split(data.interactions, read_interactions(data.interactions), read_interactions(data.holdout),
                      data.holdout)
    if data.holdout is not None:
        raise ValueError(f"{data.holdout} already holds out cold items; holdout_items={holdout_items} would "
                         "hold out more: pass one or the other")
    train_frame, holdout_frame = split_holdout_items(read_interactions(data.interactions), holdout_items, seed)
    train_path, holdout_path = write_split(train_frame, holdout_frame, out_dir / "split")
    return _Split(train_path, train_frame, holdout_frame, holdout_path)


def _model_vectors(name: str, seed: int, catalog: Path, train_path: Path, train_frame: pl.DataFrame,
                   items: Sequence[Item], out_dir: Path, config: TrainConfig, device: str,
                   progress_bar: bool, curriculum: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Item vectors of one model (trained and embedded, or a baseline's) and facts about it (parameters)."""
    if name in TRAINED:
        modalities, architecture = TRAINED[name]
        cfg = config.replace(seed=seed, modalities=modalities,
                             encoder_overrides={**config.encoder_overrides, "architecture": architecture})
        from training.fitting.curriculum import run_stages  # Lightning: only when a model is trained
        from training.fitting.train import train

        model_dir = out_dir / "models" / f"{name}-seed{seed}"
        result = (run_stages(catalog, train_path, model_dir, cfg, progress_bar=progress_bar) if curriculum
                  else train(catalog, train_path, model_dir, cfg, progress_bar))
        encoder = load_encoder(result.encoder_dir)
        n_params = sum(p.numel() for p in encoder.model.parameters())
        return embed_catalog(result.encoder_dir, items, modalities, device), {"parameters": n_params}
    if name in PRETRAINED_TRAINED:
        return _trained_pretrained_vectors(name, seed, catalog, train_path, items, out_dir, config, progress_bar)
    if name == "stitched_pretrained":
        return frozen_baseline_vectors(items, device)
    if name == "popularity":  # one dimension: the score is the training event count; unseen items get 0
        counts = dict(train_frame.group_by(pl.col("item_id").cast(pl.String)).len().iter_rows())
        return np.asarray([[counts.get(it.item_id, 0)] for it in items], dtype=np.float32), {}
    vectors = np.random.default_rng([seed, 1]).standard_normal((len(items), config.encoder_config().embed_dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), {}


def _trained_pretrained_vectors(name: str, seed: int, catalog: Path, train_path: Path, items: Sequence[Item],
                                out_dir: Path, config: TrainConfig, progress_bar: bool
                                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Train one of PRETRAINED_TRAINED on the shared feature cache; its vectors of `items` from the cache.

    The vectors are `fuse` of the cached `extract` output: the serving path (`ItemEncoder`) computes the
    same function (tests/unit/embed/test_pretrained.py), without extracting the catalog again per model.
    """
    from training.fitting.train import train  # Lightning: only when a model is trained

    kept = {k: v for k, v in config.encoder_overrides.items() if k == "moe_experts"}  # a Recipe's MoE
    overrides = {**PRETRAINED_TRAINED[name], "embed_dim": config.encoder_config().embed_dim, **kept}
    cfg = config.replace(seed=seed, encoder="pretrained", encoder_overrides=overrides)
    cache = out_dir / "feature-cache"
    result = train(catalog, train_path, out_dir / "models" / f"{name}-seed{seed}", cfg, progress_bar, cache)
    model, tokenizer = load_model(result.encoder_dir)
    if not isinstance(model, PretrainedNativeEncoder | StitchedTwinEncoder):
        raise TypeError(f"{result.encoder_dir} holds a {model.config.architecture} encoder, not a pretrained one")
    frozen = sum(p.numel() for p in model.backbone.parameters())
    vectors = encode_cached(model, FeatureCache(cache, model, tokenizer).features(items))
    return vectors, {"parameters": sum(p.numel() for p in model.parameters()) - frozen, "frozen_parameters": frozen}


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


