"""Admission: calls in flight counted, those beyond the limit refused at once, each call logged at DEBUG.

Done inside the servicer's `guarded` wrapper rather than as a gRPC interceptor: a Python interceptor
costs every call a second handler lookup and wrapper (measured in tests/benchmarks/test_processes.py),
and the servicer's methods are exactly the calls to count: health and reflection are exempt
(DESIGN.md section 6: probes must answer under load). The count is taken in the handler thread, so a
call cancelled before it runs is never counted; with `SPARE_THREADS` more handler threads than the
limit, a refusal and a probe always find a thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, NoReturn

import grpc

logger = logging.getLogger(__name__)

SPARE_THREADS = 4  # handler threads beyond the concurrency limit: health probes and refusals never queue
SHED_LOG_EVERY_S = 10.0  # under sustained overload, one warning per this many seconds


class Admission:
    """The in-flight count and the limit (None: no limit) of one server."""

    def __init__(self, limit: int | None, metrics: Any, holder: Any) -> None:
        self.limit = limit
        self.metrics = metrics
        self.holder = holder
        self._lock = threading.Lock()
        self._in_flight = 0
        self._shed_since_log = 0
        self._last_log = 0.0

    def enter(self) -> bool:
        with self._lock:
            if self.limit is not None and self._in_flight >= self.limit:
                return False
            self._in_flight += 1
        self.metrics.in_flight.inc()
        return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.dec()

    def refuse(self, rpc: str, context: grpc.ServicerContext) -> NoReturn:
        self.metrics.shed.labels(rpc).inc()
        self.metrics.requests.labels(rpc, grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
        now = time.monotonic()
        with self._lock:
            self._shed_since_log += 1
            report = now - self._last_log >= SHED_LOG_EVERY_S
            if report:
                shed, self._shed_since_log, self._last_log = self._shed_since_log, 0, now
        if report:
            logger.warning("overloaded: refused %d calls (limit %d in flight)", shed, self.limit,
                           extra={"request_id": request_id(context), "rpc": rpc, "code": "RESOURCE_EXHAUSTED",
                                  "shed": shed})
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"overloaded: {self.limit} calls already in flight, the server's limit; retry with backoff")
        raise AssertionError("abort returns only by raising")  # pragma: no cover

    def log_call(self, rpc: str, context: grpc.ServicerContext, code: grpc.StatusCode, started: float) -> None:
        """One DEBUG line per call (request id, rpc, code, ms, model version); free when DEBUG is off."""
        if logger.isEnabledFor(logging.DEBUG):
            snap = self.holder.current
            logger.debug("%s %s", rpc, code.name, extra={
                "request_id": request_id(context), "rpc": rpc, "code": code.name,
                "ms": round((time.perf_counter() - started) * 1000, 3),
                "model_version": snap.model_version if snap else None})


def request_id(context: grpc.ServicerContext) -> str:
    """The caller's `x-request-id` metadata, or a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return uuid.uuid4().hex[:12]
