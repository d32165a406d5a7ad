"""A typed Python client for the service (what `onetower query` and the tests use)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 10.0



IDS_PER_CALL = 1000  # the server's default limit on ids a call (service.config.Limits.max_ids)
@dataclass(frozen=True)
class Neighbor:
    item_id: str
    score: float


class Client:
    """Blocking client; every call takes a deadline (`timeout`, seconds)."""

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT, token: str | None = None,
                 root_cert: bytes | None = None) -> None:
        if root_cert is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_cert))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RecommendationsStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def health_status(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ... as the health service reports it."""
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout,
                                 metadata=self.metadata)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def info(self) -> pb.GetInfoResponse:
        return self.stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def similar(self, item_ids: Sequence[str] = (), vectors: Sequence[Sequence[float]] = (), k: int = 10,
                exclude: Iterable[str] = (), attributes_equal: Mapping[str, str] | None = None,
                min_score: float | None = None) -> list[list[Neighbor]]:
        """Neighbours for queries by item id, then by vector, in that order; `min_score` None: no floor."""
        queries = [pb.Query(item_id=i) for i in item_ids] + [pb.Query(vector=pb.Vector(values=list(v)))
                                                             for v in vectors]
        req = pb.SimilarItemsRequest(queries=queries, k=k, exclude_item_ids=list(exclude),
                                     filter=pb.Filter(attributes_equal=dict(attributes_equal or {})),
                                     min_score=min_score)  # None leaves the optional field unset
        resp = self.stub.SimilarItems(req, timeout=self.timeout, metadata=self.metadata)
        return [[Neighbor(n.item_id, n.score) for n in r.neighbors] for r in resp.results]

    def recommend(self, history: Sequence[str], k: int = 10) -> list[Neighbor]:
        """Candidates for a history of item ids, each weighing 1 and undated."""
        req = pb.RecommendForUserRequest(history=[pb.HistoryEvent(item_id=i) for i in history], k=k)
        resp = self.stub.RecommendForUser(req, timeout=self.timeout, metadata=self.metadata)
        return [Neighbor(n.item_id, n.score) for n in resp.neighbors]

    def embed(self, items: Sequence[pb.Item]) -> pb.EmbedItemsResponse:
        return self.stub.EmbedItems(pb.EmbedItemsRequest(items=list(items)), timeout=self.timeout,
                                    metadata=self.metadata)

    def upsert(self, items: Sequence[pb.Item], neighbors_k: int = 0) -> pb.UpsertItemsResponse:
        return self.stub.UpsertItems(pb.UpsertItemsRequest(items=list(items), neighbors_k=neighbors_k),
                                     timeout=self.timeout, metadata=self.metadata)

    def delete(self, item_ids: Sequence[str], chunk: int = IDS_PER_CALL) -> int:
        """Delete items, `chunk` ids a call; returns how many were live."""
        deleted = 0
        for start in range(0, max(len(item_ids), 1), chunk):
            resp = self.stub.DeleteItems(pb.DeleteItemsRequest(item_ids=list(item_ids[start: start + chunk])),
                                         timeout=self.timeout, metadata=self.metadata)
            deleted += int(resp.deleted)
        return deleted

    def embeddings(self, item_ids: Sequence[str], chunk: int = IDS_PER_CALL) -> dict[str, list[float]]:
        """Stored vectors, `chunk` ids a call (the server's default limit); NOT_FOUND if any id is unknown."""
        out: dict[str, list[float]] = {}
        for start in range(0, len(item_ids), chunk):
            resp = self.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=list(item_ids[start: start + chunk])),
                                           timeout=self.timeout, metadata=self.metadata)
            out.update({e.item_id: list(e.vector.values) for e in resp.embeddings})
        return out
