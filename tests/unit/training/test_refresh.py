"""The refresh state file: same inputs resume, new inputs archive the old state and drop its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.fitting.config import TrainConfig
from training.lifecycle.refresh import STATE_FILE, RefreshConfig, _load_state


def _config(tmp_path: Path, interactions: bytes) -> RefreshConfig:
    (tmp_path / "catalog.parquet").write_bytes(b"catalog")
    (tmp_path / "interactions.parquet").write_bytes(interactions)
    return RefreshConfig(catalog=tmp_path / "catalog.parquet", interactions=tmp_path / "interactions.parquet",
                         workdir=tmp_path / "work", index_root=tmp_path / "index", train=TrainConfig(encoder="tiny"))


def test_same_inputs_resume_and_new_inputs_start_over(tmp_path: Path) -> None:
    config = _config(tmp_path, b"monday")
    config.workdir.mkdir()
    state = _load_state(config)
    state["steps"]["champion"] = {"version": "3"}
    (config.workdir / STATE_FILE).write_text(json.dumps(state))
    (config.workdir / "train" / "checkpoints").mkdir(parents=True)
    (config.workdir / "train" / "checkpoints" / "last.ckpt").write_bytes(b"weights")

    assert _load_state(config)["steps"] == {"champion": {"version": "3"}}  # a rerun resumes
    assert (config.workdir / "train" / "checkpoints" / "last.ckpt").exists()

    tuesday = _config(tmp_path, b"tuesday")  # the next scheduled run: new interactions
    assert _load_state(tuesday)["steps"] == {}
    assert not (config.workdir / "train").exists()  # its checkpoint must not be resumed
    archived = list(config.workdir.glob("refresh-state.*.json"))
    assert len(archived) == 1 and json.loads(archived[0].read_text())["steps"]["champion"] == {"version": "3"}


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"holdout_fraction=1\.5"):
        RefreshConfig(catalog=Path("c"), interactions=Path("i"), workdir=Path("w"), index_root=Path("x"),
                      train=TrainConfig(encoder="tiny"), holdout_fraction=1.5)
    with pytest.raises(ValueError, match="metric='mrr'"):
        RefreshConfig(catalog=Path("c"), interactions=Path("i"), workdir=Path("w"), index_root=Path("x"),
                      train=TrainConfig(encoder="tiny"), metric="mrr")
