"""gRPC `SimilarItems` from a separate client process vs the same search in-process: added latency and ratio.

Side by side in the same run: the floor of Python gRPC itself on this machine, a server on the same
proto whose handler returns a prepared response of the same shape without doing anything. What the
service adds beyond search is (gRPC p50 - in-process p50); of that, everything above the floor is ours
(parsing, validation, interceptor, metrics, building the response).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from embed.config import preset
from embed.load import save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from index.ids import IdMap
from index.live import LiveIndex
from index.publish import load_version, publish_index
from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.server import start_server

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

DIM = 64
N = 20_000 if QUICK else 200_000
RUNS = [(1, 1), (8, 1), (32, 1), (1, 64)]  # (concurrency, queries per request)

CLIENT = textwrap.dedent("""
    import json, sys, time, threading
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from service.client import Client
    from protos.onetower.v1 import onetower_pb2 as pb
    target, conc, n, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    lat = []
    def worker(seed):
        rng = np.random.default_rng(seed)
        with Client(target) as c:
            for _ in range(n // conc):
                ids = [f"i{j}" for j in rng.integers(0, 1000, batch)]
                req = pb.SimilarItemsRequest(queries=[pb.Query(item_id=i) for i in ids], k=10)
                t = time.perf_counter(); c.stub.SimilarItems(req, timeout=30); lat.append(time.perf_counter() - t)
    with Client(target) as c:  # warm up
        for _ in range(20): c.similar(item_ids=["i1"], k=10)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(s,)) for s in range(conc)]
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.perf_counter() - t0
    print(json.dumps({"lat": lat, "wall": wall}))
""")


class _Prepared(pb_grpc.RecommendationsServicer):
    """The floor: answers SimilarItems with a prepared response of the right shape, doing no work."""

    def __init__(self, responses: dict[int, pb.SimilarItemsResponse]) -> None:
        self.responses = responses

    def SimilarItems(self, request: pb.SimilarItemsRequest, context: Any) -> pb.SimilarItemsResponse:
        return self.responses[len(request.queries)]


def _publish(root: Path, model_version: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = IdMap([f"i{i}" for i in range(N)], [""] * N, [{}] * N)
    publish_index(root, x, ids, IndexConfig(kind="hnsw"), "bench", model_version)


def _client(port: int, conc: int, batch: int) -> dict[str, float]:
    repo = str(Path(__file__).resolve().parents[2])
    n = (200 if QUICK else 2000) // batch * max(1, conc // 8)
    out = subprocess.run([sys.executable, "-c", CLIENT, repo, f"127.0.0.1:{port}", str(conc), str(n), str(batch)],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lat = np.asarray(res["lat"])
    return {"p50_ms": 1e3 * float(np.median(lat)), "p99_ms": 1e3 * float(np.quantile(lat, 0.99)),
            "qps": len(lat) * batch / res["wall"]}


def _in_process_p50(live: LiveIndex, q: np.ndarray, batch: int) -> float:
    """p50 seconds of the same search called in-process, `batch` queries per call."""
    ids = [f"i{i}" for i in range(len(q))]
    for i in range(20):
        live.search(q[i:i + batch], 10, self_ids=ids[i:i + batch])
    t = []
    for i in range(0, len(q) - batch + 1, max(1, batch // 8)):
        s = time.perf_counter()
        live.search(q[i:i + batch], 10, self_ids=ids[i:i + batch])
        t.append(time.perf_counter() - s)
    return float(np.median(t))


def test_grpc_overhead_vs_in_process(tmp_path: Path) -> None:
    # the service needs an encoder to start; a tiny untrained one in a local folder suffices here
    tok = TextTokenizer.train(["bench item text"] * 10, 100, min_frequency=1)
    enc_dir = save_encoder(tmp_path / "bench", UnifiedEncoder(preset("tiny", vocab_size=tok.vocab_size,
                                                                     embed_dim=DIM)), tok)
    version = f"local:{enc_dir.resolve()}"
    root = tmp_path / "index"
    _publish(root, version)
    live = LiveIndex(load_version(root), None, version)
    q = np.asarray([live.vector(f"i{i}") for i in range(400)])
    in_process = {b: _in_process_p50(live, q, b) for b in sorted({b for _, b in RUNS})}

    # the floor: same proto, same client, a handler that does nothing
    responses = {b: pb.SimilarItemsResponse(
        results=[pb.Neighbors(neighbors=[pb.Neighbor(item_id=h.item_id, score=h.score) for h in hits])
                 for hits in live.search(q[:b], 10)], model_version="1", index_version="v") for b in in_process}
    floor_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_RecommendationsServicer_to_server(_Prepared(responses), floor_server)
    floor_port = floor_server.add_insecure_port("127.0.0.1:0")
    floor_server.start()
    try:
        floor = {run: _client(floor_port, *run) for run in RUNS}
    finally:
        floor_server.stop(0)

    running = start_server(ServiceConfig(model_uri=str(enc_dir), index_root=root, port=0, poll_seconds=0,
                                         cache_dir=tmp_path / "cache"))
    rows = []
    try:
        for conc, batch in RUNS:
            ours = _client(running.port, conc, batch)
            base = floor[(conc, batch)]
            rows.append({"concurrency": conc, "queries/request": batch, "p50_ms": ours["p50_ms"],
                         "p99_ms": ours["p99_ms"], "qps": ours["qps"],
                         "in_process_p50_ms": 1e3 * in_process[batch],
                         "added_p50_ms": ours["p50_ms"] - 1e3 * in_process[batch],
                         "grpc_floor_p50_ms": base["p50_ms"], "floor_qps": base["qps"],
                         "ours_above_floor_ms": ours["p50_ms"] - 1e3 * in_process[batch] - base["p50_ms"]})
    finally:
        running.stop(grace=0)
    write_result("service_overhead", rows,
                 f"SimilarItems by id, k=10, HNSW over {N} x {DIM} unit vectors; client in a separate process. "
                 "in_process: the same LiveIndex.search called directly with the same number of queries. "
                 "grpc_floor: the same client against a server on the same proto whose handler returns a "
                 "prepared response of the same shape (Python gRPC's own cost on this machine). "
                 "ours_above_floor = p50 - in_process - floor.")
