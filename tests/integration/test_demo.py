"""`onetower demo` end to end on a small workdir: it serves and its example query shows neighbours."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from onetower.cli import app


def test_demo_reaches_serving_and_answers_its_example_query(tmp_path: Path) -> None:
    args = ["demo", "--workdir", str(tmp_path / "demo"), "--port", "0", "--items", "150", "--users", "100",
            "--max-steps", "5", "--exit-after-query", "--explorer-port", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "serving on 127.0.0.1:" in result.output
    assert "neighbours of item-" in result.output
    assert "onetower query" in result.output  # how to query it from another terminal
    assert "explorer on http://127.0.0.1:" in result.output
    again = CliRunner().invoke(app, [*args, "--processes", "2"])  # the same workdir is reused, served by a group
    assert again.exit_code == 0, again.output
    assert "(2 processes)" in again.output and "neighbours of item-" in again.output
    assert (tmp_path / "demo" / "mlflow.db").is_file()
