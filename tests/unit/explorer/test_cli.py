"""`onetower explore`: its help, its refusals, and the real command serving the page until SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from onetower.cli import app

from .conftest import Explored, get_json


def test_help_shows_the_one_command_and_a_bad_port_is_refused() -> None:
    runner = CliRunner()
    shown = " ".join(runner.invoke(app, ["explore", "--help"]).output.split())
    assert "onetower explore --target 127.0.0.1:50051 --catalog" in shown
    refused = runner.invoke(app, ["explore", "--explorer-port", "70000"], env={"ONETOWER_EXPLORER_PORT": None})
    assert refused.exit_code == 2 and "less than or equal to 65535" in " ".join(refused.output.split())


def test_the_command_prints_its_url_serves_the_page_and_stops_on_sigint(explored: Explored) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONETOWER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onetower.cli", "explore", "--target", f"127.0.0.1:{explored.server.port}",
         "--catalog", str(explored.catalog), "--explorer-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env | {"COLUMNS": "200"})
    try:
        assert proc.stdout is not None
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "explore exited early"
            found = re.search(r"explorer on (http://127\.0\.0\.1:\d+/)", line)
            url = found.group(1) if found else None
        assert url is not None
        status, info = get_json(url + "api/info")
        assert (status, info["catalog_items"]) == (200, 40)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0  # Ctrl-C is the way to stop it: a clean exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
