"""Hot swap: the service follows the registry alias, and swaps only a model with its own index."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import mlflow
import pytest
from mlflow import MlflowClient

from embed.load import load_encoder
from index.config import IndexConfig
from index.publish import read_current, set_current
from service.client import Client
from service.server import RunningServer
from service.snapshot import PairMismatchError
from training.lifecycle.register import MODEL_NAME, register_encoder
from training.reindex.job import reindex

from .conftest import Trained, serve_champion


@pytest.fixture()
def swap_server(trained: Trained) -> Iterator[RunningServer]:
    running = serve_champion(trained, "swap-cache")
    yield running
    running.stop(grace=1)


def test_swap_follows_alias_without_dropping_requests(swap_server: RunningServer, trained: Trained) -> None:
    mlflow.set_tracking_uri(trained.tracking_uri)
    registry = MlflowClient(trained.tracking_uri)
    old_version = registry.get_model_version_by_alias(MODEL_NAME, "champion").version
    old_index = read_current(trained.index_root)
    target = f"127.0.0.1:{swap_server.port}"
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        with Client(target) as c:
            while not stop.is_set():
                try:
                    assert len(c.similar(item_ids=["item-000001"], k=5)[0]) == 5
                except BaseException as e:  # noqa: BLE001 - collected for the assertion below
                    errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # a new version whose index does not exist yet is not served
        run = registry.create_run(mlflow.get_experiment_by_name("onetower-tests").experiment_id)
        new_version = register_encoder(trained.encoder_dir, run.info.run_id, {"train_loss": 1.0})
        with pytest.raises(PairMismatchError):
            swap_server.holder.refresh()
        with Client(target) as c:
            assert c.info().model_version == old_version
        # once its index is published, the pair is swapped in
        reindex(trained.dataset.catalog, load_encoder(trained.encoder_dir), MODEL_NAME, new_version,
                trained.index_root, IndexConfig(kind="flat"))
        assert swap_server.holder.refresh() is True
        with Client(target) as c:
            info = c.info()
        assert info.model_version == new_version
        assert info.index_version == read_current(trained.index_root) != old_index
    finally:
        stop.set()
        for t in threads:
            t.join()
        registry.set_registered_model_alias(MODEL_NAME, "champion", old_version)
        if old_index is not None:
            set_current(trained.index_root, old_index)
    assert not errors, errors[:3]


def test_sigterm_style_stop_finishes_in_flight(swap_server: RunningServer) -> None:
    with Client(f"127.0.0.1:{swap_server.port}") as c:
        assert c.health_status() == "SERVING"
    swap_server.stop(grace=2)
    with Client(f"127.0.0.1:{swap_server.port}", timeout=2) as c, pytest.raises(grpc.RpcError):
        c.info()
