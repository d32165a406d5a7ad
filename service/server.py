"""Server assembly: servicer, health, reflection, metrics, message-size limits, graceful stop."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc
from service.auth import TokenAuthInterceptor, server_credentials
from service.batching import MicroBatcher
from service.config import ServiceConfig
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


def start_server(config: ServiceConfig, load: bool = True) -> RunningServer:
    """Bind the port, register everything, then load the model and index (health NOT_SERVING until then).

    Raises:
        RuntimeError: the port cannot be bound.
        PairMismatchError, IndexVerificationError, MlflowException: loading failed (the port is closed again).
    """
    limits = config.limits
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    interceptors = [TokenAuthInterceptor(config.auth_token)] if config.auth_token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="onetower-rpc"),
                         options=options, interceptors=interceptors)
    holder = SnapshotHolder(config)
    metrics = Metrics()
    batcher = MicroBatcher(max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                           max_queue=config.max_queue)
    servicer = RecommendationsServicer(holder, limits, metrics, batcher)
    pb_grpc.add_RecommendationsServicer_to_server(servicer, server)
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
    running = RunningServer(server, port, holder, health_servicer, Watcher(holder, config.poll_seconds), metrics,
                            batcher)
    running.set_serving(False)
    server.start()
    logger.info("listening on %s:%d", config.host, port)
    if config.metrics_port is not None:
        metrics.serve_http(config.metrics_port)
        logger.info("metrics on :%d/metrics", config.metrics_port)
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
