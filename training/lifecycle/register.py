"""MLflow: the tracking store, registering encoder versions, aliases, and resolving model references."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from embed import load as embed_load
from training.lifecycle.lineage import record_trained_on

logger = logging.getLogger(__name__)

MODEL_NAME = "onetower-encoder"
DEFAULT_ALIAS = "champion"
EVALUATION_TAG = "onetower.evaluation"  # JSON: where and on what a version's metric tags were measured
SPLIT_TAG = "eval.split"  # the fingerprint (lineage.split_fingerprint) of the split the metric tags were measured on
HISTORY_TAG = "onetower.alias_history.{alias}"  # registered-model tag: JSON list of earlier holders
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
EMBED_PACKAGE = Path(embed_load.__file__).parent
PYFUNC_REQUIREMENTS = ["torch>=2.4", "numpy", "safetensors", "tokenizers", "pillow", "polars", "pyarrow"]


def local_tracking_uri(workdir: Path) -> str:
    """The embedded default: a sqlite store inside `workdir`."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def ensure_experiment(name: str, artifact_root: Path | None = None) -> str:
    """The experiment's id, creating it (with local artifacts under `artifact_root`) when new."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return str(mlflow.create_experiment(name, artifact_location=location))


def register_encoder(encoder_dir: Path, run_id: str, metrics: dict[str, float], model_name: str = MODEL_NAME,
                     alias: str | None = DEFAULT_ALIAS, trained_on: pl.DataFrame | None = None) -> str:
    """Log the encoder as a pyfunc model from code in `run_id`, register it, and point `alias` at it.

    The version carries `config.json`, `weights.safetensors` and `tokenizer.json` (artifact
    `encoder`), the `embed` package as code, and the metrics as tags (training metrics: evaluation
    scores go through `tag_evaluation`, with the split they were measured on).

    Args:
        trained_on: the interactions it trained on, recorded as `trained_on.*` tags and the item ids
            (lineage.py), so `onetower refresh` can hold out items this version never saw.

    Returns:
        The new registered version, as a string.
    """
    missing = [f for f in embed_load.ENCODER_FILES if not (encoder_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{encoder_dir} lacks {missing}: not an encoder directory")
    # MLflow refuses to resume a run outside its process-wide "active experiment" (set by an earlier
    # set_experiment, possibly against another store): make the run's own experiment the active one.
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="encoder", python_model=str(PYFUNC_FILE), artifacts={"encoder": str(encoder_dir)},
            code_paths=[str(EMBED_PACKAGE)], pip_requirements=PYFUNC_REQUIREMENTS,
            registered_model_name=model_name, metadata={"onetower_metrics": json.dumps(metrics)})
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(model_name, version, metric_tag(key), f"{value:.6g}")
    if trained_on is not None:
        record_trained_on(client, model_name, version, run_id, trained_on)
    if alias:
        move_alias(client, model_name, alias, version)
    logger.info("registered %s version %s%s", model_name, version, f" as @{alias}" if alias else "")
    return version


def metric_tag(metric: str) -> str:
    """The model-version tag holding `metric` (MLflow tag keys cannot hold '@')."""
    return "metric." + metric.replace("@", "_at_")


def tag_evaluation(client: MlflowClient, name: str, version: str, metrics: Mapping[str, float],
                   keys: Iterable[str], split: str, note: Mapping[str, Any]) -> None:
    """Record a version's evaluation as tags `promote` reads: each of `keys` in `metrics`, the fingerprint
    of the `split` they were measured on, and `note` (JSON)."""
    if SPLIT_TAG in client.get_model_version(name, version).tags:  # a crash mid-way leaves no split: not comparable
        client.delete_model_version_tag(name, version, SPLIT_TAG)
    for key in keys:
        if key in metrics:
            client.set_model_version_tag(name, version, metric_tag(key), f"{metrics[key]:.6g}")
    client.set_model_version_tag(name, version, SPLIT_TAG, split)
    client.set_model_version_tag(name, version, EVALUATION_TAG, json.dumps({**note, "split": split}))


def alias_history(client: MlflowClient, name: str, alias: str) -> list[str]:
    """Earlier holders of `alias`, oldest first (recorded by `move_alias`)."""
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG.format(alias=alias), "[]")
    return [str(v) for v in json.loads(raw)]


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_alias(client: MlflowClient, name: str, alias: str, version: str) -> str | None:
    """Point `alias` at `version`, remembering the previous holder for `onetower rollback`."""
    previous = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    if previous is not None and previous != version:
        history = [*alias_history(client, name, alias), previous][-20:]
        client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))
    return previous


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: registry name and version, and a local encoder directory."""

    name: str
    version: str
    directory: Path


def parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` or `models:/name/3` -> (name, alias, version)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    name, _, version = body.partition("/")
    if not name or not version:
        raise ValueError(f"model reference {ref!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def resolve_model(ref: str, cache_dir: Path) -> ResolvedModel:
    """Resolve a registry URI (or a local encoder directory) and download the encoder files."""
    if not ref.startswith("models:/"):
        directory = embed_load.find_encoder_dir(Path(ref))
        # the same name and version the service's registry.lookup_model gives a local folder
        return ResolvedModel(name=Path(ref).name, version=f"local:{Path(ref).resolve()}", directory=directory)
    name, alias, version = parse_model_uri(ref)
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
    target = cache_dir / name / str(mv.version)
    if not (target / "done").exists():
        target.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(target))
        (target / "done").write_text("ok")
    return ResolvedModel(name=name, version=str(mv.version), directory=embed_load.find_encoder_dir(target))
