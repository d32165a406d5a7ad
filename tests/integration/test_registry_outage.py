"""Registry outage: a real `mlflow server` is SIGKILLed while the service polls it, then restarted on its store."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import mlflow
import pytest
import torch
from mlflow import MlflowClient

from embed.config import preset
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.config import ServiceConfig
from service.server import start_server
from training.lifecycle.register import MODEL_NAME, ensure_experiment, register_encoder

from .conftest import free_port, start_mlflow_server
from .hanging_proxy import HangingProxy

POLL_S, TIMEOUT_S = 0.5, 5.0  # a loaded 2-core machine can take seconds to answer


class _Registry:
    """`mlflow server` on a sqlite store and a fixed port, in its own process group (it runs uvicorn as a child)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_mlflow_server(self.root, self.port, self.root / f"server-{time.monotonic_ns()}.log",
                                        new_session=True)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the CLI and its uvicorn child)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[_Registry]:
    reg = _Registry(tmp_path)
    reg.start()
    yield reg
    reg.kill()


def _tiny_model(root: Path) -> tuple[Path, list[Item]]:
    items = [Item(item_id=f"item-{i:03d}", title=f"{c} {k} {i}", attributes={"category": k})
             for i, (c, k) in enumerate((c, k) for c in ("red", "blue", "green") for k in ("bag", "lamp", "mug"))]
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([it.text for it in items], 200, min_frequency=1)
    return save_encoder(root / "encoder", UnifiedEncoder(preset("tiny", vocab_size=tokenizer.vocab_size)),
                        tokenizer), items


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event:
            self.events.append(event)


def _register(registry_uri: str, encoder_dir: Path, experiment: str, loss: float = 1.0) -> str:
    """Register `encoder_dir` in the registry at `registry_uri` as the champion; the global tracking URI
    is left as it was."""
    previous_uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(registry_uri)
        run = MlflowClient(registry_uri).create_run(ensure_experiment(experiment))
        return register_encoder(encoder_dir, run.info.run_id, {"train_loss": loss})
    finally:
        mlflow.set_tracking_uri(previous_uri)


def _publish(root: Path, encoder_dir: Path, items: list[Item], version: str) -> None:
    vectors = load_encoder(encoder_dir).encode(items)
    ids = IdMap([it.item_id for it in items], [it.content_hash() for it in items], [dict(it.attributes) for it in items])
    publish_index(root, vectors, ids, IndexConfig(kind="flat"), MODEL_NAME, version)


def _registered_and_published(registry_uri: str, tmp_path: Path, experiment: str) -> tuple[Path, list[Item], str]:
    """A tiny encoder registered as the champion and an index published for it under tmp_path/index."""
    encoder_dir, items = _tiny_model(tmp_path)
    version = _register(registry_uri, encoder_dir, experiment)
    _publish(tmp_path / "index", encoder_dir, items, version)
    return encoder_dir, items, version


@pytest.fixture()
def records() -> Iterator[_Records]:
    """The `event`s the service's snapshot watcher logs (outage_started, outage_ended, started_from_cache)."""
    records = _Records()
    watched = logging.getLogger("service.snapshot")
    level = watched.level
    watched.setLevel(logging.INFO)  # the recovery is logged at INFO
    watched.addHandler(records)
    try:
        yield records
    finally:
        watched.removeHandler(records)
        watched.setLevel(level)


def _wait(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_registry_killed_while_polling_fails_no_lookup_and_the_watcher_recovers(registry: _Registry,
                                                                                 tmp_path: Path,
                                                                                 records: _Records) -> None:
    registry_uri = registry.uri
    _, items, version = _registered_and_published(registry_uri, tmp_path, "outage")
    running = start_server(ServiceConfig(model_uri=f"models:/{MODEL_NAME}@champion", index_root=tmp_path / "index",
                                         tracking_uri=registry_uri, port=0, poll_seconds=POLL_S,
                                         registry_timeout_s=TIMEOUT_S, cache_dir=tmp_path / "cache"))
    failures: list[str] = []
    latencies: dict[str, list[float]] = {"up": [], "down": []}
    phase = ["up"]
    health: list[str] = []
    stop = threading.Event()

    def lookups() -> None:
        with Client(f"127.0.0.1:{running.port}", timeout=5) as c:
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    assert len(c.similar(item_ids=[items[i % len(items)].item_id], k=3)[0]) == 3
                    c.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=[items[(i + 1) % len(items)].item_id]))
                    latencies[phase[0]].append(time.perf_counter() - started)
                    health.append(c.health_status())
                except (grpc.RpcError, AssertionError) as e:
                    failures.append(repr(e))
                i += 1

    threads = [threading.Thread(target=lookups) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)  # a few successful polls
        assert records.events == [] and running.watcher.failing_since is None
        registry.kill()
        phase[0] = "down"
        killed = time.monotonic()
        assert _wait(lambda: "outage_started" in records.events, 3 * TIMEOUT_S), records.events
        noticed = time.monotonic() - killed
        time.sleep(3.0)  # down for several polls more, lookups going on
        assert running.watcher.failing_since is not None
        outage_polls_ok = "outage_ended" not in records.events
        phase[0] = "up"
        registry.start()  # a new server on the same store and port
        assert _wait(lambda: "outage_ended" in records.events, 6 * TIMEOUT_S), records.events
        assert running.watcher.failing_since is None
        with Client(f"127.0.0.1:{running.port}") as c:
            assert c.info().model_version == version
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        running.stop(grace=1)

    def p50(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] * 1000

    print(f"\noutage noticed {noticed:.2f}s after SIGKILL; lookups p50 {p50(latencies['up']):.2f} ms registry up, "
          f"{p50(latencies['down']):.2f} ms down (n={len(latencies['up'])}, {len(latencies['down'])})")
    assert outage_polls_ok
    assert not failures, failures[:3]
    assert latencies["down"] and set(health) == {"SERVING"}
    assert records.events.count("outage_started") == 1  # logged once, not once per poll


def test_restart_while_the_registry_is_down_starts_from_the_model_cache(registry: _Registry, tmp_path: Path,
                                                                        records: _Records) -> None:
    """A pod restarted during a registry outage comes up on the model it served before (its cached files
    and the CURRENT index built with them), then follows the registry again once it answers."""
    _, items, version = _registered_and_published(registry.uri, tmp_path, "outage-restart")
    config = ServiceConfig(model_uri=f"models:/{MODEL_NAME}@champion", index_root=tmp_path / "index",
                           tracking_uri=registry.uri, port=0, poll_seconds=POLL_S, registry_timeout_s=TIMEOUT_S,
                           cache_dir=tmp_path / "cache")
    first = start_server(config)  # downloads the model into the cache
    first.stop(grace=1)

    registry.kill()
    started = time.monotonic()
    running = start_server(config)  # the registry is down for all of this
    startup_s = time.monotonic() - started
    try:
        assert "started_from_cache" in records.events
        with Client(f"127.0.0.1:{running.port}", timeout=5) as c:
            assert c.health_status() == "SERVING"
            assert c.info().model_version == version
            for it in items:
                assert len(c.similar(item_ids=[it.item_id], k=3)[0]) == 3
            assert c.upsert([pb.Item(item_id="while-down", title="red bag")]).upserted == 1
            assert "while-down" in c.embeddings(["while-down"])
        assert _wait(lambda: "outage_started" in records.events, 3 * TIMEOUT_S), records.events
        registry.start()
        assert _wait(lambda: "outage_ended" in records.events, 6 * TIMEOUT_S), records.events
        with Client(f"127.0.0.1:{running.port}") as c:
            assert c.info().model_version == version
    finally:
        running.stop(grace=1)
    print(f"\nstarted from the cache in {startup_s:.1f}s with the registry down")


def test_a_hanging_registry_fails_no_lookup_and_a_hung_download_only_delays_the_swap(
        registry: _Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records: _Records) -> None:
    """The registry behind a proxy that stops answering (connections accepted, nothing sent back): first
    every request, then only the artifact downloads of a newly registered version. Lookups never fail;
    the new version is served once the downloads answer again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")  # what `onetower serve` bounds downloads with
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy = HangingProxy(registry.port)
    encoder_dir, items, first = _registered_and_published(registry.uri, tmp_path, "outage-hang")
    running = start_server(ServiceConfig(model_uri=f"models:/{MODEL_NAME}@champion", index_root=tmp_path / "index",
                                         tracking_uri=proxy.uri, port=0, poll_seconds=POLL_S, registry_timeout_s=1.0,
                                         cache_dir=tmp_path / "cache"))
    target = f"127.0.0.1:{running.port}"
    failures: list[str] = []
    health: list[str] = []
    stop = threading.Event()

    def lookups() -> None:
        with Client(target, timeout=5) as c:
            i = 0
            while not stop.is_set():
                try:
                    assert len(c.similar(item_ids=[items[i % len(items)].item_id], k=3)[0]) == 3
                    health.append(c.health_status())
                except (grpc.RpcError, AssertionError) as e:
                    failures.append(repr(e))
                i += 1

    def served() -> str:
        with Client(target) as c:
            return c.info().model_version

    threads = [threading.Thread(target=lookups) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        # 1. the registry hangs on every request: each poll gives up after --registry-timeout
        proxy.hang()
        assert _wait(lambda: "outage_started" in records.events, 10), records.events
        time.sleep(2.0)
        proxy.forward()
        assert _wait(lambda: "outage_ended" in records.events, 10), records.events
        # 2. a new version whose files hang: found by the poll, its download times out, nothing swaps
        proxy.hang(("/mlflow-artifacts/",))
        second = _register(registry.uri, encoder_dir, "outage-hang", loss=0.5)
        _publish(tmp_path / "index", encoder_dir, items, second)
        assert _wait(lambda: any("/mlflow-artifacts/" in line for line in proxy.held), 10), \
            f"the watcher never asked for the new version's files: {proxy.held}"
        time.sleep(4.0)  # past the download's timeout
        assert served() == first
        proxy.forward()
        assert _wait(lambda: served() == second, 20), records.events
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        running.stop(grace=1)
        proxy.close()
    assert not failures, failures[:3]
    assert health and set(health) == {"SERVING"}
    print(f"\nheld requests: {proxy.held}; events {records.events}")
