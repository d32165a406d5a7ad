"""Compaction: the rows of a new index gathered from several vector sources, with the live-write log folded in."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from index.faiss_index import as_matrix
from index.ids import IdMap
from index.log import LogRecord

# Records to embed -> vectors of those accepted (in order) and, per record, why it was refused ("" if not).
ReembedFn = Callable[[Sequence[LogRecord]], tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class _Row:
    content_hash: str
    attributes: dict[str, str]
    source: int  # which matrix of `IndexRows.sources` holds the vector
    row: int


class IndexRows:
    """A new index's rows in order: item id -> content hash, attributes and where its vector lies.

    Vectors stay in their source matrices (a published index's memory-mapped vectors, a shard,
    the log's) until `finish` gathers them, so reusing a row copies nothing.
    """

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self.sources: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add_source(self, vectors: np.ndarray) -> int:
        """Register a (n, dim) matrix rows can point into; returns its number."""
        self.sources.append(vectors)
        return len(self.sources) - 1

    def put(self, item_id: str, content_hash: str, attributes: Mapping[str, str], source: int, row: int) -> None:
        """Add or replace an item (a replaced item keeps its position)."""
        self._rows[item_id] = _Row(content_hash, dict(attributes), source, row)

    def remove(self, item_id: str) -> None:
        self._rows.pop(item_id, None)

    def content_hash(self, item_id: str) -> str | None:
        row = self._rows.get(item_id)
        return row.content_hash if row is not None else None

    def vector(self, item_id: str) -> np.ndarray:
        r = self._rows[item_id]
        return np.asarray(self.sources[r.source][r.row], dtype=np.float32)

    def finish(self, dim: int) -> tuple[IdMap, np.ndarray]:
        """The id map and the float32 (count, dim) vectors, row i = label i."""
        rows = list(self._rows.values())
        source = np.fromiter((r.source for r in rows), np.int64, len(rows))
        where = np.fromiter((r.row for r in rows), np.int64, len(rows))
        out = np.empty((len(rows), dim), dtype=np.float32)
        for s, matrix in enumerate(self.sources):
            mine = np.flatnonzero(source == s)
            if len(mine):
                out[mine] = matrix[where[mine]]
        return IdMap(list(self._rows), [r.content_hash for r in rows], [r.attributes for r in rows]), out


def fold_log(records: Sequence[LogRecord], rows: IndexRows, model_version: str, dim: int,
             reembed: ReembedFn, batch_size: int = 64) -> tuple[int, int]:
    """Apply the newest log write per item over `rows` (live writes are newer than the catalog).

    Upserts made under `model_version` bring their logged vectors; upserts under another version
    are re-embedded with `reembed` from their logged content, unless `rows` already holds that
    content; an upsert that cannot be re-embedded removes the item (an older vector would be wrong).
    Anything but an upsert removes the item, as in `LiveIndex`.

    Returns:
        (re-embedded, refused) among the upserts.
    """
    newest = {item_id: records[i] for item_id, i in _newest(records).items()}
    same = [r for r in newest.values() if r.op == "upsert" and r.model_version == model_version and r.vector is not None]
    if same:
        source = rows.add_source(as_matrix(np.stack([np.asarray(r.vector) for r in same]), "log vectors", dim))
    row_of = {r.item_id: i for i, r in enumerate(same)}
    stale: list[LogRecord] = []
    for r in newest.values():
        if r.op != "upsert":
            rows.remove(r.item_id)
        elif r.item_id in row_of:
            rows.put(r.item_id, r.content_hash, _attributes(r), source, row_of[r.item_id])
        elif not r.content_hash or rows.content_hash(r.item_id) != r.content_hash:
            stale.append(r)
    refused = 0
    for start in range(0, len(stale), batch_size):
        batch = stale[start: start + batch_size]
        vectors, errors = reembed(batch)
        vectors_source, row = rows.add_source(as_matrix(vectors, "re-embedded vectors", dim)), 0
        for r, error in zip(batch, errors, strict=True):
            if error:
                rows.remove(r.item_id)
                refused += 1
            else:
                rows.put(r.item_id, r.content_hash, _attributes(r), vectors_source, row)
                row += 1
    return len(stale) - refused, refused


@dataclass(frozen=True)
class CatalogRow:
    """What the catalog a reindex reads says of one item: its content hashes (as the catalog holds it, and
    with image metadata stripped as the service stores live writes) and when it was last updated."""

    content_hashes: frozenset[str]
    updated_ms: int | None  # ms since the epoch; None: the catalog does not say


@dataclass(frozen=True)
class LogPlan:
    """What a reindex does with the live-write log's records (`reconcile_log`)."""

    fold: list[LogRecord]  # the newest write of each item that wins over the catalog, in log order
    keep: list[int]  # indices of the records to keep after publishing: the catalog does not show them yet
    replaced: int  # items whose catalog row was updated at or after their newest write: the catalog wins


def reconcile_log(records: Sequence[LogRecord], catalog: Mapping[str, CatalogRow]) -> LogPlan:
    """Decide, per item written live, between its newest log record and the catalog being reindexed.

    `catalog` holds (at least) the catalog rows of the items the records name; an item missing from
    it is not in the catalog. For each item's newest record:
    - the catalog row was updated at or after the write (`updated_ms >= written_ms`): the catalog is
      newer and wins; the record is not folded and is dropped;
    - otherwise the write wins and is folded. Its record is dropped once the catalog shows it (an
      upsert: the item's catalog content hashes to the written content; a delete: the item is not in
      the catalog), and kept otherwise, so the next reindex from a catalog that still lags applies it
      again instead of undoing an acknowledged write.
    Older records of an item are dropped (its newest decides). A record without a time (`written_ms` 0:
    written before records had one) is folded and dropped, as every record was then.
    """
    newest = _newest(records)
    fold: list[LogRecord] = []
    keep: list[int] = []
    replaced = 0
    for item_id, i in newest.items():
        r, row = records[i], catalog.get(item_id)
        if not r.written_ms:
            fold.append(r)
            continue
        if row is not None and row.updated_ms is not None and row.updated_ms >= r.written_ms:
            replaced += 1
            continue
        fold.append(r)
        shown = (row is not None and r.content_hash in row.content_hashes) if r.op == "upsert" else row is None
        if not shown:
            keep.append(i)
    return LogPlan(fold=fold, keep=sorted(keep), replaced=replaced)


def _newest(records: Sequence[LogRecord]) -> dict[str, int]:
    """Item id -> index of its newest record, items in the order they were last written (so items new to
    the index are added in that order)."""
    newest: dict[str, int] = {}
    for i, r in enumerate(records):
        newest.pop(r.item_id, None)
        newest[r.item_id] = i
    return newest


def _attributes(record: LogRecord) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(record.content.get("attributes") or {}).items()}
