"""Prometheus metrics on their HTTP port, counted from real calls."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.client import Client
from service.server import start_server

from .conftest import Served, make_config
from .test_reliability import _own_index_root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_count_requests_errors_and_latency(served: Served, tmp_path: Path) -> None:
    port = _free_port()
    running = start_server(make_config(served, index_root=_own_index_root(served, tmp_path / "index"),
                                       metrics_port=port))  # its own copy: other tests' live writes stay out
    try:
        with Client(f"127.0.0.1:{running.port}") as c:
            for _ in range(3):
                c.info()
            with pytest.raises(grpc.RpcError):
                c.similar(item_ids=["missing"], k=3)
            c.similar(item_ids=["item-001", "item-002"], k=3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        running.stop(grace=0)
    assert 'onetower_requests_total{code="OK",method="GetInfo"} 3.0' in text
    assert 'onetower_requests_total{code="NOT_FOUND",method="SimilarItems"} 1.0' in text
    assert 'onetower_request_seconds_count{method="SimilarItems"} 2.0' in text
    assert 'onetower_batch_items_sum{method="SimilarItems"} 2.0' in text
    assert "onetower_index_items 60.0" in text
    assert 'onetower_model_version{' in text
