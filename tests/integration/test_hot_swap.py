"""Hot swap: the service follows the registry alias, and swaps only a model with its own index."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import grpc
import mlflow
import pytest
from mlflow import MlflowClient

from embed.load import load_encoder
from index.config import IndexConfig
from index.publish import VERSIONS, list_versions, read_current, set_current
from protos.onetower.v1 import onetower_pb2 as pb
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
        if old_index is not None:  # the shared root as other tests expect it: one version, CURRENT on it
            set_current(trained.index_root, old_index)
            for version in set(list_versions(trained.index_root)) - {old_index}:
                shutil.rmtree(trained.index_root / VERSIONS / version)
    assert not errors, errors[:3]


def test_stop_lets_an_in_flight_call_finish_and_refuses_new_ones(swap_server: RunningServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What SIGTERM does (serve_until_signal calls stop): a call already running completes with its answer."""
    target = f"127.0.0.1:{swap_server.port}"
    encoder = swap_server.holder.current.encoder
    entered, release = threading.Event(), threading.Event()
    real = encoder.encode_features

    def gated(features):  # type: ignore[no-untyped-def]
        entered.set()  # the call is inside the server, holding the encoder
        assert release.wait(60)
        return real(features)

    monkeypatch.setattr(encoder, "encode_features", gated)
    answers: list[object] = []
    in_flight = threading.Thread(target=lambda: answers.append(_embed(target)))
    in_flight.start()
    assert entered.wait(30)
    stopper = threading.Thread(target=swap_server.stop, kwargs={"grace": 60})
    stopper.start()
    with Client(target, timeout=2) as late:  # new calls are refused once stop has begun
        deadline = time.monotonic() + 30
        while _accepted(late):
            assert time.monotonic() < deadline, "still accepting calls after stop()"
    assert in_flight.is_alive() and stopper.is_alive()  # stop waits for the held call
    release.set()
    in_flight.join(30)
    stopper.join(30)
    assert not stopper.is_alive() and len(answers) == 1
    response = answers[0]
    assert isinstance(response, pb.EmbedItemsResponse), response  # the in-flight call got its answer, not an error
    assert len(response.embeddings) == 1 and list(response.embeddings[0].modalities) == ["text"]


def _embed(target: str) -> object:
    """EmbedItems' response, or the RpcError it raised."""
    with Client(target, timeout=60) as c:
        try:
            return c.embed([pb.Item(title="red leather bag")])
        except grpc.RpcError as e:
            return e


def _accepted(client: Client) -> bool:
    try:
        client.info()
    except grpc.RpcError:
        return False
    return True
