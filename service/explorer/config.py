"""Explorer settings: one frozen dataclass filled by `onetower explore` (flags or ONETOWER_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_EXPLORER_PORT = 8765


@dataclass(frozen=True)
class ExplorerConfig:
    """Which service the page talks to, where titles and images come from, where the page listens."""

    target: str  # host:port of the gRPC service
    catalog: Path | None = None  # parquet with titles and images; None: ids and live items only
    token: str | None = None  # the service's bearer token, sent on every call
    root_cert: bytes | None = None  # PEM roots to trust: the service speaks TLS
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = DEFAULT_EXPLORER_PORT  # 0 picks a free one
    timeout: float = 30.0  # seconds per gRPC call
    tracking_uri: str | None = None  # registry for the compare view; None: MLflow's default
    index_root: Path = Path("index")  # where each compared version's published index is found
    cache_dir: Path = Path(".onetower-cache")  # model files of the compared versions
    k: int = 12  # neighbours per grid unless the page asks for another number
    sample_size: int = 24  # catalog items on the first page

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout} must be > 0")
        if not 1 <= self.k <= 1000:
            raise ValueError(f"k={self.k} must be in [1, 1000]")
