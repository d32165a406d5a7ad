"""Overload on loopback: beyond `max_concurrent_rpcs` calls are shed fast, accepted ones and health go on."""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc
from service.server import RunningServer, start_server

from .conftest import Served, make_config, png

LIMIT, CALLERS, LOAD_SECONDS = 3, 16, 3.0


def _search(i: int) -> pb.SimilarItemsRequest:
    """A query by content: featurised and encoded through the micro-batcher, then searched."""
    item = pb.Item(title=f"blue leather bag {i % 7}", images=[png((i % 255, 40, 90))])
    return pb.SimilarItemsRequest(queries=[pb.Query(item=item)], k=5)


def _upsert(thread: int, i: int) -> pb.UpsertItemsRequest:
    return pb.UpsertItemsRequest(items=[pb.Item(item_id=f"load-{thread}-{i}", title=f"red cotton shirt {i}",
                                                attributes={"category": "shirt"})])


def _call(stub: pb_grpc.RecommendationsStub, kind: str, request: object) -> tuple[str, grpc.StatusCode, str, float]:
    method = stub.SimilarItems if kind == "search" else stub.UpsertItems
    started = time.perf_counter()
    try:
        method(request, timeout=30)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    return kind, code, details, time.perf_counter() - started


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def test_overload_is_shed_fast_while_accepted_calls_and_health_go_on(served: Served, tmp_path: Path) -> None:
    shutil.copytree(served.root / "index", tmp_path / "index")  # upserts go to this copy's live log
    running: RunningServer = start_server(make_config(served, index_root=tmp_path / "index", workers=LIMIT,
                                                      max_concurrent_rpcs=LIMIT, max_wait_ms=5.0))
    target = f"127.0.0.1:{running.port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RecommendationsStub(channel)
            baseline = [_call(stub, "search", _search(i)) for i in range(40)]
        assert {c for _, c, _, _ in baseline} == {grpc.StatusCode.OK}

        results: list[tuple[str, grpc.StatusCode, str, float]] = []
        acknowledged: list[str] = []
        probes: list[str] = []
        stop = threading.Event()

        def caller(n: int) -> None:
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.RecommendationsStub(channel)
                i = 0
                while not stop.is_set():
                    request = _upsert(n, i) if i % 3 == 2 else _search(n * 1000 + i)
                    outcome = _call(stub, "upsert" if i % 3 == 2 else "search", request)
                    results.append(outcome)
                    if outcome[0] == "upsert" and outcome[1] == grpc.StatusCode.OK:
                        acknowledged.append(f"load-{n}-{i}")
                    i += 1

        def prober() -> None:
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        probes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                    except grpc.RpcError as e:
                        probes.append(e.code().name)
                    time.sleep(0.05)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
        threads.append(threading.Thread(target=prober))
        for t in threads:
            t.start()
        time.sleep(LOAD_SECONDS)
        stop.set()
        for t in threads:
            t.join(timeout=60)

        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RecommendationsStub(channel)
            stored = stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=acknowledged[:1000]), timeout=30)
        in_flight = running.metrics.in_flight._value.get()
        shed_counted = sum(running.metrics.shed.labels(m)._value.get() for m in ("SimilarItems", "UpsertItems"))
    finally:
        running.stop(grace=1)

    codes = Counter(c.name for _, c, _, _ in results)
    accepted = [s for kind, c, _, s in results if c == grpc.StatusCode.OK and kind == "search"]
    shed = [s for _, c, _, s in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    unloaded = [s for _, _, _, s in baseline]
    print(f"\ncodes {dict(codes)}; health probes {len(probes)} {set(probes)}")
    print(f"shed latency p50 {_p(shed, 50) * 1000:.2f} ms p99 {_p(shed, 99) * 1000:.2f} ms (n={len(shed)})")
    print(f"accepted search p50 {_p(accepted, 50) * 1000:.2f} ms under overload vs {_p(unloaded, 50) * 1000:.2f} ms "
          f"unloaded: ratio {_p(accepted, 50) / _p(unloaded, 50):.2f} (n={len(accepted)}, {len(unloaded)})")

    # only OK or the overload refusal, and the refusal says why
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert all(d.startswith("overloaded: ") for _, c, d, _ in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and accepted and acknowledged, codes
    assert shed_counted == len(shed)
    # probes are exempt from the limit: every one answered SERVING
    assert probes and set(probes) == {"SERVING"}, probes
    # every acknowledged upsert is stored; nothing is left counted in flight
    assert len(stored.embeddings) == min(len(acknowledged), 1000)
    assert in_flight == 0
