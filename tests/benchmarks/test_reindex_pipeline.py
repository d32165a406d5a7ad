"""The reindex job end to end against its encoder alone: pipeline efficiency, local vs Ray.

items/s of the whole job (read the catalog parquet and image files, hash, decode and tokenise, embed,
write shards, build, verify and publish) over items/s of the encoder's `encode` on the same items
already in memory (decode, tokenise and forward: what no pipeline can avoid). The ratio is the share
of the encoder's speed the job keeps. Ray is started once (its own row); each Ray job row includes
starting its actors (each loads the encoder).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import faiss
import pytest
import torch

from embed.config import EncoderConfig
from embed.items import Item
from embed.load import load_encoder, save_encoder
from embed.model import UnifiedEncoder
from embed.tokens import TextTokenizer
from index.config import IndexConfig
from training.data.catalog import iter_items, read_catalog
from training.data.synthetic import SynthConfig, generate
from training.reindex.job import reindex
from training.reindex.ray_engine import RayEngine

from .conftest import QUICK, write_result

pytestmark = pytest.mark.benchmark

N_ITEMS = 256 if QUICK else 4000
BATCH = 64
THREADS = max(1, min(2, os.cpu_count() or 1))  # Ray CPUs and the most actors
# torch threads in this process, as in each Ray actor: on the shared 2-core machine one thread encoded
# 2.5-4x faster than two (159-181 vs 45-62 items/s at load average 8), so 1 keeps the comparison fair
TORCH_THREADS = 1
FLAT = IndexConfig(kind="flat", use_gpu=False)


def _encoder_alone(encoder: Any, items: list[Item]) -> float:
    """items/s of `encoder.encode` over in-memory items (best of two passes)."""
    encoder.encode(items[:BATCH])  # warm up
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for i in range(0, len(items), BATCH):
            encoder.encode(items[i: i + BATCH])
        best = min(best, time.perf_counter() - t)
    return len(items) / best


def test_reindex_pipeline_efficiency(tmp_path: Path) -> None:
    ds = generate(tmp_path / "data", SynthConfig(n_items=N_ITEMS, n_users=10, seed=3))
    items = list(iter_items(read_catalog(ds.catalog), ds.catalog.parent))
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([it.text for it in items], 2000, min_frequency=1)
    config = EncoderConfig(vocab_size=tokenizer.vocab_size)  # the default (laptop CPU) architecture, untrained
    encoder_dir = save_encoder(tmp_path / "encoder", UnifiedEncoder(config), tokenizer)
    torch.set_num_threads(TORCH_THREADS)
    faiss.omp_set_num_threads(THREADS)
    encoder = load_encoder(encoder_dir, batch_size=BATCH)
    alone = _encoder_alone(encoder, items)
    rows: list[dict[str, Any]] = [{"run": "encoder alone (in-memory items)", "items": len(items),
                                   "seconds": len(items) / alone, "items_per_s": alone, "ratio_to_encoder": 1.0}]

    def job(name: str, root: Path, **kwargs: Any) -> None:
        load = os.getloadavg()[0]
        result = reindex(ds.catalog, encoder, "bench", "1", root, FLAT, **kwargs)
        rate = (result.count + result.skipped) / result.seconds
        rows.append({"run": f"{name} (load avg {load:.1f})", "items": result.count + result.skipped,
                     "seconds": result.seconds, "items_per_s": rate, "ratio_to_encoder": rate / alone})

    job("reindex, local engine", tmp_path / "local")
    if _has_ray():  # the `distributed` extra
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=THREADS, include_dashboard=False, configure_logging=False, log_to_driver=False)
        rows.append({"run": "start a local Ray (ray.init)", "items": 0, "seconds": time.perf_counter() - t,
                     "items_per_s": 0.0, "ratio_to_encoder": 0.0})
        try:
            for actors in (1, THREADS):
                engine = RayEngine(encoder_dir, num_cpus=THREADS, actors=actors, batch_size=BATCH, torch_threads=1,
                                   block_rows=max(BATCH, N_ITEMS // 8))
                job(f"reindex, ray engine, {actors} actor(s) x 1 thread (actor start included)",
                    tmp_path / f"ray{actors}", engine=engine)
        finally:
            ray.shutdown()
    notes = (f"Catalog: training.synthetic.generate, {N_ITEMS} items (64 px PNGs on disk, 10% without image). "
             f"Encoder: EncoderConfig() defaults, untrained ({sum(p.numel() for p in encoder.model.parameters()):,} "
             f"parameters), batch {BATCH}, torch threads {TORCH_THREADS} in this process and in each Ray actor. Index: flat. The job's seconds "
             "are ReindexResult.seconds (catalog read to published). ratio_to_encoder = job items/s / encoder-alone "
             "items/s. The load average is the 1-minute one when the run began: the machine was shared.")
    write_result("reindex_pipeline", rows, notes)


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True
