"""The id map: string item ids at the edge, int64 FAISS labels inside, content hashes and attributes beside.

Columnar, so ten million items cost tens of bytes each rather than the ~530 of Python lists, dicts and
strings: ids, content hashes and attributes (JSON) stay Arrow string columns as `ids.parquet` holds them,
and an id is found by binary search over a sorted int64 array of its hashes (Python's `hash`, computed at
load in each process), collisions settled by comparing the strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_ITEM_ID_BYTES = 256
_CHUNK = 1 << 16  # rows turned into Python objects at a time (hashing, iterating)


def check_item_id(item_id: str, field: str) -> None:
    """Refuse empty or oversized item ids, naming the field."""
    if not item_id:
        raise ValueError(f"{field} is empty; want a non-empty item id")
    if len(item_id.encode()) > MAX_ITEM_ID_BYTES:
        raise ValueError(f"{field} is {len(item_id.encode())} bytes; item ids are at most {MAX_ITEM_ID_BYTES}")


def _column(values: Sequence[Any] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous large_string Arrow array (large: a 10M-row column may pass 2 GiB of text)."""
    if isinstance(values, Column):
        values = values.array
    if isinstance(values, pa.ChunkedArray | pa.Array):
        array = values.cast(pa.large_string())
        return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return pa.array(list(values), pa.large_string())


class Column(Sequence[Any]):
    """A read-only sequence over an Arrow string column; `decode` turns each string into its value."""

    def __init__(self, array: pa.Array, decode: Any = None) -> None:
        self.array, self._decode = array, decode
        # one row read straight from the Arrow buffers (offsets, UTF-8 bytes): ~0.5 us instead of
        # ~2 us through `array[i].as_py()`, which builds a scalar object first; nulls take the slow way
        buffers = array.buffers()
        self._fast = array.type == pa.large_string() and not array.null_count and buffers[2] is not None
        if self._fast:
            self._offsets = np.frombuffer(buffers[1], np.int64)[array.offset:array.offset + len(array) + 1]
            self._bytes = memoryview(buffers[2])

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            values = self.array.slice(start, max(0, stop - start)).to_pylist()[::step]
            return [self._decode(v) for v in values] if self._decode else values
        n = int(i)
        if n < 0:
            n += len(self)
        if not 0 <= n < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        value = self.text(n) if self._fast else self.array[n].as_py()
        return self._decode(value) if self._decode else value

    def text(self, n: int) -> str:
        """Row `n` (0 <= n < len, not checked) as a str, for a column without nulls (`_fast`)."""
        offsets = self._offsets
        return str(self._bytes[offsets[n]:offsets[n + 1]], "utf-8")

    def take(self, rows: Iterable[int]) -> list[Any]:
        """The values at `rows` (each 0 <= row < len), in that order."""
        if not self._fast:
            return [self[int(r)] for r in rows]
        text = self.text
        values = [text(r) for r in rows]
        return [self._decode(v) for v in values] if self._decode else values

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), _CHUNK):
            yield from self[start:start + _CHUNK]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Column):
            return self._decode is other._decode and self.array.equals(other.array)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Column({len(self)} rows)"


def _attributes_json(attributes: Sequence[Mapping[str, str]] | Column) -> pa.Array:
    if isinstance(attributes, Column):
        return attributes.array
    return _column([json.dumps(dict(a), sort_keys=True) for a in attributes])


class IdMap:
    """Row i of the index is label i: its item id, content hash and attributes."""

    def __init__(self, item_ids: Sequence[str] | pa.Array | pa.ChunkedArray,
                 content_hashes: Sequence[str] | pa.Array | pa.ChunkedArray,
                 attributes: Sequence[Mapping[str, str]] | Column | pa.Array | pa.ChunkedArray) -> None:
        ids, hashes = _column(item_ids), _column(content_hashes)
        attrs = _column(attributes) if isinstance(attributes, pa.Array | pa.ChunkedArray) \
            else _attributes_json(attributes)
        if not len(ids) == len(hashes) == len(attrs):
            raise ValueError(f"lengths differ: {len(ids)} ids, {len(hashes)} hashes, {len(attrs)} attribute maps")
        if ids.null_count:
            raise ValueError("item ids must not be null")
        self.item_ids = Column(ids)
        self.content_hashes = Column(hashes)
        self.attributes = Column(attrs, json.loads)
        self._order, self._keys = self._hash_index(ids)
        if pc.count_distinct(ids).as_py() != len(ids):
            counts = pc.value_counts(ids)
            dupes = [c["values"] for c in counts.to_pylist() if c["counts"] > 1]
            raise ValueError(f"item ids must be unique; duplicated e.g. {dupes[:3]}")
        self._postings: dict[tuple[str, str], np.ndarray] | None = None

    @staticmethod
    def _hash_index(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(order, keys): the labels sorted by the hash of their id, and those hashes, ascending."""
        keys = np.empty(len(ids), np.int64)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids.slice(start, _CHUNK).to_pylist()
            keys[start:start + len(chunk)] = np.fromiter(map(hash, chunk), np.int64, len(chunk))
        order = np.argsort(keys, kind="stable")
        return order, keys[order]

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.label(item_id) is not None

    def label(self, item_id: str) -> int | None:
        """The FAISS label of `item_id`, or None when the map does not hold it."""
        key = hash(item_id)
        i = int(np.searchsorted(self._keys, key))
        keys, ids = self._keys, self.item_ids
        while i < len(keys) and keys[i] == key:
            label = int(self._order[i])
            if ids[label] == item_id:
                return label
            i += 1
        return None

    def labels_with(self, attributes_equal: Mapping[str, str]) -> np.ndarray:
        """Sorted int64 labels of rows whose attributes equal every given (key, value)."""
        if self._postings is None:  # rows grouped by their attributes' JSON, each distinct one parsed once
            encoded = self.attributes.array.dictionary_encode()
            codes = encoded.indices.to_numpy(zero_copy_only=False)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
            postings: dict[tuple[str, str], list[np.ndarray]] = {}
            for j, text in enumerate(encoded.dictionary.to_pylist()):
                for kv in json.loads(text).items():
                    postings.setdefault(kv, []).append(order[bounds[j]:bounds[j + 1]])
            self._postings = {kv: np.sort(np.concatenate(v)).astype(np.int64) for kv, v in postings.items()}
        result: np.ndarray | None = None
        for kv in attributes_equal.items():
            rows = self._postings.get(kv, np.zeros(0, dtype=np.int64))
            result = rows if result is None else np.intersect1d(result, rows, assume_unique=True)
        return result if result is not None else np.arange(len(self), dtype=np.int64)

    def write(self, path: Path) -> None:
        table = pa.table({
            "label": pa.array(np.arange(len(self), dtype=np.int64)),
            "item_id": self.item_ids.array,
            "content_hash": self.content_hashes.array,
            "attributes": self.attributes.array,
        })
        pq.write_table(table, path)

    @classmethod
    def read(cls, path: Path) -> IdMap:
        table = pq.read_table(path)
        labels = table.column("label").to_numpy()
        if not np.array_equal(labels, np.arange(len(labels))):
            raise ValueError(f"{path}: labels are not 0..{len(labels) - 1} in order")
        ids = cls(table.column("item_id"), table.column("content_hash"), table.column("attributes"))
        del table
        pa.default_memory_pool().release_unused()  # the parquet decode's buffers, back to the system
        return ids
