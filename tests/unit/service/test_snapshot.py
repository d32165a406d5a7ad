"""`SnapshotHolder`: what a loaded version is served with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index.config import IndexConfig
from index.ids import IdMap
from index.live import LiveIndex
from index.publish import load_version, publish_index
from service.config import ServiceConfig
from service.registry import lookup_model
from service.snapshot import SnapshotHolder

from .conftest import Served
from .test_reliability import _own_index_root


def test_the_served_index_is_searched_with_the_effort_it_was_published_with(served: Served, tmp_path: Path) -> None:
    """nprobe, refine_factor and the code layout come from the version's manifest, not the serving defaults:
    a fast-scan IVF-PQ published with a 16x re-rank is served with it, and finds its own items."""
    root = _own_index_root(served, tmp_path / "index")
    ref = lookup_model(str(served.encoder_dir))
    dim = load_version(root).manifest.dim
    x = np.random.default_rng(0).normal(size=(1200, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    config = IndexConfig(kind="ivfpq", pq_m=dim // 2, pq_bits=4, nprobe=5, refine_factor=16, use_opq=False)
    publish_index(root, x, IdMap([f"p{i}" for i in range(len(x))], [""] * len(x), [{}] * len(x)), config,
                  ref.name, ref.version)
    holder = SnapshotHolder(ServiceConfig(model_uri=str(served.encoder_dir), index_root=root, poll_seconds=0,
                                          cache_dir=tmp_path / "cache", faiss_threads=1))
    try:
        assert holder.refresh()
        index = holder.current.index  # type: ignore[union-attr]
        assert (index.config.nprobe, index.config.refine_factor, index.config.threads) == (5, 16, 1)
        # so does a LiveIndex given no config, e.g. in a batch job
        assert LiveIndex(load_version(root), None, ref.version).config.refine_factor == 16
        hits = index.search(x[:20], 1)
        assert [h[0].item_id for h in hits] == [f"p{i}" for i in range(20)]  # exact scores after the re-rank
    finally:
        holder.close()
