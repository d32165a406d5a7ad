"""The batch reindex job: catalog parquet -> embeddings -> FAISS index -> verified, published directory.

One streaming pass over the catalog; each item's content hash decides where its vector comes from:
the CURRENT index (`incremental`, same model version, unchanged content), a shard that an
interrupted run of this job left in its work folder, or the encoder. New vectors are written as
shards as they complete, so a rerun after a crash embeds only what is left. The live-write log is
then folded in (the newest write per item wins over the catalog), the index is built, verified and
published, the folded records are dropped from the log, and old versions are pruned.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from embed.encoder import ItemEncoder
from embed.items import Item
from index.compact import CatalogRow, IndexRows, LogPlan, fold_log, reconcile_log
from index.config import IndexConfig
from index.errors import IndexVerificationError, LogRewrittenError
from index.log import LOG_FILE, LogRecord, WriteLog
from index.publish import PublishedIndex, load_version, prune_versions, publish_index, read_current
from index.shards import ShardStore
from training.data.catalog import iter_items, read_catalog
from training.data.embedding import embed_batch
from training.reindex.catalog_pass import PassCounts, Progress, ShardWriter, VectorReuse, catalog_rows

logger = logging.getLogger(__name__)

WORK_DIR = ".reindex"  # under the index root: one folder of shards per model version
DEFAULT_SHARD_SIZE = 1024  # items per shard: the most a crash can cost, and one file pair per this many
DEFAULT_KEEP_VERSIONS = 3


class EmbedEngine(Protocol):
    """Embeds catalog rows elsewhere than in this process (e.g. `training.reindex.ray_engine.RayEngine`)."""

    def embed(self, frame: pl.DataFrame, base: Path) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
        """Embed the rows of a normalised catalog frame (image paths relative to `base`).

        Yields:
            Batches of (item ids, per item the reason it was refused or "", float32 vectors of
            the accepted items in order); every row once, in any grouping.
        """
        ...


@dataclass(frozen=True)
class ReindexResult:
    """What a reindex published, and where its vectors came from."""

    index_version: str
    path: Path
    count: int  # items in the published index
    embedded: int  # vectors the encoder made in this call (catalog items and re-embedded log upserts)
    skipped: int  # items the encoder refused (no content, undecodable image)
    seconds: float
    reused: int = 0  # vectors taken from the CURRENT index (incremental, content unchanged)
    resumed: int = 0  # vectors taken from the shards of an interrupted run
    dropped: int = 0  # items of the CURRENT index no longer in the catalog (incremental)
    folded: int = 0  # live writes (an item's newest log record) folded in: they won over the catalog
    pending: int = 0  # of those, kept in the log: the catalog does not show them yet (see `reconcile_log`)
    replaced: int = 0  # live writes the catalog replaced: its row was updated at or after the write
    pruned: tuple[str, ...] = ()  # index versions removed


def default_work_dir(index_root: Path, model_version: str) -> Path:
    """Where `reindex` keeps the shards of a run for `model_version` until it publishes."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_version)[-40:]
    return index_root / WORK_DIR / f"{safe}-{hashlib.sha256(model_version.encode()).hexdigest()[:8]}"


def _previous_index(index_root: Path, model_version: str, dim: int) -> PublishedIndex | None:
    """The CURRENT index when its vectors can be reused under `model_version`, else None."""
    if read_current(index_root) is None:
        return None
    try:
        published = load_version(index_root)
    except IndexVerificationError as e:
        logger.warning("not reusing the current index: %s", e)
        return None
    made_by = published.manifest.model_version
    if made_by != model_version or published.manifest.dim != dim:
        logger.info("current index was made by model version %s, not %s: embedding every item", made_by,
                    model_version)
        return None
    return published


# long: half of it is the docstring of its options; the body is read -> pass -> publish
def reindex(catalog: Path, encoder: ItemEncoder, model_name: str, model_version: str, index_root: Path,
            index_config: IndexConfig, progress: Progress | None = None, *, incremental: bool = False,
            fold_log: bool = True, log_path: Path | None = None, work_dir: Path | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
            engine: EmbedEngine | None = None) -> ReindexResult:
    """Embed the catalog with `encoder` and publish a new index version under `index_root`.

    Args:
        progress: called with the number of catalog items done, after each batch.
        incremental: reuse the CURRENT index's vectors of items whose content hash is unchanged,
            when it was built under `model_version` (a few are re-embedded to confirm that);
            otherwise every item is embedded. Items no longer in the catalog are dropped either way.
        fold_log: fold the live-write log into the new index where it wins over the catalog and, once
            published, drop the records the catalog now shows or replaced (`index.compact.reconcile_log`);
            records appended meanwhile stay.
        log_path: the live-write log (default `index_root/live.log`, where the service writes).
        work_dir: where shards of embedded items are kept until publication (default
            `default_work_dir(index_root, model_version)`); rerunning after a crash resumes from them.
        shard_size: items per shard.
        keep_versions: published versions kept (the current one always stays); None keeps all.
        engine: where catalog items are embedded (None: `encoder`, in this process). With an
            engine, this process still reads the catalog (content hashes decide what to embed),
            writes the shards as the engine's batches arrive, folds the log, re-embeds the check
            sample and builds and publishes; only the items to embed go to the engine.

    The log may be open in a running server meanwhile: `WriteLog` locks it across processes, so
    records the server appends while this runs are kept. A live write wins over a catalog row
    updated before it (or without `updated_at`) and stays in the log until the catalog shows it,
    so a later reindex from a catalog that still lacks an upserted item (or still has a deleted
    one) applies it again rather than undoing it; a row updated at or after the write replaces it.
    One reindex per index root at a time.

    Raises:
        ValueError: the catalog is off the schema, or no item could be embedded.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if keep_versions is not None and keep_versions < 1:
        raise ValueError(f"keep_versions={keep_versions} must be >= 1 (or None to keep every version)")
    started = time.perf_counter()
    frame = read_catalog(catalog)
    store = ShardStore(work_dir or default_work_dir(index_root, model_version),
                       {"model_name": model_name, "model_version": model_version, "dim": encoder.dim})
    while True:
        previous = _previous_index(index_root, model_version, encoder.dim) if incremental else None
        rows, counts, reuse = _catalog_pass(frame, catalog.parent, encoder, previous, store, shard_size, progress,
                                            engine)
        bad = reuse.mismatched(encoder)
        if not bad:
            break
        # the same version string named other weights (e.g. a local folder trained again): embed those again
        if "resumed" in bad:
            store.clear()
        incremental = incremental and "reused" not in bad
    catalog_ids = set(frame["item_id"].to_list())
    dropped = sum(i not in catalog_ids for i in previous.ids.item_ids) if previous is not None else 0
    published, plan, log_counts = _publish(rows, encoder, model_name, model_version, index_root, index_config,
                                           log_path or index_root / LOG_FILE if fold_log else None,
                                           f"{catalog}: no item could be embedded ({counts.skipped} skipped)",
                                           lambda item_ids: catalog_rows(frame, catalog.parent, item_ids))
    pruned = prune_versions(index_root, keep_versions) if keep_versions is not None else []
    store.clear()
    if work_dir is None:
        _remove_if_empty(index_root / WORK_DIR)
    result = ReindexResult(
        index_version=published.manifest.index_version, path=published.path, count=published.manifest.count,
        embedded=counts.embedded + log_counts[0], skipped=counts.skipped + log_counts[1],
        seconds=time.perf_counter() - started, reused=counts.reused, resumed=counts.resumed, dropped=dropped,
        folded=len(plan.fold), pending=len(plan.keep), replaced=plan.replaced, pruned=tuple(pruned))
    logger.info("published index %s: %d items (%d embedded, %d reused, %d resumed, %d skipped, %d dropped, "
                "%d live writes folded, %d of them kept in the log until the catalog shows them, %d replaced by "
                "newer catalog rows) in %.1fs", result.index_version, result.count, result.embedded, result.reused,
                result.resumed, result.skipped, result.dropped, result.folded, result.pending, result.replaced,
                result.seconds)
    return result


def _catalog_pass(frame: pl.DataFrame, base: Path, encoder: ItemEncoder, previous: PublishedIndex | None,
                  store: ShardStore, shard_size: int, progress: Progress | None, engine: EmbedEngine | None
                  ) -> tuple[IndexRows, PassCounts, VectorReuse]:
    """One pass over the catalog: every item reused, or embedded (here or by `engine`) into a shard."""
    rows, counts = IndexRows(), PassCounts()
    reuse = VectorReuse(rows, previous, store, counts)
    writer = ShardWriter(encoder, rows, store, shard_size, progress, counts)
    deferred: dict[str, tuple[str, Mapping[str, str]]] = {}  # for the engine: id -> (content hash, attributes)
    for item in iter_items(frame, base):
        content_hash = item.content_hash()
        if reuse.take(item, content_hash):
            writer.report(1)
        elif engine is not None:
            deferred[item.item_id] = (content_hash, item.attributes)
        else:
            writer.add(item, content_hash)
    if engine is not None and deferred:
        _embed_with_engine(engine, frame.filter(pl.col("item_id").is_in(list(deferred))), base, deferred, writer)
    writer.finish()
    return rows, counts, reuse


def _embed_with_engine(engine: EmbedEngine, todo: pl.DataFrame, base: Path, deferred: dict[str, tuple[str, Mapping[str, str]]],
                       writer: ShardWriter) -> None:
    answered: set[str] = set()
    for item_ids, errors, vectors in engine.embed(todo, base):
        entries = []
        for item_id, error in zip(item_ids, errors, strict=True):
            if item_id not in deferred or item_id in answered:
                raise RuntimeError(f"the embedding engine returned {item_id!r}, which was not asked for or came twice")
            answered.add(item_id)
            content_hash, attributes = deferred[item_id]
            entries.append((item_id, content_hash, attributes, error))
        writer.add_embedded(entries, vectors)
    if len(answered) != len(deferred):
        raise RuntimeError(f"the embedding engine returned {len(answered)} of {len(deferred)} items")


def _publish(rows: IndexRows, encoder: ItemEncoder, model_name: str, model_version: str, index_root: Path,
             index_config: IndexConfig, log_path: Path | None, empty_message: str,
             catalog: Callable[[set[str]], Mapping[str, CatalogRow]]) -> tuple[PublishedIndex, LogPlan, tuple[int, int]]:
    """Fold the log at `log_path` (if any) into `rows` where it wins over `catalog` (the rows of the
    items it names), publish, then drop the records the catalog now shows or replaced.

    Returns:
        The published index, what was done with the log's records, and (embedded, refused) among
        the upserts folded.
    """
    log = WriteLog(log_path) if log_path is not None and log_path.exists() else None
    try:
        records = log.records if log is not None else []
        plan = reconcile_log(records, catalog({r.item_id for r in records}) if records else {})
        log_counts = fold_log(plan.fold, rows, model_version, encoder.dim, lambda batch: _reembed(encoder, batch),
                              encoder.batch_size)
        if not len(rows):
            raise ValueError(empty_message)
        ids, vectors = rows.finish(encoder.dim)
        published = publish_index(index_root, vectors, ids, index_config, model_name, model_version)
        if log is not None and records:
            try:  # by position: what was appended since stays
                log.truncate(keep_from=len(records), keep=plan.keep)
            except LogRewrittenError as e:  # replaying folded records over the new index changes nothing
                logger.warning("kept the live-write log whole: %s", e)
                plan = LogPlan(fold=plan.fold, keep=list(range(len(records))), replaced=plan.replaced)
    finally:
        if log is not None:
            log.close()
    return published, plan, log_counts


def _reembed(encoder: ItemEncoder, records: Sequence[LogRecord]) -> tuple[np.ndarray, list[str]]:
    return embed_batch(encoder, [Item.from_content(r.item_id, r.content) for r in records])


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # shards of a run under another model version wait there
