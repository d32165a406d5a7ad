"""What the service serves — encoder, live index and their versions — swapped by one reference.

`SnapshotHolder.current` is read once per request, so a request that started on a snapshot
finishes on it even if a swap happens meanwhile. `refresh()` (called by the watcher) loads a new
model/index pair only when both exist and match, warms it up, and then swaps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embed.encoder import ItemEncoder
from embed.items import Item
from embed.load import load_encoder
from index.config import search_config
from index.errors import IndexVerificationError
from index.live import LiveIndex
from index.log import LOG_FILE, LogRecord, WriteLog
from index.probe import probe_version
from index.publish import (
    VERSIONS,
    PublishedIndex,
    find_version_for_model,
    load_version,
    verify_version,
    version_fingerprint,
)
from service.config import ServiceConfig
from service.registry import ModelRef, cached_model, download_model, lookup_model
from service.swap_barrier import WAKE_S, SwapBarrier

logger = logging.getLogger(__name__)


class PairMismatchError(RuntimeError):
    """The published index was built with another model version than the one the registry names."""


@dataclass(frozen=True)
class Snapshot:
    """An encoder and the index built with it, served together."""

    model: ModelRef
    encoder: ItemEncoder
    index: LiveIndex

    @property
    def model_version(self) -> str:
        return self.model.version


class SnapshotHolder:
    """Holds the served `Snapshot`; loads and swaps new ones."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._current: Snapshot | None = None
        self._log: WriteLog | None = None
        self._swap_lock = threading.Lock()
        # version -> (fingerprint of its files, why it was refused): not read again until its files change
        self._refused: dict[str, tuple[tuple[object, ...], IndexVerificationError]] = {}
        # Writers hold this while they write; a swap holds it while the new snapshot replays the log,
        # so no acknowledged write can miss the snapshot that replaces the one it went to.
        self.write_lock = threading.Lock()
        # a member of a `--processes` group swaps when every member has loaded the new pair
        self.barrier = SwapBarrier(config.swap_dir, config.swap_slot, config.swap_members) \
            if config.swap_dir is not None else None
        self.stopping = threading.Event()  # set by the watcher's stop: a staged swap stops waiting

    @property
    def current(self) -> Snapshot | None:
        return self._current

    def served_pair(self) -> tuple[str, str] | None:
        """(model version, index version) served now, or None while loading."""
        snap = self._current
        return (snap.model_version, snap.index.index_version) if snap is not None else None

    def refresh(self, registry_timeout_s: float | None = None) -> bool:
        """Load the pair the registry and `CURRENT` name, if it differs from the served one.

        Args:
            registry_timeout_s: bound on the registry lookup (see `lookup_model`); None: MLflow's retries.

        Returns:
            True when a new snapshot is now served.

        Raises:
            PairMismatchError: when the index was built with another model version.
            IndexVerificationError: the version's files do not verify, or reading them failed in a
                probe process (`IndexProbeError`); logged once per version and its files.
            MlflowException: the registry could not be reached or refused.
        """
        with self._swap_lock:
            ref = self._lookup(registry_timeout_s)
            root = self.config.index_root
            version = find_version_for_model(root, ref.version)
            if version is None:
                raise PairMismatchError(
                    f"no published index under {root} was built with {ref.name} version {ref.version!r} "
                    f"({self.config.model_uri}): run `onetower reindex` for this model")
            served = self._current
            if served is not None and served.model.version == ref.version and \
                    served.index.index_version == version:
                return False
            published = self._load_proven(version)
            # the effort and re-rank it was published with, with this service's search threads
            search = search_config(published.manifest.params, threads=self.config.faiss_threads)
            encoder = load_encoder(download_model(ref, self.config.cache_dir, self.config.tracking_uri),
                                   precision=self.config.precision)
            encoder.max_pixels = self.config.limits.max_image_pixels
            _warm_up(encoder)
            if self._log is None and not self.config.read_only:
                self._log = WriteLog(root / LOG_FILE)

            def live_index() -> LiveIndex:
                return LiveIndex(published, self._log, ref.version, search,
                                 embed_fn=lambda records: _embed_records(encoder, records))

            pair, waited = (ref.version, version), 0.0
            # a member restarted into a running group that follows the registry joins it through the barrier
            joining = served is None and self.barrier is not None and self.config.poll_seconds > 0 \
                and self.barrier.group_running()
            if self.barrier is None or (served is None and not joining):
                with self.write_lock:
                    index = live_index()
                    self._current = Snapshot(model=ref, encoder=encoder, index=index)
            else:  # staged: the old pair serves (and takes writes) until the group agrees; a member restarted
                # into a running group has none and is not listening yet: it waits for the others to load this
                index = live_index()
                staged = time.monotonic()
                if not self.barrier.agree(pair, self.stopping.is_set):
                    return False
                waited = time.monotonic() - staged
                with self.write_lock:
                    index.follow()  # what was acknowledged on the old pair while this one waited
                    self._current = Snapshot(model=ref, encoder=encoder, index=index)
            if self.barrier is not None:
                self.barrier.announce(pair)
            logger.info("serving model %s version %s with index %s (%s, %d items)%s", ref.name, ref.version,
                        index.index_version, index.kind, len(index),
                        f"; staged {waited:.1f}s until the other processes had loaded it" if waited else "",
                        extra={"model_name": ref.name, "model_version": ref.version,
                               "index_version": index.index_version, "items": len(index),
                               "staged_s": round(waited, 3)})
            return True

    def _load_proven(self, version: str) -> PublishedIndex:
        """Load `version` once its checksums verify and a probe process has read and searched it, so a
        corrupt file (also one whose manifest was rehashed) cannot abort or exhaust this process. A
        refused version is logged once and refused again from memory until its files change."""
        root = self.config.index_root
        fingerprint = version_fingerprint(root, version)
        refused = self._refused.get(version)
        if refused is not None and refused[0] == fingerprint:
            raise refused[1].with_traceback(None)  # not the old traceback, which each raise would extend
        try:
            verify_version(root / VERSIONS / version)
            probe_version(root, version)
            published = load_version(root, version, verified=fingerprint)  # hashed once, just above
        except IndexVerificationError as e:
            self._refused = {v: r for v, r in self._refused.items() if (root / VERSIONS / v).is_dir()}
            self._refused[version] = (fingerprint, e)
            served = self._current.index.index_version if self._current is not None else None
            logger.warning("refusing index version %s%s: %s", version,
                           f" (still serving {served})" if served else "", e,
                           extra={"event": "index_refused", "index_version": version})
            raise
        self._refused.pop(version, None)
        return published

    def _lookup(self, registry_timeout_s: float | None) -> ModelRef:
        """The model the reference names now. At startup with the registry unreachable, the model the
        `CURRENT` index was built with, when its files are in the cache (a restart during a registry
        outage comes up on what it served before; the watcher follows the registry once it answers)."""
        if self._current is not None:
            return lookup_model(self.config.model_uri, self.config.tracking_uri, registry_timeout_s)
        try:  # startup: one bounded try first, so an outage is known in seconds, not after MLflow's retries
            return lookup_model(self.config.model_uri, self.config.tracking_uri,
                                registry_timeout_s or self.config.registry_timeout_s)
        except Exception as error:  # noqa: BLE001 - any registry failure: try the cache, else MLflow's retries
            cached = cached_model(self.config.model_uri, self.config.index_root, self.config.cache_dir)
            if cached is None:
                logger.warning("registry lookup failed (%s); retrying with MLflow's backoff",
                               str(error).splitlines()[0][:300])
                return lookup_model(self.config.model_uri, self.config.tracking_uri, registry_timeout_s)
            logger.warning("registry unreachable (%s): starting on the cached %s version %s that the CURRENT "
                           "index was built with", str(error).splitlines()[0][:300], cached.name, cached.version,
                           extra={"event": "started_from_cache", "model_version": cached.version})
            return cached

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def _warm_up(encoder: ItemEncoder) -> None:
    """Run one batch so the first request does not pay for lazy initialisation."""
    encoder.encode([Item(item_id="warm-up", title="warm up")])


def _embed_records(encoder: ItemEncoder, records: Sequence[LogRecord]) -> np.ndarray:
    items = [Item.from_content(r.item_id, r.content) for r in records]
    return encoder.encode(items)


class Watcher:
    """Background thread that calls `holder.refresh()` every `poll_seconds`; errors are logged, not raised.

    Requests never wait for it: they read `holder.current`. Each registry lookup is one request bounded
    by `registry_timeout_s`, so an outage costs the watcher one short wait per poll. An outage is
    logged once as a warning when it starts and once when it ends (every failed poll at DEBUG).
    """

    def __init__(self, holder: SnapshotHolder, poll_seconds: float, registry_timeout_s: float = 5.0) -> None:
        self.holder = holder
        self.poll_seconds = poll_seconds
        self.registry_timeout_s = registry_timeout_s
        self.failing_since: float | None = None  # time.monotonic() of the first failed poll of an outage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="onetower-watcher", daemon=True)

    def start(self) -> None:
        if self.poll_seconds > 0:
            self._thread.start()

    def _run(self) -> None:
        barrier = self.holder.barrier
        due = time.monotonic() + self.poll_seconds
        while not self._stop.wait(min(self.poll_seconds, WAKE_S) if barrier is not None else self.poll_seconds):
            # a member of a group polls when its interval is up, or as soon as another member staged a pair
            if time.monotonic() >= due or (barrier is not None and barrier.news(self.holder.served_pair())):
                self.poll()
                due = time.monotonic() + self.poll_seconds

    def poll(self) -> None:
        """One refresh; failures are logged and leave the served snapshot in place."""
        try:
            self.holder.refresh(self.registry_timeout_s)
        except PairMismatchError as e:
            self._recovered()
            logger.warning("not swapping: %s", e)
        except IndexVerificationError as e:  # refresh logged the refusal once; the served snapshot stays
            self._recovered()
            logger.debug("not swapping: %s", e)
        except Exception as e:  # noqa: BLE001 - a registry or disk outage must never stop serving
            self._failed(e)
        else:
            self._recovered()

    def _served(self) -> dict[str, str]:
        snap = self.holder.current
        return {"model_version": snap.model_version, "index_version": snap.index.index_version} if snap else {}

    def _failed(self, error: Exception) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            logger.warning("registry or index unavailable, still serving the previous snapshot: %s",
                           str(error).splitlines()[0][:300], extra={"event": "outage_started", **self._served()})
        logger.debug("refresh failed", exc_info=True)

    def _recovered(self) -> None:
        if self.failing_since is not None:
            seconds = time.monotonic() - self.failing_since
            self.failing_since = None
            logger.info("registry reachable again after %.1fs", seconds,
                        extra={"event": "outage_ended", "outage_s": round(seconds, 1), **self._served()})

    def stop(self) -> None:
        self._stop.set()
        self.holder.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
