"""Run a reindex as the command does: resolve the model, pick the engine, show progress, describe the result."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import polars as pl
from rich.console import Console

from embed.load import load_encoder
from index.config import IndexConfig
from training.console import progress_bar
from training.reindex.job import ReindexResult, reindex


class Engine(StrEnum):
    """Where catalog items are embedded (a command-line choice)."""

    local = "local"
    ray = "ray"


@dataclass(frozen=True)
class RayOptions:
    """`reindex --engine ray`: a cluster address (None: a local Ray), encoder actors, local CPUs."""

    address: str | None = None
    actors: int = 1
    num_cpus: int = 2


class ModelFiles(Protocol):
    """A model's files and registry name and version (e.g. `training.lifecycle.register.ResolvedModel`)."""

    @property
    def directory(self) -> Path: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...


def pick_device(name: str) -> str:
    """`name`, or for "auto" "cuda" when a GPU is there, else "cpu"."""
    if name != "auto":
        return name
    import torch  # only to ask for a GPU

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_reindex(catalog: Path, index_root: Path, model: ModelFiles, index_config: IndexConfig,
                batch_size: int = 64, device: str = "cpu", out: Console | None = None, *, incremental: bool = False,
                fold_log: bool = True, keep_versions: int | None = 3, ray: RayOptions | None = None,
                precision: str = "fp32") -> ReindexResult:
    """Reindex with the encoder in `model.directory` (named `model.name` `model.version` in the index's
    manifest), showing a progress bar.

    With `ray`, the catalog items are embedded by Ray Data actors (`training.reindex.ray_engine`).
    """
    encoder = load_encoder(model.directory, device=device, batch_size=batch_size, precision=precision)
    engine = None
    if ray is not None:
        from training.reindex.ray_engine import RayEngine  # Ray is an optional extra

        engine = RayEngine(model.directory, address=ray.address, num_cpus=ray.num_cpus, actors=ray.actors,
                           batch_size=batch_size, device=device, precision=precision)
    rows = pl.scan_parquet(catalog).select(pl.len()).collect().item()
    with progress_bar(f"embedding with {model.name} v{model.version}", rows, out) as advance:
        return reindex(catalog, encoder, model.name, model.version, index_root, index_config, advance,
                       incremental=incremental, fold_log=fold_log, keep_versions=keep_versions, engine=engine)


def describe_reindex(result: ReindexResult) -> str:
    """One line for a person: what was published, how much was embedded, reused and folded, how fast."""
    rate = (result.count + result.skipped) / max(result.seconds, 1e-9)
    return (f"published index [bold green]{result.index_version}[/]: {result.count} items ({result.embedded} "
            f"embedded, {result.reused} reused, {result.resumed} resumed, {result.folded} live writes folded"
            f"{f' ({result.pending} kept in the log until the catalog shows them)' if result.pending else ''}"
            f"{f', {result.replaced} live writes replaced by newer catalog rows' if result.replaced else ''}), "
            f"{result.skipped} skipped, {result.seconds:.1f}s ({rate:.0f} items/s) in {result.path}")
