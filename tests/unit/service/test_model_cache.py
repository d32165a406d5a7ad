"""What a restart may start from while the registry is down (`cached_model`), and bounded registry downloads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from index.config import IndexConfig
from index.ids import IdMap
from index.publish import publish_index
from onetower.serve_cli import REGISTRY_HTTP_DEFAULTS, bound_registry_downloads
from service.registry import ModelRef, cached_model


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    x = np.eye(4, dtype=np.float32)
    publish_index(tmp_path / "index", x, IdMap([f"i{i}" for i in range(4)], [""] * 4, [{}] * 4),
                  IndexConfig(kind="flat"), "enc", "3")
    return tmp_path / "index"


def _cache(tmp_path: Path, name: str, version: str, complete: bool = True) -> Path:
    folder = tmp_path / "cache" / name / version
    folder.mkdir(parents=True)
    if complete:
        (folder / ".complete").write_text("ok\n")
    return tmp_path / "cache"


def test_alias_resolves_to_the_version_current_was_built_with(root: Path, tmp_path: Path) -> None:
    cache = _cache(tmp_path, "enc", "3")
    assert cached_model("models:/enc@champion", root, cache) == ModelRef("enc", "3", "champion", "models:/enc/3")
    assert cached_model("models:/enc/3", root, cache) == ModelRef("enc", "3", "", "models:/enc/3")


@pytest.mark.parametrize("uri", ["models:/enc/4", "models:/other@champion", "some/local/dir"])
def test_another_model_or_version_is_not_taken_from_the_cache(root: Path, tmp_path: Path, uri: str) -> None:
    assert cached_model(uri, root, _cache(tmp_path, "enc", "3")) is None


def test_an_incomplete_download_or_no_index_is_not_used(root: Path, tmp_path: Path) -> None:
    assert cached_model("models:/enc@champion", root, _cache(tmp_path, "enc", "3", complete=False)) is None
    assert cached_model("models:/enc@champion", tmp_path / "no-index", tmp_path / "cache") is None


def test_serve_bounds_registry_downloads_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    bound_registry_downloads()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == REGISTRY_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
