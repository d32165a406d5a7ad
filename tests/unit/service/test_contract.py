"""The contract through a real gRPC server: answers, status codes and reasons naming the field."""

from __future__ import annotations

import io
import os

import grpc
import numpy as np
import pytest
from PIL import Image

from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.server import RunningServer

from .conftest import N_ITEMS, Served, png


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code(), err.value.details()


def test_health_reflection_and_info(client: Client, server: RunningServer) -> None:
    assert client.health_status() == "SERVING"
    info = client.info()
    assert info.item_count == N_ITEMS and info.dim == 64 and info.index_kind == "flat"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"onetower.v1.Recommendations", "grpc.health.v1.Health"} <= names


def test_similar_by_id_vector_and_item(client: Client, served: Served) -> None:
    vec = client.embeddings(["item-001"])["item-001"]
    by_id, by_vec = client.similar(item_ids=["item-001"], vectors=[vec], k=5)
    assert "item-001" not in {n.item_id for n in by_id}
    assert by_vec[0].item_id == "item-001"  # a vector query has no "self" to leave out
    # by id is the vector query without the query item: the same next four, in order, with the same scores
    assert len(by_id) == 5 and len(by_vec) == 5
    assert [n.item_id for n in by_id[:4]] == [n.item_id for n in by_vec[1:]]
    assert [n.score for n in by_id[:4]] == pytest.approx([n.score for n in by_vec[1:]], abs=1e-5)
    item = served.items[2]
    resp = client.stub.SimilarItems(pb.SimilarItemsRequest(
        queries=[pb.Query(item=pb.Item(title=item.title, images=list(item.images)))], k=3))
    assert len(resp.results[0].neighbors) == 3


def test_filters_exclusions_and_min_score(client: Client) -> None:
    hits = client.similar(item_ids=["item-003"], k=10, attributes_equal={"category": "bag"})[0]
    assert len(hits) == 10
    assert all(int(h.item_id[-3:]) % 3 == 0 for h in hits)
    first = client.similar(item_ids=["item-003"], k=3)[0]
    excluded = client.similar(item_ids=["item-003"], k=3, exclude=[first[0].item_id])[0]
    assert first[0].item_id not in {h.item_id for h in excluded}
    ranked = client.similar(item_ids=["item-003"], k=50)[0]
    assert len(ranked) == 50
    cut = (ranked[4].score + ranked[5].score) / 2  # keeps the first five, unless they tie with the sixth
    assert ranked[4].score > ranked[5].score
    high = client.similar(item_ids=["item-003"], k=50, min_score=cut)[0]
    assert [h.item_id for h in high] == [h.item_id for h in ranked[:5]]


def test_recommend_for_user_excludes_history(client: Client) -> None:
    history = ["item-001", "item-002", "item-004"]
    recs = client.recommend(history, k=10)
    assert len(recs) == 10
    assert not set(history) & {r.item_id for r in recs}


def test_upsert_delete_roundtrip(client: Client) -> None:
    before = client.info().item_count
    resp = client.upsert([pb.Item(item_id="live-1", title="blue cotton shirt", attributes={"category": "shirt"}),
                          pb.Item(item_id="live-2", images=[png((10, 200, 10))])], neighbors_k=4)
    assert resp.upserted == 2 and [len(n.neighbors) for n in resp.neighbors] == [4, 4]
    assert client.info().item_count == before + 2
    vec = client.embeddings(["live-1"])["live-1"]
    assert client.similar(vectors=[vec], k=1)[0][0].item_id == "live-1"
    assert client.delete(["live-1", "live-2", "never-was"]) == 2
    assert client.info().item_count == before
    code, details = _code(client.embeddings, ["live-1"])
    assert code == grpc.StatusCode.NOT_FOUND and "live-1" in details


def test_embed_reports_modalities(client: Client) -> None:
    resp = client.embed([pb.Item(title="lamp"), pb.Item(images=[png((1, 2, 3))]),
                         pb.Item(title="mug", images=[png((9, 9, 9))])])
    assert [list(e.modalities) for e in resp.embeddings] == [["text"], ["image"], ["text", "image"]]
    norms = [np.linalg.norm(e.vector.values) for e in resp.embeddings]
    assert norms == pytest.approx([1, 1, 1], abs=1e-4)


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # 36 Mpx, tiny file
    return buf.getvalue()


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    return buf.getvalue()


BAD_ITEMS = [
    ("empty image", pb.Item(title="x", images=[b""]), grpc.StatusCode.INVALID_ARGUMENT, "items[0].images[0]"),
    ("random bytes", pb.Item(title="x", images=[os.urandom(300)]), grpc.StatusCode.INVALID_ARGUMENT,
     "image_undecodable: items[0].images[0]"),
    ("truncated png", pb.Item(title="x", images=[png((1, 1, 1))[:60]]), grpc.StatusCode.INVALID_ARGUMENT,
     "image_undecodable: items[0].images[0]"),
    ("bmp", pb.Item(title="x", images=[_bmp()]), grpc.StatusCode.INVALID_ARGUMENT, "items[0].images[0]"),
    ("bomb", pb.Item(title="x", images=[_bomb()]), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "image_too_large: items[0].images[0]"),
    ("empty item", pb.Item(), grpc.StatusCode.INVALID_ARGUMENT, "item_empty: items[0]"),
    ("huge text", pb.Item(title="a" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "text_too_long: items[0]"),
    ("too many images", pb.Item(title="x", images=[png((1, 1, 1))] * 9), grpc.StatusCode.INVALID_ARGUMENT,
     "too_many_images: items[0].images"),
]


@pytest.mark.parametrize(("case", "item", "code", "message"), BAD_ITEMS, ids=[c[0] for c in BAD_ITEMS])
def test_bad_items_get_their_code_and_the_server_keeps_serving(
        client: Client, case: str, item: pb.Item, code: grpc.StatusCode, message: str) -> None:
    got, details = _code(client.embed, [item])
    assert got == code, details
    assert message in details
    assert client.health_status() == "SERVING"
    assert client.info().item_count >= N_ITEMS


def test_bad_queries(client: Client, server: RunningServer) -> None:
    dim = client.info().dim
    cases = [
        (dict(item_ids=["item-001"], k=0), grpc.StatusCode.INVALID_ARGUMENT, "k_out_of_range"),
        (dict(item_ids=["item-001"], k=-1), grpc.StatusCode.INVALID_ARGUMENT, "k_out_of_range"),
        (dict(item_ids=["item-001"], k=10**6), grpc.StatusCode.INVALID_ARGUMENT, "k_out_of_range"),
        (dict(item_ids=["nope"], k=3), grpc.StatusCode.NOT_FOUND, "queries[0].item_id"),
        (dict(item_ids=[""], k=3), grpc.StatusCode.INVALID_ARGUMENT, "queries[0].item_id"),
        (dict(vectors=[[1.0] * 3], k=3), grpc.StatusCode.INVALID_ARGUMENT, "dim_mismatch: queries[0].vector"),
        (dict(vectors=[[float("nan")] * dim], k=3), grpc.StatusCode.INVALID_ARGUMENT, "vector_not_finite"),
        (dict(vectors=[[float("inf")] * dim], k=3), grpc.StatusCode.INVALID_ARGUMENT, "vector_not_finite"),
        (dict(vectors=[[0.0] * dim], k=3), grpc.StatusCode.INVALID_ARGUMENT, "vector_zero"),
        (dict(item_ids=["item-001"] * 9, k=3), grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_queries"),
        (dict(k=3), grpc.StatusCode.INVALID_ARGUMENT, "queries_empty"),
    ]
    for kwargs, code, reason in cases:
        got, details = _code(client.similar, **kwargs)
        assert (got, reason in details) == (code, True), (kwargs, got, details)
    got, details = _code(client.stub.SimilarItems, pb.SimilarItemsRequest(queries=[pb.Query()], k=3))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "queries[0]" in details
    got, details = _code(client.stub.SimilarItems, pb.SimilarItemsRequest(
        queries=[pb.Query(vector=pb.Vector(values=[1.0] * dim))], k=3, model_version="other"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "model_version" in details


def test_bad_ids_in_writes(client: Client) -> None:
    got, details = _code(client.upsert, [pb.Item(item_id="", title="x")])
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "items[0].item_id" in details
    got, details = _code(client.upsert, [pb.Item(item_id="a", title="x"), pb.Item(item_id="a", title="y")])
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "item_id_duplicate: items[1].item_id" in details
    got, details = _code(client.upsert, [pb.Item(item_id="x" * 300, title="x")])
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "item_id_too_long" in details
    got, details = _code(client.upsert, [pb.Item(item_id=f"i{i}", title="x") for i in range(9)])
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "too_many_items" in details
    got, details = _code(client.delete, [])
    assert got == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_message_is_refused(client: Client) -> None:
    got, _ = _code(client.embed, [pb.Item(title="x", images=[b"\0" * (5 * 1024 * 1024)])])
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.health_status() == "SERVING"
