"""Prometheus metrics, all prefixed `onetower_`, on their own registry (so several servers can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[Any, Any] = {}
        r = self.registry
        self.requests = Counter("onetower_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("onetower_request_seconds", "RPC latency by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("onetower_batch_items", "items or queries per request", ["method"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        # multiprocess_mode: how a --processes group's one /metrics combines its members' values
        self.queue_depth = Gauge("onetower_encode_queue_depth", "requests waiting for the encoder", registry=r,
                                 multiprocess_mode="livesum")
        self.index_items = Gauge("onetower_index_items", "live items in the served index", registry=r,
                                 multiprocess_mode="livemax")
        self.in_flight = Gauge("onetower_in_flight_rpcs", "calls being handled (health and reflection excluded)",
                               registry=r, multiprocess_mode="livesum")
        self.shed = Counter("onetower_shed", "calls refused by the concurrency limit (RESOURCE_EXHAUSTED)",
                            ["method"], registry=r)
        self.log_bytes = Gauge("onetower_live_log_bytes", "size of the live-write log", registry=r,
                               multiprocess_mode="livemax")
        self.log_superseded_bytes = Gauge(
            "onetower_live_log_superseded_bytes",
            "bytes of live-write log records a later write of the same item supersedes (compaction frees them)",
            registry=r, multiprocess_mode="livemax")
        self.log_compactions = Gauge("onetower_live_log_compactions", "live-write log compactions by this process",
                                     registry=r, multiprocess_mode="livesum")
        self.malformed = Counter("onetower_malformed_requests", "requests that did not parse, by method",
                                 ["method"], registry=r)
        self.model_version = Gauge("onetower_model_version", "served model version (1 for the served one)",
                                   ["model", "version", "index_version"], registry=r, multiprocess_mode="livemax")

    def count(self, method: str, code: str, seconds: float) -> None:
        """One answered call: `requests` by method and code, `latency` by method (label children cached:
        `labels()` takes a lock and builds a key each time)."""
        children = self._children
        counter = children.get((method, code))
        if counter is None:
            counter = children[(method, code)] = self.requests.labels(method, code)
        latency = children.get(method)
        if latency is None:
            latency = children[method] = self.latency.labels(method)
        counter.inc()
        latency.observe(seconds)

    def observe_batch(self, method: str, size: int) -> None:
        child = self._children.get(("batch", method))
        if child is None:
            child = self._children[("batch", method)] = self.batch_size.labels(method)
        child.observe(size)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics on `port` until `stop_http()`."""
        self._http: tuple[Any, Any] | None = start_http_server(port, addr=addr, registry=self.registry)

    def stop_http(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http[0].shutdown()
            http[0].server_close()
            self._http = None
