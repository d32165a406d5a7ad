"""Server assembly: servicer, health, reflection, metrics, message-size limits, graceful stop."""

from __future__ import annotations

import ctypes
import logging
import os
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.onetower.v1 import onetower_pb2 as pb
from service.admission import SPARE_THREADS, Admission
from service.auth import TokenAuthInterceptor, server_credentials
from service.batching import MicroBatcher
from service.config import ServiceConfig
from service.errors import add_to_server
from service.metrics import Metrics
from service.servicer import RecommendationsServicer
from service.snapshot import SnapshotHolder, Watcher

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommendations"].full_name
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
    """Bind the port, register everything, then load the model and index (health NOT_SERVING until then);
    a member of a `--processes` group (`config.reuse_port`) loads first and listens once it can serve.

    Raises:
        RuntimeError: the port cannot be bound.
        PairMismatchError, IndexVerificationError, MlflowException: loading failed (the port is closed again).
    """
    tune_malloc()
    limits = config.limits
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # a second server on the same port must fail, not share it; a --processes group shares it (service/group.py)
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
    ]
    holder = SnapshotHolder(config)
    # a member of a --processes group loads before it listens: on a SO_REUSEPORT port the kernel hands new
    # connections to every listening member, also to one still loading (a 10M-item index takes a minute)
    early = load and config.reuse_port
    if early:
        try:
            # False with nothing served: restarted into a running group, another member staged a newer pair
            while not holder.refresh() and holder.current is None and not holder.stopping.is_set():
                pass
        except BaseException:
            holder.close()
            raise
    metrics = Metrics()
    limit = config.max_concurrent_rpcs
    # no interceptor unless a token is required: each costs every call a Python lookup and wrapper
    interceptors = [TokenAuthInterceptor(config.auth_token)] if config.auth_token else None
    threads = config.workers if limit is None else max(config.workers, limit + SPARE_THREADS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onetower-rpc"),
                         options=options, interceptors=interceptors)
    batcher = MicroBatcher(max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                           max_queue=config.max_queue)
    servicer = RecommendationsServicer(holder, limits, metrics, batcher, Admission(limit, metrics, holder))
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
            if not early:
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
