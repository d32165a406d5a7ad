"""`onetower serve --processes 2` as a real process group on loopback (issue 16): members share the port,
see each other's writes, answer one /metrics, keep the port to themselves, and a killed member comes back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc

from .conftest import Served
from .test_live_writes import _free_port
from .test_reliability import _own_index_root


def _start(served: Served, root: Path, port: int, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "onetower.cli", "serve", "--model", str(served.encoder_dir), "--index-root",
           str(root), "--port", str(port), "--poll-seconds", "0", "--cache-dir", str(root.parent / "cache"), *extra]
    return subprocess.Popen(cmd, stdout=out.open("ab"), stderr=subprocess.STDOUT)


def _wait_for(condition, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)  # polling processes this test cannot be notified by


class Group:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, metrics_port: int, out: Path) -> None:
        self.proc, self.port, self.metrics_port, self.out = proc, port, metrics_port, out

    def channel_to(self, pids: set[int]) -> tuple[grpc.Channel, int]:
        """A connection of its own that lands on a member whose pid is in `pids` (the kernel picks)."""
        for _ in range(200):
            channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                pid = pb_grpc.RecommendationsStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10).pid
            except grpc.RpcError:
                channel.close()
                continue
            if pid in pids:
                return channel, pid
            channel.close()
        raise AssertionError(f"no connection landed on {pids}")

    def pids(self) -> set[int]:
        seen: set[int] = set()
        for _ in range(40):
            channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                seen.add(pb_grpc.RecommendationsStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10).pid)
            except grpc.RpcError:
                pass
            finally:
                channel.close()
            if len(seen) == 2:
                break
        return seen


@pytest.fixture(scope="module")
def group(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    tmp = tmp_path_factory.mktemp("group")
    root = _own_index_root(served, tmp / "index")
    port, metrics_port, out = _free_port(), _free_port(), tmp / "group.out"
    proc = _start(served, root, port, out, "--processes", "2", "--metrics-port", str(metrics_port))
    g = Group(proc, port, metrics_port, out)
    _wait_for(lambda: "with 2 processes" in out.read_text() or proc.poll() is not None, "the group to start")
    assert proc.poll() is None, out.read_text()[-3000:]
    yield g
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, out.read_text()[-3000:]


def test_two_members_share_the_port_and_see_each_others_writes(group: Group) -> None:
    pids = group.pids()
    assert len(pids) == 2, pids
    a_pid, b_pid = sorted(pids)
    a, _ = group.channel_to({a_pid})
    b, _ = group.channel_to({b_pid})
    sa, sb = pb_grpc.RecommendationsStub(a), pb_grpc.RecommendationsStub(b)
    for i in range(5):  # each write acknowledged by one member is read at once from the other
        writer, reader = (sa, sb) if i % 2 == 0 else (sb, sa)
        item = f"cross-{i}"
        writer.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=item, title=f"a shared write {i}")]))
        got = reader.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=[item])).embeddings[0].vector.values
        hits = reader.SimilarItems(pb.SimilarItemsRequest(queries=[pb.Query(vector=pb.Vector(values=got))], k=1))
        assert hits.results[0].neighbors[0].item_id == item
    sb.DeleteItems(pb.DeleteItemsRequest(item_ids=["cross-0"]))
    with pytest.raises(grpc.RpcError) as err:
        sa.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["cross-0"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert sa.GetInfo(pb.GetInfoRequest()).item_count == sb.GetInfo(pb.GetInfoRequest()).item_count
    a.close()
    b.close()


def test_one_metrics_endpoint_counts_both_members(group: Group) -> None:
    def served_calls() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{group.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(v) for v in re.findall(r'onetower_requests_total\{code="OK",method="GetInfo"\} (\S+)', text))

    before = served_calls()
    assert len(group.pids()) == 2  # calls on both members
    assert served_calls() >= before + 2


def test_the_port_stays_the_groups(served: Served, group: Group, tmp_path: Path) -> None:
    root = _own_index_root(served, tmp_path / "index")
    second = _start(served, root, group.port, tmp_path / "second.out", "--processes", "2")
    assert second.wait(120) == 1
    assert "held by another onetower process group" in (tmp_path / "second.out").read_text()
    plain = _start(served, root, group.port, tmp_path / "plain.out")
    assert plain.wait(120) != 0
    assert "cannot bind" in (tmp_path / "plain.out").read_text()


def test_a_killed_member_is_restarted_and_loses_nothing(group: Group) -> None:
    victim, _ = group.channel_to(group.pids())
    stub = pb_grpc.RecommendationsStub(victim)
    pid = stub.GetInfo(pb.GetInfoRequest()).pid
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"before-kill-{i}", title="acked") for i in range(8)]))
    vector = np.asarray(stub.GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["before-kill-3"])).embeddings[0]
                        .vector.values)
    victim.close()
    os.kill(pid, signal.SIGKILL)
    survivor, survivor_pid = group.channel_to(group.pids() - {pid})  # the other member serves throughout
    got = pb_grpc.RecommendationsStub(survivor).GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["before-kill-3"]))
    np.testing.assert_allclose(got.embeddings[0].vector.values, vector, atol=1e-6)
    survivor.close()
    _wait_for(lambda: len(group.pids() - {pid}) == 2, "a restarted member")
    newcomer, _ = group.channel_to(group.pids() - {pid, survivor_pid})  # replays the log it did not write
    ids = [f"before-kill-{i}" for i in range(8)]
    assert len(pb_grpc.RecommendationsStub(newcomer).GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=ids)).embeddings) == 8
    newcomer.close()
    assert "restarting" in group.out.read_text()



def test_two_separate_servers_on_one_index_root_swap_to_the_same_version(served: Served, tmp_path: Path) -> None:
    """Replicas (two `serve` commands, not one group) following one index root: one published version, one log."""
    from index.config import IndexConfig
    from index.publish import load_version, publish_index
    from service.registry import lookup_model

    root = _own_index_root(served, tmp_path / "index")
    ports = [_free_port(), _free_port()]
    procs = [_start(served, root, port, tmp_path / f"replica-{i}.out", "--poll-seconds", "0.3")
             for i, port in enumerate(ports)]
    stubs = [pb_grpc.RecommendationsStub(grpc.insecure_channel(f"127.0.0.1:{port}")) for port in ports]

    def info(stub: pb_grpc.RecommendationsStub) -> pb.GetInfoResponse | None:
        try:
            return stub.GetInfo(pb.GetInfoRequest(), timeout=5)
        except grpc.RpcError:
            return None

    try:
        _wait_for(lambda: all(info(s) is not None for s in stubs), "both replicas serving")
        first = {info(s).index_version for s in stubs}  # type: ignore[union-attr]
        assert len(first) == 1
        current = load_version(root)
        ref = lookup_model(str(served.encoder_dir))
        new = publish_index(root, np.asarray(current.vectors), current.ids, IndexConfig(kind="flat"), ref.name,
                            ref.version).manifest.index_version
        assert new not in first
        _wait_for(lambda: all((i := info(s)) is not None and i.index_version == new for s in stubs),
                  "both replicas on the new version")
        stubs[0].UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="replica-write", title="one log")]))
        assert stubs[1].GetEmbeddings(pb.GetEmbeddingsRequest(item_ids=["replica-write"])).embeddings
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
