"""Property-based requests of the contract: whatever a client sends, never UNKNOWN, never a crash."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client

from .conftest import png

ids = st.one_of(st.sampled_from(["item-001", "item-002", "item-010"]), st.text(max_size=300))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
images = st.one_of(st.binary(max_size=200), st.just(png((200, 10, 10))), st.builds(lambda b: png((1, 2, 3))[:b],
                                                                                      st.integers(0, 80)))
items = st.builds(pb.Item, item_id=ids, title=st.text(max_size=100), description=st.text(max_size=100),
                  attributes=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
                  images=st.lists(images, max_size=3))
queries = st.one_of(st.builds(pb.Query, item_id=ids),
                    st.builds(lambda v: pb.Query(vector=pb.Vector(values=v)), st.lists(floats, max_size=70)),
                    st.builds(lambda it: pb.Query(item=it), items), st.just(pb.Query()))
similar = st.builds(pb.SimilarItemsRequest, queries=st.lists(queries, max_size=4),
                    k=st.integers(-5, 2000), exclude_item_ids=st.lists(ids, max_size=3),
                    filter=st.builds(pb.Filter, attributes_equal=st.dictionaries(
                        st.sampled_from(["category", "x"]), st.sampled_from(["bag", "shirt", ""]), max_size=2)),
                    min_score=floats)
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _call(method, request) -> None:  # type: ignore[no-untyped-def]
    try:
        method(request, timeout=20)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        assert ":" in e.details()  # "<reason>: <what to change>"


@SETTINGS
@given(request=similar)
def test_similar_items_never_unknown(client: Client, request: pb.SimilarItemsRequest) -> None:
    _call(client.stub.SimilarItems, request)


@SETTINGS
@given(request=st.builds(pb.EmbedItemsRequest, items=st.lists(items, max_size=4)))
def test_embed_items_never_unknown(client: Client, request: pb.EmbedItemsRequest) -> None:
    _call(client.stub.EmbedItems, request)


@SETTINGS
@given(history=st.lists(st.builds(pb.HistoryEvent, item_id=ids, weight=floats,
                                  timestamp_ms=st.integers(-(2**63), 2**63 - 1)), max_size=5),
       k=st.integers(-2, 1200))
def test_recommend_never_unknown(client: Client, history: list[pb.HistoryEvent], k: int) -> None:
    _call(client.stub.RecommendForUser, pb.RecommendForUserRequest(history=history, k=k))
    assert client.health_status() == "SERVING"
