"""Per-request search effort (`SearchParams` on SimilarItems and RecommendForUser) through a real server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from index.config import MAX_EF_SEARCH, MAX_NPROBE, IndexConfig
from index.ids import IdMap
from index.publish import load_version, publish_index
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.registry import lookup_model
from service.server import RunningServer, start_server

from .conftest import Served, make_config

N, K, N_QUERIES = 3000, 10, 40


@pytest.fixture(scope="module")
def hnsw_vectors(served: Served) -> np.ndarray:
    """Unclustered gaussian unit vectors: hard for a graph walk, so the effort shows in recall."""
    dim = load_version(served.root / "index").manifest.dim
    x = np.random.default_rng(7).normal(size=(N, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def hnsw_client(served: Served, hnsw_vectors: np.ndarray,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    root = tmp_path_factory.mktemp("hnsw") / "index"
    ids = IdMap([f"v-{i}" for i in range(N)], [f"h{i}" for i in range(N)], [{} for _ in range(N)])
    ref = lookup_model(str(served.encoder_dir))
    publish_index(root, hnsw_vectors, ids, IndexConfig(kind="hnsw", hnsw_m=8, ef_construction=40, use_gpu=False),
                  ref.name, ref.version)
    running: RunningServer = start_server(make_config(served, index_root=root, cache_dir=root.parent / "cache"))
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=20) as c:
            yield c
    finally:
        running.stop(grace=1)


def _similar(client: Client, queries: np.ndarray, search: pb.SearchParams | None) -> list[list[str]]:
    out = []
    for start in range(0, len(queries), 8):  # the test server's max_queries
        req = pb.SimilarItemsRequest(queries=[pb.Query(vector=pb.Vector(values=v.tolist()))
                                              for v in queries[start: start + 8]], k=K, search=search)
        resp = client.stub.SimilarItems(req, timeout=client.timeout)
        out += [[n.item_id for n in r.neighbors] for r in resp.results]
    return out


def test_more_effort_per_request_raises_recall(hnsw_client: Client, hnsw_vectors: np.ndarray) -> None:
    rng = np.random.default_rng(8)
    q = rng.normal(size=(N_QUERIES, hnsw_vectors.shape[1]))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    truth = [{f"v-{i}" for i in row} for row in np.argsort(-(q @ hnsw_vectors.T), axis=1)[:, :K]]

    def recall(search: pb.SearchParams | None) -> float:
        found = _similar(hnsw_client, q, search)
        return float(np.mean([len(set(f) & t) / K for f, t in zip(found, truth, strict=True)]))

    cheap, default, rich = recall(pb.SearchParams(ef_search=1)), recall(None), recall(pb.SearchParams(ef_search=512))
    assert cheap < default <= rich, (cheap, default, rich)
    assert rich >= 0.95
    # 0 means the index default, and nprobe does not apply to hnsw (ignored)
    assert recall(pb.SearchParams(ef_search=0, nprobe=1)) == default


@pytest.mark.parametrize("search, message", [
    (pb.SearchParams(ef_search=-1), f"search_param_out_of_range: search.ef_search=-1 must be in [0, {MAX_EF_SEARCH}]"),
    (pb.SearchParams(ef_search=MAX_EF_SEARCH + 1), f"search.ef_search={MAX_EF_SEARCH + 1} must be in"),
    (pb.SearchParams(nprobe=-5), f"search_param_out_of_range: search.nprobe=-5 must be in [0, {MAX_NPROBE}]"),
    (pb.SearchParams(nprobe=MAX_NPROBE + 1), f"search.nprobe={MAX_NPROBE + 1} must be in"),
])
def test_out_of_range_search_params_are_invalid_argument(client: Client, search: pb.SearchParams,
                                                         message: str) -> None:
    similar = pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3, search=search)
    recommend = pb.RecommendForUserRequest(history=[pb.HistoryEvent(item_id="item-001")], k=3, search=search)
    for call, req in ((client.stub.SimilarItems, similar), (client.stub.RecommendForUser, recommend)):
        with pytest.raises(grpc.RpcError) as err:
            call(req, timeout=client.timeout)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")
    # in range, the same requests are answered (on a flat index the effort fields are ignored)
    ok = pb.SearchParams(ef_search=MAX_EF_SEARCH, nprobe=MAX_NPROBE)
    assert len(client.stub.SimilarItems(pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3, search=ok),
                                        timeout=client.timeout).results[0].neighbors) == 3
