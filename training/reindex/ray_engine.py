"""The reindex job's embedding step on Ray Data: catalog rows -> an actor pool that loads the encoder once per actor.

`RayEngine` is an `EmbedEngine` for `training.reindex.reindex`: the job itself (content hashes,
reuse, shards, log folding, build, publish) stays in the calling process; only the rows to embed
are sent to Ray, in blocks of `block_rows`, and come back in order. The encoder's files travel
through Ray's object store, so workers on other machines need no shared model folder; image
files named by path in the catalog must be readable at the same path on every worker.

Against the local engine: the same shards (same folder and identity, so either engine resumes the
other's interrupted run), the same incremental decisions (made before Ray starts), the same vectors
(up to float rounding of a different batch split) in the same order. What differs: the catalog is
read by this process (it hashes every item, images included) and the rows to embed are shipped
from it, so their image files are read twice; a crash loses the blocks Ray has in flight or
buffered plus fewer than `shard_size` returned results, not at most one shard; starting a local Ray
and its actors costs seconds, so small catalogs are faster on the local engine.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from embed.load import ENCODER_FILES, load_encoder
from training.data.catalog import iter_items
from training.data.embedding import embed_batch

logger = logging.getLogger(__name__)

RAY_MISSING = "Ray is not installed: pip install 'onetower[distributed]'"
CATALOG_COLUMNS = ("item_id", "title", "description", "attributes", "image_refs", "images")  # what iter_items reads


def import_ray() -> ModuleType:
    """Import ray (with Ray Data), or fail with the command that installs it."""
    try:
        importlib.import_module("ray.data")
        return importlib.import_module("ray")
    except ImportError as exc:
        raise RuntimeError(RAY_MISSING) from exc


@dataclass(frozen=True)
class RayEngine:
    """Embed catalog rows with Ray Data actors.

    Args:
        encoder_dir: a saved encoder folder (config.json, weights, tokenizer.json).
        address: an existing Ray cluster (`ray://...` or `host:port`); None starts a local Ray in
            this process for the job (no dashboard) and stops it afterwards.
        num_cpus: CPUs of that local Ray (ignored with `address`).
        actors: encoder actors; each holds one copy of the model.
        torch_threads: intra-op threads per actor (1: actors, not threads, use the cores).
    """

    encoder_dir: Path
    address: str | None = None
    num_cpus: int = 2
    actors: int = 1
    batch_size: int = 64  # items per forward pass
    device: str = "cpu"
    torch_threads: int = 1
    precision: str = "fp32"  # the encoder's arithmetic in each actor (see embed.encoder.ItemEncoder)
    block_rows: int = 1024  # catalog rows per Ray block: the unit of scheduling

    def __post_init__(self) -> None:
        for name in ("num_cpus", "actors", "batch_size", "torch_threads", "block_rows"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")

    def embed(self, frame: pl.DataFrame, base: Path) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
        """Embed the rows of a normalised catalog frame; batches come back in catalog order."""
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            _start(ray, self.address, self.num_cpus)
        try:
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # shards and labels as the local engine makes them
            context.enable_progress_bars = False  # the job has its own
            files = ray.put({name: (self.encoder_dir / name).read_bytes() for name in ENCODER_FILES})
            table = frame.select(CATALOG_COLUMNS).to_arrow()
            blocks = [table.slice(i, self.block_rows) for i in range(0, table.num_rows, self.block_rows)]
            pool = ray.data.ActorPoolStrategy(size=self.actors)
            ds = ray.data.from_arrow(blocks).map_batches(
                _Embedder, fn_constructor_args=(files, str(base), self.device, self.batch_size, self.torch_threads,
                                                self.precision),
                batch_size=self.batch_size, batch_format="pyarrow", compute=pool,
                num_cpus=1 if self.device == "cpu" else 0, num_gpus=0 if self.device == "cpu" else 1)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                errors = [str(e) for e in batch["error"]]
                accepted = np.array([not e for e in errors], bool)
                yield [str(i) for i in batch["item_id"]], errors, np.asarray(batch["vector"], np.float32)[accepted]
        finally:
            if started:
                ray.shutdown()


def _start(ray: ModuleType, address: str | None, num_cpus: int) -> None:
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
        logger.info("connected to Ray at %s", address)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    logger.info("started a local Ray with %d CPUs", num_cpus)


class _Embedder:
    """One Ray actor: writes the shipped encoder files to a temporary folder, loads them once, embeds batches."""

    def __init__(self, files: Any, base: str, device: str, batch_size: int, torch_threads: int,
                 precision: str = "fp32") -> None:
        import ray
        import torch

        files = ray.get(files)  # a reference into the object store: one copy per node, not per actor
        torch.set_num_threads(torch_threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads))
        self._folder = tempfile.TemporaryDirectory(prefix="onetower-encoder-")
        for name, data in files.items():
            (Path(self._folder.name) / name).write_bytes(data)
        self.encoder = load_encoder(Path(self._folder.name), device=device, batch_size=batch_size,
                                    precision=precision)
        self.base = Path(base)

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        frame = pl.from_arrow(batch)
        if not isinstance(frame, pl.DataFrame):
            raise TypeError(f"map_batches gave {type(batch).__name__}, want a pyarrow Table")
        items = list(iter_items(frame, self.base))
        vectors, errors = embed_batch(self.encoder, items)
        full = np.zeros((len(items), self.encoder.dim), np.float32)  # refused items get a zero row, dropped later
        full[np.array([not e for e in errors], bool)] = vectors
        return {"item_id": np.array([it.item_id for it in items], dtype=object),
                "error": np.array(errors, dtype=object), "vector": full}
