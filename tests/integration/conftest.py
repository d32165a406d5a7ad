"""Real parts on loopback: an `mlflow server` with a sqlite store, a tiny trained model, a gRPC server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from embed.load import load_encoder
from index.config import IndexConfig
from service.client import Client
from service.config import ServiceConfig
from service.server import RunningServer, start_server
from training.data.synthetic import SynthConfig, SynthDataset, generate
from training.fitting.config import TrainConfig
from training.fitting.train import train
from training.lifecycle.register import MODEL_NAME, ensure_experiment, register_encoder
from training.reindex.job import reindex

# Enough data and steps that neighbours carry the generator's traits, small enough for 2 CPU cores.
N_ITEMS, N_USERS, STEPS = 400, 300, 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlflow_server(root: Path, port: int, log: Path, timeout: float = 180,
                        new_session: bool = False) -> subprocess.Popen[bytes]:
    """`mlflow server` on loopback `port` with a sqlite store and artifacts under `root`; returns once
    /health answers. `new_session`: its own process group, so a test can SIGKILL the CLI and its workers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", (root / "artifacts").as_uri(), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=root,
                            start_new_session=new_session, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` subprocess on a free loopback port with a sqlite backend store."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_mlflow_server(root, port, root / "server.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass(frozen=True)
class Trained:
    dataset: SynthDataset
    tracking_uri: str
    model_version: str
    encoder_dir: Path
    index_root: Path
    workdir: Path


@pytest.fixture(scope="session")
def trained(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Synthetic catalog -> Lightning training -> registered in the mlflow server -> published index."""
    work = tmp_path_factory.mktemp("trained")
    ds = generate(work / "data", SynthConfig(n_items=N_ITEMS, n_users=N_USERS, seed=7, image_size=32))
    mlflow.set_tracking_uri(mlflow_server)
    ensure_experiment("onetower-tests")
    config = TrainConfig(encoder="tiny", max_steps=STEPS, batch_size=64, lr=3e-3, warmup_steps=10,
                         experiment="onetower-tests")
    result = train(ds.catalog, ds.interactions, work / "run", config, progress_bar=False)
    version = register_encoder(result.encoder_dir, result.run_id, result.metrics)
    encoder = load_encoder(result.encoder_dir)
    reindex(ds.catalog, encoder, MODEL_NAME, version, work / "index", IndexConfig(kind="flat"))
    return Trained(ds, mlflow_server, version, result.encoder_dir, work / "index", work)


def serve_champion(trained: Trained, cache: str) -> RunningServer:
    """Start the gRPC service on a free port, following models:/onetower-encoder@champion."""
    return start_server(ServiceConfig(model_uri=f"models:/{MODEL_NAME}@champion", index_root=trained.index_root,
                                      tracking_uri=trained.tracking_uri, port=0, poll_seconds=0,
                                      cache_dir=trained.workdir / cache))


@pytest.fixture(scope="session")
def server(trained: Trained) -> Iterator[RunningServer]:
    running = serve_champion(trained, "model-cache")
    yield running
    running.stop(grace=1)


@pytest.fixture()
def client(server: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c
