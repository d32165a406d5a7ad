"""The model lifecycle end to end on real parts (issue 15): a real `mlflow server`, two trained versions scored
on one holdout by `onetower evaluate`, `onetower promote` refused on a worse metric then forced, `onetower
rollback`, and a running `onetower serve` process that follows every move of the alias."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from embed.load import load_encoder
from index.config import IndexConfig
from index.publish import find_version_for_model, prune_versions
from onetower.cli import app
from service.client import Client
from training.data.catalog import read_interactions
from training.fitting.config import TrainConfig
from training.fitting.train import train
from training.lifecycle.register import MODEL_NAME, ensure_experiment, metric_tag, register_encoder
from training.reindex.job import reindex

from .conftest import Trained, free_port, start_mlflow_server

# the commands' flags decide; settings from the environment must not
ENV: dict[str, str | None] = {"MLFLOW_TRACKING_URI": None, "ONETOWER_TRACKING_URI": None, "ONETOWER_INDEX_ROOT": None}


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[str]:
    """Its own `mlflow server`: the alias moves here, never the session champion's."""
    before = mlflow.get_tracking_uri()
    port = free_port()
    proc = start_mlflow_server(tmp_path, port, tmp_path / "mlflow.log")
    uri = f"http://127.0.0.1:{port}"
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(before)
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path,
              timeout: float = 120) -> None:
    """Poll `condition` until it holds (the server process must stay up meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _cli(*args: str) -> str:
    return " ".join(CliRunner().invoke(app, list(args), env=ENV).output.split())


def test_promote_refuse_force_rollback_and_a_serving_process_follows(trained: Trained, registry: str,
                                                                    tmp_path: Path) -> None:
    ds, index_root = trained.dataset, tmp_path / "index"
    run_id = MlflowClient().create_run(ensure_experiment("onetower-tests")).info.run_id
    events = read_interactions(ds.interactions)
    good = register_encoder(trained.encoder_dir, run_id, {}, trained_on=events)  # 150 steps: @champion
    weak_run = train(ds.catalog, ds.interactions, tmp_path / "weak", TrainConfig(
        encoder="tiny", max_steps=2, batch_size=32, experiment="onetower-tests"), progress_bar=False)
    weak = register_encoder(weak_run.encoder_dir, weak_run.run_id, {}, alias=None, trained_on=events)
    for version, encoder_dir in ((good, trained.encoder_dir), (weak, weak_run.encoder_dir)):
        reindex(ds.catalog, load_encoder(encoder_dir), MODEL_NAME, version, index_root, IndexConfig(kind="flat"))

    # both versions scored on one holdout by their own registered encoders
    out = _cli("evaluate", "--data", str(ds.root), "--out", str(tmp_path / "eval"), "--models", "popularity",
               "--register-version", f"{good},{weak}", "--tracking-uri", registry)
    assert "tagged 2 version(s)" in out, out
    tags = {v: MlflowClient().get_model_version(MODEL_NAME, v).tags for v in (good, weak)}
    recall = {v: float(tags[v][metric_tag("recall@20")]) for v in (good, weak)}
    assert recall[weak] < recall[good], recall  # 2 steps against 150: the premise of the refusal below

    log, port = tmp_path / "serve.log", free_port()
    cmd = [sys.executable, "-m", "onetower.cli", "serve", "--model", f"models:/{MODEL_NAME}@champion",
           "--index-root", str(index_root), "--tracking-uri", registry, "--port", str(port),
           "--poll-seconds", "0.3", "--cache-dir", str(tmp_path / "serve-cache")]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client:
            def serving(version: str) -> Callable[[], bool]:
                return lambda: client.info().model_version == version
            _wait_for(serving(good), f"version {good} served", proc, log)
            lifecycle = ("--index-root", str(index_root), "--tracking-uri", registry)

            refused = _cli("promote", weak, *lifecycle)
            assert "not promoted" in refused and f"< @champion version {good}" in refused, refused
            assert "@champion: version" in _cli("promote", weak, *lifecycle, "--force")
            _wait_for(serving(weak), f"the swap to version {weak}", proc, log)
            assert client.info().index_version == find_version_for_model(index_root, weak)

            assert f"version {weak} -> {good}" in _cli("rollback", *lifecycle)
            _wait_for(serving(good), f"the swap back to version {good}", proc, log)
            assert client.info().index_version == find_version_for_model(index_root, good)

            _cli("promote", weak, *lifecycle, "--force")
            _wait_for(serving(weak), f"the second swap to version {weak}", proc, log)
            assert prune_versions(index_root, keep=1)  # CURRENT (the weak version's) is kept; the good one's goes
            refused = _cli("rollback", *lifecycle)
            assert "not rolled back" in refused and f"index for version {good} is no longer" in refused, refused
            assert MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion").version == weak
            assert client.info().model_version == weak
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
