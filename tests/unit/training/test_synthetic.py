"""The synthetic generator: seeded, modality-split traits, cold items held out, missing modalities."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from training.data.synthetic import (
    FORBIDDEN_WORDS,
    PRESETS,
    TRAIT_KINDS,
    VOCAB,
    SynthConfig,
    generate,
    load_traits,
)

SMALL = SynthConfig(n_items=120, n_users=40, seed=7, image_size=32)


def _frames(root: Path) -> dict[str, pl.DataFrame]:
    names = ("catalog", "interactions", "interactions_holdout", "traits", "preferences")
    return {name: pl.read_parquet(root / f"{name}.parquet") for name in names}


def test_same_seed_gives_identical_files_and_pixels(tmp_path: Path) -> None:
    a, b = generate(tmp_path / "a", SMALL), generate(tmp_path / "b", SMALL)
    for name, frame in _frames(a.root).items():
        assert frame.equals(_frames(b.root)[name]), name
    pngs = sorted(p.name for p in (a.root / "images").iterdir())
    assert pngs and pngs == sorted(p.name for p in (b.root / "images").iterdir())
    assert all((a.root / "images" / n).read_bytes() == (b.root / "images" / n).read_bytes() for n in pngs)


def test_another_seed_gives_another_dataset(tmp_path: Path) -> None:
    config = SynthConfig(n_items=120, n_users=40, write_images=False)
    a = generate(tmp_path / "a", config)
    b = generate(tmp_path / "b", SynthConfig(n_items=120, n_users=40, seed=1, write_images=False))
    assert not _frames(a.root)["traits"].equals(_frames(b.root)["traits"])
    assert not _frames(a.root)["interactions"].equals(_frames(b.root)["interactions"])


def test_image_only_traits_never_reach_the_text(tmp_path: Path) -> None:
    # strong noise: the typos must not invent a word naming a colour, pattern or shape either
    config = SynthConfig(n_items=600, n_users=10, noise=1.0, write_images=False)
    catalog = pl.read_parquet(generate(tmp_path, config).catalog)
    texts = catalog["title"].to_list() + catalog["description"].drop_nulls().to_list()
    texts += catalog["attributes"].to_list()
    leaked = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())} & FORBIDDEN_WORDS
    assert not leaked
    # while the text-only and shared traits do show in it
    traits = load_traits(tmp_path).filter("has_text").join(catalog, on="item_id")
    for trait in (t for t, kind in TRAIT_KINDS.items() if kind != "image" and t != "price_band"):
        shown = [v.lower() in (title + " " + desc).lower()
                 for v, title, desc in traits.select(trait, "title", "description").iter_rows()]
        assert sum(shown) / len(shown) > 0.6, trait  # typos may hide a word now and then


def test_cold_items_have_no_training_interactions(tmp_path: Path) -> None:
    ds = generate(tmp_path, SynthConfig(n_items=300, n_users=80, cold_start_rate=0.2, write_images=False))
    traits = load_traits(ds.traits)
    cold = set(traits.filter("is_cold")["item_id"])
    assert len(cold) == 60
    trained = set(pl.read_parquet(ds.interactions)["item_id"])
    held_out = set(pl.read_parquet(ds.holdout_interactions)["item_id"])
    assert not trained & cold
    assert held_out and held_out <= cold


@pytest.mark.parametrize(("no_image", "no_text"), [(0.1, 0.1), (0.25, 0.05)])
def test_missing_modality_shares_follow_the_config(tmp_path: Path, no_image: float, no_text: float) -> None:
    config = SynthConfig(n_items=400, n_users=10, missing_image_rate=no_image, missing_text_rate=no_text,
                         write_images=False)
    catalog = pl.read_parquet(generate(tmp_path, config).catalog)
    lacks_image = catalog["image_paths"].is_null()
    lacks_text = (catalog["title"] == "") & catalog["description"].is_null()
    assert lacks_image.mean() == pytest.approx(no_image, abs=0.02)
    assert lacks_text.mean() == pytest.approx(no_text, abs=0.02)
    assert not (lacks_image & lacks_text).any()  # every item keeps one modality
    assert set(catalog.filter(lacks_text)["attributes"]) == {"{}"}  # attributes are text too


def test_images_are_written_where_the_catalog_says(tmp_path: Path) -> None:
    ds = generate(tmp_path, SMALL)
    refs = pl.read_parquet(ds.catalog)["image_paths"].drop_nulls().explode().to_list()
    assert refs and all((ds.root / ref).is_file() for ref in refs)
    assert len(list((ds.root / "images").iterdir())) == len(refs)
    meta = json.loads(ds.meta.read_text())
    assert meta["config"]["n_items"] == SMALL.n_items and meta["vocab"]["colour"] == list(VOCAB["colour"])


def test_progress_counts_every_item(tmp_path: Path) -> None:
    seen: list[int] = []
    generate(tmp_path, SynthConfig(n_items=50, n_users=5, write_images=False), seen.append)
    assert sum(seen) == 50


@pytest.mark.parametrize(("fields", "message"), [
    ({"missing_image_rate": 0.6, "missing_text_rate": 0.5}, "missing rates sum to"),
    ({"preferences": "pairs"}, "preferences='pairs' must be one of"),
    ({"preference_share": 1.5}, r"preference_share=1.5 must be in \[0, 1\]"),
    ({"event_days": 0}, "event_days=0 must be >= 1"),
])
def test_invalid_config_names_the_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**fields)  # type: ignore[arg-type]


def test_existing_presets_generate_the_same_frames_as_before_the_crossed_mode(tmp_path: Path) -> None:
    # sha256 of the tiny preset's frames generated before SynthConfig gained preferences, preference_share
    # and event_days (a polars upgrade that changes write_ndjson's formatting would change it too)
    ds = generate(tmp_path, replace(PRESETS["tiny"], write_images=False))
    digest = hashlib.sha256()
    for frame in _frames(ds.root).values():
        digest.update(frame.write_ndjson().encode())
    assert digest.hexdigest() == "3b005d3f5eab14592524d0200a4f873e5f620ce4b0a41c2d6dc8ab377cd2b8d2"


@pytest.fixture(scope="module")
def crossed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    """The conjunction preset as shipped (1000 items, 600 users), without PNGs."""
    ds = generate(tmp_path_factory.mktemp("crossed"), replace(PRESETS["conjunction"], write_images=False))
    return _frames(ds.root)


def test_crossed_users_hold_two_conjunctions_on_one_trait_pair(crossed: dict[str, pl.DataFrame]) -> None:
    prefs = crossed["preferences"]
    per_user = prefs.group_by("user_id").agg(
        pl.len(), pl.col("trait_a", "trait_b").n_unique(), pl.col("value_a", "value_b").n_unique())
    assert len(per_user) == PRESETS["conjunction"].n_users
    assert (per_user["len"] == 2).all()
    assert (per_user["trait_a"] == 1).all() and (per_user["trait_b"] == 1).all()
    assert (per_user["value_a"] == 2).all() and (per_user["value_b"] == 2).all()  # red+leather, blue+cotton
    assert set(prefs["trait_a"]) == {"colour", "pattern", "shape"}  # never category, which the title states
    assert set(prefs["trait_b"]) == {"brand", "material", "price_band"}
    shown = crossed["traits"].unpivot(index="item_id", on=list(TRAIT_KINDS), variable_name="trait")
    pairs = shown.join(shown, on="item_id", suffix="_b").group_by(
        trait_a="trait", value_a="value", trait_b="trait_b", value_b="value_b").agg(matching=pl.len())
    support = prefs.join(pairs, on=["trait_a", "value_a", "trait_b", "value_b"], how="left")
    assert support["matching"].null_count() == 0 and (support["n_items"] == support["matching"]).all()
    assert support["n_items"].min() >= 3


def test_crossed_events_are_close_in_time_and_mostly_on_conjunctions(crossed: dict[str, pl.DataFrame],
                                                                     ) -> None:
    config = PRESETS["conjunction"]
    events = pl.concat([crossed["interactions"], crossed["interactions_holdout"]])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    assert events["ts"].min() >= start and events["ts"].max() < start + timedelta(days=config.event_days)
    shown = crossed["traits"].unpivot(index="item_id", on=list(TRAIT_KINDS), variable_name="trait")
    key = ["item_id", "trait", "value"]
    on_conjunction = (events.with_row_index("row").join(crossed["preferences"], on="user_id")
                      .join(shown, left_on=["item_id", "trait_a", "value_a"], right_on=key)
                      .join(shown, left_on=["item_id", "trait_b", "value_b"], right_on=key)["row"].n_unique())
    # popular picks satisfy a conjunction now and then by chance, so the share lands a little above
    assert on_conjunction / len(events) == pytest.approx(config.preference_share, abs=0.02)


def test_crossed_mode_keeps_cold_items_and_missing_modalities(crossed: dict[str, pl.DataFrame]) -> None:
    traits = crossed["traits"]
    assert traits["is_cold"].mean() == pytest.approx(0.1)
    assert (~traits["has_image"]).mean() == pytest.approx(0.1)
    assert (~traits["has_text"]).mean() == pytest.approx(0.1)
    assert not (~traits["has_image"] & ~traits["has_text"]).any()
    cold = set(traits.filter("is_cold")["item_id"])
    assert not set(crossed["interactions"]["item_id"]) & cold
    assert set(crossed["interactions_holdout"]["item_id"]) <= cold


def test_crossed_mode_is_deterministic(tmp_path: Path) -> None:
    config = replace(PRESETS["conjunction-tiny"], write_images=False)
    a, b = generate(tmp_path / "a", config), generate(tmp_path / "b", config)
    for name, frame in _frames(a.root).items():
        assert frame.equals(_frames(b.root)[name]), name
    other = generate(tmp_path / "c", replace(config, seed=3))
    assert not _frames(other.root)["preferences"].equals(_frames(a.root)["preferences"])
