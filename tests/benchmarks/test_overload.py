"""Overload from a separate client process: shed latency and accepted latency with and without a limit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from embed.config import preset
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from service.config import ServiceConfig
from service.registry import lookup_model
from service.server import start_server

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

CALLERS, SECONDS, LIMIT = 16, 3.0 if QUICK else 10.0, 4

CLIENT = textwrap.dedent("""
    import io, json, random, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from PIL import Image
    from protos.onetower.v1 import onetower_pb2 as pb, onetower_pb2_grpc as pb_grpc
    target, callers, seconds, backoff = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
    def png(i):
        buf = io.BytesIO(); Image.new("RGB", (40, 40), (i % 255, 40, 90)).save(buf, format="PNG"); return buf.getvalue()
    def search(i):
        return pb.SimilarItemsRequest(queries=[pb.Query(item=pb.Item(title=f"blue bag {i % 7}", images=[png(i)]))], k=5)
    def call(stub, i, upsert, tag):
        req = pb.UpsertItemsRequest(items=[pb.Item(item_id=f"{tag}-{i}", title=f"red shirt {i}")]) if upsert else search(i)
        t = time.perf_counter()
        try:
            (stub.UpsertItems if upsert else stub.SimilarItems)(req, timeout=30); code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        return ("upsert" if upsert else "search", code, time.perf_counter() - t)
    ch = grpc.insecure_channel(target); stub = pb_grpc.RecommendationsStub(ch)
    for i in range(10): call(stub, i, False, "warm")
    unloaded = [call(stub, i, False, "u") for i in range(50)]
    out, probes, stop = [], [], threading.Event()
    def caller(n):
        with grpc.insecure_channel(target) as c:
            s = pb_grpc.RecommendationsStub(c); i = 0; wait = 0.0
            while not stop.is_set():
                out.append(call(s, n * 100000 + i, i % 3 == 2, "load")); i += 1
                if backoff:  # what the refusal asks for: exponential backoff with full jitter, 10 ms to 320 ms
                    wait = min(0.32, max(0.01, 2 * wait)) if out[-1][1] == "RESOURCE_EXHAUSTED" else 0.0
                    time.sleep(random.uniform(0, wait))
    def prober():
        with grpc.insecure_channel(target) as c:
            h = health_pb2_grpc.HealthStub(c)
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    st = h.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    probes.append((health_pb2.HealthCheckResponse.ServingStatus.Name(st), time.perf_counter() - t))
                except grpc.RpcError as e:
                    probes.append((e.code().name, time.perf_counter() - t))
                time.sleep(0.05)
    ts = [threading.Thread(target=caller, args=(n,)) for n in range(callers)] + [threading.Thread(target=prober)]
    [t.start() for t in ts]; time.sleep(seconds); stop.set(); [t.join() for t in ts]
    print(json.dumps({"unloaded": unloaded, "load": out, "probes": probes}))
""")


def _served(root: Path) -> ServiceConfig:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "leather", "cotton", "bag", "shirt", "lamp", "mug"]
    items = [Item(item_id=f"item-{i:03d}", title=" ".join(rng.choice(words, 3))) for i in range(200)]
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([it.text for it in items], 300, min_frequency=1)
    encoder_dir = save_encoder(root / "encoder", UnifiedEncoder(preset("tiny", vocab_size=tokenizer.vocab_size)),
                               tokenizer)
    vectors = load_encoder(encoder_dir).encode(items)
    ids = IdMap([it.item_id for it in items], [it.content_hash() for it in items], [{} for _ in items])
    ref = lookup_model(str(encoder_dir))
    publish_index(root / "index", vectors, ids, IndexConfig(kind="flat"), ref.name, ref.version)
    return ServiceConfig(model_uri=str(encoder_dir), index_root=root / "index", port=0, poll_seconds=0,
                         workers=LIMIT, cache_dir=root / "cache")


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def test_overload_shedding(tmp_path: Path) -> None:
    base = _served(tmp_path)
    rows = []
    # the limit of 2 matches this machine's cores: the encoder work of accepted calls is CPU-bound
    for limit, backoff in ((LIMIT, False), (LIMIT, True), (2, True), (None, False)):
        running = start_server(ServiceConfig(**{**vars(base), "max_concurrent_rpcs": limit}))
        try:
            proc = subprocess.run([sys.executable, "-c", CLIENT, str(Path.cwd()), f"127.0.0.1:{running.port}",
                                   str(CALLERS), str(SECONDS), str(int(backoff))], capture_output=True, text=True,
                                  timeout=600)
        finally:
            running.stop(grace=1)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        unloaded = [s for _, _, s in data["unloaded"]]
        accepted = [s for kind, code, s in data["load"] if code == "OK" and kind == "search"]
        shed = [s for _, code, s in data["load"] if code == "RESOURCE_EXHAUSTED"]
        codes = sorted({code for _, code, _ in data["load"]})
        rows.append({"limit": str(limit), "callers": CALLERS,
                     "after_a_refusal": "backoff 10-320 ms, jitter" if backoff else "retry at once", "seconds": SECONDS, "codes": "/".join(codes),
                     "ok": sum(code == "OK" for _, code, _ in data["load"]), "shed": len(shed),
                     "shed_p50_ms": _ms(shed, 50), "shed_p99_ms": _ms(shed, 99),
                     "unloaded_search_p50_ms": _ms(unloaded, 50), "accepted_search_p50_ms": _ms(accepted, 50),
                     "accepted_search_p99_ms": _ms(accepted, 99),
                     "p50_ratio": _ms(accepted, 50) / _ms(unloaded, 50),
                     "health_max_ms": max((s for _, s in data["probes"]), default=float("nan")) * 1000,
                     "health": "/".join(sorted({st for st, _ in data["probes"]}))})
    write_result("overload", rows, notes=f"server in the test process ({LIMIT} handler threads), {CALLERS} client "
                 "threads in another process: 2/3 searches by item content (encoder), 1/3 upserts; health every 50 ms. "
                 "after_a_refusal: what a caller does after RESOURCE_EXHAUSTED (the refusal asks for backoff).")
