"""Catalogs and interactions in the shapes users bring: struct or JSON attributes, one image path or
many, embedded image bytes, missing columns, integer ids."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from training.data.catalog import CatalogError, iter_items, read_catalog, read_interactions


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_struct_attributes_single_image_path_and_int_ids(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    pl.DataFrame({"item_id": [1, 2], "title": ["red bag", None],
                  "attributes": [{"colour": "red", "size": "M"}, None],
                  "image_path": ["a.png", None]}).write_parquet(tmp_path / "c.parquet")
    items = list(iter_items(read_catalog(tmp_path / "c.parquet"), tmp_path))
    assert [it.item_id for it in items] == ["1", "2"]
    assert items[0].attributes == {"colour": "red", "size": "M"}
    assert items[0].images == (_png(),)
    assert items[1].images == () and items[1].title == "" and items[1].attributes == {}


def test_embedded_image_bytes_and_json_attributes(tmp_path: Path) -> None:
    pl.DataFrame({"item_id": ["x"], "description": ["wool hat"], "attributes": ['{"brand": "Ostrel", "n": 3}'],
                  "images": [[_png(), _png()]]}).write_parquet(tmp_path / "c.parquet")
    (item,) = list(iter_items(read_catalog(tmp_path / "c.parquet"), tmp_path))
    assert item.attributes == {"brand": "Ostrel", "n": "3"}
    assert len(item.images) == 2 and item.text.startswith("wool hat")


def test_missing_image_file_is_skipped_not_fatal(tmp_path: Path) -> None:
    pl.DataFrame({"item_id": ["x"], "title": ["t"], "image_paths": [["missing.png"]]}).write_parquet(
        tmp_path / "c.parquet")
    (item,) = list(iter_items(read_catalog(tmp_path / "c.parquet"), tmp_path))
    assert item.images == ()


@pytest.mark.parametrize(("frame", "message"), [
    (pl.DataFrame({"title": ["t"]}), "missing column 'item_id'"),
    (pl.DataFrame({"item_id": ["a", "a"], "title": ["t", "u"]}), "must be unique"),
])
def test_bad_catalogs_are_refused_by_name(tmp_path: Path, frame: pl.DataFrame, message: str) -> None:
    frame.write_parquet(tmp_path / "c.parquet")
    with pytest.raises(CatalogError, match=message):
        read_catalog(tmp_path / "c.parquet")


NOON_UTC = datetime(2027, 1, 15, 12, tzinfo=UTC)


@pytest.mark.parametrize("column", [
    pl.Series([datetime(2027, 1, 15, 12), None]),  # no zone: read as UTC
    pl.Series([datetime(2027, 1, 15, 13), None]).dt.replace_time_zone("Europe/Berlin"),
    pl.Series(["2027-01-15T12:00:00Z", None]),
    pl.Series(["2027-01-15T14:00:00+02:00", None]),
    pl.Series([int(NOON_UTC.timestamp()), None]),  # seconds since the epoch
    pl.Series([int(NOON_UTC.timestamp() * 1000), None]),  # milliseconds
    pl.Series([int(NOON_UTC.timestamp() * 1_000_000), None]),  # microseconds
], ids=["naive", "zoned", "iso-z", "iso-offset", "epoch-s", "epoch-ms", "epoch-us"])
def test_updated_at_is_read_as_utc_whatever_its_type(tmp_path: Path, column: pl.Series) -> None:
    path = tmp_path / "c.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"], "updated_at": column}).write_parquet(path)
    assert read_catalog(path)["updated_at"].to_list() == [NOON_UTC, None]


@pytest.mark.parametrize("column, message", [
    (pl.Series(["yesterday", "today"]), "not ISO 8601"),
    (pl.Series([True, False]), "Boolean"),
])
def test_an_updated_at_that_is_no_time_is_refused_by_name(tmp_path: Path, column: pl.Series, message: str) -> None:
    path = tmp_path / "c.parquet"
    pl.DataFrame({"item_id": ["a", "b"], "title": ["x", "y"], "updated_at": column}).write_parquet(path)
    with pytest.raises(CatalogError, match=f"updated_at.*{message}"):
        read_catalog(path)


def test_interactions_defaults(tmp_path: Path) -> None:
    pl.DataFrame({"user_id": [7, 7], "item_id": [1, 2], "event": ["purchase", "view"]}).write_parquet(
        tmp_path / "i.parquet")
    frame = read_interactions(tmp_path / "i.parquet")
    assert frame["user_id"].to_list() == ["7", "7"] and frame["item_id"].to_list() == ["1", "2"]
    assert frame["weight"].to_list() == [5.0, 1.0]
    assert frame["ts"].dtype == pl.Datetime("ms")
    pl.DataFrame({"user_id": ["u"], "item_id": ["a"], "ts": [datetime(2025, 1, 1)], "weight": [None]},
                 schema_overrides={"weight": pl.Float64}).write_parquet(tmp_path / "j.parquet")
    assert read_interactions(tmp_path / "j.parquet")["weight"].to_list() == [1.0]
    pl.DataFrame({"item_id": ["a"]}).write_parquet(tmp_path / "k.parquet")
    with pytest.raises(CatalogError, match="user_id"):
        read_interactions(tmp_path / "k.parquet")


def test_images_decoded_in_spawned_workers_equal_in_process_decoding(caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    from embed.config import preset
    from embed.items import Item
    from embed.tokens import TextTokenizer
    from training.data.features import ItemFeatures

    def png(colour: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 24), colour).save(buf, format="PNG")
        return buf.getvalue()

    items = [Item(item_id=f"i{n}", title=f"red bag {n}", images=(png((n * 9 % 256, 40, 200)),)) for n in range(40)]
    items.append(Item(item_id="broken", title="torn", images=(png((1, 2, 3))[:30],)))
    config = preset("tiny")
    tokenizer = TextTokenizer.train((it.text for it in items), 300)
    local = ItemFeatures(items, tokenizer, config)
    with caplog.at_level("WARNING"):
        spawned = ItemFeatures(items, tokenizer, config, workers=2)
    assert [len(x) for x in spawned.images] == [1] * 40 + [0]
    for a, b in zip(local.images, spawned.images, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x[0].tobytes() for x in spawned.images[:40]}) > 20  # the decoded pixels differ per item
    assert "item broken:" in caplog.text and "1 images could not be decoded" in caplog.text
