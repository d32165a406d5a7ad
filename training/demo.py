"""The demo's offline steps: synthesise, train, register (@champion) and reindex inside one folder, reusing
what an earlier run left there."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from index.config import IndexConfig
from index.errors import IndexVerificationError
from index.publish import load_version, read_current
from training.console import console, progress_bar
from training.data.catalog import read_interactions
from training.data.synthetic import SynthConfig, SynthDataset, generate
from training.fitting.config import load_train_config
from training.lifecycle.register import (
    DEFAULT_ALIAS,
    MODEL_NAME,
    ensure_experiment,
    register_encoder,
    resolve_model,
)
from training.lifecycle.tracking import DEFAULT_MODEL_URI, champion_version, use_tracking
from training.reindex.driver import describe_reindex, run_reindex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoArtifacts:
    """Everything the demo made: where the registry and index live, and which versions they hold."""

    tracking_uri: str
    model_uri: str
    index_root: Path
    dataset: SynthDataset
    model_version: str
    index_version: str


def prepare_demo(workdir: Path, n_items: int = 2000, n_users: int = 600, config: str = "demo",
                 max_steps: int | None = None, out: Console | None = None) -> DemoArtifacts:
    """Synthesise, train, register (@champion) and reindex inside `workdir`, reusing what is there.

    Layout: `data/` (dataset), `mlflow.db` + `mlartifacts/` (registry), `runs/` (checkpoints), `index/`.
    A second call finds the dataset (meta.json), the champion and an index published for it, and
    only checks them.
    """
    out = out or console
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = SynthDataset.at(workdir / "data")
    if dataset.meta.is_file():
        out.print(f"reusing the dataset in {dataset.root}")
    else:
        with progress_bar("rendering items", n_items, out) as advance:
            generate(dataset.root, SynthConfig(n_items=n_items, n_users=n_users), advance)
        out.print(synth_summary(dataset))
    cfg = load_train_config(config).replace(max_steps=max_steps)
    tracking_uri, artifact_root = use_tracking(None, workdir)
    ensure_experiment(cfg.experiment, artifact_root)
    version = champion_version()
    if version is not None:
        out.print(f"reusing {MODEL_NAME} version {version} (@{DEFAULT_ALIAS})")
    else:
        out.print(f"training the [bold]{cfg.encoder}[/] encoder for {cfg.max_steps} steps")
        from training.fitting.train import describe_training, train  # Lightning: only when it trains

        result = train(dataset.catalog, dataset.interactions, workdir / "runs", cfg, progress_bar=True)
        out.print(describe_training(result))
        version = register_encoder(result.encoder_dir, result.run_id, result.metrics,
                                   trained_on=read_interactions(dataset.interactions))
    index_root = workdir / "index"
    index_version = current_index_for(index_root, version)
    if index_version is not None:
        out.print(f"reusing index {index_version} (model version {version})")
    else:
        model = resolve_model(DEFAULT_MODEL_URI, index_root / ".model-cache")
        result_ix = run_reindex(dataset.catalog, index_root, model, IndexConfig(), out=out)
        out.print(describe_reindex(result_ix))
        index_version = result_ix.index_version
    return DemoArtifacts(tracking_uri=tracking_uri, model_uri=DEFAULT_MODEL_URI, index_root=index_root,
                         dataset=dataset, model_version=version, index_version=index_version)


def current_index_for(index_root: Path, model_version: str, model_name: str = MODEL_NAME) -> str | None:
    """The CURRENT index version if it verifies and was built by `model_name` `model_version`, else None."""
    if read_current(index_root) is None:
        return None
    try:
        manifest = load_version(index_root).manifest
    except IndexVerificationError as e:
        logger.warning("not reusing the current index: %s", e)
        return None
    if (manifest.model_name, manifest.model_version) != (model_name, model_version):
        return None
    return manifest.index_version


def synth_summary(dataset: SynthDataset) -> Table:
    """A table of what a generated dataset holds and where."""
    traits = pl.read_parquet(dataset.traits, columns=["is_cold"])
    events = pl.scan_parquet(dataset.interactions).select(pl.len()).collect().item()
    holdout = pl.scan_parquet(dataset.holdout_interactions).select(pl.len()).collect().item()
    users = pl.scan_parquet(dataset.preferences).select(pl.col("user_id").n_unique()).collect().item()
    table = Table(title=f"synthetic dataset in {dataset.root}", show_header=False)
    for key, value in [("items", len(traits)), ("cold items", int(traits["is_cold"].sum())), ("users", users),
                       ("events", f"{events} training + {holdout} holdout"), ("catalog", dataset.catalog),
                       ("interactions", dataset.interactions), ("holdout", dataset.holdout_interactions),
                       ("ground truth", f"{dataset.traits}, {dataset.preferences}")]:
        table.add_row(key, str(value))
    return table
