"""`onetower serve` as a real process: SIGTERM stops it cleanly and acknowledged writes survive a restart."""

from __future__ import annotations

import signal
import subprocess
import sys
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


def _wait_serving(target: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
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
