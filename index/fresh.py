"""What a serving view holds beside its main index: fresh rows written live (searched exactly) and
tombstones of main rows, as one immutable state; each write makes a new one (`LiveState.applied`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from index.log import LogRecord

FRESH_COMPACT_MIN = 1024  # superseded fresh rows kept before the fresh buffers are rebuilt


class Hit(NamedTuple):
    """One neighbour (a tuple: made ~10x a search, where a frozen dataclass costs ~1 us each)."""

    item_id: str
    score: float


@dataclass(frozen=True)
class LiveState:
    dead: np.ndarray  # sorted int64 main labels that are deleted or superseded by a fresh row
    fresh_vectors: np.ndarray  # float32 (capacity, dim); rows < fresh_count are written
    fresh_count: int
    fresh_alive: np.ndarray  # bool (fresh_count,)
    # item id -> its newest fresh row, copied per state so a reader never meets a row its state lacks
    fresh_row: Mapping[str, int]
    # per fresh row: item id, attributes, content hash; appended in place (a state reads only its first
    # fresh_count), replaced by new lists when the fresh rows are compacted
    fresh_ids: list[str]
    fresh_attrs: list[dict[str, str]]
    fresh_hashes: list[str]

    @classmethod
    def empty(cls, dim: int) -> LiveState:
        return cls(np.zeros(0, np.int64), np.zeros((16, dim), np.float32), 0, np.zeros(0, bool), {}, [], [], [])

    def live_row(self, item_id: str) -> int | None:
        """The fresh row holding `item_id` now, or None."""
        row = self.fresh_row.get(item_id)
        return row if row is not None and row < self.fresh_count and self.fresh_alive[row] else None

    def is_dead(self, label: int) -> bool:
        """Whether main row `label` is deleted or superseded."""
        i = int(np.searchsorted(self.dead, label))
        return i < len(self.dead) and int(self.dead[i]) == label

    def search(self, q: np.ndarray, fetch: int, exclude: set[str],
               attributes_equal: Mapping[str, str] | None) -> list[list[Hit]]:
        """The best `fetch` live fresh rows per query (exact), not in `exclude`, matching the filter."""
        n = self.fresh_count
        if n == 0 or not self.fresh_alive.any():
            return [[] for _ in range(len(q))]
        ok = self.fresh_alive.copy()
        for item_id in exclude:  # only the rows named, not a scan of every fresh row
            row = self.fresh_row.get(item_id)
            if row is not None and row < n:
                ok[row] = False
        if attributes_equal:
            for r in np.flatnonzero(ok).tolist():
                attrs = self.fresh_attrs[r]
                if any(attrs.get(key) != value for key, value in attributes_equal.items()):
                    ok[r] = False
        scores = q @ self.fresh_vectors[:n].T  # (Q, n)
        scores[:, ~ok] = -np.inf
        take = min(fetch, n)
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        return [[Hit(self.fresh_ids[r], float(scores[i, r])) for r in row if np.isfinite(scores[i, r])]
                for i, row in enumerate(top)]

    def applied(self, records: Sequence[LogRecord], label_of: Callable[[str], int | None],
                main_holds: Callable[[int, LogRecord], bool]) -> LiveState:
        """A new state with `records` applied in order (this one is left as it is, for its readers).

        Args:
            label_of: the main index's label of an item id, or None.
            main_holds: whether main row `label`, alive, already holds this upsert (a reindex folded it
                and kept its record): then the upsert changes nothing.
        """
        dead = set(self.dead.tolist())
        vectors, count, rows = self.fresh_vectors, self.fresh_count, dict(self.fresh_row)
        ids, attrs, hashes = self.fresh_ids, self.fresh_attrs, self.fresh_hashes
        alive = np.concatenate([self.fresh_alive, np.zeros(sum(r.op == "upsert" for r in records), bool)])
        for r in records:
            old = rows.get(r.item_id)
            label = label_of(r.item_id)
            if old is None and label is not None and label not in dead and r.op == "upsert" and main_holds(label, r):
                continue
            if old is not None:
                alive[old] = False
                if r.op != "upsert":
                    del rows[r.item_id]
            if label is not None:
                dead.add(label)
            if r.op != "upsert":
                continue
            if count == len(vectors):
                vectors = np.concatenate([vectors, np.zeros_like(vectors)])  # readers keep the old buffer
            vectors[count] = r.vector
            ids.append(r.item_id)
            attrs.append({str(k): str(v) for k, v in dict(r.content.get("attributes", {})).items()})
            hashes.append(r.content_hash)
            rows[r.item_id] = count
            alive[count] = True
            count += 1
        state = LiveState(np.asarray(sorted(dead), np.int64), vectors, count, alive[:count], rows, ids, attrs, hashes)
        return state._compacted() if count - len(rows) > max(FRESH_COMPACT_MIN, len(rows)) else state

    def _compacted(self) -> LiveState:
        """The same live fresh rows in new buffers, without the rows that later writes superseded or deleted."""
        keep = np.flatnonzero(self.fresh_alive)
        vectors = np.zeros((max(16, 2 * len(keep)), self.fresh_vectors.shape[1]), np.float32)
        vectors[: len(keep)] = self.fresh_vectors[keep]
        ids = [self.fresh_ids[r] for r in keep.tolist()]
        return LiveState(self.dead, vectors, len(keep), np.ones(len(keep), bool),
                         {item: i for i, item in enumerate(ids)}, ids, [self.fresh_attrs[r] for r in keep.tolist()],
                         [self.fresh_hashes[r] for r in keep.tolist()])
