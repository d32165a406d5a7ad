"""Server assembly: servicer, health, reflection, metrics, message-size limits, graceful stop."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.onetower.v1 import onetower_pb2 as pb
from service.auth import OPEN_METHODS, TokenAuthInterceptor, server_credentials
from service.batching import MicroBatcher
from service.config import ServiceConfig
from service.errors import add_to_server
from service.metrics import Metrics
from service.servicer import RecommendationsServicer
from service.snapshot import SnapshotHolder, Watcher

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommendations"].full_name
SPARE_THREADS = 4  # handler threads beyond the concurrency limit: health probes and refusals never queue
SHED_LOG_EVERY_S = 10.0  # under sustained overload, one warning per this many seconds


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Counts calls in flight and refuses those beyond `limit` at once with RESOURCE_EXHAUSTED; logs each call.

    Health and reflection are exempt (DESIGN.md section 6: probes must answer under load). The count
    is taken in the handler thread, so a call cancelled before it runs is never counted; with
    `SPARE_THREADS` more handler threads than `limit`, a refusal and a probe always find a thread.
    """

    def __init__(self, limit: int | None, metrics: Metrics, holder: SnapshotHolder) -> None:
        self.limit = limit
        self.metrics = metrics
        self.holder = holder
        self._lock = threading.Lock()
        self._in_flight = 0
        self._shed_since_log = 0
        self._last_log = 0.0
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith(OPEN_METHODS):
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None or wrapped[0] is not handler.unary_unary:  # built once per method, not per call
            wrapped = (handler.unary_unary, self._wrap(method.rsplit("/", 1)[-1], handler))
            self._wrapped[method] = wrapped
        return wrapped[1]

    def _wrap(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._enter():
                self._refuse(rpc, _request_id(context), context)
            started = time.perf_counter()
            try:
                return inner(request, context)
            finally:
                self._leave()
                if logger.isEnabledFor(logging.DEBUG):
                    code = context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
                    snap = self.holder.current
                    logger.debug("%s %s", rpc, code.name, extra={
                        "request_id": _request_id(context), "rpc": rpc, "code": code.name,
                        "ms": round((time.perf_counter() - started) * 1000, 3),
                        "model_version": snap.model_version if snap else None})

        return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def _enter(self) -> bool:
        with self._lock:
            if self.limit is not None and self._in_flight >= self.limit:
                return False
            self._in_flight += 1
        self.metrics.in_flight.inc()
        return True

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.dec()

    def _refuse(self, rpc: str, request_id: str, context: grpc.ServicerContext) -> None:
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
                           extra={"request_id": request_id, "rpc": rpc, "code": "RESOURCE_EXHAUSTED", "shed": shed})
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"overloaded: {self.limit} calls already in flight, the server's limit; retry with backoff")


def _request_id(context: grpc.ServicerContext) -> str:
    """The caller's `x-request-id` metadata, or a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return uuid.uuid4().hex[:12]


@dataclass
class RunningServer:
    """A started server and what it owns; `stop()` shuts it all down."""

    server: grpc.Server
    port: int
    holder: SnapshotHolder
    health: health.HealthServicer
    watcher: Watcher
    metrics: Metrics
    batcher: MicroBatcher

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, close the log."""
        self.set_serving(False)
        self.watcher.stop()
        self.server.stop(grace).wait()
        self.batcher.close()
        self.holder.close()
        self.metrics.stop_http()
        logger.info("server on port %d stopped", self.port)

    def wait(self) -> None:
        self.server.wait_for_termination()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024  # allocations this large and up are mapped and unmapped, never left in a heap


def tune_malloc() -> None:
    """Large blocks mapped on their own (glibc), unless MALLOC_MMAP_THRESHOLD_ says otherwise.

    glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed, after which a
    request's large, short-lived buffers (image bytes, decoded pixels, tensors) come from heaps that
    fragment and never shrink. A fixed threshold keeps them mapped and returned on free. Set for the
    server only: training allocates large tensors every step and would pay for the mappings. The
    arena cap (`onetower/__init__.py`) does the rest. A no-op on other C libraries.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def start_server(config: ServiceConfig, load: bool = True) -> RunningServer:
    """Bind the port, register everything, then load the model and index (health NOT_SERVING until then).

    Raises:
        RuntimeError: the port cannot be bound.
        PairMismatchError, IndexVerificationError, MlflowException: loading failed (the port is closed again).
    """
    tune_malloc()
    limits = config.limits
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    holder = SnapshotHolder(config)
    metrics = Metrics()
    limit = config.max_concurrent_rpcs
    interceptors: list[grpc.ServerInterceptor] = [AdmissionInterceptor(limit, metrics, holder)]
    if config.auth_token:
        interceptors.append(TokenAuthInterceptor(config.auth_token))
    threads = config.workers if limit is None else max(config.workers, limit + SPARE_THREADS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onetower-rpc"),
                         options=options, interceptors=interceptors)
    batcher = MicroBatcher(max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                           max_queue=config.max_queue)
    servicer = RecommendationsServicer(holder, limits, metrics, batcher)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {config.host}:{config.port} (in use?)")
    running = RunningServer(server, port, holder, health_servicer, Watcher(holder, config.poll_seconds, config.registry_timeout_s), metrics,
                            batcher)
    running.set_serving(False)
    server.start()
    logger.info("listening on %s:%d (%d handler threads, %s)", config.host, port, threads,
                f"at most {limit} calls in flight" if limit else "no concurrency limit",
                extra={"port": port, "max_concurrent_rpcs": limit})
    if config.metrics_port is not None:
        metrics_host = config.metrics_host or config.host
        metrics.serve_http(config.metrics_port, metrics_host)
        logger.info("metrics on %s:%d/metrics", metrics_host, config.metrics_port)
    if load:
        try:
            holder.refresh()
        except BaseException:
            server.stop(0).wait()
            batcher.close()
            holder.close()
            raise
        snap = holder.current
        if snap is not None:
            metrics.index_items.set(len(snap.index))
            metrics.model_version.labels(snap.model.name, snap.model.version, snap.index.index_version).set(1)
        running.set_serving(True)
        running.watcher.start()
    return running
