"""One bounded load test on loopback: searches and upserts together, a model hot swap in the middle, and
more callers than `--max-concurrent-rpcs` allows.

A real `onetower serve` process follows a registry alias on a private copy of the trained index. Eleven
client threads (8 searching, 3 writing) run against a limit of 4 calls in flight, a prober checks health
every 100 ms, and half-way a new model (the trained weights, perturbed: a different model) is registered,
its index published and the alias moved. Every call must end OK or be shed with RESOURCE_EXHAUSTED
`overloaded`; nothing else. Latencies are measured and printed, never asserted (2 shared cores).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import mlflow
import numpy as np
import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from embed.items import Item
from embed.load import load_encoder, load_model, save_encoder
from index.config import IndexConfig
from index.publish import read_current
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from training.lifecycle.register import MODEL_NAME, ensure_experiment, move_alias, register_encoder
from training.reindex.job import reindex

from .conftest import Trained, free_port
from .crash_util import copy_index_root, serve_process, tail, wait_for

LIMIT = 4  # --max-concurrent-rpcs
SEARCHERS, WRITERS = 8, 3  # 11 callers against the limit
BASELINE_S, BEFORE_SWAP_S, AFTER_SWAP_S = 2.0, 4.0, 4.0
ALIAS = "load-test"  # its own alias: the champion other tests follow is left alone
DEADLINE_S = 30.0
MATCH_COSINE = 0.999  # a stored vector and a fresh embedding of the same content
WORDS = ("wool hat", "linen shirt", "oak side table", "copper kettle", "trail shoe", "ceramic mug")


@dataclass(frozen=True)
class Call:
    kind: str  # "search" | "upsert"
    start: float
    end: float
    code: grpc.StatusCode
    details: str
    model_version: str = ""


@dataclass
class Load:
    """What the clients saw: every call, the acknowledged writes, the shed new ids, health answers."""

    target: str
    catalog_ids: list[str]
    calls: list[Call] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)  # item id -> latest acknowledged title
    shed_new: list[str] = field(default_factory=list)  # new ids whose only upsert was shed
    health: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # answers with wrong content (checked at the end)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def timed(self, kind: str, fn: Callable[[], tuple[str, object]]) -> tuple[grpc.StatusCode, object]:
        start = time.monotonic()
        try:
            version, result = fn()
            self.record(Call(kind, start, time.monotonic(), grpc.StatusCode.OK, "", version))
            return grpc.StatusCode.OK, result
        except grpc.RpcError as e:
            self.record(Call(kind, start, time.monotonic(), e.code(), e.details() or ""))
            return e.code(), None

    def searcher(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.target, timeout=DEADLINE_S) as c:
            while not self.stop.is_set():
                with self.lock:  # one in five queries asks for an item written during the test
                    own = list(self.acked) if rng.random() < 0.2 else []
                query = rng.choice(own or self.catalog_ids)
                request = pb.SimilarItemsRequest(queries=[pb.Query(item_id=query)], k=10)

                def search(request: pb.SimilarItemsRequest = request) -> tuple[str, object]:
                    response = c.stub.SimilarItems(request, timeout=DEADLINE_S)
                    return response.model_version, response

                code, response = self.timed("search", search)
                if code == grpc.StatusCode.OK:
                    assert isinstance(response, pb.SimilarItemsResponse)
                    ids = [n.item_id for n in response.results[0].neighbors]
                    if len(ids) != 10 or len(set(ids)) != 10 or query in ids:
                        self.wrong.append(f"{query}: {ids}")

    def writer(self, number: int) -> None:
        rng = random.Random(1000 + number)
        mine: list[str] = []
        with Client(self.target, timeout=DEADLINE_S) as c:
            for i in range(1_000_000):
                if self.stop.is_set():
                    return
                rewrite = bool(mine) and rng.random() < 0.25  # new content for an item acknowledged earlier
                item_id = rng.choice(mine) if rewrite else f"load-{number}-{i}"
                title = f"{rng.choice(WORDS)} {number}-{i}"

                def upsert(item_id: str = item_id, title: str = title) -> tuple[str, object]:
                    response = c.upsert([pb.Item(item_id=item_id, title=title)])
                    return response.model_version, response

                code, _ = self.timed("upsert", upsert)
                if code == grpc.StatusCode.OK:
                    with self.lock:
                        self.acked[item_id] = title
                    if not rewrite:
                        mine.append(item_id)
                elif not rewrite:
                    self.shed_new.append(item_id)

    def prober(self) -> None:
        with Client(self.target, timeout=5) as c:
            while not self.stop.wait(0.1):
                try:
                    self.health.append(c.health_status())
                except grpc.RpcError as e:
                    self.health.append(e.code().name)


def _perturbed_copy(encoder_dir: Path, out: Path) -> Path:
    """The trained encoder with every weight moved by ~5% noise: a different model of the same shape."""
    model, tokenizer = load_model(encoder_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return save_encoder(out, model, tokenizer)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    a = 1e3 * np.asarray(values)
    return f"p50 {np.median(a):.1f} ms, p99 {np.quantile(a, 0.99):.1f} ms (n={len(a)})"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.timeout(900)
def test_searches_and_upserts_through_a_hot_swap_and_overload(trained: Trained, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(trained.tracking_uri)
    registry = MlflowClient(trained.tracking_uri)
    move_alias(registry, MODEL_NAME, ALIAS, trained.model_version)
    old_version = trained.model_version
    root = copy_index_root(trained.index_root, tmp_path / "index")
    next_dir = _perturbed_copy(trained.encoder_dir, tmp_path / "next-encoder")
    catalog_ids = pl.read_parquet(trained.dataset.catalog, columns=["item_id"])["item_id"].to_list()

    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = serve_process(root, trained.tracking_uri, port, tmp_path / "cache", log, poll_seconds=0.5,
                         model_uri=f"models:/{MODEL_NAME}@{ALIAS}", extra=("--max-concurrent-rpcs", str(LIMIT)))
    load = Load(target, catalog_ids)
    threads: list[threading.Thread] = []
    try:
        with Client(target, timeout=2) as c:
            wait_for(lambda: _health(c) == "SERVING", "SERVING", proc, log, timeout=300)
        # unloaded: one caller, one search at a time
        baseline: list[float] = []
        with Client(target) as c:
            until = time.monotonic() + BASELINE_S
            while time.monotonic() < until:
                start = time.monotonic()
                c.similar(item_ids=[random.choice(catalog_ids)], k=10)
                baseline.append(time.monotonic() - start)

        threads = [threading.Thread(target=load.searcher, args=(n,)) for n in range(SEARCHERS)]
        threads += [threading.Thread(target=load.writer, args=(n,)) for n in range(WRITERS)]
        threads.append(threading.Thread(target=load.prober))
        for t in threads:
            t.start()
        time.sleep(BEFORE_SWAP_S)

        # the hot swap: a new version, its index, then the alias (the service polls every 0.5 s)
        swap_started = time.monotonic()
        run = registry.create_run(ensure_experiment("onetower-tests"))
        new_version = register_encoder(next_dir, run.info.run_id, {"train_loss": 1.0}, alias=None)
        reindex(trained.dataset.catalog, load_encoder(next_dir), MODEL_NAME, new_version, root,
                IndexConfig(kind="flat"))
        alias_moved = time.monotonic()
        move_alias(registry, MODEL_NAME, ALIAS, new_version)
        with Client(target) as c:
            wait_for(lambda: _served_version(c) == new_version, "the swap to the new version", proc, log,
                     timeout=120, every=0.05)
        swapped = time.monotonic()
        time.sleep(AFTER_SWAP_S)
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=60)

    try:
        _check(load, old_version, new_version, root, target, next_dir, trained, log)
        accepted = [c.end - c.start for c in load.calls if c.kind == "search" and c.code == grpc.StatusCode.OK]
        shed = [c.end - c.start for c in load.calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        print(f"\nload: {Counter((c.kind, c.code.name) for c in load.calls)}; "
              f"{len(load.acked)} items acknowledged, {len(load.shed_new)} new items shed\n"
              f"  searches unloaded {_ms(baseline)}; accepted under overload {_ms(accepted)}\n"
              f"  refusals {_ms(shed)}\n"
              f"  swap: register + reindex {alias_moved - swap_started:.1f} s, alias moved -> served "
              f"{swapped - alias_moved:.1f} s; health {Counter(load.health)}")
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, tail(log)


def _health(c: Client) -> str:
    try:
        return c.health_status()
    except grpc.RpcError as e:
        return e.code().name


def _served_version(c: Client) -> str:
    """GetInfo's model version, or "" when the call was shed (it counts against the limit too)."""
    try:
        return c.info().model_version
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return ""


def _check(load: Load, old_version: str, new_version: str, root: Path, target: str, next_dir: Path,
           trained: Trained, log: Path) -> None:
    calls = load.calls
    # 1. every call OK or shed by the concurrency limit; both happened, and writes made progress
    bad = [c for c in calls if c.code != grpc.StatusCode.OK and not (
        c.code == grpc.StatusCode.RESOURCE_EXHAUSTED and c.details.startswith("overloaded:"))]
    assert not bad, f"{len(bad)} failed calls, e.g. {bad[:3]}\n{tail(log)}"
    codes = Counter((c.kind, c.code) for c in calls)
    assert codes["search", grpc.StatusCode.OK] > 50 and codes["upsert", grpc.StatusCode.OK] > 20, codes
    assert sum(n for (_, code), n in codes.items() if code == grpc.StatusCode.RESOURCE_EXHAUSTED) > 0, \
        f"the limit of {LIMIT} was never reached: {codes}"
    assert load.health and set(load.health) == {"SERVING"}, Counter(load.health)
    assert not load.wrong, load.wrong[:3]  # 10 distinct neighbours, never the query itself

    # 2. both models served; once a caller has seen the new one, no call started later sees the old one
    ok = [c for c in calls if c.code == grpc.StatusCode.OK]
    assert {c.model_version for c in ok} == {old_version, new_version}
    first_new = min(c.end for c in ok if c.model_version == new_version)
    late_old = [c for c in ok if c.start > first_new and c.model_version == old_version]
    assert not late_old, late_old[:3]

    with Client(target) as c:
        info = c.info()
        assert (info.model_version, info.index_version) == (new_version, read_current(root))
        # 3. every acknowledged write is served with its latest content, embedded by the new model
        ids = sorted(load.acked)
        stored = c.embeddings(ids)
        assert set(stored) == set(ids)
        items = [Item(item_id=i, title=load.acked[i]) for i in ids]
        got = np.asarray([stored[i] for i in ids])
        assert _cosines(got, load_encoder(next_dir).encode(items)).min() > MATCH_COSINE
        # ... and not the vectors the old model gave them before the swap (the log was re-embedded)
        assert np.median(_cosines(got, load_encoder(trained.encoder_dir).encode(items))) < MATCH_COSINE
        # 4. a shed upsert did nothing
        for item_id in load.shed_new[:50]:
            with pytest.raises(grpc.RpcError) as refused:
                c.embeddings([item_id])
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
