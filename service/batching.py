"""A micro-batcher for encoding: concurrent requests share one model forward pass.

Request threads featurize their own items (tokenise, decode images: the parallel part) and submit
them; one worker thread gathers jobs until `max_batch` items or `max_wait_s` have passed, runs the
encoder once, and hands each request its rows. Jobs whose deadline has passed are dropped before
the forward pass; a full queue refuses new work instead of growing without end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from embed.encoder import Features, ItemEncoder
from embed.items import Item

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher's queue is full: the caller should back off (RESOURCE_EXHAUSTED)."""


class DeadlineExpiredError(RuntimeError):
    """The request's deadline passed before its items were encoded."""


@dataclass(eq=False)  # jobs are compared by identity: field equality would compare numpy features
class _Job:
    encoder: ItemEncoder
    features: list[Features]
    deadline: float | None  # time.monotonic() value, or None
    future: Future[np.ndarray] = field(default_factory=Future)


class MicroBatcher:
    """Groups encode calls from many threads into batches for one worker thread."""

    def __init__(self, max_batch: int = 64, max_wait_s: float = 0.002, max_queue: int = 1024) -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} >= 1, max_wait_s={max_wait_s} >= 0, "
                             f"max_queue={max_queue} >= 1 expected")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._pending: _Job | None = None
        self._thread = threading.Thread(target=self._run, name="onetower-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Jobs waiting to be encoded."""
        return self._queue.qsize()

    def encode(self, encoder: ItemEncoder, items: Sequence[Item], timeout: float | None = None) -> np.ndarray:
        """Embed `items` with `encoder`, batched with concurrent callers.

        Raises:
            InvalidItemError: an item cannot be read (raised here, before queueing).
            QueueFullError: too much work is queued.
            DeadlineExpiredError: `timeout` seconds passed first.
        """
        features = encoder.featurize(items)
        deadline = time.monotonic() + timeout if timeout is not None else None
        job = _Job(encoder, features, deadline)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"encoding queue is full ({self._queue.maxsize} requests waiting)") from None
        try:
            return job.future.result(timeout=timeout)
        except TimeoutError:
            job.future.cancel()
            raise DeadlineExpiredError("the deadline passed while the items waited to be encoded") from None

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:  # the worker is gone; it is a daemon thread, nothing to wait for
            logger.error("batcher queue still full at close; not waiting for the worker")
            return
        self._thread.join(timeout=5)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = [first]
            size = len(first.features)
            until = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                try:
                    job = self._next(until - time.monotonic())
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # keep the stop signal for the outer loop
                    break
                if job.encoder is not first.encoder or size + len(job.features) > self.max_batch:
                    self._pending = job  # starts the next batch
                    break
                batch.append(job)
                size += len(job.features)
            self._encode(batch)

    def _encode(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = [j for j in batch if j.future.set_running_or_notify_cancel()
                and (j.deadline is None or j.deadline > now)]
        for j in batch:
            if j not in live and not j.future.done():
                j.future.set_exception(DeadlineExpiredError("deadline passed before encoding"))
        if not live:
            return
        try:
            vectors = live[0].encoder.encode_features([f for j in live for f in j.features])
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            for j in live:
                j.future.set_exception(exc)
            return
        start = 0
        for j in live:
            j.future.set_result(vectors[start: start + len(j.features)])
            start += len(j.features)
