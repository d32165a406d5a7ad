"""Promotion and rollback of the serving alias, guarded by the published index and recorded evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from index.publish import find_version_for_model, load_version
from training.lifecycle.register import (
    DEFAULT_ALIAS,
    HISTORY_TAG,
    MODEL_NAME,
    SPLIT_TAG,
    alias_history,
    alias_version,
    metric_tag,
    move_alias,
)

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "recall@20"  # tagged on versions (register.tag_evaluation) by `evaluate --register-version`
REPORTED = ("recall@20", "ndcg@20", "recall@50")  # what `refresh` tags on both versions; DEFAULT_METRIC decides


class PromotionError(RuntimeError):
    """The candidate may not take the alias (no index, or worse than the champion)."""


@dataclass(frozen=True)
class AliasMove:
    alias: str
    previous: str | None
    current: str
    index_version: str


@dataclass(frozen=True)
class _Score:
    value: float | None
    split: str | None  # fingerprint of the split it was measured on; None: not recorded


def _version_score(client: MlflowClient, name: str, version: str, metric: str) -> _Score:
    tags = client.get_model_version(name, version).tags
    value = tags.get(metric_tag(metric))
    return _Score(float(value) if value is not None else None, tags.get(SPLIT_TAG))


def check_scores(client: MlflowClient, model_name: str, version: str, previous: str, alias: str, metric: str) -> None:
    """Raise PromotionError unless `version`'s recorded `metric` is at least `previous`'s, both measured on
    the same split (a champion with no recorded metric has nothing to compare against)."""
    ours, theirs = (_version_score(client, model_name, v, metric) for v in (version, previous))
    if ours.value is None:
        raise PromotionError(f"version {version} has no recorded {metric}: evaluate it, or pass --force")
    if theirs.value is None:
        return
    if ours.split is None or ours.split != theirs.split:
        def where(score: _Score) -> str:
            return f"split {score.split[:12]}" if score.split else "an unrecorded split"
        raise PromotionError(
            f"version {version}'s {metric} was measured on {where(ours)}, @{alias} version "
            f"{previous}'s on {where(theirs)}: numbers from different holdouts do not compare; score both on "
            f"one holdout (`onetower evaluate ... --register-version {previous},{version}`) or pass --force")
    if ours.value < theirs.value:
        raise PromotionError(f"version {version} has {metric}={ours.value:.4f} < @{alias} version {previous}'s "
                             f"{theirs.value:.4f} (split {ours.split[:12]}); pass --force to promote anyway")


def promote(version: str, index_root: Path, model_name: str = MODEL_NAME, alias: str = DEFAULT_ALIAS,
            metric: str = DEFAULT_METRIC, force: bool = False, client: MlflowClient | None = None) -> AliasMove:
    """Point `alias` at `version` once its index is published (and verifies) and its recorded
    `metric` is at least the current holder's, measured on the same split; `force` skips the metric check only.

    Raises:
        PromotionError: no verified index for the version, a worse (or missing) metric, or metrics measured
            on different splits.
    """
    client = client or MlflowClient()
    client.get_model_version(model_name, version)  # raises if the version does not exist
    index_version = find_version_for_model(index_root, version)
    if index_version is None:
        raise PromotionError(f"no index under {index_root} was built with {model_name} version {version}: "
                             f"run `onetower reindex --model models:/{model_name}/{version}` first")
    load_version(index_root, index_version)  # verifies every file against the manifest
    previous = alias_version(client, model_name, alias)
    if previous == version:
        return AliasMove(alias, previous, version, index_version)
    if previous is not None and not force:
        check_scores(client, model_name, version, previous, alias, metric)
    move_alias(client, model_name, alias, version)
    logger.info("@%s: version %s -> %s (index %s)", alias, previous, version, index_version)
    return AliasMove(alias, previous, version, index_version)


def rollback(index_root: Path, model_name: str = MODEL_NAME, alias: str = DEFAULT_ALIAS,
             client: MlflowClient | None = None) -> AliasMove:
    """Move `alias` back to the version that held it before (its published index must still exist).

    Raises:
        PromotionError: no earlier holder is recorded, or its index was pruned.
    """
    client = client or MlflowClient()
    history = alias_history(client, model_name, alias)
    if not history:
        raise PromotionError(f"no earlier holder of @{alias} is recorded for {model_name}")
    target = history[-1]
    index_version = find_version_for_model(index_root, target)
    if index_version is None:
        raise PromotionError(f"the index for version {target} is no longer under {index_root}; "
                             f"run `onetower reindex --model models:/{model_name}/{target}` and retry")
    current = alias_version(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, target)
    client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias), json.dumps(history[:-1]))
    logger.info("@%s rolled back: version %s -> %s (index %s)", alias, current, target, index_version)
    return AliasMove(alias, current, target, index_version)
