"""Promotion on numbers the versions earned (issue 15): real Lightning training on tiny data, a real sqlite
MLflow store, the refresh job and `onetower evaluate --register-version` end to end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from onetower.cli import app
from training.data.catalog import iter_items, read_catalog, read_interactions
from training.data.synthetic import SynthConfig, SynthDataset, generate
from training.fitting.config import load_train_config
from training.fitting.train import train
from training.lifecycle.holdout import NoFairHoldout
from training.lifecycle.lineage import TRAINED_ON, interactions_digest, items_digest, trained_items
from training.lifecycle.promote import REPORTED
from training.lifecycle.refresh import RefreshConfig, refresh
from training.lifecycle.register import MODEL_NAME, SPLIT_TAG, ensure_experiment, metric_tag, register_encoder
from training.lifecycle.scoring import EvalSplit, score_encoder
from training.lifecycle.tracking import use_tracking

CLEAN_ENV: dict[str, str | None] = {"MLFLOW_TRACKING_URI": None, "ONETOWER_TRACKING_URI": None}


@dataclass(frozen=True)
class World:
    dataset: SynthDataset
    uri: str
    champion: str  # registered, @champion, trained on `old` only
    encoder_dir: Path
    old: Path  # the champion's training interactions: every event except those on `new_items`
    new_items: set[str]
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A champion trained (4 tiny steps) on the interactions of 75% of the items; the rest arrive later."""
    before = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("lifecycle")
    ds = generate(root / "data", SynthConfig(n_items=120, n_users=60, seed=3, image_size=16))
    uri, artifacts = use_tracking(f"sqlite:///{root / 'mlflow.db'}", root)
    cfg = load_train_config("tiny").replace(max_steps=4, experiment="onetower-tests")
    ensure_experiment(cfg.experiment, artifacts)
    events = read_interactions(ds.interactions)
    items = sorted(set(events["item_id"].to_list()))
    new_items = set(items[::4])
    old_frame = events.filter(~pl.col("item_id").is_in(sorted(new_items)))
    old_frame.write_parquet(root / "old.parquet")
    result = train(ds.catalog, root / "old.parquet", root / "run", cfg, progress_bar=False)
    version = register_encoder(result.encoder_dir, result.run_id, result.metrics, trained_on=old_frame)
    yield World(ds, uri, version, result.encoder_dir, root / "old.parquet", new_items, root)
    mlflow.set_tracking_uri(before)


def _refresh_config(world: World, tmp_path: Path, interactions: Path, **kwargs: object) -> RefreshConfig:
    cfg = load_train_config("tiny").replace(max_steps=2, experiment="onetower-tests")
    return RefreshConfig(catalog=world.dataset.catalog, interactions=interactions, workdir=tmp_path / "work",
                         index_root=tmp_path / "index", train=cfg, **kwargs)  # type: ignore[arg-type]


def test_registration_records_what_the_version_trained_on(world: World) -> None:
    client = MlflowClient()
    old = read_interactions(world.old)
    tags = client.get_model_version(MODEL_NAME, world.champion).tags
    assert tags[TRAINED_ON + "rows"] == str(old.height)
    assert tags[TRAINED_ON + "sha256"] == interactions_digest(old) == interactions_digest(old.reverse())
    assert tags[TRAINED_ON + "ts_max"] == str(old["ts"].max())
    assert tags[TRAINED_ON + "items_sha256"] == items_digest(old["item_id"].to_list())
    assert trained_items(client, MODEL_NAME, world.champion) == set(old["item_id"].to_list())


def test_evaluate_register_version_tags_the_versions_own_numbers(world: World, tmp_path: Path) -> None:
    """Today's main tags V with the `native` model `evaluate` trained (here: none), not with V's own encoder."""
    ds = world.dataset
    result = CliRunner().invoke(app, ["evaluate", "--data", str(ds.root), "--out", str(tmp_path / "eval"),
                                      "--models", "popularity", "--register-version", world.champion,
                                      "--tracking-uri", world.uri], env=CLEAN_ENV)
    assert result.exit_code == 0, result.output + repr(result.exception)
    items = list(iter_items(read_catalog(ds.catalog), ds.catalog.parent))
    split = EvalSplit.read([it.item_id for it in items], ds.interactions, ds.holdout_interactions)
    own = score_encoder(world.encoder_dir, items, split)  # the registered encoder, scored independently
    tags = MlflowClient().get_model_version(MODEL_NAME, world.champion).tags
    for key in REPORTED:
        assert float(tags[metric_tag(key)]) == pytest.approx(own[key], abs=1e-5), key
    assert tags[SPLIT_TAG] == split.fingerprint
    assert split.fingerprint[:12] in " ".join(result.output.split())


def test_refresh_holds_out_only_items_the_champion_never_trained_on(world: World, tmp_path: Path) -> None:
    """Today's main holds out a random 10% of all items, most of which the champion trained on."""
    config = _refresh_config(world, tmp_path, world.dataset.interactions)
    result = refresh(config)
    split = result.steps["split"]
    held_out = set(read_interactions(Path(split["holdout"]))["item_id"].to_list())
    seen = set(read_interactions(world.old)["item_id"].to_list())
    assert held_out and not held_out & seen
    assert held_out <= world.new_items and split["fair"]
    assert f"new since version {world.champion}" in split["held_out"]
    # the candidate trained on neither: none of its training events is on a held-out item
    assert not held_out & set(read_interactions(Path(split["train"]))["item_id"].to_list())
    assert result.steps["evaluate"]["n_users"] > 0
    # both versions carry their numbers with this split's fingerprint; the candidate records its data
    client = MlflowClient()
    candidate = result.steps["register"]["version"]
    for version, who in ((world.champion, "champion"), (candidate, "candidate")):
        tags = client.get_model_version(MODEL_NAME, version).tags
        assert tags[SPLIT_TAG] == split["fingerprint"]
        assert float(tags[metric_tag("recall@20")]) == pytest.approx(result.steps["evaluate"][who]["recall@20"],
                                                                      abs=1e-5)
    assert trained_items(client, MODEL_NAME, candidate) == seen | (world.new_items - held_out)


def test_refresh_refuses_to_judge_the_champion_on_what_it_trained_on(world: World, tmp_path: Path) -> None:
    """The champion's own interactions hold nothing new: no fair holdout, so no gate (unless forced)."""
    with pytest.raises(NoFairHoldout, match=r"none of the \d+ items .* new since champion version .*--force"):
        refresh(_refresh_config(world, tmp_path, world.old))
    given = _refresh_config(world, tmp_path, world.old, holdout=world.old)
    with pytest.raises(NoFairHoldout, match="trained on every item of the given holdout"):
        refresh(given)
