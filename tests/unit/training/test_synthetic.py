"""The synthetic generator: seeded, modality-split traits, cold items held out, missing modalities."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from training.data.synthetic import FORBIDDEN_WORDS, TRAIT_KINDS, VOCAB, SynthConfig, generate, load_traits

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


def test_invalid_config_names_the_value() -> None:
    with pytest.raises(ValueError, match="missing rates sum to"):
        SynthConfig(missing_image_rate=0.6, missing_text_rate=0.5)
