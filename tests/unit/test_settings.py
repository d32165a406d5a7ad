"""One list of settings (onetower/settings.py): every command reads the variables it names, the README shows it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import typer
from mlflow import MlflowClient
from typer.testing import CliRunner

from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from onetower import serve_cli
from onetower.cli import app
from onetower.settings import GLOBAL, OTHER_MEANINGS, SETTINGS, markdown_table
from service.config import ServiceConfig
from training.lifecycle.register import MODEL_NAME, alias_version

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV: dict[str, str | None] = {name: None for s in SETTINGS for name in s.envvars}
# in the code but not a variable anything reads: the placeholder of crash_util's usage line
NOT_VARIABLES = {"ONETOWER_ARGS"}


def _options() -> Iterator[tuple[str, Any]]:
    """(command, click option) for the global options and every command's options."""
    group = typer.main.get_command(app)
    for param in group.params:
        yield GLOBAL, param
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            if param.param_type_name == "option":
                yield name, param


def _envvars(param: Any) -> tuple[str, ...]:
    envvar = param.envvar or ()
    return (envvar,) if isinstance(envvar, str) else tuple(envvar)


def test_every_command_reads_exactly_the_variables_the_list_names_for_it() -> None:
    expected = {(command, s.flags, s.envvars) for s in SETTINGS for command in s.commands}
    actual = {(command, tuple(p.opts), _envvars(p)) for command, p in _options() if _envvars(p)}
    assert actual - expected == set(), "read but not in onetower/settings.py"
    assert expected - actual == set(), "listed but not read"


def test_a_flag_that_names_a_setting_means_that_setting_on_every_command() -> None:
    for command, param in _options():
        for s in SETTINGS:
            for flag in set(s.flags) & set(param.opts):
                same = any(command in t.commands for t in SETTINGS if flag in t.flags)
                assert same or (command, flag) in OTHER_MEANINGS, f"{command} {flag} takes no {s.envvars}"


def test_each_command_has_the_listed_default() -> None:
    for command, param in _options():
        for s in SETTINGS:
            if command in s.commands and tuple(param.opts) == s.flags and not param.required:
                assert param.default == s.default, (command, s.flags)
    fields = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    assert fields["model_uri"].default is dataclasses.MISSING  # the library spells no second default


def test_the_readme_holds_the_table_and_every_variable_the_code_reads() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's settings table is stale: paste onetower.settings.markdown_table()"
    sources = [p for folder in ("embed", "index", "service", "training", "onetower", "tests")
               for p in (ROOT / folder).rglob("*.py")] + [ROOT / "Makefile"]
    named = {m for p in sources for m in re.findall(r"ONETOWER_[A-Z0-9_]+", p.read_text())} - NOT_VARIABLES
    assert {"ONETOWER_TRACKING_URI", "ONETOWER_BENCH_QUICK"} <= named
    assert sorted(v for v in named if not re.search(rf"`{v}[`=]", readme)) == []


@pytest.fixture()
def chdir_and_restore_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Commands point MLflow at their store process-wide and default to ./mlflow.db: keep both off the repo."""
    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def _publish(root: Path, model_version: str) -> None:
    vectors = np.eye(4, dtype=np.float32)
    ids = IdMap([f"i{i}" for i in range(4)], ["h"] * 4, [{}] * 4)
    publish_index(root, vectors, ids, IndexConfig(kind="flat"), MODEL_NAME, model_version)


def test_promote_and_rollback_find_the_registry_through_onetower_tracking_uri(
        tmp_path: Path, chdir_and_restore_tracking: None) -> None:
    store = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(MODEL_NAME)
    for _ in range(2):
        client.create_model_version(MODEL_NAME, source=(tmp_path / "weights").as_uri())
    for version in ("1", "2"):
        _publish(tmp_path / "index", version)
    decoy = tmp_path / "decoy.db"
    env = {**CLEAN_ENV, "ONETOWER_TRACKING_URI": store, "MLFLOW_TRACKING_URI": f"sqlite:///{decoy}",
           "ONETOWER_INDEX_ROOT": str(tmp_path / "index")}
    runner = CliRunner()
    for args, holder in ((["promote", "1"], "1"), (["promote", "2", "--force"], "2"), (["rollback"], "1")):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert alias_version(client, MODEL_NAME, "champion") == holder, args
    assert not decoy.exists() and not (tmp_path / "mlflow.db").exists()  # ONETOWER_ wins over MLFLOW_


def test_serve_builds_its_config_from_the_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ServiceConfig] = []

    def record(config: ServiceConfig) -> None:
        seen.append(config)
        raise typer.Exit(0)  # stop before any server starts

    monkeypatch.setattr(serve_cli, "start_server", record)
    monkeypatch.setattr(serve_cli, "bound_registry_downloads", lambda: None)  # it sets process-wide variables
    env = {**CLEAN_ENV, "ONETOWER_TRACKING_URI": "sqlite:///x.db", "MLFLOW_TRACKING_URI": "sqlite:///y.db",
           "ONETOWER_MODEL": "models:/m/3", "ONETOWER_INDEX_ROOT": str(tmp_path), "ONETOWER_HOST": "0.0.0.0",
           "ONETOWER_PORT": "0", "ONETOWER_METRICS_PORT": "9999", "ONETOWER_METRICS_HOST": "127.0.0.2", "ONETOWER_AUTH_TOKEN": "t0k",
           "ONETOWER_MAX_CONCURRENT_RPCS": "7", "ONETOWER_PRECISION": "bf16"}
    result = CliRunner().invoke(app, ["serve"], env=env)
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = seen[0]
    assert (config.tracking_uri, config.model_uri, config.index_root) == ("sqlite:///x.db", "models:/m/3", tmp_path)
    assert (config.host, config.port, config.metrics_port, config.auth_token) == ("0.0.0.0", 0, 9999, "t0k")
    assert (config.max_concurrent_rpcs, config.precision, config.metrics_host) == (7, "bf16", "127.0.0.2")
