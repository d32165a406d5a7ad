"""The `onetower.v1.Recommendations` servicer: parse -> call the library -> build the response."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from embed.errors import InvalidItemError
from embed.items import Item
from index.errors import LogRewrittenError
from index.live import Hit
from index.log import LogRecord, WriteLog
from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc
from service.admission import Admission
from service.batching import MicroBatcher
from service.config import Limits
from service.errors import ServiceError, exhausted, guarded, invalid, not_found, to_service_error, unavailable
from service.metrics import Metrics
from service.snapshot import Snapshot, SnapshotHolder
from service.validate import (
    check_ids,
    check_item_id,
    check_pixels,
    parse_items,
    parse_min_score,
    parse_search_params,
    parse_vector,
)

logger = logging.getLogger(__name__)

MAX_WAIT_S = 3600.0  # a deadline further away than this is treated as none
HALF_LIFE_MS = 7 * 24 * 3600 * 1000  # RecommendForUser: an event a week older counts half
SWAP_RETRIES = 3  # UpsertItems: encodings redone when the model is swapped between encoding and writing
MISSING_SHOWN = 20  # GetEmbeddings: missing ids named in the message


class RecommendationsServicer(pb_grpc.RecommendationsServicer):
    """Answers the public contract from the holder's current snapshot."""

    def __init__(self, holder: SnapshotHolder, limits: Limits, metrics: Metrics, batcher: MicroBatcher,
                 admission: Admission | None = None) -> None:
        self.holder = holder
        self.limits = limits
        self.metrics = metrics
        self.batcher = batcher
        self.admission = admission

    def _encode(self, snap: Snapshot, items: Sequence[Item], context: grpc.ServicerContext) -> np.ndarray:
        self.metrics.queue_depth.set(self.batcher.depth())
        remaining = context.time_remaining()  # huge when the caller set no deadline
        timeout = remaining if remaining is not None and remaining < MAX_WAIT_S else None
        return self.batcher.encode(snap.encoder, items, timeout=timeout)

    def _snapshot(self) -> Snapshot:
        """The served snapshot, its live view caught up with the log: a write another process of a
        `--processes` group (or another server on the same index root) acknowledged is seen here."""
        snap = self.holder.current
        if snap is None:
            raise unavailable("the model and index are still loading; retry shortly")
        snap.index.catch_up()
        return snap

    @guarded
    def EmbedItems(self, request: pb.EmbedItemsRequest, context: grpc.ServicerContext) -> pb.EmbedItemsResponse:
        items = parse_items(request.items, self.limits, need_id=False)
        check_pixels(items, self.limits.max_request_pixels)
        snap = self._snapshot()
        vectors = self._encode(snap, items, context)
        return pb.EmbedItemsResponse(
            embeddings=[_embedding(it.item_id, v, it.modalities) for it, v in zip(items, vectors, strict=True)],
            model_version=snap.model_version)

    @guarded
    def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext) -> pb.UpsertItemsResponse:
        _check_writable(self.holder.config.read_only)
        items = [it.stored_form() for it in parse_items(request.items, self.limits, need_id=True)]
        k = request.neighbors_k
        if k < 0 or k > self.limits.max_k:
            raise invalid("k_out_of_range", f"neighbors_k={k} must be in [0, {self.limits.max_k}]")
        check_pixels(items, self.limits.max_request_pixels)
        snap = self._write(items, context)
        hits: list[list[Hit]] = []
        if k > 0:
            vectors = np.stack([_stored_vector(snap, it.item_id) for it in items])
            hits = snap.index.search(vectors, k, self_ids=[it.item_id for it in items])
        response = pb.UpsertItemsResponse(upserted=len(items), model_version=snap.model_version)
        for query_hits in hits:
            _add_neighbors(response.neighbors.add().neighbors, query_hits)
        return response

    def _write(self, items: Sequence[Item], context: grpc.ServicerContext) -> Snapshot:
        """Encode the changed items outside the write lock, then log and apply them under it.

        Returns the snapshot written to. Items live with the same content are not encoded (the
        index skips them too). A swap to another model between encoding and writing means the
        vectors are of the wrong model: they are encoded again with the new one.
        """
        snap = self._snapshot()
        for _ in range(SWAP_RETRIES):
            changed = [it for it in items if not snap.index.unchanged(it.item_id, it.content_hash())]
            vectors = self._encode(snap, changed, context) if changed else None
            with self.holder.write_lock:
                current = self._snapshot()
                if current.model_version == snap.model_version:
                    records = [LogRecord(op="upsert", item_id=it.item_id, model_version=snap.model_version,
                                         vector=v, content=it.to_content(), content_hash=it.content_hash())
                               for it, v in zip(changed, vectors if vectors is not None else [], strict=True)]
                    current.index.upsert(records)
                    self._count_writes(current)
                    return current
            snap = current
        raise unavailable("the served model changed during the write several times; retry")

    def _count_writes(self, snap: Snapshot) -> None:
        self.metrics.index_items.set(len(snap.index))
        log = snap.index.log
        if log is not None:
            self.metrics.log_bytes.set(log.size_bytes)
            self.metrics.log_superseded_bytes.set(log.superseded_bytes)
            self.metrics.log_compactions.set(log.compactions)

    @guarded
    def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.ServicerContext) -> pb.DeleteItemsResponse:
        _check_writable(self.holder.config.read_only)
        ids = check_ids(request.item_ids, "item_ids", self.limits.max_ids)
        with self.holder.write_lock:
            snap = self._snapshot()
            deleted = snap.index.delete(ids)
            self._count_writes(snap)
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
        exclude = check_ids(request.exclude_item_ids, "exclude_item_ids", self.limits.max_ids, allow_empty=True)
        min_score = parse_min_score(request)
        snap = self._snapshot()
        vectors, self_ids = self._query_vectors(request, snap, context)
        hits = snap.index.search(vectors, k, exclude=exclude,
                                 attributes_equal=dict(request.filter.attributes_equal) or None,
                                 min_score=min_score, self_ids=self_ids, params=params)
        self.metrics.observe_batch("SimilarItems", n)
        response = pb.SimilarItemsResponse(model_version=snap.model_version, index_version=snap.index.index_version)
        for query_hits in hits:
            _add_neighbors(response.results.add().neighbors, query_hits)
        return response

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
                check_item_id(q.item_id, f"queries[{i}].item_id")
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
        check_pixels([it for _, it in content], self.limits.max_request_pixels, "queries[].item")
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
        exclude = check_ids(request.exclude_item_ids, "exclude_item_ids", self.limits.max_ids, allow_empty=True)
        snap = self._snapshot()
        query, seen = history_vector(events, snap.index.vector, time.time() * 1000)
        hits = snap.index.search(query[None, :], k, exclude=[*seen, *exclude],
                                 attributes_equal=dict(request.filter.attributes_equal) or None, params=params)[0]
        response = pb.RecommendForUserResponse(model_version=snap.model_version, index_version=snap.index.index_version,
                                               user_vector=pb.Vector(values=query.tolist()))
        _add_neighbors(response.neighbors, hits)
        return response

    @guarded
    def GetEmbeddings(self, request: pb.GetEmbeddingsRequest,
                      context: grpc.ServicerContext) -> pb.GetEmbeddingsResponse:
        ids = check_ids(request.item_ids, "item_ids", self.limits.max_ids)
        snap = self._snapshot()
        vectors = [snap.index.vector(item_id) for item_id in ids]
        missing = [f"item_ids[{i}] {item_id!r}" for i, (item_id, v) in enumerate(zip(ids, vectors, strict=True))
                   if v is None]
        if missing:
            shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
            raise not_found(f"{len(missing)} of {len(ids)} ids are not in the index ({shown}); "
                            "GetEmbeddings answers all or nothing")
        return pb.GetEmbeddingsResponse(embeddings=[_embedding(item_id, v, []) for item_id, v in
                                                    zip(ids, vectors, strict=True) if v is not None])

    @guarded
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        snap = self._snapshot()
        return pb.GetInfoResponse(model_name=snap.model.name, model_version=snap.model_version,
                                  model_alias=snap.model.alias, index_version=snap.index.index_version,
                                  item_count=len(snap.index), dim=snap.index.dim, index_kind=snap.index.kind,
                                  pid=os.getpid())

    @guarded
    def GetLiveItems(self, request: pb.GetLiveItemsRequest,
                     context: grpc.ServicerContext) -> pb.GetLiveItemsResponse:
        ids = check_ids(request.item_ids, "item_ids", self.limits.max_items)
        snap = self._snapshot()
        found = live_contents(snap.index.log, [i for i in dict.fromkeys(ids) if i in snap.index])
        return pb.GetLiveItemsResponse(
            items=[pb.Item(item_id=i, title=found[i].title, description=found[i].description or "",
                           attributes=found[i].attributes, images=list(found[i].images)) for i in ids if i in found],
            missing_item_ids=[i for i in ids if i not in found])


def history_vector(events: Sequence[pb.HistoryEvent], lookup: Callable[[str], np.ndarray | None],
                   now_ms: float) -> tuple[np.ndarray, list[str]]:
    """The user vector `RecommendForUser` searches with, and the history's ids (excluded from results).

    The normalised sum of the known items' vectors, each weighted by weight x 0.5^(age / HALF_LIFE_MS):
    weight unset is 1; timestamp 0 (unset) has no age; a time after `now_ms` counts as now. The
    weights are taken in log space relative to the heaviest, so a long history never underflows.
    Ids `lookup` does not know are skipped.
    """
    seen: list[str] = []
    known: list[tuple[float, np.ndarray]] = []  # (log2 weight, vector)
    for i, e in enumerate(events):
        check_item_id(e.item_id, f"history[{i}].item_id")
        weight = e.weight if e.HasField("weight") else 1.0
        if not math.isfinite(weight) or weight < 0:
            raise invalid("weight_invalid", f"history[{i}].weight={weight} must be finite and >= 0 (unset: 1)")
        if e.timestamp_ms < 0:
            raise invalid("timestamp_invalid", f"history[{i}].timestamp_ms={e.timestamp_ms} must be >= 0 "
                                               "(milliseconds since the epoch; 0: unset)")
        seen.append(e.item_id)
        vec = lookup(e.item_id)
        if vec is None or weight == 0:
            continue
        age_ms = max(0.0, now_ms - e.timestamp_ms) if e.timestamp_ms else 0.0
        known.append((math.log2(weight) - age_ms / HALF_LIFE_MS, vec))
    if not known:
        if any(lookup(item_id) is not None for item_id in seen):
            raise invalid("weights_all_zero", "every history event of a known item has weight 0")
        raise not_found("history names no item that is in the index")
    top = max(w for w, _ in known)
    total = np.zeros(len(known[0][1]), np.float64)
    for log_weight, vec in known:
        total += 2.0 ** (log_weight - top) * vec
    norm = float(np.linalg.norm(total))
    if norm == 0.0:  # opposite vectors cancelling exactly
        raise not_found("the history's weighted vectors cancel out; no direction to search")
    return (total / norm).astype(np.float32), seen


def _stored_vector(snap: Snapshot, item_id: str) -> np.ndarray:
    vec = snap.index.vector(item_id)
    if vec is None:  # deleted by a concurrent call since it was written
        raise not_found(f"{item_id!r} was deleted by another call before its neighbours were searched")
    return vec


def _embedding(item_id: str, vector: np.ndarray, modalities: Sequence[str]) -> pb.Embedding:
    return pb.Embedding(item_id=item_id, vector=pb.Vector(values=vector.tolist()), modalities=list(modalities))


def _add_neighbors(neighbors: Any, hits: Sequence[Hit]) -> None:
    """Append `hits` to a repeated `Neighbor` field: `add()` in place is ~2x faster than building
    `Neighbor` messages and a list to pass to a constructor (upb)."""
    add = neighbors.add
    for item_id, score in hits:
        add(item_id=item_id, score=score)


def live_contents(log: WriteLog | None, item_ids: Sequence[str], retries: int = 3) -> dict[str, Item]:
    """The logged content of those `item_ids` whose newest log record is an upsert (`GetLiveItems`).

    A compaction between listing and reading moves the records: the listing is taken again.
    """
    if log is None or not item_ids:
        return {}
    wanted = set(item_ids)
    for _ in range(retries):
        newest = {e.item_id: e for e in log.entries if e.item_id in wanted}
        try:
            return {r.item_id: Item.from_content(r.item_id, r.content)
                    for r in log.read([e for e in newest.values() if e.op == "upsert"])}
        except LogRewrittenError:
            continue
    raise unavailable("the live-write log was rewritten during every read; retry")


def _check_writable(read_only: bool) -> None:
    if read_only:
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "read_only",
                           "this server is read-only (a pinned version beside the served one); write to the served one")
