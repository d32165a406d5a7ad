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
from training.register import MODEL_NAME

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
