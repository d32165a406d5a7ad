"""Promotion and rollback against a real MLflow registry (sqlite store) and real published indexes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from training.lifecycle.promote import PromotionError, promote, rollback
from training.lifecycle.register import MODEL_NAME, SPLIT_TAG, alias_version, metric_tag, move_alias


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store per module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def registry(store: str, tmp_path: Path) -> Iterator[MlflowClient]:
    """A fresh registered model with versions 1, 2 and 3."""
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(MODEL_NAME)
    for _ in range(3):
        client.create_model_version(MODEL_NAME, source=(tmp_path / "weights").as_uri())
    yield client
    client.delete_registered_model(MODEL_NAME)


def _publish(root: Path, model_version: str) -> str:
    vectors = np.random.default_rng(int(model_version)).normal(size=(20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = IdMap([f"i{i}" for i in range(20)], ["h"] * 20, [{}] * 20)
    return publish_index(root, vectors, ids, IndexConfig(kind="flat"), MODEL_NAME, model_version).manifest.index_version


def _score(registry: MlflowClient, version: str, recall: str, split: str | None = "split-a") -> None:
    registry.set_model_version_tag(MODEL_NAME, version, metric_tag("recall@20"), recall)
    if split is not None:
        registry.set_model_version_tag(MODEL_NAME, version, SPLIT_TAG, split)


def test_promote_needs_an_index_and_a_metric_at_least_the_champions(registry: MlflowClient, tmp_path: Path) -> None:
    root = tmp_path / "index"
    _publish(root, "1")
    move_alias(registry, MODEL_NAME, "champion", "1")
    _score(registry, "1", "0.30")
    with pytest.raises(PromotionError, match="no index"):
        promote("2", root, client=registry)
    index_2 = _publish(root, "2")
    with pytest.raises(PromotionError, match="no recorded recall@20"):
        promote("2", root, client=registry)
    _score(registry, "2", "0.25")
    with pytest.raises(PromotionError, match=r"0\.2500 < @champion"):
        promote("2", root, client=registry)
    assert alias_version(registry, MODEL_NAME, "champion") == "1"
    _score(registry, "2", "0.35")
    move = promote("2", root, client=registry)
    assert (move.previous, move.current, move.index_version) == ("1", "2", index_2)
    assert alias_version(registry, MODEL_NAME, "champion") == "2"


def test_promote_compares_only_numbers_measured_on_the_same_split(registry: MlflowClient, tmp_path: Path) -> None:
    """Issue 15: a higher number on another holdout (or on an unrecorded one) earns nothing."""
    root = tmp_path / "index"
    _publish(root, "1")
    _publish(root, "2")
    move_alias(registry, MODEL_NAME, "champion", "1")
    _score(registry, "1", "0.30", split="split-a")
    _score(registry, "2", "0.90", split="split-b")
    with pytest.raises(PromotionError, match=r"split split-b.*split split-a.*different holdouts.*--register-version 1,2"):
        promote("2", root, client=registry)
    _score(registry, "1", "0.30", split=None)
    registry.delete_model_version_tag(MODEL_NAME, "1", SPLIT_TAG)  # tagged before splits were recorded
    with pytest.raises(PromotionError, match="an unrecorded split"):
        promote("2", root, client=registry)
    assert alias_version(registry, MODEL_NAME, "champion") == "1"
    assert promote("2", root, force=True, client=registry).current == "2"  # --force still overrides


def test_force_skips_the_metric_but_not_the_index(registry: MlflowClient, tmp_path: Path) -> None:
    root = tmp_path / "index"
    _publish(root, "1")
    move_alias(registry, MODEL_NAME, "champion", "1")
    _publish(root, "3")
    assert promote("3", root, force=True, client=registry).current == "3"
    with pytest.raises(PromotionError, match="no index"):
        promote("2", root, force=True, client=registry)


def test_rollback_returns_to_the_previous_holder_and_its_kept_index(registry: MlflowClient, tmp_path: Path) -> None:
    root = tmp_path / "index"
    index_1 = _publish(root, "1")
    _publish(root, "2")  # CURRENT now points at version 2's index; version 1's is kept
    move_alias(registry, MODEL_NAME, "champion", "1")
    promote("2", root, force=True, client=registry)
    move = rollback(root, client=registry)
    assert (move.previous, move.current, move.index_version) == ("2", "1", index_1)
    assert alias_version(registry, MODEL_NAME, "champion") == "1"
    with pytest.raises(PromotionError, match="no earlier holder"):
        rollback(root, client=registry)
