"""Structured logs: `--log-format json` gives one JSON object per line with the request's fields."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import grpc
import pytest
from typer.testing import CliRunner

from onetower.cli import app
from protos.onetower.v1 import onetower_pb2 as pb
from service.client import Client
from service.logs import JsonFormatter, configure_logging
from service.server import RunningServer


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines_carry_request_id_rpc_code_and_model_version(
        server: RunningServer, client: Client, capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("json", "DEBUG")
    client.stub.SimilarItems(pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3),
                             metadata=(("x-request-id", "req-ok-1"),))
    with pytest.raises(grpc.RpcError):
        client.stub.SimilarItems(pb.SimilarItemsRequest(queries=[pb.Query(item_id="no-such-item")], k=3),
                                 metadata=(("x-request-id", "req-missing-2"),))
    logging.getLogger("onetower.test").warning("with %s", "args", extra={"rows": 3})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    by_id = {r.get("request_id"): r for r in records if r.get("rpc") == "SimilarItems"}
    served = server.holder.current
    assert served is not None
    assert by_id["req-ok-1"]["code"] == "OK" and by_id["req-missing-2"]["code"] == "NOT_FOUND"
    assert by_id["req-ok-1"]["model_version"] == served.model_version
    assert by_id["req-ok-1"]["level"] == "DEBUG" and by_id["req-ok-1"]["logger"] == "service.admission"
    mine = next(r for r in records if r["logger"] == "onetower.test")
    assert mine["msg"] == "with args" and mine["rows"] == 3 and mine["ts"].endswith("Z")


def test_exceptions_are_one_line_of_json() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %d", (7,), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "failed 7" and "ValueError: boom" in parsed["exc"]


def test_cli_flag_and_environment_choose_the_format(server: RunningServer, restore_logging: None) -> None:
    runner = CliRunner()
    target = ["info", "--target", f"127.0.0.1:{server.port}"]
    assert runner.invoke(app, ["--log-format", "json", *target]).exit_code == 0
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    assert runner.invoke(app, target, env={"ONETOWER_LOG_FORMAT": "text"}).exit_code == 0
    assert not isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    bad = runner.invoke(app, ["--log-format", "xml", *target])
    assert bad.exit_code != 0 and "xml" in bad.output
