"""MLflow beside registration: point the process at a tracking store, read the serving alias, log a report."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from training.lifecycle.register import DEFAULT_ALIAS, MODEL_NAME, ensure_experiment, local_tracking_uri

logger = logging.getLogger(__name__)

DEFAULT_MODEL_URI = f"models:/{MODEL_NAME}@{DEFAULT_ALIAS}"


def use_tracking(uri: str | None, workdir: Path) -> tuple[str, Path | None]:
    """Point MLflow at `uri`, or at the sqlite store in `workdir` when none is given.

    Returns:
        The tracking URI and, for a sqlite store, the local artifact folder beside the database
        (`mlartifacts`), which new experiments use; None for servers, which choose their own.
    """
    uri = uri or local_tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        return uri, Path(uri.removeprefix("sqlite:///")).parent.resolve() / "mlartifacts"
    return uri, None


def champion_version(model_name: str = MODEL_NAME, alias: str = DEFAULT_ALIAS) -> str | None:
    """The version `alias` points at in the active registry, or None when the model or alias is absent."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            return None
        raise


def log_evaluation(metrics: Mapping[str, Any], out_dir: Path, experiment: str) -> str:
    """An MLflow run `evaluate-<preset>` in `experiment` with every model's Recall@K/NDCG@K and the report files
    as artifacts; returns its run id. The experiment is named, not taken from MLflow's process-wide "active
    experiment", which may belong to another tracking store."""
    with mlflow.start_run(run_name=f"evaluate-{metrics['preset']}", experiment_id=ensure_experiment(experiment)) as run:
        mlflow.log_params({"preset": metrics["preset"], "seeds": ",".join(map(str, metrics["seeds"])),
                           "n_users": metrics["n_users"], "n_cold_items": metrics["n_cold_items"]})
        mlflow.log_metrics({f"{model}.{k.replace('@', '_at_')}": float(v) for model, row in metrics["models"].items()
                            for k, v in row.items() if k.startswith(("recall@", "ndcg@")) and not k.endswith("_ci")})
        for path in metrics["files"]:
            mlflow.log_artifact(path, artifact_path="report")
        mlflow.log_artifact(str(out_dir / "metrics.json"), artifact_path="report")
        logger.info("logged the report to MLflow run %s", run.info.run_id)
        return str(run.info.run_id)
