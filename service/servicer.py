"""The `onetower.v1.Recommendations` servicer: parse -> call the library -> build the response."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import grpc
import numpy as np

from embed.errors import InvalidItemError
from embed.items import Item
from index.live import Hit
from index.log import LogRecord
from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc
from service.batching import MicroBatcher
from service.config import Limits
from service.errors import ServiceError, exhausted, guarded, invalid, not_found, to_service_error, unavailable
from service.metrics import Metrics
from service.snapshot import Snapshot, SnapshotHolder
from service.validate import check_ids, parse_items, parse_search_params, parse_vector

logger = logging.getLogger(__name__)

MAX_WAIT_S = 3600.0  # a deadline further away than this is treated as none
HALF_LIFE_MS = 7 * 24 * 3600 * 1000  # RecommendForUser: an event a week older counts half


class RecommendationsServicer(pb_grpc.RecommendationsServicer):
    """Answers the public contract from the holder's current snapshot."""

    def __init__(self, holder: SnapshotHolder, limits: Limits, metrics: Metrics, batcher: MicroBatcher) -> None:
        self.holder = holder
        self.limits = limits
        self.metrics = metrics
        self.batcher = batcher

    def _encode(self, snap: Snapshot, items: Sequence[Item], context: grpc.ServicerContext) -> np.ndarray:
        self.metrics.queue_depth.set(self.batcher.depth())
        remaining = context.time_remaining()  # huge when the caller set no deadline
        timeout = remaining if remaining is not None and remaining < MAX_WAIT_S else None
        return self.batcher.encode(snap.encoder, items, timeout=timeout)

    def _snapshot(self) -> Snapshot:
        snap = self.holder.current
        if snap is None:
            raise unavailable("the model and index are still loading; retry shortly")
        return snap

    @guarded
    def EmbedItems(self, request: pb.EmbedItemsRequest, context: grpc.ServicerContext) -> pb.EmbedItemsResponse:
        items = parse_items(request.items, self.limits, need_id=False)
        snap = self._snapshot()
        vectors = self._encode(snap, items, context)
        return pb.EmbedItemsResponse(
            embeddings=[_embedding(it.item_id, v, it.modalities) for it, v in zip(items, vectors, strict=True)],
            model_version=snap.model_version)

    @guarded
    def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext) -> pb.UpsertItemsResponse:
        items = parse_items(request.items, self.limits, need_id=True)
        k = request.neighbors_k
        if k < 0 or k > self.limits.max_k:
            raise invalid("k_out_of_range", f"neighbors_k={k} must be in [0, {self.limits.max_k}]")
        with self.holder.write_lock:
            snap = self._snapshot()
            vectors = self._encode(snap, items, context)
            records = [LogRecord(op="upsert", item_id=it.item_id, model_version=snap.model_version, vector=v,
                                 content=it.to_content(), content_hash=it.content_hash())
                       for it, v in zip(items, vectors, strict=True)]
            snap.index.upsert(records)
        self.metrics.index_items.set(len(snap.index))
        neighbors = []
        if k > 0:
            hits = snap.index.search(vectors, k, self_ids=[it.item_id for it in items])
            neighbors = [_neighbors(h) for h in hits]
        return pb.UpsertItemsResponse(upserted=len(items), model_version=snap.model_version, neighbors=neighbors)

    @guarded
    def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.ServicerContext) -> pb.DeleteItemsResponse:
        ids = check_ids(request.item_ids, "item_ids", self.limits.max_ids)
        with self.holder.write_lock:
            snap = self._snapshot()
            deleted = snap.index.delete(ids)
        self.metrics.index_items.set(len(snap.index))
        return pb.DeleteItemsResponse(deleted=deleted)

    @guarded
    def SimilarItems(self, request: pb.SimilarItemsRequest,
                     context: grpc.ServicerContext) -> pb.SimilarItemsResponse:
        n = len(request.queries)
        if n == 0:
            raise invalid("queries_empty", "queries is empty; send at least one query")
        if n > self.limits.max_queries:
            raise exhausted("too_many_queries", f"queries has {n} entries, limit {self.limits.max_queries}")
        k = self._check_k(request.k)
        params = parse_search_params(request.search)
        snap = self._snapshot()
        vectors, self_ids = self._query_vectors(request, snap, context)
        hits = snap.index.search(vectors, k, exclude=list(request.exclude_item_ids),
                                 attributes_equal=dict(request.filter.attributes_equal) or None,
                                 min_score=request.min_score if request.min_score != 0 else None,
                                 self_ids=self_ids, params=params)
        self.metrics.batch_size.labels("SimilarItems").observe(n)
        return pb.SimilarItemsResponse(results=[_neighbors(h) for h in hits], model_version=snap.model_version,
                                       index_version=snap.index.index_version)

    def _query_vectors(self, request: pb.SimilarItemsRequest, snap: Snapshot,
                       context: grpc.ServicerContext) -> tuple[np.ndarray, list[str | None]]:
        """One unit vector per query, and the query item's id where the query names one."""
        dim = snap.index.dim
        out = np.zeros((len(request.queries), dim), np.float32)
        self_ids: list[str | None] = []
        content: list[tuple[int, Item]] = []
        for i, q in enumerate(request.queries):
            which = q.WhichOneof("by")
            self_ids.append(q.item_id if which == "item_id" else None)
            if which == "item_id":
                check_ids([q.item_id], f"queries[{i}].item_id", 1)
                vec = snap.index.vector(q.item_id)
                if vec is None:
                    raise not_found(f"queries[{i}].item_id {q.item_id!r} is not in the index")
                out[i] = vec
            elif which == "vector":
                if request.model_version and request.model_version != snap.model_version:
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "model_version_mismatch",
                                       f"model_version {request.model_version!r} was given but the service "
                                       f"embeds with {snap.model_version!r}; re-fetch the vectors")
                out[i] = parse_vector(q.vector.values, dim, f"queries[{i}].vector")
            elif which == "item":
                item = parse_items([q.item], self.limits, need_id=False, field=f"queries[{i}].item")[0]
                content.append((i, item))
            else:
                raise invalid("query_empty", f"queries[{i}] sets none of item_id, vector, item")
        if content:
            try:
                vecs = self._encode(snap, [it for _, it in content], context)
            except InvalidItemError as e:
                where = content[e.item_index or 0][0]
                located = InvalidItemError(e.reason, f"item.{e.field}".rstrip("."), e.detail, where)
                raise to_service_error(located, prefix="queries") from None
            for (i, _), v in zip(content, vecs, strict=True):
                out[i] = v
        return out, self_ids

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise invalid("k_out_of_range", f"k={k} must be in [1, {self.limits.max_k}]")
        return k

    @guarded
    def RecommendForUser(self, request: pb.RecommendForUserRequest,
                         context: grpc.ServicerContext) -> pb.RecommendForUserResponse:
        events = list(request.history)
        if not events:
            raise invalid("history_empty", "history is empty; send at least one event")
        if len(events) > self.limits.max_ids:
            raise exhausted("history_too_long", f"history has {len(events)} events, limit {self.limits.max_ids}")
        k = self._check_k(request.k)
        params = parse_search_params(request.search)
        snap = self._snapshot()
        query, seen = _history_vector(events, snap)
        hits = snap.index.search(query[None, :], k, exclude=[*seen, *request.exclude_item_ids],
                                 attributes_equal=dict(request.filter.attributes_equal) or None, params=params)[0]
        return pb.RecommendForUserResponse(neighbors=[pb.Neighbor(item_id=h.item_id, score=h.score) for h in hits],
                                           model_version=snap.model_version, index_version=snap.index.index_version)

    @guarded
    def GetEmbeddings(self, request: pb.GetEmbeddingsRequest,
                      context: grpc.ServicerContext) -> pb.GetEmbeddingsResponse:
        ids = check_ids(request.item_ids, "item_ids", self.limits.max_ids)
        snap = self._snapshot()
        out = []
        for i, item_id in enumerate(ids):
            vec = snap.index.vector(item_id)
            if vec is None:
                raise not_found(f"item_ids[{i}] {item_id!r} is not in the index")
            out.append(_embedding(item_id, vec, []))
        return pb.GetEmbeddingsResponse(embeddings=out)

    @guarded
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        snap = self._snapshot()
        return pb.GetInfoResponse(model_name=snap.model.name, model_version=snap.model_version,
                                  model_alias=snap.model.alias, index_version=snap.index.index_version,
                                  item_count=len(snap.index), dim=snap.index.dim, index_kind=snap.index.kind)


def _history_vector(events: Sequence[pb.HistoryEvent], snap: Snapshot) -> tuple[np.ndarray, list[str]]:
    """Recency- and weight-weighted mean of the known history items' vectors (unknown ids are skipped)."""
    newest = max(e.timestamp_ms for e in events)
    total = np.zeros(snap.index.dim, np.float64)
    seen: list[str] = []
    for i, e in enumerate(events):
        if not e.item_id:
            raise invalid("item_id_empty", f"history[{i}].item_id is empty")
        if not math.isfinite(e.weight) or e.weight < 0:
            raise invalid("weight_invalid", f"history[{i}].weight={e.weight} must be finite and >= 0")
        seen.append(e.item_id)
        vec = snap.index.vector(e.item_id)
        if vec is None:
            continue
        weight = (e.weight or 1.0) * 0.5 ** ((newest - e.timestamp_ms) / HALF_LIFE_MS)
        total += weight * vec
    norm = float(np.linalg.norm(total))
    if norm == 0.0:
        raise not_found("history names no item that is in the index")
    return (total / norm).astype(np.float32), seen


def _embedding(item_id: str, vector: np.ndarray, modalities: Sequence[str]) -> pb.Embedding:
    return pb.Embedding(item_id=item_id, vector=pb.Vector(values=vector.tolist()), modalities=list(modalities))


def _neighbors(hits: Sequence[Hit]) -> pb.Neighbors:
    return pb.Neighbors(neighbors=[pb.Neighbor(item_id=h.item_id, score=h.score) for h in hits])
