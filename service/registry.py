"""Follow a model reference: an MLflow registry alias or version, or a local encoder directory."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from index.errors import IndexVerificationError
from index.fsio import fsync_dir
from index.publish import read_current, read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A concrete model version and where its files are."""

    name: str
    version: str
    alias: str  # "" when the reference named a version or a directory
    source: str  # models:/NAME/VERSION, or the local directory


def lookup_model(uri: str, tracking_uri: str | None = None, timeout_s: float | None = None) -> ModelRef:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a local directory (no download).

    Args:
        timeout_s: for an HTTP registry, one request bounded by this many seconds, no retries (the
            watcher's polls: an outage costs one short wait per poll). None: MLflow's own client, with
            its retries and backoff (`MLFLOW_HTTP_REQUEST_*`), e.g. at startup.

    Raises:
        MlflowException: the registry refused or could not be reached.
        FileNotFoundError: `uri` is neither a registry reference nor a directory.
    """
    if not uri.startswith("models:/"):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"model {uri!r} is neither models:/NAME@ALIAS nor an encoder directory")
        resolved = path.resolve()  # a symlink moved between lookup and load still loads what was looked up
        return ModelRef(name=path.name, version=f"local:{resolved}", alias="", source=str(resolved))
    name, alias, version = _parse_registry_uri(uri)
    registry = tracking_uri or mlflow.get_tracking_uri()
    if timeout_s is not None and registry.startswith(("http://", "https://")):
        version = _rest_version(registry, name, alias, version, timeout_s)
    else:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        version = str(mv.version)
    return ModelRef(name=name, version=version, alias=alias, source=f"models:/{name}/{version}")


def _parse_registry_uri(uri: str) -> tuple[str, str, str]:
    """(name, alias, version) of `models:/NAME@ALIAS` (version "") or `models:/NAME/VERSION` (alias "")."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, ""
    name, _, version = body.partition("/")
    return name, "", version


def _rest_version(registry: str, name: str, alias: str, version: str, timeout_s: float) -> str:
    """The version an alias (or version) names, by one REST call of at most `timeout_s` seconds."""
    endpoint, params = (("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias}) if alias
                        else ("/api/2.0/mlflow/model-versions/get", {"name": name, "version": version}))
    response = http_request(get_default_host_creds(registry), endpoint, "GET", max_retries=0, backoff_factor=0,
                            timeout=timeout_s, params=params)
    if response.status_code != 200:
        raise MlflowException(f"registry {registry} answered {response.status_code} to {endpoint} {params}: "
                              f"{response.text[:300]}")
    return str(response.json()["model_version"]["version"])


def cached_model(uri: str, index_root: Path, cache_dir: Path) -> ModelRef | None:
    """The registry model the `CURRENT` index under `index_root` was built with, if `uri` names that
    registered model and its files are complete in `cache_dir`; else None. Asks no registry."""
    if not uri.startswith("models:/"):
        return None
    name, alias, pinned = _parse_registry_uri(uri)
    current = read_current(index_root)
    if current is None:
        return None
    try:
        manifest = read_manifest(index_root, current)
    except IndexVerificationError:
        return None
    version = manifest.model_version
    if manifest.model_name != name or (pinned and pinned != version):
        return None
    if not (cache_dir / name / version / ".complete").is_file():
        return None
    return ModelRef(name=name, version=version, alias=alias, source=f"models:/{name}/{version}")


def download_model(ref: ModelRef, cache_dir: Path, tracking_uri: str | None = None) -> Path:
    """A local directory holding the model's files (downloaded once per version into `cache_dir`)."""
    if not ref.source.startswith("models:/"):
        return Path(ref.source)
    target = cache_dir / ref.name / ref.version
    if not (target / ".complete").exists():
        if target.exists():
            shutil.rmtree(target)  # a download that died half-way
        target.mkdir(parents=True)
        # MLflow resolves a models:/ URI against the global registry, whatever registry_uri says:
        # ask our registry where the version's files are, then fetch them from there
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        source = client.get_model_version_download_uri(ref.name, ref.version)
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=tracking_uri)
        _mark_complete(target)
        logger.info("downloaded %s to %s", ref.source, target)
    return target


def _mark_complete(target: Path) -> None:
    """fsync every downloaded file and folder, then write `.complete` the same way: after a power cut the
    marker never stands beside empty or missing files. A failure (EIO, ENOSPC) names the file; without
    the marker the next start downloads again."""
    try:
        for folder, _, files in os.walk(target, topdown=False):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(Path(folder))
        marker = target / ".complete"
        with open(marker, "wb") as f:
            f.write(b"ok\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(target)
        for parent in (target.parent, target.parent.parent):  # cache/<name>/<version>: the new names
            fsync_dir(parent)
    except OSError as e:
        raise OSError(e.errno, f"could not write the model cache {target}: {e.strerror or e}",
                      e.filename or str(target)) from e
