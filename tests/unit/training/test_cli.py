"""The training commands through typer's CliRunner, on a tiny synthetic dataset with a real sqlite MLflow store."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from embed.load import load_encoder
from index.publish import load_version
from onetower.cli import app
from onetower.settings import SETTINGS
from training.data.catalog import iter_items, read_catalog
from training.data.synthetic import SynthDataset
from training.demo import prepare_demo
from training.lifecycle.register import MODEL_NAME

N_ITEMS, N_USERS, STEPS = 120, 60, 4
runner = CliRunner()
# settings from the environment would override the flags' defaults under test
CLEAN_ENV: dict[str, str | None] = {name: None for s in SETTINGS for name in s.envvars}


def flat(text: str) -> str:
    """Output without rich's panel borders and line wrapping."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def invoke(*args: str | Path) -> str:
    result = runner.invoke(app, [str(a) for a in args], env=CLEAN_ENV)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(autouse=True, scope="module")
def _restore_tracking_uri() -> Iterator[None]:
    """The commands point MLflow at their store process-wide; put back what was there."""
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthDataset, str]:
    """`synth` then `train` (tiny config, a few steps) into one sqlite store; (dataset, tracking URI)."""
    root = tmp_path_factory.mktemp("cli")
    invoke("synth", "--out", root / "data", "--items", N_ITEMS, "--users", N_USERS, "--seed", 3,
           "--image-size", 32)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    output = invoke("train", "--catalog", root / "data" / "catalog.parquet",
                    "--interactions", root / "data" / "interactions.parquet", "--config", "tiny",
                    "--max-steps", STEPS, "--out", root / "runs", "--tracking-uri", uri)
    assert "registered onetower-encoder version 1 as @champion" in output
    return SynthDataset.at(root / "data"), uri


def test_synth_is_deterministic_and_summarised(tmp_path: Path) -> None:
    outputs = [invoke("synth", "--out", tmp_path / name, "--items", N_ITEMS, "--users", N_USERS,
                      "--seed", 5, "--image-size", 32) for name in ("a", "b")]
    assert (tmp_path / "a" / "catalog.parquet").read_bytes() == (tmp_path / "b" / "catalog.parquet").read_bytes()
    a, b = (pl.read_parquet(tmp_path / n / "interactions.parquet") for n in ("a", "b"))
    assert a.equals(b)
    assert "cold items" in outputs[0] and f"{N_ITEMS}" in outputs[0]
    invoke("synth", "--out", tmp_path / "c", "--items", N_ITEMS, "--users", N_USERS, "--seed", 6,
           "--image-size", 32)
    assert (tmp_path / "c" / "catalog.parquet").read_bytes() != (tmp_path / "a" / "catalog.parquet").read_bytes()


@pytest.mark.slow
def test_train_registers_a_champion_with_local_artifacts(trained: tuple[SynthDataset, str]) -> None:
    dataset, uri = trained
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1"
    assert float(version.tags["metric.train_loss"]) > 0
    run = client.get_run(version.run_id)
    assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["train.encoder"] == "tiny"
    # artifacts live beside the sqlite file, not in the working directory
    assert run.info.artifact_uri.startswith((dataset.root.parent / "mlartifacts").as_uri())


@pytest.mark.slow
def test_reindex_publishes_every_item_of_the_catalog(trained: tuple[SynthDataset, str], tmp_path: Path) -> None:
    dataset, uri = trained
    output = invoke("reindex", "--catalog", dataset.catalog, "--index-root", tmp_path / "index",
                    "--tracking-uri", uri, "--kind", "flat", "--batch-size", 32, "--device", "cpu")
    published = load_version(tmp_path / "index")
    assert published.manifest.count == N_ITEMS == len(published.ids)  # every synthetic item is embeddable
    assert (published.manifest.model_name, published.manifest.model_version) == (MODEL_NAME, "1")
    assert published.manifest.kind == "flat"
    assert f"published index {published.manifest.index_version}: {N_ITEMS} items ({N_ITEMS} embedded" in output
    assert "0 skipped" in output
    assert (tmp_path / "index" / ".model-cache" / MODEL_NAME / "1" / "done").is_file()


@pytest.mark.slow
def test_reindex_accepts_a_local_encoder_directory(trained: tuple[SynthDataset, str], tmp_path: Path) -> None:
    dataset, _ = trained
    encoder_dir = dataset.root.parent / "runs" / "encoder"
    invoke("reindex", "--catalog", dataset.catalog, "--index-root", tmp_path, "--model", encoder_dir, "--device", "cpu",
           "--kind", "hnsw", "--hnsw-storage", "sq8", "--precision", "bf16")
    published = load_version(tmp_path)
    manifest = published.manifest
    # the name and version `onetower serve --model DIR` looks for, so the pair matches
    assert (manifest.model_name, manifest.model_version) == ("encoder", f"local:{encoder_dir.resolve()}")
    assert (manifest.kind, manifest.params["hnsw_storage"]) == ("hnsw", "sq8")
    # bf16 vectors stay within ~1e-3 cosine of an fp32 embedding of the same items
    items = list(iter_items(read_catalog(dataset.catalog), dataset.catalog.parent))[:16]
    fp32 = load_encoder(encoder_dir).encode(items)
    stored = np.asarray(published.vectors[[published.ids.label(it.item_id) for it in items]])
    assert np.sum(fp32 * stored, axis=1).min() > 0.99


def test_train_refuses_an_unknown_config_by_name(tmp_path: Path) -> None:
    (tmp_path / "c.parquet").touch()
    result = runner.invoke(app, ["train", "--catalog", str(tmp_path / "c.parquet"), "--interactions",
                                 str(tmp_path / "c.parquet"), "--config", "nope"], env=CLEAN_ENV)
    assert result.exit_code == 2
    assert "config 'nope' is neither a YAML file nor a bundled config" in flat(result.output)


def test_reindex_names_a_missing_model(tmp_path: Path, trained: tuple[SynthDataset, str]) -> None:
    dataset, uri = trained
    result = runner.invoke(app, ["reindex", "--catalog", str(dataset.catalog), "--index-root", str(tmp_path),
                                 "--tracking-uri", uri, "--model", "models:/onetower-encoder@nobody"],
                           env=CLEAN_ENV)
    assert result.exit_code == 2 and "Invalid value for --model" in flat(result.output)


def test_help_teaches_with_examples() -> None:
    for command in ("synth", "train", "reindex"):
        output = invoke(command, "--help")
        assert f"onetower {command} --" in output


@pytest.mark.slow
def test_prepare_demo_reuses_what_a_first_run_made(tmp_path: Path) -> None:
    first = prepare_demo(tmp_path, n_items=N_ITEMS, n_users=N_USERS, config="tiny", max_steps=STEPS)
    assert first.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert first.model_uri == f"models:/{MODEL_NAME}@champion" and first.model_version == "1"
    assert load_version(first.index_root).manifest.count == N_ITEMS
    for folder in ("data", "mlartifacts", "runs", "index"):
        assert (tmp_path / folder).is_dir(), folder
    catalog_bytes = first.dataset.catalog.read_bytes()

    started = time.perf_counter()
    second = prepare_demo(tmp_path, n_items=N_ITEMS, n_users=N_USERS, config="tiny", max_steps=STEPS)
    assert time.perf_counter() - started < 10
    assert second == first
    assert first.dataset.catalog.read_bytes() == catalog_bytes
    versions = MlflowClient(tracking_uri=first.tracking_uri).search_model_versions(f"name='{MODEL_NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
