"""Oracle vectors from the synthetic traits: exact rows, missing modalities, what the conjunction adds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from training.data.synthetic import PRESETS, VOCAB, generate, load_traits
from training.evaluation.oracles import IMAGE_TRAITS, TEXT_TRAITS, oracle_vectors

SIZES = {"colour": 8, "pattern": 5, "shape": 4, "brand": 12, "material": 7, "price_band": 4}
IMAGE_DIM, TEXT_DIM = 17, 23
ITEMS = {  # item_id: colour, pattern, shape, brand, material, price_band, has_image, has_text
    "red-leather": ("red", "solid", "circle", "Zorvane", "leather", "budget", True, True),
    "blue-cotton": ("blue", "solid", "circle", "Zorvane", "cotton", "budget", True, True),
    "red-leather-2": ("red", "stripes", "square", "Lumetta", "leather", "mid", True, True),
    "red-cotton-2": ("red", "stripes", "square", "Lumetta", "cotton", "mid", True, True),
    "no-image": ("green", "dots", "cross", "Brakka", "wool", "luxury", False, True),
    "no-text": ("black", "zigzag", "triangle", "Ostrel", "steel", "premium", True, False),
}


def _traits() -> pl.DataFrame:
    rows = [(item_id, *values, "bag") for item_id, values in ITEMS.items()]
    columns = ["item_id", *IMAGE_TRAITS, *TEXT_TRAITS, "has_image", "has_text", "category"]
    return pl.DataFrame(rows, schema=columns, orient="row")


def _dim(trait: str, value: str) -> int:
    """Position of a trait value's one-hot: image traits first (colour, pattern, shape), then text ones."""
    offsets = dict(zip(SIZES, np.cumsum([0, *SIZES.values()]).tolist(), strict=False))
    return offsets[trait] + VOCAB[trait].index(value)


def test_rows_match_a_hand_computation() -> None:
    vectors = oracle_vectors(_traits(), ["red-leather", "no-image", "no-text", "absent"])
    additive, conjunction = vectors["additive"], vectors["conjunction"]
    assert additive.dtype == conjunction.dtype == np.float32
    assert additive.shape == (4, IMAGE_DIM + TEXT_DIM)
    assert conjunction.shape == (4, IMAGE_DIM + TEXT_DIM + IMAGE_DIM * TEXT_DIM)
    image, text = ("red", "solid", "circle"), ("Zorvane", "leather", "budget")
    image_dims = [_dim(t, v) for t, v in zip(IMAGE_TRAITS, image, strict=True)]
    text_dims = [_dim(t, v) for t, v in zip(TEXT_TRAITS, text, strict=True)]
    # both modalities: three ones a part, each part unit (1/sqrt(3)), the pair / sqrt(2)
    expected = np.zeros(IMAGE_DIM + TEXT_DIM)
    expected[image_dims + text_dims] = 1 / math.sqrt(6)
    np.testing.assert_allclose(additive[0], expected, atol=1e-7)
    # conjunction: sqrt(0.3) x that, then sqrt(0.7) x (1/sqrt(3))^2 at the nine (image, text) cells
    expected_conj = np.zeros(conjunction.shape[1])
    expected_conj[: IMAGE_DIM + TEXT_DIM] = math.sqrt(0.3) * expected
    for i in image_dims:
        for j in text_dims:
            expected_conj[IMAGE_DIM + TEXT_DIM + i * TEXT_DIM + (j - IMAGE_DIM)] = math.sqrt(0.7) / 3
    np.testing.assert_allclose(conjunction[0], expected_conj, atol=1e-7)


def test_a_missing_modality_contributes_zeros_and_an_absent_item_is_zero() -> None:
    vectors = oracle_vectors(_traits(), ["no-image", "no-text", "absent"])
    additive, conjunction = vectors["additive"], vectors["conjunction"]
    text_only = np.zeros(IMAGE_DIM + TEXT_DIM)
    text_only[[_dim("brand", "Brakka"), _dim("material", "wool"), _dim("price_band", "luxury")]] = 3**-0.5
    np.testing.assert_allclose(additive[0], text_only, atol=1e-7)  # green, dots, cross are unknown to it
    image_only = np.zeros(IMAGE_DIM + TEXT_DIM)
    image_only[[_dim("colour", "black"), _dim("pattern", "zigzag"), _dim("shape", "triangle")]] = 3**-0.5
    np.testing.assert_allclose(additive[1], image_only, atol=1e-7)
    # no conjunction part: the conjunction row is the additive row padded with zeros
    np.testing.assert_allclose(conjunction[:2, : IMAGE_DIM + TEXT_DIM], additive[:2], atol=1e-7)
    assert not conjunction[:2, IMAGE_DIM + TEXT_DIM:].any()
    assert not additive[2].any() and not conjunction[2].any()


def test_conjunction_separates_what_the_additive_ties() -> None:
    # a crossed user: history red+leather and blue+cotton; candidates red+leather and red+cotton
    ids = ["red-leather", "blue-cotton", "red-leather-2", "red-cotton-2"]
    vectors = oracle_vectors(_traits(), ids)
    scores = {}
    for name, v in vectors.items():
        query = v[0] + v[1]
        scores[name] = (float(v[2] @ query), float(v[3] @ query))
    assert scores["additive"][0] == pytest.approx(scores["additive"][1])  # red and leather, red and cotton
    assert scores["conjunction"][0] > scores["conjunction"][1] + 0.05


def test_rows_follow_item_ids_and_are_unit_on_a_generated_catalog(tmp_path: Path) -> None:
    ds = generate(tmp_path, replace(PRESETS["conjunction-tiny"], write_images=False))
    traits = load_traits(ds.traits)
    ids = traits["item_id"].to_list()[::-1]
    vectors = oracle_vectors(traits, ids)
    for v in vectors.values():
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)  # every item keeps a modality
    forward = oracle_vectors(traits, ids[::-1])
    np.testing.assert_array_equal(forward["conjunction"][::-1], vectors["conjunction"])


@pytest.mark.parametrize(("traits", "message"), [
    (_traits().drop("material"), r"traits lacks columns \['material'\]"),
    (pl.concat([_traits(), _traits().head(1)]), r"traits repeats item_id \['red-leather'\]"),
    (_traits().with_columns(colour=pl.lit("teal")), r"'colour' holds \['teal'\] for item 'red-leather'"),
])
def test_bad_traits_name_the_problem(traits: pl.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        oracle_vectors(traits, list(ITEMS))


def test_a_value_is_only_checked_where_its_modality_is_shown() -> None:
    traits = _traits().with_columns(colour=pl.when(pl.col("has_image")).then("colour").otherwise(None))
    vectors = oracle_vectors(traits, ["no-image"])
    np.testing.assert_allclose(vectors["additive"], oracle_vectors(_traits(), ["no-image"])["additive"])
