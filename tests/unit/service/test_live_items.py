"""GetLiveItems (the stored content of live writes) and a read-only server (refuses writes, appends nothing)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import pytest

from index.log import LOG_FILE
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.server import start_server

from .conftest import Served, make_config, png


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A server over its own copy of the index: the writes here never reach the package's server."""
    folder = tmp_path_factory.mktemp("live-items")
    shutil.copytree(served.root / "index", folder / "index")
    running = start_server(make_config(served, index_root=folder / "index", cache_dir=folder / "cache"))
    with Client(f"127.0.0.1:{running.port}", timeout=20) as c:
        yield c
    running.stop(grace=0)


def _live(client: Client, ids: list[str]) -> pb.GetLiveItemsResponse:
    return client.stub.GetLiveItems(pb.GetLiveItemsRequest(item_ids=ids), timeout=client.timeout)


def test_live_items_come_back_with_their_stored_content_and_the_rest_is_named_missing(client: Client) -> None:
    red = png((200, 0, 0))
    client.upsert([pb.Item(item_id="live-1", title="red lamp", description="d", attributes={"category": "lamp"},
                           images=[red]),
                   pb.Item(item_id="live-2", title="first"), pb.Item(item_id="live-gone", title="soon deleted")])
    client.upsert([pb.Item(item_id="live-2", title="second")])  # the newest content wins
    client.delete(["live-gone"])
    res = _live(client, ["item-001", "live-2", "nope", "live-gone", "live-1"])
    assert [it.item_id for it in res.items] == ["live-2", "live-1"]
    assert list(res.missing_item_ids) == ["item-001", "nope", "live-gone"]  # published, unknown, deleted
    second, first = res.items
    assert second.title == "second"
    assert (first.title, first.description, dict(first.attributes), list(first.images)) == \
        ("red lamp", "d", {"category": "lamp"}, [red])


def test_live_items_refuses_bad_ids_by_field(client: Client) -> None:
    for ids, code, reason in (([], grpc.StatusCode.INVALID_ARGUMENT, "ids_empty"),
                              (["a\x00b"], grpc.StatusCode.INVALID_ARGUMENT, "item_id_unprintable"),
                              ([f"x{i}" for i in range(9)], grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_ids")):
        with pytest.raises(grpc.RpcError) as err:
            _live(client, ids)
        assert (err.value.code(), err.value.details().split(":")[0]) == (code, reason)


def test_a_read_only_server_refuses_writes_and_opens_no_log(served: Served, tmp_path_factory: pytest.TempPathFactory
                                                            ) -> None:
    root = tmp_path_factory.mktemp("ro")
    shutil.copytree(served.root / "index", root / "index-copy", ignore=shutil.ignore_patterns(LOG_FILE))
    running = start_server(make_config(served, index_root=root / "index-copy", read_only=True))
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=20) as ro:
            for call in (lambda: ro.upsert([pb.Item(item_id="ro-1", title="x")]), lambda: ro.delete(["item-001"])):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert (err.value.code(), err.value.details().split(":")[0]) == \
                    (grpc.StatusCode.FAILED_PRECONDITION, "read_only")
            assert ro.similar(item_ids=["item-001"], k=3)[0]  # reads are served
            assert list(_live(ro, ["item-001"]).missing_item_ids) == ["item-001"]
    finally:
        running.stop(grace=0)
    assert not (root / "index-copy" / LOG_FILE).exists()
