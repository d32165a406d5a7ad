"""Inputs a hostile but legitimate client sends (issue 20), through a real server: each gets its rule's answer."""

from __future__ import annotations

import io
import struct
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from index.log import LOG_FILE
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.server import RunningServer, start_server

from .conftest import N_ITEMS, Served, make_config
from .test_reliability import _code, _own_index_root

NOW_MS = int(time.time() * 1000)
WEEK_MS = 7 * 24 * 3600 * 1000
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def own(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server on its own copy of the index (its live log is this module's alone), /metrics on loopback."""
    root = _own_index_root(served, tmp_path_factory.mktemp("hostile") / "index")
    running = start_server(make_config(served, index_root=root, metrics_port=0))
    yield running
    running.stop(grace=1)


@pytest.fixture()
def cli(own: RunningServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{own.port}", timeout=20) as c:
        yield c


def _png_with_junk(junk: int) -> bytes:
    """An 8x8 PNG carrying a `junk`-byte tEXt chunk, then as many zeros after its end."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    body = b"Comment\0" + b"x" * junk
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:33] + chunk + png[33:] + b"\0" * junk  # after IHDR (8 + 25 bytes)


def test_bytes_that_are_not_pixels_are_not_stored(own: RunningServer, cli: Client) -> None:
    image = _png_with_junk(90_000)  # 180 KB in all: under this server's 200 KB image limit
    log = own.holder.config.index_root / LOG_FILE
    before = log.stat().st_size if log.exists() else 0
    cli.upsert([pb.Item(item_id="junk-png", title="a small square", images=[image])])
    assert log.stat().st_size - before < 20_000  # the 180 KB of text chunk and trailing zeros stayed out
    stored = cli.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["junk-png"])).embeddings[0].vector.values
    sent = cli.embed([pb.Item(title="a small square", images=[image])]).embeddings[0].vector.values
    np.testing.assert_allclose(stored, sent, atol=1e-6)  # the pixels the encoder saw are the same


def test_an_undated_event_beside_a_dated_one_counts(cli: Client) -> None:
    undated = cli.stub.RecommendForUser(pb.RecommendForUserRequest(
        history=[pb.HistoryEvent(item_id="item-001"), pb.HistoryEvent(item_id="item-002")], k=5))
    mixed = cli.stub.RecommendForUser(pb.RecommendForUserRequest(
        history=[pb.HistoryEvent(item_id="item-001", timestamp_ms=0),
                 pb.HistoryEvent(item_id="item-002", timestamp_ms=NOW_MS)], k=5))
    assert [n.item_id for n in mixed.neighbors] == [n.item_id for n in undated.neighbors]


@pytest.mark.parametrize("future", [NOW_MS + 365 * 24 * 3600 * 1000, INT64_MAX])
def test_a_future_event_counts_as_now_not_more(cli: Client, future: int) -> None:
    both_now = cli.stub.RecommendForUser(pb.RecommendForUserRequest(
        history=[pb.HistoryEvent(item_id="item-001", timestamp_ms=NOW_MS),
                 pb.HistoryEvent(item_id="item-002", timestamp_ms=NOW_MS)], k=5))
    one_future = cli.stub.RecommendForUser(pb.RecommendForUserRequest(
        history=[pb.HistoryEvent(item_id="item-001", timestamp_ms=NOW_MS),
                 pb.HistoryEvent(item_id="item-002", timestamp_ms=future)], k=5))
    assert [n.item_id for n in one_future.neighbors] == [n.item_id for n in both_now.neighbors]
    old = cli.stub.RecommendForUser(pb.RecommendForUserRequest(  # an event 40 years old still counts a little
        history=[pb.HistoryEvent(item_id="item-001", timestamp_ms=1)], k=5))
    assert len(old.neighbors) == 5


def test_weights_zero_unset_and_bad(cli: Client) -> None:
    def ids(*events: pb.HistoryEvent) -> list[str]:
        return [n.item_id for n in cli.stub.RecommendForUser(pb.RecommendForUserRequest(history=events, k=6)).neighbors]

    alone = ids(pb.HistoryEvent(item_id="item-002"))
    with_zero = ids(pb.HistoryEvent(item_id="item-001", weight=0.0), pb.HistoryEvent(item_id="item-002"))
    assert with_zero == [i for i in alone if i != "item-001"][:6] or with_zero[:5] == [i for i in alone
                                                                                        if i != "item-001"][:5]
    assert "item-001" not in with_zero  # a weight-0 event is still excluded from the results
    assert ids(pb.HistoryEvent(item_id="item-002", weight=1.0)) == alone  # unset means 1
    for events, reason in [
        ([pb.HistoryEvent(item_id="item-001", weight=0.0)], "weights_all_zero"),
        ([pb.HistoryEvent(item_id="item-001", weight=-1.0)], "weight_invalid: history[0].weight"),
        ([pb.HistoryEvent(item_id="item-001", weight=float("nan"))], "weight_invalid"),
        ([pb.HistoryEvent(item_id="item-001", timestamp_ms=-5)], "timestamp_invalid: history[0].timestamp_ms"),
    ]:
        got, details = _code(cli.stub.RecommendForUser, pb.RecommendForUserRequest(history=events, k=3))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and reason in details, details


def _raw(own: RunningServer, method: str, data: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{own.port}") as channel:
        call = channel.unary_unary(f"/onetower.v1.Recommendations/{method}")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            call(data, timeout=10)
    return err.value


def _metric(own: RunningServer, name: str, **labels: str) -> float:
    value = own.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_malformed_request_is_invalid_argument_counted_and_logged_once(
        own: RunningServer, cli: Client, caplog: pytest.LogCaptureFixture) -> None:
    bad_utf8 = pb.DeleteItemsRequest(item_ids=["ab"]).SerializeToString().replace(b"ab", b"\xff\xfe")
    counted = _metric(own, "onetower_requests_total", method="DeleteItems", code="INVALID_ARGUMENT")
    with caplog.at_level("WARNING"):
        for data in [bad_utf8, b"\x0a\xff\xff\xff", b"\xff" * 40] * 3:
            err = _raw(own, "DeleteItems", data)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert err.details().startswith("malformed_request: ")
    assert _metric(own, "onetower_requests_total", method="DeleteItems", code="INVALID_ARGUMENT") == counted + 9
    assert _metric(own, "onetower_malformed_requests_total", method="DeleteItems") >= 9
    lines = [r for r in caplog.records if "did not parse" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and not any(r.exc_info for r in lines)  # at most once a second, no traceback
    assert cli.health_status() == "SERVING"


def test_metrics_listen_on_the_grpc_host_only(own: RunningServer) -> None:
    port = own.metrics._http[0].server_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b"onetower_requests_total" in resp.read()
    with pytest.raises(urllib.error.URLError):  # another loopback address: not bound
        urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1.5, -2.0])
def test_min_score_out_of_range(cli: Client, value: float) -> None:
    got, details = _code(cli.similar, item_ids=["item-001"], k=3, min_score=value)
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "min_score_invalid" in details


def test_min_score_zero_is_a_floor_not_unset(cli: Client) -> None:
    everything = cli.similar(item_ids=["item-001"], k=50)[0]
    floored = cli.similar(item_ids=["item-001"], k=50, min_score=0.0)[0]
    assert [h.item_id for h in floored] == [h.item_id for h in everything if h.score >= 0.0]


@pytest.mark.parametrize("scale", [1e-30, 1e-40, 1e30, 1e38])
def test_query_vectors_of_any_scale_are_normalised(cli: Client, scale: float) -> None:
    vec = np.asarray(cli.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["item-004"])).embeddings[0].vector.values)
    unit = cli.similar(vectors=[vec.tolist()], k=5)[0]
    scaled = cli.similar(vectors=[(vec * scale).astype(np.float32).tolist()], k=5)[0]
    assert [h.item_id for h in scaled] == [h.item_id for h in unit]


UNPRINTABLE = ["a\x00b", "tab\there", "line\nbreak", "rtl\u202eevil", "zero\u200bwidth", "bell\x07"]


@pytest.mark.parametrize("item_id", UNPRINTABLE)
def test_unprintable_ids_are_refused_everywhere(cli: Client, item_id: str) -> None:
    calls = [
        (cli.stub.UpsertItems, pb.UpsertItemsRequest(items=[pb.Item(item_id=item_id, title="x")]), "items[0].item_id"),
        (cli.stub.DeleteItems, pb.DeleteItemsRequest(item_ids=[item_id]), "item_ids[0]"),
        (cli.stub.GetEmbeddings, pb.GetEmbeddingsRequest(item_ids=["item-001", item_id]), "item_ids[1]"),
        (cli.stub.SimilarItems, pb.SimilarItemsRequest(queries=[pb.Query(item_id=item_id)], k=3), "queries[0].item_id"),
        (cli.stub.SimilarItems, pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3,
                                                       exclude_item_ids=[item_id]), "exclude_item_ids[0]"),
        (cli.stub.RecommendForUser, pb.RecommendForUserRequest(
            history=[pb.HistoryEvent(item_id="item-001"), pb.HistoryEvent(item_id=item_id)], k=3), "history[1].item_id"),
        (cli.stub.RecommendForUser, pb.RecommendForUserRequest(
            history=[pb.HistoryEvent(item_id="item-001")], k=3, exclude_item_ids=[item_id]), "exclude_item_ids[0]"),
    ]
    for call, request, field in calls:
        got, details = _code(call, request)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and f"item_id_unprintable: {field}" in details, details


def test_id_lengths_and_counts_are_checked_in_exclusions_and_histories(cli: Client) -> None:
    long_id = "x" * 300
    for call, request, reason in [
        (cli.stub.SimilarItems, pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3,
                                                       exclude_item_ids=[long_id]), "item_id_too_long: exclude_item_ids[0]"),
        (cli.stub.RecommendForUser, pb.RecommendForUserRequest(history=[pb.HistoryEvent(item_id=long_id)], k=3),
         "item_id_too_long: history[0].item_id"),
        (cli.stub.SimilarItems, pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3,
                                                       exclude_item_ids=["x"] * 1001), "too_many_ids: exclude_item_ids"),
    ]:
        got, details = _code(call, request)
        assert reason in details, details
        assert got in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # a printable id with a space and non-Latin letters is fine
    cli.upsert([pb.Item(item_id="sku 42 — café ünï 😀", title="fine")])
    assert cli.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["sku 42 — café ünï 😀"])).embeddings


def test_get_embeddings_is_all_or_nothing_and_names_every_missing_id(cli: Client) -> None:
    ids = [f"item-{i:03d}" for i in range(18)] + ["nope-1", "item-020", "nope-2"]
    got, details = _code(cli.stub.GetEmbeddings, pb.GetEmbeddingsRequest(item_ids=ids))
    assert got == grpc.StatusCode.NOT_FOUND
    assert "2 of 21 ids" in details and "item_ids[18] 'nope-1'" in details and "item_ids[20] 'nope-2'" in details
    assert len(cli.stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=ids[:18])).embeddings) == 18
    assert cli.info().item_count >= N_ITEMS


def test_request_pixel_budget(served: Served, tmp_path: Path) -> None:
    from service.config import Limits

    limits = Limits(max_items=8, max_image_pixels=4_000_000, max_request_pixels=5_000_000,
                    max_message_bytes=8 * 1024 * 1024)
    running = start_server(make_config(served, index_root=_own_index_root(served, tmp_path / "i"), limits=limits))
    try:
        buf = io.BytesIO()
        Image.new("RGB", (2000, 1000), (200, 10, 10)).save(buf, format="PNG")
        with Client(f"127.0.0.1:{running.port}", timeout=20) as c:
            item = pb.Item(item_id="big", title="x", images=[buf.getvalue()] * 3)  # 6 MP in all, 2 MP each
            got, details = _code(c.upsert, [item])
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "request_pixels_too_many: items[0].images[2]" in details
            c.upsert([pb.Item(item_id="big", title="x", images=[buf.getvalue()] * 2)])  # 4 MP: within
    finally:
        running.stop(grace=1)
