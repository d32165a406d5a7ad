"""gRPC `SimilarItems` from a separate client process vs the same search in-process: added latency and ratio."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
from service.config import ServiceConfig
from service.server import start_server

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

DIM = 64
N = 20_000 if QUICK else 200_000

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


def _publish(root: Path, model_version: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = IdMap([f"i{i}" for i in range(N)], [""] * N, [{}] * N)
    publish_index(root, x, ids, IndexConfig(kind="hnsw"), "bench", model_version)


def test_grpc_overhead_vs_in_process(tmp_path: Path) -> None:
    # the service needs an encoder to start; a tiny untrained one in a local folder suffices here
    tok = TextTokenizer.train(["bench item text"] * 10, 100, min_frequency=1)
    enc_dir = save_encoder(tmp_path / "bench", UnifiedEncoder(preset("tiny", vocab_size=tok.vocab_size,
                                                                     embed_dim=DIM)), tok)
    version = f"local:{enc_dir.resolve()}"
    root = tmp_path / "index"
    _publish(root, version)
    live = LiveIndex(load_version(root), None, version)
    q = np.asarray([live.vector(f"i{i}") for i in range(200)])
    for i in range(20):
        live.search(q[i:i + 1], 10, self_ids=[f"i{i}"])
    t = []
    for i in range(len(q)):
        s = time.perf_counter()
        live.search(q[i:i + 1], 10, self_ids=[f"i{i}"])
        t.append(time.perf_counter() - s)
    in_process_p50 = float(np.median(t))
    running = start_server(ServiceConfig(model_uri=str(enc_dir), index_root=root, port=0, poll_seconds=0,
                                         cache_dir=tmp_path / "cache"))
    rows = []
    try:
        repo = str(Path(__file__).resolve().parents[2])
        for conc, batch in [(1, 1), (8, 1), (32, 1), (1, 64)]:
            n = (200 if QUICK else 2000) // batch * max(1, conc // 8)
            out = subprocess.run([sys.executable, "-c", CLIENT, repo, f"127.0.0.1:{running.port}", str(conc), str(n),
                                  str(batch)], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            lat = np.asarray(res["lat"])
            rows.append({"concurrency": conc, "queries/request": batch, "p50_ms": 1e3 * float(np.median(lat)),
                         "p99_ms": 1e3 * float(np.quantile(lat, 0.99)),
                         "qps": len(lat) * batch / res["wall"],
                         "in_process_p50_ms": 1e3 * in_process_p50,
                         "added_p50_ms": 1e3 * (float(np.median(lat)) - in_process_p50 * batch)})
    finally:
        running.stop(grace=0)
    write_result("service_overhead", rows,
                 f"SimilarItems by id, k=10, HNSW over {N} x {DIM} unit vectors; client in a separate process.")
