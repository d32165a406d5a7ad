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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from embed.encoder import Features, ItemEncoder
from embed.errors import InvalidItemError
from embed.items import Item
from index.compact import IndexRows, fold_log
from index.config import IndexConfig
from index.errors import IndexVerificationError, LogRewrittenError
from index.log import LOG_FILE, LogRecord, WriteLog
from index.publish import PublishedIndex, load_version, prune_versions, publish_index, read_current
from index.shards import ShardStore
from training.data import iter_items, read_catalog

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
WORK_DIR = ".reindex"  # under the index root: one folder of shards per model version
DEFAULT_SHARD_SIZE = 1024  # items per shard: the most a crash can cost, and one file pair per this many
DEFAULT_KEEP_VERSIONS = 3
CHECKS_PER_SOURCE = 4  # reused vectors re-embedded to confirm this encoder made them
MIN_CHECK_COSINE = 0.99  # batch padding moves a vector by ~1e-6; other weights move it far more


class EmbedEngine(Protocol):
    """Embeds catalog rows elsewhere than in this process (e.g. `training.reindex_ray.RayEngine`)."""

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
    folded: int = 0  # live-log records folded in, then dropped from the log
    pruned: tuple[str, ...] = ()  # index versions removed


def featurize_items(encoder: ItemEncoder, items: Sequence[Item]) -> tuple[list[Features], list[str]]:
    """Decode and tokenise one batch; items the encoder refuses are logged and left out.

    Returns:
        The accepted items' features in order, and per item the reason it was refused ("" when accepted).
    """
    try:
        return encoder.featurize(items), [""] * len(items)
    except InvalidItemError:
        features: list[Features] = []
        errors: list[str] = []
        for item in items:
            try:
                features += encoder.featurize([item])
                errors.append("")
            except InvalidItemError as e:
                reason = f"{e.reason}: {e.field} {e.detail}"
                logger.warning("skipping item %s: %s", item.item_id, reason)
                errors.append(reason)
        return features, errors


def _encode_features(encoder: ItemEncoder, features: Sequence[Features]) -> np.ndarray:
    if not features:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return encoder.encode_features(features)


def embed_items(encoder: ItemEncoder, items: Sequence[Item]) -> tuple[np.ndarray, list[str]]:
    """Embed one batch; items the encoder refuses are logged and left out.

    Returns:
        Vectors of the accepted items in order (float32 (accepted, dim)), and per item the
        reason it was refused ("" when it was embedded).
    """
    features, errors = featurize_items(encoder, items)
    return _encode_features(encoder, features), errors


def embed_pipelined(encoder: ItemEncoder, batches: Sequence[Sequence[Item]],
                    done: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """`embed_items` over several batches, decoding and tokenising batch i+1 in a second thread while
    the model runs batch i (Pillow, the tokenizer and torch release the GIL): the job keeps the model
    busy instead of waiting for image decoding. `done(n)` after each batch but the last.
    """
    if not batches:
        return np.zeros((0, encoder.dim), dtype=np.float32), []
    vectors: list[np.ndarray] = []
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onetower-featurize") as pool:
        ahead = pool.submit(featurize_items, encoder, batches[0])
        for j, batch in enumerate(batches):
            features, batch_errors = ahead.result()
            if j + 1 < len(batches):
                ahead = pool.submit(featurize_items, encoder, batches[j + 1])
            vectors.append(_encode_features(encoder, features))
            errors += batch_errors
            if done is not None and j + 1 < len(batches):
                done(len(batch))
    return np.concatenate(vectors), errors


class _CatalogPass:
    """One streaming pass over the catalog: reuse vectors already made, embed the rest shard by shard."""

    def __init__(self, encoder: ItemEncoder, rows: IndexRows, previous: PublishedIndex | None, store: ShardStore,
                 shard_size: int, progress: Progress | None, defer: bool = False) -> None:
        self.encoder, self.rows, self.previous, self.store = encoder, rows, previous, store
        self.shard_size, self.progress = shard_size, progress
        # defer: items to embed are only noted here (id -> content hash, attributes) for an EmbedEngine
        self.defer = defer
        self.deferred: dict[str, tuple[str, Mapping[str, str]]] = {}
        self._embedded: list[tuple[str, str, Mapping[str, str], str]] = []  # engine results not yet in a shard
        self._embedded_vectors: list[np.ndarray] = []
        self.answered: set[str] = set()
        self.counts = {"embedded": 0, "skipped": 0, "reused": 0, "resumed": 0}
        self.checks: dict[str, list[Item]] = {"reused": [], "resumed": []}
        self._pending: list[tuple[Item, str]] = []
        self._unreported = 0
        self._previous_source = rows.add_source(previous.vectors) if previous is not None else -1
        self._known: dict[tuple[str, str], tuple[int, int] | None] = {}  # (id, hash) -> (source, row); None: refused
        for shard in store.shards():
            source, row = rows.add_source(shard.vectors), 0
            for item_id, content_hash, error in zip(shard.item_ids, shard.content_hashes, shard.errors, strict=True):
                self._known[(item_id, content_hash)] = None if error else (source, row)
                row += 0 if error else 1

    def add(self, item: Item) -> None:
        content_hash = item.content_hash()
        if self._reuse(item, content_hash):
            self._report(1)
            return
        if self.defer:
            self.deferred[item.item_id] = (content_hash, item.attributes)
            return
        self._pending.append((item, content_hash))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def _reuse(self, item: Item, content_hash: str) -> bool:
        ids = self.previous.ids if self.previous is not None else None
        label = ids.label(item.item_id) if ids is not None else None
        if ids is not None and label is not None and ids.content_hashes[label] == content_hash:
            where, kind = (self._previous_source, label), "reused"
        elif (item.item_id, content_hash) in self._known:
            found = self._known[(item.item_id, content_hash)]
            if found is None:  # refused by the interrupted run: the same content is refused again
                self.counts["skipped"] += 1
                return True
            where, kind = found, "resumed"
        else:
            return False
        self.rows.put(item.item_id, content_hash, item.attributes, *where)
        self.counts[kind] += 1
        if len(self.checks[kind]) < CHECKS_PER_SOURCE:
            self.checks[kind].append(item)
        return True

    def flush(self) -> None:
        """Embed the pending items, write them as one shard, then report them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        size = self.encoder.batch_size
        batches = [pending[i: i + size] for i in range(0, len(pending), size)]
        # the last batch is reported once its shard is on disk
        vectors, errors = embed_pipelined(self.encoder, [[item for item, _ in batch] for batch in batches],
                                          done=lambda n: self._report(n, now=True))
        self._write([(it.item_id, h, it.attributes, e) for (it, h), e in zip(pending, errors, strict=True)],
                    vectors)
        self._report(len(batches[-1]), now=True)

    def _write(self, entries: Sequence[tuple[str, str, Mapping[str, str], str]], vectors: np.ndarray) -> None:
        """Write one shard of (id, content hash, attributes, error) with the accepted items' vectors."""
        shard = self.store.write([e[0] for e in entries], [e[1] for e in entries], [e[3] for e in entries], vectors)
        source, row = self.rows.add_source(shard.vectors), 0
        for item_id, content_hash, attributes, error in entries:
            if not error:
                self.rows.put(item_id, content_hash, attributes, source, row)
                row += 1
        self.counts["embedded"] += row
        self.counts["skipped"] += len(entries) - row

    def add_embedded(self, item_ids: Sequence[str], errors: Sequence[str], vectors: np.ndarray) -> None:
        """Take a batch an EmbedEngine made for deferred items; a shard is written per `shard_size` items."""
        accepted = iter(np.asarray(vectors, np.float32))
        for item_id, error in zip(item_ids, errors, strict=True):
            if item_id not in self.deferred or item_id in self.answered:
                raise RuntimeError(f"the embedding engine returned {item_id!r}, which was not asked for or came twice")
            self.answered.add(item_id)
            content_hash, attributes = self.deferred[item_id]
            self._embedded.append((item_id, content_hash, attributes, error))
            if not error:
                self._embedded_vectors.append(next(accepted))
        if len(self._embedded) >= self.shard_size:
            self._write_embedded()
        self._report(len(item_ids), now=True)

    def _write_embedded(self) -> None:
        entries, self._embedded = self._embedded, []
        vectors, self._embedded_vectors = self._embedded_vectors, []
        if entries:
            self._write(entries, np.stack(vectors) if vectors else np.zeros((0, self.encoder.dim), np.float32))

    def finish(self) -> None:
        self.flush()
        self._write_embedded()
        self._report(0, now=True)

    def _report(self, n: int, now: bool = False) -> None:
        self._unreported += n
        if self.progress is not None and self._unreported and (now or self._unreported >= self.encoder.batch_size):
            done, self._unreported = self._unreported, 0
            self.progress(done)

    def mismatched(self) -> list[str]:
        """The sources ("reused", "resumed") whose vectors this encoder does not reproduce."""
        bad = []
        for kind, sample in self.checks.items():
            if not sample:
                continue
            fresh, errors = embed_items(self.encoder, sample)
            if not any(errors):
                cosine = np.sum(fresh * np.stack([self.rows.vector(it.item_id) for it in sample]), axis=1)
                if cosine.min() < MIN_CHECK_COSINE:
                    logger.warning("%s vectors were made by another encoder (cosine %.3f); embedding those items "
                                   "again", kind, cosine.min())
                    bad.append(kind)
        return bad


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
        fold_log: fold the live-write log into the new index and, once it is published, drop
            the folded records from the log (records appended meanwhile stay).
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
    records the server appends while this runs are kept. Live writes are folded into the index,
    not into the catalog: a later reindex from a catalog that still lacks an upserted item (or
    still has a deleted one) undoes that write. One reindex per index root at a time.

    Raises:
        ValueError: the catalog is off the schema, or no item could be embedded.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if keep_versions is not None and keep_versions < 1:
        raise ValueError(f"keep_versions={keep_versions} must be >= 1 (or None to keep every version)")
    started = time.perf_counter()
    frame = read_catalog(catalog)
    previous = _previous_index(index_root, model_version, encoder.dim) if incremental else None
    store = ShardStore(work_dir or default_work_dir(index_root, model_version),
                       {"model_name": model_name, "model_version": model_version, "dim": encoder.dim})
    rows = IndexRows()
    scan = _CatalogPass(encoder, rows, previous, store, shard_size, progress, defer=engine is not None)
    for item in iter_items(frame, catalog.parent):
        scan.add(item)
    if engine is not None and scan.deferred:
        todo = frame.filter(pl.col("item_id").is_in(list(scan.deferred)))
        for item_ids, errors, vectors in engine.embed(todo, catalog.parent):
            scan.add_embedded(item_ids, errors, vectors)
        if len(scan.answered) != len(scan.deferred):
            raise RuntimeError(f"the embedding engine returned {len(scan.answered)} of {len(scan.deferred)} items")
    scan.finish()
    bad = scan.mismatched()
    if bad:  # the same version string named other weights (e.g. a local folder trained again)
        if "resumed" in bad:
            store.clear()
        return reindex(catalog, encoder, model_name, model_version, index_root, index_config, progress,
                       incremental=incremental and "reused" not in bad, fold_log=fold_log, log_path=log_path,
                       work_dir=work_dir, shard_size=shard_size, keep_versions=keep_versions, engine=engine)
    catalog_ids = set(frame["item_id"].to_list())
    dropped = sum(i not in catalog_ids for i in previous.ids.item_ids) if previous is not None else 0
    counts = scan.counts
    published, folded, log_counts = _publish(rows, encoder, model_name, model_version, index_root, index_config,
                                             log_path or index_root / LOG_FILE if fold_log else None,
                                             f"{catalog}: no item could be embedded ({counts['skipped']} skipped)")
    pruned = prune_versions(index_root, keep_versions) if keep_versions is not None else []
    store.clear()
    if work_dir is None:
        _remove_if_empty(index_root / WORK_DIR)
    result = ReindexResult(
        index_version=published.manifest.index_version, path=published.path, count=published.manifest.count,
        embedded=counts["embedded"] + log_counts[0], skipped=counts["skipped"] + log_counts[1],
        seconds=time.perf_counter() - started, reused=counts["reused"], resumed=counts["resumed"], dropped=dropped,
        folded=folded, pruned=tuple(pruned))
    logger.info("published index %s: %d items (%d embedded, %d reused, %d resumed, %d skipped, %d dropped, "
                "%d log records folded) in %.1fs", result.index_version, result.count, result.embedded,
                result.reused, result.resumed, result.skipped, result.dropped, result.folded, result.seconds)
    return result


def _publish(rows: IndexRows, encoder: ItemEncoder, model_name: str, model_version: str, index_root: Path,
             index_config: IndexConfig, log_path: Path | None,
             empty_message: str) -> tuple[PublishedIndex, int, tuple[int, int]]:
    """Fold the log at `log_path` (if any) into `rows`, publish, then drop the folded records.

    Returns:
        The published index, how many log records were folded and dropped, and (embedded,
        refused) among the log's upserts.
    """
    log = WriteLog(log_path) if log_path is not None and log_path.exists() else None
    try:
        records = log.records if log is not None else []
        log_counts = fold_log(records, rows, model_version, encoder.dim, lambda batch: _reembed(encoder, batch),
                              encoder.batch_size)
        if not len(rows):
            raise ValueError(empty_message)
        ids, vectors = rows.finish(encoder.dim)
        published = publish_index(index_root, vectors, ids, index_config, model_name, model_version)
        folded = len(records)
        if log is not None and records:
            try:
                log.truncate(keep_from=folded)  # by position: what was appended since stays
            except LogRewrittenError as e:  # replaying folded records over the new index changes nothing
                logger.warning("kept the live-write log whole: %s", e)
                folded = 0
    finally:
        if log is not None:
            log.close()
    return published, folded, log_counts


def _reembed(encoder: ItemEncoder, records: Sequence[LogRecord]) -> tuple[np.ndarray, list[str]]:
    return embed_items(encoder, [Item.from_content(r.item_id, r.content) for r in records])


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # shards of a run under another model version wait there
