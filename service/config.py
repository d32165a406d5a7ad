"""Service settings: one frozen dataclass filled by the command line (flags or ONETOWER_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embed.encoder import PRECISIONS

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class Limits:
    """Request limits; anything above is RESOURCE_EXHAUSTED (counts, sizes) or INVALID_ARGUMENT (k)."""

    max_items: int = 256  # items per EmbedItems / UpsertItems request
    max_queries: int = 256  # queries per SimilarItems request
    max_ids: int = 1000  # ids per GetEmbeddings / DeleteItems request, events per history
    max_k: int = 1000
    max_text_chars: int = 20_000  # title + description + attributes of one item
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images_per_item: int = 8
    max_request_pixels: int = 200_000_000  # decoded pixels of all images of one request, read from headers
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name}={value!r} must be a positive int")


@dataclass(frozen=True)
class ServiceConfig:
    """Where the model and index come from and how the server runs."""

    model_uri: str  # models:/NAME@ALIAS, models:/NAME/VERSION or a local encoder directory (the commands' default:
    # onetower/settings.py, from training.lifecycle.tracking.DEFAULT_MODEL_URI)
    index_root: Path = Path("index")
    tracking_uri: str | None = None  # None: MLflow's own default (MLFLOW_TRACKING_URI)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    workers: int = 8  # gRPC handler threads
    faiss_threads: int = 1  # one OpenMP thread per search: many searches run at once
    torch_threads: int = 1
    precision: str = "fp32"  # the encoder's: fp32, bf16 or auto (bf16 where the CPU/GPU has it natively)
    max_batch: int = 64  # items per encoder forward pass, pooled across concurrent requests
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # requests waiting for the encoder before RESOURCE_EXHAUSTED
    poll_seconds: float = 30.0  # how often the watcher looks for a new model/index pair; 0 disables
    registry_timeout_s: float = 5.0  # each registry lookup of the watcher: one try, this long (never on a request)
    # Calls in flight beyond this are refused at once with RESOURCE_EXHAUSTED (health and reflection are
    # exempt and keep spare handler threads); None: no limit, calls wait for a handler thread.
    max_concurrent_rpcs: int | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None  # the /metrics interface; None: the gRPC `host`
    # several processes share the port (SO_REUSEPORT; set by a `--processes` group for its members only)
    reuse_port: bool = False
    # a `--processes` group's members agree on swaps through slot files here (service/swap_barrier.py)
    swap_dir: Path | None = None
    swap_slot: int = 0
    swap_members: int = 1
    cache_dir: Path = Path(".onetower-cache")
    auth_token: str | None = None  # set: every RPC but health and reflection needs `authorization: Bearer <token>`
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the port speaks TLS only
    tls_key: Path | None = None
    limits: Limits = Limits()
    # refuse UpsertItems/DeleteItems (FAILED_PRECONDITION "read_only") and open no live-write log: a second
    # server pinned to a candidate version beside the served one (the explorer's compare) appends nothing
    read_only: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.poll_seconds < 0:
            raise ValueError(f"poll_seconds={self.poll_seconds} must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.registry_timeout_s <= 0:
            raise ValueError(f"registry_timeout_s={self.registry_timeout_s} must be > 0")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs={self.max_concurrent_rpcs} must be >= 1 (or None for no limit)")
