"""A small world for the server-level chaos parts: a synthetic catalog, an untrained tiny encoder saved as a
local directory (served with `--model <dir>`, no registry), a published flat index, and `onetower serve`
as a real, restartable process (`tests/integration/crash_util.py`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from embed.config import preset
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from service.client import Client
from service.registry import lookup_model
from tests.integration.conftest import free_port
from tests.integration.crash_util import copy_index_root, serve_process, wait_for
from training.data.synthetic import SynthConfig, generate
from training.reindex.job import reindex

N_ITEMS = 120  # a catalog that makes a few 100-item shards in paused reindex runs, small enough to embed in seconds


@dataclass(frozen=True)
class World:
    catalog: Path  # catalog.parquet
    encoder_dir: Path
    index_root: Path  # the pristine published root: copy it (`fresh_root`) before serving it
    model_version: str  # "local:<encoder dir>", as lookup_model names a directory


def make_world(base: Path, seed: int = 0) -> World:
    """Catalog -> tokenizer + untrained tiny encoder (seeded) -> flat index published under base/index."""
    ds = generate(base / "data", SynthConfig(n_items=N_ITEMS, n_users=50, seed=seed, image_size=32))
    torch.manual_seed(seed)
    import polars as pl

    frame = pl.read_parquet(ds.catalog)
    texts = [f"{t or ''} {d or ''}" for t, d in zip(frame["title"], frame["description"], strict=True)]
    tokenizer = TextTokenizer.train(texts, 300, min_frequency=1)
    encoder_dir = save_encoder(base / "encoder", UnifiedEncoder(preset("tiny", vocab_size=tokenizer.vocab_size)),
                               tokenizer)
    ref = lookup_model(str(encoder_dir))
    reindex(ds.catalog, load_encoder(encoder_dir), ref.name, ref.version, base / "index", IndexConfig(kind="flat"))
    return World(ds.catalog, encoder_dir, base / "index", ref.version)


def fresh_root(world: World, root: Path) -> Path:
    """A private copy of the published versions (no live log, no staging)."""
    if root.exists():
        shutil.rmtree(root)
    return copy_index_root(world.index_root, root)


def serving(c: Client) -> bool:
    try:
        return c.health_status() == "SERVING"
    except grpc.RpcError:
        return False


@dataclass
class ServeProc:
    """`onetower serve --model <encoder dir>` on `root` as a real process, restartable on a new port."""

    world: World
    root: Path
    log: Path
    poll_seconds: float = 0
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    target: str = ""
    starts: int = 0

    def start(self, timeout: float = 180) -> float:
        """Start and wait for SERVING; returns the seconds it took."""
        t = time.monotonic()
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.proc = serve_process(self.root, "", port, self.root.parent / "cache", self.log, self.poll_seconds,
                                  model_uri=str(self.world.encoder_dir), extra=self.extra)
        with Client(self.target, timeout=2) as c:
            wait_for(lambda: serving(c), "SERVING", self.proc, self.log, timeout=timeout, every=0.05)
        self.starts += 1
        return time.monotonic() - t

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident memory (VmRSS) of the server process, KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else 0

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def quiet_env() -> None:
    """Client-side defaults for the harness process: no gRPC fork warnings, single-threaded torch."""
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    torch.set_num_threads(1)
