"""The refresh state file (same inputs resume, new inputs archive the old state and drop its checkpoints) and
the refresh holdout rule (items new to the champion)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from training.fitting.config import TrainConfig
from training.lifecycle.holdout import NoFairHoldout, choose_holdout
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


def _events(pairs: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs]})


EVENTS = _events([(f"u{n % 5}", f"i{n}") for n in range(20)])  # items i0..i19


def test_the_holdout_is_drawn_from_items_new_to_the_champion() -> None:
    seen = {f"i{n}" for n in range(15)}  # i15..i19 arrived after the champion was trained
    chosen = choose_holdout(EVENTS, None, seen, 0.1, seed=0, champion="3", force=False)
    held = set(chosen.holdout["item_id"].to_list())
    assert len(held) == 2 and held <= {f"i{n}" for n in range(15, 20)} and chosen.fair
    assert not held & set(chosen.train["item_id"].to_list())
    assert "2 of the 5 items new since version 3" in chosen.description
    few = choose_holdout(EVENTS, None, seen | {"i15", "i16", "i17", "i18"}, 0.5, seed=0, champion="3", force=False)
    assert few.holdout["item_id"].to_list() == ["i19"]  # fewer new items than the fraction asks: all of them


def test_a_given_holdout_loses_the_items_the_champion_trained_on() -> None:
    given = _events([("u1", "i2"), ("u2", "i18"), ("u3", "i19")])
    chosen = choose_holdout(EVENTS, given, {f"i{n}" for n in range(19)}, 0.1, seed=0, champion="3", force=False)
    assert chosen.holdout["item_id"].to_list() == ["i19"]
    assert "2 items dropped: version 3 trained on them" in chosen.description


def test_no_fair_holdout_refuses_unless_forced_and_then_says_it_is_warm() -> None:
    with pytest.raises(NoFairHoldout, match="no record of what it trained on"):
        choose_holdout(EVENTS, None, None, 0.1, seed=0, champion="3", force=False)
    everything = set(EVENTS["item_id"].to_list())
    with pytest.raises(NoFairHoldout, match="none of the 20 items"):
        choose_holdout(EVENTS, None, everything, 0.1, seed=0, champion="3", force=False)
    forced = choose_holdout(EVENTS, None, everything, 0.1, seed=0, champion="3", force=True)
    assert not forced.fair and forced.description.startswith("WARM for the champion")
    assert forced.holdout.height == 2
