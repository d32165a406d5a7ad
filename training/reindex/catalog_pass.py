"""One streaming pass over the catalog for the reindex job: reuse the vectors already made, embed the rest.

Two parts with one job each: `VectorReuse` answers "is there already a vector for this item's content?"
(the CURRENT index under the same model version, or a shard an interrupted run left), and keeps a
sample of what it reused to confirm that this encoder made it; `ShardWriter` embeds (or takes an
engine's vectors for) everything else and writes it shard by shard, so a crash costs one shard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from embed.encoder import ItemEncoder
from embed.items import Item
from index.compact import CatalogRow, IndexRows
from index.publish import PublishedIndex
from index.shards import ShardStore
from training.data.catalog import iter_items
from training.data.embedding import embed_batch, embed_pipelined

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
CHECKS_PER_SOURCE = 4  # reused vectors re-embedded to confirm this encoder made them
MIN_CHECK_COSINE = 0.99  # batch padding moves a vector by ~1e-6; other weights move it far more
Entry = tuple[str, str, Mapping[str, str], str]  # item id, content hash, attributes, refusal reason ("" if none)


@dataclass
class PassCounts:
    """Where the pass's vectors came from."""

    embedded: int = 0  # made by the encoder (or engine) in this pass
    skipped: int = 0  # refused: no content, undecodable image
    reused: int = 0  # taken from the CURRENT index
    resumed: int = 0  # taken from an interrupted run's shards


class VectorReuse:
    """Vectors that need not be made again: the CURRENT index's (same model version, same content) and
    the shards of an interrupted run, put into `rows` directly."""

    def __init__(self, rows: IndexRows, previous: PublishedIndex | None, store: ShardStore,
                 counts: PassCounts) -> None:
        self.rows, self.previous, self.counts = rows, previous, counts
        self.checks: dict[str, list[Item]] = {"reused": [], "resumed": []}
        self._previous_source = rows.add_source(previous.vectors) if previous is not None else -1
        self._known: dict[tuple[str, str], tuple[int, int] | None] = {}  # (id, hash) -> (source, row); None: refused
        for shard in store.shards():
            source, row = rows.add_source(shard.vectors), 0
            for item_id, content_hash, error in zip(shard.item_ids, shard.content_hashes, shard.errors, strict=True):
                self._known[(item_id, content_hash)] = None if error else (source, row)
                row += 0 if error else 1

    def take(self, item: Item, content_hash: str) -> bool:
        """Whether `item` is answered without embedding (reused, resumed, or refused before)."""
        ids = self.previous.ids if self.previous is not None else None
        label = ids.label(item.item_id) if ids is not None else None
        if ids is not None and label is not None and ids.content_hashes[label] == content_hash:
            where, kind = (self._previous_source, label), "reused"
        elif (item.item_id, content_hash) in self._known:
            found = self._known[(item.item_id, content_hash)]
            if found is None:  # refused by the interrupted run: the same content is refused again
                self.counts.skipped += 1
                return True
            where, kind = found, "resumed"
        else:
            return False
        self.rows.put(item.item_id, content_hash, item.attributes, *where)
        setattr(self.counts, kind, getattr(self.counts, kind) + 1)
        if len(self.checks[kind]) < CHECKS_PER_SOURCE:
            self.checks[kind].append(item)
        return True

    def mismatched(self, encoder: ItemEncoder) -> list[str]:
        """The sources ("reused", "resumed") whose vectors `encoder` does not reproduce."""
        bad = []
        for kind, sample in self.checks.items():
            if not sample:
                continue
            fresh, errors = embed_batch(encoder, sample)
            if not any(errors):
                cosine = np.sum(fresh * np.stack([self.rows.vector(it.item_id) for it in sample]), axis=1)
                if cosine.min() < MIN_CHECK_COSINE:
                    logger.warning("%s vectors were made by another encoder (cosine %.3f); embedding those items "
                                   "again", kind, cosine.min())
                    bad.append(kind)
        return bad


class ShardWriter:
    """Embeds items (or takes an engine's vectors for them), writes them shard by shard into `store` and
    puts them into `rows`; reports progress per batch."""

    def __init__(self, encoder: ItemEncoder, rows: IndexRows, store: ShardStore, shard_size: int,
                 progress: Progress | None, counts: PassCounts) -> None:
        self.encoder, self.rows, self.store, self.counts = encoder, rows, store, counts
        self.shard_size, self.progress = shard_size, progress
        self._pending: list[tuple[Item, str]] = []
        self._embedded: list[Entry] = []  # engine results not yet in a shard
        self._embedded_vectors: list[np.ndarray] = []
        self._unreported = 0

    def add(self, item: Item, content_hash: str) -> None:
        """Queue an item to embed; a full shard is embedded and written."""
        self._pending.append((item, content_hash))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Embed the pending items, write them as one shard, then report them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        size = self.encoder.batch_size
        batches = [pending[i: i + size] for i in range(0, len(pending), size)]
        # the last batch is reported once its shard is on disk
        vectors, errors = embed_pipelined(self.encoder, [[item for item, _ in batch] for batch in batches],
                                          done=lambda n: self.report(n, now=True))
        self._write([(it.item_id, h, it.attributes, e) for (it, h), e in zip(pending, errors, strict=True)],
                    vectors)
        self.report(len(batches[-1]), now=True)

    def add_embedded(self, entries: Sequence[Entry], vectors: np.ndarray) -> None:
        """Take a batch an EmbedEngine made (vectors of the accepted entries, in order)."""
        accepted = iter(np.asarray(vectors, np.float32))
        for entry in entries:
            self._embedded.append(entry)
            if not entry[3]:
                self._embedded_vectors.append(next(accepted))
        if len(self._embedded) >= self.shard_size:
            self._write_embedded()
        self.report(len(entries), now=True)

    def finish(self) -> None:
        self.flush()
        self._write_embedded()
        self.report(0, now=True)

    def report(self, n: int, now: bool = False) -> None:
        """Count `n` items done; tell `progress` once a batch's worth is done (or `now`)."""
        self._unreported += n
        if self.progress is not None and self._unreported and (now or self._unreported >= self.encoder.batch_size):
            done, self._unreported = self._unreported, 0
            self.progress(done)

    def _write_embedded(self) -> None:
        entries, self._embedded = self._embedded, []
        vectors, self._embedded_vectors = self._embedded_vectors, []
        if entries:
            self._write(entries, np.stack(vectors) if vectors else np.zeros((0, self.encoder.dim), np.float32))

    def _write(self, entries: Sequence[Entry], vectors: np.ndarray) -> None:
        """Write one shard of entries with the accepted items' vectors."""
        shard = self.store.write([e[0] for e in entries], [e[1] for e in entries], [e[3] for e in entries], vectors)
        source, row = self.rows.add_source(shard.vectors), 0
        for item_id, content_hash, attributes, error in entries:
            if not error:
                self.rows.put(item_id, content_hash, attributes, source, row)
                row += 1
        self.counts.embedded += row
        self.counts.skipped += len(entries) - row


def catalog_rows(frame: pl.DataFrame, base: Path, item_ids: Iterable[str]) -> dict[str, CatalogRow]:
    """The catalog's rows of `item_ids` (those it holds) as `reconcile_log` compares them with live writes:
    content hashed as read, and with image metadata stripped as the service stores an upsert."""
    wanted = frame.filter(pl.col("item_id").is_in(list(item_ids)))
    updated = dict(zip(wanted["item_id"].to_list(), wanted["updated_at"].dt.epoch("ms").to_list(), strict=True))
    out: dict[str, CatalogRow] = {}
    for item in iter_items(wanted, base):
        out[item.item_id] = CatalogRow(frozenset({item.content_hash(), item.stored_form().content_hash()}),
                                       updated[item.item_id])
    return out
