"""The id map: string item ids at the edge, int64 FAISS labels inside, content hashes and attributes beside."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MAX_ITEM_ID_BYTES = 256


def check_item_id(item_id: str, field: str) -> None:
    """Refuse empty or oversized item ids, naming the field."""
    if not item_id:
        raise ValueError(f"{field} is empty; want a non-empty item id")
    if len(item_id.encode()) > MAX_ITEM_ID_BYTES:
        raise ValueError(f"{field} is {len(item_id.encode())} bytes; item ids are at most {MAX_ITEM_ID_BYTES}")


class IdMap:
    """Row i of the index is label i: its item id, content hash and attributes."""

    def __init__(self, item_ids: Sequence[str], content_hashes: Sequence[str],
                 attributes: Sequence[Mapping[str, str]]) -> None:
        if not len(item_ids) == len(content_hashes) == len(attributes):
            raise ValueError(f"lengths differ: {len(item_ids)} ids, {len(content_hashes)} hashes, "
                             f"{len(attributes)} attribute maps")
        self.item_ids = list(item_ids)
        self.content_hashes = list(content_hashes)
        self.attributes = [dict(a) for a in attributes]
        self._label = {item_id: i for i, item_id in enumerate(self.item_ids)}
        if len(self._label) != len(self.item_ids):
            seen: set[str] = set()
            dupes = [i for i in self.item_ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
            raise ValueError(f"item ids must be unique; duplicated e.g. {dupes[:3]}")
        self._postings: dict[tuple[str, str], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._label

    def label(self, item_id: str) -> int | None:
        """The FAISS label of `item_id`, or None when the map does not hold it."""
        return self._label.get(item_id)

    def labels_with(self, attributes_equal: Mapping[str, str]) -> np.ndarray:
        """Sorted int64 labels of rows whose attributes equal every given (key, value)."""
        if self._postings is None:
            postings: dict[tuple[str, str], list[int]] = {}
            for i, attrs in enumerate(self.attributes):
                for kv in attrs.items():
                    postings.setdefault(kv, []).append(i)
            self._postings = {kv: np.asarray(v, dtype=np.int64) for kv, v in postings.items()}
        result: np.ndarray | None = None
        for kv in attributes_equal.items():
            rows = self._postings.get(kv, np.zeros(0, dtype=np.int64))
            result = rows if result is None else np.intersect1d(result, rows, assume_unique=True)
        return result if result is not None else np.arange(len(self), dtype=np.int64)

    def write(self, path: Path) -> None:
        table = pa.table({
            "label": pa.array(np.arange(len(self), dtype=np.int64)),
            "item_id": pa.array(self.item_ids, pa.string()),
            "content_hash": pa.array(self.content_hashes, pa.string()),
            "attributes": pa.array([json.dumps(a, sort_keys=True) for a in self.attributes], pa.string()),
        })
        pq.write_table(table, path)

    @classmethod
    def read(cls, path: Path) -> IdMap:
        table = pq.read_table(path)
        labels = table.column("label").to_numpy()
        if not np.array_equal(labels, np.arange(len(labels))):
            raise ValueError(f"{path}: labels are not 0..{len(labels) - 1} in order")
        return cls(table.column("item_id").to_pylist(), table.column("content_hash").to_pylist(),
                   [json.loads(a) for a in table.column("attributes").to_pylist()])
