"""Registered versions the page can compare, and read-only servers pinned to each, started on first use.

A candidate is answered from its own encoder and index: `start_server` with `models:/NAME/VERSION`
and `read_only=True` (it refuses writes and opens no live-write log), on a loopback port of its own.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from index.publish import find_version_for_model
from service.client import Client
from service.config import ServiceConfig
from service.server import RunningServer, start_server

logger = logging.getLogger(__name__)

METRIC_PREFIX = "metric."  # training/lifecycle/register.py: metric_tag()
SPLIT_TAG = "eval.split"


@dataclass(frozen=True)
class VersionInfo:
    """A registered version with a published index: its aliases, index and registry metrics."""

    version: str
    aliases: tuple[str, ...]
    index_version: str
    metrics: dict[str, str]  # metric name (as evaluated, '@' restored) -> value
    split: str  # the split fingerprint the metrics were measured on ("" when never evaluated)


def list_versions(name: str, tracking_uri: str | None, index_root: Path) -> list[VersionInfo]:
    """Versions of registered model `name` that have a published index under `index_root`, newest first.

    Raises:
        MlflowException: the registry refused or could not be reached.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    out = []
    for mv in client.search_model_versions(f"name='{name}'"):
        version = str(mv.version)
        index_version = find_version_for_model(index_root, version)
        if index_version is None:
            continue
        tags = dict(mv.tags or {})
        metrics = {k[len(METRIC_PREFIX):].replace("_at_", "@"): v for k, v in sorted(tags.items())
                   if k.startswith(METRIC_PREFIX)}
        out.append(VersionInfo(version, tuple(mv.aliases or ()), index_version, metrics, tags.get(SPLIT_TAG, "")))
    return sorted(out, key=lambda v: int(v.version) if v.version.isdigit() else 0, reverse=True)


@dataclass
class PinnedServers:
    """One read-only in-process server per compared version, started on first use, stopped by `close`."""

    name: str
    tracking_uri: str | None
    index_root: Path
    cache_dir: Path
    timeout: float
    _running: dict[str, tuple[RunningServer, Client]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, version: str) -> Client:
        """A client of the server pinned to `version` (started now if new: seconds, it loads the model).

        Raises:
            PairMismatchError, MlflowException, IndexVerificationError: the version cannot be served.
        """
        with self._lock:
            if version not in self._running:
                config = ServiceConfig(model_uri=f"models:/{self.name}/{version}", index_root=self.index_root,
                                       tracking_uri=self.tracking_uri, port=0, poll_seconds=0,
                                       cache_dir=self.cache_dir, read_only=True, workers=2)
                running = start_server(config)
                logger.info("compare: version %s served read-only on 127.0.0.1:%d", version, running.port)
                self._running[version] = (running, Client(f"127.0.0.1:{running.port}", timeout=self.timeout))
            return self._running[version][1]

    def close(self) -> None:
        with self._lock:
            for running, client in self._running.values():
                client.close()
                running.stop(grace=1)
            self._running.clear()
