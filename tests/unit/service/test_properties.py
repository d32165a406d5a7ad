"""Property-based requests of the contract: whatever a client sends, never UNKNOWN, never a crash."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client

from .conftest import N_ITEMS, png

DIM = 64  # the served tiny encoder's

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
# well-formed requests (known ids, vectors of the served dim, text items, k within the test server's max_k)
known = st.sampled_from([f"item-{i:03d}" for i in range(N_ITEMS)])
unit_floats = st.floats(-1, 1, width=32)
valid_queries = st.one_of(
    st.builds(pb.Query, item_id=known),
    st.builds(lambda v: pb.Query(vector=pb.Vector(values=[*v[:-1], 1.0])), st.lists(unit_floats, min_size=DIM,
                                                                                   max_size=DIM)),
    st.builds(lambda t: pb.Query(item=pb.Item(title=t)), st.sampled_from(["red leather bag", "blue lamp", "mug"])))
valid_similar = st.builds(pb.SimilarItemsRequest, queries=st.lists(valid_queries, min_size=1, max_size=4),
                          k=st.integers(1, 50), exclude_item_ids=st.lists(known, max_size=5),
                          filter=st.builds(pb.Filter, attributes_equal=st.dictionaries(
                              st.just("category"), st.sampled_from(["bag", "shirt", "lamp"]), max_size=1)),
                          min_score=st.one_of(st.just(0.0), unit_floats))
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _call(method, request):  # type: ignore[no-untyped-def]
    """The response, or None after checking that the refusal has an allowed code and a reason."""
    try:
        return method(request, timeout=20)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        assert ":" in e.details()  # "<reason>: <what to change>"
        return None


@SETTINGS
@given(request=similar)
def test_similar_items_never_unknown(client: Client, request: pb.SimilarItemsRequest) -> None:
    response = _call(client.stub.SimilarItems, request)
    if response is not None:
        _check_answer(request, response)


@SETTINGS
@given(request=valid_similar)
def test_similar_items_answers_keep_the_contract(client: Client, request: pb.SimilarItemsRequest) -> None:
    response = client.stub.SimilarItems(request, timeout=20)  # well-formed: it must succeed
    _check_answer(request, response)


def _check_answer(request: pb.SimilarItemsRequest, response: pb.SimilarItemsResponse) -> None:
    """At most k distinct neighbours per query, best first, above min_score, none excluded, never the query item."""
    assert len(response.results) == len(request.queries)
    for query, result in zip(request.queries, response.results, strict=True):
        found = [n.item_id for n in result.neighbors]
        scores = [n.score for n in result.neighbors]
        assert len(found) <= request.k and len(set(found)) == len(found)
        if request.min_score > 0:  # 0 is "no floor"
            assert all(score >= request.min_score for score in scores)
        assert scores == sorted(scores, reverse=True)
        assert not set(found) & set(request.exclude_item_ids)
        if query.WhichOneof("by") == "item_id":
            assert query.item_id not in found  # the query item is never its own neighbour


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
