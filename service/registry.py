"""Follow a model reference: an MLflow registry alias or version, or a local encoder directory."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A concrete model version and where its files are."""

    name: str
    version: str
    alias: str  # "" when the reference named a version or a directory
    source: str  # models:/NAME/VERSION, or the local directory


def lookup_model(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a local directory (no download)."""
    if not uri.startswith("models:/"):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"model {uri!r} is neither models:/NAME@ALIAS nor an encoder directory")
        return ModelRef(name=path.name, version=f"local:{path.resolve()}", alias="", source=str(path))
    body = uri.removeprefix("models:/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = body.partition("/")
        alias = ""
        mv = client.get_model_version(name, version)
    return ModelRef(name=name, version=str(mv.version), alias=alias, source=f"models:/{name}/{mv.version}")


def download_model(ref: ModelRef, cache_dir: Path, tracking_uri: str | None = None) -> Path:
    """A local directory holding the model's files (downloaded once per version into `cache_dir`)."""
    if not ref.source.startswith("models:/"):
        return Path(ref.source)
    target = cache_dir / ref.name / ref.version
    if not (target / ".complete").exists():
        if target.exists():
            shutil.rmtree(target)  # a download that died half-way
        target.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(target), tracking_uri=tracking_uri,
                                            registry_uri=tracking_uri)
        (target / ".complete").write_text("ok\n")
        logger.info("downloaded %s to %s", ref.source, target)
    return target
