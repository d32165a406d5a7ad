"""`onetower serve` as a real process: SIGTERM stops it cleanly, and acknowledged writes survive a restart after SIGTERM or SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from training.lifecycle.register import MODEL_NAME

from .conftest import Trained, free_port


def _serve(trained: Trained, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "onetower.cli", "serve", "--model", f"models:/{MODEL_NAME}@champion",
           "--index-root", str(trained.index_root), "--tracking-uri", trained.tracking_uri, "--port", str(port),
           "--poll-seconds", "0", "--cache-dir", str(trained.workdir / "proc-cache")]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_serving(target: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with Client(target, timeout=2) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if c.health_status() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"server did not become SERVING:\n{log.read_text()[-3000:]}")


def test_sigterm_then_restart_keeps_acknowledged_writes(trained: Trained, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = _serve(trained, port, log)
    try:
        _wait_serving(target, proc, log)
        with Client(target) as c:
            assert c.upsert([pb.Item(item_id="durable-1", title="Ostrel wool hat")]).upserted == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        # a second server on the same port while one runs must fail to start (so_reuseport off)
        proc = _serve(trained, port, log)
        _wait_serving(target, proc, log)
        clash = _serve(trained, port, tmp_path / "clash.log")
        assert clash.wait(timeout=120) != 0
        with Client(target) as c:
            assert "durable-1" in c.embeddings(["durable-1"])
            assert c.delete(["durable-1"]) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_sigkill_right_after_acknowledging_upserts_loses_none(trained: Trained, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = _serve(trained, port, log)
    acked: list[str] = []
    stop = threading.Event()

    def write_until_killed() -> None:  # upserts one after another; an id is recorded once acknowledged
        with Client(target, timeout=30) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                item_id = f"sigkill-{i}"
                try:
                    c.upsert([pb.Item(item_id=item_id, title=f"Ostrel wool hat {i}")])
                except grpc.RpcError:
                    return  # the server died with this one in flight: not acknowledged
                acked.append(item_id)

    try:
        _wait_serving(target, proc, log, timeout=300)
        writer = threading.Thread(target=write_until_killed, daemon=True)
        writer.start()
        deadline = time.monotonic() + 60
        while len(acked) < 20 and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # while the writer keeps writing: no chance to flush or close
        assert proc.wait(timeout=30) == -signal.SIGKILL
        stop.set()
        writer.join(timeout=30)
        assert len(acked) >= 20, log.read_text()[-3000:]
        proc = _serve(trained, port, tmp_path / "restart.log")
        # 25 s measured at load average 15 on 2 cores; once it stayed silent past 120 s under heavier load
        _wait_serving(target, proc, tmp_path / "restart.log", timeout=300)
        with Client(target) as c:
            found = c.embeddings(acked)  # NOT_FOUND if any acknowledged upsert was lost
            assert set(found) == set(acked)
            # leave the shared index as it was (the upsert in flight at the kill may or may not have landed)
            assert c.delete(acked) == len(acked)
            c.delete([f"sigkill-{len(acked)}"])
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_sigterm_under_load_lets_calls_in_flight_finish_and_keeps_acknowledged_writes(
        trained: Trained, tmp_path: Path) -> None:
    """Four clients upsert and search without pause; SIGTERM lands in the middle. Calls in flight at the
    signal finish OK; calls after it are refused with UNAVAILABLE (never aborted as CANCELLED, INTERNAL or
    UNKNOWN); every acknowledged upsert is served after a restart."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = _serve(trained, port, log)
    calls: list[tuple[float, float, grpc.StatusCode, str]] = []  # start, end, code, upserted id ("" for a search)
    stop = threading.Event()

    def client(n: int) -> None:
        with Client(target, timeout=20) as c:
            i = 0
            while not stop.is_set():
                i += 1
                item_id = f"term-{n}-{i}" if i % 2 else ""
                start = time.monotonic()
                try:
                    if item_id:
                        c.upsert([pb.Item(item_id=item_id, title=f"Ostrel wool hat {n} {i}")])
                    else:
                        c.similar(item_ids=[f"term-{n}-{i - 1}"], k=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                calls.append((start, time.monotonic(), code, item_id))
                if code != grpc.StatusCode.OK:
                    time.sleep(0.05)

    try:
        _wait_serving(target, proc, log)
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        time.sleep(0.5)  # clients see the refusals of a stopped server
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = [c for c in calls if c[1] < signalled]
    in_flight = [c for c in calls if c[0] < signalled <= c[1]]
    assert before and all(c[2] == grpc.StatusCode.OK for c in before), "failures before the signal"
    assert {c[2] for c in calls} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, {c[2] for c in calls}
    # A call sent a few ms before the signal may reach a server that has already stopped accepting (refused,
    # UNAVAILABLE); one sent earlier than that was being served and must have finished.
    assert all(c[2] == grpc.StatusCode.OK for c in in_flight if c[0] < signalled - 0.2), in_flight
    assert any(c[2] == grpc.StatusCode.OK for c in in_flight), "no call was in flight at the signal"
    acknowledged = [c[3] for c in calls if c[3] and c[2] == grpc.StatusCode.OK]
    proc = _serve(trained, port, log)
    try:
        _wait_serving(target, proc, log)
        with Client(target) as c:
            assert set(c.embeddings(acknowledged)) == set(acknowledged)
            c.delete(acknowledged)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
