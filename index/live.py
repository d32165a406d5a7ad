"""The serving view of an index: the published main index plus live writes since it was built.

Upserts land in a small exact "fresh" matrix searched beside the main index; deletes and
superseded main rows are tombstones filtered inside FAISS with an ID selector. Results of both
are merged by score. Every write goes to the `WriteLog` (fsync) before it is applied, and a
restart replays the log, so nothing acknowledged is lost.

Readers never take a lock: each write builds a new immutable `LiveState` and swaps one reference.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from index.config import SEARCH_THREADS, IndexConfig, SearchParams, search_config
from index.errors import LogRewrittenError, ReembedError
from index.faiss_index import IndexShape, as_matrix, configure_faiss, import_faiss, search_index
from index.fresh import Hit, LiveState
from index.log import LogEntry, LogRecord, WriteLog
from index.publish import PublishedIndex

logger = logging.getLogger(__name__)

MAX_K = 1000
# An attribute filter keeping at most this many main rows is searched exactly: an HNSW graph walk or a few
# IVF lists meet too few of them to fill k. Wider filters use the index, and rows it leaves short go exact.
EXACT_FILTER_MAX = 4096
EXACT_CHUNK = 16384  # main rows scored per matrix product in an exact filtered search
# FAISS runs a flat search with an ID selector on its per-query scan, never BLAS (10x slower at 64+
# queries, docs/PERFORMANCE.md): batches on a flat index with at most this many tombstones search
# without the selector, over-fetch by the tombstone count and drop them.
FLAT_OVERFETCH_MAX = 4096
FOLLOW_RETRIES = 3
REPLAY_CHUNK = 256  # log records read and applied at a time on replay
EmbedFn = Callable[[Sequence[LogRecord]], np.ndarray]


class LiveIndex:
    """Main index + fresh live writes + tombstones, searched as one.

    Args:
        published: the loaded, verified main index.
        log: the write log (replayed now); None keeps live writes in memory only (tests, tools).
        model_version: the version vectors are made with now; log records of another version
            are re-embedded with `embed_fn` on replay.
    """

    def __init__(self, published: PublishedIndex, log: WriteLog | None, model_version: str,
                 config: IndexConfig | None = None, embed_fn: EmbedFn | None = None) -> None:
        self.main = published
        self.log = log
        self.model_version = model_version
        # by default, the effort and re-rank the version was published with (nprobe, ef_search, refine_factor)
        self.config = config or search_config(published.manifest.params)
        self.dim = published.manifest.dim
        # process-wide, and the same for every LiveIndex of a process: set from measurements (IndexConfig)
        configure_faiss(self.config.threads or SEARCH_THREADS, self.config.blas_min_batch * self.dim)
        self._lock = threading.Lock()
        self._shape = IndexShape.of(published.index)
        self._rows = np.asarray(published.vectors)  # a plain view: a memmap's row is a memmap, built slowly
        self._embed_fn = embed_fn
        self._seen = (-1, 0)  # (log generation, entries of it applied): what of the log this view holds
        self._state = LiveState.empty(self.dim)
        if log is not None:
            self._replay(log)

    # ---- reading -------------------------------------------------------------------------------
    @property
    def index_version(self) -> str:
        return self.main.manifest.index_version

    @property
    def kind(self) -> str:
        return self.main.manifest.kind

    def __len__(self) -> int:
        s = self._state
        return len(self.main.ids) - len(s.dead) + int(s.fresh_alive.sum())

    @property
    def fresh_items(self) -> int:
        """Items held beside the main index (written live and not in it as written)."""
        return int(self._state.fresh_alive.sum())

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.vector(item_id) is not None

    def vector(self, item_id: str) -> np.ndarray | None:
        """The stored vector of a live item, or None."""
        s = self._state
        row = s.live_row(item_id)
        if row is not None:
            return np.array(s.fresh_vectors[row])
        label = self.main.ids.label(item_id)
        if label is None or s.is_dead(label):
            return None
        return np.array(self._rows[label], dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[str] = (),
               attributes_equal: Mapping[str, str] | None = None, min_score: float | None = None,
               self_ids: Sequence[str | None] | None = None,
               params: SearchParams | None = None) -> list[list[Hit]]:
        """The best `k` live items per query, best first.

        Args:
            exclude: item ids never returned.
            attributes_equal: only items whose attributes hold every (key, value).
            self_ids: per query, an item id to leave out of that query's results (the query item).
        """
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k} must be in [1, {MAX_K}]")
        q = as_matrix(queries, "queries", self.dim)
        self_ids = list(self_ids) if self_ids is not None else [None] * len(q)
        if len(self_ids) != len(q):
            raise ValueError(f"{len(self_ids)} self ids for {len(q)} queries")
        s = self._state
        fetch = k + (1 if any(self_ids) else 0)
        main = self._search_main(s, q, fetch, exclude, attributes_equal, params)
        fresh = s.search(q, fetch, set(exclude), attributes_equal)
        floor = -np.inf if min_score is None else min_score
        out = []
        for i, own in enumerate(self_ids):
            hits = [h for h in (*main[i], *fresh[i]) if h.item_id != own and h.score >= floor]
            if fresh[i]:  # main's hits come best first already
                hits.sort(key=lambda h: -h.score)
            out.append(hits[:k])
        return out

    def _search_main(self, s: LiveState, q: np.ndarray, fetch: int, exclude: Sequence[str],
                     attributes_equal: Mapping[str, str] | None, params: SearchParams | None) -> list[list[Hit]]:
        faiss = import_faiss()
        ids = self.main.ids
        dead = s.dead
        excluded = [lab for lab in map(ids.label, exclude) if lab is not None]
        if excluded:
            dead = np.union1d(dead, np.asarray(excluded, np.int64))
        keep: Any = None  # arrays the selector points into must outlive the search
        if attributes_equal:
            keep = np.setdiff1d(ids.labels_with(attributes_equal), dead, assume_unique=True)
            if len(keep) == 0:
                return [[] for _ in range(len(q))]
            if self.kind != "flat" and len(keep) <= EXACT_FILTER_MAX:
                return self._hits(*self._exact_among(q, keep, fetch))
            selector = faiss.IDSelectorBatch(len(keep), faiss.swig_ptr(keep))
        elif len(dead) and self.kind == "flat" and len(q) >= self.config.blas_min_batch \
                and len(dead) <= FLAT_OVERFETCH_MAX:
            return self._hits(*self._flat_over_fetch(q, fetch, dead))
        elif len(dead):
            keep = dead
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(keep), faiss.swig_ptr(keep)))
        else:
            selector = None
        limit = min(fetch, self.main.index.ntotal)
        scores, labels = search_index(self.main.index, q, limit, selector, params, self.config, self.main.vectors,
                                      self._shape, checked=True)
        if attributes_equal and self.kind != "flat":
            short = np.flatnonzero((labels >= 0).sum(axis=1) < min(fetch, len(keep)))
            if len(short):  # the approximate walk met too few matching rows: score the filter exactly
                scores, labels = scores.copy(), labels.copy()
                scores[short], labels[short] = self._exact_among(q[short], keep, limit)
        del keep
        return self._hits(scores, labels)

    def _flat_over_fetch(self, q: np.ndarray, fetch: int, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact best `fetch` live main rows per query: BLAS over every row, then the dead ones dropped."""
        limit = min(fetch + len(dead), self.main.index.ntotal)
        scores, labels = search_index(self.main.index, q, limit, None, None, self.config, shape=self._shape,
                                      checked=True)
        alive = (labels >= 0) & ~np.isin(labels, dead)
        order = np.argsort(~alive, axis=1, kind="stable")[:, :fetch]  # live hits first, still best first
        labels = np.where(np.take_along_axis(alive, order, 1), np.take_along_axis(labels, order, 1), -1)
        return np.take_along_axis(scores, order, 1), labels

    def _hits(self, scores: np.ndarray, labels: np.ndarray) -> list[list[Hit]]:
        take = self.main.ids.item_ids.take
        out = []
        for row_s, row_l in zip(scores.tolist(), labels.tolist(), strict=True):
            if -1 in row_l:  # missing hits (label -1): fewer rows than asked for matched
                row_s, row_l = [sc for sc, lab in zip(row_s, row_l, strict=True) if lab >= 0], \
                    [lab for lab in row_l if lab >= 0]
            out.append(list(map(Hit, take(row_l), row_s)))
        return out

    def _exact_among(self, q: np.ndarray, labels: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact best `fetch` of the main rows `labels` per query: scores (Q, fetch), labels (-1 padded)."""
        best_s = np.full((len(q), fetch), -np.inf, np.float32)
        best_l = np.full((len(q), fetch), -1, np.int64)
        for start in range(0, len(labels), EXACT_CHUNK):
            chunk = labels[start: start + EXACT_CHUNK]
            cand_s = np.concatenate([best_s, q @ np.asarray(self.main.vectors[chunk], np.float32).T], axis=1)
            cand_l = np.concatenate([best_l, np.broadcast_to(chunk, (len(q), len(chunk)))], axis=1)
            top = np.argsort(-cand_s, axis=1, kind="stable")[:, :fetch]
            best_s, best_l = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_l, top, 1)
        best_l[~np.isfinite(best_s)] = -1
        return best_s, best_l

    # ---- writing -------------------------------------------------------------------------------
    def unchanged(self, item_id: str, content_hash: str) -> bool:
        """Whether `item_id` is live with this content under this model (an upsert of it would change nothing)."""
        s = self._state
        row = s.live_row(item_id)
        if row is not None:
            return bool(content_hash) and s.fresh_hashes[row] == content_hash
        label = self.main.ids.label(item_id)
        if label is None or s.is_dead(label) or self.main.manifest.model_version != self.model_version:
            return False
        return bool(content_hash) and self.main.ids.content_hashes[label] == content_hash

    def upsert(self, records: Sequence[LogRecord]) -> int:
        """Durably write upserts (log + fsync), then make them searchable; returns how many were written.

        An upsert of an item that is live with the same content hash under this model version is
        skipped (nothing is logged); after a delete the item is not live, so it is written again.
        """
        for i, r in enumerate(records):
            if r.op != "upsert" or r.vector is None:
                raise ValueError(f"records[{i}] must be an upsert with a vector")
            as_matrix(r.vector[None, :], f"records[{i}].vector", self.dim)
        with self._lock:
            self._follow_if_changed()  # "unchanged" is judged on every write acknowledged so far
            changed = [r for r in records if not self.unchanged(r.item_id, r.content_hash)]
            if changed:
                self._write(changed)
        return len(changed)

    def delete(self, item_ids: Sequence[str]) -> int:
        """Durably delete items; returns how many were live."""
        with self._lock:  # decided under the writers' lock, so a concurrent upsert cannot hide a live item
            self._follow_if_changed()  # and another process's upsert is live here too
            live = [i for i in dict.fromkeys(item_ids) if i in self]
            if live:
                self._write([LogRecord(op="delete", item_id=i, model_version=self.model_version) for i in live])
        return len(live)

    def _write(self, records: Sequence[LogRecord]) -> None:
        """Log (fsync), then apply; caller holds the lock. The log compacts itself in the background.

        What other processes appended before these records is applied first, so this view never
        holds a write without every write acknowledged before it."""
        now_ms = time.time_ns() // 1_000_000
        records = [r if r.written_ms else dataclasses.replace(r, written_ms=now_ms) for r in records]
        if self.log is None:
            self._apply(records)
            return
        generation, first = self.log.append(records)
        seen = self.log.translate(*self._seen)
        others = self.log.between(generation, seen[1], first) if seen is not None and seen[0] == generation else None
        if others is None:
            self._follow()  # the file was rewritten meanwhile: its records, ours included, from the file
        else:
            if others:  # appended by other processes since this view last looked
                self._apply_entries(others)
            self._apply(records)
            self._seen = (generation, first + len(records))
        self.log.compact_soon()

    def catch_up(self) -> int:
        """Apply what other processes (or this one's other views) wrote to the log since this view last
        looked; returns how many log entries were applied. Costs two stat calls when nothing is new:
        call it before answering a read that must see every acknowledged write (read-your-writes across
        processes sharing one index root)."""
        if self.log is None or not self.log.changed():
            return 0
        with self._lock:
            self.log.sync()
            return self._follow()

    def follow(self) -> int:
        """Apply every log entry this view has not applied, also those another view of this process
        appended (which `catch_up` does not look for); returns how many were applied."""
        if self.log is None:
            return 0
        with self._lock:
            self.log.sync()
            return self._follow()

    def _follow_if_changed(self) -> None:
        if self.log is not None and self.log.changed():
            self.log.sync()
            self._follow()

    def _follow(self) -> int:
        """Apply the log entries this view has not applied (caller holds the lock)."""
        assert self.log is not None
        for _ in range(FOLLOW_RETRIES):
            generation, entries = self.log.view()
            seen = self.log.translate(*self._seen)
            new = entries[seen[1]:] if seen is not None and seen[0] == generation else \
                list({e.item_id: e for e in entries}.values())  # rewritten elsewhere: newest of each, again
            try:
                self._apply_entries(new)
            except LogRewrittenError:  # compacted by this process's background thread meanwhile
                self.log.sync()
                continue
            self._seen = (generation, len(entries))
            return len(new)
        raise LogRewrittenError(f"{self.log.path}: rewritten {FOLLOW_RETRIES} times while being followed")

    def _replay(self, log: WriteLog) -> None:
        """Apply the newest record of each item in the log; only those are read, a chunk at a time."""
        generation, entries = log.view()
        newest = {e.item_id: e for e in entries}
        with self._lock:
            self._apply_entries(list(newest.values()))
            self._seen = (generation, len(entries))
        logger.info("replayed the newest of %d live writes (%d items): %d items live", len(entries), len(newest),
                    len(self))

    def _apply_entries(self, entries: Sequence[LogEntry]) -> None:
        """Read and apply log entries in order, re-embedding upserts of another model version (caller holds
        the lock). Deletes need no reading; upserts are read a chunk at a time."""
        assert self.log is not None
        stale = sum(e.op == "upsert" and e.model_version != self.model_version for e in entries)
        if stale and self._embed_fn is None:
            example = next(e.model_version for e in entries if e.op == "upsert" and e.model_version != self.model_version)
            raise ReembedError(f"{stale} log records were embedded by another model version "
                               f"(e.g. {example!r}, serving {self.model_version!r}) "
                               "and no encoder was given to re-embed them")
        for start in range(0, len(entries), REPLAY_CHUNK):
            chunk = entries[start: start + REPLAY_CHUNK]
            upserts = iter(self._current(list(self.log.read([e for e in chunk if e.op == "upsert"]))))
            self._apply([next(upserts) if e.op == "upsert" else LogRecord(op="delete", item_id=e.item_id)
                         for e in chunk])
        if stale:
            logger.info("re-embedded %d log records under model version %s", stale, self.model_version)

    def _current(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        """`records` with those of another model version re-embedded under this one."""
        stale = [r for r in records if r.model_version != self.model_version]
        if not stale or self._embed_fn is None:
            return list(records)
        vectors = as_matrix(self._embed_fn(stale), "re-embedded vectors", self.dim)
        fixed = {id(r): LogRecord(op=r.op, item_id=r.item_id, model_version=self.model_version,
                                  vector=v, content=r.content, content_hash=r.content_hash, written_ms=r.written_ms)
                 for r, v in zip(stale, vectors, strict=True)}
        return [fixed.get(id(r), r) for r in records]

    def _apply(self, records: Sequence[LogRecord]) -> None:
        """Apply records to a new state and publish it with one assignment (caller holds the lock)."""
        self._state = self._state.applied(records, self.main.ids.label, self._main_holds)

    def _main_holds(self, label: int, record: LogRecord) -> bool:
        """Whether main row `label` holds this upsert already: same content under the same model version."""
        return record.model_version == self.main.manifest.model_version and bool(record.content_hash) \
            and self.main.ids.content_hashes[label] == record.content_hash
