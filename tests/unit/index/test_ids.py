"""The id map beside the index (`index.ids`): labels, attribute postings, parquet round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.ids import MAX_ITEM_ID_BYTES, Column, IdMap, check_item_id

COLOURS, SIZES = ["red", "blue", "green"], ["s", "m", "l", "xl"]


@pytest.fixture
def id_map() -> IdMap:
    n = 60
    attrs = [{"colour": COLOURS[i % 3], "size": SIZES[i % 4]} for i in range(n)]
    attrs[7] = {}  # an item without attributes
    attrs[8] = {"colour": "red", "size": "m", "brand": "acme ünïcode"}
    return IdMap([f"item-{i}" for i in range(n)], [f"hash{i}" for i in range(n)], attrs)


def _brute(m: IdMap, wanted: dict[str, str]) -> list[int]:
    return [i for i, a in enumerate(m.attributes) if all(a.get(k) == v for k, v in wanted.items())]


def test_label_lookup(id_map: IdMap) -> None:
    assert len(id_map) == 60
    assert id_map.label("item-0") == 0 and id_map.label("item-59") == 59
    assert id_map.label("item-60") is None and id_map.label("") is None
    assert "item-5" in id_map and "nope" not in id_map and 5 not in id_map
    assert id_map.item_ids[id_map.label("item-42")] == "item-42"  # type: ignore[index]


@pytest.mark.parametrize("array", [
    pa.array(["a", "bé", "", "日本語" * 40, "z"], pa.large_string()),
    pa.array(["skip", "a", "bé", "", "日本語" * 40, "z", "skip"], pa.large_string()).slice(1, 5),  # offset
    pa.array(["a", None, "", "日本語", "z"], pa.large_string()),  # nulls: the slow way
    pa.array(["a", "bé", "", "日本語", "z"], pa.string()),  # not large: the slow way
])
def test_column_rows_read_from_the_buffers_match_arrow(array: pa.Array) -> None:
    column, expected = Column(array), array.to_pylist()
    assert [column[i] for i in range(len(array))] == expected == list(column) == column[:]
    assert column[-1] == expected[-1]
    assert column.take([4, 0, 4, 2]) == [expected[4], expected[0], expected[4], expected[2]]
    assert column.take(np.array([1, 3])) == [expected[1], expected[3]]
    with pytest.raises(IndexError):
        column[len(array)]


def test_column_decodes_what_it_takes(id_map: IdMap) -> None:
    assert id_map.attributes.take([8, 7]) == [{"colour": "red", "size": "m", "brand": "acme ünïcode"}, {}]


@pytest.mark.parametrize("wanted", [
    {"colour": "red"},
    {"size": "m"},
    {"colour": "red", "size": "m"},
    {"colour": "blue", "size": "xl"},
    {"colour": "red", "size": "m", "brand": "acme ünïcode"},
    {"colour": "purple"},
    {"colour": "red", "size": "nope"},
])
def test_labels_with_intersects_every_key(id_map: IdMap, wanted: dict[str, str]) -> None:
    labels = id_map.labels_with(wanted)
    assert labels.dtype == np.int64
    assert labels.tolist() == _brute(id_map, wanted)
    if len(wanted) > 1:  # strictly narrower than any one key alone, or equal
        for key, value in wanted.items():
            assert set(labels.tolist()) <= set(id_map.labels_with({key: value}).tolist())


def test_labels_with_nothing_is_everything(id_map: IdMap) -> None:
    assert id_map.labels_with({}).tolist() == list(range(60))


def test_multiple_keys_with_disjoint_values_give_nothing(id_map: IdMap) -> None:
    # red is i % 3 == 0 and m is i % 4 == 1: both only at i = 9, 21, 33, 45, 57 (and 8, which says so itself)
    assert id_map.labels_with({"colour": "red", "size": "m"}).tolist() == [8, 9, 21, 33, 45, 57]
    assert id_map.labels_with({"colour": "red", "size": "s", "brand": "acme ünïcode"}).tolist() == []


def test_parquet_round_trip(id_map: IdMap, tmp_path: Path) -> None:
    path = tmp_path / "ids.parquet"
    id_map.write(path)
    back = IdMap.read(path)
    assert back.item_ids == id_map.item_ids
    assert back.content_hashes == id_map.content_hashes
    assert back.attributes == id_map.attributes
    for wanted in ({"colour": "green"}, {"colour": "red", "size": "m"}):
        assert back.labels_with(wanted).tolist() == id_map.labels_with(wanted).tolist()
    table = pq.read_table(path)
    assert table.column_names == ["label", "item_id", "content_hash", "attributes"]
    assert table.column("label").to_pylist() == list(range(60))


def test_empty_map_round_trips(tmp_path: Path) -> None:
    IdMap([], [], []).write(tmp_path / "ids.parquet")
    back = IdMap.read(tmp_path / "ids.parquet")
    assert len(back) == 0 and back.labels_with({"a": "b"}).tolist() == []


def test_duplicate_item_ids_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unique; duplicated e.g. \['b'\]"):
        IdMap(["a", "b", "c", "b"], ["h"] * 4, [{}] * 4)


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 ids, 1 hashes, 2 attribute maps"):
        IdMap(["a", "b"], ["h"], [{}, {}])


def test_read_refuses_labels_out_of_order(tmp_path: Path) -> None:
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"label": pa.array([1, 0], pa.int64()), "item_id": ["a", "b"],
                             "content_hash": ["h", "h"], "attributes": ["{}", "{}"]}), path)
    with pytest.raises(ValueError, match=r"labels are not 0\.\.1 in order"):
        IdMap.read(path)


def test_check_item_id() -> None:
    check_item_id("x" * MAX_ITEM_ID_BYTES, "items[0].item_id")
    with pytest.raises(ValueError, match=r"items\[2\].item_id is empty"):
        check_item_id("", "items[2].item_id")
    with pytest.raises(ValueError, match="258 bytes; item ids are at most 256"):
        check_item_id("é" * 129, "item_id")  # 129 characters, 258 UTF-8 bytes
